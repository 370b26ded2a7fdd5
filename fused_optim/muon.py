"""Muon: torch.optim.Muon with the step computed by fused_optim::muon_ (csrc/cpu/muon.cpp).

Note [Muon's step]
One kernel call per param group: the momentum update of every param in one parallel pass,
the Newton-Schulz iterations of all params of one shape as batched matrix products (ATen's
bmm/baddbmm on a stack, so oneDNN or cuBLAS does the work), then the weight decay and the
step in one more pass. torch's for-loop does each param on its own, 3 * ns_steps products
and about ten elementwise ops each (Note [Muon as torch computes it] in muon.cpp).
"""
import math
import operator
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import _ops, quantization
from ._support import _release
from .optimizer import FusedOptimizer, hyper_float, lr_args

__all__ = ["Muon"]

# torch's defaults (torch/optim/_muon.py), read from its signature so they cannot drift.
_TORCH_DEFAULTS = {
    k: v.default
    for k, v in __import__("inspect").signature(torch.optim.Muon.__init__).parameters.items()
}

# adjust_lr_fn as the kernel's `adjust_lr` (csrc/ops.cpp: 0 sqrt(max(1, A / B)), 1
# 0.2 sqrt(max(A, B)), 2 none, 3 sqrt(A / B)), by what the installed torch's _adjust_lr
# computes for the name on two shapes: its names differ between releases (torch 2.14 added
# "spectral_unclamped"; before it, that name, set in a group after construction, adjusted
# nothing), and any name it does not know adjusts nothing. None: a formula the kernel does
# not have (torch's step runs).
_ADJUST_BY_RATIOS = {(2.0, 1.0): 0, (0.4, 0.4): 1, (1.0, 1.0): 2, (2.0, 0.5): 3}
_adjust_codes: Dict[Any, Optional[int]] = {}


def _adjust_lr_code(name: Any) -> Optional[int]:
    try:
        return _adjust_codes[name]
    except KeyError:
        pass
    except TypeError:  # (an unhashable value: asked each time)
        return _probe_adjust_lr(name)
    code = _adjust_codes[name] = _probe_adjust_lr(name)
    return code


def _probe_adjust_lr(name: Any) -> Optional[int]:
    adjust = torch.optim._muon._adjust_lr
    ratios = (adjust(1.0, name, torch.Size([4, 1])), adjust(1.0, name, torch.Size([1, 4])))
    for known, code in _ADJUST_BY_RATIOS.items():
        if all(math.isclose(r, k, rel_tol=1e-15) for r, k in zip(ratios, known)):
            return code
    return None


def _probe_normalizes_buffer() -> bool:
    """Whether the installed torch's Newton-Schulz normalizes a bfloat16 input in place (Note
    [Muon's bfloat16 buffer] in csrc/cpu/muon.cpp: before torch 2.15 it did, and torch's
    step then left a bfloat16 momentum buffer divided by its norm where nesterov is off)."""
    zeropower = getattr(torch.optim._muon, "_zeropower_via_newtonschulz", None)
    try:
        # (on the CPU whatever the default device, real under a FakeTensorMode; where a
        # signature changed, the release decides)
        with _ops.real_tensors():
            x = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.bfloat16, device="cpu")
            zeropower(x, (1.0, 0.0, 0.0), 0, 1e-7)
            return x[1, 1].item() != 4.0
    except Exception:
        return _release(torch.__version__) < (2, 15)


_NORMALIZES_BUFFER = _probe_normalizes_buffer()


class Muon(FusedOptimizer, torch.optim.Muon):
    __doc__ = torch.optim.Muon.__doc__
    _torch_class = torch.optim.Muon
    _torch_only_options = ()  # Muon has neither `differentiable` nor `capturable`
    _op = "muon_"

    def __init__(
        self,
        params,
        lr=_TORCH_DEFAULTS["lr"],
        weight_decay=_TORCH_DEFAULTS["weight_decay"],
        momentum=_TORCH_DEFAULTS["momentum"],
        nesterov=_TORCH_DEFAULTS["nesterov"],
        ns_coefficients=_TORCH_DEFAULTS["ns_coefficients"],
        eps=_TORCH_DEFAULTS["eps"],
        ns_steps=_TORCH_DEFAULTS["ns_steps"],
        adjust_lr_fn=_TORCH_DEFAULTS["adjust_lr_fn"],
        *,
        max_grad_norm=None,
        grad_norm_type=2.0,
    ):
        super().__init__(
            params,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        self._fused_setup(max_grad_norm, grad_norm_type)

    _torch_looks_up_state = False  # (_torch_lookup_keys)

    def _state_keys(self, group: Dict[str, Any]) -> Tuple[Optional[str], ...]:
        return ("momentum_buffer",)

    _refuses_complex = True  # (_init_state)

    def _torch_step_reason(self) -> Optional[str]:
        reason = super()._torch_step_reason()
        if reason is None:
            for i, group in enumerate(self.param_groups):
                if _adjust_lr_code(group["adjust_lr_fn"]) is None:
                    return (f"adjust_lr_fn={group['adjust_lr_fn']!r} in param group {i} (an lr "
                            "adjustment the kernel does not have)")
        return reason

    def _torch_grads_reason(self) -> Optional[str]:
        # (asked where the fast path declined: DTensors among them) The Newton-Schulz
        # iterations need each whole matrix, and the kernel sees a rank's shard of a sharded
        # param (FSDP2): torch's own Muon computes on the DTensors, with collectives.
        reason = super()._torch_grads_reason()
        if reason is None and any(quantization.is_dtensor(p) for group in self.param_groups
                                  for p in group["params"] if p.grad is not None):
            return "sharded (DTensor) params"
        return reason

    def _kernel_args(self, group: Dict[str, Any]) -> Dict[str, Any]:
        coefficients = group["ns_coefficients"]
        ns_steps = group["ns_steps"]
        if (len(coefficients) != 3 or ns_steps >= 100 or type(ns_steps) is not int) and any(
                p.grad is not None for p in group["params"]):
            # torch's checks, raised where torch raises them (a step with grads), but
            # before anything changes (torch's first param has its momentum by then).
            if ns_steps >= 100:
                raise ValueError(
                    "Number of steps must be less than 100 for computational efficiency")
            if len(coefficients) != 3:
                raise ValueError("Coefficients must be a tuple of exactly 3 values")
            # torch's step runs range(ns_steps): a float is its TypeError ("'float' object
            # cannot be interpreted as an integer"), a numpy or 0-dim tensor integer counts.
            ns_steps = operator.index(ns_steps)
        a, b, c = coefficients if len(coefficients) == 3 else (0.0, 0.0, 0.0)
        return dict(
            **lr_args(group["lr"]),
            weight_decay=hyper_float(group["weight_decay"], "weight_decay"),
            momentum=hyper_float(group["momentum"], "momentum"),
            nesterov=bool(group["nesterov"]),
            ns_a=hyper_float(a, "ns_coefficients[0]"),
            ns_b=hyper_float(b, "ns_coefficients[1]"),
            ns_c=hyper_float(c, "ns_coefficients[2]"),
            eps=hyper_float(group["eps"], "eps"),
            ns_steps=int(ns_steps),
            adjust_lr=_adjust_lr_code(group["adjust_lr_fn"]),
            normalize_buffer=_NORMALIZES_BUFFER,
        )

    def _update_group(self, group: Dict[str, Any], params: List[Tensor], grads: List[Tensor],
                      keys: Tuple[Optional[str], ...], args: Tuple[Any, ...]) -> None:
        # torch's checks in torch's order: its _init_group's, param by param, each param's
        # state made once its own pass (_init_state); then its step's, param by param: the
        # grad's dims, and the lr adjustment's A / B, which raises for a param of no
        # columns. All before any param changes (torch's earlier params are updated by then).
        for p, g in zip(params, grads):
            self._checked_state(group, p, g)
        for p, g in zip(params, grads):
            if g.ndim != 2:
                raise ValueError("Param gradient must be a 2D matrix")
            if _adjust_lr_code(group["adjust_lr_fn"]) in (0, 3) and p.shape[1] == 0:
                raise ZeroDivisionError("division by zero")
        super()._update_group(group, params, grads, keys, args)

    def _init_state(self, group: Dict[str, Any], p: Tensor, grad: Tensor, state: Dict[str, Any]) -> None:
        # torch's checks (its _init_group runs them every step, param by param).
        if torch.is_complex(p):
            raise RuntimeError("Muon does not support complex parameters")
        if grad.is_sparse:
            raise RuntimeError("Muon does not support sparse gradients")
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
