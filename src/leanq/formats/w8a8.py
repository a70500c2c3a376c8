"""W8A8 dynamic: int8 weights per output row, int8 activations per token at run time.

Stored: ``qweight`` int8 [out, in] (symmetric, codes in [-127, 127]),
``scales`` float16 [out] and ``smooth`` float16 [in], SmoothQuant's
per-input-channel factor s (Xiao et al., "SmoothQuant", 2022): the codes hold
``W · diag(s)`` and the input is divided by s before it is quantized, so
``y = (x / s) (W diag(s))ᵀ`` equals ``x Wᵀ`` before rounding while the
activation outliers have moved into the weights.  s is stored per module
rather than folded into the preceding norm, so every linear (also o_proj and
down_proj, which follow no norm) can be smoothed; it costs 16/out bits per
weight (counted).  s = 1 when smoothing is off.

At run time each token's row ``x̃ = x / s`` gets ``a = max|x̃| / 127`` and
codes ``round(x̃ / a)``; then ``y = (X_q W_qᵀ) · a · scales``: the product is
an exact integer sum (int32), done by ``torch._int_mm`` where it applies, else
emulated exactly in float64 (|sum| < 127² · in < 2^53).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import QuantSpec

QMAX = 127


@dataclass
class W8A8Weight:
    """qweight: int8 [out, in]; scales: float16 [out]; smooth: float16 [in]."""

    qweight: torch.Tensor
    scales: torch.Tensor
    smooth: torch.Tensor
    spec: QuantSpec

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales, "smooth": self.smooth}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight part only: ``q · scale / smooth`` [out, in] (activations are quantized at run time)."""
        w = self.qweight.float() * self.scales.float()[:, None] / self.smooth.float()[None, :]
        return w.to(dtype)


def w8a8_shapes(spec: QuantSpec, out_features: int, in_features: int) -> dict:
    return {"qweight": ((out_features, in_features), torch.int8),
            "scales": ((out_features,), torch.float16),
            "smooth": ((in_features,), torch.float16)}


def quantize_w8a8(w: torch.Tensor, smooth: torch.Tensor, spec: QuantSpec) -> W8A8Weight:
    """Int8 per-row codes of ``w · diag(smooth)``; ``smooth`` float [in] (rounded to float16 first)."""
    s16 = smooth.detach().to(torch.float16)
    ws = w.detach().float() * s16.float()[None, :]
    sc = (ws.abs().amax(dim=1) / QMAX).half().float()
    sc = torch.where(sc > 0, sc, torch.ones_like(sc))
    q = torch.clamp(torch.round(ws / sc[:, None]), -QMAX, QMAX).to(torch.int8)
    return W8A8Weight(q.contiguous(), sc.half().contiguous(), s16.contiguous(), spec)


def quantize_tokens(x: torch.Tensor, smooth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes of ``x / smooth``.

    x: float [tokens, in]; returns (int8 [tokens, in], float32 [tokens] scales).
    A token that is all zeros gets scale 1 and zero codes.
    """
    xs = x.float() / smooth.float()[None, :]
    a = xs.abs().amax(dim=1) / QMAX
    a = torch.where(a > 0, a, torch.ones_like(a))
    q = torch.clamp(torch.round(xs / a[:, None]), -QMAX, QMAX).to(torch.int8)
    return q, a
