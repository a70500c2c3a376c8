"""Triton kernels for leanq's packed integer weights: fused dequantize + matmul.

Stored format (see :mod:`leanq.formats.intq`): codes bit-packed along the input
dim, fp16 scales [out, ngroups], packed zeros (asym) or the implicit 2**(b-1)
(sym); w = (q - z) * s.  Checkpoints keep that format; at first use each layer
is *repacked* once (cached on the module) into a layout the kernels read with
wide, coalesced loads:

* codes are split into bit planes of width 8, 4, 2 or 1 (3 = 2+1, 5 = 4+1,
  6 = 4+2, 7 = 4+2+1).  Every plane holds the same number ``CPW`` of codes per
  word (CPW = 32 / widest plane), so plane p's words are int32/int16/int8 and
  one word index means the same input columns in every plane; 3 bits cost no
  padding (int32 + int16 planes).  Inside each sub-group tile of GT codes (GT:
  a power of two dividing the group size) word ``wi`` slot ``j`` holds column
  ``j * (GT / CPW) + wi``.  planes: [out, Kw], Kw = ceil(in / GT) * GT / CPW,
  padded to a multiple of 16 words.
* scales are transposed to [ngroups, out] fp16 and zeros unpacked and
  transposed to [ngroups, out] uint8, so the scales a tile needs are contiguous.

Two kernels share that layout:

* ``gemv`` (batch 1-4): CUDA-core FMAs.  A program owns BN output rows (and up
  to 4 activation rows) and walks the input dim in tiles of NGT sub-groups.
  Slot j of a whole word tile is decoded in place (shift, mask, 2**23 mantissa
  trick to float) and multiplied by one contiguous slice of x; each sub-group
  lies inside one quantization group, so the scale is applied once per
  (row, sub-group): acc += s * sum_k q*x - s*z * sum_k x.
* ``dot`` (larger batches): dequantizes a [BN, BK] weight tile in registers
  ((q - z) * s, rounded to the activation dtype as the reference does) and feeds
  tensor cores through ``tl.dot``.
* ``dequantize``: the whole weight, for a dequantize + cuBLAS path.

Both are checked against :mod:`leanq.kernels.reference` in
tests/test_kernels_triton.py (on CPU through TRITON_INTERPRET=1) and in
benchmarks/kernels/bench_kernels.py before timing.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..formats.intq import group_size_of, num_groups
from ..formats.packing import unpack
from . import Kernel, cached_layout, drop_stored, register_kernel

# bit planes per code width: widest first; its width fixes codes-per-word
PLANES: dict[int, tuple[int, ...]] = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}
_WORD_DTYPE = {32: torch.int32, 16: torch.int16, 8: torch.int8}
MIN_GT = 32  # smallest sub-group tile; group sizes whose largest power-of-2 divisor is smaller fall back

# batches up to this size take the GEMV kernel; set from benchmarks/kernels measurements (NOTES.md)
GEMV_MAX_M = int(os.environ.get("LEANQ_GEMV_MAX_M", "4"))


def codes_per_word(bits: int) -> int:
    return 32 // PLANES[bits][0]


def sub_group(group: int, cap: int = 128) -> int:
    """Largest power of two dividing ``group``, capped: the kernels' scale granule (codes)."""
    gt = group & -group
    return min(gt, cap)


# ---------------------------------------------------------------------------
# repacking (once per layer, cached on the module)
#
# Within each sub-group tile of GT codes (GT divides the group size) the codes
# are permuted so that word ``wi`` slot ``j`` holds column ``j * WPG + wi``
# (WPG = GT / CPW words per tile).  Slot j of consecutive words then needs
# consecutive activations, so a kernel decodes one slot of a whole word tile
# with shifts in place and multiplies it by one contiguous (vector-loaded)
# slice of x: no code ever moves between threads.


def _pack_plane(codes: torch.Tensor, width: int, cpw: int, gt: int, kw: int) -> torch.Tensor:
    """codes int64 [N, Kp] (Kp a multiple of gt; values < 2**width) -> words [N, kw] of CPW*width bits."""
    n, kp = codes.shape
    wpg = gt // cpw
    c = codes.view(n, kp // gt, cpw, wpg).transpose(2, 3)  # [N, tiles, wi, j]: slot j of word wi
    shifts = torch.arange(cpw, device=codes.device, dtype=torch.int64) * width
    word = (c << shifts).sum(-1).reshape(n, kp // cpw)  # < 2**32, exact in int64
    nbits = cpw * width
    word = torch.where(word >= (1 << (nbits - 1)), word - (1 << nbits), word)  # two's complement
    word = torch.nn.functional.pad(word, (0, kw - word.shape[1]))
    return word.to(_WORD_DTYPE[nbits]).contiguous()


def repack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, sym: bool,
           in_features: int, group: int) -> dict:
    """Kernel layout from the stored tensors (shapes in the module docstring); deterministic."""
    n = qweight.shape[0]
    cpw = codes_per_word(bits)
    gt = sub_group(group)
    kp = -(-in_features // gt) * gt
    kw = -(-(kp // cpw) // 16) * 16  # 16-word rows keep every row start 64-byte aligned
    codes = unpack(qweight, bits, in_features).to(torch.int64)
    codes = torch.nn.functional.pad(codes, (0, kp - in_features))
    planes, off = [], 0
    for width in PLANES[bits]:
        planes.append(_pack_plane((codes >> off) & ((1 << width) - 1), width, cpw, gt, kw))
        off += width
    del codes
    ng = scales.shape[1]
    s_t = scales.t().contiguous()
    z_t = s_t if sym else unpack(zeros, bits, ng).t().contiguous()  # sym: placeholder, never read
    return dict(planes=planes, scales=s_t, zeros=z_t, bits=bits, sym=sym, K=in_features, N=n, Kw=kw,
                group=group, gt=gt, cpw=cpw)


def packed_for(m) -> dict:
    """The repacked tensors of QuantLinear ``m``, built at first use and cached on it (kernels.cached_layout:
    loading new weights in place invalidates it; a compiled model is repacked by its eager warm-up)."""
    spec = m.spec
    return cached_layout(m, "triton_int", "triton_int_only", lambda: repack(
        m.qweight, m.scales, m.zeros, spec.bits, spec.sym, m.in_features, group_size_of(spec, m.in_features)))


# ---------------------------------------------------------------------------
# kernels


@triton.jit
def _slot(w0, w1, w2, j: tl.constexpr, B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr):
    """Code in slot j of each word (planes combined), int32, same shape/layout as the words."""
    q = (w0 >> (j * B0)) & ((1 << B0) - 1)
    if B1 > 0:
        q |= ((w1 >> (j * B1)) & ((1 << B1) - 1)) << B0
    if B2 > 0:
        q |= ((w2 >> (j * B2)) & ((1 << B2) - 1)) << (B0 + B1)
    return q


@triton.jit
def _load_words(w0_ptr, w1_ptr, w2_ptr, off, mask, B1: tl.constexpr, B2: tl.constexpr):
    w0 = tl.load(w0_ptr + off, mask=mask, other=0).to(tl.int32)
    w1 = w0
    w2 = w0
    if B1 > 0:
        w1 = tl.load(w1_ptr + off, mask=mask, other=0).to(tl.int32)
    if B2 > 0:
        w2 = tl.load(w2_ptr + off, mask=mask, other=0).to(tl.int32)
    return w0, w1, w2


@triton.jit
def _gemv_kernel(x_ptr, out_ptr, bias_ptr, w0_ptr, w1_ptr, w2_ptr, s_ptr, z_ptr,
                 M, N, K, Kw, G, stride_xm, stride_om,
                 B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, CPW: tl.constexpr,
                 SYM: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, NGT: tl.constexpr, GT: tl.constexpr):
    """out[m, n] = sum_k x[m, k] (q[n, k] - z) s  for BN rows n and BM (1, 2 or 4) rows m.

    grid (cdiv(N, BN), cdiv(M, BM)).  All arithmetic stays in the layout of the
    loaded word tile [BN, NGT, WPG]; one reduction at the very end.
    """
    pid_n = tl.program_id(0)
    m0 = tl.program_id(1) * BM
    WPG: tl.constexpr = GT // CPW
    BK: tl.constexpr = NGT * GT
    ZSYM: tl.constexpr = (1 << (B0 + B1 + B2 - 1)) * 1.0
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    gi = tl.arange(0, NGT)
    wi = tl.arange(0, WPG)
    w_col = gi[None, :, None] * WPG + wi[None, None, :]  # [1, NGT, WPG]
    w_off = offs_n[:, None, None].to(tl.int64) * Kw + w_col
    x_col = gi[:, None] * GT + wi[None, :]  # [NGT, WPG]; slot j adds j * WPG
    x0_ptr = x_ptr + m0.to(tl.int64) * stride_xm
    # rows past M: a zero limit masks their loads and stores (plain comparisons, no scalar-bool masks)
    K1 = tl.where(m0 + 1 < M, K, 0)
    K2 = tl.where(m0 + 2 < M, K, 0)
    K3 = tl.where(m0 + 3 < M, K, 0)
    acc0 = tl.zeros([BN, NGT, WPG], dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    for k0 in range(0, K, BK):
        kw0 = k0 // CPW
        wmask = n_mask[:, None, None] & ((kw0 + w_col) < Kw)
        w0, w1, w2 = _load_words(w0_ptr, w1_ptr, w2_ptr, w_off + kw0, wmask, B1, B2)
        ks = k0 + gi * GT
        smask = n_mask[:, None] & (ks < K)[None, :]
        sz_off = (ks // G)[None, :].to(tl.int64) * N + offs_n[:, None]
        s = tl.load(s_ptr + sz_off, mask=smask, other=0.0).to(tl.float32)[:, :, None]
        if SYM:
            zs = s * ZSYM
        else:
            zs = s * tl.load(z_ptr + sz_off, mask=smask, other=0).to(tl.float32)[:, :, None]
        t0 = tl.zeros([BN, NGT, WPG], dtype=tl.float32)
        t1 = t0
        t2 = t0
        t3 = t0
        xs0 = tl.zeros([NGT, WPG], dtype=tl.float32)
        xs1 = xs0
        xs2 = xs0
        xs3 = xs0
        for j in tl.static_range(CPW):
            # int -> float without I2F (a quarter-rate instruction): 2**23 + q has q in its mantissa
            q = (_slot(w0, w1, w2, j, B0, B1, B2) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            xk = k0 + x_col + j * WPG
            xm = xk < K
            xv = tl.load(x0_ptr + xk, mask=xm, other=0.0).to(tl.float32)
            t0 += q * xv[None, :, :]
            xs0 += xv
            if BM > 1:
                xv = tl.load(x0_ptr + stride_xm + xk, mask=xk < K1, other=0.0).to(tl.float32)
                t1 += q * xv[None, :, :]
                xs1 += xv
            if BM > 2:
                xv = tl.load(x0_ptr + 2 * stride_xm + xk, mask=xk < K2, other=0.0).to(tl.float32)
                t2 += q * xv[None, :, :]
                xs2 += xv
                xv = tl.load(x0_ptr + 3 * stride_xm + xk, mask=xk < K3, other=0.0).to(tl.float32)
                t3 += q * xv[None, :, :]
                xs3 += xv
        acc0 += s * t0 - zs * xs0[None, :, :]
        if BM > 1:
            acc1 += s * t1 - zs * xs1[None, :, :]
        if BM > 2:
            acc2 += s * t2 - zs * xs2[None, :, :]
            acc3 += s * t3 - zs * xs3[None, :, :]
    bias = tl.zeros([BN], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    o_ptr = out_ptr + m0.to(tl.int64) * stride_om + offs_n
    DT: tl.constexpr = out_ptr.dtype.element_ty
    tl.store(o_ptr, (tl.sum(tl.sum(acc0, axis=2), axis=1) + bias).to(DT), mask=n_mask)
    if BM > 1:
        tl.store(o_ptr + stride_om, (tl.sum(tl.sum(acc1, axis=2), axis=1) + bias).to(DT), mask=offs_n < tl.where(K1 > 0, N, 0))
    if BM > 2:
        tl.store(o_ptr + 2 * stride_om, (tl.sum(tl.sum(acc2, axis=2), axis=1) + bias).to(DT), mask=offs_n < tl.where(K2 > 0, N, 0))
        tl.store(o_ptr + 3 * stride_om, (tl.sum(tl.sum(acc3, axis=2), axis=1) + bias).to(DT), mask=offs_n < tl.where(K3 > 0, N, 0))


@triton.jit
def _dequant_tile(w0_ptr, w1_ptr, w2_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, N, K, Kw, G,
                  B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, CPW: tl.constexpr, SYM: tl.constexpr,
                  BN: tl.constexpr, NGT: tl.constexpr, GT: tl.constexpr, DT: tl.constexpr):
    """Dequantized weights [BN, NGT*GT] of dtype DT for rows offs_n, input columns k0 .. k0+NGT*GT.

    Slot j of word wi is column j*WPG + wi of its sub-group tile, so expanding
    the words to [BN, NGT, CPW, WPG] (slot as the second-to-last dim) and
    flattening gives the columns in their natural order.
    """
    WPG: tl.constexpr = GT // CPW
    gi = tl.arange(0, NGT)
    wi = tl.arange(0, WPG)
    sh = tl.arange(0, CPW)[None, None, :, None]
    w_col = k0 // CPW + gi[None, :, None] * WPG + wi[None, None, :]
    wmask = n_mask[:, None, None] & (w_col < Kw)
    w0, w1, w2 = _load_words(w0_ptr, w1_ptr, w2_ptr, offs_n[:, None, None].to(tl.int64) * Kw + w_col,
                             wmask, B1, B2)
    q = (w0[:, :, None, :] >> (sh * B0)) & ((1 << B0) - 1)
    if B1 > 0:
        q |= ((w1[:, :, None, :] >> (sh * B1)) & ((1 << B1) - 1)) << B0
    if B2 > 0:
        q |= ((w2[:, :, None, :] >> (sh * B2)) & ((1 << B2) - 1)) << (B0 + B1)
    qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    ks = k0 + gi * GT
    smask = n_mask[:, None] & (ks < K)[None, :]
    sz_off = (ks // G)[None, :].to(tl.int64) * N + offs_n[:, None]
    s = tl.load(s_ptr + sz_off, mask=smask, other=0.0).to(tl.float32)[:, :, None, None]
    if SYM:
        w = (qf - (1 << (B0 + B1 + B2 - 1)) * 1.0) * s
    else:
        z = tl.load(z_ptr + sz_off, mask=smask, other=0).to(tl.float32)[:, :, None, None]
        w = (qf - z) * s
    return tl.reshape(w.to(DT), [BN, NGT * GT])


@triton.jit
def grouped_tile(pid, num_g, num_o, G):
    """The tile (index along the grouped axis, index along the other) of program ``pid`` when programs walk bands of
    G tiles of the grouped axis: the programs running together share their operand tiles in L2."""
    band = G * num_o
    first = (pid // band) * G
    g = tl.minimum(num_g - first, G)
    return first + (pid % band) % g, (pid % band) // g


@triton.jit
def _dot_kernel(x_ptr, out_ptr, bias_ptr, w0_ptr, w1_ptr, w2_ptr, s_ptr, z_ptr,
                M, N, K, Kw, G, stride_xm, stride_om,
                B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, CPW: tl.constexpr,
                SYM: tl.constexpr, HAS_BIAS: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, NGT: tl.constexpr, GT: tl.constexpr, GROUP_M: tl.constexpr):
    """out [M, N] = x [M, K] @ dequant(W)^T, tensor cores; 1-D grid with grouped ordering for L2 reuse."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    BK: tl.constexpr = NGT * GT
    DT: tl.constexpr = x_ptr.dtype.element_ty
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_mask = offs_m < M
    n_mask = offs_n < N
    cols = tl.arange(0, BK)  # the tile comes in natural column order
    x_base = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        w = _dequant_tile(w0_ptr, w1_ptr, w2_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, N, K, Kw, G,
                          B0, B1, B2, CPW, SYM, BN, NGT, GT, DT)
        xk = k0 + cols
        xv = tl.load(x_base + xk[None, :], mask=m_mask[:, None] & (xk < K)[None, :], other=0.0)
        acc = tl.dot(xv, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    o_ptr = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(o_ptr, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _dequant_kernel(out_ptr, w0_ptr, w1_ptr, w2_ptr, s_ptr, z_ptr, N, K, Kw, G,
                    B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, CPW: tl.constexpr, SYM: tl.constexpr,
                    BN: tl.constexpr, NGT: tl.constexpr, GT: tl.constexpr):
    """Full dequantization W [N, K] (for the dequantize + cuBLAS path of large batches)."""
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * NGT * GT
    n_mask = offs_n < N
    w = _dequant_tile(w0_ptr, w1_ptr, w2_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, N, K, Kw, G,
                      B0, B1, B2, CPW, SYM, BN, NGT, GT, out_ptr.dtype.element_ty)
    ks = k0 + tl.arange(0, NGT * GT)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + ks[None, :], w,
             mask=n_mask[:, None] & (ks < K)[None, :])


# ---------------------------------------------------------------------------
# launch


# (kind, batch) -> config measured best by benchmarks/kernels/bench_kernels.py --sweep (that run fills it
# in; the defaults below are its results on an H100, recorded in NOTES.md)
TUNED: dict[tuple[str, int], dict] = {}


def default_config(kind: str, M: int, N: int, K: int, bits: int) -> dict:
    """Tile sizes per path; measured choices are recorded in benchmarks/kernels/NOTES.md."""
    if TUNED:
        ms = sorted(b for (k, b) in TUNED if k == kind)
        if ms:
            b = next((b for b in ms if b >= M), ms[-1])
            cfg = dict(TUNED[(kind, b)])
            if kind == "gemv":
                cfg["BM"] = 1 if M == 1 else 2 if M == 2 else 4
            return cfg
    if kind == "gemv":  # one row per program, two tiles of 2048 codes per iteration... (sweep 2026-11-27)
        if M == 1:
            return dict(BM=1, BN=1, BK=2048, num_warps=2, num_stages=3)
        return dict(BM=2 if M == 2 else 4, BN=2, BK=1024, num_warps=2, num_stages=1)
    if M <= 16:
        return dict(BM=16, BN=32, BK=256, num_warps=4, num_stages=3, GROUP_M=1)
    if M <= 64:
        return dict(BM=64, BN=128, BK=128, num_warps=8, num_stages=3, GROUP_M=8)
    return dict(BM=128, BN=64, BK=128, num_warps=4, num_stages=3, GROUP_M=8)


def _common(pk: dict, bk: int) -> tuple:
    planes = pk["planes"] + [pk["planes"][0]] * (3 - len(pk["planes"]))
    widths = PLANES[pk["bits"]] + (0,) * (3 - len(PLANES[pk["bits"]]))
    gt = pk["gt"]  # the repack's permutation tile: every kernel tile is a whole number of them
    return planes, widths, gt, max(bk // gt, 1)


def run_gemv(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None, cfg: dict | None = None) -> torch.Tensor:
    """x2 [M, K] (fp16/bf16/fp32, unit stride along K) -> [M, N] of x2.dtype."""
    M, K = x2.shape
    N = pk["N"]
    cfg = cfg or default_config("gemv", M, N, K, pk["bits"])
    out = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    planes, (b0, b1, b2), gt, ngt = _common(pk, cfg["BK"])
    bm = cfg.get("BM", 1)
    grid = (triton.cdiv(N, cfg["BN"]), triton.cdiv(M, bm))
    _gemv_kernel[grid](x2, out, bias if bias is not None else out, *planes, pk["scales"], pk["zeros"],
                       M, N, K, pk["Kw"], pk["group"], x2.stride(0), out.stride(0),
                       B0=b0, B1=b1, B2=b2, CPW=pk["cpw"], SYM=pk["sym"], HAS_BIAS=bias is not None,
                       BM=bm, BN=cfg["BN"], NGT=ngt, GT=gt, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def run_dot(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None, cfg: dict | None = None) -> torch.Tensor:
    """x2 [M, K] fp16/bf16 -> [M, N] via tensor cores."""
    M, K = x2.shape
    N = pk["N"]
    cfg = cfg or default_config("dot", M, N, K, pk["bits"])
    out = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    planes, (b0, b1, b2), gt, ngt = _common(pk, cfg["BK"])
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)
    _dot_kernel[grid](x2, out, bias if bias is not None else out, *planes, pk["scales"], pk["zeros"],
                      M, N, K, pk["Kw"], pk["group"], x2.stride(0), out.stride(0),
                      B0=b0, B1=b1, B2=b2, CPW=pk["cpw"], SYM=pk["sym"], HAS_BIAS=bias is not None,
                      BM=cfg["BM"], BN=cfg["BN"], NGT=ngt, GT=gt, GROUP_M=cfg["GROUP_M"],
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def dequantize(pk: dict, dtype: torch.dtype, BN: int = 32, BK: int = 256) -> torch.Tensor:
    """W [N, K] of ``dtype`` from the repacked layout (one pass, no int64 temporaries)."""
    N, K = pk["N"], pk["K"]
    out = torch.empty(N, K, device=pk["scales"].device, dtype=dtype)
    planes, (b0, b1, b2), gt, ngt = _common(pk, BK)
    grid = (triton.cdiv(N, BN), triton.cdiv(K, ngt * gt))
    _dequant_kernel[grid](out, *planes, pk["scales"], pk["zeros"], N, K, pk["Kw"], pk["group"],
                          B0=b0, B1=b1, B2=b2, CPW=pk["cpw"], SYM=pk["sym"], BN=BN, NGT=ngt, GT=gt)
    return out


# ---------------------------------------------------------------------------
# dispatch table entries


def _base_ok(m, x) -> bool:
    spec = m.spec
    if m.fmt != "int" or spec.bits not in PLANES or x.shape[-1] != m.in_features:
        return False
    return sub_group(group_size_of(spec, m.in_features)) >= MIN_GT and num_groups(spec, m.in_features) >= 1


def _rows(x) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _flat(m, x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    in_scale = getattr(m, "in_scale", None)
    if in_scale is not None:
        # AWQ stores W·diag(in_scale): x @ (W'/in_scale)^T = (x/in_scale) @ W'^T
        return (x2.float() / in_scale.float()).to(x.dtype)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _supports_gemv(m, x) -> bool:
    return _base_ok(m, x) and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and _rows(x) <= GEMV_MAX_M


def _supports_dot(m, x) -> bool:
    return _base_ok(m, x) and x.dtype in (torch.float16, torch.bfloat16) and _rows(x) > GEMV_MAX_M


def _linear_impl(x: torch.Tensor, planes: list[torch.Tensor], scales: torch.Tensor, zeros: torch.Tensor,
                 bias: torch.Tensor | None, bits: int, sym: bool, K: int, N: int, Kw: int, group: int, gt: int,
                 path: str) -> torch.Tensor:
    """The kernels as one opaque op, so torch.compile (and its CUDA graphs) take them whole."""
    pk = dict(planes=list(planes), scales=scales, zeros=zeros, bits=bits, sym=sym, K=K, N=N, Kw=Kw, group=group,
              gt=gt, cpw=codes_per_word(bits))
    return run_gemv(x, pk, bias) if path == "gemv" else run_dot(x, pk, bias)


try:
    _linear_op = torch.library.custom_op("leanq::triton_int_linear", mutates_args=())(_linear_impl)

    @_linear_op.register_fake
    def _(x, planes, scales, zeros, bias, bits, sym, K, N, Kw, group, gt, path):
        return x.new_empty(x.shape[0], N)
except Exception:  # an older torch that cannot register it: compiled models call the launcher directly
    _linear_op = None


def _linear(m, x: torch.Tensor, path: str) -> torch.Tensor:
    pk = packed_for(m)
    bias = m.bias.to(x.dtype) if m.bias is not None else None
    x2 = _flat(m, x)
    if _linear_op is not None and torch.compiler.is_compiling():
        y = _linear_op(x2, pk["planes"], pk["scales"], pk["zeros"], bias, pk["bits"], pk["sym"], pk["K"], pk["N"],
                       pk["Kw"], pk["group"], pk["gt"], path)
    else:  # eager: skip the op dispatcher's overhead (~10 us a call)
        y = run_gemv(x2, pk, bias) if path == "gemv" else run_dot(x2, pk, bias)
    return y.reshape(*x.shape[:-1], m.out_features)


def gemv_linear(m, x: torch.Tensor) -> torch.Tensor:
    return _linear(m, x, "gemv")


def dot_linear(m, x: torch.Tensor) -> torch.Tensor:
    return _linear(m, x, "dot")


def release_stored(model: torch.nn.Module) -> int:
    """Inference only: repack every int QuantLinear on a CUDA device now and free its stored-format buffers.

    The kernel layout holds the same codes, so keeping both doubles the weight
    memory.  Afterwards the layers run only through these kernels (no CPU
    reference, no saving).  Returns the bytes freed.
    """
    freed = 0
    for m in model.modules():
        if getattr(m, "fmt", None) != "int" or not hasattr(m, "qweight") or m.qweight.device.type != "cuda":
            continue
        probe = torch.empty(1, m.in_features, device="meta", dtype=torch.float16)
        if not _base_ok(m, probe):
            continue
        packed_for(m)
        m._cache["triton_int_only"] = True
        freed += drop_stored(m)
    return freed


GEMV = register_kernel(Kernel("triton-int-gemv", "int", ("cuda",), _supports_gemv, gemv_linear, priority=10,
                                 layout="triton_int"))
DOT = register_kernel(Kernel("triton-int-dot", "int", ("cuda",), _supports_dot, dot_linear, priority=10,
                                layout="triton_int"))
