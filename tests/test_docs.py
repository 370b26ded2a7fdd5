"""The docs stay true: every Python block of README.md and docs/*.md runs as written (the
README's first, the drop-in example, is tests/test_readme.py's), every relative link
points to a file and heading that exist, and docs/install.md gives the README's two
commands verbatim."""
import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(
    "docs/" + os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
TORCHRUN = "# torchrun --standalone --nproc-per-node=2 this_file.py"
# Modules a snippet needs besides the ones it imports (Trainer needs accelerate).
ALSO_NEEDS = {"transformers": ["accelerate"]}


def _read(page):
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def _parse(page):
    """(blocks, prose): the fenced blocks as (language, code, heading above), and the text
    outside them."""
    blocks, prose, fence, heading = [], [], None, ""
    for line in _read(page).splitlines(keepends=True):
        if fence is None and line.startswith("```"):
            fence = (line[3:].strip(), [])
        elif fence is not None and line.strip() == "```":
            blocks.append((fence[0], "".join(fence[1]), heading))
            fence = None
        elif fence is not None:
            fence[1].append(line)
        else:
            prose.append(line)
            if line.startswith("#"):
                heading = line
    assert fence is None, f"{page}: a code block is not closed"
    return blocks, "".join(prose)


def _slug(heading):
    """GitHub's anchor for a heading line: lower case, punctuation dropped, spaces to '-'."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page):
    seen, anchors = {}, set()
    for line in _parse(page)[1].splitlines():
        if re.match(r"#{1,6} ", line):
            slug = _slug(line)
            anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _python_blocks():
    cases = []
    for page in PAGES:
        python = [(code, heading) for lang, code, heading in _parse(page)[0] if lang == "python"]
        for index, (code, heading) in enumerate(python):
            if page == "README.md" and index == 0:
                continue  # the drop-in example: tests/test_readme.py checks its output too
            cases.append(pytest.param(page, index, id=f"{page}#{_slug(heading)}-{index}"))
    return cases


def _missing_modules(code):
    imported = re.findall(r"^(?:from|import) +(\w+)", code, flags=re.M)
    needed = set(imported).union(*(ALSO_NEEDS.get(name, ()) for name in imported))
    return sorted(name for name in needed if importlib.util.find_spec(name) is None)


@pytest.mark.parametrize("page, index", _python_blocks())
def test_python_block_runs_as_written(tmp_path, page, index):
    code = [code for lang, code, _ in _parse(page)[0] if lang == "python"][index]
    missing = _missing_modules(code)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}, not installed")
    (tmp_path / "snippet.py").write_text(code)
    # The snippet runs unchanged through runpy; the runner then leaves with os._exit, skipping
    # interpreter finalization, where torch's gloo threads can still be releasing a finished
    # broadcast and abort the process (torch's race, not the snippet's: see the note at the
    # end of distributed_worker._worker). An exception in the snippet still fails the run.
    (tmp_path / "run_snippet.py").write_text(
        "import os, runpy, sys\n"
        "runpy.run_path(os.path.join(os.path.dirname(__file__), 'snippet.py'), "
        "run_name='__main__')\n"
        "sys.stdout.flush(); sys.stderr.flush(); os._exit(0)\n")
    script = str(tmp_path / "run_snippet.py")
    if code.startswith(TORCHRUN):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               script]
    else:
        cmd = [sys.executable, script]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*filter(None, sys.path), ROOT]))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip(), "each snippet prints its result"


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    prose = re.sub(r"`[^`\n]*`", "", _parse(page)[1])  # no links inside code spans
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(ROOT, linked)):
            broken.append(f"{target}: no file {linked}")
        elif anchor and not (linked.endswith(".md") and anchor in _anchors(linked)):
            broken.append(f"{target}: no heading #{anchor} in {linked}")
    assert not broken, f"{page}: " + "; ".join(broken)


def test_install_page_gives_the_readmes_two_commands():
    readme = [code for lang, code, _ in _parse("README.md")[0] if lang == "bash"]
    install = [code for lang, code, _ in _parse("docs/install.md")[0] if lang == "bash"]
    assert len(readme) == 2 and all(command in install for command in readme)
