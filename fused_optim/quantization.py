"""8-bit block-quantized optimizer state (state_dtype=torch.uint8), in Python.

The kernels quantize inside the update (Note [8-bit state] in csrc/cpu/quant8.h); this
module is the same quantization with torch ops, for what happens outside a step: a
checkpoint of full-precision moments (torch.optim's, or another state_dtype's) loaded into
an 8-bit optimizer, and an 8-bit checkpoint turned back into one torch.optim loads
(`to_torch_state_dict`).

Note [8-bit DTensors]
A DTensor param (FSDP2's sharded params) is quantized shard by shard: each rank's blocks
start at its local shard's first element, so no block straddles two shards and a step
needs no communication. Its codes are a uint8 DTensor laid out as the param. Its scales
are a float32 DTensor too, so that torch.distributed.checkpoint saves every rank's: every
shard gets the same number of scales (the largest shard's block count; a smaller shard's
last entries are padding, left at zero), so that the scales' global length divides
evenly and every rank's offset follows from its coordinate as DCP expects. The kernel is
given the local shard's own blocks (`kernel_scales`). The blocks follow the shards, so an
8-bit checkpoint of a sharded optimizer resumes on the same mesh; `to_torch_state_dict`
(dequantized moments, DTensors laid out as their params) is the form to reshard.
"""
import math
from typing import Any, Dict, Tuple

import torch
from torch import Tensor

from . import _ops

__all__ = ["BLOCK", "MIN_NUMEL", "quantize", "dequantize", "quantizes", "kernel_scales",
           "to_torch_state_dict"]

# Elements per block (one float32 scale each), and the smallest tensor kept in 8 bits:
# smaller ones keep float32 moments (the scales would cost more than they save).
BLOCK = 256
MIN_NUMEL = 4096


def _maps() -> Tuple[Tensor, Tensor]:
    """The signed and unsigned dynamic maps (values, ascending) and their thresholds."""
    p10 = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    values, thresholds = [], []
    for unsigned in (0, 1):
        v = []
        for i in range(7):
            items = 1 << (i + unsigned)
            for j in range(items):
                mean = (0.1 + ((j + 0.5) * 0.9) / items) * p10[i]
                v.append(mean)
                if not unsigned:
                    v.append(-mean)
        v += [0.0, 1.0]
        f = torch.tensor(v, dtype=torch.float64, device="cpu").float().sort().values
        values.append(f)
        d = f.double()
        thresholds.append(((d[:-1] + d[1:]) / 2).float())
    return torch.stack(values), torch.stack(thresholds)


with _ops.real_tensors():
    _VALUES, _THRESHOLDS = _maps()


def quantizes(p: Tensor) -> bool:
    """Whether an 8-bit optimizer keeps p's moments in 8 bits (else in float32). For a
    DTensor, by its global size and layout, so that every rank decides the same."""
    return p.numel() >= MIN_NUMEL and p.is_contiguous()


def is_dtensor(t: Tensor) -> bool:
    """Whether t is a DTensor (checked without importing torch.distributed)."""
    cls = _ops.dtensor_class()
    return cls is not None and isinstance(t, cls)


def _scale_layout(x: Tensor) -> Tuple[list, int, int]:
    """For a DTensor x, its scales' placements, global length and entries per shard (Note
    [8-bit DTensors]): sharded where x is sharded, replicated where x is; as many entries
    per shard as the largest shard of x has blocks."""
    from torch.distributed.tensor import Replicate, Shard

    largest = list(x.shape)
    shards, placements = 1, []
    for mesh_dim, placement in enumerate(x.placements):
        if placement.is_shard():
            size = x.device_mesh.size(mesh_dim)
            # (torch.chunk's split, nested in mesh order: the first chunk is the largest)
            largest[placement.dim] = -(-largest[placement.dim] // size)
            shards *= size
            placements.append(Shard(0))
        elif placement.is_replicate():
            placements.append(Replicate())
        else:
            raise ValueError(
                f"state_dtype=torch.uint8 quantizes DTensors that are sharded or replicated on "
                f"each mesh dimension; this one is {placement} on mesh dimension {mesh_dim}")
    per_shard = -(-math.prod(largest) // BLOCK)
    return placements, per_shard * shards, per_shard


def zeros(p: Tensor) -> Tuple[Tensor, Tensor]:
    """quantize(torch.zeros_like(p, dtype=torch.float32)), bit for bit (each block's codes
    of 0 in the unsigned map, its scale -0.0), for a plain tensor p: made directly, without
    quantize's float32 temporaries (about 28 bytes an element; a new 8-bit moment's first
    step peaked at several times its float32 size)."""
    code, scale = _ZERO
    blocks = (p.numel() + BLOCK - 1) // BLOCK
    return (torch.full(p.shape, code, dtype=torch.uint8, device=p.device),
            torch.full((blocks,), scale, dtype=torch.float32, device=p.device))


def quantize(x: Tensor) -> Tuple[Tensor, Tensor]:
    """A contiguous tensor quantized: (uint8 codes of x's shape, float32 scales of
    ceil(numel / 256)), as the kernels store a moment. A DTensor is quantized shard by
    shard (Note [8-bit DTensors]): codes and scales are DTensors."""
    if is_dtensor(x):
        from torch.distributed.tensor import DTensor

        placements, length, per_shard = _scale_layout(x)
        codes, scales = quantize(x.to_local())
        if scales.numel() > per_shard:
            raise RuntimeError(
                f"fused_optim: a shard of {x.to_local().numel()} elements of a DTensor of shape "
                f"{tuple(x.shape)} with placements {x.placements} has more blocks than its "
                f"largest shard should ({per_shard}): an uneven sharding this does not know")
        padded = scales.new_zeros(per_shard)
        padded[: scales.numel()] = scales
        mesh = x.device_mesh
        return (DTensor.from_local(codes, mesh, x.placements, shape=x.shape, stride=x.stride()),
                DTensor.from_local(padded, mesh, placements, shape=torch.Size([length]),
                                   stride=(1,)))
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    nb = (n + BLOCK - 1) // BLOCK
    blocks = torch.zeros(nb * BLOCK, dtype=torch.float32, device=x.device)
    blocks[:n] = flat
    blocks = blocks.view(nb, BLOCK)
    if nb == 0:
        return torch.zeros(x.shape, dtype=torch.uint8, device=x.device), blocks.new_zeros(0)
    nan = (~blocks.isfinite()).any(1)  # (a NaN or an infinity: the block is NaN)
    amax = blocks.abs().amax(1)
    amax = torch.where(nan, torch.full_like(amax, float("nan")), amax)
    unsigned = ~((blocks < 0).any(1) | nan)
    scale = torch.where(unsigned, -amax, amax)
    divide = (amax > 0).unsqueeze(1)
    normed = torch.where(divide, blocks / torch.where(divide, amax.unsqueeze(1), 1.0),
                         torch.zeros_like(blocks))
    # (each block's codes by its map: both maps' codes of every block, then a where, not a
    # masked assignment, which would break a compiled step's graph for good)
    codes = torch.where(unsigned.unsqueeze(1),
                        torch.searchsorted(_THRESHOLDS[1].to(x.device), normed).to(torch.uint8),
                        torch.searchsorted(_THRESHOLDS[0].to(x.device), normed).to(torch.uint8))
    return codes.view(-1)[:n].view(x.shape).clone(), scale


def kernel_scales(scales: Tensor, codes: Tensor) -> Tensor:
    """The scales the kernels take for `codes`: `scales` itself, or for DTensors the
    local shard's blocks (the first ceil(local numel / 256) local entries, a view the
    kernel updates in place: Note [8-bit DTensors])."""
    if not is_dtensor(scales):
        return scales
    return scales.to_local()[: -(-codes.to_local().numel() // BLOCK)]


def dequantize(codes: Tensor, scales: Tensor) -> Tensor:
    """The float32 values of quantize's (codes, scales); DTensors laid out as the codes
    for DTensor codes."""
    if is_dtensor(codes):
        from torch.distributed.tensor import DTensor

        values = dequantize(codes.to_local(), kernel_scales(scales, codes))
        return DTensor.from_local(values, codes.device_mesh, codes.placements,
                                  shape=codes.shape, stride=codes.stride())
    n = codes.numel()
    nb = scales.numel()
    padded = torch.zeros(nb * BLOCK, dtype=torch.long, device=codes.device)
    padded[:n] = codes.reshape(-1).long()
    padded = padded.view(nb, BLOCK)
    unsigned = torch.signbit(scales).long().unsqueeze(1)
    values = _VALUES.to(codes.device)[unsigned.expand(-1, BLOCK), padded]
    out = values * scales.abs().unsqueeze(1)
    return out.view(-1)[:n].view(codes.shape).clone()


def to_torch_state_dict(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """A fused_optim checkpoint (an optimizer's state_dict()) as one torch.optim loads:
    8-bit moments dequantized (their `*_absmax` scales dropped), the param storage's
    buffers (kahan_comp, rounding_state, master_param) dropped; other moments as they are
    (torch.optim casts each to its param's dtype as it loads). The param groups' fused_optim
    options are not in a state_dict: nothing to drop there. The input is not changed."""
    from .optimizer import _STORAGE_OPTION

    state = {}
    for pid, s in state_dict["state"].items():
        out = {}
        for k, v in s.items():
            if k in _STORAGE_OPTION or (k.endswith("_absmax") and k[:-7] in s):
                continue
            scales = s.get(k + "_absmax")
            if isinstance(v, Tensor) and v.dtype == torch.uint8 and scales is not None:
                v = dequantize(v, scales)
            out[k] = v
        state[pid] = out
    return dict(state_dict, state=state)


def _zero_block() -> Tuple[int, float]:
    # (on the CPU whatever the default device: `import fused_optim` under
    # torch.set_default_device("meta") failed here, found by a review, 2026-12-06; and
    # real under a FakeTensorMode: _ops.real_tensors)
    with _ops.real_tensors():
        codes, scales = quantize(torch.zeros(BLOCK, device="cpu"))
        return int(codes[0]), float(scales[0])


_ZERO = _zero_block()  # (code, scale) of a block of zeros: zeros()
