"""SGD: torch.optim.SGD with the step computed by fused_optim::sgd_."""
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import _ops, quantization
from .optimizer import C10_NAMES, FusedOptimizer, _StateArena, lr_args, weight_decay_arg

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
        state_dtype=None,
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
                          stochastic_rounding=stochastic_rounding,
                          state_dtype=state_dtype)

    def _torch_grads_reason(self) -> Optional[str]:
        reason = super()._torch_grads_reason()
        if reason is None:
            group = self._sparse_grad_group()
            if group is not None:
                if group["fused"]:
                    # torch's fused SGD refuses them (before any param changes)
                    raise RuntimeError("`_fused_sgd` does not support sparse gradients")
                # torch's for-loop handles sparse grads.
                return "sparse gradients"
            # A momentum_buffer made by a step with a sparse grad is sparse (torch's for-loop
            # clones the grad): torch's step raises its own error when a dense grad meets
            # it (the kernels, a dispatcher's NotImplementedError; found by a fuzz,
            # 2026-12-07).
            state = self.state
            for group in self.param_groups:
                if group["momentum"] != 0:
                    for p in group["params"]:
                        buf = state[p].get("momentum_buffer") if p in state else None
                        if isinstance(buf, Tensor) and buf.is_sparse and p.grad is not None:
                            return "a sparse momentum_buffer (made by a step with sparse gradients)"
        return reason

    _checks_fused_once = True

    @staticmethod
    def _fused_complex_error(p: Tensor) -> Exception:
        # torch's fused SGD kernel has no complex dtypes: its dispatcher's error.
        return NotImplementedError(
            f'"fused_sgd_kernel" not implemented for \'{C10_NAMES[p.dtype]}\'')

    _op = "sgd_"
    _moment_keys = ("momentum_buffer",)  # Note [state storage]

    _torch_looks_up_state = False  # (_torch_lookup_keys)

    def _state_keys(self, group: Dict[str, Any]) -> Tuple[Optional[str], ...]:
        return ("momentum_buffer" if group["momentum"] != 0 else None,)

    def _kernel_args(self, group: Dict[str, Any], is_first_step: bool = False) -> Dict[str, Any]:
        return dict(
            **lr_args(group["lr"]),
            momentum=group["momentum"],
            dampening=group["dampening"],
            weight_decay=weight_decay_arg(group),
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
        # Note [param storage]: the mode's buffers (made where missing), after the lists;
        # then, with 8-bit momentum, its scales (Note [state storage]).
        storage = getattr(self, "_param_mode", 0)
        pending: List[Tuple[Tensor, Tensor]] = []
        aux = [self._kernel_storage(p, self._init_storage(p, state[p]), pending)
               for p in params] if storage else []
        if group["momentum"] == 0:
            _ops.call(self._op, params, grads, [[]] + ([aux] if storage else []), args)
            self._storage_done(pending)
            return
        state_dtype = getattr(self, "_state_dtype", None)
        quantized = state_dtype is torch.uint8
        # torch creates momentum_buffer on a param's first step as a copy of its grad
        # (after weight decay); the kernel does that copy when is_first_step is set.
        # Each: params, grads, buffers, the mode's buffers, the buffers' scales.
        old, new = ([], [], [], [], []), ([], [], [], [], [])
        for i, (p, g) in enumerate(zip(params, grads)):
            s = state[p]
            if state_dtype is not None:
                self._convert_moments(p, s)
            buf = s.get("momentum_buffer")
            if buf is None:
                buf, scales = self._new_buffer(p, g)
                lists = new
            else:
                scales = s.get("momentum_buffer_absmax")
                lists = old
            lists[0].append(p)
            lists[1].append(g)
            lists[2].append(buf)
            lists[3].append(aux[i] if storage else None)
            lists[4].append(scales)

        def tail(lists):
            # (a DTensor's scales as the kernel takes them: Note [8-bit DTensors])
            scales = [quantization.kernel_scales(sc, buf) if sc is not None else sc
                      for sc, buf in zip(lists[4], lists[2])] if quantized else None
            return ([lists[3]] if storage else []) + ([scales] if quantized else [])

        if old[0]:
            _ops.call(self._op, old[0], old[1], [old[2]] + tail(old), args)
        if new[0]:
            grad_scale, found_inf = _ops.scaler_args(self._op, args)
            first = _ops.schema_args(self._op, self._step_kwargs(group, is_first_step=True),
                                     grad_scale, found_inf)
            _ops.call(self._op, new[0], new[1], [new[2]] + tail(new), first)
            if found_inf is None or found_inf.item() == 0:
                for p, buf, scales in zip(new[0], new[2], new[4]):
                    state[p]["momentum_buffer"] = buf
                    if quantized:
                        state[p]["momentum_buffer_absmax"] = scales
        self._storage_done(pending)

    def _new_buffer(self, p: Tensor, g: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """A momentum_buffer for the kernel's first step to fill: like the grad, or in
        state_dtype's form (Note [state storage]), with its scales where 8-bit."""
        dtype = self._moment_dtype(p) if getattr(self, "_state_dtype", None) else None
        if dtype is torch.uint8:
            if quantization.is_dtensor(p):  # laid out shard by shard (Note [8-bit DTensors])
                return quantization.quantize(torch.zeros_like(p, dtype=torch.float32))
            return quantization.zeros(p)
        # (side by side with the other new buffers where the grad is laid out as its param,
        # as the buffer must be: Note [small states side by side])
        buf = _StateArena.zeros_like(p, "momentum_buffer") if (
            dtype is None and g.shape == p.shape and g.stride() == p.stride()) else None
        if buf is None:
            buf = torch.zeros_like(g, dtype=dtype, memory_format=torch.preserve_format)
        return buf, (torch.zeros(0, dtype=torch.float32, device=p.device) if self._state_dtype is torch.uint8 else None)
