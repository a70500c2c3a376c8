"""Vector quantization fitted to the layer-output error (GPTVQ-style), for ``fmt="vq"``.

Objective: tr((W − Ŵ) H (W − Ŵ)ᵀ) with H = 2XᵀX/n, as GPTQ's.  Steps:

1. per-row (group) scales s = RMS of the weights, so one codebook serves rows
   of very different magnitude;
2. codebook init per tile: k-means++ then weighted k-means on the normalised
   vectors W/s, each coordinate's squared error weighted by s² · diag(H) — the
   first-order output error of changing that weight;
3. assignment with error feedback (Van Baalen et al., "GPTVQ", 2024): columns
   are visited left to right d at a time; each row's d-vector takes the
   codeword nearest under the metric of the d×d block of H⁻¹ still to be
   quantized (||(x − c) U_JJ⁻¹||², U the upper Cholesky factor of H⁻¹, which is
   the exact OBS cost of fixing those d weights jointly), then the rounding
   error is pushed onto the columns not yet quantized exactly as in GPTQ;
   residual codebooks (``vq_books`` > 1) are assigned greedily on what the
   previous books left;
4. with the indices fixed, the codebooks are re-solved by conjugate gradients
   on the same quadratic objective (it is linear least squares in the
   codewords), then the scales by least squares per row (``gptq.refit_scales``),
   twice.  Each step can only lower the objective.

Cost on SmolLM2-135M's 576×1536 layers: k-means on at most 32·K sampled
vectors, one pass of the column loop (like GPTQ's), 12 CG steps each one
[out, in] × [in, in] product.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..config import MethodConfig, QuantSpec
from ..errors import LeanqError
from ..formats.vq import VQWeight, geometry, pack_vq_weight
from . import register
from .gptq import _inverse_cholesky, refit_scales

KMEANS_ITERS = 20
CG_ITERS = 12
KMEANS_POINTS_PER_CODEWORD = 32
REFIT_ROUNDS = 2
LAZY_INIT = False  # fit each tile's codebook when the column pass reaches it (GPTVQ); see vq() for why not
PASSES = 1  # assignment passes; more re-assign with the refitted codebooks (measured: docs/results/vq.md)


def kmeans(x: torch.Tensor, wt: torch.Tensor, k: int, gen: torch.Generator, iters: int = KMEANS_ITERS,
           max_points: int | None = None) -> torch.Tensor:
    """Weighted k-means: centroids float32 [k, d] for points x [P, d] with per-coordinate weights wt [P, d].

    Minimises Σ_p Σ_a wt[p,a] (x[p,a] − c[idx_p, a])².  At most ``max_points``
    points (a seeded sample) are used; k-means++ seeding; an empty cluster is
    re-seeded at the point with the largest current error.
    """
    p, d = x.shape
    if max_points is not None and p > max_points:
        sel = torch.randperm(p, generator=gen, device=x.device)[:max_points]
        x, wt = x[sel], wt[sel]
        p = max_points
    wt = wt.clamp(min=1e-12)
    if p <= k:  # fewer points than codewords: every point is a codeword, the rest repeat
        return torch.cat([x, x[torch.arange(k - p, device=x.device) % max(p, 1)]]) if p else torch.zeros(k, d, device=x.device)
    # k-means++ seeding under the weighted metric
    c = torch.empty(k, d, device=x.device)
    c[0] = x[torch.randint(p, (1,), generator=gen, device=x.device)]
    best = ((x - c[0]) ** 2 * wt).sum(1)
    for i in range(1, k):
        pr = best / best.sum() if best.sum() > 0 else torch.full_like(best, 1.0 / p)
        c[i] = x[torch.multinomial(pr, 1, generator=gen)]
        best = torch.minimum(best, ((x - c[i]) ** 2 * wt).sum(1))
    wx = wt * x
    for _ in range(iters):
        idx, err = _assign_weighted(x, wt, wx, c)
        num = torch.zeros(k, d, device=x.device).index_add_(0, idx, wx)
        den = torch.zeros(k, d, device=x.device).index_add_(0, idx, wt)
        empty = den.sum(1) == 0
        c = torch.where(den > 0, num / den.clamp(min=1e-30), c)
        if empty.any():  # re-seed at the worst-served points
            far = err.topk(int(empty.sum())).indices
            c[empty] = x[far]
    return c


def _assign_weighted(x, wt, wx, c, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid per point under per-coordinate weights, and its error."""
    idx, err = [], []
    c2 = (c * c).t()
    for s in range(0, x.shape[0], chunk):
        dist = wt[s:s + chunk] @ c2 - 2 * (wx[s:s + chunk] @ c.t())
        v, i = dist.min(1)
        idx.append(i)
        err.append(v + (wx[s:s + chunk] * x[s:s + chunk]).sum(1))
    return torch.cat(idx), torch.cat(err)


def _nearest(y: torch.Tensor, cm: torch.Tensor) -> torch.Tensor:
    """argmin_k ||y_r − cm_k||² for y [rows, d], cm [K, d] (already in the metric's coordinates)."""
    return ((cm * cm).sum(1)[None, :] - 2 * (y @ cm.t())).argmin(1)


@register("vq", needs_data=True, fmt="vq", default_group=None,
          help="vector quantization: Hessian-weighted k-means codebooks, GPTVQ error feedback, "
               "least-squares codebook/scale refit (needs calibration)")
def vq(w: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec, cfg: MethodConfig) -> VQWeight:
    """Quantize ``w`` [out, in] with the Hessian ``h`` [in, in] into a :class:`VQWeight`."""
    if h is None:
        raise LeanqError("vq needs calibration data (a Hessian); pass --calib FILE")
    if spec.fmt == "int":
        # a size plan (--bpw with --method vq) may give a module an integer setting: leanq's default GPTQ
        from .gptq import gptq

        return gptq(w, h, spec, dataclasses.replace(cfg, act_order=True, mse_clip=True, refit=True))
    if spec.fmt != "vq":
        raise LeanqError(f"method vq writes fmt='vq' (or 'int' through GPTQ), got a {spec.fmt!r} spec")
    w0 = w.detach().float()
    out, n = w0.shape
    if h.shape != (n, n):
        raise LeanqError(f"vq: Hessian shape {tuple(h.shape)} does not match weight width {n}")
    h0 = h.detach().float()
    geo = geometry(spec, out, n)
    d, nb, kk, nvec = spec.vq_dim, spec.vq_books, geo["K"], geo["nvec"]
    big_n = nvec * d
    dev = w0.device
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)

    # padded problem: zero weights beyond ``in``; their Hessian rows are decoupled and tiny
    w = torch.nn.functional.pad(w0, (0, big_n - n))
    hp = torch.nn.functional.pad(h0, (0, big_n - n, 0, big_n - n))
    diag = torch.diag(hp).clone()
    mean_diag = diag[:n].mean().clamp(min=1e-8)
    pad_or_dead = diag == 0
    hp[pad_or_dead, pad_or_dead] = 1e-6 * mean_diag
    w[:, pad_or_dead] = 0
    diag = torch.diag(hp)

    scales = _rms_scales(w0, geo["group"], geo["nsg"])  # [out, nsg], float16-rounded
    s_full = _expand(scales, geo["group"], big_n)  # [out, N]
    books = torch.zeros(geo["nrt"] * geo["nct"], nb, kk, d, device=dev)
    vec_tile = torch.arange(nvec, device=dev) * d // geo["cols"]  # column tile of each vector
    lazy = LAZY_INIT and not cfg.act_order
    if not lazy:
        # codebooks fitted up front, from the original weights.  The lazy alternative fits each column tile's
        # codebook when the pass reaches it, from the weights as error feedback has left them.  After an input
        # with a massive activation, that feedback inflates the later weights far beyond the per-row scales,
        # which come from the original weights, and k-means then spends its codewords on them.  Measured on
        # SmolLM2's layers.28.mlp.down_proj (one input with 1224x the mean Hessian diagonal): relative output
        # error 0.097 lazily, 0.0030 up front, against GPTQ 2-bit g64's 0.0031.
        for ct in range(geo["nct"]):
            c0, c1 = ct * geo["cols"], min((ct + 1) * geo["cols"], big_n)
            _init_books(books, w[:, c0:c1], s_full[:, c0:c1], diag[c0:c1], ct, geo, nb, d, gen)
    if cfg.act_order:
        # vector-level act-order: vectors visited by decreasing Hessian diagonal (their largest), so the error
        # of the most sensitive inputs is fed back onto every other column, as GPTQ's act-order does (0.0029 on
        # the layer above).  Only the visiting order changes: vectors stay d consecutive inputs, so the stored
        # layout is the same.
        order = torch.argsort(-diag.view(nvec, d).amax(1), stable=True)
        perm = (order[:, None] * d + torch.arange(d, device=dev)).reshape(-1)
    else:
        order = perm = None

    u = _inverse_cholesky(hp if order is None else hp[perm][:, perm], cfg.damp)  # once for every pass

    def assign(w, s_full, init):
        if order is None:
            return _assign_pass(w, u, books, s_full, diag, geo, spec, cfg, gen, init=init and lazy,
                                vec_tile=vec_tile)
        idx_p = _assign_pass(w[:, perm], u, books, s_full[:, perm], diag[perm], geo, spec, cfg, gen, init=False,
                             vec_tile=vec_tile[order])
        idx = torch.empty_like(idx_p)
        idx[:, :, order] = idx_p
        return idx

    idx = assign(w, s_full, init=True)
    books, scales = _refit(w0, h0, idx, books, scales, spec, geo)
    for _ in range(PASSES - 1):
        # assign again with the refitted codebooks and scales (from the original weights), refit again
        w = torch.nn.functional.pad(w0, (0, big_n - n))
        w[:, pad_or_dead] = 0
        s_full = _expand(scales, geo["group"], big_n)
        idx = assign(w, s_full, init=False)
        books, scales = _refit(w0, h0, idx, books, scales, spec, geo)
    return pack_vq_weight(idx, books, scales, spec, n)


def _assign_pass(w, u, books, s_full, diag, geo, spec, cfg, gen, init: bool, vec_tile: torch.Tensor) -> torch.Tensor:
    """One left-to-right pass of codeword assignment with GPTQ error feedback; ``w`` [out, N] is consumed.

    With ``init`` each column tile's codebooks are fitted (k-means) when the
    pass reaches the tile, from the weights as updated so far; else ``books``
    is used as it is.  ``vec_tile[v]``: the codebook column tile of the v-th
    vector visited (the columns may be a vector-wise permutation of the layer's,
    see act-order in :func:`vq`).  Returns the indices int64 [out, B, nvec] in
    visiting order.
    """
    out, big_n = w.shape
    d, nb, dev = spec.vq_dim, spec.vq_books, w.device
    nrt, nct, rows, cols = geo["nrt"], geo["nct"], geo["rows"], geo["cols"]
    nthreads = torch.get_num_threads()
    vt = vec_tile.tolist()
    idx = torch.zeros(out, nb, geo["nvec"], dtype=torch.long, device=dev)
    bs = max(cfg.block_size // d, 1) * d
    if cols <= bs:
        bs = cols * (bs // cols)  # a codebook tile never straddles a lazy block ...
    elif cols % bs:
        bs = cols  # ... so its init sees the weights as updated so far
    torch.set_num_threads(1)  # the column loop is many tiny ops (see gptq.py)
    try:
        for i1 in range(0, big_n, bs):
            i2 = min(i1 + bs, big_n)
            w1 = w[:, i1:i2].clone()
            err1 = torch.zeros_like(w1)
            for j in range(0, i2 - i1, d):
                col = i1 + j
                if init and col % cols == 0:
                    ct = col // cols
                    span = w1[:, j:j + cols] if j + cols <= i2 - i1 else w[:, col:col + cols]
                    torch.set_num_threads(nthreads)
                    _init_books(books, span, s_full[:, col:col + cols], diag[col:col + cols], ct, geo, nb, d, gen)
                    torch.set_num_threads(1)
                ct = vt[col // d]
                uj = u[col:col + d, col:col + d]
                m = torch.linalg.solve_triangular(uj, torch.eye(d, device=dev), upper=True)  # U_JJ⁻¹
                x = w1[:, j:j + d] / s_full[:, col:col + d]
                q = torch.zeros_like(x)
                for rt in range(nrt):
                    r0, r1 = rt * rows, min((rt + 1) * rows, out)
                    res = x[r0:r1]
                    for b in range(nb):
                        cb = books[rt * nct + ct, b]
                        k = _nearest(res @ m, cb @ m)
                        idx[r0:r1, b, col // d] = k
                        q[r0:r1] += cb[k]
                        res = res - cb[k]
                q = q * s_full[:, col:col + d]
                for a in range(d):
                    e = (w1[:, j + a] - q[:, a]) / u[col + a, col + a]
                    w1[:, j + a:] -= e[:, None] * u[col + a, col + a:i2][None, :]
                    err1[:, j + a] = e
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    finally:
        torch.set_num_threads(nthreads)

    return idx


def _rms_scales(w: torch.Tensor, g: int, nsg: int) -> torch.Tensor:
    out, n = w.shape
    wp = torch.nn.functional.pad(w, (0, nsg * g - n)).view(out, nsg, g)
    cnt = torch.tensor([min(g, n - i * g) for i in range(nsg)], dtype=torch.float32, device=w.device)
    s = (wp.pow(2).sum(-1) / cnt).sqrt()
    s = torch.where(s > 0, s, torch.ones_like(s)).half().float()
    return torch.where(s > 0, s, torch.full_like(s, 6e-8))  # float16 underflow


def _expand(scales: torch.Tensor, g: int, width: int) -> torch.Tensor:
    s = scales.repeat_interleave(g, 1)[:, :width]
    if s.shape[1] < width:
        s = torch.nn.functional.pad(s, (0, width - s.shape[1]), value=1.0)
    return s


def _init_books(books, span, s_span, diag_span, ct, geo, nb, d, gen) -> None:
    """k-means codebooks for every row tile of column tile ``ct`` from the current weights ``span`` [out, c]."""
    out = span.shape[0]
    rows, nct, kk = geo["rows"], geo["nct"], geo["K"]
    x = (span / s_span).reshape(out, -1, d)
    wt = (s_span.pow(2) * diag_span[None, :]).reshape(out, -1, d)
    for rt in range(geo["nrt"]):
        r0, r1 = rt * rows, min((rt + 1) * rows, out)
        pts, pw = x[r0:r1].reshape(-1, d), wt[r0:r1].reshape(-1, d)
        for b in range(nb):
            c = kmeans(pts, pw, kk, gen, max_points=KMEANS_POINTS_PER_CODEWORD * kk)
            books[rt * nct + ct, b] = c.half().float()  # what is stored is what the assignment assumes
            if b + 1 < nb:
                k, _ = _assign_weighted(pts, pw.clamp(min=1e-12), pw.clamp(min=1e-12) * pts, c)
                pts = pts - c[k]


def _reconstruct(idx, books, spec, geo, out) -> torch.Tensor:
    """Unscaled reconstruction float32 [out, N] (N = nvec · d) from indices and codebooks."""
    d, nb, kk, nct, nvec = spec.vq_dim, spec.vq_books, geo["K"], geo["nct"], geo["nvec"]
    dev = idx.device
    rt = torch.arange(out, device=dev) // geo["rows"]
    ctv = torch.arange(nvec, device=dev) * d // geo["cols"]
    tiles = rt[:, None] * nct + ctv[None, :]
    flat = books.reshape(-1, d)
    v = torch.zeros(out, nvec, d, device=dev)
    for b in range(nb):
        v += flat[(tiles * nb + b) * kk + idx[:, b]]
    return v.reshape(out, nvec * d), tiles


def _refit(w0, h0, idx, books, scales, spec, geo):
    """Alternate least-squares codebooks (CG) and per-row-group scales under H; returns float16-rounded both."""
    out, n = w0.shape
    g = geo["group"]
    for _ in range(REFIT_ROUNDS):
        books = _cg_books(w0, h0, idx, books, scales, spec, geo)
        q, _ = _reconstruct(idx, books, spec, geo, out)
        scales = refit_scales(w0, h0, q[:, :n], scales, torch.zeros_like(scales), g)
    return books, scales


def _objective(w0, h0, wh) -> float:
    dlt = w0 - wh
    return float(((dlt @ h0) * dlt).sum())


def _cg_books(w0, h0, idx, books, scales, spec, geo, iters: int = CG_ITERS) -> torch.Tensor:
    """Codebooks minimising tr((W − A(C)) H (W − A(C))ᵀ) for fixed indices, by conjugate gradients.

    A(C)[r, j] = s[r, j] · Σ_b C[tile, b, idx][j mod d]: linear in C, so the
    normal equations Aᵀ(A(C) H) = Aᵀ(W H) are solved by CG from the current
    codebooks (unused codewords get no gradient and stay put).  The result is
    kept only if the objective (with float16 codewords) drops.
    """
    out, n = w0.shape
    d, nb, kk, nvec = spec.vq_dim, spec.vq_books, geo["K"], geo["nvec"]
    big_n = nvec * d
    s = _expand(scales, geo["group"], big_n)
    _, tiles = _reconstruct(idx, books, spec, geo, out)
    rows_of = [((tiles * nb + b) * kk + idx[:, b]).reshape(-1) for b in range(nb)]  # flat codeword per (r, v)
    hp = torch.nn.functional.pad(h0, (0, big_n - n, 0, big_n - n))
    nflat = books.numel() // d

    def a_op(c: torch.Tensor) -> torch.Tensor:  # [nflat, d] -> [out, N]
        v = sum(c[r] for r in rows_of).reshape(out, big_n)
        return v * s

    def at_op(gm: torch.Tensor) -> torch.Tensor:  # [out, N] -> [nflat, d]
        gv = (gm * s).reshape(-1, d)
        res = torch.zeros(nflat, d, device=gm.device)
        for r in rows_of:
            res.index_add_(0, r, gv)
        return res

    wp = torch.nn.functional.pad(w0, (0, big_n - n))
    c = books.reshape(nflat, d).clone()
    lam = 1e-6 * float(torch.diag(h0).mean()) * float(scales.float().pow(2).mean())
    resid = at_op(wp @ hp) - at_op(a_op(c) @ hp) - lam * c
    p = resid.clone()
    rs = float((resid * resid).sum())
    rs0 = rs
    for _ in range(iters):
        if rs <= 1e-12 * rs0 or rs == 0:
            break
        ap = at_op(a_op(p) @ hp) + lam * p
        alpha = rs / max(float((p * ap).sum()), 1e-30)
        c = c + alpha * p
        resid = resid - alpha * ap
        rs_new = float((resid * resid).sum())
        p = resid + (rs_new / rs) * p
        rs = rs_new
    new = c.reshape(books.shape).half().float()
    old_obj = _objective(w0, h0, a_op(books.reshape(nflat, d))[:, :n])
    new_obj = _objective(w0, h0, a_op(new.reshape(nflat, d))[:, :n])
    return new if math.isfinite(new_obj) and new_obj < old_obj else books


#: --bits -> codebook layout (measured on SmolLM2-135M, docs/results/vq.md)
PRESETS = {
    2: dict(vq_dim=4, bits=8, vq_books=1, vq_rows=None, vq_cols=192),
    3: dict(vq_dim=2, bits=6, vq_books=1, vq_rows=None, vq_cols=192),
    4: dict(vq_dim=2, bits=8, vq_books=1, vq_rows=None, vq_cols=192),
}
_LAYOUT_KEYS = {"dim": "vq_dim", "index": "bits", "books": "vq_books", "rows": "vq_rows", "cols": "vq_cols",
                "group": "group_size"}


def vq_fields(bits: int, group_size: int | None, layout: str = "") -> dict:
    """QuantSpec fields for ``--method vq --bits BITS [--vq LAYOUT]``.

    ``bits`` picks a preset (about that many bits per weight); ``layout`` is a
    comma-separated override "dim=4,index=8,books=1,rows=none,cols=192,group=none".
    """
    if layout == "" and bits not in PRESETS:
        raise LeanqError(f"--method vq: no preset for --bits {bits} (have {sorted(PRESETS)}); give --vq LAYOUT")
    f = dict(PRESETS.get(bits, PRESETS[2]), group_size=group_size)
    for item in filter(None, (t.strip() for t in layout.split(","))):
        k, sep, v = item.partition("=")
        if not sep or k.strip() not in _LAYOUT_KEYS:
            raise LeanqError(f"--vq: expected KEY=VALUE with KEY in {', '.join(_LAYOUT_KEYS)}, got {item!r}")
        v = v.strip().lower()
        try:
            f[_LAYOUT_KEYS[k.strip()]] = None if v in ("none", "all") else int(v)
        except ValueError:
            raise LeanqError(f"--vq: {k} must be an integer or 'none', got {v!r}") from None
    return f


#: what a size plan with --method vq chooses from (leanq.hybrid): the vq presets, GPTQ integers, float16
VQ_CANDIDATES: tuple[QuantSpec, ...] = (
    QuantSpec(fmt="vq", group_size=None, **PRESETS[2]),
    QuantSpec(fmt="vq", group_size=None, **PRESETS[3]),
    QuantSpec(bits=3, group_size=128),
    QuantSpec(bits=4, group_size=128),
    QuantSpec(bits=8, group_size=None),
    QuantSpec(fmt="float", dtype="float16"),
)
