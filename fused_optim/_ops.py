"""Typed wrappers over torch.ops.fused_optim.*, and their fake (meta) kernels.

The schemas are in csrc/ops.cpp. The ops mutate their tensor-list arguments in place and
return nothing, so a fake kernel has nothing to compute: registering it is what lets
torch.compile trace through an optimizer step without a graph break.
"""
import sys
from typing import List, Optional

import torch
from torch import Tensor

_lib = torch.ops.fused_optim


def _local(*lists: List[Tensor]):
    """The tensors the kernels update: a DTensor (FSDP2's sharded params, their grads and
    states) is replaced by its local shard, which the kernel updates in place, with no
    gather. Costs nothing where torch.distributed.tensor was never imported, and little
    where it was (torch.optim.Optimizer's constructor imports it): one C-speed scan of the
    types of params and grads."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is None:
        return lists
    cls = dtensor.DTensor
    params, grads = lists[0], lists[1]
    kinds = set(map(type, params))
    kinds.update(map(type, grads))
    if not any(issubclass(k, cls) for k in kinds):
        return lists
    for p, g in zip(params, grads):
        if isinstance(p, cls) or isinstance(g, cls):
            # An elementwise update of local shards is right only where every tensor of a
            # param is laid out across ranks the same way (FSDP2: Shard(0) everywhere).
            same = isinstance(p, cls) and isinstance(g, cls) and p.placements == g.placements
            if not same or p.device_mesh != g.device_mesh:
                raise RuntimeError(
                    "fused_optim: a DTensor param and its grad must have the same device mesh "
                    f"and placements, got {getattr(p, 'placements', 'a plain tensor')} and "
                    f"{getattr(g, 'placements', 'a plain tensor')}")
    return tuple([t._local_tensor if isinstance(t, cls) else t for t in ts] for ts in lists)


def sgd_(
    params: List[Tensor],
    grads: List[Tensor],
    momentum_buffers: List[Tensor],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    lr_tensor: Optional[Tensor] = None,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    params, grads, momentum_buffers = _local(params, grads, momentum_buffers)
    _lib.sgd_(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
              maximize, is_first_step, lr_tensor, grad_scale, found_inf)


def adam_(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    max_exp_avg_sqs: List[Tensor],
    state_steps: List[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    lr_tensor: Optional[Tensor] = None,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = _local(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
    _lib.adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1,
               beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, lr_tensor,
               grad_scale, found_inf)


def rmsprop_(
    params: List[Tensor],
    grads: List[Tensor],
    square_avgs: List[Tensor],
    grad_avgs: List[Tensor],
    momentum_buffers: List[Tensor],
    state_steps: List[Tensor],
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    lr_tensor: Optional[Tensor] = None,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    params, grads, square_avgs, grad_avgs, momentum_buffers = _local(
        params, grads, square_avgs, grad_avgs, momentum_buffers)
    _lib.rmsprop_(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, lr, alpha,
                  eps, weight_decay, momentum, centered, maximize, lr_tensor, grad_scale,
                  found_inf)


def adagrad_(
    params: List[Tensor],
    grads: List[Tensor],
    state_sums: List[Tensor],
    state_steps: List[Tensor],
    *,
    lr: float,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    lr_tensor: Optional[Tensor] = None,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    params, grads, state_sums = _local(params, grads, state_sums)
    _lib.adagrad_(params, grads, state_sums, state_steps, lr, lr_decay, weight_decay, eps,
                  maximize, lr_tensor, grad_scale, found_inf)


def stream_(inout: List[Tensor], read_only: List[Tensor], scale: float) -> None:
    """Benchmark helper: inout[k] = inout[k] * scale + sum(read_only) elementwise."""
    _lib._stream_(inout, read_only, scale)


def _nothing_to_compute(*args, **kwargs):
    """The fake kernel of every op here: each one mutates its list arguments in place and
    returns nothing, so under tracing there is no output to describe."""
    return None


for _op in ("sgd_", "adam_", "rmsprop_", "adagrad_", "_stream_"):
    torch.library.register_fake(f"fused_optim::{_op}")(_nothing_to_compute)
