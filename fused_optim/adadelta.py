"""Adadelta: torch.optim.Adadelta with the step computed by fused_optim::adadelta_."""
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from .optimizer import FusedOptimizer, lr_args, scalar_state, zeros_states, weight_decay_arg

__all__ = ["Adadelta"]


class Adadelta(FusedOptimizer, torch.optim.Adadelta):
    __doc__ = torch.optim.Adadelta.__doc__
    _torch_class = torch.optim.Adadelta

    def __init__(
        self,
        params,
        lr=1.0,
        rho=0.9,
        eps=1e-6,
        weight_decay=0,
        foreach=None,
        *,
        capturable=False,
        maximize=False,
        differentiable=False,
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
            rho=rho,
            eps=eps,
            weight_decay=weight_decay,
            foreach=foreach,
            capturable=capturable,
            maximize=maximize,
            differentiable=differentiable,
        )
        self._fused_setup(max_grad_norm, grad_norm_type, master_weights=master_weights,
                          kahan_summation=kahan_summation,
                          stochastic_rounding=stochastic_rounding,
                          state_dtype=state_dtype)

    _op = "adadelta_"
    _moment_keys = ("square_avg", "acc_delta")  # Note [state storage]

    def _state_keys(self, group: Dict[str, Any]) -> Tuple[Optional[str], ...]:
        return ("square_avg", "acc_delta", "step")

    def _kernel_args(self, group: Dict[str, Any]) -> Dict[str, Any]:
        return dict(
            **lr_args(group["lr"]),
            rho=group["rho"],
            eps=group["eps"],
            weight_decay=weight_decay_arg(group),
            maximize=group["maximize"],
        )

    def _init_state(self, group: Dict[str, Any], p: Tensor, grad: Tensor, state: Dict[str, Any]) -> None:
        if grad.is_sparse:  # checked where torch checks it, with torch's message
            raise RuntimeError("Adadelta does not support sparse gradients")
        if len(state) == 0:
            # As torch.optim.Adadelta._init_group creates it (Note [state]).
            state["step"] = scalar_state(0.0, p, group["capturable"])
            zeros_states(state, p, "square_avg", "acc_delta")
