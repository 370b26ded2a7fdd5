"""SparseAdam benchmark: fused_optim.SparseAdam against torch.optim.SparseAdam on an embedding
table with sparse grads (as nn.Embedding(sparse=True) makes them: uncoalesced, repeated
rows), interleaved rounds as in bench.py.

    python benchmarks/sparse_adam.py                       # 1M and 4M rows x 128, 4,096 rows a step
    python benchmarks/sparse_adam.py --rows 1000000 --touched 4096 --dim 128
    python benchmarks/sparse_adam.py --quick

A step's time should follow the touched rows, not the table: the two table sizes touch the
same number of rows, and the ratio of their fused_optim times is printed. The state's pages
are written once before timing (the steady state of a long training: see run()).
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fused_optim  # noqa: E402
from bench import Progress, _rounds, machine_line  # noqa: E402

IMPLS = {"fused_optim": fused_optim.SparseAdam, "torch": torch.optim.SparseAdam}


def run(rows, dim, touched, rounds, steps, progress):
    gen = torch.Generator().manual_seed(0)
    weight = torch.empty(rows, dim).uniform_(-1, 1, generator=gen).requires_grad_()
    # Lookups of `touched` random rows, some repeated (an uncoalesced grad, as backward makes).
    index = torch.randint(0, rows, (touched,), generator=gen)
    index[: touched // 8] = index[touched // 8: touched // 4]
    values = torch.randn(touched, dim, generator=gen) * 1e-2
    grad = torch.sparse_coo_tensor(index.unsqueeze(0), values, (rows, dim))
    runners = {}
    for name, cls in IMPLS.items():
        opt = cls([weight], lr=1e-3)

        def step(opt=opt):
            weight.grad = grad  # (neither step changes the grad: each coalesces a copy)
            opt.step()

        step()  # state made before anything is timed
        # The state is zeros_like: its pages are mapped on first write, so the rows a step
        # touches for the first time cost a page fault each (~all of them in a short run on
        # a big table, ~none in a long training). Writing every page once measures the
        # steady state for both implementations.
        for state in opt.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    value.mul_(1.0)
        runners[name] = step
    times = _rounds(runners, rounds, steps, 1, float("inf"), "cpu", progress, f"{rows} rows")
    return {name: [t * 1e3 for t in ts] for name, ts in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1000000,4000000", help="comma-separated table sizes")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--touched", type=int, default=4096, help="rows looked up per step")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.dim, args.touched, args.rounds, args.steps = "20000,80000", 32, 512, 3, 2
    sizes = [int(r) for r in args.rows.split(",") if r]
    progress = Progress(len(sizes) * len(IMPLS) * args.rounds)
    results = {rows: run(rows, args.dim, args.touched, args.rounds, args.steps, progress) for rows in sizes}
    progress.close()
    print(f"Machine: {machine_line([torch.get_num_threads()])}")
    print()
    print(f"SparseAdam, fp32 table x {args.dim}, {args.touched} rows looked up a step "
          f"({args.rounds} interleaved rounds of {args.steps} steps; ms = median of round medians)")
    print()
    print("| rows | fused_optim ms | torch ms | speedup (median of rounds) |")
    print("|---:|---:|---:|---:|")
    ours = {}
    for rows, times in results.items():
        f, t = times["fused_optim"], times["torch"]
        ours[rows] = statistics.median(f)
        ratio = statistics.median(a / b for a, b in zip(t, f))
        print(f"| {rows:,} | {statistics.median(f):.3f} | {statistics.median(t):.3f} | {ratio:.1f}x |")
    if len(ours) > 1:
        small, big = min(ours), max(ours)
        print()
        print(f"fused_optim's step on {big:,} rows / on {small:,} rows: {ours[big] / ours[small]:.2f}")
    return results


if __name__ == "__main__":
    main()
