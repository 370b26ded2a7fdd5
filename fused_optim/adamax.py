"""Adamax: torch.optim.Adamax with the step computed by fused_optim::adamax_."""
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from .optimizer import (FusedOptimizer, betas_args, lr_args, raise_as_torchs_host_division,
                        scalar_state, zeros_states, weight_decay_arg)

__all__ = ["Adamax"]


class Adamax(FusedOptimizer, torch.optim.Adamax):
    __doc__ = torch.optim.Adamax.__doc__
    _torch_class = torch.optim.Adamax

    def __init__(
        self,
        params,
        lr=2e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        foreach=None,
        *,
        maximize=False,
        differentiable=False,
        capturable=False,
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
            betas=betas,
            eps=eps,
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

    _op = "adamax_"
    _moment_keys = ("exp_avg", "exp_inf")  # Note [state storage]

    def _state_keys(self, group: Dict[str, Any]) -> Tuple[Optional[str], ...]:
        return ("exp_avg", "exp_inf", "step")

    def _kernel_args(self, group: Dict[str, Any]) -> Dict[str, Any]:
        (beta1, _), lr = group["betas"], group["lr"]  # (unpacked as torch's step unpacks them)
        if not group["capturable"]:
            # (torch's for-loop and foreach step: clr = lr / (1 - beta1 ** step))
            raise_as_torchs_host_division(group, self.state, beta1,
                                          lambda step: lr / (1 - beta1 ** step))
        return dict(
            **lr_args(group["lr"]),
            **betas_args(group),
            weight_decay=weight_decay_arg(group),
            eps=group["eps"],
            maximize=group["maximize"],
        )

    def _init_state(self, group: Dict[str, Any], p: Tensor, grad: Tensor, state: Dict[str, Any]) -> None:
        if grad.is_sparse:  # checked where torch checks it, with torch's message
            raise RuntimeError("Adamax does not support sparse gradients")
        if len(state) == 0:
            # As torch.optim.Adamax._init_group creates it (Note [state]).
            state["step"] = scalar_state(0.0, p, group["capturable"])
            zeros_states(state, p, "exp_avg", "exp_inf")
