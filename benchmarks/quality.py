"""Training quality of the low-precision modes (issue 19): a small transformer language
model trained on real text, once per way of keeping params and optimizer state.

The corpus is Python's own help text (the `pydoc_data.topics` module of the standard
library: ~465 KB of English prose and code, on every machine with Python), read as bytes
(a 256-symbol vocabulary, no tokenizer); the last tenth is held out. The model is a
decoder-only transformer (pre-LayerNorm, causal attention, a GELU MLP, tied embeddings:
about 2.3 million params by default), trained with AdamW, warmup then cosine decay. Every
run starts from the same initial weights and sees the same batches:

  fp32                 float32 params and moments (the reference)
  bf16                 bfloat16 params, round to nearest (what torch does)
  bf16+kahan           bfloat16 params, kahan_summation=True
  bf16+sr              bfloat16 params, stochastic_rounding=True
  bf16+master          bfloat16 params, master_weights=True
  fp32+8bit            float32 params, state_dtype=torch.uint8 (8-bit moments)

It prints a table (final held-out loss, its difference from fp32, optimizer state bytes
per param) and writes the loss curves to a PNG and everything to a JSON.

    python benchmarks/quality.py --threads 1        # ~30 minutes (the documented run)
    python benchmarks/quality.py --steps 40 --quick # a smoke run
"""
import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fused_optim  # noqa: E402

RUNS = {
    "fp32": (torch.float32, {}),
    "bf16": (torch.bfloat16, {}),
    "bf16+kahan": (torch.bfloat16, {"kahan_summation": True}),
    "bf16+sr": (torch.bfloat16, {"stochastic_rounding": True}),
    "bf16+master": (torch.bfloat16, {"master_weights": True}),
    "fp32+8bit": (torch.float32, {"state_dtype": torch.uint8}),
}


def corpus() -> torch.Tensor:
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class LM(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, context: int):
        super().__init__()
        self.embed = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, idx):
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.embed.weight.t()


def batches(data, steps, batch, context, seed):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - context - 1, (steps, batch), generator=g)
    for s in starts:
        idx = s.unsqueeze(1) + torch.arange(context + 1)
        chunk = data[idx]
        yield chunk[:, :-1], chunk[:, 1:]


def lr_at(step, steps, lr, warmup):
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, val):
    losses = []
    for x, y in val:
        logits = model(x)
        losses.append(F.cross_entropy(logits.float().reshape(-1, 256), y.reshape(-1)).item())
    return sum(losses) / len(losses)


def state_bytes_per_param(opt):
    total = params = 0
    for group in opt.param_groups:
        for p in group["params"]:
            params += p.numel()
            for k, v in opt.state[p].items():
                if isinstance(v, torch.Tensor) and k != "step" and v.numel() > 1:
                    total += v.numel() * v.element_size()
    return total / params


def train(name, args, data_train, val, init):
    dtype, options = RUNS[name]
    torch.manual_seed(args.seed)
    model = LM(args.d, args.layers, args.heads, args.context)
    model.load_state_dict(init)
    model.to(dtype)
    opt = fused_optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=args.weight_decay, **options)
    curve = []
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches(data_train, args.steps, args.batch, args.context,
                                          args.seed + 1)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, 256), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append((step + 1, evaluate(model, val), loss.item()))
            print(f"  {name:12s} step {step + 1:5d}  train {loss.item():.4f}  "
                  f"held-out {curve[-1][1]:.4f}  ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    return {"curve": curve, "final": curve[-1][1], "state_bytes_per_param": state_bytes_per_param(opt),
            "seconds": time.perf_counter() - start}


def last_mean(result):
    """The mean held-out loss of a run's last 3 evaluations (less noisy than the last one)."""
    held = [c[1] for c in result["curve"][-3:]]
    return sum(held) / len(held)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--d", type=int, default=192)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--quick", action="store_true", help="a tiny model, for a smoke run")
    ap.add_argument("--out", default="benchmarks/results/quality")
    args = ap.parse_args()
    runs = args.runs.split(",")
    unknown = [r for r in runs if r not in RUNS]
    if unknown:  # (refused before anything trains, not as a KeyError at its turn)
        ap.error(f"unknown --runs {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    if args.steps < 1 or args.eval_every < 1 or args.eval_batches < 1:
        ap.error("--steps, --eval-every and --eval-batches must be at least 1")
    if args.quick:
        args.d, args.layers, args.eval_every, args.eval_batches = 32, 1, max(1, args.steps // 2), 2
    torch.set_num_threads(args.threads)
    data = corpus()
    split = int(data.numel() * 0.9)
    data_train, data_val = data[:split], data[split:]
    val = list(batches(data_val, args.eval_batches, args.batch, args.context, 12345))
    torch.manual_seed(args.seed)
    init = LM(args.d, args.layers, args.heads, args.context).state_dict()
    n_params = sum(v.numel() for v in init.values())
    from bench import cpu_name  # (bench.py's, as its machine line names the CPU)

    machine = (f"{cpu_name()}, {os.cpu_count()} cores, threads {args.threads}; torch "
               f"{torch.__version__}; Python {platform.python_version()}; "
               f"{datetime.date.today().isoformat()}")
    print(f"{n_params / 1e6:.2f}M params, corpus {data.numel()} bytes, {args.steps} steps of "
          f"{args.batch}x{args.context} tokens; {machine}", flush=True)
    results = {}
    for name in runs:
        results[name] = train(name, args, data_train, val, init)
    ref = results.get("fp32")
    lines = ["| run | final held-out loss | vs fp32 | mean of the last 3 evaluations | vs fp32 "
             "| optimizer state bytes / param | minutes |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def vs_fp32(value, ref_value):
        return f"{100 * (value - ref_value) / ref_value:+.2f}%" if ref else "n/a"

    for name, r in results.items():
        last3 = last_mean(r)
        lines.append(f"| {name} | {r['final']:.4f} | {vs_fp32(r['final'], ref and ref['final'])} "
                     f"| {last3:.4f} | {vs_fp32(last3, ref and last_mean(ref))} "
                     f"| {r['state_bytes_per_param']:.2f} | {r['seconds'] / 60:.1f} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump({"args": vars(args), "params": n_params, "machine": machine,
                   "results": results}, f, indent=1)
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(f"{n_params / 1e6:.2f}M params; {args.steps} steps; {machine}\n\n{table}\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in results.items():
        steps, held = [c[0] for c in r["curve"]], [c[1] for c in r["curve"]]
        ax.plot(steps, held, label=f"{name} ({r['final']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats per byte)")
    ax.set_title(f"{n_params / 1e6:.1f}M-param byte-level LM on Python's help text, AdamW")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(args.out, "quality.png")
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
