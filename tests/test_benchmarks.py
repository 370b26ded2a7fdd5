"""The benchmark and the ULP report run, and write well-formed output. No timing is asserted:
benchmarks are measured with the script, never judged in tests."""
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "bench.py")
REPORT = os.path.join(ROOT, "benchmarks", "parity_report.py")
ALGOS = ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad")  # the default --algos of both scripts


def _run(args, timeout=600, returncode=0):
    # the package as the tests see it (installed, or built in place in ROOT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*filter(None, sys.path), ROOT]))
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                         cwd=ROOT, env=env)
    assert out.returncode == returncode, out.stderr[-4000:]
    return out


# Two algorithms are enough for the output's form: Adam has every implementation, RMSprop
# none with fused=True (the default five took two minutes of CI).
BENCH_ALGOS = ("Adam", "RMSprop")


@pytest.mark.parametrize("extra", [["--workloads", "W1,W3,W4", "--threads", "1,2",
                                    "--algos", ",".join(BENCH_ALGOS)]])
def test_bench_quick_output_is_well_formed(tmp_path, extra):
    out = _run([BENCH, "--quick", "--out", str(tmp_path), *extra])
    data = json.loads((tmp_path / "bench.json").read_text())
    assert "torch " in data["machine"] and "threads 1,2" in data["machine"]
    rows = data["rows"]
    impls = {"fused_optim", "torch foreach=False", "torch foreach=True", "torch fused=True"}
    # every (workload, algo, threads) has a row per implementation, with every column
    keys = {(r["workload"], r["algo"], r["threads"]) for r in rows}
    assert keys == {(w, a, t) for w in ("W1", "W3", "W4") for a in BENCH_ALGOS for t in (1, 2)}
    for key in keys:
        # torch has no fused RMSprop: no such row, and no speedup over it
        want = impls - {"torch fused=True"} if key[1] == "RMSprop" else impls
        assert want <= {r["impl"] for r in rows if (r["workload"], r["algo"], r["threads"]) == key}
    for r in rows:
        for col in ("ms", "gbs", "pct_limit", "limit_gbs", "us_per_tensor"):
            assert isinstance(r[col], float) and math.isfinite(r[col]) and r[col] > 0, (col, r)
        assert r["steps"] >= 5
        # interleaved rounds: every implementation and the limit probe timed in each round,
        # each round's time kept; the row is the median of its rounds
        assert r["rounds"] >= 3 and len(r["round_ms"]) == len(r["limit_round_gbs"]) == r["rounds"]
        assert r["steps"] == r["rounds"] * r["steps_per_round"]
        assert r["ms"] == pytest.approx(statistics.median(r["round_ms"]))
        if r["speedup_vs_torch_fused"] is not None:
            assert len(r["speedup_vs_torch_fused_rounds"]) == r["rounds"]
        assert r["extra_peak_mib"] is None or r["extra_peak_mib"] >= 0
        if r["impl"] == "torch fused=True":
            assert r["speedup_vs_torch_fused"] == pytest.approx(1.0)
        if r["algo"] == "RMSprop":
            assert r["speedup_vs_torch_fused"] is None
        # % of the limit: the median over rounds of each round's time against that round's
        # limit probe
        per_round = [100 * (r["gbs"] * r["ms"]) / ms / lim  # this round's GB/s over its limit
                     for ms, lim in zip(r["round_ms"], r["limit_round_gbs"])]
        assert r["pct_limit"] == pytest.approx(statistics.median(per_round), rel=1e-9)
    # the markdown table: a machine line, a header, one line per row plus one limit line per key
    md = (tmp_path / "bench.md").read_text().strip().splitlines()
    assert md[0] == "Machine: " + data["machine"]
    table = [line for line in md if line.startswith("| ") and not line.startswith("| workload")]
    assert len(table) == len(rows) + len(keys)
    assert md[0] in out.stdout
    # the summary: the same machine line, one line per (workload, algo, threads)
    summary = (tmp_path / "summary.md").read_text().strip().splitlines()
    assert summary[0] == md[0]
    assert len([line for line in summary if line.startswith("| W")]) == len(keys)
    assert "prefetch" in data["machine"]  # the CPU tuning in force (Note [CPU tuning])
    if importlib.util.find_spec("matplotlib") is None:  # (the README's command installs it)
        assert "matplotlib is not installed: no chart written" in out.stdout + out.stderr
        return
    png = (tmp_path / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_dtypes_option_runs_workloads_in_other_dtypes(tmp_path):
    _run([BENCH, "--quick", "--out", str(tmp_path), "--workloads", "W1,W4", "--algos", "Adam",
          "--dtypes", "float16,bfloat16", "--impls", "fused_optim,torch fused=True"])
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    # W4 is bf16 already: it keeps its name there; every other pair is named for its dtype.
    got = {(r["workload"], r["dtype"], r["impl"]) for r in rows}
    want = {(w, d, i) for w, d in [("W1 fp16", "float16"), ("W1 bf16", "bfloat16"),
                                   ("W4 fp16", "float16"), ("W4", "bfloat16")]
            for i in ("fused_optim", "torch fused=True")}
    assert got == want
    for r in rows:  # each row's speedup is against torch in the same dtype
        if r["impl"] == "torch fused=True":
            assert r["speedup_vs_torch_fused"] == pytest.approx(1.0)
    out = _run([BENCH, "--dtypes", "int8"], returncode=2)
    assert "--dtypes: unsupported int8" in out.stderr


def test_bench_tuning_option_adds_a_row_per_tuning(tmp_path):
    """--tuning: one more fused_optim row per SETTINGS, timed in the same rounds, named by
    its settings; the process's own tuning is back after the run (its machine line)."""
    _run([BENCH, "--quick", "--out", str(tmp_path), "--workloads", "W1,W3", "--algos", "SGD",
          "--impls", "fused_optim,torch fused=True",
          "--tuning", "FUSED_OPTIM_PREFETCH=384",
          "--tuning", "FUSED_OPTIM_PREFETCH=off FUSED_OPTIM_FLOAT_LOOPS=avx2"])
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = data["rows"]
    names = ["fused_optim", "fused_optim PREFETCH=384", "fused_optim PREFETCH=off FLOAT_LOOPS=avx2",
             "torch fused=True"]
    for w in ("W1", "W3"):
        got = [r for r in rows if r["workload"] == w]
        assert [r["impl"] for r in got] == names
        assert len({r["rounds"] for r in got}) == 1 and all(len(r["round_ms"]) == r["rounds"] for r in got)
    if not any(os.environ.get(f"FUSED_OPTIM_{v}") for v in ("PREFETCH", "GATHER_PREFETCH",
                                                             "Q8_CODES", "FLOAT_LOOPS")):
        assert "FUSED_OPTIM_" not in data["machine"]  # (the run's own tuning)
    summary = (tmp_path / "summary.md").read_text()
    assert "| W1 | SGD (PREFETCH=384) | " in summary


@pytest.mark.parametrize("args,message", [
    (["--algos", "Adam,Foo"], "--algos: unknown 'Foo'"),
    (["--workloads", "W9"], "--workloads: unknown 'W9'"),
    (["--impls", "foo"], "--impls: unknown 'foo'"),
    (["--impls", "fused_optim max_grad_norm"], "with --clip"),
    (["--threads", "0"], "--threads: positive integers"),
    (["--tuning", "FUSED_OPTIM_PREFETCH=far"], "--tuning 'FUSED_OPTIM_PREFETCH=far': "
                                                "FUSED_OPTIM_PREFETCH must be auto, off or"),
    (["--tuning", "PREFETCH=3"], "a CPU tuning setting is NAME=VALUE"),
    (["--tuning", " "], "--tuning: give one or more"),
    (["--tuning", "FUSED_OPTIM_PREFETCH=8", "--tuning", " FUSED_OPTIM_PREFETCH=8"],
     "--tuning: the same SETTINGS given twice"),
    # (this check sat under the one above, unreachable: found on a reread, 2026-12-07)
    (["--device", "cuda", "--tuning", "FUSED_OPTIM_PREFETCH=8"], "the CPU tuning has no effect on CUDA"),
    ])
def test_bench_refuses_unknown_names_before_measuring(args, message):
    """An unknown name stopped a run with a traceback at its row, minutes of measurements
    lost, or was dropped silently (found by a review, 2026-12-05): refused first."""
    out = _run([BENCH, "--quick", *args], returncode=2, timeout=120)
    assert message in out.stderr


def test_bench_limit_probe_moves_the_bytes_it_is_credited_with(tmp_path):
    """The limit's GB/s is the probe's own bytes over its time: with --clip the probe was
    credited with the norm's read of the grads, which it did not stream (the limit 8/7 too
    high for Adam, the % of limit as much too low; found by a review, 2026-12-05). And
    Adafactor's 1-D params read and write their full-size variance: 8 streams, not the 6
    of a 2-D param."""
    script = f"""
import sys; sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r})
import torch, fused_optim, bench
moved = []
real = fused_optim._ops.stream_
def counting(inout, read, a):
    moved.append(sum(2 * t.numel() * t.element_size() for t in inout)
                 + sum(t.numel() * t.element_size() for t in read))
    return real(inout, read, a)
fused_optim._ops.stream_ = counting
for algo, clip in (("Adam", []), ("Adam", ["--clip"]), ("Adafactor", [])):
    moved.clear()
    row = bench.main(["--quick", "--workloads", "W1", "--algos", algo, "--impls", "fused_optim",
                      "--threads", "1", "--out", {str(tmp_path)!r}] + clip)[0]
    step_bytes = row["gbs"] * row["ms"] * 1e6
    print("BYTES", algo, bool(clip), moved[0], round(step_bytes))
"""
    script = "import statistics\n" + script
    out = _run(["-c", script], timeout=300)
    lines = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("BYTES ")]
    n = 2 ** 20 * 4  # W1 quick: 2^20 float32 elements
    (_, _, adam_probe, adam_step), (_, _, clip_probe, clip_step), (_, _, af_probe, af_step) = lines
    assert int(adam_probe) == int(adam_step) == 7 * n
    # (--clip: the norm's read and the clipped grads' write, 9 streams: until 2026-12-06 the
    # write was not counted, the % of limit 1/9 too low; found by a review)
    assert int(clip_probe) == int(clip_step) == 9 * n
    assert int(af_probe) == int(af_step) == 8 * n


def test_parity_report_quick():
    out = _run([REPORT, "--quick", "--steps", "3"])
    lines = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(lines) == 2 * len(ALGOS)  # x 2 dtypes
    for line in lines:
        algo, dtype, combos, plain, ieee = [c.strip() for c in line.strip("|").split("|")]
        assert algo in ALGOS and dtype in ("float32", "float64")
        assert int(combos) > 0 and int(plain) >= 0
        # With torch's sqrt made correctly rounded, the for-loop and our kernels agree bitwise
        # (the same claim test_parity.py checks on the full option table).
        assert int(ieee) == 0, line


@pytest.mark.parametrize("script,args,message", [
    ("parity_report.py", ["--algos", "Adam,Foo"], "unknown --algos Foo"),
    ("parity_report.py", ["--dtypes", "bfloat16"], "--dtypes must be float32 and/or float64"),
    ("parity_report.py", ["--steps", "0"], "--steps must be at least 1"),
    ("quality.py", ["--runs", "fp32,bogus"], "unknown --runs bogus"),
    ("quality.py", ["--steps", "0"], "--steps, --eval-every and --eval-batches must be at least 1")])
def test_report_scripts_refuse_bad_arguments_before_running(script, args, message):
    """Found by a review (2026-12-05): parity_report.py --algos Foo and quality.py --runs
    fp32,bogus failed with a KeyError at the bad name's turn (after minutes of the good
    ones), and parity_report.py --dtypes bfloat16 printed inf as a ULP count. Refused
    first, with argparse's exit status 2."""
    out = _run([os.path.join(ROOT, "benchmarks", script), *args], returncode=2, timeout=120)
    assert message in out.stderr
    assert not out.stdout  # (nothing ran)


def test_param_storage_tuning_option_adds_each_mode_under_each_tuning():
    script = os.path.join(ROOT, "benchmarks", "param_storage.py")
    out = _run([script, "--quick", "--dtype", "float32", "--no-peers",
                "--tuning", "FUSED_OPTIM_Q8_CODES=arithmetic"])
    first = next(t for t in out.stdout.split("\n\n") if t.startswith("| mode |"))
    names = [line.split("|")[1].strip() for line in first.splitlines()[2:]]
    modes = ["float32 moments (torch's)", "state_dtype=torch.bfloat16", "state_dtype=torch.uint8"]
    assert names == modes + [f"{m} (Q8_CODES=arithmetic)" for m in modes]
    for args, message in ((["--tuning", "  "], "--tuning: give one or more"),
                          (["--tuning", "A=1 B=2", "--tuning", "A=1  B=2"], "a CPU tuning setting is"),
                          (["--tuning", "FUSED_OPTIM_PREFETCH=8", "--tuning", "FUSED_OPTIM_PREFETCH=8 "],
                           "--tuning: the same SETTINGS given twice")):
        assert message in _run([script, "--quick", *args], returncode=2, timeout=120).stderr


@pytest.mark.parametrize("dtype,modes", [
    ("bfloat16", ["round to nearest", "kahan_summation", "stochastic_rounding", "master_weights",
                  "state_dtype=torch.uint8"]),
    ("float32", ["float32 moments (torch's)", "state_dtype=torch.bfloat16", "state_dtype=torch.uint8"]),
])
def test_param_storage_benchmark_quick_runs(dtype, modes):
    out = _run([os.path.join(ROOT, "benchmarks", "param_storage.py"), "--quick", "--dtype", dtype])
    lines = out.stdout.splitlines()
    assert lines[0].startswith("Machine: ")
    tables = "\n".join(lines).split("\n\n")
    first = next(t for t in tables if t.startswith("| mode |"))
    rows = [line for line in first.splitlines() if "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == modes
    for r in rows:  # ms, bytes, GB/s, % of limit, ratio: numbers, the first two positive
        # (the rest rounded: on a machine busy with other work a quick run's GB/s against
        # its probe's can print as 0% of the limit, as it did once in a full run)
        cells = [float(c) for c in r.strip("|").split("|")[1:]]
        assert cells[0] > 0 and cells[1] > 0 and all(c >= 0 for c in cells), r
    # bitsandbytes's and torchao's 8-bit AdamW: each installed one timed against ours (a
    # row each), each other one named as not timed; none of it with bfloat16 params.
    peers = [t for t in tables if t.startswith("| peer's 8-bit AdamW |")]
    named = " ".join(t for t in tables if t.startswith("8-bit peers not timed"))
    if dtype != "float32":
        assert not peers and not named
        return
    timed = [line for t in peers for line in t.splitlines()[2:]]
    for peer in ("bitsandbytes", "torchao"):
        rows = [r for r in timed if r.startswith(f"| {peer} ")]
        assert len(rows) + (f"{peer} (" in named) == 1, (peer, out.stdout)
        for r in rows:
            assert all(float(c) > 0 for c in r.strip("|").split("|")[1:])


def test_quality_benchmark_quick_runs(tmp_path):
    """benchmarks/quality.py's smoke run: every run trains, the table and files are made."""
    out = _run([os.path.join(ROOT, "benchmarks", "quality.py"), "--quick", "--steps", "4",
                "--out", str(tmp_path)])
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == [
        "fp32", "bf16", "bf16+kahan", "bf16+sr", "bf16+master", "fp32+8bit"]
    data = json.loads((tmp_path / "quality.json").read_text())
    for r in rows:
        name, final, vs, last3, vs3, state_bytes, minutes = [c.strip() for c in r.strip("|").split("|")]
        assert 0 < float(final) < 6.0  # ln(256) = 5.55 is a uniform guess
        curve = data["results"][name]["curve"]
        assert float(final) == pytest.approx(curve[-1][1], abs=5e-5)  # (printed to 4 places)
        # the mean of the last 3 evaluations (--quick --steps 4 evaluates at steps 2 and 4)
        held = [c[1] for c in curve[-3:]]
        assert float(last3) == pytest.approx(sum(held) / len(held), abs=5e-5)
        assert vs.endswith("%") and vs3.endswith("%")
        assert float(state_bytes) > 0 and float(minutes) >= 0
    # the machine line names the CPU model, as bench.py's does
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), None) if os.path.exists("/proc/cpuinfo") else None
    if cpu:
        assert data["machine"].startswith(cpu)
    assert (tmp_path / "quality.json").exists() and (tmp_path / "quality.md").exists()
