"""The README stays true: its Python example runs and prints what the README shows, and
its test command is the one CI runs."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def _blocks(lang):
    return re.findall(r"```" + lang + r"\n(.*?)```", _readme(), flags=re.S)


def test_drop_in_example_prints_identical_losses():
    (code,) = _blocks("python")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, *sys.path]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr  # the example asserts the losses are equal
    # the output block right after the example is what it prints
    after = _readme().split(code, 1)[1]
    shown = re.match(r"```\s*```\n(.*?)```", after, flags=re.S).group(1)
    assert out.stdout == shown


def test_ci_runs_the_readme_test_command():
    commands = [c.strip() for c in _blocks("bash")]
    assert len(commands) == 2, "the README gives exactly two commands"
    assert commands[0].endswith("python benchmarks/bench.py")
    assert commands[1].endswith("python -m pytest tests -q")
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [line.strip() for line in f]
    assert commands[1] in ci
