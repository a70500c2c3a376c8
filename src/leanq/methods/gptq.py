"""GPTQ: round one column at a time and push its error onto the columns not yet rounded.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (2022).  The layer objective is ||WX - ŴX||² whose
Hessian is H = 2XXᵀ/n; with the upper Cholesky factor U of H⁻¹, rounding
column j to q_j and updating the remaining columns by
-(w_j - q_j)/U_jj · U_j,j+1: is the optimal correction (OBS) for that step.
Updates are applied lazily in blocks of ``block_size`` columns so most of the
work is one matrix product per block.
"""

from __future__ import annotations

import torch

from ..config import MethodConfig, QuantSpec
from ..errors import LeanqError
from ..formats.intq import IntWeight, find_params, pack_int_weight
from . import register


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp · mean(diag H); retried with more damping."""
    n = h.shape[0]
    mean_diag = torch.mean(torch.diag(h)).clamp(min=1e-8)
    for attempt in range(6):
        hd = h.clone()
        hd.diagonal().add_(damp * (10**attempt) * mean_diag)
        l, info = torch.linalg.cholesky_ex(hd)
        if info == 0:
            hinv = torch.cholesky_inverse(l)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info == 0:
                return u
    raise LeanqError(f"GPTQ: the calibration Hessian ({n}x{n}) is not positive definite even with heavy damping")


@register("gptq", needs_data=True, help="GPTQ: Hessian-aware rounding with error feedback (needs calibration)")
def gptq(w: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec, cfg: MethodConfig) -> IntWeight:
    """Quantize ``w`` [out, in] given the Hessian ``h`` [in, in] (float32/64)."""
    if h is None:
        raise LeanqError("GPTQ needs calibration data (a Hessian); pass --calib FILE")
    w = w.detach().float().clone()
    out, n = w.shape
    h = h.detach().float().clone()
    w0, h0 = w.clone(), h.clone()  # the objective, kept for the scale refit
    if h.shape != (n, n):
        raise LeanqError(f"GPTQ: Hessian shape {tuple(h.shape)} does not match weight width {n}")
    g = n if spec.group_size is None else spec.group_size
    ngroups = (n + g - 1) // g

    dead = torch.diag(h) == 0
    diag = torch.diag(h).clone()  # per-input weight for the clipping search, in original column order
    h[dead, dead] = 1
    w[:, dead] = 0

    # Group parameters.  Without act-order they are found when the first column
    # of a group is reached, from the weights as updated so far (standard GPTQ).
    # With act-order columns are visited out of order, so they are fixed up
    # front from the original weights ("static groups"); the layout stays plain.
    scales = torch.zeros(out, ngroups, device=w.device)
    zeros = torch.zeros(out, ngroups, device=w.device)
    if cfg.act_order:
        for gi in range(ngroups):
            scales[:, gi], zeros[:, gi] = find_params(w[:, gi * g : (gi + 1) * g], spec, cfg.mse_clip,
                                                      col_weight=diag[gi * g : (gi + 1) * g])
        perm = torch.argsort(torch.diag(h), descending=True)
    else:
        perm = torch.arange(n, device=w.device)
    invperm = torch.argsort(perm)
    w = w[:, perm]
    h = h[perm][:, perm]
    u = _inverse_cholesky(h, cfg.damp)

    codes = torch.zeros_like(w)
    qmax = (1 << spec.bits) - 1
    bs = cfg.block_size
    if g <= bs:
        bs = g * (bs // g)  # groups never straddle a block
    elif g % bs:
        bs = g
    # The column loop is thousands of tiny operations: one thread runs them
    # faster than two, which wait on each other at every step (much worse when
    # the machine is busy).  Large products elsewhere keep every thread.
    nthreads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i1 in range(0, n, bs):
            i2 = min(i1 + bs, n)
            w1 = w[:, i1:i2].clone()
            err1 = torch.zeros_like(w1)
            u1 = u[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                orig = int(perm[col])
                gi = orig // g
                if not cfg.act_order and orig % g == 0:
                    # block sizes are aligned to groups (below), so a group either
                    # lies inside this block or starts at its first column
                    src = w1[:, i : i + g] if i + g <= i2 - i1 else w[:, col : col + g]
                    scales[:, gi], zeros[:, gi] = find_params(src, spec, cfg.mse_clip, col_weight=diag[orig : orig + g])
                s, z = scales[:, gi], zeros[:, gi]
                wc = w1[:, i]
                q = torch.clamp(torch.round(wc / s) + z, 0, qmax)
                codes[:, col] = q
                dq = (q - z) * s
                e = (wc - dq) / u1[i, i]
                w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
                err1[:, i] = e
            w[:, i1:i2] = w1
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    finally:
        torch.set_num_threads(nthreads)

    codes = codes[:, invperm]
    if cfg.refit:
        scales = refit_scales(w0, h0, codes, scales, zeros, g)
    return pack_int_weight(codes, scales, zeros, spec)


def refit_scales(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, g: int) -> torch.Tensor:
    """Least-squares group scales for fixed codes: argmin_s (w - ŵ(s)) H (w - ŵ(s))ᵀ per row.

    w [out, n], h [n, n], codes [out, n], scales/zeros [out, G].  With
    ŵ = Σ_g s_g · e_g (e_g = codes - zero on group g's columns, 0 elsewhere)
    the objective is quadratic in s: solve (EᵀHE) s = EᵀHw for every row at
    once.  Rows whose error would not drop keep their old scales; the result
    is rounded to float16 like every stored scale.
    """
    out, n = w.shape
    ng = scales.shape[1]
    pad = ng * g - n  # a shorter last group: zero-pad to whole groups (padded columns carry no weight)
    e = codes - zeros.repeat_interleave(g, 1)[:, :n]  # [out, n]
    ep = torch.nn.functional.pad(e, (0, pad)).view(out, ng, g)
    hp = torch.nn.functional.pad(h, (0, pad, 0, pad))
    # v[r, i, k] = Σ_{j in group k} H_ij e_rj: one [out, n] x [n, n] product, not one per group
    v = torch.einsum("igj,rgj->rig", hp.view(ng * g, ng, g), ep)
    m = torch.einsum("rgi,rgih->rgh", ep, v.view(out, ng, g, ng))  # EᵀHE per row, [out, G, G]
    hw = torch.nn.functional.pad(w @ h, (0, pad)).view(out, ng, g)
    b = (ep * hw).sum(-1)  # EᵀHw per row, [out, G]
    m.diagonal(dim1=1, dim2=2).add_(1e-6 * m.diagonal(dim1=1, dim2=2).mean(1, keepdim=True) + 1e-12)
    new = torch.linalg.solve(m, b.unsqueeze(-1)).squeeze(-1)
    new = torch.where(torch.isfinite(new) & (new > 0), new, scales).half().float()

    def err(s: torch.Tensor) -> torch.Tensor:
        d = w - e * s.repeat_interleave(g, 1)[:, :n]
        return ((d @ h) * d).sum(1)

    better = err(new) < err(scales)
    return torch.where(better[:, None], new, scales)
