"""Batch-1 GEMV for single-plane int weights (2 and 4 bits) with paired fp16 arithmetic.

Layout: :mod:`leanq.kernels.triton_int`'s repack (word ``wi`` slot ``j`` of a GT-code sub-group tile
holds column ``j * WPG + wi``; CPW = 32 / bits codes per int32 word).

Why: the fp32 GEMV (:mod:`leanq.kernels.triton_fast`, gemv4) spends ~5 instructions per code
(shift, LOP3, FMA, plus activation and constant overhead), about as long as the weight bytes take
to arrive on an H100.  Here slots p and p + CPW/2 of a word sit 16 bits apart, so ONE shift and ONE
LOP3 put both codes into the two fp16 halves of a register as 1 + q / 2**b (the code moved to the
top b bits of each fp16 mantissa, OR-ed with 1.0), and ONE ``fma.rn.f16x2`` multiplies both by their
activations: 1.5 instructions per code.  Each word's half2 sum (CPW/2 products) is widened to fp32
before anything else is added, so fp16 rounding touches only sums of at most 8 products; the offset
and the zero point are folded into fp32 group constants exactly as in gemv4:

    sum (q - z) s x = A * sum(f x) - C * sum(x),  A = s 2**b,  C = s (2**b + z).

The fp16 activations are exact copies of bf16 ones in fp16's normal range (|x| in 6e-5 .. 65504).

``USE_ASM=False`` computes the same values with plain fp16 tensor ops (two roundings per product
instead of one); the CPU tests run that form under TRITON_INTERPRET=1, which has no inline PTX.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import Kernel, register_kernel
from . import triton_fast as tf
from . import triton_int as ti
from .triton_fast import _group_consts

# the tile config for this kernel (the sweep in benchmarks/kernels/bench_kernels.py fills it)
TUNED_H2: dict = {}


@triton.jit
def _pair_bits(w, P: tl.constexpr, B: tl.constexpr):
    """int32 holding two fp16 values 1 + q/2**B: low half slot P, high half slot P + CPW/2 (16 bits up)."""
    SH: tl.constexpr = (10 - B) - P * B  # code of slot P -> fp16 mantissa bits 10-B .. 9
    if SH >= 0:
        v = w << SH
    else:
        v = w >> (-SH)
    MASK: tl.constexpr = (((1 << B) - 1) << (10 - B)) * 65537  # the same field in both halves
    return (v & MASK) | 0x3C003C00


@triton.jit
def _half(bits, HI: tl.constexpr):
    """fp16 value of one half of an int32 (non-asm path)."""
    if HI:
        bits = bits >> 16
    return (bits & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _center_consts(s_ptr, z_ptr, offs_n, n_mask, ks, K, N, G, B: tl.constexpr, SYM: tl.constexpr,
                   EVEN: tl.constexpr):
    """A = s * 2**B (float32) and the int32 bits of the fp16 pair (1 + z/2**B, 1 + z/2**B), [BN, NGT]."""
    sz_off = (ks // G)[None, :].to(tl.int64) * N + offs_n[:, None]
    if EVEN:
        s = tl.load(s_ptr + sz_off).to(tl.float32)
    else:
        smask = n_mask[:, None] & (ks < K)[None, :]
        s = tl.load(s_ptr + sz_off, mask=smask, other=0.0).to(tl.float32)
    if SYM:
        z = tl.full(s.shape, 1 << (B - 1), tl.int32)
    elif EVEN:
        z = tl.load(z_ptr + sz_off).to(tl.int32)
    else:
        z = tl.load(z_ptr + sz_off, mask=smask, other=0).to(tl.int32)
    return s * ((1 << B) * 1.0), (0x3C00 | (z << (10 - B))) * 65537


@triton.jit
def _gemv_h2_kernel(x_ptr, out_ptr, bias_ptr, w_ptr, s_ptr, z_ptr, part_ptr, cnt_ptr, N, K, Kw, G, K_PER,
                    B: tl.constexpr, CPW: tl.constexpr, SYM: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BN: tl.constexpr, NGT: tl.constexpr, GT: tl.constexpr, EVEN: tl.constexpr,
                    USE_ASM: tl.constexpr, CENTER: tl.constexpr, SPLIT: tl.constexpr):
    """out[n] = sum_k x[k] (q[n, k] - z) s for BN rows n per program (batch 1); grid (N/BN, SPLIT).

    SPLIT > 1 (split-K, for layers with too few row blocks to keep every SM's memory pipe full):
    program (i, j) sums columns [j K_PER, (j+1) K_PER) into fp32 partials part[j, rows], then bumps
    the row block's counter; the last of the SPLIT programs to arrive adds the partials, writes the
    output and resets the counter to 0 (so one launch does it all and CUDA-graph replays stay valid).

    CENTER: subtract 1 + z/2**b from each fp16 pair before the product (exact: both have b fraction
    bits), so each product (q - z)/2**b * x is rounded once relative to itself; without it the products
    (1 + q/2**b) x carry the offset, whose rounding shows up after the fp32 fold (measured 5e-3 vs 1e-3
    relative error on the CPU emulation).  One more paired op per two codes, no activation sums."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    WPG: tl.constexpr = GT // CPW
    BK: tl.constexpr = NGT * GT
    H: tl.constexpr = CPW // 2
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    gi = tl.arange(0, NGT)
    wi = tl.arange(0, WPG)
    w_col = gi[None, :, None] * WPG + wi[None, None, :]
    w_off = offs_n[:, None, None].to(tl.int64) * Kw + w_col
    x_col = gi[:, None] * GT + wi[None, :]
    acc = tl.zeros([BN, NGT, WPG], dtype=tl.float32)
    k_lo = pid_k * K_PER
    for k0 in range(k_lo, tl.minimum(K, k_lo + K_PER), BK):
        if EVEN:
            w = tl.load(w_ptr + w_off + k0 // CPW)
        else:
            w = tl.load(w_ptr + w_off + k0 // CPW, mask=n_mask[:, None, None] & ((k0 // CPW + w_col) < Kw),
                        other=0)
        if CENTER:
            a, zb = _center_consts(s_ptr, z_ptr, offs_n, n_mask, k0 + gi * GT, K, N, G, B, SYM, EVEN)
            zb = zb[:, :, None]
            if not USE_ASM:
                zc = _half(zb, False)
        else:
            a, c = _group_consts(s_ptr, z_ptr, offs_n, n_mask, k0 + gi * GT, K, N, G, B, SYM, EVEN)
        xs = tl.zeros([NGT, WPG], dtype=tl.float32)
        t = tl.zeros([BN, NGT, WPG], dtype=tl.float32)
        if USE_ASM:
            t2 = tl.zeros([BN, NGT, WPG], dtype=tl.int32)  # packed half2 sums, +0.0 in both halves
        else:
            tlo = tl.zeros([BN, NGT, WPG], dtype=tl.float16)
            thi = tlo
        for p in tl.static_range(H):
            xa_k = k0 + x_col + p * WPG
            xb_k = xa_k + H * WPG
            if EVEN:
                xa = tl.load(x_ptr + xa_k).to(tl.float32)
                xb = tl.load(x_ptr + xb_k).to(tl.float32)
            else:
                xa = tl.load(x_ptr + xa_k, mask=xa_k < K, other=0.0).to(tl.float32)
                xb = tl.load(x_ptr + xb_k, mask=xb_k < K, other=0.0).to(tl.float32)
            if not CENTER:
                xs += xa + xb
            hb = _pair_bits(w, p, B)
            if USE_ASM:
                x2 = tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $2;", "=r,f,f", [xb, xa],
                                               dtype=tl.int32, is_pure=True, pack=1)
                x2 = x2[None, :, :].broadcast_to(hb.shape)
                if CENTER:
                    t2 = tl.inline_asm_elementwise(
                        "{ .reg .b32 d; sub.rn.f16x2 d, $1, $2; fma.rn.f16x2 $0, d, $3, $4; }", "=r,r,r,r,r",
                        [hb, zb.broadcast_to(hb.shape), x2, t2], dtype=tl.int32, is_pure=True, pack=1)
                else:
                    t2 = tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [hb, x2, t2],
                                                   dtype=tl.int32, is_pure=True, pack=1)
            else:
                hlo = _half(hb, False)
                hhi = _half(hb, True)
                if CENTER:
                    hlo -= zc
                    hhi -= zc
                tlo += hlo * xa.to(tl.float16)[None, :, :]
                thi += hhi * xb.to(tl.float16)[None, :, :]
        if USE_ASM:
            t += tl.inline_asm_elementwise(
                "{ .reg .b16 l, h; .reg .f32 fl, fh; mov.b32 {l, h}, $1; cvt.f32.f16 fl, l; cvt.f32.f16 fh, h; "
                "add.f32 $0, fl, fh; }", "=f,r", [t2], dtype=tl.float32, is_pure=True, pack=1)
        else:
            t += tlo.to(tl.float32) + thi.to(tl.float32)
        if CENTER:
            acc += a[:, :, None] * t
        else:
            acc += a[:, :, None] * t - c[:, :, None] * xs[None, :, :]
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if SPLIT > 1:
        tl.store(part_ptr + pid_k * N + offs_n, y, mask=n_mask)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            y = tl.zeros([BN], dtype=tl.float32)
            for j in tl.static_range(SPLIT):
                y += tl.load(part_ptr + j * N + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


_COUNTERS: dict = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 arrival counters, one buffer per device, shared by every launch on it (each
    launch leaves its counters at 0 again; launches on one stream run one after another)."""
    c = _COUNTERS.get(device)
    if c is None or c.numel() < n:
        c = _COUNTERS[device] = torch.zeros(max(n, 1 << 15), dtype=torch.int32, device=device)
    return c


if torch.cuda.is_available():  # allocate now, outside any CUDA-graph memory pool: a buffer first made
    # inside torch.compile's cudagraph warm-up stays in its pool and cudagraph trees reject it
    # ("tensor(s) in the cudagraph pool not tracked as outputs", seen in the 2026-11-27 decode run)
    _counters(torch.device("cuda", torch.cuda.current_device()), 1)


def split_for(N: int, K: int, cfg: dict, sms: int) -> int:
    """K splits: cfg["SPLIT"] when > 0, else double while the launch has fewer than ~48 warps per SM and
    each split keeps at least one K tile."""
    if cfg.get("SPLIT", 0) > 0:
        return cfg["SPLIT"]
    warps = triton.cdiv(N, cfg["BN"]) * cfg["num_warps"]
    s = 1
    while s < 8 and warps * s < 48 * sms and K // (cfg["BK"] * 2 * s) >= 1:
        s *= 2
    return s


def supported(pk: dict) -> bool:
    """2 and 4 bits.  (8-bit codes would need 8 of fp16's 10 fraction bits for q/256, and the rounded
    products then cost ~5e-3 relative error: 8-bit stays on the fp32 gemv4, which is memory bound there.)"""
    return len(pk["planes"]) == 1 and pk["bits"] in (2, 4)


def run_gemv_h2(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None, cfg: dict | None = None) -> torch.Tensor:
    """x2 [1, K] fp16/bf16 -> [1, N] of x2.dtype (2- and 4-bit layouts; see supported())."""
    M, K = x2.shape
    assert M == 1 and supported(pk), (M, pk["bits"])
    N = pk["N"]
    # least total time over the five Llama shapes in the 13:51 UTC H200 sweep (NOTES.md v4); split-K auto
    cfg = cfg or dict(BN=8, BK=512, num_warps=2, num_stages=1, SPLIT=0)
    out = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    gt = pk["gt"]
    ngt = max(cfg["BK"] // gt, 1)
    bk = ngt * gt
    even = N % cfg["BN"] == 0 and K % bk == 0
    sms = tf._sms(x2.device)
    split = split_for(N, K, dict(cfg, BK=bk), sms)
    k_per = triton.cdiv(triton.cdiv(K, split), bk) * bk  # each split starts on a tile edge
    split = triton.cdiv(K, k_per)
    nblk = triton.cdiv(N, cfg["BN"])
    part = torch.empty(split, N, device=x2.device, dtype=torch.float32) if split > 1 else out
    cnt = _counters(x2.device, nblk) if split > 1 else out
    use_asm = x2.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1" and not cfg.get("no_asm", False)
    center = cfg.get("CENTER", True)
    _gemv_h2_kernel[(nblk, split)](
        x2, out, bias if bias is not None else out, pk["planes"][0], pk["scales"], pk["zeros"], part, cnt,
        N, K, pk["Kw"], pk["group"], k_per, B=pk["bits"], CPW=pk["cpw"], SYM=pk["sym"], HAS_BIAS=bias is not None,
        BN=cfg["BN"], NGT=ngt, GT=gt, EVEN=even, USE_ASM=use_asm, CENTER=center, SPLIT=split,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def _supports(m, x) -> bool:
    return ti._base_ok(m, x) and x.dtype in (torch.float16, torch.bfloat16) and ti._rows(x) == 1 \
        and m.spec.bits in (2, 4)


def h2_linear(m, x: torch.Tensor) -> torch.Tensor:
    return tf._linear(m, x, "h2")


# priority 30: ahead of gemv4 (20) for the batch-1 2/4-bit case it covers
H2 = register_kernel(Kernel("triton-int-gemv-h2", "int", ("cuda",), _supports, h2_linear, priority=30,
                                layout="triton_int"))
