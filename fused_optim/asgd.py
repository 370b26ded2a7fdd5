"""ASGD: torch.optim.ASGD with the step computed by fused_optim::asgd_."""
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype, _to_scalar

from .optimizer import FusedOptimizer, evaluate_host_term, lr_args, zeros_states, weight_decay_arg

__all__ = ["ASGD"]


class ASGD(FusedOptimizer, torch.optim.ASGD):
    __doc__ = torch.optim.ASGD.__doc__
    _torch_class = torch.optim.ASGD

    def __init__(
        self,
        params,
        lr=1e-2,
        lambd=1e-4,
        alpha=0.75,
        t0=1e6,
        weight_decay=0,
        foreach=None,
        maximize=False,
        differentiable=False,
        capturable=False,
        *,
        max_grad_norm=None,
        grad_norm_type=2.0,
        master_weights=False,
        kahan_summation=False,
        stochastic_rounding=False,
        state_dtype=None,
    ):
        super().__init__(
            params,
            lr=lr,
            lambd=lambd,
            alpha=alpha,
            t0=t0,
            weight_decay=weight_decay,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
            capturable=capturable,
        )
        self._fused_setup(max_grad_norm, grad_norm_type, master_weights=master_weights,
                          kahan_summation=kahan_summation,
                          stochastic_rounding=stochastic_rounding,
                          state_dtype=state_dtype)

    _op = "asgd_"
    _scalar_state_keys = ("eta", "mu")

    # Note [ASGD's scalar states on CUDA] (csrc/cuda/asgd.cu): the kernels compute eta and
    # mu on the host, from one copy of the call's steps, etas and mus (a synchronisation),
    # which a capturable group promises not to make: torch's step.
    _cuda_capturable = False

    def _state_keys(self, group: Dict[str, Any]) -> Tuple[Optional[str], ...]:
        return ("ax", "mu", "eta", "step")

    def _torch_lookup_keys(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        # (torch looks mu up before ax)
        return ("mu", "ax", "eta", "step")

    def _kernel_args(self, group: Dict[str, Any]) -> Dict[str, Any]:
        lr, lambd, alpha = group["lr"], group["lambd"], group["alpha"]
        if (not group["capturable"] and not group["foreach"]
                and not any(isinstance(v, Tensor) for v in (lr, lambd, alpha))
                and (lambd * lr < 0 or alpha < 0)
                and all(p.device.type == "cpu" for p in group["params"])):
            # torch's for-loop (on the CPU, where foreach=None means it) computes eta = lr /
            # ((1 + lambd * lr * step) ** alpha) as Python numbers: a negative lambd (which
            # its constructor accepts) can make the base 0, a large negative alpha (which it
            # does not check) the power 0, and it raises ZeroDivisionError (with the param
            # updated, its step counted); ours raises it before anything changes (the
            # second since 2026-12-06: a review found infinities written). (A lambd * lr >= 0
            # with alpha >= 0 keeps the power at 1 or more: nothing to evaluate; torch's
            # foreach step computes on tensors, and does not raise.)
            evaluate_host_term(group, self.state,
                               lambda step: lr / ((1 + lambd * lr * step) ** alpha))
        return dict(
            **lr_args(group["lr"]),
            lambd=group["lambd"],
            alpha=group["alpha"],
            t0=group["t0"],
            weight_decay=weight_decay_arg(group),
            maximize=group["maximize"],
        )

    def _init_state(self, group: Dict[str, Any], p: Tensor, grad: Tensor, state: Dict[str, Any]) -> None:
        if grad.is_sparse:  # checked where torch checks it, with torch's message
            raise RuntimeError("ASGD does not support sparse gradients")
        if len(state) == 0:
            # As torch.optim.ASGD._init_group creates it (Note [state]): on the param's
            # device, capturable or not.
            state["step"] = torch.zeros((), device=p.device, dtype=_get_scalar_dtype())
            state["eta"] = (
                torch.as_tensor(_to_scalar(group["lr"]), device=p.device, dtype=_get_scalar_dtype())
                .clone()
                .detach()
            )
            state["mu"] = torch.ones((), device=p.device, dtype=_get_scalar_dtype())
            zeros_states(state, p, "ax")
