"""Adafactor: torch.optim.Adafactor with the step computed by fused_optim::adafactor_."""
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from . import _ops, quantization
from .optimizer import FusedOptimizer, evaluate_host_term, lr_args

__all__ = ["Adafactor"]


class Adafactor(FusedOptimizer, torch.optim.Adafactor):
    __doc__ = torch.optim.Adafactor.__doc__
    _torch_class = torch.optim.Adafactor

    def __init__(
        self,
        params,
        lr=1e-2,
        beta2_decay=-0.8,
        eps=(None, 1e-3),
        d=1.0,
        weight_decay=0.0,
        *,
        foreach=None,
        maximize=False,
        max_grad_norm=None,
        grad_norm_type=2.0,
    ):
        super().__init__(
            params,
            lr=lr,
            beta2_decay=beta2_decay,
            eps=eps,
            d=d,
            weight_decay=weight_decay,
            foreach=foreach,
            maximize=maximize,
        )
        self._fused_setup(max_grad_norm, grad_norm_type)

    _op = "adafactor_"
    # Note [Adafactor's state lists]
    # A param has either row_var and col_var (2+ dims) or variance (fewer), so the kernel's
    # state lists are not one entry per param: row_vars and col_vars hold the entries of
    # the params of 2+ dims, variances those of the others, each in param order. The eager
    # fast path (_C._step) gathers one entry per param and key, so Adafactor takes the
    # general path (_update_group below), which costs a Python loop over the params.
    _fast_path = False

    _torch_looks_up_state = False  # (_torch_lookup_keys)

    def _state_keys(self, group: Dict[str, Any]) -> Tuple[Optional[str], ...]:
        return ("row_var", "col_var", "variance", "step")

    _refuses_complex = True  # (_init_state)

    def _torch_grads_reason(self) -> Optional[str]:
        # (asked before every general-path step, before anything changes) A sharded param's
        # update needs its RMS and its row and column means over the whole param, which a
        # rank's shard (what the kernel sees of a DTensor) does not have.
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is not None and quantization.is_dtensor(p):
                    raise RuntimeError(
                        "fused_optim.Adafactor does not support sharded (DTensor) params "
                        f"(FSDP2; param {i} of its group is one): the update scales by each "
                        "param's RMS and factors its row and column means, over the whole "
                        "param (torch.optim.Adafactor does not take DTensors either)")
        return super()._torch_grads_reason()

    def _torch_step_reason(self) -> Optional[str]:
        reason = super()._torch_step_reason()
        if reason is not None or torch.compiler.is_compiling():
            return reason
        # torch's for-loop computes row_var @ col_var (the factored variance) with a matmul,
        # which autocast runs in its lower dtype (and the update after it follows); the
        # kernel computes it in float32. Found by a review, 2026-12-06: a step inside
        # `torch.autocast("cpu")` differed from torch's by 2e-4.
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device) and any(
                    p.device.type == device for g in self.param_groups for p in g["params"]
                    if p.grad is not None and p.dim() > 1):
                return (f"step() inside torch.autocast('{device}') (torch's Adafactor computes "
                        f"its factored variance with a matmul, which autocast runs in "
                        f"{torch.get_autocast_dtype(device)})")
        return None

    def _whole_group_reason(self) -> Optional[str]:
        # eps1=None is the eps of the dtype of the group's first param with a grad (below)
        for i, group in enumerate(self.param_groups):
            eps = group["eps"]
            if isinstance(eps, (tuple, list)) and eps and eps[0] is None \
                    and len({p.dtype for p in group["params"]}) > 1:
                return (f"Adafactor with eps=(None, ...) in param group {i}, whose params have "
                        "several dtypes, takes eps1 from the dtype of the group's first param "
                        "with a grad (give eps1, or put the params of each dtype in a group of "
                        "their own)")
        return None

    def _kernel_args(self, group: Dict[str, Any]) -> Dict[str, Any]:
        eps1, eps2 = group["eps"]  # torch's step unpacks it first: its ValueError
        if eps1 is None:
            # torch.finfo(param.dtype).eps of the group's first param with a grad, for all
            # its params (torch's for-loop assigns it once), whichever device each is on:
            # a group on several devices makes one kernel call per device.
            first = next((p for p in group["params"] if p.grad is not None), None)
            if first is not None and first.is_floating_point():
                eps1 = torch.finfo(first.dtype).eps
        beta2_decay, d = group["beta2_decay"], group["d"]
        # torch's for-loop computes step ** beta2_decay, and divides the update's norm by
        # numel ** 0.5 * d, as Python floats: a beta2_decay > 0 or a d of 0 (the constructor
        # refuses both; a group added or changed since can have them) can make it raise
        # OverflowError or ZeroDivisionError, after updating the params before. Ours raises
        # the same before anything changes (the kernel's pow and division gave inf: NaN
        # params, or params that never moved; found by a review, 2026-12-06). NumPy numbers
        # and tensors compute without raising, in torch's step and here.
        overflow = not isinstance(beta2_decay, Tensor) and beta2_decay > 0
        zero_d = not isinstance(d, Tensor) and d == 0
        if overflow or zero_d:
            # (torch's _init_group checks of this group's params and of the groups before
            # come first in its step: their errors first)
            for earlier in self.param_groups:
                for p in earlier["params"]:
                    if p.grad is not None:
                        self._init_checks(p, p.grad)
                if earlier is group:
                    break
        if overflow:
            evaluate_host_term(group, self.state, lambda step: step ** beta2_decay)
        if zero_d:
            evaluate_host_term(group, self.state, lambda step: 0.0 / (1.0 * d))
        return dict(
            **lr_args(group["lr"]),
            beta2_decay=beta2_decay,
            eps1=eps1,
            eps2=eps2,
            d=d,
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
        )

    @staticmethod
    def _init_checks(p: Tensor, grad: Tensor) -> None:
        # torch's _init_group checks these for every param with a grad, in this order.
        if torch.is_complex(p):
            raise RuntimeError("Adafactor does not support complex parameters")
        if grad.is_sparse:
            raise RuntimeError("Adafactor does not support sparse gradients")

    def _init_state(self, group: Dict[str, Any], p: Tensor, grad: Tensor, state: Dict[str, Any]) -> None:
        self._init_checks(p, grad)
        if len(state) == 0:
            # As torch.optim.Adafactor._init_group creates it (Note [state]): from the grad.
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            if grad.dim() > 1:
                row_shape = list(grad.shape)
                row_shape[-1] = 1
                state["row_var"] = grad.new_zeros(row_shape)
                col_shape = list(grad.shape)
                col_shape[-2] = 1
                state["col_var"] = grad.new_zeros(col_shape)
            else:
                state["variance"] = torch.zeros_like(grad, memory_format=torch.preserve_format)

    def _update_group(
        self,
        group: Dict[str, Any],
        params: List[Tensor],
        grads: List[Tensor],
        keys: Tuple[Optional[str], ...],
        args: Tuple[Any, ...],
    ) -> None:
        lists, empty, devices = self._gather(group, params, grads)
        if empty:
            # torch's for-loop divides the param's norm by numel ** 0.5 (after updating
            # the params before it); we raise its error before changing anything.
            raise ZeroDivisionError("float division by zero")
        if len(devices) == 1:
            _ops.call(self._op, params, grads, lists, args)
            return
        # One kernel call per device (Note [Adafactor's state lists]: _ops.call's split by
        # device assumes lists of one entry per param).
        for device in devices:
            indices = [i for i, p in enumerate(params) if p.device == device]
            ps, gs = [params[i] for i in indices], [grads[i] for i in indices]
            _ops.call(self._op, ps, gs, self._gather(group, ps, gs)[0], args)

    def _gather(self, group: Dict[str, Any], params: List[Tensor], grads: List[Tensor]):
        """Creates missing state (torch's _init_group) and gathers the kernel's state lists in
        one pass over the params: row_vars and col_vars of the params of 2+ dims, variances of
        the others, every param's step. Also whether a param is empty, and the devices in
        order of first appearance."""
        rows: List[Tensor] = []
        cols: List[Tensor] = []
        variances: List[Tensor] = []
        steps: List[Tensor] = []
        devices: Dict[torch.device, None] = {}
        empty = False
        for p, g in zip(params, grads):
            s = self._checked_state(group, p, g)
            if p.dim() > 1:
                rows.append(s["row_var"])
                cols.append(s["col_var"])
            else:
                variances.append(s["variance"])
            steps.append(s["step"])
            empty = empty or p.numel() == 0
            devices[p.device] = None
        return (rows, cols, variances, steps), empty, list(devices)
