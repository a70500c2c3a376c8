"""Version 4 of leanq's Triton int kernels: fewer instructions per code, rows amortize the activations.

Same repacked layout as :mod:`leanq.kernels.triton_int` (bit planes, codes
permuted inside each GT-code sub-group tile so that word ``wi`` slot ``j``
holds column ``j * WPG + wi``; scales/zeros transposed to [ngroups, out]).

Decode (why it is cheap): a b-bit code q is moved to the top b bits of a
float32 mantissa and OR-ed with the bits of 1.0, giving f = 1 + q / 2**b
exactly: one shift (compile-time amount, direction chosen per slot) and one
AND/OR (a single LOP3 on the GPU) per code, no int->float conversion and no
subtraction.  The offset is folded into the group constants:

    (q - z) * s = A * f - C,   A = s * 2**b,   C = s * (2**b + z)

so a dot product over a sub-group is  A * sum(f x) - C * sum(x).

Kernels:

* ``gemv4`` (batch 1-4, CUDA cores): a program owns BN weight rows; the word
  tile is [BN, NGT, WPG] and the activation slice of slot j is [NGT, WPG],
  broadcast over the rows, so each thread converts an activation once for
  all the rows it holds (v3 had one row per program: every code paid for
  an activation load, convert and sum).  Per code: shift, LOP3, FMA.
* ``wdot`` (batch 5+, tensor cores): the dequantized weight tile is the *A*
  operand: out^T [BN, BMX] = W [BN, BK] @ x^T [BK, BMX], so 16 activation
  rows fill the MMA's N side instead of padding M to 16 or 64, and each
  weight code is dequantized once per activation tile (one FMA after the
  decode).  Optional split-K (SPLIT programs along K, fp32 partials summed
  afterwards) fills the GPU when out/BN programs are too few.

Both are checked against :mod:`leanq.kernels.reference` in
tests/test_kernels_triton_fast.py (CPU: TRITON_INTERPRET=1) and in
benchmarks/kernels/bench_kernels.py before timing.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import Kernel, register_kernel
from . import triton_int as ti

# batches up to this size take gemv4, larger ones wdot (benchmarks/kernels/NOTES.md)
GEMV4_MAX_M = int(os.environ.get("LEANQ_GEMV4_MAX_M", "4"))


@triton.jit
def _place(w, SRC: tl.constexpr, DST: tl.constexpr, WIDTH: tl.constexpr):
    """Bits SRC .. SRC+WIDTH of w moved to DST .. DST+WIDTH, everything else cleared (one shift, one AND)."""
    if SRC <= DST:
        v = w << (DST - SRC)
    else:
        v = w >> (SRC - DST)  # arithmetic shift: the sign copies land above DST+WIDTH and are masked off
    return v & (((1 << WIDTH) - 1) << DST)


@triton.jit
def _code_f(w0, w1, w2, J: tl.constexpr, B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr):
    """float32 1 + q / 2**b for the code in slot J of each word (planes combined), same layout as the words."""
    BT: tl.constexpr = B0 + B1 + B2
    r = _place(w0, J * B0, 23 - BT, B0)
    if B1 > 0:
        r |= _place(w1, J * B1, 23 - BT + B0, B1)
    if B2 > 0:
        r |= _place(w2, J * B2, 23 - BT + B0 + B1, B2)
    return (r | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _load_words_nomask(w0_ptr, w1_ptr, w2_ptr, off, B1: tl.constexpr, B2: tl.constexpr):
    w0 = tl.load(w0_ptr + off).to(tl.int32)
    w1 = w0
    w2 = w0
    if B1 > 0:
        w1 = tl.load(w1_ptr + off).to(tl.int32)
    if B2 > 0:
        w2 = tl.load(w2_ptr + off).to(tl.int32)
    return w0, w1, w2


@triton.jit
def _group_consts(s_ptr, z_ptr, offs_n, n_mask, ks, K, N, G, BT: tl.constexpr, SYM: tl.constexpr,
                  EVEN: tl.constexpr = False):
    """A = s * 2**b and C = s * (2**b + z), [BN, NGT] float32, for sub-groups starting at columns ks."""
    sz_off = (ks // G)[None, :].to(tl.int64) * N + offs_n[:, None]
    if EVEN:
        s = tl.load(s_ptr + sz_off).to(tl.float32)
    else:
        smask = n_mask[:, None] & (ks < K)[None, :]
        s = tl.load(s_ptr + sz_off, mask=smask, other=0.0).to(tl.float32)
    if SYM:
        z = (1 << (BT - 1)) * 1.0
    elif EVEN:
        z = tl.load(z_ptr + sz_off).to(tl.float32)
    else:
        z = tl.load(z_ptr + sz_off, mask=smask, other=0).to(tl.float32)
    return s * ((1 << BT) * 1.0), s * ((1 << BT) + z)


@triton.jit
def _split_fixup(y, out_ptr, bias_ptr, part_ptr, cnt_ptr, pid_n, pid_k, offs_n, n_mask, N,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """Split-K in one launch: store this program's fp32 partial row sums y [BN] at part[pid_k], bump the
    row block's arrival counter; the last of the SPLIT programs adds the partials (+ bias), writes the
    output row and resets the counter to 0 (CUDA-graph replays find it zeroed again)."""
    tl.store(part_ptr + pid_k * N + offs_n, y, mask=n_mask)
    tl.debug_barrier()  # every thread's partial is written before the counter moves
    arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLIT - 1:
        y = tl.zeros_like(y)
        for j in tl.static_range(SPLIT):
            y += tl.load(part_ptr + j * N + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)
        tl.atomic_xchg(cnt_ptr + pid_n, 0)


@triton.jit
def _gemv4_kernel(x_ptr, out_ptr, bias_ptr, w0_ptr, w1_ptr, w2_ptr, s_ptr, z_ptr, part_ptr, cnt_ptr,
                  M, N, K, Kw, G, stride_xm, stride_om, K_PER,
                  B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, CPW: tl.constexpr,
                  SYM: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, NGT: tl.constexpr, GT: tl.constexpr, EVEN: tl.constexpr,
                  SPLIT: tl.constexpr = 1):
    """out[m, n] = sum_k x[m, k] (q[n, k] - z) s for BN rows n and BM (1, 2 or 4) rows m;
    grid (N/BN, M/BM, SPLIT).  SPLIT > 1 (BM = 1 only): split-K with the arrival-counter fixup of
    :func:`_split_fixup`.

    EVEN: N % BN == 0, K % BK == 0 and M % BM == 0, so no load needs a mask (masks cost a compare per
    vector and keep ptxas from folding the per-slot address offsets into the loads)."""
    pid_n = tl.program_id(0)
    m0 = tl.program_id(1) * BM
    WPG: tl.constexpr = GT // CPW
    BK: tl.constexpr = NGT * GT
    BT: tl.constexpr = B0 + B1 + B2
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    gi = tl.arange(0, NGT)
    wi = tl.arange(0, WPG)
    w_col = gi[None, :, None] * WPG + wi[None, None, :]  # [1, NGT, WPG]
    w_off = offs_n[:, None, None].to(tl.int64) * Kw + w_col
    x_col = gi[:, None] * GT + wi[None, :]  # [NGT, WPG]; slot j adds j * WPG
    x0_ptr = x_ptr + m0.to(tl.int64) * stride_xm
    # activation rows past M: a zero limit masks their loads and stores
    K1 = tl.where(m0 + 1 < M, K, 0)
    K2 = tl.where(m0 + 2 < M, K, 0)
    K3 = tl.where(m0 + 3 < M, K, 0)
    acc0 = tl.zeros([BN, NGT, WPG], dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    k_lo = tl.program_id(2) * K_PER
    for k0 in range(k_lo, tl.minimum(K, k_lo + K_PER), BK):
        if EVEN:
            w0, w1, w2 = _load_words_nomask(w0_ptr, w1_ptr, w2_ptr, w_off + k0 // CPW, B1, B2)
        else:
            wmask = n_mask[:, None, None] & ((k0 // CPW + w_col) < Kw)
            w0, w1, w2 = ti._load_words(w0_ptr, w1_ptr, w2_ptr, w_off + k0 // CPW, wmask, B1, B2)
        a, c = _group_consts(s_ptr, z_ptr, offs_n, n_mask, k0 + gi * GT, K, N, G, BT, SYM, EVEN)
        a = a[:, :, None]
        c = c[:, :, None]
        t0 = tl.zeros([BN, NGT, WPG], dtype=tl.float32)
        t1 = t0
        t2 = t0
        t3 = t0
        xs0 = tl.zeros([NGT, WPG], dtype=tl.float32)
        xs1 = xs0
        xs2 = xs0
        xs3 = xs0
        for j in tl.static_range(CPW):
            f = _code_f(w0, w1, w2, j, B0, B1, B2)
            xk = k0 + x_col + j * WPG
            if EVEN:
                xv = tl.load(x0_ptr + xk).to(tl.float32)
            else:
                xv = tl.load(x0_ptr + xk, mask=xk < K, other=0.0).to(tl.float32)
            t0 += f * xv[None, :, :]
            xs0 += xv
            if BM > 1:
                if EVEN:
                    xv = tl.load(x0_ptr + stride_xm + xk).to(tl.float32)
                else:
                    xv = tl.load(x0_ptr + stride_xm + xk, mask=xk < K1, other=0.0).to(tl.float32)
                t1 += f * xv[None, :, :]
                xs1 += xv
            if BM > 2:
                if EVEN:
                    xv = tl.load(x0_ptr + 2 * stride_xm + xk).to(tl.float32)
                else:
                    xv = tl.load(x0_ptr + 2 * stride_xm + xk, mask=xk < K2, other=0.0).to(tl.float32)
                t2 += f * xv[None, :, :]
                xs2 += xv
                if EVEN:
                    xv = tl.load(x0_ptr + 3 * stride_xm + xk).to(tl.float32)
                else:
                    xv = tl.load(x0_ptr + 3 * stride_xm + xk, mask=xk < K3, other=0.0).to(tl.float32)
                t3 += f * xv[None, :, :]
                xs3 += xv
        acc0 += a * t0 - c * xs0[None, :, :]
        if BM > 1:
            acc1 += a * t1 - c * xs1[None, :, :]
        if BM > 2:
            acc2 += a * t2 - c * xs2[None, :, :]
            acc3 += a * t3 - c * xs3[None, :, :]
    if SPLIT > 1:
        _split_fixup(tl.sum(tl.sum(acc0, axis=2), axis=1), out_ptr, bias_ptr, part_ptr, cnt_ptr, pid_n,
                     tl.program_id(2), offs_n, n_mask, N, HAS_BIAS, SPLIT)
        return
    bias = tl.zeros([BN], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    o_ptr = out_ptr + m0.to(tl.int64) * stride_om + offs_n
    DT: tl.constexpr = out_ptr.dtype.element_ty
    tl.store(o_ptr, (tl.sum(tl.sum(acc0, axis=2), axis=1) + bias).to(DT), mask=n_mask)
    if BM > 1:
        tl.store(o_ptr + stride_om, (tl.sum(tl.sum(acc1, axis=2), axis=1) + bias).to(DT),
                 mask=offs_n < tl.where(K1 > 0, N, 0))
    if BM > 2:
        tl.store(o_ptr + 2 * stride_om, (tl.sum(tl.sum(acc2, axis=2), axis=1) + bias).to(DT),
                 mask=offs_n < tl.where(K2 > 0, N, 0))
        tl.store(o_ptr + 3 * stride_om, (tl.sum(tl.sum(acc3, axis=2), axis=1) + bias).to(DT),
                 mask=offs_n < tl.where(K3 > 0, N, 0))


@triton.jit
def _wtile(w0_ptr, w1_ptr, w2_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, N, K, Kw, G,
           B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, CPW: tl.constexpr, SYM: tl.constexpr,
           BN: tl.constexpr, NGT: tl.constexpr, GT: tl.constexpr, DT: tl.constexpr):
    """Dequantized weights [BN, NGT*GT] (dtype DT), natural column order, for rows offs_n from column k0.

    The words [BN, NGT, WPG] are expanded to [BN, NGT, CPW, WPG] (slot second to last), which flattens
    to natural column order; the per-slot shift amounts are compile-time constants per register.
    """
    WPG: tl.constexpr = GT // CPW
    BT: tl.constexpr = B0 + B1 + B2
    gi = tl.arange(0, NGT)
    wi = tl.arange(0, WPG)
    sh = tl.arange(0, CPW)[None, None, :, None]
    w_col = k0 // CPW + gi[None, :, None] * WPG + wi[None, None, :]
    wmask = n_mask[:, None, None] & (w_col < Kw)
    w0, w1, w2 = ti._load_words(w0_ptr, w1_ptr, w2_ptr, offs_n[:, None, None].to(tl.int64) * Kw + w_col,
                                wmask, B1, B2)
    # code of slot j moved to the top BT mantissa bits (low bits first): (w >> j*B) << (23 - BT + offset)
    r = ((w0[:, :, None, :] >> (sh * B0)) & ((1 << B0) - 1)) << (23 - BT)
    if B1 > 0:
        r |= ((w1[:, :, None, :] >> (sh * B1)) & ((1 << B1) - 1)) << (23 - BT + B0)
    if B2 > 0:
        r |= ((w2[:, :, None, :] >> (sh * B2)) & ((1 << B2) - 1)) << (23 - BT + B0 + B1)
    f = (r | 0x3F800000).to(tl.float32, bitcast=True)
    a, c = _group_consts(s_ptr, z_ptr, offs_n, n_mask, k0 + gi * GT, K, N, G, BT, SYM)
    w = f * a[:, :, None, None] - c[:, :, None, None]
    return tl.reshape(w.to(DT), [BN, NGT * GT])


@triton.jit
def _wdot_kernel(x_ptr, out_ptr, bias_ptr, w0_ptr, w1_ptr, w2_ptr, s_ptr, z_ptr,
                 M, N, K, Kw, G, stride_xm, stride_om, stride_os, K_PER,
                 B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, CPW: tl.constexpr,
                 SYM: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BMX: tl.constexpr, BN: tl.constexpr, NGT: tl.constexpr, GT: tl.constexpr):
    """out^T[n, m] = sum_k W[n, k] x[m, k]; grid (N/BN, M/BMX, SPLIT).  With SPLIT > 1 the program
    along axis 2 covers columns [pid*K_PER, (pid+1)*K_PER) and writes fp32 partials at out + pid*stride_os
    (bias then added by the caller)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    BK: tl.constexpr = NGT * GT
    DT: tl.constexpr = x_ptr.dtype.element_ty
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = pid_m * BMX + tl.arange(0, BMX)
    n_mask = offs_n < N
    m_mask = offs_m < M
    cols = tl.arange(0, BK)
    x_base = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros([BN, BMX], dtype=tl.float32)
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(K, k_lo + K_PER)
    for k0 in range(k_lo, k_hi, BK):
        w = _wtile(w0_ptr, w1_ptr, w2_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, N, K, Kw, G,
                   B0, B1, B2, CPW, SYM, BN, NGT, GT, DT)
        xk = k0 + cols
        xv = tl.load(x_base + xk[None, :], mask=m_mask[:, None] & (xk < k_hi)[None, :], other=0.0)
        acc = tl.dot(w, tl.trans(xv), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    o_ptr = out_ptr + pid_k.to(tl.int64) * stride_os + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
    tl.store(o_ptr, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


# ---------------------------------------------------------------------------
# launch

# (kind, batch) -> config; the sweep in benchmarks/kernels/bench_kernels.py fills it; defaults below
TUNED: dict[tuple[str, int], dict] = {}


def default_config(kind: str, M: int, N: int, K: int, bits: int) -> dict:
    """Tile sizes per path (measured choices: benchmarks/kernels/NOTES.md)."""
    ms = sorted(b for (k, b) in TUNED if k == kind)
    if ms:
        b = next((b for b in ms if b >= M), ms[-1])
        cfg = dict(TUNED[(kind, b)])
        if kind == "gemv4":
            cfg["BM"] = 1 if M == 1 else 2 if M == 2 else 4
        return cfg
    if kind == "gemv4":  # H200 runs of 2026-11-27 (NOTES.md): batch 1 8 rows x 2048 codes, 2 warps
        if M == 1:  # 8-bit sweep winner (13:51 UTC); 2048-code tiles spilled registers at 8 bits
            return dict(BM=1, BN=16, BK=512, num_warps=4, num_stages=1, SPLIT=0)
        return dict(BM=2 if M == 2 else 4, BN=32, BK=1024, num_warps=8, num_stages=1)
    if M <= 16:
        return dict(BMX=16, BN=64, BK=128, SPLIT=0, num_warps=4, num_stages=3)
    if M <= 64:
        return dict(BMX=64, BN=64, BK=128, SPLIT=1, num_warps=4, num_stages=3)
    return dict(BMX=128, BN=128, BK=64, SPLIT=1, num_warps=8, num_stages=3)


@functools.cache
def _sms_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(dev: torch.device) -> int:
    """SM count (cached: the property query costs host time on every launch otherwise)."""
    return _sms_of(dev.index if dev.index is not None else torch.cuda.current_device()) if dev.type == "cuda" else 8


def run_gemv4(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None, cfg: dict | None = None) -> torch.Tensor:
    """x2 [M, K] (fp16/bf16/fp32, unit stride along K) -> [M, N] of x2.dtype."""
    M, K = x2.shape
    N = pk["N"]
    cfg = cfg or default_config("gemv4", M, N, K, pk["bits"])
    out = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    planes, (b0, b1, b2), gt, ngt = ti._common(pk, cfg["BK"])
    bm = cfg.get("BM", 1)
    bk = ngt * gt
    split = 1
    if M == 1 and bm == 1:
        from .triton_half2 import _counters
        from .triton_half2 import split_for as split_h2

        split = split_h2(N, K, dict(cfg, BK=bk, SPLIT=cfg.get("SPLIT", 1)), _sms(x2.device))
    k_per = triton.cdiv(triton.cdiv(K, split), bk) * bk
    split = triton.cdiv(K, k_per)
    nblk = triton.cdiv(N, cfg["BN"])
    part = torch.empty(split, N, device=x2.device, dtype=torch.float32) if split > 1 else out
    cnt = _counters(x2.device, nblk) if split > 1 else out
    grid = (nblk, triton.cdiv(M, bm), split)
    even = N % cfg["BN"] == 0 and K % bk == 0 and M % bm == 0
    _gemv4_kernel[grid](x2, out, bias if bias is not None else out, *planes, pk["scales"], pk["zeros"], part, cnt,
                        M, N, K, pk["Kw"], pk["group"], x2.stride(0), out.stride(0), k_per,
                        B0=b0, B1=b1, B2=b2, CPW=pk["cpw"], SYM=pk["sym"], HAS_BIAS=bias is not None,
                        BM=bm, BN=cfg["BN"], NGT=ngt, GT=gt, EVEN=even, SPLIT=split, num_warps=cfg["num_warps"],
                        num_stages=cfg["num_stages"])
    return out


def split_for(M: int, N: int, K: int, cfg: dict, sms: int) -> int:
    """K splits: cfg["SPLIT"] if > 0, else enough programs for ~2 waves on ``sms`` SMs (at most 8, and each
    split at least 4 K-tiles long)."""
    if cfg["SPLIT"] > 0:
        return cfg["SPLIT"]
    tiles = triton.cdiv(N, cfg["BN"]) * triton.cdiv(M, cfg["BMX"])
    ktiles = triton.cdiv(K, cfg["BK"])
    s = 1
    while s < 8 and tiles * s < 2 * sms and ktiles // (2 * s) >= 4:
        s *= 2
    return s


def run_wdot(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None, cfg: dict | None = None) -> torch.Tensor:
    """x2 [M, K] fp16/bf16 -> [M, N] via tensor cores, weight tile as the A operand."""
    M, K = x2.shape
    N = pk["N"]
    cfg = cfg or default_config("wdot", M, N, K, pk["bits"])
    planes, (b0, b1, b2), gt, ngt = ti._common(pk, cfg["BK"])
    bk = ngt * gt
    split = split_for(M, N, K, cfg, _sms(x2.device))
    k_per = triton.cdiv(triton.cdiv(K, split), bk) * bk  # every split starts on a tile (and sub-group) edge
    split = triton.cdiv(K, k_per)
    if split == 1:
        out = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
        b = bias
    else:
        out = torch.empty(split, M, N, device=x2.device, dtype=torch.float32)
        b = None
    grid = (triton.cdiv(N, cfg["BN"]), triton.cdiv(M, cfg["BMX"]), split)
    _wdot_kernel[grid](x2, out, b if b is not None else out, *planes, pk["scales"], pk["zeros"],
                       M, N, K, pk["Kw"], pk["group"], x2.stride(0), out.stride(-2),
                       out.stride(0) if split > 1 else 0, k_per,
                       B0=b0, B1=b1, B2=b2, CPW=pk["cpw"], SYM=pk["sym"], HAS_BIAS=b is not None,
                       BMX=cfg["BMX"], BN=cfg["BN"], NGT=ngt, GT=gt,
                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split == 1:
        return out
    y = out.sum(0)
    if bias is not None:
        y += bias.float()
    return y.to(x2.dtype)


# ---------------------------------------------------------------------------
# dispatch


def _supports_gemv4(m, x) -> bool:
    return ti._base_ok(m, x) and x.dtype in (torch.float16, torch.bfloat16, torch.float32) \
        and ti._rows(x) <= GEMV4_MAX_M


def _supports_wdot(m, x) -> bool:
    return ti._base_ok(m, x) and x.dtype in (torch.float16, torch.bfloat16) and ti._rows(x) > GEMV4_MAX_M


def _linear_impl(x: torch.Tensor, planes: list[torch.Tensor], scales: torch.Tensor, zeros: torch.Tensor,
                 bias: torch.Tensor | None, bits: int, sym: bool, K: int, N: int, Kw: int, group: int, gt: int,
                 path: str) -> torch.Tensor:
    """The kernels as one opaque op, so torch.compile (and its CUDA graphs) take them whole."""
    pk = dict(planes=list(planes), scales=scales, zeros=zeros, bits=bits, sym=sym, K=K, N=N, Kw=Kw, group=group,
              gt=gt, cpw=ti.codes_per_word(bits))
    return _run(path, x, pk, bias)


def _run(path: str, x2: torch.Tensor, pk: dict, bias: torch.Tensor | None) -> torch.Tensor:
    if path == "gemv4":
        return run_gemv4(x2, pk, bias)
    if path == "h2":
        from .triton_half2 import TUNED_H2, run_gemv_h2

        return run_gemv_h2(x2, pk, bias, TUNED_H2 or None)
    return run_wdot(x2, pk, bias)


try:
    _linear_op = torch.library.custom_op("leanq::triton_fast_linear", mutates_args=())(_linear_impl)

    @_linear_op.register_fake
    def _(x, planes, scales, zeros, bias, bits, sym, K, N, Kw, group, gt, path):
        return x.new_empty(x.shape[0], N)
except Exception:  # an older torch that cannot register it: compiled models call the launcher directly
    _linear_op = None


def _linear(m, x: torch.Tensor, path: str) -> torch.Tensor:
    pk = ti.packed_for(m)
    bias = m.bias.to(x.dtype) if m.bias is not None else None
    x2 = ti._flat(m, x)
    if _linear_op is not None and torch.compiler.is_compiling():
        y = _linear_op(x2, pk["planes"], pk["scales"], pk["zeros"], bias, pk["bits"], pk["sym"], pk["K"], pk["N"],
                       pk["Kw"], pk["group"], pk["gt"], path)
    else:  # eager: skip the op dispatcher's overhead
        y = _run(path, x2, pk, bias)
    return y.reshape(*x.shape[:-1], m.out_features)


def gemv4_linear(m, x: torch.Tensor) -> torch.Tensor:
    return _linear(m, x, "gemv4")


def wdot_linear(m, x: torch.Tensor) -> torch.Tensor:
    return _linear(m, x, "wdot")


# priority 20: ahead of the v3 kernels (10), which stay registered as the fallback for what these decline
GEMV4 = register_kernel(Kernel("triton-int-gemv4", "int", ("cuda",), _supports_gemv4, gemv4_linear, priority=20,
                                   layout="triton_int"))
WDOT = register_kernel(Kernel("triton-int-wdot", "int", ("cuda",), _supports_wdot, wdot_linear, priority=20,
                                  layout="triton_int"))
