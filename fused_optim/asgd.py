"""ASGD: torch.optim.ASGD with the step computed by fused_optim::asgd_."""
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype, _to_scalar

from .optimizer import (FusedOptimizer, evaluate_host_term, is_numpy_scalar, lr_args, zeros_states,
                        weight_decay_arg)

__all__ = ["ASGD"]


class ASGD(FusedOptimizer, torch.optim.ASGD):
    __doc__ = torch.optim.ASGD.__doc__
    _torch_class = torch.optim.ASGD

    def __init__(
        self,
        params,
        lr=1e-2,
        lambd=1e-4,
        alpha=0.75,
        t0=1e6,
        weight_decay=0,
        foreach=None,
        maximize=False,
        differentiable=False,
        capturable=False,
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
            lambd=lambd,
            alpha=alpha,
            t0=t0,
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

    _op = "asgd_"
    _scalar_state_keys = ("eta", "mu")

    # Note [ASGD's scalar states on CUDA] (csrc/cuda/asgd.cu): the kernels compute eta and
    # mu on the host, from one copy of the call's steps, etas and mus (a synchronisation),
    # which a capturable group promises not to make: torch's step.
    _cuda_capturable = False

    def _state_keys(self, group: Dict[str, Any]) -> Tuple[Optional[str], ...]:
        return ("ax", "mu", "eta", "step")

    def _torch_step_reason(self) -> Optional[str]:
        reason = super()._torch_step_reason()
        if reason is None:
            for i, group in enumerate(self.param_groups):
                reason = self._numpy_scalar_reason(i, group)
                if reason is not None:
                    break
        return reason

    def _numpy_scalar_reason(self, i: int, group: Dict[str, Any]) -> Optional[str]:
        """Note [ASGD's NumPy hyper-parameters]
        torch's for-loop computes the new eta and mu as Python numbers, `lr / ((1 + lambd *
        lr * step) ** alpha)` and `1 / max(1, step - t0)`, and copies torch.as_tensor(value)
        into its states. A Python float makes a tensor of the default dtype (the kernels
        round to it, then to the state's dtype); a NumPy scalar among lr, lambd, alpha or
        t0 makes the value a NumPy scalar and the tensor its dtype: a float64 one keeps
        every bit where eta and mu are float64 (after load_state_dict with float64 params,
        as a LambdaLR whose lambda returns np.cos(...) leaves the lr), and NumPy's float32
        computes in float32 (lambd's `1 - lambd * eta` too). Such a group makes the step
        torch's own (found by a differential fuzz, 2026-12-07), except:
        - NumPy float64 values under a float64 default dtype (both tensors are float64), or
          under a float32 one with every eta and mu float32 (new ones are): the same bits;
        - where torch's step is not the for-loop (foreach=True, or CUDA params, where
          foreach=None means it: tensor arithmetic), where a param storage mode or
          state_dtype keeps the params otherwise anyway (which torch's step cannot keep):
          the kernels, with the values rounded as a Python float's (docs/parity.md).
        step_in_backward refuses the others with its error (it needs the kernels). Under
        torch.compile a NumPy scalar is traced as an array: torch's step (before, the op
        refused the traced lr)."""
        keys = [k for k in ("lr", "lambd", "alpha", "t0") if is_numpy_scalar(group[k])]
        if not keys or group["foreach"] or getattr(self, "_param_mode", 0) or \
                getattr(self, "_state_dtype", None) is not None:
            return None
        if any(p.device.type != "cpu" for p in group["params"]):
            return None
        default = torch.get_default_dtype()
        if all(type(group[k]).__name__ == "float64" for k in keys) and (
                default == torch.float64 or (default == torch.float32 and all(
                    state[k].dtype == default for p in group["params"]
                    if (state := self.state.get(p)) for k in ("eta", "mu") if k in state))):
            return None
        return (f"{keys[0]} given as a NumPy {type(group[keys[0]]).__name__} in param group {i} "
                "(torch's ASGD computes eta and mu in its type)")

    def _torch_lookup_keys(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        # (torch looks mu up before ax)
        return ("mu", "ax", "eta", "step")

    def _kernel_args(self, group: Dict[str, Any]) -> Dict[str, Any]:
        lr, lambd, alpha = group["lr"], group["lambd"], group["alpha"]
        if (not group["capturable"] and not group["foreach"]
                and not any(isinstance(v, Tensor) for v in (lr, lambd, alpha))
                and (lambd * lr < 0 or alpha < 0)
                and all(p.device.type == "cpu" for p in group["params"])):
            # torch's for-loop (on the CPU, where foreach=None means it) computes eta = lr /
            # ((1 + lambd * lr * step) ** alpha) as Python numbers: a negative lambd (which
            # its constructor accepts) can make the base 0, a large negative alpha (which it
            # does not check) the power 0, and it raises ZeroDivisionError (with the param
            # updated, its step counted); ours raises it before anything changes (the
            # second since 2026-12-06: a review found infinities written). (A lambd * lr >= 0
            # with alpha >= 0 keeps the power at 1 or more: nothing to evaluate; torch's
            # foreach step computes on tensors, and does not raise.)
            evaluate_host_term(group, self.state,
                               lambda step: lr / ((1 + lambd * lr * step) ** alpha))
        return dict(
            **lr_args(group["lr"]),
            lambd=group["lambd"],
            alpha=group["alpha"],
            t0=group["t0"],
            weight_decay=weight_decay_arg(group),
            maximize=group["maximize"],
        )

    def _init_state(self, group: Dict[str, Any], p: Tensor, grad: Tensor, state: Dict[str, Any]) -> None:
        if grad.is_sparse:  # checked where torch checks it, with torch's message
            raise RuntimeError("ASGD does not support sparse gradients")
        if len(state) == 0:
            # As torch.optim.ASGD._init_group creates it (Note [state]): on the param's
            # device, capturable or not.
            state["step"] = torch.zeros((), device=p.device, dtype=_get_scalar_dtype())
            state["eta"] = (
                torch.as_tensor(_to_scalar(group["lr"]), device=p.device, dtype=_get_scalar_dtype())
                .clone()
                .detach()
            )
            state["mu"] = torch.ones((), device=p.device, dtype=_get_scalar_dtype())
            zeros_states(state, p, "ax")
