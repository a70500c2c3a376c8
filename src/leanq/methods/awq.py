"""AWQ: activation-aware per-input-channel scaling, then group-wise integer weights.

Lin et al., "AWQ: Activation-aware Weight Quantization" (2023): input
channels that carry large activations matter more, so the weight is quantized
as ``Q(W · diag(s)) · diag(s)⁻¹`` with ``s = m^α`` (m = the channel's activation
magnitude), which gives those channels relatively finer steps.  α is searched
per layer.  Here m is the channel's RMS, sqrt(diag H / 2), and the search
scores each α by the layer's output error ``tr(ΔW H ΔWᵀ)`` = (2/n)·||ΔW X||²
computed from the Hessian alone — no model re-runs.  α = 0 (s = 1, plain RTN)
is a candidate, so the chosen scaling never has a larger layer error than RTN.

Where s lives: AWQ folds s into the preceding operation (a norm weight or the
previous linear).  leanq stores it instead beside each module's codes as a
float16 vector ``in_scale`` [in] (``QuantSpec.in_scale``); the kernel
dequantizes ``Ŵ / in_scale`` column-wise.  That lets every linear (o_proj and
down_proj too, and q/k/v or gate/up each with their own s) be scaled without
touching the rest of the model, at a counted cost of 16/out bits per weight
(0.028 bpw on SmolLM2-135M's 576-row layers, 0.01 on the 1536-row ones).

``awq+gptq``: the same search, then GPTQ rounds ``W · diag(s)`` with the
Hessian of its input ``x / s``, i.e. ``diag(s)⁻¹ H diag(s)⁻¹``.
"""

from __future__ import annotations

import torch

from ..config import MethodConfig, QuantSpec
from ..errors import LeanqError
from ..formats.intq import IntWeight, pack_int_weight
from . import register
from .gptq import gptq
from .grouping import rtn_quant

GRID = 20  # α in 0, 1/GRID, ..., 1
S_RANGE = 1e4  # s stays in [1/S_RANGE, S_RANGE]: inside float16's normal range


def layer_error(dw: torch.Tensor, h: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) for ΔW [out, in], H [in, in]."""
    return float(((dw @ h) * dw).sum())


def search_scale(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, cfg: MethodConfig,
                 grid: int = GRID) -> tuple[torch.Tensor, float]:
    """The per-input-channel scale s (float32 [in], float16-representable) and its α."""
    m = torch.diag(h).clamp(min=0).sqrt()
    pos = m[m > 0]
    m = torch.where(m > 0, m, pos.min() if pos.numel() else torch.ones_like(m))  # dead channels
    best = (float("inf"), torch.ones_like(m), 0.0)
    for i in range(grid + 1):
        alpha = i / grid
        s = m.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centre the range on 1 so float16 holds it
        s = s.clamp(1 / S_RANGE, S_RANGE).half().float()
        err = layer_error(rtn_quant(w * s, spec, cfg.mse_clip)[3] / s - w, h)
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


def _check(w: torch.Tensor, h: torch.Tensor | None, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if h is None:
        raise LeanqError(f"{name} needs calibration data (activation statistics); pass --calib FILE")
    w = w.detach().float()
    h = h.detach().float()
    if h.shape != (w.shape[1], w.shape[1]):
        raise LeanqError(f"{name}: Hessian shape {tuple(h.shape)} does not match weight width {w.shape[1]}")
    return w, h


def _with_in_scale(spec: QuantSpec) -> QuantSpec:
    if spec.in_scale:
        return spec
    from dataclasses import replace

    return replace(spec, in_scale=True)


@register("awq", needs_data=True, spec={"in_scale": True},
          help="AWQ: activation-aware input-channel scaling searched on the layer error, then RTN (needs calibration)")
def awq(w: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec, cfg: MethodConfig) -> IntWeight:
    """IntWeight with ``in_scale`` for ``w`` [out, in] given ``h`` [in, in]."""
    w, h = _check(w, h, "AWQ")
    spec = _with_in_scale(spec)
    s, _ = search_scale(w, h, spec, cfg)
    codes, sc, z, _ = rtn_quant(w * s, spec, cfg.mse_clip)
    iw = pack_int_weight(codes, sc, z, spec)
    iw.in_scale = s.half().contiguous()
    return iw


@register("awq+gptq", needs_data=True, spec={"in_scale": True},
          help="AWQ's input-channel scaling, then GPTQ rounding of the scaled weight (needs calibration)")
def awq_gptq(w: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec, cfg: MethodConfig) -> IntWeight:
    w, h = _check(w, h, "AWQ+GPTQ")
    spec = _with_in_scale(spec)
    s, _ = search_scale(w, h, spec, cfg)
    hs = h / (s[:, None] * s[None, :])  # Hessian of the scaled input x / s
    iw = gptq(w * s, hs, spec, cfg)
    iw.in_scale = s.half().contiguous()
    return iw
