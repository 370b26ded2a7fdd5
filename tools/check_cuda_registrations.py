"""Exits nonzero unless the fused_optim built in this checkout (in place) has its CUDA
kernels: a CUDA kernel registered for every optimizer op. No GPU needed. Used by
tools/check_cuda_build.sh and tools/gpu_check.sh; with --installed, checks the fused_optim
that the interpreter imports instead (CI's newest lane, which installs a wheel)."""
import os
import sys

if "--installed" not in sys.argv[1:]:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fused_optim  # noqa: E402,F401
from fused_optim import _build_info, _ops  # noqa: E402

assert _build_info.WITH_CUDA, "this build has no CUDA kernels"
registered = set(torch._C._dispatch_get_registrations_for_dispatch_key("CUDA"))
wanted = sorted(f"fused_optim::{op}" for op in _ops.OPTIMIZER_OPS if op not in _ops.CPU_ONLY_OPS)
missing = [op for op in wanted if op not in registered]
assert not missing, f"no CUDA kernel registered for {missing}"
print("CUDA kernels registered:", ", ".join(wanted), "(torch", torch.__version__,
      "built against", _build_info.TORCH_VERSION + ")")
