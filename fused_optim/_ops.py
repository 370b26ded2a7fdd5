"""Typed wrappers over torch.ops.fused_optim.*, and their fake (meta) kernels.

The schemas are in csrc/ops.cpp. The ops mutate their tensor-list arguments in place and
return nothing, so a fake kernel has nothing to compute: registering it is what lets
torch.compile trace through an optimizer step without a graph break.
"""
from typing import List, Optional

import torch
from torch import Tensor

_lib = torch.ops.fused_optim


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
    _lib.adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1,
               beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, lr_tensor,
               grad_scale, found_inf)


def stream_(inout: List[Tensor], read_only: List[Tensor], scale: float) -> None:
    """Benchmark helper: inout[k] = inout[k] * scale + sum(read_only) elementwise."""
    _lib._stream_(inout, read_only, scale)


@torch.library.register_fake("fused_optim::sgd_")
def _sgd_fake(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
              maximize, is_first_step, lr_tensor=None, grad_scale=None, found_inf=None):
    return None


@torch.library.register_fake("fused_optim::adam_")
def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1,
               beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay,
               lr_tensor=None, grad_scale=None, found_inf=None):
    return None


@torch.library.register_fake("fused_optim::_stream_")
def _stream_fake(inout, read_only, scale):
    return None
