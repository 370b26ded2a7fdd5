"""Gradient clipping by global norm: torch.nn.utils.clip_grad_norm_, get_total_norm and
clip_grads_with_norm_, with the norms in one multi-tensor pass and the multiply in one
parallel region (csrc/cpu/grad_norm.cpp).

Same signatures, return values, errors and results as torch's: the norm of each CPU grad
is computed in the order torch's kernel uses (Note [global norm]), for every norm type
torch takes (2, inf, -inf, 0, 1 and any other p), so the total norm and the clipped grads
are bitwise torch's. What the CPU kernels do not take (CUDA tensors, DTensors and other
subclasses, complex grads, a step being compiled) runs torch's own implementation: under
torch.compile silently (torch's code is what gets traced), otherwise with a one-time
warning.
"""
import math
import numbers
import types
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from . import _C
from ._ops import bump_versions, param_list
from ._warnings import warn

__all__ = ["clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_"]

_tensor_or_tensors = Union[Tensor, Iterable[Tensor]]
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_warned: set = set()


def _why_torch(tensors: List[Tensor]) -> Optional[str]:
    """Why these tensors go to torch's own implementation, or None."""
    if torch.compiler.is_compiling():
        return ""  # torch's code is traced: nothing to warn about
    for t in tensors:
        if type(t) is not Tensor and type(t) is not torch.nn.Parameter:
            return f"{type(t).__name__} grads"
        if t.device.type != "cpu":
            return f"{t.device.type} grads"
        if t.layout != torch.strided:
            return f"{t.layout} grads"
        if t.dtype not in _KERNEL_DTYPES:
            return f"{t.dtype} grads"
    return None


def _kernel_norm() -> bool:
    """Whether the kernels compute the norms: in eager mode (every norm type)."""
    return not torch.compiler.is_compiling()


def _warn_once(function: str, reason: str, torch_function: Optional[str] = None) -> None:
    """The one-time warning that torch's implementation runs, for `function` (what the user
    called) and `reason`. Recorded once given (where warnings are errors, the call raises
    it with nothing done, and again at the next call: never silent)."""
    key = (function, reason)
    if reason and key not in _warned:
        warn(f"{function}: the fused kernels do not support {reason}; running "
             f"{torch_function or 'torch.nn.utils.' + function.rsplit('.', 1)[-1]}'s "
             "implementation instead.")
        _warned.add(key)


def _norms_by_group(tensors: List[Tensor], norm_type: float, inv_scale: float = 1.0) -> Tensor:
    """The norm of each tensor, as one vector in the order torch's _get_total_norm stacks
    them (grouped by device and dtype, groups in order of first appearance)."""
    first = tensors[0].dtype
    if all(t.dtype is first for t in tensors):  # one group: no regrouping to do
        return torch.ops.fused_optim._norms(tensors, norm_type, inv_scale)
    grouped = _group_tensors_by_device_and_dtype([tensors])
    return torch.cat([torch.ops.fused_optim._norms(group, norm_type, inv_scale)
                      for (_, _), ([group], _) in grouped.items()])


def _nonfinite_error(total_norm: Tensor, norm_type: float) -> None:
    if torch.logical_or(total_norm.isnan(), total_norm.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )


@torch.no_grad()
def get_total_norm(
    tensors: _tensor_or_tensors,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
) -> Tensor:
    r"""The norm of an iterable of tensors, as :func:`torch.nn.utils.get_total_norm`
    computes it (the norm of the tensors' norms), bitwise, with the norms in one pass."""
    if isinstance(tensors, Tensor):
        tensors = [tensors]
    else:
        tensors = list(tensors)
    norm_type = float(norm_type)
    reason = _why_torch(tensors) if tensors else None
    if reason is not None:
        _warn_once("fused_optim.get_total_norm", reason)
        return torch.nn.utils.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
    if len(tensors) == 0:
        return torch.tensor(0.0)
    _per_tensor_errors(tensors, norm_type, foreach)
    total_norm = torch.linalg.vector_norm(_norms_by_group(tensors, norm_type), norm_type)
    if error_if_nonfinite:
        _nonfinite_error(total_norm, norm_type)
    return total_norm


_HALF_DTYPES = (torch.bfloat16, torch.float16)


def _per_tensor_errors(tensors: List[Tensor], norm_type: float, foreach: Optional[bool]) -> None:
    """With foreach=False torch takes each tensor's norm with torch.linalg.vector_norm (on
    the CPU foreach=None and True take torch._foreach_norm, as our kernel does), and so
    with foreach=None where a tensor is not a plain Tensor (an nn.Parameter: torch's
    _has_foreach_support): a norm type with no identity (inf, -inf, negative p) of an empty
    tensor then raises linalg.vector_norm's error, not _foreach_norm's."""
    per_tensor = foreach is False or (
        foreach is None and any(type(t) is not Tensor for t in tensors))
    if per_tensor and (norm_type == math.inf or norm_type < 0):
        for t in tensors:
            if t.numel() == 0:
                torch.linalg.vector_norm(t, norm_type)  # raises torch's error


def _clip_coef(max_norm: float, total_norm: Tensor) -> Tensor:
    """min(max_norm / (total_norm + 1e-6), 1), with torch's tensor ops (so its bits)."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def _mul_grads_(grads: List[Tensor], scalar: Tensor) -> None:
    """grads *= scalar (a CPU 0-dim tensor), as torch._foreach_mul_ would, group by dtype."""
    first = grads[0].dtype
    if all(g.dtype is first for g in grads):
        torch.ops.fused_optim._mul_(grads, scalar)
        return
    for (_, _), ([group], _) in _group_tensors_by_device_and_dtype([grads]).items():
        torch.ops.fused_optim._mul_(group, scalar)


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: _tensor_or_tensors,
    max_norm: float,
    total_norm: Tensor,
    foreach: Optional[bool] = None,
) -> None:
    r"""Scales the grads of ``parameters`` by ``min(max_norm / (total_norm + 1e-6), 1)`` in
    place, as :func:`torch.nn.utils.clip_grads_with_norm_` does, bitwise."""
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    else:
        parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    reason = _why_torch(grads) if grads else None
    if reason is None and (type(total_norm) is not Tensor or total_norm.device.type != "cpu"):
        reason = "total norms off the CPU"
    elif reason is None and total_norm.dim() != 0:
        # (torch's multiply by a coefficient of that shape raises, or broadcasts: its own)
        reason = f"a total_norm of {total_norm.dim()} dims"
    if reason is not None:
        _warn_once("fused_optim.clip_grads_with_norm_", reason)
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
        return
    max_norm = float(max_norm)
    if len(grads) == 0:
        return
    # (a product by exactly 1 is skipped, after its checks: Note [clipping's multiply] in
    # csrc/cpu/grad_norm.cpp; the grads count a write either way)
    _mul_grads_(grads, _clip_coef(max_norm, total_norm))
    bump_versions(grads)


@torch.no_grad()
def clip_grad_norm_(
    parameters: _tensor_or_tensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
) -> Tensor:
    r"""Clips the gradient norm of an iterable of parameters, as
    :func:`torch.nn.utils.clip_grad_norm_` does (same arguments, errors, return value and
    results, bitwise), with the norms in one multi-tensor pass and the scaling in one
    parallel region.

    Args:
        parameters (Iterable[Tensor] or Tensor): the tensors whose grads are clipped
        max_norm (float): max norm of the gradients
        norm_type (float, optional): type of the used p-norm. Can be ``'inf'`` for
            infinity norm. Default: 2.0
        error_if_nonfinite (bool, optional): if True, an error is thrown if the total
            norm of the gradients from :attr:`parameters` is ``nan``,
            ``inf``, or ``-inf``. Default: False
        foreach (bool, optional): accepted for torch's signature; the kernels compute the
            same values either way. Default: None

    Returns:
        Total norm of the parameter gradients (viewed as a single vector).
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and len(parameters) == 0:
            warn("`parameters` is an empty generator, no gradient clipping will occur.")
    try:
        norm_type = float(norm_type)
    except Exception:
        # torch reads every param's .grad before it converts norm_type: an entry with no
        # .grad (None, say) raises its AttributeError first, whatever float() raises
        # (found by a differential fuzz, 2026-12-07)
        for p in parameters:
            p.grad  # noqa: B018
        raise
    if foreach is False:
        _per_tensor_errors([p.grad for p in parameters if p.grad is not None], norm_type, foreach)
    if _kernel_norm():
        # The fast path (Note [clipping's fast path] in csrc/python_step.cpp).
        norms = _C._grad_norms([parameters], norm_type, 1.0)
        if norms is not None:
            if norms.numel() == 0:
                float(max_norm)  # (torch's clip_grads_with_norm_ converts it first: its error)
                return torch.tensor(0.0)
            total_norm = torch.linalg.vector_norm(norms, norm_type)
            if error_if_nonfinite:
                _nonfinite_error(total_norm, norm_type)
            coef = _clip_coef(float(max_norm), total_norm)
            # (skips a product by exactly 1 after its checks, as clip_grads_with_norm_ does)
            _C._mul_grads_([parameters], coef)
            return total_norm
    grads = [p.grad for p in parameters if p.grad is not None]
    reason = _why_torch(grads) if grads else None
    if reason is not None:
        _warn_once("fused_optim.clip_grad_norm_", reason)
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type,
                                              error_if_nonfinite, foreach)
    total_norm = get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
    clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
    return total_norm


def clip_options(max_grad_norm: object, grad_norm_type: object) -> Tuple[Optional[float], float]:
    """The optimizer's clipping options checked and as floats: at construction, and at each
    step that clips, since they are attributes a user may set between steps (a max norm set
    to 0, a negative or NaN one zeroed, flipped or poisoned the grads: found by a review,
    2026-12-06). Raises before anything changes."""
    if isinstance(grad_norm_type, str):  # ('inf', as torch's clip_grad_norm_ takes it)
        try:
            grad_norm_type = float(grad_norm_type)
        except ValueError:
            raise TypeError(f"grad_norm_type must be a number, got {grad_norm_type!r}") from None
    for name, value, allowed in (("max_grad_norm", max_grad_norm, "a positive number or None"),
                                 ("grad_norm_type", grad_norm_type, "a number")):
        if value is None and name == "max_grad_norm":
            continue
        if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be {allowed}, got {value!r}")
    if max_grad_norm is not None and not float(max_grad_norm) > 0.0:  # (NaN too)
        raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
    return (None if max_grad_norm is None else float(max_grad_norm)), float(grad_norm_type)


def clip_in_step(optimizer, grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
                 fold: bool) -> Tuple[List[Optional[Tensor]], Tensor]:
    """Note [clipping in the step]
    An optimizer made with max_grad_norm clips the grads of all its groups by their global
    norm inside step(). The result is bitwise that of torch's recipe, GradScaler.unscale_
    (when a scaler drives the step), clip_grad_norm_, then the step:

    * the norm is of the unscaled grads: the norm kernel multiplies each grad by the
      scaler's 1/scale (as unscale_ computes it) and rounds to the grad's dtype before
      squaring; so nothing is written before the step;
    * where clipping changes nothing (the coefficient is 1), the step runs as without it;
    * otherwise, for a group whose grads are all float32 (`fold`: our kernel runs its
      step), the coefficient goes into the kernel as a scaler's scale does: the kernel
      multiplies each grad by one float32 factor, 1/scale times the coefficient (exact
      when the scale is a power of two, as GradScaler's always are), and stores it back,
      as torch's recipe leaves the grads. So unscaling, clipping and the update are one
      pass over the grads, and the norm another;
    * any other group (float64 and 16-bit grads, which torch's recipe rounds in between;
      a scale that is not a power of two; a step that runs torch's implementation) has its
      grads unscaled and clipped in place first (fused_optim's _mul_, or torch's own
      functions for what the kernels do not take), then steps without the scale.

    Returns each group's grad_scale for the kernel (None: the grads are already unscaled,
    or there is no scaler), and the total norm."""
    groups = optimizer.param_groups
    max_norm, norm_type = clip_options(optimizer.max_grad_norm, optimizer.grad_norm_type)
    # 1/scale as GradScaler.unscale_ computes it.
    inv = None if grad_scale is None else grad_scale.double().reciprocal().float()
    inv_value = 1.0 if inv is None or inv.device.type != "cpu" else inv.item()
    if _kernel_norm() and (inv is None or inv.device.type == "cpu"):
        # The fast path (Note [clipping's fast path] in csrc/python_step.cpp): every grad of
        # one dtype, dense, on the CPU.
        param_lists = [param_list(group) for group in groups]
        norms = _C._grad_norms(param_lists, norm_type, inv_value)
        if norms is not None:
            if norms.numel() == 0:
                return [grad_scale] * len(groups), torch.tensor(0.0)
            total = torch.linalg.vector_norm(norms, norm_type)
            coef = _clip_coef(max_norm, total)
            c = coef.item()
            if found_inf is not None and found_inf.item() != 0:
                return [grad_scale] * len(groups), total
            if c == 1.0:
                if inv is not None and norms.dtype in _HALF_DTYPES and not _power_of_two(inv):
                    # unscale_ rounds each grad to 16 bits, which the kernel's unscaling
                    # does not; exact anyway for a power-of-two scale
                    _C._mul_grads_(param_lists, inv)
                    return [None] * len(groups), total
                return [grad_scale] * len(groups), total
            folded = (_folded_scale(c, inv_value) if fold and norms.dtype == torch.float32
                      and (inv is None or _power_of_two(inv)) else None)
            if folded is not None:
                return [folded] * len(groups), total
            if inv is not None:
                _C._mul_grads_(param_lists, inv)
            _C._mul_grads_(param_lists, coef)
            return [None] * len(groups), total
    # The general path: grads of several dtypes, or what the kernels do not take.
    group_grads = [[p.grad for p in group["params"] if p.grad is not None] for group in groups]
    grads = [g for gs in group_grads for g in gs]
    unchanged = [grad_scale] * len(groups)
    if not grads:
        return unchanged, torch.tensor(0.0)
    reason = _why_torch(grads)
    if reason is not None or (inv is not None and inv.device.type != "cpu"):
        # torch's recipe itself: unscale_ (GradScaler's op), clip_grad_norm_, a step
        # without the scale.
        _warn_once(f"fused_optim.{type(optimizer).__name__}(max_grad_norm=...)",
                   "GradScalers off the CPU" if reason is None else reason,
                   "torch.nn.utils.get_total_norm and clip_grads_with_norm_")
        if inv is not None:
            for (device, _), ([group], _) in _group_tensors_by_device_and_dtype([grads]).items():
                torch._amp_foreach_non_finite_check_and_unscale_(
                    group, torch.zeros(1, device=device), inv.to(device))
        total = torch.nn.utils.get_total_norm(grads, norm_type)
        torch.nn.utils.clip_grads_with_norm_(grads_params(groups), max_norm, total)
        return [None] * len(groups), total
    total = torch.linalg.vector_norm(_norms_by_group(grads, norm_type, inv_value), norm_type)
    coef = _clip_coef(max_norm, total)
    c = coef.item()
    if found_inf is not None and found_inf.item() != 0:
        return unchanged, total  # the kernel skips the step and writes nothing
    power_of_two = inv is None or _power_of_two(inv)
    if c == 1.0:
        if power_of_two:
            return unchanged, total
        # unscale_ rounds 16-bit grads to their dtype, which the kernel's unscaling does not
        scales = []
        for gs in group_grads:
            if any(g.dtype in _HALF_DTYPES for g in gs):
                _mul_grads_(gs, inv)
                scales.append(None)
            else:
                scales.append(grad_scale)
        return scales, total
    folded = _folded_scale(c, inv_value) if fold and power_of_two else None
    scales: List[Optional[Tensor]] = []
    for gs in group_grads:
        if not gs:
            scales.append(grad_scale)
        elif folded is not None and all(g.dtype is torch.float32 for g in gs) and (
                coef.dtype is torch.float32 or all(g.dim() > 0 for g in gs)):
            # (a float64 coefficient times a 0-dim float32 grad is a float64 product in
            # torch's recipe: such a group is multiplied in place below)
            scales.append(folded)
        else:
            if inv is not None:
                _mul_grads_(gs, inv)
            _mul_grads_(gs, coef)
            scales.append(None)
    return scales, total


def _power_of_two(x: Tensor) -> bool:
    return torch.frexp(x)[0].item() == 0.5


_FLOAT32_TINY = torch.finfo(torch.float32).tiny  # (2^-126, the smallest normal)


def _folded_scale(coef: float, inv_scale: float) -> Optional[Tensor]:
    """The grad_scale that makes the kernel multiply each grad by the clip coefficient
    (rounded to float32, as torch multiplies float32 grads by it) times 1/scale: exact for a
    power-of-two scale. The kernel's factor is 1 / grad_scale, computed in float64 and
    rounded to float32, so a float64 scale gives the float32 factor back exactly.

    None where no scale gives that factor: it is 0 (an infinite norm makes the coefficient
    0, as does one that underflows float32) or NaN (a NaN norm); or where the factor is
    not the exact product, a subnormal (a tiny max_grad_norm under a large scale: the
    recipe's two multiplies round once, found by a differential fuzz, 2026-12-07). The
    caller then multiplies the grads in place, as torch's recipe does (0 * inf is NaN there
    too)."""
    factor = (torch.tensor(coef, dtype=torch.float32)
              * torch.tensor(inv_scale, dtype=torch.float32)).item()
    if not abs(factor) >= _FLOAT32_TINY or not math.isfinite(factor):
        return None
    return torch.tensor(1.0 / factor, dtype=torch.float64)


def grads_params(groups: List[Dict]) -> List[Tensor]:
    """Every param of the groups that has a grad."""
    return [p for group in groups for p in group["params"] if p.grad is not None]
