"""FP8 E4M3 weight-only: ``torch.float8_e4m3fn`` values with one float16 scale per output row.

``scale = max|w_row| / 448`` (448 is E4M3's largest finite value), the weight
stored is ``w / scale`` cast with round-to-nearest-even, and ``ŵ = fp8 · scale``.
The cast would turn values beyond ±448 into NaN, so they are clamped first
(only rounding of the float16 scale can push one there).
Bits per weight: 8 + 16/in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import QuantSpec

FP8_MAX = 448.0


@dataclass
class FP8Weight:
    """weight: float8_e4m3fn [out, in]; scales: float16 [out]."""

    weight: torch.Tensor
    scales: torch.Tensor
    spec: QuantSpec

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "scales": self.scales}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.scales.float()[:, None]).to(dtype)


def fp8_shapes(spec: QuantSpec, out_features: int, in_features: int) -> dict:
    return {"weight": ((out_features, in_features), torch.float8_e4m3fn),
            "scales": ((out_features,), torch.float16)}


def quantize_fp8(w: torch.Tensor, spec: QuantSpec) -> FP8Weight:
    """FP8 E4M3 of ``w`` [out, in] with per-row absmax scales."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    s = (amax / FP8_MAX).half().float()
    s = torch.where(s > 0, s, torch.ones_like(s))  # all-zero row
    q = (w / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return FP8Weight(q.contiguous(), s.half().contiguous(), spec)
