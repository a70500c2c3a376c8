"""Batch-1 codebook GEMV on a K-major index layout (the vq counterpart of :mod:`leanq.kernels.triton_kn`).

Layout ("vq-kn", built once from the stored tensors and cached; checkpoints do not change):

    idx     uint8  [B, nvec, N]   book b's index of vector v of output n (N contiguous; indices <= 8 bits)
    cb      words  [T·B·K]        the codebooks, one codeword of D float16 values per int32 (D = 2) or
                                  int64 (D = 4) word; float16 [T·B·K·D] for other D
    scales  fp32   [nsg, N]

Each program owns BV vectors (BV·D inputs) of BN outputs: it loads one [BV, BN] index tile with
coalesced loads, and there is no loop over the input: thousands of independent programs keep the
loads in flight, and each adds its partial sums to an fp32 scratch vector with one atomic add per
output; a small second kernel applies per-row scales, adds the bias, writes the output and zeroes
the scratch (as triton_kn does).  Two ways to turn indices into sums:

* direct (``LUT=False``): per (vector, output) one lookup of the codeword word (served from L1:
  a codebook tile is 2 KiB at the 2-bit preset) and D multiply-adds with the activations;
* table (``LUT=True``, D = 2 or 4, one book): first the dot products of all K codewords with the
  program's BV activation vectors, a [BV, K] table in registers, then one ``tl.gather`` per
  (vector, output): the lookup no longer costs D multiply-adds, and the codebook is read once
  per program rather than once per output.

The oracle is :func:`reference_vq_kn` (and the stored format's ``VQWeight.dequantize``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.vq import geometry, unpack_indices
from . import Kernel, cached_layout, register_kernel

_WORD = {2: torch.int32, 4: torch.int64}
# (BN, BV, warps): the best over the five Llama shapes in the H100 sweep of 2026-11-27 (docs/PERFORMANCE.md,
# benchmarks/kernels/results/vq-kn-h100-2026-11-27-sweep.jsonl); the table variant was slower everywhere there
DEFAULT_CFG = dict(BN=256, BV=8, num_warps=4, lut=False)
TUNED: dict = {(4, 8): dict(BN=512, BV=8, num_warps=4, lut=False),  # (D, index bits) -> cfg
               (2, 6): dict(BN=512, BV=8, num_warps=4, lut=False)}


def repack_vq_kn(qweight: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, spec, in_features: int) -> dict:
    """The vq-kn layout (module docstring) from the stored tensors."""
    out = qweight.shape[0]
    geo = geometry(spec, out, in_features)
    idx = unpack_indices(qweight, spec, in_features)  # [out, B, nvec]
    d = spec.vq_dim
    word = _WORD.get(d)
    cb = codebooks.contiguous()
    cb = cb.view(word).reshape(-1) if word is not None else cb.reshape(-1)
    return dict(idx=idx.permute(1, 2, 0).to(torch.uint8).contiguous(), cb=cb,
                scales=scales.float().t().contiguous(), N=out, K=in_features, D=d, IB=spec.bits, NB=spec.vq_books,
                nvec=geo["nvec"], rows=geo["rows"], cols=geo["cols"], nrt=geo["nrt"], nct=geo["nct"],
                group=geo["group"], nsg=geo["nsg"], packed=word is not None)


def reference_vq_kn(pk: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [N, K] decoded from the vq-kn layout in pure torch."""
    n, d, nb, kk = pk["N"], pk["D"], pk["NB"], 1 << pk["IB"]
    cb = pk["cb"].view(torch.float16).reshape(-1, nb, kk, d).float() if pk["packed"] else \
        pk["cb"].reshape(-1, nb, kk, d).float()
    v = torch.arange(pk["nvec"], device=cb.device)
    tile = (torch.arange(n, device=cb.device) // pk["rows"])[None, :] * pk["nct"] + (v * d // pk["cols"])[:, None]
    w = torch.zeros(pk["nvec"], n, d, device=cb.device)
    for b in range(nb):
        w += cb[tile, b, pk["idx"][b].long()]
    w = w.permute(1, 0, 2).reshape(n, -1)  # [N, nvec·D]
    s = pk["scales"].t().repeat_interleave(pk["group"], 1)[:, : w.shape[1]]
    if s.shape[1] < w.shape[1]:
        s = torch.nn.functional.pad(s, (0, w.shape[1] - s.shape[1]), value=1.0)
    return (w * s)[:, : pk["K"]].to(dtype)


@triton.jit
def _halves(word, j: tl.constexpr):
    """float32 of the j-th float16 of an int32/int64 word."""
    return ((word >> (16 * j)) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _vq_kn_kernel(x_ptr, acc_ptr, idx_ptr, cb_ptr, s_ptr, N, NVEC, K_IN, NSG, G, ROWS, COLS, NCT,
                  D: tl.constexpr, IB: tl.constexpr, NB: tl.constexpr, PACK: tl.constexpr, LUT: tl.constexpr,
                  ROW_SCALE: tl.constexpr, ROW_TILES: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr,
                  CB_EVICT: tl.constexpr = ""):
    """acc[n] += Σ_{v in block} s[g(v), n] Σ_b <C[t(n, v), b, idx[b, v, n]], x[v·D : v·D + D]>; grid (cdiv(N, BN), cdiv(NVEC, BV)).

    ROW_SCALE: one scale per row, applied by the finishing kernel instead."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    n = pid_n * BN + tl.arange(0, BN)
    v = pid_v * BV + tl.arange(0, BV)
    nm = n < N
    vm = v < NVEC
    KK: tl.constexpr = 1 << IB
    ct = (tl.minimum(v, NVEC - 1) * D) // COLS  # [BV] column tile of each vector
    if ROW_TILES:
        tile = (tl.minimum(n, N - 1) // ROWS)[None, :] * NCT + ct[:, None]  # [BV, BN]
    else:
        tile = ct[:, None]
    m2 = vm[:, None] & nm[None, :]
    part = tl.zeros([BV, BN], dtype=tl.float32)
    if LUT:  # one book, D = 2 or 4, tile by columns only: table of <codeword, x_v> then gathers
        kk = tl.arange(0, KK)
        words = tl.load(cb_ptr + ct[:, None] * KK + kk[None, :])  # [BV, KK]
        tab = tl.zeros([BV, KK], dtype=tl.float32)
        for j in tl.static_range(D):
            xj = tl.load(x_ptr + v * D + j, mask=vm & (v * D + j < K_IN), other=0.0).to(tl.float32)
            tab += _halves(words, j) * xj[:, None]
        q = tl.load(idx_ptr + v[:, None].to(tl.int64) * N + n[None, :], mask=m2, other=0).to(tl.int32)
        part = tl.gather(tab, q, axis=1)
    else:
        for b in tl.static_range(NB):
            q = tl.load(idx_ptr + (b * NVEC + v[:, None]).to(tl.int64) * N + n[None, :], mask=m2, other=0).to(tl.int32)
            e = (tile * NB + b) * KK + q
            if PACK:
                word = tl.load(cb_ptr + e, eviction_policy=CB_EVICT)
                for j in tl.static_range(D):
                    xj = tl.load(x_ptr + v * D + j, mask=vm & (v * D + j < K_IN), other=0.0).to(tl.float32)
                    part += _halves(word, j) * xj[:, None]
            else:
                for j in tl.static_range(D):
                    xj = tl.load(x_ptr + v * D + j, mask=vm & (v * D + j < K_IN), other=0.0).to(tl.float32)
                    part += tl.load(cb_ptr + e * D + j).to(tl.float32) * xj[:, None]
    if not ROW_SCALE:
        sg = tl.minimum((v * D) // G, NSG - 1)
        part *= tl.load(s_ptr + sg[:, None] * N + n[None, :], mask=m2, other=0.0)
    tl.atomic_add(acc_ptr + n, tl.sum(part, axis=0), mask=nm, sem="relaxed")


@triton.jit
def _finish_kernel(acc_ptr, out_ptr, bias_ptr, s_ptr, N, HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr,
                   BLOCK: tl.constexpr):
    """out = sums (· row scale) (+ bias) in the output dtype; the sums are zeroed for the next launch."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    y = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    if ROW_SCALE:
        y *= tl.load(s_ptr + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(acc_ptr + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=mask)


def lut_ok(pk: dict) -> bool:
    return pk["packed"] and pk["NB"] == 1 and pk["nrt"] == 1


def run_vq_kn(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None, cfg: dict | None = None) -> torch.Tensor:
    """x2 [1, K] (fp16/bf16/fp32) -> [1, N] of x2.dtype."""
    from .triton_kn import _scratch

    M, K = x2.shape
    assert M == 1 and K == pk["K"], (M, K, pk["K"])
    cfg = cfg or TUNED.get((pk["D"], pk["IB"])) or DEFAULT_CFG
    N = pk["N"]
    bn, bv = cfg["BN"], cfg["BV"]
    lut = bool(cfg.get("lut", False)) and lut_ok(pk)
    row_scale = pk["nsg"] == 1
    out = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    acc, _ = _scratch(x2.device, N)
    _vq_kn_kernel[(triton.cdiv(N, bn), triton.cdiv(pk["nvec"], bv))](
        x2, acc, pk["idx"], pk["cb"], pk["scales"], N, pk["nvec"], K, pk["nsg"], pk["group"], pk["rows"], pk["cols"],
        pk["nct"], D=pk["D"], IB=pk["IB"], NB=pk["NB"], PACK=pk["packed"], LUT=lut, ROW_SCALE=row_scale,
        ROW_TILES=pk["nrt"] > 1, BN=bn, BV=bv, CB_EVICT=cfg.get("cb_evict", ""), num_warps=cfg["num_warps"],
        num_stages=1)
    _finish_kernel[(triton.cdiv(N, 1024),)](acc, out, bias if bias is not None else out, pk["scales"], N,
                                            HAS_BIAS=bias is not None, ROW_SCALE=row_scale, BLOCK=1024, num_warps=4)
    return out


def packed_vq_kn(m) -> dict:
    """The vq-kn layout of vq QuantLinear ``m``, built at first use and cached (kernels.cached_layout)."""
    return cached_layout(m, "triton_vq_kn", "vq_kn_only", lambda: repack_vq_kn(
        m.qweight, m.codebooks, m.scales, m.spec, m.in_features), names=("qweight", "codebooks", "scales"))


def _supports(m, x) -> bool:
    spec = getattr(m, "spec", None)
    return (getattr(m, "fmt", None) == "vq" and spec is not None and spec.bits <= 8
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and x.shape[-1] == m.in_features
            and x.numel() == x.shape[-1])


def _linear(m, x: torch.Tensor) -> torch.Tensor:
    pk = packed_vq_kn(m)
    x2 = x.reshape(1, -1)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    y = run_vq_kn(x2, pk, m.bias.to(x.dtype) if m.bias is not None else None)
    return y.reshape(*x.shape[:-1], m.out_features)


# priority 30: ahead of the row-major LUT GEMV (20) at batch 1
VQ_KN = register_kernel(Kernel("triton-vq-kn-gemv", "vq", ("cuda",), _supports, _linear, priority=30,
                                 layout="triton_vq_kn"))
