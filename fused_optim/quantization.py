"""8-bit block-quantized optimizer state (state_dtype=torch.uint8), in Python.

The kernels quantize inside the update (Note [8-bit state] in csrc/cpu/quant8.h); this
module is the same quantization with torch ops, for what happens outside a step: a
checkpoint of full-precision moments (torch.optim's, or another state_dtype's) loaded into
an 8-bit optimizer, and an 8-bit checkpoint turned back into one torch.optim loads
(`to_torch_state_dict`).
"""
from typing import Any, Dict, Tuple

import torch
from torch import Tensor

__all__ = ["BLOCK", "MIN_NUMEL", "quantize", "dequantize", "quantizes", "to_torch_state_dict"]

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
        f = torch.tensor(v, dtype=torch.float64).float().sort().values
        values.append(f)
        d = f.double()
        thresholds.append(((d[:-1] + d[1:]) / 2).float())
    return torch.stack(values), torch.stack(thresholds)


_VALUES, _THRESHOLDS = _maps()


def quantizes(p: Tensor) -> bool:
    """Whether an 8-bit optimizer keeps p's moments in 8 bits (else in float32)."""
    return p.numel() >= MIN_NUMEL and p.is_contiguous()


def quantize(x: Tensor) -> Tuple[Tensor, Tensor]:
    """A contiguous tensor quantized: (uint8 codes of x's shape, float32 scales of
    ceil(numel / 256)), as the kernels store a moment."""
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    nb = (n + BLOCK - 1) // BLOCK
    blocks = torch.zeros(nb * BLOCK, dtype=torch.float32, device=x.device)
    blocks[:n] = flat
    blocks = blocks.view(nb, BLOCK)
    if nb == 0:
        return torch.zeros(x.shape, dtype=torch.uint8, device=x.device), blocks.new_zeros(0)
    nan = blocks.isnan().any(1)
    amax = blocks.abs().amax(1)
    amax = torch.where(nan, torch.full_like(amax, float("nan")), amax)
    unsigned = ~((blocks < 0).any(1) | nan)
    scale = torch.where(unsigned, -amax, amax)
    divide = (amax > 0).unsqueeze(1)
    normed = torch.where(divide, blocks / torch.where(divide, amax.unsqueeze(1), 1.0),
                         torch.zeros_like(blocks))
    codes = torch.empty_like(blocks, dtype=torch.uint8)
    for u in (0, 1):
        rows = unsigned if u else ~unsigned
        t = _THRESHOLDS[u].to(x.device)
        codes[rows] = torch.searchsorted(t, normed[rows].contiguous()).to(torch.uint8)
    return codes.view(-1)[:n].view(x.shape).clone(), scale


def dequantize(codes: Tensor, scales: Tensor) -> Tensor:
    """The float32 values of quantize's (codes, scales)."""
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
