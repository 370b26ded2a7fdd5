"""Rprop: torch.optim.Rprop with the step computed by fused_optim::rprop_."""
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor
from torch.optim.optimizer import _to_scalar

from .optimizer import FusedOptimizer, scalar_state, zeros_states

__all__ = ["Rprop"]


class Rprop(FusedOptimizer, torch.optim.Rprop):
    __doc__ = torch.optim.Rprop.__doc__
    _torch_class = torch.optim.Rprop

    def __init__(
        self,
        params,
        lr=1e-2,
        etas=(0.5, 1.2),
        step_sizes=(1e-6, 50),
        *,
        capturable=False,
        foreach=None,
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
            etas=etas,
            step_sizes=step_sizes,
            capturable=capturable,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
        )
        self._fused_setup(max_grad_norm, grad_norm_type, master_weights=master_weights,
                          kahan_summation=kahan_summation,
                          stochastic_rounding=stochastic_rounding,
                          state_dtype=state_dtype)

    _op = "rprop_"

    def _state_keys(self, group: Dict[str, Any]) -> Tuple[Optional[str], ...]:
        return ("prev", "step_size", "step")

    def _kernel_args(self, group: Dict[str, Any]) -> Dict[str, Any]:
        # lr is only the initial step size (_init_state): the kernel does not take it.
        etaminus, etaplus = group["etas"]
        step_size_min, step_size_max = group["step_sizes"]
        return dict(
            etaminus=etaminus,
            etaplus=etaplus,
            step_size_min=step_size_min,
            step_size_max=step_size_max,
            maximize=group["maximize"],
        )

    def _init_state(self, group: Dict[str, Any], p: Tensor, grad: Tensor, state: Dict[str, Any]) -> None:
        if grad.is_sparse:  # checked where torch checks it, with torch's message
            raise RuntimeError("Rprop does not support sparse gradients")
        if len(state) == 0:
            # As torch.optim.Rprop._init_group creates it (Note [state]): step_size like
            # the grad, not the param.
            state["step"] = scalar_state(0.0, p, group["capturable"])
            zeros_states(state, p, "prev")
            if p.dtype.is_complex:
                state["step_size"] = torch.full_like(grad, complex(group["lr"], group["lr"]))
            elif isinstance(group["lr"], Tensor) and torch.compiler.is_compiling():
                # (the same values: a compiled step cannot fill with a tensor's .item())
                state["step_size"] = torch.empty_like(grad).copy_(group["lr"].detach())
            else:
                state["step_size"] = torch.full_like(grad, _to_scalar(group["lr"]))
