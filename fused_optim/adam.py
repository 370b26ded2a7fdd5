"""Adam and AdamW: torch.optim's classes with the step computed by fused_optim::adam_."""
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from . import _ops
from .optimizer import FusedOptimizer, hyper_float, lr_args

__all__ = ["Adam", "AdamW"]


class _AdamStep(FusedOptimizer):
    def _update_group(
        self,
        group: Dict[str, Any],
        params: List[Tensor],
        grads: List[Tensor],
        grad_scale: Optional[Tensor],
        found_inf: Optional[Tensor],
    ) -> None:
        amsgrad = group["amsgrad"]
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], []
        state = self.state
        for p, g in zip(params, grads):
            s = state[p]
            if len(s) == 0:
                if g.is_sparse:  # checked where torch checks it, with torch's message
                    raise RuntimeError(
                        "Adam does not support sparse gradients, please consider SparseAdam instead"
                    )
                # As torch.optim.Adam._init_group creates it (Note [state]).
                s["step"] = (
                    torch.zeros((), dtype=_get_scalar_dtype(is_fused=True), device=p.device)
                    if group["fused"]
                    else torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")
                )
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad:
                    s["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(s["exp_avg"])
            exp_avg_sqs.append(s["exp_avg_sq"])
            if amsgrad:
                max_exp_avg_sqs.append(s["max_exp_avg_sq"])
            steps.append(s["step"])
        beta1, beta2 = group["betas"]
        _ops.adam_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            steps,
            **lr_args(group["lr"]),
            beta1=hyper_float(beta1),
            beta2=hyper_float(beta2),
            weight_decay=hyper_float(group["weight_decay"]),
            eps=group["eps"],
            amsgrad=amsgrad,
            maximize=group["maximize"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            grad_scale=grad_scale,
            found_inf=found_inf,
        )


class Adam(_AdamStep, torch.optim.Adam):
    __doc__ = torch.optim.Adam.__doc__
    _torch_class = torch.optim.Adam

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        amsgrad=False,
        *,
        foreach=None,
        maximize=False,
        capturable=False,
        differentiable=False,
        fused=None,
        decoupled_weight_decay=False,
    ):
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        self._fused_setup()


class AdamW(_AdamStep, torch.optim.AdamW):
    __doc__ = torch.optim.AdamW.__doc__
    _torch_class = torch.optim.AdamW

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        amsgrad=False,
        *,
        maximize=False,
        foreach=None,
        capturable=False,
        differentiable=False,
        fused=None,
    ):
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        self._fused_setup()
