"""SparseAdam: torch.optim.SparseAdam with the step computed by fused_optim::sparse_adam_,
which reads and writes only the elements the sparse grads name (Note [sparse adam] in
csrc/update_rules.h)."""
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from torch.optim.optimizer import _to_scalar

from .optimizer import FusedOptimizer, betas_args, zeros_states

__all__ = ["SparseAdam"]


class SparseAdam(FusedOptimizer, torch.optim.SparseAdam):
    __doc__ = torch.optim.SparseAdam.__doc__
    _torch_class = torch.optim.SparseAdam
    _op = "sparse_adam_"
    _torch_only_options = ()  # torch's SparseAdam has no differentiable or capturable
    _fast_path = False  # sparse grads: the eager C++ gather takes dense tensors only

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        maximize: bool = False,
        *,
        max_grad_norm=None,
        grad_norm_type=2.0,
    ):
        if max_grad_norm is not None:
            # (torch.nn.utils.clip_grad_norm_ has no norm of sparse grads either.)
            raise ValueError(
                "SparseAdam does not support max_grad_norm: clipping by global norm needs "
                "the norm of sparse grads, which torch.linalg.vector_norm does not compute")
        super().__init__(params, lr=lr, betas=betas, eps=eps, maximize=maximize)
        self._fused_setup(max_grad_norm, grad_norm_type)

    _torch_looks_up_state = False  # (_torch_lookup_keys)

    def _state_keys(self, group: Dict[str, Any]) -> Tuple[Optional[str], ...]:
        return ("exp_avg", "exp_avg_sq")

    def _kernel_args(self, group: Dict[str, Any]) -> Dict[str, Any]:
        return dict(**betas_args(group), eps=group["eps"], maximize=group.get("maximize", False))

    def _torch_grads_reason(self) -> Optional[str]:
        # torch raises this at the first dense grad, after the params before it were
        # updated; here it is raised before anything changes.
        reason = None
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if not g.is_sparse:
                    raise RuntimeError(
                        "SparseAdam does not support dense gradients, please consider Adam instead")
                if g.dtype != p.dtype:
                    # (torch >= 2.9 allows it, with p.grad_dtype = None, and torch's step
                    # takes it; the kernel refused it: found by a review, 2026-12-06. Any
                    # dense grad's error comes first, wherever it is.)
                    reason = "a grad whose dtype is not its param's"
        return reason

    # Not traced by torch.compile: Dynamo cannot wrap the sparse grads (torch's own SparseAdam
    # step falls back to eager for the same reason), and tracing this loop guarded on each
    # param's Python-int step, so that a compiled step made new graphs step after step until
    # Dynamo's recompile limit (found by a differential fuzz, 2026-12-08).
    @torch.compiler.disable
    def _update_group(self, group: Dict[str, Any], params: List[Tensor], grads: List[Tensor],
                      keys: Tuple[Optional[str], ...], args: Tuple[Any, ...]) -> None:
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and found_inf.item() != 0:
            return  # GradScaler skips the step: torch's step (and its counts) never run
        beta1, beta2 = group["betas"]
        # A Tensor lr stays a tensor in torch's arithmetic below (its dtype's rounding).
        lr = _to_scalar(group["lr"])
        state = self.state
        exp_avgs, exp_avg_sqs, step_sizes = [], [], []
        sizes: Dict[int, float] = {}  # step -> step size (a group's params share a step)
        # Each param's count after this step, stored once the kernel has run: a step that
        # fails (in the arithmetic below or in the kernel's checks) changes no count. (A
        # param listed twice counts twice, as in torch's loop.)
        steps: Dict[int, int] = {}
        for p in params:
            s = state[p]
            if len(s) == 0:  # as torch's step creates it: `step` is a Python int
                s["step"] = 0
                zeros_states(s, p, "exp_avg", "exp_avg_sq")
            exp_avgs.append(s["exp_avg"])
            exp_avg_sqs.append(s["exp_avg_sq"])
            step = steps[id(p)] = steps.get(id(p), s["step"]) + 1
            if step not in sizes:
                # torch's arithmetic, in Python (F.sparse_adam).
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                sizes[step] = lr * math.sqrt(bias_correction2) / bias_correction1
            size = sizes[step]
            if isinstance(size, Tensor):
                # torch's `-step_size * values` with a 0-dim CPU tensor first. On the CPU a
                # tensor op of the values' dtype, which rounds the step size to it (a 16-bit
                # one, too); on CUDA the 0-dim CPU tensor is a scalar the kernel reads as
                # float (its original value, unrounded: found on an H200).
                size = size.to(p.dtype).item() \
                    if p.dtype in (torch.bfloat16, torch.float16) and p.device.type == "cpu" \
                    else size.item()
            step_sizes.append(size)
        torch.ops.fused_optim.sparse_adam_(params, grads, exp_avgs, exp_avg_sqs, step_sizes, *args)
        for p in params:
            state[p]["step"] = steps[id(p)]
