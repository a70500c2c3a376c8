"""Triton kernels for the vector-quantized format (``leanq.formats.vq``): codebook lookups fused with the product.

The stored tensors are used as they are (no repacking): qweight uint8
[out, B·P] (book b's bit-packed b-bit indices at bytes [b·P, (b+1)·P) of each
row), codebooks fp16 [tiles, B, K, d], scales fp16 [out, nsg].

* ``vq_gemv`` (batch 1-4, decode): a program owns BN output rows and walks the
  row in chunks of BV vectors.  For each (row, vector) it unpacks the index
  (one byte for 8-bit indices, else the two bytes holding its bits), looks the
  codeword up in the layer's codebook — a few KiB, so the lookups are served
  from L1; for d = 2 or 4 the d float16 values are fetched as one 32/64-bit
  word — and multiplies them with the d activations, which are the same for
  every row of the program.  Scales are applied per (row, vector).
  Bytes read from HBM are the indices (2 bits per weight at the 2-bit preset):
  that is the whole point of the format for a memory-bound GEMV.
* ``vq_dequantize``: the whole weight [out, in] in the activation dtype, for
  larger batches (dequantize, then cuBLAS through F.linear).

Both are checked against the pure-torch reference (``kernels.vq_ref``) in
tests/test_kernels_vq.py (on CPU through TRITON_INTERPRET=1) and by
benchmarks/kernels/bench_vq.py before timing.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..formats.packing import packed_len
from ..formats.vq import geometry
from . import Kernel, register_kernel

# batches up to this size take the LUT GEMV; larger ones dequantize + cuBLAS
VQ_GEMV_MAX_M = int(os.environ.get("LEANQ_VQ_GEMV_MAX_M", "4"))


@triton.jit
def _index(q_ptr, rows, v, mask, row_bytes, off, IB: tl.constexpr):
    """b-bit indices [BN, BV] (int32) of vectors v, from the packed bytes at ``off`` of each row."""
    base = q_ptr + rows[:, None].to(tl.int64) * row_bytes + off
    if IB == 8:
        idx = tl.load(base + v[None, :], mask=mask, other=0).to(tl.int32)
    else:
        bit = v * IB
        byte = bit // 8
        sh = bit % 8
        lo = tl.load(base + byte[None, :], mask=mask, other=0).to(tl.int32)
        # a code crossing a byte boundary stays inside its run of 8 codes (IB bytes), so byte+1 exists
        hi = tl.load(base + byte[None, :] + 1, mask=mask & ((sh + IB) > 8)[None, :], other=0).to(tl.int32)
        idx = ((lo | (hi << 8)) >> sh[None, :]) & ((1 << IB) - 1)
    return idx


@triton.jit
def _vq_gemv_kernel(x_ptr, out_ptr, bias_ptr, q_ptr, cb_ptr, s_ptr,
                    N, NVEC, K_IN, ROW_BYTES, P, NSG, G, ROWS, COLS, NCT, stride_xm, stride_om,
                    D: tl.constexpr, IB: tl.constexpr, NB: tl.constexpr, HAS_BIAS: tl.constexpr,
                    PACK: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr):
    """out[m, n] = Σ_v s[n, g(v)] Σ_b Σ_a C[t(n, v), b, idx[n, b, v], a] · x[m, v·D + a]; grid (cdiv(N, BN), M).

    PACK (D = 2 or 4): ``cb_ptr`` is the codebook viewed as int32 / int64 words, one
    codeword per word, so each (row, vector) costs one lookup instead of D; the
    float16 halves are split out with shifts and a bitcast.
    """
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    row_mask = rows < N
    rt = rows // ROWS
    KK: tl.constexpr = 1 << IB
    acc = tl.zeros([BN, BV], dtype=tl.float32)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    for v0 in range(0, NVEC, BV):
        v = v0 + tl.arange(0, BV)
        v_mask = v < NVEC
        mask2 = row_mask[:, None] & v_mask[None, :]
        ct = (v * D) // COLS
        tile = rt[:, None] * NCT + ct[None, :]  # [BN, BV]
        vec = tl.zeros([BN, BV], dtype=tl.float32)
        if PACK:
            a3 = tl.arange(0, D)
            col2 = v[:, None] * D + a3[None, :]  # [BV, D]
            xv2 = tl.load(x_row + col2, mask=v_mask[:, None] & (col2 < K_IN), other=0.0).to(tl.float32)
        for b in tl.static_range(NB):
            idx = _index(q_ptr, rows, v, mask2, ROW_BYTES, b * P, IB)
            if PACK:
                word = tl.load(cb_ptr + (tile * NB + b) * KK + idx, mask=mask2, other=0)
                sh = (a3 * 16).to(word.dtype)
                half = ((word[:, :, None] >> sh[None, None, :]) & 0xFFFF).to(tl.int16)
                c3 = half.to(tl.float16, bitcast=True).to(tl.float32)  # [BN, BV, D]
                vec += tl.sum(c3 * xv2[None, :, :], axis=2)
            else:
                entry = ((tile * NB + b) * KK + idx) * D
                for a in tl.static_range(D):
                    col = v * D + a
                    xv = tl.load(x_row + col, mask=v_mask & (col < K_IN), other=0.0).to(tl.float32)
                    c = tl.load(cb_ptr + entry + a, mask=mask2, other=0.0).to(tl.float32)
                    vec += c * xv[None, :]
        sg = (v * D) // G
        s = tl.load(s_ptr + rows[:, None].to(tl.int64) * NSG + sg[None, :],
                    mask=row_mask[:, None] & (v_mask & (sg < NSG))[None, :], other=0.0).to(tl.float32)
        acc += s * vec
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m.to(tl.int64) * stride_om + rows, y.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _vq_dequant_kernel(w_ptr, q_ptr, cb_ptr, s_ptr, N, NVEC, K_IN, ROW_BYTES, P, NSG, G, ROWS, COLS, NCT,
                       D: tl.constexpr, IB: tl.constexpr, NB: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr):
    """w[n, v·D + a] = s[n, g] Σ_b C[t, b, idx, a] for a [BN, BV] tile of (row, vector); grid (cdiv(N, BN), cdiv(NVEC, BV))."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    v = tl.program_id(1) * BV + tl.arange(0, BV)
    row_mask = rows < N
    v_mask = v < NVEC
    KK: tl.constexpr = 1 << IB
    tile = (rows // ROWS)[:, None] * NCT + ((v * D) // COLS)[None, :]
    sg = (v * D) // G
    s = tl.load(s_ptr + rows[:, None].to(tl.int64) * NSG + sg[None, :],
                mask=row_mask[:, None] & (v_mask & (sg < NSG))[None, :], other=0.0).to(tl.float32)
    for a in tl.static_range(D):
        val = tl.zeros([BN, BV], dtype=tl.float32)
        for b in tl.static_range(NB):
            idx = _index(q_ptr, rows, v, row_mask[:, None] & v_mask[None, :], ROW_BYTES, b * P, IB)
            val += tl.load(cb_ptr + ((tile * NB + b) * KK + idx) * D + a,
                           mask=row_mask[:, None] & v_mask[None, :], other=0.0).to(tl.float32)
        col = v * D + a
        tl.store(w_ptr + rows[:, None].to(tl.int64) * K_IN + col[None, :], (val * s).to(w_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (v_mask & (col < K_IN))[None, :])


def _args(m) -> tuple:
    spec = m.spec
    geo = geometry(spec, m.out_features, m.in_features)
    p = packed_len(geo["nvec"], spec.bits)
    return (geo["nvec"], m.in_features, m.qweight.shape[1], p, geo["nsg"], geo["group"], geo["rows"], geo["cols"],
            geo["nct"]), dict(D=spec.vq_dim, IB=spec.bits, NB=spec.vq_books)


_WORD = {2: torch.int32, 4: torch.int64}  # codeword of D float16 values as one word


def vq_gemv(m, x: torch.Tensor, bn: int = 16, bv: int = 64, num_warps: int = 4, pack: bool = True) -> torch.Tensor:
    """y [..., out] for x [..., in] (any float dtype; computed in float32, returned in x's dtype).

    pack: one word lookup per codeword where D is 2 or 4 (else D float16 lookups)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    mrows = x2.shape[0]
    out = torch.empty(mrows, m.out_features, device=x.device, dtype=x.dtype)
    geo_args, const = _args(m)
    bias = m.bias if m.bias is not None else out
    grid = (triton.cdiv(m.out_features, bn), mrows)
    pack = pack and m.spec.vq_dim in _WORD
    cb = m.codebooks.view(_WORD[m.spec.vq_dim]) if pack else m.codebooks
    _vq_gemv_kernel[grid](x2, out, bias, m.qweight, cb, m.scales, m.out_features, *geo_args,
                          x2.stride(0), out.stride(0), HAS_BIAS=m.bias is not None, PACK=pack, BN=bn, BV=bv,
                          num_warps=num_warps, **const)
    return out.reshape(*x.shape[:-1], m.out_features)


def vq_dequantize(m, dtype: torch.dtype, bn: int = 32, bv: int = 32) -> torch.Tensor:
    """The weight [out, in] of ``dtype``, decoded on the device."""
    w = torch.empty(m.out_features, m.in_features, device=m.qweight.device, dtype=dtype)
    geo_args, const = _args(m)
    grid = (triton.cdiv(m.out_features, bn), triton.cdiv(geo_args[0], bv))
    _vq_dequant_kernel[grid](w, m.qweight, m.codebooks, m.scales, m.out_features, *geo_args, BN=bn, BV=bv, **const)
    return w


def vq_dequant_linear(m, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, vq_dequantize(m, x.dtype), m.bias.to(x.dtype) if m.bias is not None else None)


def _floats(x: torch.Tensor) -> bool:
    return x.dtype in (torch.float16, torch.bfloat16, torch.float32)


def _gemv_ok(m, x: torch.Tensor) -> bool:
    return _floats(x) and x.numel() // max(x.shape[-1], 1) <= VQ_GEMV_MAX_M


register_kernel(Kernel("triton-vq-gemv", "vq", ("cuda",), _gemv_ok, vq_gemv, priority=20))
register_kernel(Kernel("triton-vq-dequant", "vq", ("cuda",), lambda m, x: _floats(x), vq_dequant_linear, priority=10))
