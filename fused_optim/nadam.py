"""NAdam: torch.optim.NAdam with the step computed by fused_optim::nadam_."""
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from .optimizer import (FusedOptimizer, betas_args, host_steps, lr_args, scalar_state, zeros_states,
                        weight_decay_arg)

__all__ = ["NAdam"]


class NAdam(FusedOptimizer, torch.optim.NAdam):
    __doc__ = torch.optim.NAdam.__doc__
    _torch_class = torch.optim.NAdam

    def __init__(
        self,
        params,
        lr=2e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        momentum_decay=4e-3,
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
            momentum_decay=momentum_decay,
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

    _op = "nadam_"
    _moment_keys = ("exp_avg", "exp_avg_sq")  # Note [state storage]
    _scalar_state_keys = ("mu_product",)

    # Note [scalar states] (csrc/plan.h): the kernels update mu_product on the host, so a
    # capturable CUDA group (steps and mu_products on the GPU) runs torch's step.
    _cuda_capturable = False

    def _state_keys(self, group: Dict[str, Any]) -> Tuple[Optional[str], ...]:
        return ("exp_avg", "exp_avg_sq", "mu_product", "step")

    def _kernel_args(self, group: Dict[str, Any]) -> Dict[str, Any]:
        self._raise_as_torchs_host_division(group)
        return dict(
            **lr_args(group["lr"]),
            **betas_args(group),
            weight_decay=weight_decay_arg(group, group["decoupled_weight_decay"]),
            eps=group["eps"],
            momentum_decay=group["momentum_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            maximize=group["maximize"],
        )

    def _raise_as_torchs_host_division(self, group: Dict[str, Any]) -> None:
        """torch's NAdam divides by 1 - mu_product and by 1 - mu_product * mu_next as Python
        numbers (its for-loop and its foreach step alike): where the product is exactly 1,
        it raises ZeroDivisionError (with the group's earlier params updated); ours raised
        nothing and wrote infinities and NaN into the params (found by a review,
        2026-12-06). The product stays 1 only where mu, rounded to mu_product's dtype, is 1:
        beta1 within half an ulp of 1 in that dtype (from 1 - 2^-25 for float32 states,
        1 - 2^-9 for the bfloat16 ones that a load into bfloat16 params makes), or
        hyper-parameters set outside the constructor's range in a group (beta1 >= 1, a
        negative momentum_decay). There the same expressions are evaluated, with torch's
        arithmetic for the product, before anything changes; elsewhere nothing is (a
        Tensor beta1 or momentum_decay makes tensors of them, which divide without
        raising; torch.compile traces none of this)."""
        (beta1, _), decay = group["betas"], group["momentum_decay"]  # (unpacked as torch's)
        if (isinstance(beta1, Tensor) or isinstance(decay, Tensor)
                or torch.compiler.is_compiling()):
            return
        if isinstance(beta1, (int, float)) and isinstance(decay, (int, float)) and decay >= 0:
            if 0 <= beta1 < 0.998:
                return
            if 0 <= beta1 < 1 - 2 ** -25 and not any(
                    p.dtype in (torch.bfloat16, torch.float16) for p in group["params"]):
                return  # (float32 and float64 products: mu rounds below 1)
        lr = group["lr"]
        if isinstance(lr, Tensor) and (group["foreach"] or (
                group["foreach"] is None and all(p.device.type == "cuda" for p in group["params"]))):
            lr = lr.item()  # (torch's foreach step takes lr's value: _get_value(lr))
        for state, step in host_steps(group, self.state):
            mu_product = state.get("mu_product") if state else None
            if mu_product is None:
                mu_product = torch.tensor(1.0, dtype=_get_scalar_dtype())
            mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * decay)))
            mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * decay)))
            product = (mu_product * mu).item()  # (torch: mu_product *= mu, then its value)
            -lr * (1.0 - mu) / (1.0 - product)
            (-lr * mu_next) / (1.0 - product * mu_next)

    def _init_state(self, group: Dict[str, Any], p: Tensor, grad: Tensor, state: Dict[str, Any]) -> None:
        if grad.is_sparse:  # checked where torch checks it, with torch's message
            raise RuntimeError("NAdam does not support sparse gradients")
        if len(state) == 0:
            # As torch.optim.NAdam._init_group creates it (Note [state]).
            state["step"] = scalar_state(0.0, p, group["capturable"])
            state["mu_product"] = scalar_state(1.0, p, group["capturable"])
            zeros_states(state, p, "exp_avg", "exp_avg_sq")
