"""SGD: torch.optim.SGD with the step computed by fused_optim::sgd_."""
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from . import _ops
from .optimizer import FusedOptimizer, hyper_float, lr_args

__all__ = ["SGD"]


class SGD(FusedOptimizer, torch.optim.SGD):
    __doc__ = torch.optim.SGD.__doc__
    _torch_class = torch.optim.SGD

    def __init__(
        self,
        params,
        lr=1e-3,
        momentum=0,
        dampening=0,
        weight_decay=0,
        nesterov=False,
        *,
        maximize=False,
        foreach=None,
        differentiable=False,
        fused=None,
    ):
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        self._fused_setup()

    def _torch_step_reason(self) -> Optional[str]:
        reason = super()._torch_step_reason()
        if reason is None:
            group = self._sparse_grad_group()
            if group is not None and not group["fused"]:
                # torch's for-loop handles sparse grads (its fused SGD refuses them).
                return "sparse gradients"
        return reason

    def _update_group(
        self,
        group: Dict[str, Any],
        params: List[Tensor],
        grads: List[Tensor],
        grad_scale: Optional[Tensor],
        found_inf: Optional[Tensor],
    ) -> None:
        momentum = group["momentum"]
        common = dict(
            **lr_args(group["lr"]),
            momentum=momentum,
            dampening=group["dampening"],
            weight_decay=hyper_float(group["weight_decay"]),
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            grad_scale=grad_scale,
            found_inf=found_inf,
        )
        if momentum == 0:
            _ops.sgd_(params, grads, [], is_first_step=False, **common)
            return
        # torch creates momentum_buffer on a param's first step as a copy of its grad
        # (after weight decay); the kernel does that copy when is_first_step is set.
        state = self.state
        old, new = ([], [], []), ([], [], [])
        for p, g in zip(params, grads):
            s = state[p]
            buf = s.get("momentum_buffer")
            if buf is None:
                buf = torch.zeros_like(g, memory_format=torch.preserve_format)
                lists = new
            else:
                lists = old
            lists[0].append(p)
            lists[1].append(g)
            lists[2].append(buf)
        if old[0]:
            _ops.sgd_(*old, is_first_step=False, **common)
        if new[0]:
            _ops.sgd_(*new, is_first_step=True, **common)
            if found_inf is None or found_inf.item() == 0:
                for p, buf in zip(new[0], new[2]):
                    state[p]["momentum_buffer"] = buf
