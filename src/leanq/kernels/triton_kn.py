"""GEMV and small-batch GEMM on a K-major word layout: many tiny programs, fp32 atomics.

Layout ("kn"): words [Kw, N] int32, N contiguous.  Each word holds E = 32 / bits codes of one
output column n (slot j at bits j*bits).  Inputs are taken in spans of P (a power of two <= 128
dividing the group); inside a span, slot j of word row r holds input ``span0 + j * P/E + r``, so one
slot of a word tile meets one contiguous slice of x.  Scales [ngroups, N] (model float dtype) and
zero points [ngroups, N] uint8, as in :mod:`leanq.kernels.triton_int`.

Why this shape (the row-major kernels stall at ~30% of the copy bandwidth, NOTES.md v4): a row of
a word tile is BN consecutive int32 of one memory row, so a warp reads 512 contiguous bytes per load
instruction, and every program is one load of a [BK/E, BN] tile (8-32 KB), one decode and one
atomic add: nothing waits on a loop-carried dependency, so the SMs keep as many tiles in flight as
their registers allow (the hardware does the pipelining that Triton does not do for non-dot loads).

Per program (one column block, one block of BK <= group inputs, so one scale row):

    t[n] = sum_k (1 + q[k, n] / 2**b) x[k]        (code moved into the fp32 mantissa: shift, LOP3, FFMA)
    y[n] = s[n] (2**b (t[n] - sx) - z[n] sx),   sx = sum_k x[k]

(``h2``: the same sum in paired fp16, see :func:`_h2_part`.)  ``y`` goes into a zeroed fp32 scratch
vector by ``atomic_add``; a second small kernel writes the output (plus bias) in x's dtype and zeroes
the scratch again, so the next launch or CUDA-graph replay finds it clean.  (``tail="counter"``: one
launch instead, the last program of each column block, found by an arrival counter, writes it; that
measured ~3-5 us slower on the H100.)

Batches 2-64 (2/4 bits) run on tensor cores from the same words (:func:`run_dot_kn`); larger ones use
:func:`dequantize_kn` + cuBLAS (prefill), so a model keeps only this layout in memory.  The pure-torch oracle is :func:`reference_kn` (and the stored
format's :mod:`leanq.kernels.reference`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..formats.intq import group_size_of, num_groups
from ..formats.packing import unpack
from . import Kernel, cached_layout, drop_stored, int_layer_for, register_kernel
from .triton_half2 import _half

BITS = (2, 4, 8)  # widths that divide 32: one plane of E = 32 / bits slots
# (BN, BK, num_warps) for batch 1: the best total over the five Llama shapes, H100 sweep of 2026-11-27
# 18:24 UTC (NOTES.md); bench_kernels.py --sweep-kn measures the alternatives and fills TUNED_KN
DEFAULT_CFG = dict(BN=256, BK=128, num_warps=4)
TUNED_KN: dict = {}  # bits -> cfg


def span_of(group: int, bits: int) -> int:
    """P: the permutation span (codes) of the layout: the largest power of two <= 128 dividing the group;
    0 when it does not hold E = 32 / bits codes (the layout then does not apply)."""
    p = min(group & -group, 128)
    return p if p >= 32 // bits else 0


def k_span(group: int, bits: int, want: int) -> int:
    """K codes per program: a power of two dividing the span P, holding whole words, <= want."""
    p = span_of(group, bits)
    bk = min(want, p)
    return bk if p and bk >= 32 // bits else 0


def repack_kn(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, sym: bool,
              in_features: int, group: int) -> dict:
    """kn layout from the stored tensors (qweight uint8 [N, packed K], scales [N, ng], zeros packed [N, .])."""
    n = qweight.shape[0]
    e = 32 // bits
    p = span_of(group, bits)
    rp = p // e
    kp = -(-in_features // p) * p
    codes = unpack(qweight, bits, in_features).to(torch.int64)
    # span-local order: slot j of word row r holds input j * RP + r, so one slot of a word tile meets a
    # contiguous slice of x
    codes = torch.nn.functional.pad(codes, (0, kp - in_features)).view(n, kp // p, e, rp).transpose(2, 3)
    shifts = torch.arange(e, device=codes.device, dtype=torch.int64) * bits
    word = (codes << shifts).sum(-1).reshape(n, kp // e)  # < 2**32, exact in int64
    del codes
    word = torch.where(word >= (1 << 31), word - (1 << 32), word).to(torch.int32)
    ng = scales.shape[1]
    s_t = scales.t().contiguous()
    z_t = s_t if sym else unpack(zeros, bits, ng).t().contiguous().to(torch.uint8)  # sym: never read
    return dict(words=word.t().contiguous(), scales=s_t, zeros=z_t, bits=bits, sym=sym, K=in_features, N=n,
                group=group, span=p)


def reference_kn(pk: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight [N, K] a kn layout holds (pure torch): the oracle of both kernels here."""
    bits, e, p = pk["bits"], 32 // pk["bits"], pk["span"]
    w = pk["words"].to(torch.int64) & 0xFFFFFFFF  # [Kw, N]
    shifts = torch.arange(e, device=w.device, dtype=torch.int64) * bits
    q = ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1))  # [Kw, N, E]: row r slot j
    n = pk["N"]
    q = q.permute(1, 0, 2).reshape(n, -1, p // e, e).transpose(2, 3).reshape(n, -1)[:, : pk["K"]].float()
    g = torch.arange(pk["K"], device=w.device) // pk["group"]
    s = pk["scales"].float().t()[:, g]
    z = (torch.full_like(s, float(1 << (bits - 1))) if pk["sym"] else pk["zeros"].float().t()[:, g])
    return ((q - z) * s).to(dtype)


@triton.jit
def _fp32_part(w, x_ptr, k0, ro, r, K, s, z, R: tl.constexpr, RP: tl.constexpr, B: tl.constexpr,
               E: tl.constexpr, EVEN_K: tl.constexpr, USE_ASM: tl.constexpr):
    """sum_k (q - z) s x over the tile in fp32: each code moved into an fp32 mantissa as 1 + q / 2**B."""
    acc = tl.zeros(w.shape, dtype=tl.float32)
    xsum = tl.zeros([R], dtype=tl.float32)
    FIELD: tl.constexpr = ((1 << B) - 1) << (23 - B)  # the top B bits of an fp32 mantissa
    for j in tl.static_range(E):
        kj = k0 + j * RP + ro + r  # contiguous: one vector load
        if EVEN_K:
            xj = tl.load(x_ptr + kj).to(tl.float32)
        else:
            xj = tl.load(x_ptr + kj, mask=kj < K, other=0.0).to(tl.float32)
        if 23 - B - j * B >= 0:  # compile-time: slot j's field moved to the top B mantissa bits
            v = w << (23 - B - j * B)
        else:
            v = w >> (j * B + B - 23)
        if USE_ASM:  # (v & FIELD) | 1.0f as ONE lop3 (the compiler emits two)
            f = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                          [v, tl.full(v.shape, FIELD, tl.int32), tl.full(v.shape, 0x3F800000, tl.int32)],
                                          dtype=tl.int32, is_pure=True, pack=1).to(tl.float32, bitcast=True)
        else:
            f = ((v & FIELD) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + q / 2**B
        acc += f * xj[:, None]
        xsum += xj
    t = tl.sum(acc, axis=0)
    sx = tl.sum(xsum, axis=0)
    return s * ((t - sx) * ((1 << B) * 1.0) - z * sx)


@triton.jit
def _lop3_or_and(v, MASK: tl.constexpr, MAGIC: tl.constexpr, USE_ASM: tl.constexpr):
    """(v & MASK) | MAGIC: one lop3 on the GPU (the compiler emits two for two immediates)."""
    if USE_ASM:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                         [v, tl.full(v.shape, MASK, tl.int32), tl.full(v.shape, MAGIC, tl.int32)],
                                         dtype=tl.int32, is_pure=True, pack=1)
    return (v & MASK) | MAGIC


@triton.jit
def _h2_part(w, x_ptr, k0, ro, r, K, s, zi, R: tl.constexpr, RP: tl.constexpr, B: tl.constexpr,
             E: tl.constexpr, EVEN_K: tl.constexpr, USE_ASM: tl.constexpr):
    """The same sum in paired fp16.  Slots p and p + E/2 of a word sit 16 bits apart.  For pair p take the
    word shifted right by 8 * (p B // 8) bits, so that both codes sit at bit o = p B mod 8 of their 16-bit
    halves, inside the fp16 mantissa; OR-ing in the exponent of 2**(10 - o) makes each half exactly
    2**(10 - o) + q (one lop3, no shift per pair).  Minus the pair 2**(10 - o) + z (exact) that is q - z,
    and one fma.rn.f16x2 multiplies both by their activations, pre-scaled by XS = 2**-max(4, B) so a word's
    fp16 sum (E/2 products, each |.| <= |x|) cannot overflow below |x| ~ 8e3 (2 bits) to 3e4 (8 bits).
    Each word's pair sum is widened to fp32 before anything else is added to it."""
    H: tl.constexpr = E // 2
    XS: tl.constexpr = 1.0 / (1 << max(4, B))
    zf = zi.to(tl.float32)
    acc = tl.zeros(w.shape, dtype=tl.float32)
    if USE_ASM:
        t2 = tl.zeros(w.shape, dtype=tl.int32)  # half2 sums, +0.0 in both halves
    else:
        tlo = tl.zeros(w.shape, dtype=tl.float16)
        thi = tlo
    wh = (w >> 8) & 0x00FFFFFF  # logical shift: the codes of pairs whose bits start at 8 or above
    for p in tl.static_range(H):
        o = (p * B) % 8  # constexpr arithmetic (p, B are constexprs)
        ka = k0 + p * RP + ro + r
        kb = ka + H * RP
        if EVEN_K:
            xa = tl.load(x_ptr + ka).to(tl.float32) * XS
            xb = tl.load(x_ptr + kb).to(tl.float32) * XS
        else:
            xa = tl.load(x_ptr + ka, mask=ka < K, other=0.0).to(tl.float32) * XS
            xb = tl.load(x_ptr + kb, mask=kb < K, other=0.0).to(tl.float32) * XS
        MASK = (((1 << B) - 1) << o) * 65537
        MAGIC = ((25 - o) << 10) * 65537  # fp16 2**(10 - o) in both halves
        if p * B >= 8:
            hb = _lop3_or_and(wh, MASK, MAGIC, USE_ASM)
        else:
            hb = _lop3_or_and(w, MASK, MAGIC, USE_ASM)
        zo = zf + (1 << (10 - o)) * 1.0  # [BN]: 2**(10 - o) + z, exact in fp16
        if USE_ASM:
            x2 = tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $2;", "=r,f,f", [xb, xa],
                                           dtype=tl.int32, is_pure=True, pack=1)
            z2 = tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $1;", "=r,f", [zo],
                                           dtype=tl.int32, is_pure=True, pack=1)
            t2 = tl.inline_asm_elementwise(
                "{ .reg .b32 d; sub.rn.f16x2 d, $1, $2; fma.rn.f16x2 $0, d, $3, $4; }", "=r,r,r,r,r",
                [hb, z2[None, :].broadcast_to(hb.shape), x2[:, None].broadcast_to(hb.shape), t2], dtype=tl.int32,
                is_pure=True, pack=1)
        else:
            zc = zo.to(tl.float16)[None, :]
            tlo += (_half(hb, False) - zc) * xa.to(tl.float16)[:, None]
            thi += (_half(hb, True) - zc) * xb.to(tl.float16)[:, None]
    if USE_ASM:
        acc += tl.inline_asm_elementwise(
            "{ .reg .b16 l, h; .reg .f32 fl, fh; mov.b32 {l, h}, $1; cvt.f32.f16 fl, l; cvt.f32.f16 fh, h; "
            "add.f32 $0, fl, fh; }", "=f,r", [t2], dtype=tl.float32, is_pure=True, pack=1)
    else:
        acc += tlo.to(tl.float32) + thi.to(tl.float32)
    return s * ((1.0 / XS) * tl.sum(acc, axis=0))


@triton.jit
def _load_words(w_ptr, kb, r, offs_n, n_mask, N, R: tl.constexpr, EVEN_N: tl.constexpr):
    """Block kb's word tile [R, BN] (rows kb R .. kb R + R - 1)."""
    wp = w_ptr + (kb * R + r)[:, None].to(tl.int64) * N + offs_n[None, :]
    if EVEN_N:
        return tl.load(wp, eviction_policy="evict_first")
    return tl.load(wp, mask=n_mask[None, :], other=0, eviction_policy="evict_first")


@triton.jit
def _block_sum(w, kb, x_ptr, s_ptr, z_ptr, offs_n, n_mask, r, N, K, G, B: tl.constexpr, E: tl.constexpr,
               P: tl.constexpr, SYM: tl.constexpr, BK: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
               USE_ASM: tl.constexpr, H2: tl.constexpr):
    """sum over block kb's inputs of (q - z) s x for the BN columns: [BN] fp32."""
    R: tl.constexpr = BK // E
    RP: tl.constexpr = P // E
    k0 = (kb * R // RP) * P  # first input of the block's span
    ro = (kb * R) % RP  # first row of the block inside the span
    g = k0 // G
    if EVEN_N:
        s = tl.load(s_ptr + g * N + offs_n).to(tl.float32)
    else:
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if SYM:
        zi = tl.full(offs_n.shape, 1 << (B - 1), tl.int32)
    elif EVEN_N:
        zi = tl.load(z_ptr + g * N + offs_n).to(tl.int32)
    else:
        zi = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.int32)
    if H2:
        return _h2_part(w, x_ptr, k0, ro, r, K, s, zi, R, RP, B, E, EVEN_K, USE_ASM)
    return _fp32_part(w, x_ptr, k0, ro, r, K, s, zi.to(tl.float32), R, RP, B, E, EVEN_K, USE_ASM)


@triton.jit
def _gemv_kn_kernel(x_ptr, out_ptr, bias_ptr, w_ptr, s_ptr, z_ptr, acc_ptr, cnt_ptr, N, K, G, NK,
                    B: tl.constexpr, E: tl.constexpr, P: tl.constexpr, SYM: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr, SPK: tl.constexpr, EVEN_N: tl.constexpr,
                    EVEN_K: tl.constexpr, USE_ASM: tl.constexpr, H2: tl.constexpr, COUNTER: tl.constexpr,
                    DIAG: tl.constexpr):
    """grid (cdiv(N, BN), NK): program (i, j) adds columns [i BN, (i+1) BN) over blocks j SPK .. j SPK + SPK - 1,
    block b being word rows [b R, (b+1) R) (R = BK / E), which lie in one span of P inputs: slot s of row r
    holds input span0 + s RP + r.  NK = programs along K.

    DIAG (benchmarks only; the output is then wrong): 1 = partial sums added without release ordering,
    no counter, no final write; 2 = relaxed adds, then the counter and final write as usual; 3 = partial
    sums stored (no atomics); 4 = as 3 with the arithmetic replaced by one add per word (load only)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    R: tl.constexpr = BK // E
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    r = tl.arange(0, R)
    # SPK blocks per program, each block's words loaded one block ahead of its arithmetic (a register
    # double buffer: the load of block i+1 is in flight while block i is decoded)
    w = _load_words(w_ptr, pid_k * SPK, r, offs_n, n_mask, N, R, EVEN_N)
    y = tl.zeros([BN], dtype=tl.float32)
    for i in tl.static_range(SPK):
        if i + 1 < SPK:
            w_next = _load_words(w_ptr, pid_k * SPK + i + 1, r, offs_n, n_mask, N, R, EVEN_N)
        if DIAG == 4:  # load only: one add per word
            y += tl.sum(w, axis=0).to(tl.float32)
        else:
            y += _block_sum(w, pid_k * SPK + i, x_ptr, s_ptr, z_ptr, offs_n, n_mask, r, N, K, G, B, E, P, SYM, BK,
                            EVEN_N, EVEN_K, USE_ASM, H2)
        if i + 1 < SPK:
            w = w_next
    if NK == 1:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)
    elif DIAG == 1 or not COUNTER:  # the sums go to the scratch; _finish_kernel writes the output
        tl.atomic_add(acc_ptr + offs_n, y, mask=n_mask, sem="relaxed", scope="gpu")
    elif DIAG >= 3:  # plain (racing) stores: no atomics at all
        tl.store(acc_ptr + offs_n, y, mask=n_mask)
    else:
        if DIAG == 2:
            tl.atomic_add(acc_ptr + offs_n, y, mask=n_mask, sem="relaxed", scope="gpu")
        else:
            tl.atomic_add(acc_ptr + offs_n, y, mask=n_mask, sem="release", scope="gpu")
        tl.debug_barrier()  # every thread's add is issued (and released) before the counter moves
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == NK - 1:
            # swap the sums out as their int32 bits (0 is +0.0), which re-zeroes the scratch
            bits = tl.atomic_xchg(acc_ptr.to(tl.pointer_type(tl.int32)) + offs_n, tl.zeros([BN], dtype=tl.int32),
                                  mask=n_mask, sem="acq_rel", scope="gpu")
            tot = bits.to(tl.float32, bitcast=True)
            if HAS_BIAS:
                tot += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs_n, tot.to(out_ptr.dtype.element_ty), mask=n_mask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)


@triton.jit
def _finish_kernel(acc_ptr, out_ptr, bias_ptr, N, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out = sums (+ bias) in the output dtype; the sums are zeroed for the next launch."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    y = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(acc_ptr + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=mask)


@triton.jit
def _dequant_kn_kernel(out_ptr, w_ptr, s_ptr, z_ptr, N, K, G, B: tl.constexpr, E: tl.constexpr,
                       P: tl.constexpr, SYM: tl.constexpr, BN: tl.constexpr, R: tl.constexpr):
    """out [N, K] (row-major, out dtype) = (q - z) s for R word rows x BN columns per program."""
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rows = pid_r * R + tl.arange(0, R)
    n_mask = offs_n < N
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * N + offs_n[None, :], mask=n_mask[None, :], other=0)
    for j in tl.static_range(E):
        k = (rows // (P // E)) * P + j * (P // E) + rows % (P // E)  # [R]: the span order of repack_kn
        kmask = k < K
        g = tl.where(kmask, k // G, 0)
        m2 = kmask[:, None] & n_mask[None, :]
        s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=m2, other=0.0).to(tl.float32)
        if SYM:
            z = (1 << (B - 1)) * 1.0
        else:
            z = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=m2, other=0).to(tl.float32)
        q = ((w >> (j * B)) & ((1 << B) - 1)).to(tl.float32)
        val = ((q - z) * s).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs_n[None, :].to(tl.int64) * K + k[:, None], val, mask=m2)


@triton.jit
def _dot_kn_kernel(x_ptr, out_ptr, bias_ptr, acc_ptr, w_ptr, s_ptr, z_ptr, M, N, K, G, NSP, SPS, stride_xm,
                   B: tl.constexpr, E: tl.constexpr, P: tl.constexpr, SYM: tl.constexpr, DIRECT: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, MAGIC: tl.constexpr = 0,
                   MAGIC_BITS: tl.constexpr = 0, TRANS: tl.constexpr = False):
    """Batches above 1 on the kn layout, tensor cores: out[m, n] = Σ_spans s[g, n] (x_span · q_span − z[g, n] Σ x_span).

    Grid (cdiv(N, BN), cdiv(M, BM), cdiv(NSP, SPS)): each program walks SPS spans of P inputs.  A span's
    word tile [P/E, BN] becomes the code tile [P, BN] in input order by shifting every word by every slot
    width into a [E, P/E, BN] tensor and flattening its first two axes (slot j, row r is input j·P/E + r:
    the layout's span order), so one ``tl.dot`` of x [BM, P] (codes exact in the activation dtype) with it
    gives Σ x q; the group scale and zero are applied per span in fp32.  MAGIC (16-bit activations): the
    code is OR'd into the bits of MAGIC (128 in bf16, 1024 in fp16), which reads as MAGIC + q exactly, and
    MAGIC joins the zero point.  DIRECT (one split): the program writes out (+ bias) itself; else it adds
    into the fp32 scratch [M, N] and the finishing kernel writes out.  TRANS: computes out^T = q^T x^T, the
    codes being the dot's first operand (which Hopper's wgmma may take from registers), the sums [BN, BM].
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    n = pid_n * BN + tl.arange(0, BN)
    m = pid_m * BM + tl.arange(0, BM)
    nm = n < N
    mm = m < M
    RP: tl.constexpr = P // E
    r = tl.arange(0, RP)
    sh = tl.arange(0, E) * B
    kk = tl.arange(0, P)
    if TRANS:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    sp0 = pid_k * SPS
    for sp in range(sp0, tl.minimum(sp0 + SPS, NSP)):
        w = tl.load(w_ptr + (sp * RP + r)[:, None].to(tl.int64) * N + n[None, :], mask=nm[None, :], other=0)
        q = (w[None, :, :] >> sh[:, None, None]) & ((1 << B) - 1)  # [E, RP, BN]
        if MAGIC:  # code OR'd into the mantissa of 2**7 (bf16) / 2**10 (fp16): MAGIC + q, no int-to-float convert
            q = q | MAGIC_BITS
        if TRANS:
            q = tl.reshape(tl.permute(q, (2, 0, 1)), [BN, P])
        else:
            q = tl.reshape(q, [P, BN])
        if MAGIC:
            q = q.to(tl.int16).to(x_ptr.dtype.element_ty, bitcast=True)
        else:
            q = q.to(x_ptr.dtype.element_ty)
        k = sp * P + kk
        if TRANS:
            xk = tl.load(x_ptr + m[None, :].to(tl.int64) * stride_xm + k[:, None],
                         mask=mm[None, :] & (k < K)[:, None], other=0.0)  # [P, BM]
            part = tl.dot(q, xk)
        else:
            xk = tl.load(x_ptr + m[:, None].to(tl.int64) * stride_xm + k[None, :],
                         mask=mm[:, None] & (k < K)[None, :], other=0.0)
            part = tl.dot(xk, q)
        g = (sp * P) // G
        s = tl.load(s_ptr + g * N + n, mask=nm, other=0.0).to(tl.float32)
        if SYM:
            z = tl.full([BN], 1 << (B - 1), tl.float32)
        else:
            z = tl.load(z_ptr + g * N + n, mask=nm, other=0).to(tl.float32)
        if MAGIC:
            z += MAGIC
        if TRANS:
            sx = tl.sum(xk.to(tl.float32), axis=0)
            acc += s[:, None] * (part - z[:, None] * sx[None, :])
        else:
            sx = tl.sum(xk.to(tl.float32), axis=1)
            acc += s[None, :] * (part - z[None, :] * sx[:, None])
    if TRANS:
        m2 = nm[:, None] & mm[None, :]
        off = m[None, :].to(tl.int64) * N + n[:, None]
        if HAS_BIAS and DIRECT:
            acc += tl.load(bias_ptr + n, mask=nm, other=0.0).to(tl.float32)[:, None]
    else:
        m2 = mm[:, None] & nm[None, :]
        off = m[:, None].to(tl.int64) * N + n[None, :]
        if HAS_BIAS and DIRECT:
            acc += tl.load(bias_ptr + n, mask=nm, other=0.0).to(tl.float32)[None, :]
    if DIRECT:
        tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=m2)
    else:
        tl.atomic_add(acc_ptr + off, acc, mask=m2, sem="relaxed")


@triton.jit
def _finish2d_kernel(acc_ptr, out_ptr, bias_ptr, TOTAL, N, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out (flat [M·N]) = sums (+ bias[offs % N]) in the output dtype; the sums are zeroed for the next launch."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < TOTAL
    y = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(acc_ptr + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=mask)


_SCRATCH: dict = {}


def _scratch(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed fp32 sums and int32 counters, one pair per device (each launch leaves them at 0)."""
    have = _SCRATCH.get(device)
    if have is None or have[0].numel() < n:
        size = max(n, 1 << 16)
        have = _SCRATCH[device] = (torch.zeros(size, dtype=torch.float32, device=device),
                                   torch.zeros(size, dtype=torch.int32, device=device))
    return have


if torch.cuda.is_available():  # allocate outside any CUDA-graph memory pool (see triton_half2._counters)
    _scratch(torch.device("cuda", torch.cuda.current_device()), 1)


def run_gemv_kn(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None, cfg: dict | None = None) -> torch.Tensor:
    """x2 [1, K] (fp16/bf16/fp32) -> [1, N] of x2.dtype."""
    M, K = x2.shape
    assert M == 1 and K == pk["K"], (M, K, pk["K"])
    N, bits = pk["N"], pk["bits"]
    cfg = cfg or TUNED_KN.get(pk["bits"]) or DEFAULT_CFG
    bk = k_span(pk["group"], bits, cfg["BK"])
    assert bk, (pk["group"], bits)
    nb = pk["words"].shape[0] // (bk // (32 // bits))  # blocks along K
    spk = cfg.get("SPK", 1)
    while nb % spk:
        spk //= 2
    nk = nb // spk
    bn = cfg["BN"]
    nblk = triton.cdiv(N, bn)
    out = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    acc, cnt = _scratch(x2.device, max(N, nblk))
    use_asm = x2.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1" and cfg.get("asm", True)
    # split-K tail: a second small kernel writes the output (default: measured ~3 us faster on the H100,
    # NOTES.md v5), or the last program of each column block does, found by an arrival counter (one launch)
    counter = cfg.get("tail", "finish") == "counter"
    _gemv_kn_kernel[(nblk, nk)](
        x2, out, bias if bias is not None else out, pk["words"], pk["scales"], pk["zeros"], acc, cnt, N, K,
        pk["group"], nk, B=bits, E=32 // bits, P=pk["span"], SYM=pk["sym"], HAS_BIAS=bias is not None, BN=bn,
        BK=bk, SPK=spk, EVEN_N=N % bn == 0, EVEN_K=K % pk["span"] == 0, USE_ASM=use_asm, H2=cfg.get("h2", False),
        COUNTER=counter, DIAG=cfg.get("diag", 0), num_warps=cfg["num_warps"], num_stages=1)
    if nk > 1 and not counter and not cfg.get("diag", 0):
        _finish_kernel[(triton.cdiv(N, 1024),)](acc, out, bias if bias is not None else out, N,
                                                HAS_BIAS=bias is not None, BLOCK=1024, num_warps=4)
    return out


def dot_bucket(M: int) -> int:
    """The batch bucket a tensor-core config is tuned for."""
    return 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128 if M <= 128 else 256


def dot_cfg(M: int, N: int, K: int, span: int, tile: dict | None = None) -> dict:
    """Launch config of the tensor-core path: ``tile`` (BM, BN, target, num_warps, num_stages; default the
    tuned one for M's bucket, else BM covering the batch up to 128) and SPS, the spans per program, chosen
    so the grid has at least ``target`` programs (2 per SM of an H100 by default) where the batch and width
    alone do not make that many."""
    t = dict(tile or TUNED_DOT.get(dot_bucket(M)) or {})
    bm = t.get("BM") or min(max(16, triton.next_power_of_2(M)), 128)
    bn = t.get("BN") or (128 if M <= 16 else 64)
    nsp = triton.cdiv(K, span)
    tiles = triton.cdiv(N, bn) * triton.cdiv(M, bm)
    split = max(1, min(nsp, triton.cdiv(t.get("target", 264), tiles)))
    return dict(BM=bm, BN=bn, SPS=max(1, nsp // split), num_warps=t.get("num_warps", 4),
                num_stages=t.get("num_stages", 3), magic=t.get("magic", True), trans=t.get("trans", False))


# batch bucket -> tile (dot_cfg): the best total over the five Llama shapes in the H100 sweep of 2026-11-27
# (bench_kernels.py --sweep-dot; docs/PERFORMANCE.md "version 6").  Batches 17-32 take the 64-row tile.
# Tiles of 8 warps with BM 128 and two splits gave wrong sums there (2.7e-2 to 6.9e-2 relative error on two
# shapes at batch 256; cause not found), so no default uses 8 warps.
_T16 = dict(BM=16, BN=256, target=264, num_warps=4, num_stages=3)
_T64 = dict(BM=64, BN=64, target=264, num_warps=4, num_stages=3)
TUNED_DOT: dict = {16: _T16, 32: _T64, 64: _T64}
DOT_MAX_M = int(os.environ.get("LEANQ_KN_DOT_MAX_M", "64"))  # above: dequantize + cuBLAS measured faster
DOT_BITS = (2, 4)  # 8-bit: triton_fast's wdot measured faster at batch 16


def run_dot_kn(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None, cfg: dict | None = None) -> torch.Tensor:
    """x2 [M, K] (fp16/bf16; fp32 in the interpreter) -> [M, N] of x2.dtype, on tensor cores."""
    M, K = x2.shape
    assert K == pk["K"], (K, pk["K"])
    N, p = pk["N"], pk["span"]
    cfg = cfg or dot_cfg(M, N, K, p)
    nsp = triton.cdiv(K, p)
    sps = min(cfg["SPS"], nsp)
    nk = triton.cdiv(nsp, sps)
    out = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    direct = nk == 1
    acc = out if direct else _scratch(x2.device, M * N)[0]
    bias_arg = bias if bias is not None else out
    # MAGIC + q is exact for codes below MAGIC: bf16 holds 8 significant bits (128), fp16 11 (1024)
    magic, mbits = {torch.bfloat16: (128, 0x4300), torch.float16: (1024, 0x6400)}.get(x2.dtype, (0, 0))
    if (1 << pk["bits"]) > magic or not cfg.get("magic", True):
        magic = mbits = 0
    _dot_kn_kernel[(triton.cdiv(N, cfg["BN"]), triton.cdiv(M, cfg["BM"]), nk)](
        x2, out, bias_arg, acc, pk["words"], pk["scales"], pk["zeros"], M, N, K, pk["group"], nsp, sps, x2.stride(0),
        B=pk["bits"], E=32 // pk["bits"], P=p, SYM=pk["sym"], DIRECT=direct, HAS_BIAS=bias is not None,
        BM=cfg["BM"], BN=cfg["BN"], MAGIC=magic, MAGIC_BITS=mbits, TRANS=bool(cfg.get("trans", False)),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if not direct:
        _finish2d_kernel[(triton.cdiv(M * N, 1024),)](acc, out, bias_arg, M * N, N, HAS_BIAS=bias is not None,
                                                      BLOCK=1024, num_warps=4)
    return out


def dequantize_kn(pk: dict, dtype: torch.dtype, BN: int = 64, R: int = 16) -> torch.Tensor:
    """The dense weight [N, K] in ``dtype`` (for batches above the GEMV's)."""
    N, K = pk["N"], pk["K"]
    out = torch.empty(N, K, device=pk["words"].device, dtype=dtype)
    kw = pk["words"].shape[0]
    _dequant_kn_kernel[(triton.cdiv(N, BN), triton.cdiv(kw, R))](
        out, pk["words"], pk["scales"], pk["zeros"], N, K, pk["group"], B=pk["bits"], E=32 // pk["bits"],
        P=pk["span"], SYM=pk["sym"], BN=BN, R=R)
    return out


# ---------------------------------------------------------------------------
# the module side: layout cache, dispatch entries


def packed_kn(m) -> dict:
    """The kn layout of QuantLinear ``m``, built at first use and cached (see kernels.cached_layout)."""
    spec = m.spec
    return cached_layout(m, "triton_kn", "kn_only", lambda: repack_kn(
        m.qweight, m.scales, m.zeros, spec.bits, spec.sym, m.in_features, group_size_of(spec, m.in_features)))


def _ok(m) -> bool:
    spec = int_layer_for(m, BITS, "kn_only")
    if spec is None:
        return False
    g = group_size_of(spec, m.in_features)
    return num_groups(spec, m.in_features) >= 1 and k_span(g, spec.bits, DEFAULT_CFG["BK"]) > 0


def _rows(x) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _supports_gemv(m, x) -> bool:
    return (_ok(m) and x.shape[-1] == m.in_features and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and _rows(x) == 1)


def _supports_dot(m, x) -> bool:
    return (_ok(m) and m.spec.bits in DOT_BITS and x.shape[-1] == m.in_features
            and x.dtype in (torch.float16, torch.bfloat16) and 1 < _rows(x) <= DOT_MAX_M)


def _supports_dequant(m, x) -> bool:
    # larger batches on this layout only where it is the layer's only copy (release_stored_kn)
    return (_ok(m) and "kn_only" in m._cache and x.shape[-1] == m.in_features
            and x.dtype in (torch.float16, torch.bfloat16) and _rows(x) > 1)


def _impl(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
          bias: torch.Tensor | None, bits: int, sym: bool, K: int, N: int, group: int, path: str) -> torch.Tensor:
    """The kernels as one opaque op, so torch.compile (and its CUDA graphs) take them whole."""
    pk = dict(words=words, scales=scales, zeros=zeros, bits=bits, sym=sym, K=K, N=N, group=group,
              span=span_of(group, bits))
    if path == "gemv":
        return run_gemv_kn(x, pk, bias)
    if path == "dot":
        return run_dot_kn(x, pk, bias)
    return torch.nn.functional.linear(x, dequantize_kn(pk, x.dtype), bias)


try:
    _op = torch.library.custom_op("leanq::triton_kn_linear", mutates_args=())(_impl)

    @_op.register_fake
    def _(x, words, scales, zeros, bias, bits, sym, K, N, group, path):
        return x.new_empty(x.shape[0], N)
except Exception:  # an older torch without custom_op: compiled models call the launcher directly
    _op = None


def _linear(m, x: torch.Tensor, path: str) -> torch.Tensor:
    pk = packed_kn(m)
    bias = m.bias.to(x.dtype) if m.bias is not None else None
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    args = (x2, pk["words"], pk["scales"], pk["zeros"], bias, pk["bits"], pk["sym"], pk["K"], pk["N"], pk["group"], path)
    y = _op(*args) if (_op is not None and torch.compiler.is_compiling()) else _impl(*args)
    return y.reshape(*x.shape[:-1], m.out_features)


def release_stored_kn(model: torch.nn.Module) -> int:
    """Inference only: build every eligible CUDA int layer's kn layout now and free its stored buffers
    (the layer then runs only here: GEMV at batch 1, dequantize + cuBLAS above).  Returns bytes freed."""
    freed = 0
    for m in model.modules():
        if not _ok(m) or not hasattr(m, "qweight") or m.qweight.device.type != "cuda":
            continue
        packed_kn(m)
        m._cache["kn_only"] = True
        freed += drop_stored(m)
    return freed


# priority 40: ahead of h2 (30) at batch 1 for 2/4/8 bits
GEMV_KN = register_kernel(Kernel("triton-kn-gemv", "int", ("cuda",), _supports_gemv,
                                 lambda m, x: _linear(m, x, "gemv"), priority=40, layout="triton_kn"))
# priority 45: batches 2-64 at 2/4 bits, ahead of triton_fast (20) and of the kn dequantize path (40)
DOT_KN = register_kernel(Kernel("triton-kn-dot", "int", ("cuda",), _supports_dot,
                                lambda m, x: _linear(m, x, "dot"), priority=45, layout="triton_kn"))
DEQUANT_KN = register_kernel(Kernel("triton-kn-dequant", "int", ("cuda",), _supports_dequant,
                                    lambda m, x: _linear(m, x, "dequant"), priority=40, layout="triton_kn"))
