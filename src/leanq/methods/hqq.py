"""HQQ: calibration-free half-quadratic refinement of each group's scale and zero point.

Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models"
(2023) fit the quantizer parameters to a sparsity-promoting l_p (p < 1) error
``||W - Q⁻¹(Q(W))||_p`` by splitting it with an auxiliary residual E:
alternately E = shrink_p(W - Ŵ) (the outliers the quantizer should not chase)
and a least-squares update of the parameters against ``W - E``.

leanq keeps its format: the zero point stays an *integer* (zero exactly
representable; on SmolLM2-135M a float zero lost badly to RTN at 3 bits), so
each step here updates both parameters in closed form with the codes fixed —
z = round(mean(q - (W - E)/s)), then s = <q - z, W - E> / ||q - z||² — and the
codes are re-rounded.  The residual is measured in quantization steps, so the
shrinkage threshold |r|^(p-1)/β means the same at every weight scale: errors
well inside one step (the ordinary rounding noise) keep their full weight and
large ones (clipped outliers) are discounted.  Each group starts from RTN's
parameters (with the searched clipping when ``cfg.mse_clip``) and keeps the
iterate with the lowest squared error, so it is never worse than that start
in the weight-space L2 error.  Output: an ordinary IntWeight.
"""

from __future__ import annotations

import torch

from ..config import MethodConfig, QuantSpec
from ..formats.intq import IntWeight, pack_int_weight
from . import register
from .grouping import batched_group_params

LP = 0.7  # the l_p "norm" of the outlier model (HQQ's default)
BETA0 = 1.0  # initial half-quadratic weight, in units of quantization steps
KAPPA = 1.1  # β grows each iteration, so E shrinks towards 0 (plain least squares)
ITERS = 20


def _shrink(r: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised soft threshold for |·|^p: sign(r) · max(|r| - |r|^(p-1)/β, 0)."""
    a = r.abs()
    return torch.sign(r) * torch.relu(a - a.clamp(min=1e-8).pow(LP - 1) / beta)


def refine(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, spec: QuantSpec,
           iters: int = ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine (scale, zero) [rows] for the groups ``w`` [rows, g]; returns the best found."""
    qmax = (1 << spec.bits) - 1

    def sq_err(s, z):
        q = torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, qmax)
        return ((q - z[:, None]) * s[:, None] - w).pow(2).sum(1), q

    best_err, q = sq_err(s, z)
    best_s, best_z = s.clone(), z.clone()
    beta = BETA0
    for _ in range(iters):
        r = (w - (q - z[:, None]) * s[:, None]) / s[:, None]  # residual in steps
        t = w - _shrink(r, beta) * s[:, None]  # what the quantizer should fit
        if not spec.sym:
            z = torch.clamp(torch.round((q - t / s[:, None]).mean(1)), 0, qmax)
        qz = q - z[:, None]
        den = qz.pow(2).sum(1)
        s_new = (qz * t).sum(1) / den.clamp(min=1e-12)
        ok = (den > 0) & (s_new > 0) & torch.isfinite(s_new)
        s = torch.where(ok, s_new, s).half().float()  # stored as float16: fit what is stored
        s = torch.where(s > 0, s, torch.full_like(s, 6e-8))
        err, q = sq_err(s, z)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
        beta *= KAPPA
    return best_s, best_z


@register("hqq", needs_data=False, help="HQQ: half-quadratic refinement of scales and integer zeros (data-free)")
def hqq(w: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec, cfg: MethodConfig) -> IntWeight:
    """Quantize ``w`` [out, in] (any float dtype) to an IntWeight of ``spec``; ``h`` is ignored."""
    w = w.detach().float()
    out, n = w.shape
    g = n if spec.group_size is None else spec.group_size
    scales, zeros = batched_group_params(w, spec, cfg.mse_clip)
    nfull = n // g
    if nfull:  # all full groups in one batch of rows
        wg = w[:, : nfull * g].reshape(out * nfull, g)
        s, z = refine(wg, scales[:, :nfull].reshape(-1), zeros[:, :nfull].reshape(-1), spec)
        scales[:, :nfull], zeros[:, :nfull] = s.reshape(out, nfull), z.reshape(out, nfull)
    if n % g:  # the shorter last group
        scales[:, -1], zeros[:, -1] = refine(w[:, nfull * g :], scales[:, -1], zeros[:, -1], spec)
    s = scales.repeat_interleave(g, 1)[:, :n]
    zz = zeros.repeat_interleave(g, 1)[:, :n]
    codes = torch.clamp(torch.round(w / s) + zz, 0, (1 << spec.bits) - 1)
    return pack_int_weight(codes, scales, zeros, spec)
