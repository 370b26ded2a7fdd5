"""RMSprop: torch.optim.RMSprop with the step computed by fused_optim::rmsprop_."""
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from .optimizer import FusedOptimizer, lr_args, zeros_states, weight_decay_arg
__all__ = ["RMSprop"]


class RMSprop(FusedOptimizer, torch.optim.RMSprop):
    __doc__ = torch.optim.RMSprop.__doc__
    _torch_class = torch.optim.RMSprop

    def __init__(
        self,
        params,
        lr=1e-2,
        alpha=0.99,
        eps=1e-8,
        weight_decay=0,
        momentum=0,
        centered=False,
        capturable=False,
        foreach=None,
        maximize=False,
        differentiable=False,
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
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            centered=centered,
            capturable=capturable,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
        )
        self._fused_setup(max_grad_norm, grad_norm_type, master_weights=master_weights,
                          kahan_summation=kahan_summation,
                          stochastic_rounding=stochastic_rounding,
                          state_dtype=state_dtype)

    _op = "rmsprop_"
    _moment_keys = ("square_avg", "grad_avg", "momentum_buffer")  # Note [state storage]

    def _state_keys(self, group: Dict[str, Any]) -> Tuple[Optional[str], ...]:
        return (
            "square_avg",
            "grad_avg" if group["centered"] else None,
            "momentum_buffer" if group["momentum"] > 0 else None,
            "step",
        )

    def _torch_lookup_keys(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        # (torch looks step up second, and momentum_buffer before grad_avg)
        return (("square_avg", "step") + (("momentum_buffer",) if group["momentum"] > 0 else ())
                + (("grad_avg",) if group["centered"] else ()))

    def _kernel_args(self, group: Dict[str, Any]) -> Dict[str, Any]:
        return dict(
            **lr_args(group["lr"]),
            alpha=group["alpha"],
            eps=group["eps"],
            weight_decay=weight_decay_arg(group),
            momentum=group["momentum"],
            centered=group["centered"],
            maximize=group["maximize"],
        )

    def _init_state(self, group: Dict[str, Any], p: Tensor, grad: Tensor, state: Dict[str, Any]) -> None:
        if grad.is_sparse:  # checked where torch checks it, with torch's message
            raise RuntimeError("RMSprop does not support sparse gradients")
        momentum, centered = group["momentum"], group["centered"]
        if len(state) == 0:
            # As torch.optim.RMSprop._init_group creates it (Note [state]).
            state["step"] = torch.zeros(
                (), dtype=_get_scalar_dtype(), device=p.device if group["capturable"] else None)
            zeros_states(state, p, "square_avg")
            if momentum > 0:
                zeros_states(state, p, "momentum_buffer")
            if centered:
                zeros_states(state, p, "grad_avg")
