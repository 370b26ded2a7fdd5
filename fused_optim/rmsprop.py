"""RMSprop: torch.optim.RMSprop with the step computed by fused_optim::rmsprop_."""
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from . import _ops
from .optimizer import FusedOptimizer, hyper_float, lr_args

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
        self._fused_setup()

    def _update_group(
        self,
        group: Dict[str, Any],
        params: List[Tensor],
        grads: List[Tensor],
        grad_scale: Optional[Tensor],
        found_inf: Optional[Tensor],
    ) -> None:
        momentum, centered = group["momentum"], group["centered"]
        square_avgs, grad_avgs, buffers, steps = [], [], [], []
        state = self.state
        for p, g in zip(params, grads):
            if g.is_sparse:  # checked where torch checks it, with torch's message
                raise RuntimeError("RMSprop does not support sparse gradients")
            s = state[p]
            if len(s) == 0:
                # As torch.optim.RMSprop._init_group creates it (Note [state]).
                s["step"] = torch.zeros(
                    (), dtype=_get_scalar_dtype(),
                    device=p.device if group["capturable"] else None)
                s["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if momentum > 0:
                    s["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if centered:
                    s["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            square_avgs.append(s["square_avg"])
            steps.append(s["step"])
            # A KeyError here when momentum or centered was switched on after the state was
            # made, exactly as in torch.optim.RMSprop.
            if momentum > 0:
                buffers.append(s["momentum_buffer"])
            if centered:
                grad_avgs.append(s["grad_avg"])
        _ops.rmsprop_(
            params,
            grads,
            square_avgs,
            grad_avgs,
            buffers,
            steps,
            **lr_args(group["lr"]),
            alpha=group["alpha"],
            eps=group["eps"],
            weight_decay=hyper_float(group["weight_decay"]),
            momentum=momentum,
            centered=centered,
            maximize=group["maximize"],
            grad_scale=grad_scale,
            found_inf=found_inf,
        )
