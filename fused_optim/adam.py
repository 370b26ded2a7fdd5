"""Adam and AdamW: torch.optim's classes with the step computed by fused_optim::adam_."""
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor
from torch.optim.optimizer import _device_dtype_check_for_fused, _get_scalar_dtype

from .optimizer import (C10_NAMES, FusedOptimizer, betas_args, lr_args,
                        raise_as_torchs_host_division, zeros_states, weight_decay_arg)

__all__ = ["Adam", "AdamW"]


class _AdamStep(FusedOptimizer):
    @staticmethod
    def _fused_complex_error(p: Tensor) -> Exception:
        # torch's fused Adam kernel has no complex dtypes (a group made fused=True after
        # its complex params' state exists): its dispatcher's error.
        return NotImplementedError(
            f'"fused_adam_kernel" not implemented for \'{C10_NAMES[p.dtype]}\'')

    def _check_fused_groups(self) -> None:
        # torch's _init_group raises its device and dtype check for a complex param whose
        # state it makes (_init_state does the same); the kernel's error only where every
        # complex param with a grad has its state already.
        for group in self.param_groups:
            if group.get("fused"):
                complex_params = [p for p in group["params"]
                                  if p.grad is not None and p.is_complex()]
                if complex_params and all(self.state.get(p) for p in complex_params):
                    raise self._fused_complex_error(complex_params[0])

    _op = "adam_"
    _moment_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # Note [state storage]

    def _state_keys(self, group: Dict[str, Any]) -> Tuple[Optional[str], ...]:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq" if group["amsgrad"] else None, "step")

    def _kernel_args(self, group: Dict[str, Any]) -> Dict[str, Any]:
        (beta1, _), lr = group["betas"], group["lr"]  # (unpacked as torch's step unpacks them)
        if isinstance(lr, Tensor) and group["foreach"] and not group["capturable"] and any(
                p.grad is not None for p in group["params"]):
            # (torch's foreach step checks it each step, for a group with grads; its
            # constructor too)
            raise RuntimeError("lr as a Tensor is not supported for capturable=False and "
                               "foreach=True")
        if not group["capturable"] and not group["fused"]:
            # (torch's for-loop and foreach step: step_size = lr / (1 - beta1 ** step))
            raise_as_torchs_host_division(group, self.state, beta1,
                                          lambda step: lr / (1 - beta1 ** step))
        return dict(
            **lr_args(group["lr"]),
            **betas_args(group),
            weight_decay=weight_decay_arg(group, group["decoupled_weight_decay"]),
            eps=group["eps"],
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
        )

    def _init_state(self, group: Dict[str, Any], p: Tensor, grad: Tensor, state: Dict[str, Any]) -> None:
        if grad.is_sparse:  # checked where torch checks it (every step), with its message
            raise RuntimeError(
                "Adam does not support sparse gradients, please consider SparseAdam instead"
            )
        if len(state) != 0:
            return
        if group["fused"]:  # (a complex param: torch's RuntimeError, as its state is made)
            _device_dtype_check_for_fused(p)
        # As torch.optim.Adam._init_group creates it (Note [state]).
        state["step"] = (
            torch.zeros((), dtype=_get_scalar_dtype(is_fused=group["fused"]), device=p.device)
            if group["capturable"] or group["fused"]
            else torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")
        )
        zeros_states(state, p, "exp_avg", "exp_avg_sq")
        if group["amsgrad"]:
            zeros_states(state, p, "max_exp_avg_sq")


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
            amsgrad=amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        self._fused_setup(max_grad_norm, grad_norm_type, master_weights=master_weights,
                          kahan_summation=kahan_summation,
                          stochastic_rounding=stochastic_rounding,
                          state_dtype=state_dtype)


# A subclass of our Adam as torch's AdamW is of its Adam (isinstance(opt, optim.Adam) holds
# for an AdamW after `import fused_optim as optim`, as with torch.optim), and of torch's
# AdamW, whose constructor it calls.
class AdamW(Adam, torch.optim.AdamW):
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
        max_grad_norm=None,
        grad_norm_type=2.0,
        master_weights=False,
        kahan_summation=False,
        stochastic_rounding=False,
        state_dtype=None,
    ):
        torch.optim.AdamW.__init__(
            self,
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
        self._fused_setup(max_grad_norm, grad_norm_type, master_weights=master_weights,
                          kahan_summation=kahan_summation,
                          stochastic_rounding=stochastic_rounding,
                          state_dtype=state_dtype)
