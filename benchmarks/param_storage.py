"""The cost of keeping 16-bit params by Kahan summation, stochastic rounding or master
weights (Note [param storage] in csrc/plan.h), against rounding to nearest; and of keeping
the moments in fewer bits (state_dtype: Note [state storage]), with --dtype float32.

AdamW on one tensor of 2**25 bfloat16 (or float16) params, each mode's optimizer and a
stream probe of the plain step's pattern timed in turn in every round, the order rotating
(interleaved: each ratio compares the same minutes of a noisy machine); the median of the
rounds, and a mode's % of limit the median of its per-round ratios.

    python benchmarks/param_storage.py [--dtype bfloat16|float16|float32] [--rounds 7] [--quick]
        [--tuning "FUSED_OPTIM_Q8_CODES=arithmetic" ...]

--tuning SETTINGS (repeatable), as bench.py's: every mode once more, its steps under the
CPU tuning that these FUSED_OPTIM_*=VALUE settings choose, in the same rounds.

Bytes per element and step: param read and written, grad read, two moments read and
written (2 bytes each: 14), plus Kahan's compensation read and written (+4), or the float32
master read and written (+8: the param is read too, Note [master follows the param] in
csrc/plan.h; 20 bytes were counted before 2026-12-04, when it was not); with 8-bit moments, 1 byte each
(10; their block scales add 1/16). float32 params: 28 with float32 moments, 20 with
bfloat16 ones, 16 with 8-bit ones.

With --dtype float32, the 8-bit AdamW of bitsandbytes (bnb.optim.AdamW8bit) and of torchao
(torchao.optim.AdamW8bit), where they are installed (`pip install --no-deps bitsandbytes
torchao`, so that pip leaves the installed torch alone; --no-peers leaves them out), are timed in the same rounds on the same shape, and a second
table gives each one's time against ours with state_dtype=torch.uint8.
"""
import argparse
import os
import statistics
import sys
import time

import torch

import fused_optim
from fused_optim import _ops

MODES = {
    "round to nearest": ({}, 14),
    "kahan_summation": ({"kahan_summation": True}, 18),
    "stochastic_rounding": ({"stochastic_rounding": True}, 14),
    "master_weights": ({"master_weights": True}, 22),
    "state_dtype=torch.uint8": ({"state_dtype": torch.uint8}, 10),
}
FLOAT32_MODES = {
    "float32 moments (torch's)": ({}, 28),
    "state_dtype=torch.bfloat16": ({"state_dtype": torch.bfloat16}, 20),
    "state_dtype=torch.uint8": ({"state_dtype": torch.uint8}, 16),
}


OURS_8BIT = "state_dtype=torch.uint8"


def peers_8bit():
    """The installed peers' 8-bit AdamW classes, and a note of those not installed."""
    found, missing = {}, []
    try:
        import bitsandbytes as bnb
        found[f"bitsandbytes {bnb.__version__} AdamW8bit"] = bnb.optim.AdamW8bit
    except Exception as e:  # (not installed, or it fails to load on this machine)
        missing.append(f"bitsandbytes ({type(e).__name__})")
    try:
        import torchao
        from torchao.optim import AdamW8bit
        found[f"torchao {torchao.__version__} AdamW8bit"] = AdamW8bit
    except Exception as e:
        missing.append(f"torchao ({type(e).__name__})")
    return found, missing


def machine_line(threads):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench import machine_line as bench_machine_line
    return bench_machine_line([threads])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode per round")
    ap.add_argument("--quick", action="store_true", help="2**16 elements, 3 rounds")
    ap.add_argument("--tuning", action="append", default=[], metavar="SETTINGS",
                    help="every mode once more under these FUSED_OPTIM_*=VALUE settings")
    ap.add_argument("--no-peers", action="store_true",
                    help="leave out bitsandbytes's and torchao's 8-bit AdamW (--dtype float32)")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench import check_tunings, tuned, tuning_label
    check_tunings(ap, args.tuning)
    variants = {spec: tuning_label(spec) for spec in args.tuning}
    n = 1 << (16 if args.quick else 25)
    rounds = 3 if args.quick else args.rounds
    dtype = getattr(torch, args.dtype)
    modes = dict(FLOAT32_MODES if dtype == torch.float32 else MODES)
    opts, steps = {}, {}
    for name, (options, _) in list(modes.items()):
        for spec, short in [(None, None), *variants.items()]:
            row = name if spec is None else f"{name} ({short})"
            modes[row] = modes[name]
            p = torch.randn(n).to(dtype).requires_grad_()
            p.grad = torch.randn(n).to(dtype)
            opts[row] = fused_optim.AdamW([p], lr=1e-3, **options)
            # (with --tuning, the plain rows too, under the process's own tuning: every row
            # of ours pays the same two calls a step)
            steps[row] = (opts[row].step if not variants
                          else tuned(opts[row].step, [] if spec is None else spec.split()))
            steps[row]()  # the state made, its pages written
    peers, missing = ({}, []) if dtype != torch.float32 or args.no_peers else peers_8bit()
    for name, cls in peers.items():
        p = torch.randn(n).requires_grad_()
        p.grad = torch.randn(n)
        opts[name] = cls([p], lr=1e-3)
        steps[name] = opts[name].step
        for _ in range(2):  # the state made; torchao's step compiled
            opts[name].step()
    # The probe: the plain step's pattern in the params' dtype (three tensors read and
    # written, one read: param, moments, grad), timed as one more runner. Each round runs
    # every runner in turn, the order rotating from round to round; a runner's time in a
    # round is the median of its steps, and a mode's % of limit the median over rounds of
    # its GB/s over the probe's in the same round. (Until 2026-12-06 the probe was float32
    # streams of two read and written and one read, timed last in every round, its median
    # set against each mode's: on the Xeon that pattern read 6-10% below the step's, so the
    # % of limit read as much too high; found by a review.)
    probe = [torch.randn(n).to(dtype) for _ in range(4)]
    probe_bytes = 7 * n * probe[0].element_size()
    runners = dict(steps)
    runners["limit"] = lambda: _ops.stream_(probe[:3], probe[3:], 0.5)
    times = {name: [] for name in runners}
    names = list(runners)
    for k in range(rounds):
        for name in names[k % len(names):] + names[:k % len(names)]:
            runners[name]()  # untimed, as bench.py's --warmup
            each = []
            for _ in range(args.steps):
                t = time.perf_counter()
                runners[name]()
                each.append(time.perf_counter() - t)
            times[name].append(statistics.median(each))
    limit_rounds = [probe_bytes / t / 1e9 for t in times["limit"]]
    limit = statistics.median(limit_rounds)
    print("Machine: " + machine_line(torch.get_num_threads()))
    print(f"AdamW, {n:,} {args.dtype} params, {rounds} rounds of {args.steps} steps; "
          f"limit (stream probe): {limit:.1f} GB/s")
    print()
    print(f"| mode | ms/step | bytes/param | GB/s | % of limit | time / {next(iter(modes))} |")
    print("|---|---:|---:|---:|---:|---:|")
    base = statistics.median(times[next(iter(modes))])
    for name, (_, nbytes) in modes.items():
        ms = statistics.median(times[name])
        gbs = nbytes * n / ms / 1e9
        share = statistics.median(nbytes * n / t / 1e9 / lim
                                  for t, lim in zip(times[name], limit_rounds))
        print(f"| {name} | {ms * 1e3:.2f} | {nbytes} | {gbs:.1f} | {100 * share:.0f} | "
              f"{ms / base:.2f} |")
    if peers:
        ours = statistics.median(times[OURS_8BIT])
        print()
        print(f"| peer's 8-bit AdamW | ms/step | time / ours ({OURS_8BIT}) |")
        print("|---|---:|---:|")
        for name in peers:
            ms = statistics.median(times[name])
            print(f"| {name} | {ms * 1e3:.2f} | {ms / ours:.1f} |")
    if missing:
        print()
        print("8-bit peers not timed (not installed or not loadable): " + ", ".join(missing))


if __name__ == "__main__":
    main()
