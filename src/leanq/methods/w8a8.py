"""W8A8 dynamic with SmoothQuant: int8 weights per row, int8 activations per token at run time.

SmoothQuant (Xiao et al., 2022) divides each input channel j by
``s_j = a_j^α / w_j^(1-α)`` and multiplies the weight column by it, moving
activation outliers (which per-token int8 handles badly) into the weights
(which per-row int8 handles well).  a_j is the channel's activation size and
w_j = max_i |W_ij|.  leanq's calibration gives the Hessian H = 2/n·XᵀX, so a_j
is the channel's RMS sqrt(H_jj / 2) rather than its maximum over tokens —
outlier channels are systematic, so both rank them alike.  α = ``cfg.smooth``;
α = 0 means no smoothing (s = 1), not the formula's limit 1/w_j.  s is
normalised to geometric mean 1 and stored per module (see formats.w8a8).
"""

from __future__ import annotations

import torch

from ..config import MethodConfig, QuantSpec
from ..errors import LeanqError
from ..formats.w8a8 import W8A8Weight, quantize_w8a8
from . import register

S_RANGE = 1e4


def smooth_scale(w: torch.Tensor, h: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """SmoothQuant's s (float32 [in]) from the weight [out, in] and the Hessian [in, in]."""
    n = w.shape[1]
    if alpha == 0:
        return torch.ones(n, dtype=torch.float32, device=w.device)
    if not 0 < alpha <= 1:
        raise LeanqError(f"--smooth must be in [0, 1], got {alpha}")
    if h is None:
        raise LeanqError("W8A8 smoothing needs calibration data; pass --calib FILE or --smooth 0")
    a = (torch.diag(h.float()).clamp(min=0) / 2).sqrt()
    wm = w.float().abs().amax(dim=0)
    ok = (a > 0) & (wm > 0)
    s = torch.ones_like(a)
    s[ok] = a[ok].pow(alpha) / wm[ok].pow(1 - alpha)
    if ok.any():
        s[ok] = s[ok] / s[ok].log().mean().exp()
    return s.clamp(1 / S_RANGE, S_RANGE)


@register("w8a8", needs_data=True, fmt="w8a8", spec={"bits": 8, "group_size": None, "sym": True}, default_group=None,
          help="int8 weights + dynamic per-token int8 activations, SmoothQuant --smooth ALPHA (needs calibration)")
def w8a8(w: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec, cfg: MethodConfig) -> W8A8Weight:
    """``w`` [out, in] float, ``h`` [in, in] -> W8A8Weight."""
    w = w.detach().float()
    return quantize_w8a8(w, smooth_scale(w, h, cfg.smooth), spec)
