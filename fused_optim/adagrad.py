"""Adagrad: torch.optim.Adagrad with the step computed by fused_optim::adagrad_."""
import functools
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim.optimizer import _device_dtype_check_for_fused, _get_scalar_dtype

from .optimizer import FusedOptimizer, evaluate_host_term, lr_args, weight_decay_arg

__all__ = ["Adagrad"]


@functools.lru_cache(maxsize=None)
def _torch_refuses_fused_cuda() -> bool:
    """Whether the installed torch's Adagrad refuses fused=True for CUDA params (torch
    2.8's did: its check of a fused group's first param leaves "cuda" out of the supported
    devices, which its error lists). Asked of torch itself, once: its step on a complex
    param, which that check refuses before anything changes."""
    p = torch.zeros(1, dtype=torch.complex64, requires_grad=True)
    p.grad = torch.zeros_like(p)
    try:
        torch.optim.Adagrad([p], fused=True).step()
    except RuntimeError as e:
        return "'cuda'" not in str(e)
    return False


class Adagrad(FusedOptimizer, torch.optim.Adagrad):
    __doc__ = torch.optim.Adagrad.__doc__
    _torch_class = torch.optim.Adagrad
    _constructor_fills = {"sum": "initial_accumulator_value"}

    def __init__(
        self,
        params,
        lr=1e-2,
        lr_decay=0,
        weight_decay=0,
        initial_accumulator_value=0,
        eps=1e-10,
        foreach=None,
        *,
        maximize=False,
        differentiable=False,
        fused=None,
        max_grad_norm=None,
        grad_norm_type=2.0,
        master_weights=False,
        kahan_summation=False,
        stochastic_rounding=False,
        state_dtype=None,
    ):
        # torch.optim.Adagrad creates every param's state (`step`, `sum`) right here.
        super().__init__(
            params,
            lr=lr,
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            eps=eps,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
            fused=fused,
        )
        self._fused_setup(max_grad_norm, grad_norm_type, master_weights=master_weights,
                          kahan_summation=kahan_summation,
                          stochastic_rounding=stochastic_rounding,
                          state_dtype=state_dtype)
        # (torch's __init__ made the sums, one at a time: Note [small states side by side])
        self._side_by_side([p for group in self.param_groups for p in group["params"]])

    def _torch_grads_reason(self) -> Optional[str]:
        reason = super()._torch_grads_reason()
        if reason is None and self._sparse_grad_group() is not None:
            # torch's for-loop has a sparse update (and its fused path refuses sparse
            # grads with its own error): run torch's step.
            return "sparse gradients"
        return reason

    def _torch_step(self, reason: str, scales: List[Optional[Tensor]]) -> None:
        # torch's fused step refuses a sparse grad (torch.optim.adagrad's _fused_adagrad).
        # Raised here, before the grads are unscaled or clipped for torch's step, and
        # before any group is updated: that torch step would unscale a GradScaler's grads
        # in place, and update the groups before the sparse one, then raise (found by a
        # review, 2026-12-06).
        for group in self.param_groups:
            if group["fused"] and any(p.grad is not None and p.grad.is_sparse
                                      for p in group["params"]):
                raise self._fused_complex_error(group["params"][0])
        super()._torch_step(reason, scales)

    _checks_fused_once = True

    @staticmethod
    def _fused_device_check(p: Tensor) -> None:
        _device_dtype_check_for_fused(p, cuda_unsupported=_torch_refuses_fused_cuda())

    @staticmethod
    def _fused_complex_error(p: Tensor) -> Exception:
        # torch.optim.adagrad's own check (sparse grads run torch's step, which raises it)
        return RuntimeError("`fused` does not support sparse grad or complex param")

    _op = "adagrad_"
    _moment_keys = ("sum",)  # Note [state storage]

    def _state_keys(self, group: Dict[str, Any]) -> Tuple[Optional[str], ...]:
        return ("sum", "step")

    def _kernel_args(self, group: Dict[str, Any]) -> Dict[str, Any]:
        lr, lr_decay = group["lr"], group["lr_decay"]
        if (not group["fused"] and not isinstance(lr, Tensor) and not isinstance(lr_decay, Tensor)
                and lr_decay < 0):
            # torch's for-loop and foreach step compute clr = lr / (1 + (step - 1) * lr_decay)
            # as Python numbers: a negative lr_decay set in a group (its constructor refuses
            # one) can make that 0, and it raises ZeroDivisionError (with its step counted);
            # ours raises it before anything changes. (torch's fused kernel divides in C++,
            # and does not raise.)
            evaluate_host_term(group, self.state, lambda step: lr / (1 + (step - 1) * lr_decay))
        return dict(
            **lr_args(group["lr"]),
            lr_decay=group["lr_decay"],
            weight_decay=weight_decay_arg(group),
            eps=group["eps"],
            maximize=group["maximize"],
        )

    def _init_state(self, group: Dict[str, Any], p: Tensor, grad: Tensor, state: Dict[str, Any]) -> None:
        if len(state) != 0:
            return
        # A param added after construction: as torch.optim.Adagrad._init_group creates its
        # state, from the *defaults'* initial_accumulator_value.
        state["step"] = (
            torch.zeros((), dtype=_get_scalar_dtype(is_fused=True), device=p.device)
            if group["fused"]
            else torch.tensor(0.0, dtype=_get_scalar_dtype())
        )
        init = self.defaults["initial_accumulator_value"]
        state["sum"] = torch.full_like(p, complex(init, init) if p.is_complex() else init,
                                       memory_format=torch.preserve_format)
