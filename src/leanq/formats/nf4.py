"""NF4: 4-bit normal-float codes with one absmax per block of input columns.

The 16 levels are quantiles of a standard normal (Dettmers et al., "QLoRA",
2023), built so that zero is exactly representable: 8 positive levels from the
quantiles of [0.5, 0.9677] and 7 negative ones from [0.5, 0.9677] mirrored,
each half scaled to reach ±1.  A weight block ``w`` [block] is stored as
``absmax = max|w|`` (float16) and codes ``q = argmin_k |w/absmax - L[k]|``;
``ŵ = L[q] · absmax``.  Blocks run along the input dimension of each row
(``group_size`` columns, 64 by default; a shorter last block when it does not
divide ``in``), so the layout mirrors the integer format's groups.

Bits per weight: 4 + 16/block (4.25 at block 64): the absmax is float16, not
double-quantized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import QuantSpec
from .packing import pack, packed_len, unpack

_OFFSET = 0.9677083  # the largest quantile used, chosen in QLoRA so the top level sits at ±1


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels, float32 ascending, L[7] == 0, L[0] == -1, L[15] == 1."""
    ndtri = torch.special.ndtri
    pos = ndtri(torch.linspace(_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])  # 8 positive
    neg = -ndtri(torch.linspace(_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])  # 7 negative
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    v = v / v.abs().max()
    return v.float()


NF4_LEVELS = nf4_levels()


@dataclass
class NF4Weight:
    """qweight: uint8 [out, packed_len(in, 4)] level indices; absmax: float16 [out, nblocks]."""

    qweight: torch.Tensor
    absmax: torch.Tensor
    spec: QuantSpec
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "absmax": self.absmax}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = unpack(self.qweight, 4, self.in_features).long()
        lv = NF4_LEVELS.to(self.absmax.device)[codes]
        b = block_of(self.spec, self.in_features)
        a = self.absmax.float().repeat_interleave(b, dim=1)[:, : self.in_features]
        return (lv * a).to(dtype)


def block_of(spec: QuantSpec, in_features: int) -> int:
    return in_features if spec.group_size is None else spec.group_size


def nf4_shapes(spec: QuantSpec, out_features: int, in_features: int) -> dict:
    nb = math.ceil(in_features / block_of(spec, in_features))
    return {"qweight": ((out_features, packed_len(in_features, 4)), torch.uint8),
            "absmax": ((out_features, nb), torch.float16)}


def nearest_level(x: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest NF4 level for each value of ``x`` (values in [-1, 1]).

    Midpoints between adjacent levels split the line; ``bucketize`` with
    right=False sends a value exactly at a midpoint to the lower level, so the
    result is deterministic.
    """
    lv = NF4_LEVELS.to(x.device)
    mids = (lv[1:] + lv[:-1]) / 2
    return torch.bucketize(x.contiguous(), mids)


def quantize_nf4(w: torch.Tensor, spec: QuantSpec, clip_search: bool = True, grid: int = 20,
                 max_shrink: float = 0.3) -> NF4Weight:
    """NF4 of ``w`` [out, in] float: per block absmax, optionally shrunk.

    With ``clip_search`` each block's absmax is multiplied by the factor in
    [1 - max_shrink, 1] (``grid`` steps) that minimises the block's squared
    error; plain absmax (factor 1) is one of the candidates, so the search
    never does worse than it.
    """
    w = w.detach().float()
    out, n = w.shape
    b = block_of(spec, n)
    codes = torch.empty(out, n, dtype=torch.uint8, device=w.device)
    absmax = []
    for start in range(0, n, b):
        blk = w[:, start : start + b]
        amax = blk.abs().amax(dim=1)
        best_a = amax.half().float()
        best_err = torch.full_like(amax, float("inf"))
        steps = range(int(max_shrink * grid) + 1) if clip_search else range(1)
        for i in steps:
            a = (amax * (1 - i / grid)).half().float()
            a = torch.where(a > 0, a, torch.ones_like(a))  # an all-zero block: any scale reproduces it
            q = nearest_level((blk / a[:, None]).clamp(-1, 1))
            err = (NF4_LEVELS.to(w.device)[q] * a[:, None] - blk).pow(2).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_a = torch.where(better, a, best_a)
        codes[:, start : start + b] = nearest_level((blk / best_a[:, None]).clamp(-1, 1)).to(torch.uint8)
        absmax.append(best_a)
    a16 = torch.stack(absmax, 1).to(torch.float16).contiguous()
    return NF4Weight(pack(codes, 4).contiguous(), a16, spec, n)
