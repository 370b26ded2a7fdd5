"""SGD: torch.optim.SGD with the step computed by fused_optim::sgd_."""
from typing import Any, Dict, List, Optional, Tuple

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
        max_grad_norm=None,
        grad_norm_type=2.0,
        master_weights=False,
        kahan_summation=False,
        stochastic_rounding=False,
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
        self._fused_setup(max_grad_norm, grad_norm_type, master_weights=master_weights,
                          kahan_summation=kahan_summation,
                          stochastic_rounding=stochastic_rounding)

    def _torch_grads_reason(self) -> Optional[str]:
        reason = super()._torch_grads_reason()
        if reason is None:
            group = self._sparse_grad_group()
            if group is not None and not group["fused"]:
                # torch's for-loop handles sparse grads (its fused SGD refuses them).
                return "sparse gradients"
        return reason

    _op = "sgd_"

    def _state_keys(self, group: Dict[str, Any]) -> Tuple[Optional[str], ...]:
        return ("momentum_buffer" if group["momentum"] != 0 else None,)

    def _kernel_args(self, group: Dict[str, Any], is_first_step: bool = False) -> Dict[str, Any]:
        return dict(
            **lr_args(group["lr"]),
            momentum=group["momentum"],
            dampening=group["dampening"],
            weight_decay=hyper_float(group["weight_decay"]),
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            is_first_step=is_first_step,
        )

    def _update_group(
        self,
        group: Dict[str, Any],
        params: List[Tensor],
        grads: List[Tensor],
        keys: Tuple[Optional[str], ...],
        args: Tuple[Any, ...],
    ) -> None:
        state = self.state
        # Note [param storage]: the mode's buffers (made where missing), after the lists.
        storage = getattr(self, "_param_mode", 0)
        aux = [self._init_storage(p, state[p]) for p in params] if storage else None
        if group["momentum"] == 0:
            _ops.call(self._op, params, grads, [[]] + ([aux] if storage else []), args)
            return
        # torch creates momentum_buffer on a param's first step as a copy of its grad
        # (after weight decay); the kernel does that copy when is_first_step is set.
        old, new = ([], [], [], []), ([], [], [], [])
        for i, (p, g) in enumerate(zip(params, grads)):
            buf = state[p].get("momentum_buffer")
            if buf is None:
                buf = torch.zeros_like(g, memory_format=torch.preserve_format)
                lists = new
            else:
                lists = old
            lists[0].append(p)
            lists[1].append(g)
            lists[2].append(buf)
            if storage:
                lists[3].append(aux[i])
        extra = (lambda lists: [lists[3]]) if storage else (lambda lists: [])
        if old[0]:
            _ops.call(self._op, old[0], old[1], [old[2]] + extra(old), args)
        if new[0]:
            grad_scale, found_inf = _ops.scaler_args(self._op, args)
            first = _ops.schema_args(self._op, self._step_kwargs(group, is_first_step=True),
                                     grad_scale, found_inf)
            _ops.call(self._op, new[0], new[1], [new[2]] + extra(new), first)
            if found_inf is None or found_inf.item() == 0:
                for p, buf in zip(new[0], new[2]):
                    state[p]["momentum_buffer"] = buf
