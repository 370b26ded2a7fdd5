"""Optimizer step benchmark: fused_optim against torch.optim's implementations, side by side,
and against the machine's measured memory-bandwidth limit for the same access pattern.

    python benchmarks/bench.py                      # all workloads and algorithms, all cores
    python benchmarks/bench.py --threads 1,2 --algos Adam --workloads W1,W3
    python benchmarks/bench.py --workloads W2 --dtypes float16,bfloat16   # other param dtypes
    python benchmarks/bench.py --quick              # small and fast (CI smoke test)
    python benchmarks/bench.py --device cuda        # on the GPU, against its copy bandwidth
    python benchmarks/bench.py --clip --algos AdamW --workloads W2,W3   # clip + step
    python benchmarks/bench.py --impls fused_optim --tuning FUSED_OPTIM_PREFETCH=384   # CPU tuning

With --clip every row is a training loop's clip + step: torch's rows run
torch.nn.utils.clip_grad_norm_ then their step (as users write it today), the fused_optim
row fused_optim.clip_grad_norm_ then its step (as they would write it with fused_optim), and
"fused_optim max_grad_norm" the clipping inside the step (Note [clipping in the step]). The
max norm shrinks by 0.1% every step, shared by all rows, so every step really scales the
grads (the norm after a clip is the max norm: a fixed one would clip once, then never).
The bytes a row must move then include one read of the grads, for the norm, and one write
of them, clipped (torch's recipe leaves the grads clipped: our step in the kernel stores them
back as it reads them; a separate multiply reads and writes them again, which is its own cost,
not counted); the probe streams the grads as a read for the norm and as a read and a write.

Interleaved: within each (workload, algorithm, threads), every implementation and the
bandwidth probe are timed in turn in every round (--rounds, --steps steps each, the order
rotating), so each ratio compares the same minutes of a noisy machine; a row's ms/step is
the median of its rounds' medians, and bench.json keeps every round's time.

With --tuning SETTINGS (repeatable), one more fused_optim row per SETTINGS: the same
optimizer run with the CPU tuning that the FUSED_OPTIM_* variables in SETTINGS would choose
(Note [CPU tuning]; e.g. "FUSED_OPTIM_PREFETCH=384 FUSED_OPTIM_FLOAT_LOOPS=avx2"), set
inside this process around each of its steps, so that the choices are timed in the same
rounds as each other and as torch (comparing them in separate processes misled on the
Zen 5: docs/benchmarks.md, CPU tuning).

Per row: ms/step, GB/s (bytes the step must move / time), % of the measured limit, speedup
over torch fused=True (and DeepSpeed's CPU Adam, where installed), µs per tensor, and the
extra peak memory of one step. Prints the full table and a one-line-per-workload summary,
and writes bench.json, bench.md, summary.md and bench.png to --out.

With --device cuda the params live on the GPU, steps are timed with CUDA events, the limit
is the GPU's measured copy bandwidth (Tensor.copy_ of a buffer the size of the step's
traffic), and the extra peak memory is the CUDA allocator's.
"""
import argparse
import dataclasses
import datetime
import gc
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fused_optim  # noqa: E402
from workloads import ALGORITHMS, workloads  # noqa: E402

IMPLS = ["fused_optim", "torch foreach=False", "torch foreach=True", "torch fused=True", "deepspeed"]
CLIP_IMPL = "fused_optim max_grad_norm"  # with --clip only
LIMIT = "limit"  # the bandwidth probe, timed in the rounds as one more runner
SHORT_DTYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


def deepspeed_adam():
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # noqa: F401
    except Exception:
        return None
    return DeepSpeedCPUAdam


def make_optimizer(impl, algo, params, kwargs, dtype):
    if impl == "fused_optim":
        return getattr(fused_optim, algo)(params, **kwargs)
    if impl == CLIP_IMPL:
        return getattr(fused_optim, algo)(params, **kwargs, max_grad_norm=1.0)
    if impl == "deepspeed":
        cls = deepspeed_adam()
        if cls is None or algo not in ("Adam", "AdamW"):
            return None
        # With 16-bit params, DeepSpeed's bf16-state mode (state in the params' dtype, as
        # torch and fused_optim keep it); fp32 state for fp32 params.
        return cls(params, adamw_mode=(algo == "AdamW"),
                   fp32_optimizer_states=dtype == torch.float32, **kwargs)
    flag = impl.split()[1]
    key, value = flag.split("=")
    torch_cls = getattr(torch.optim, algo)
    if key not in inspect.signature(torch_cls).parameters:
        if key == "foreach" and value == "False":
            return torch_cls(params, **kwargs)  # the for-loop is its only implementation (Muon)
        return None  # torch.optim.RMSprop has no fused=True
    return torch_cls(params, **kwargs, **{key: value == "True"})


# -- memory: the process's peak resident set over one step (Linux) ----------------------
def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def extra_peak_mib(fn):
    """Extra resident memory at the peak of fn(), in MiB (None where not measurable)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current RSS
        before = _status_kib("VmRSS")
        fn()
        peak = _status_kib("VmHWM")
        return max(0.0, (peak - before) / 1024.0)
    except OSError:
        fn()
        return None


def time_steps(step, steps, warmup, max_seconds, device="cpu"):
    cuda = device == "cuda"
    for _ in range(warmup):
        step()
    times = []
    start = time.perf_counter()
    while len(times) < steps:
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        if len(times) >= 5 and time.perf_counter() - start > max_seconds:
            break
    return statistics.median(times), len(times)


def extra_peak_cuda_mib(fn):
    """Extra CUDA allocator memory at the peak of fn(), in MiB."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return max(0.0, (torch.cuda.max_memory_allocated() - before) / 2**20)


class Progress:
    def __init__(self, total):
        self.total, self.done = total, 0

    def update(self, label):
        self.done += 1
        width = 30
        filled = int(width * self.done / self.total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label:<50}")
        sys.stderr.flush()

    def close(self):
        sys.stderr.write("\n")


def cpu_name():
    """The CPU's model name (/proc/cpuinfo), else what platform knows of it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(threads, device="cpu"):
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB); torch {torch.__version__} "
                f"(CUDA {torch.version.cuda}); fused_optim {fused_optim.__version__}; "
                f"Python {platform.python_version()}; {datetime.date.today().isoformat()}")
    return (f"{cpu_name()}, {os.cpu_count()} cores, threads {','.join(map(str, threads))}; "
            f"torch {torch.__version__}; fused_optim {fused_optim.__version__} "
            f"({torch.ops.fused_optim._cpu_isa()} loops, {torch.ops.fused_optim._cpu_tuning()}); "
            f"Python {platform.python_version()}; "
            f"{datetime.date.today().isoformat()}")


def _rounds(runners, rounds, steps, warmup, max_seconds, device, progress, label):
    """Times every runner `steps` steps per round, the runners alternating round-robin within
    each round (the order rotating from round to round), so that every ratio compares the
    same minutes of a noisy machine. Returns {name: [median seconds of each round]}."""
    times = {name: [] for name in runners}
    names = list(runners)
    start = time.perf_counter()
    for k in range(rounds):
        order = names[k % len(names):] + names[:k % len(names)]
        for name in order:
            progress.update(f"{label} round {k + 1}/{rounds} {name}")
            t, _ = time_steps(runners[name], steps, warmup, float("inf"), device)
            times[name].append(t)
        if k >= 2 and time.perf_counter() - start > max_seconds:
            break  # at least three rounds, then the time cap
    return times


def check_tunings(ap, specs):
    """--tuning's SETTINGS, each checked before anything is measured (with the variables'
    own errors: the process's own tuning restored after), none blank or repeated."""
    for spec in specs:
        try:
            torch.ops.fused_optim._set_cpu_tuning(spec.split())
        except RuntimeError as e:
            ap.error(f"--tuning {spec!r}: {str(e).splitlines()[0]}")
        finally:
            torch.ops.fused_optim._set_cpu_tuning([])
        if not spec.split():
            ap.error("--tuning: give one or more FUSED_OPTIM_*=VALUE settings")
    if len({tuning_label(spec) for spec in specs}) < len(specs):
        ap.error("--tuning: the same SETTINGS given twice")


def tuning_label(spec):
    """A --tuning SETTINGS as its rows are named: its settings, less FUSED_OPTIM_."""
    return " ".join(x.replace("FUSED_OPTIM_", "") for x in spec.split())


def tuned(step, settings):
    """step() under the CPU tuning that `settings` choose (bench.py --tuning), the process's
    own restored after it."""
    def run_tuned():
        torch.ops.fused_optim._set_cpu_tuning(settings)
        try:
            step()
        finally:
            torch.ops.fused_optim._set_cpu_tuning([])
    return run_tuned


def run(args):
    wls = workloads(quick=args.quick)
    selected_w = [w for w in args.workloads.split(",") if w]
    selected_a = [a for a in args.algos.split(",") if a]
    all_impls = IMPLS[:1] + [CLIP_IMPL] + IMPLS[1:] if args.clip else IMPLS
    impls = [i for i in all_impls if i in args.impls.split(",")] if args.impls else list(all_impls)
    # --tuning: fused_optim again, under each SETTINGS (named by them, less FUSED_OPTIM_)
    variants = {"fused_optim " + tuning_label(spec): spec.split() for spec in args.tuning}
    impls[1 if impls[:1] == ["fused_optim"] else 0:0] = list(variants)
    device = args.device
    if device == "cuda" and "deepspeed" in impls:
        impls.remove("deepspeed")  # DeepSpeedCPUAdam is a CPU optimizer
    if "deepspeed" in impls and deepspeed_adam() is None:
        impls.remove("deepspeed")
        print("(DeepSpeed's CPU Adam is not importable here: its rows are left out; "
              "`pip install deepspeed py-cpuinfo` adds them: docs/benchmarks.md)", file=sys.stderr)
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    # Each workload in its own dtype, or in each of --dtypes (then named e.g. "W2 fp16").
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",") if d] or [None]
    rows_plan = [(t, w, dt, a) for t in threads for w in selected_w for dt in dtypes for a in selected_a]
    progress = Progress(len(rows_plan) * (len(impls) + 1) * (args.rounds + 1))
    rows = []
    old_threads = torch.get_num_threads()
    for t, wname, dtype, algo in rows_plan:
        torch.set_num_threads(t)
        wl = wls[wname]
        if dtype is not None and dtype != wl.dtype:
            wl = dataclasses.replace(wl, name=f"{wname} {SHORT_DTYPES[dtype]}", dtype=dtype)
        wname = wl.name
        kwargs, pattern = ALGORITHMS[algo]
        label = f"{wname} {algo} {t} thr"
        elem = torch.finfo(wl.dtype).bits // 8
        # --clip: one more read of the grads (the norm) and their write (clipped)
        clip_streams = 2 if args.clip else 0
        if algo == "Adafactor":
            # Note [Adafactor's passes] in csrc/cpu/adafactor.cpp: a param of 2 or more dims
            # reads the param twice and writes it once and reads the grad three times (6
            # streams; its factored state is O(rows + cols)); one of fewer dims reads and
            # writes its full-size variance too, and reads the grad twice (8 streams). The
            # probe streams the pattern of the most elements.
            streams = sum(math.prod(s) * (6 if len(s) >= 2 else 8) for s in wl.shapes)
            one_dim = sum(math.prod(s) for s in wl.shapes if len(s) < 2)
            pattern = (2, 4) if 2 * one_dim > wl.numel else (1, 4)
        else:
            streams = wl.numel * (2 * pattern[0] + pattern[1])
        bytes_per_step = (streams + clip_streams * wl.numel) * elem
        gen = torch.Generator().manual_seed(0)
        params = [torch.empty(s, dtype=wl.dtype).uniform_(-1, 1, generator=gen).to(device).requires_grad_()
                  for s in wl.shapes]
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(wl.dtype).to(device)
        # --clip: the max norm all rows clip to, 0.1% lower at every step (see the docstring).
        max_norm = [torch.nn.utils.get_total_norm([p.grad for p in params]).item()]

        def clipped(impl, opt):
            def shrink():
                max_norm[0] *= 0.999
                return max_norm[0]
            if impl == CLIP_IMPL:
                def step():
                    opt.max_grad_norm = shrink()
                    opt.step()
            elif impl == "fused_optim":
                def step():
                    fused_optim.clip_grad_norm_(params, shrink())
                    opt.step()
            else:
                def step():
                    torch.nn.utils.clip_grad_norm_(params, shrink())
                    opt.step()
            return step
        # Every implementation steps the same params (each with its own state), and the
        # limit probe streams buffers of the step's size: all timed in the same rounds.
        runners, peaks = {}, {}
        for impl in impls:
            progress.update(f"{label} {impl} (state, memory)")
            opt = make_optimizer("fused_optim" if impl in variants else impl, algo, params,
                                 kwargs, wl.dtype)
            if opt is None:
                continue
            step = clipped("fused_optim" if impl in variants else impl, opt) if args.clip else opt.step
            if impl in variants or (variants and impl == "fused_optim"):
                # (the plain row too, with the process's own tuning: every fused_optim row
                # pays the same two calls a step)
                step = tuned(step, variants.get(impl, []))
            try:
                step()  # state initialised before anything is measured
            except (RuntimeError, NotImplementedError, ValueError) as e:
                if impl.startswith("fused_optim"):
                    raise
                # torch's own implementation refuses this setup (a fused=True that torch
                # has on the CPU only, such as Adagrad's, given CUDA params: it stopped a
                # CUDA run on the H200): its row is left out, as a torch class without the
                # flag is (n/a)
                print(f"({label}: {impl} refuses it, its row is left out: "
                      f"{str(e).splitlines()[0][:160]})", file=sys.stderr)
                continue
            peaks[impl] = extra_peak_cuda_mib(step) if device == "cuda" else extra_peak_mib(step)
            runners[impl] = step
        if device == "cuda":
            n = max(1 << 20, bytes_per_step // 2 // 4)
            src = torch.rand(n, device="cuda")
            dst = torch.empty_like(src)
            probe_bytes = 2 * n * 4
            runners[LIMIT] = lambda: dst.copy_(src)
        else:
            # the step's pattern of streams (with --clip, the grads read and written instead of
            # read, and read once more for the norm)
            inout = pattern[0] + (1 if args.clip else 0)
            reads = pattern[1]
            bufs = [torch.rand(wl.numel, dtype=torch.float32).to(wl.dtype)
                    for _ in range(inout + reads)]
            probe_bytes = wl.numel * elem * (2 * inout + reads)
            runners[LIMIT] = lambda: fused_optim._ops.stream_(bufs[:inout], bufs[inout:], 0.5)
        times = _rounds(runners, args.rounds, args.steps, args.warmup, args.max_seconds, device,
                        progress, label)
        limit_rounds = [probe_bytes / x / 1e9 for x in times.pop(LIMIT)]
        limit = statistics.median(limit_rounds)
        base = dict(workload=wname, algo=algo, threads=t, device=device, dtype=str(wl.dtype).replace("torch.", ""),
                    tensors=len(wl.shapes), numel=wl.numel, limit_gbs=limit,
                    limit_round_gbs=limit_rounds, rounds=len(limit_rounds), steps_per_round=args.steps)
        for impl, ts in times.items():
            median = statistics.median(ts)
            gbs = bytes_per_step / median / 1e9
            # % of the limit round by round (the bandwidth moves between rounds), its median
            pct = statistics.median(100.0 * bytes_per_step / x / 1e9 / lim
                                    for x, lim in zip(ts, limit_rounds))
            rows.append(dict(base, impl=impl, ms=median * 1e3, round_ms=[x * 1e3 for x in ts],
                             steps=len(ts) * args.steps, gbs=gbs, pct_limit=pct,
                             us_per_tensor=median * 1e6 / len(wl.shapes), extra_peak_mib=peaks[impl]))
        del runners, params
        if device == "cuda":
            del src, dst
        else:
            del bufs
        gc.collect()
    torch.set_num_threads(old_threads)
    progress.close()
    for r in rows:
        same = [x for x in rows if (x["workload"], x["algo"], x["threads"]) == (r["workload"], r["algo"], r["threads"])]
        for ref_impl, key in (("torch fused=True", "speedup_vs_torch_fused"), ("deepspeed", "speedup_vs_deepspeed")):
            ref = next((x for x in same if x["impl"] == ref_impl), None)
            r[key] = ref["ms"] / r["ms"] if ref else None
            # the same ratio round by round (the rounds are the same minutes for both)
            r[key + "_rounds"] = ([a / b for a, b in zip(ref["round_ms"], r["round_ms"])] if ref else None)
    return rows, machine_line(threads, device) + ("; every row: clip by global norm + step" if args.clip else "")


def fmt(v, spec, suffix=""):
    return "n/a" if v is None else format(v, spec) + suffix


def markdown(rows, machine):
    lines = [f"Machine: {machine}", "",
             "| workload | algo | threads | implementation | ms/step | GB/s | % of limit | vs torch fused | µs/tensor | extra peak MiB |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    last = None
    for r in rows:
        key = (r["workload"], r["algo"], r["threads"])
        if key != last:
            limit_name = "copy bandwidth" if r.get("device") == "cuda" else "same pattern"
            lines.append(f"| {r['workload']} | {r['algo']} | {r['threads']} | *limit ({limit_name})* | | "
                         f"{r['limit_gbs']:.1f} | 100 | | | |")
            last = key
        name = f"**{r['impl']}**" if r["impl"].startswith("fused_optim") else r["impl"]
        lines.append(
            f"| {r['workload']} | {r['algo']} | {r['threads']} | {name} | {r['ms']:.2f} | {r['gbs']:.1f} | "
            f"{r['pct_limit']:.0f} | {fmt(r['speedup_vs_torch_fused'], '.2f', 'x')} | "
            f"{r['us_per_tensor']:.2f} | {fmt(r['extra_peak_mib'], '.1f')} |")
    return "\n".join(lines)


def summary(rows, machine):
    """One line per (workload, algo, threads): fused_optim against the limit, torch fused,
    torch's fastest implementation and DeepSpeed, each ratio from the same rounds."""
    lines = [f"Machine: {machine}", "",
             "| workload | algo | threads | fused_optim ms | % of limit | vs torch fused | "
             "torch's fastest (our speedup) | vs DeepSpeed | µs/tensor | extra peak MiB |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        if not r["impl"].startswith("fused_optim"):
            continue
        same = [x for x in rows if (x["workload"], x["algo"], x["threads"]) == (r["workload"], r["algo"], r["threads"])
                and x["impl"].startswith("torch ")]
        fastest = min(same, key=lambda x: x["ms"], default=None)
        best = (f"{fastest['impl'][6:]} {fastest['ms']:.2f} ({fastest['ms'] / r['ms']:.2f}x)"
                if fastest else "n/a")
        algo = r["algo"] + (" (max_grad_norm)" if r["impl"] == CLIP_IMPL
                            else f" ({r['impl'][12:]})" if r["impl"] != "fused_optim" else "")
        lines.append(
            f"| {r['workload']} | {algo} | {r['threads']} | {r['ms']:.2f} | {r['pct_limit']:.0f} | "
            f"{fmt(r['speedup_vs_torch_fused'], '.2f', 'x')} | {best} | "
            f"{fmt(r['speedup_vs_deepspeed'], '.2f', 'x')} | {r['us_per_tensor']:.2f} | "
            f"{fmt(r['extra_peak_mib'], '.1f')} |")
    return "\n".join(lines)


def chart(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no chart written)", file=sys.stderr)
        return False
    groups = sorted({(r["threads"], r["workload"], r["algo"]) for r in rows})
    named = list(dict.fromkeys(r["impl"] for r in rows))  # (with --tuning's rows)
    impls = [i for i in IMPLS[:1] + [CLIP_IMPL] + IMPLS[1:] if i in named]
    impls[1:1] = [i for i in named if i not in impls]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(groups) * len(impls) / 2), 5))
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        xs, ys = [], []
        for g, key in enumerate(groups):
            r = next((r for r in rows if (r["threads"], r["workload"], r["algo"]) == key and r["impl"] == impl), None)
            if r:
                xs.append(g + k * width)
                ys.append(r["pct_limit"])
        ax.bar(xs, ys, width, label=impl)
    ax.axhline(100, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{w} {a}\n{t} thr" for t, w, a in groups], fontsize=8)
    ax.set_ylabel("% of measured memory-bandwidth limit")
    ax.set_title("Optimizer step: fraction of the bandwidth limit (higher is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", default="Adam,AdamW,SGD,RMSprop,Adagrad")
    ap.add_argument("--workloads", default="W1,W2,W3,W4")
    ap.add_argument("--dtypes", default="",
                    help="comma-separated param dtypes to run each workload in, of: "
                         + ", ".join(str(d).replace("torch.", "") for d in SHORT_DTYPES)
                         + " (default: each workload's own: W1-W3 float32, W4 bfloat16)")
    ap.add_argument("--impls", default="", help="comma-separated subset of: " + ", ".join(IMPLS)
                    + f" (and '{CLIP_IMPL}' with --clip)")
    ap.add_argument("--threads", default="", help="comma-separated thread counts (default: torch's)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds: in each, every implementation and the limit probe in turn "
                         "(default 7; --quick 3)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per implementation per round (default 3; --quick 2)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps before each round's (default 1)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="time cap per row group (at least 3 rounds run; default 30, --quick 5)")
    ap.add_argument("--quick", action="store_true",
                    help="small workloads and few steps (what is given explicitly stands)")
    ap.add_argument("--clip", action="store_true",
                    help="each row clips the grads by global norm, then steps (see above)")
    ap.add_argument("--tuning", action="append", default=[], metavar="SETTINGS",
                    help="one more fused_optim row, under the CPU tuning of these "
                         "space-separated FUSED_OPTIM_*=VALUE settings (repeatable; see above)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where the params live (cuda: the limit is the GPU's copy bandwidth)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    bad = [d for d in args.dtypes.split(",") if d and getattr(torch, d, None) not in SHORT_DTYPES]
    if bad:
        ap.error(f"--dtypes: unsupported {', '.join(bad)}")
    # (names checked before anything is measured: a bad one stopped a run at its row)
    for flag, given, known in (
            ("--algos", args.algos, list(ALGORITHMS)),
            ("--workloads", args.workloads, list(workloads(quick=args.quick))),
            ("--impls", args.impls, IMPLS + ([CLIP_IMPL] if args.clip else []))):
        bad = [n for n in given.split(",") if n.strip() and n.strip() not in known]
        if bad:
            ap.error(f"{flag}: unknown {', '.join(repr(n) for n in bad)}; known: {', '.join(known)}"
                     + (f" ('{CLIP_IMPL}' with --clip)" if flag == "--impls" and not args.clip else ""))
    args.impls = ",".join(n.strip() for n in args.impls.split(",") if n.strip())
    check_tunings(ap, args.tuning)
    if args.tuning and args.device == "cuda":
        ap.error("--tuning: the CPU tuning has no effect on CUDA params")
    if args.threads and not all(t.strip().isdigit() and int(t) > 0 for t in args.threads.split(",")):
        ap.error(f"--threads: positive integers, got {args.threads!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no GPU here")
    # (--quick's defaults; a value given explicitly stands)
    defaults = (3, 2, 1, 5.0) if args.quick else (7, 3, 1, 30.0)
    for name, value in zip(("rounds", "steps", "warmup", "max_seconds"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    rows, machine = run(args)
    table = markdown(rows, machine)
    short = summary(rows, machine)
    print(table)
    print()
    print(short.split("\n", 2)[2])  # the summary, under the same machine line
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"machine": machine, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(short + "\n")
    chart(rows, os.path.join(args.out, "bench.png"))
    return rows


if __name__ == "__main__":
    main()
