"""The named benchmark workloads: parameter shapes and dtypes, nothing else."""
import random
from dataclasses import dataclass
from typing import List, Tuple

import torch


@dataclass
class Workload:
    name: str
    description: str
    shapes: List[Tuple[int, ...]]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 0
        for s in self.shapes:
            k = 1
            for d in s:
                k *= d
            n += k
        return n


def gpt2_small_shapes(scale: int = 1) -> List[Tuple[int, ...]]:
    """The 148 parameter tensors of GPT-2 small (124M params); `scale` divides the
    hidden sizes for a quick run."""
    d, vocab, ctx = 768 // scale, 50257 // scale, 1024 // scale
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,),                 # ln_1
                   (d, 3 * d), (3 * d,),       # attn.c_attn
                   (d, d), (d,),               # attn.c_proj
                   (d,), (d,),                 # ln_2
                   (d, 4 * d), (4 * d,),       # mlp.c_fc
                   (4 * d, d), (d,)]           # mlp.c_proj
    shapes += [(d,), (d,)]                     # ln_f
    return shapes


def many_small_shapes(count: int = 5000, lo: int = 64, hi: int = 4096, seed: int = 0):
    rng = random.Random(seed)
    return [(rng.randint(lo, hi),) for _ in range(count)]


def square_matrix_shapes(count: int = 500, lo: int = 64, hi: int = 256, seed: int = 0):
    """Square matrices of random widths (Muon's many-small-params workload)."""
    rng = random.Random(seed)
    return [(w, w) for w in (rng.randint(lo, hi) for _ in range(count))]


def two_dim(shapes: List[Tuple[int, ...]]) -> List[Tuple[int, ...]]:
    """The 2-D shapes only: what Muon takes (it refuses others)."""
    return [s for s in shapes if len(s) == 2]


# Not in the benchmark's default --workloads (tests/test_benchmarks.py): Muon's targets,
# `--algos Muon --workloads W2-2d,W5`.
def _muon_workloads(quick: bool):
    if quick:
        return {
            "W2-2d": Workload("W2-2d", "the 2-D params of GPT-2 small / 8, fp32 (quick)",
                              two_dim(gpt2_small_shapes(8)), torch.float32),
            "W5": Workload("W5", "50 square matrices 16..64 wide, fp32 (quick)",
                           square_matrix_shapes(50, 16, 64), torch.float32),
        }
    return {
        "W2-2d": Workload("W2-2d", "the 2-D params of GPT-2 small (50 tensors), fp32",
                          two_dim(gpt2_small_shapes()), torch.float32),
        "W5": Workload("W5", "500 square matrices 64..256 wide, fp32", square_matrix_shapes(),
                       torch.float32),
    }


def workloads(quick: bool = False):
    return dict(_workloads(quick), **_muon_workloads(quick))


def _workloads(quick: bool):
    if quick:
        return {
            "W1": Workload("W1", "one fp32 tensor of 1M elements (quick)", [(2**20,)], torch.float32),
            "W2": Workload("W2", "GPT-2 small shapes / 8, fp32 (quick)", gpt2_small_shapes(8), torch.float32),
            "W3": Workload("W3", "500 tensors of 64..4096 elements, fp32 (quick)", many_small_shapes(500), torch.float32),
            "W4": Workload("W4", "GPT-2 small shapes / 8, bf16 (quick)", gpt2_small_shapes(8), torch.bfloat16),
        }
    return {
        "W1": Workload("W1", "one fp32 tensor of 64M elements", [(64 * 2**20,)], torch.float32),
        "W2": Workload("W2", "GPT-2 small (124M params, 148 tensors), fp32", gpt2_small_shapes(), torch.float32),
        "W3": Workload("W3", "5,000 tensors of 64..4,096 elements, fp32", many_small_shapes(), torch.float32),
        "W4": Workload("W4", "GPT-2 small (124M params, 148 tensors), bf16", gpt2_small_shapes(), torch.bfloat16),
    }


# Algorithms: constructor kwargs, and the optimizer's memory pattern per element
# (tensors read and written: (inout, read_only) for the bandwidth probe).
ALGORITHMS = {
    "Adam": (dict(lr=1e-3), (3, 1)),
    "AdamW": (dict(lr=1e-3, weight_decay=0.01), (3, 1)),
    "SGD": (dict(lr=1e-3, momentum=0.9), (2, 1)),
    "RMSprop": (dict(lr=1e-3), (2, 1)),
    "Adagrad": (dict(lr=1e-3), (2, 1)),
    # Not in the benchmark's default --algos (tests/test_benchmarks.py): --algos Adamax,...
    "Adamax": (dict(lr=1e-3), (3, 1)),
    "Adadelta": (dict(lr=1.0), (3, 1)),
    "NAdam": (dict(lr=1e-3), (3, 1)),
    "RAdam": (dict(lr=1e-3), (3, 1)),
    "Rprop": (dict(lr=1e-3), (3, 1)),
    "ASGD": (dict(lr=1e-3), (2, 1)),
    # Three passes (Note [Adafactor's passes] in csrc/cpu/adafactor.cpp): for a param of 2
    # or more dims the param read twice and written once, the grad read three times (its
    # factored state is O(rows + cols)); bench.py counts a 1-D param's variance too.
    "Adafactor": (dict(lr=1e-2), (1, 4)),
    # 2-D params only (workloads W2-2d, W5). Its cost is the Newton-Schulz products, not
    # memory: the pattern (momentum buffer and param written, grad read) sizes the
    # bandwidth probe only.
    "Muon": (dict(lr=1e-3), (2, 1)),
}
