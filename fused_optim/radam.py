"""RAdam: torch.optim.RAdam with the step computed by fused_optim::radam_."""
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from .optimizer import (FusedOptimizer, betas_args, lr_args, raise_as_torchs_host_division,
                        scalar_state, zeros_states, weight_decay_arg)

__all__ = ["RAdam"]


class RAdam(FusedOptimizer, torch.optim.RAdam):
    __doc__ = torch.optim.RAdam.__doc__
    _torch_class = torch.optim.RAdam

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        decoupled_weight_decay=False,
        *,
        foreach=None,
        maximize=False,
        capturable=False,
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
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
        )
        self._fused_setup(max_grad_norm, grad_norm_type, master_weights=master_weights,
                          kahan_summation=kahan_summation,
                          stochastic_rounding=stochastic_rounding,
                          state_dtype=state_dtype)

    _op = "radam_"
    _moment_keys = ("exp_avg", "exp_avg_sq")  # Note [state storage]

    def _state_keys(self, group: Dict[str, Any]) -> Tuple[Optional[str], ...]:
        return ("exp_avg", "exp_avg_sq", "step")

    def _kernel_args(self, group: Dict[str, Any]) -> Dict[str, Any]:
        _, beta2 = group["betas"]  # (unpacked as torch's step unpacks them)
        # (torch: rho_inf = 2 / (1 - beta2) - 1, then rho_t = rho_inf - 2 * step * beta2 **
        # step / (1 - beta2 ** step), whose divisor is 0 at even steps for a beta2 of -1:
        # until 2026-12-06 only rho_inf was evaluated, found by a review)
        raise_as_torchs_host_division(
            group, self.state, beta2,
            lambda step: 2 / (1 - beta2) - 1 - 2 * step * (beta2 ** step) / (1 - beta2 ** step))
        return dict(
            **lr_args(group["lr"]),
            **betas_args(group),
            weight_decay=weight_decay_arg(group, group["decoupled_weight_decay"]),
            eps=group["eps"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            maximize=group["maximize"],
        )

    def _init_state(self, group: Dict[str, Any], p: Tensor, grad: Tensor, state: Dict[str, Any]) -> None:
        if grad.is_sparse:  # checked where torch checks it, with torch's message
            raise RuntimeError("RAdam does not support sparse gradients")
        if len(state) == 0:
            # As torch.optim.RAdam._init_group creates it (Note [state]).
            state["step"] = scalar_state(0.0, p, group["capturable"])
            zeros_states(state, p, "exp_avg", "exp_avg_sq")
