"""Round-to-nearest: each group scaled by its own range, every weight rounded alone."""

from __future__ import annotations

import torch

from ..config import MethodConfig, QuantSpec
from ..formats.intq import IntWeight, group_params, pack_int_weight, quantize_codes
from . import register


def rtn_codes(w: torch.Tensor, spec: QuantSpec, mse_clip: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float codes [out, in], scales and zeros [out, ngroups] of round-to-nearest."""
    w = w.float()
    out, n = w.shape
    scales, zeros = group_params(w, spec, mse_clip)
    g = n if spec.group_size is None else spec.group_size
    s = scales.repeat_interleave(g, 1)[:, :n]
    z = zeros.repeat_interleave(g, 1)[:, :n]
    codes = torch.clamp(torch.round(w / s) + z, 0, (1 << spec.bits) - 1)
    return codes, scales, zeros


@register("rtn", needs_data=False, help="round to nearest, per group (data-free)")
def rtn(w: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec, cfg: MethodConfig) -> IntWeight:
    codes, scales, zeros = rtn_codes(w, spec, cfg.mse_clip)
    return pack_int_weight(codes, scales, zeros, spec)


__all__ = ["rtn", "rtn_codes", "quantize_codes"]


@register("cast", needs_data=False, help="keep float weights, cast to --dtype (float16 or bfloat16)")
def cast(w: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec, cfg: MethodConfig):
    from ..formats.floatw import FloatWeight

    return FloatWeight(w.detach().to(getattr(torch, spec.dtype)).contiguous(), spec)
