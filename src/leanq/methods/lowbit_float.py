"""NF4 and FP8 weight-only methods: round each weight to the nearest level of the format.

Both are data-free.  NF4 (4-bit normal-float, block-wise absmax; ``--group-size``
is the block, 64 by default) searches a per-block shrink of the absmax when
``cfg.mse_clip`` (absmax itself is a candidate).  FP8 is E4M3 with one scale
per output row, round-to-nearest-even by the cast.
"""

from __future__ import annotations

import torch

from ..config import MethodConfig, QuantSpec
from ..formats.fp8 import FP8Weight, quantize_fp8
from ..formats.nf4 import NF4Weight, quantize_nf4
from . import register


@register("nf4", needs_data=False, fmt="nf4", spec={"bits": 4}, default_group=64,
          help="NF4: 4-bit normal-float levels, absmax per block of --group-size (default 64) (data-free)")
def nf4(w: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec, cfg: MethodConfig) -> NF4Weight:
    """``w`` [out, in] float -> NF4Weight."""
    return quantize_nf4(w, spec, clip_search=cfg.mse_clip)


@register("fp8", needs_data=False, fmt="fp8", spec={"bits": 8, "group_size": None, "sym": True}, default_group=None,
          help="FP8 E4M3 weights, one scale per output row (data-free)")
def fp8(w: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec, cfg: MethodConfig) -> FP8Weight:
    """``w`` [out, in] float -> FP8Weight."""
    return quantize_fp8(w, spec)
