"""Batches above 16 (prefill, batched serving) on tensor cores, straight from the rk words of
:mod:`leanq.kernels.cuda_int`: the weights dequantized in registers inside the GEMM's main loop.

Before this kernel, batches above 16 dequantized the whole layer into a BF16 scratch and called cuBLAS: two
passes over N x K 16-bit values (write, then read) on top of cuBLAS's own time, 0.35-0.43x BF16 ``F.linear``
at batch 256 on an H100 (0.51-0.68x in earlier sessions' runs).

Here one Triton program owns a tile of BN outputs x BM batch rows and walks K in steps of BK inputs (BK divides
the group). Per step it loads the [BN, BK / E] word tile (E = 32 / bits codes per int32), the tile's group words
(scale in the high 16 bits, zero point in the low 16) and the [BK, BM] slice of x (transposed view), decodes the
codes to (q - z) * s in the activation dtype (inline PTX on the GPU: per code pair one LOP3, one x2 subtraction and
one x2 multiplication; the E values of a word are joined in the thread that loaded it) and accumulates
``tl.dot(w, x^T)`` in fp32. The weights are the dot's first operand, which Hopper's wgmma takes from registers;
Triton 3.6 still moves the decoded tile once through shared memory (STS + LDSM) to reach that operand's layout, and
waits for each wgmma before the next decode. The output tile is [BN, BM], stored transposed into out [M, N].
Measured (H100, batch 256, 2026-11-28): 0.51-0.67x BF16 for 4-bit, 0.52-0.79x for 2-bit; for 4-bit layers from 64
rows :mod:`leanq.kernels.cuda_int_wgmma` is faster on all but 4096 x 4096.

A code's place in its word follows :func:`leanq.kernels.cuda_int._pack_words` (code 2i at ``bits * i``, code
2i + 1 at ``16 + bits * i``); a row's words are in input order, so word w holds inputs E w .. E w + E - 1.

Split-K (``SPLIT`` > 1, for grids that would leave SMs idle): each program writes its fp32 partial tile to its own
slot; the last program of a tile to arrive (an int32 counter per tile, acquire/release) adds the slots in slot
order, writes the output and resets the counter. The sum does not depend on the arrival order, so repeated
launches give the same bytes.

The oracle is :func:`leanq.kernels.cuda_int.reference_rk`. 2-, 4- and 8-bit layouts; 3-bit (two planes) is not
taken. On the CPU the tests run it through Triton's interpreter with fp32 activations.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .cuda_rt import grow_scratch
from .triton_int import grouped_tile

BITS = (2, 4, 8)
MIN_M = int(os.environ.get("LEANQ_GEMM_MIN_M", "17"))  # batches from here take this kernel (below: cuda_int_mma)
ON = os.environ.get("LEANQ_GEMM", "1") != "0"
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _asm(bits: int, fp16: bool) -> str:
    """PTX decoding one rk word into its E = 32 / bits values (q - z) * s in input order, as 16-bit outputs $0..$E-1:
    per code pair a shift and one LOP3 ((w >> bits i) & mask | magic: M0 + q in both halves, exact), then one x2
    subtraction of M0 + z and one x2 multiplication by s (inputs $E: s in both halves, $E+1: M0 + z in both)."""
    e = 32 // bits
    mask = ((1 << bits) - 1) * 0x10001
    magic = 0x64006400 if fp16 else 0x43004300
    t = "f16x2" if fp16 else "bf16x2"
    w, s2, mz2 = f"${e}", f"${e + 1}", f"${e + 2}"
    lines = ["{", ".reg .b32 v, t;"]
    for i in range(e // 2):
        src = w
        if i:
            lines.append(f"shr.u32 v, {w}, {bits * i};")
            src = "v"
        lines += [f"lop3.b32 t, {src}, {mask:#x}, {magic:#x}, 0xEA;",
                  f"sub.rn.{t} t, t, {mz2};", f"mul.rn.{t} t, t, {s2};", f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, t;"]
    lines.append("}")
    return "\n".join(lines)


@triton.jit
def _cat2(a, b):
    """a and b joined on a new last axis (held by the same thread: no data movement)."""
    return tl.join(a, b)


@triton.jit
def _codes(wv, s, z, SH0: tl.constexpr, SH1: tl.constexpr, B: tl.constexpr, DT: tl.constexpr):
    """Portable decode of two codes of every word (shifts SH0, SH1): (q - z) * s in DT (the interpreter's path)."""
    a = (((wv >> SH0) & ((1 << B) - 1)).to(tl.float32) - z) * s
    b = (((wv >> SH1) & ((1 << B) - 1)).to(tl.float32) - z) * s
    return a.to(DT), b.to(DT)


@triton.jit
def _decode(wv, szv, xk, B: tl.constexpr, SBF16: tl.constexpr, ASM: tl.constexpr, ASM_SRC: tl.constexpr,
            BN: tl.constexpr, BK: tl.constexpr):
    """Word tile [BN, BK / E] and the rows' group words [BN] -> the values [BN, BK] in input order, in the dtype of
    the x tile ``xk``.

    The E values of a word are built as E tensors in input order and joined pairwise into trailing axes of size 2
    (the first join the most significant bit of the code's place in the word), so every value stays in the thread
    that loaded its word and the final reshape moves no data."""
    E: tl.constexpr = 32 // B
    DT = xk.dtype
    if SBF16:
        s = (szv & -65536).to(tl.float32, bitcast=True)  # bf16 bits in the high half: that fp32
    else:
        s = ((szv >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    if ASM:
        zb = szv & 0xFFFF
        sb = s.to(DT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF  # the scale in the activations' format
        if DT == tl.float16:
            mz = (zb | 0x6400) * 0x10001
        else:
            mz = (zb | 0x4300) * 0x10001
        s2 = tl.broadcast_to((sb | (sb << 16))[:, None], wv.shape)
        mz2 = tl.broadcast_to(mz[:, None], wv.shape)
        if E == 4:
            v0, v1, v2, v3 = tl.inline_asm_elementwise(ASM_SRC, "=h,=h,=h,=h,r,r,r", [wv, s2, mz2],
                                                       dtype=(DT, DT, DT, DT), is_pure=True, pack=1)
        elif E == 8:
            v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                ASM_SRC, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [wv, s2, mz2], dtype=(DT, DT, DT, DT, DT, DT, DT, DT),
                is_pure=True, pack=1)
        else:
            v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15 = tl.inline_asm_elementwise(
                ASM_SRC, "=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [wv, s2, mz2],
                dtype=(DT, DT, DT, DT, DT, DT, DT, DT, DT, DT, DT, DT, DT, DT, DT, DT), is_pure=True, pack=1)
    else:
        z = (szv & 0xFFFF).to(tl.float32)[:, None]
        s = s[:, None]
        # value c of a word: code c // 2 of the low half (c even) or the high half (c odd), bits * (c // 2) up
        v0, v1 = _codes(wv, s, z, 0, 16, B, DT)
        v2, v3 = _codes(wv, s, z, B, 16 + B, B, DT)
        if E >= 8:
            v4, v5 = _codes(wv, s, z, 2 * B, 16 + 2 * B, B, DT)
            v6, v7 = _codes(wv, s, z, 3 * B, 16 + 3 * B, B, DT)
        if E == 16:
            v8, v9 = _codes(wv, s, z, 4 * B, 16 + 4 * B, B, DT)
            v10, v11 = _codes(wv, s, z, 5 * B, 16 + 5 * B, B, DT)
            v12, v13 = _codes(wv, s, z, 6 * B, 16 + 6 * B, B, DT)
            v14, v15 = _codes(wv, s, z, 7 * B, 16 + 7 * B, B, DT)
    if E == 4:
        q = _cat2(_cat2(v0, v2), _cat2(v1, v3))
    elif E == 8:
        q = _cat2(_cat2(_cat2(v0, v4), _cat2(v2, v6)), _cat2(_cat2(v1, v5), _cat2(v3, v7)))
    else:
        q = _cat2(_cat2(_cat2(_cat2(v0, v8), _cat2(v4, v12)), _cat2(_cat2(v2, v10), _cat2(v6, v14))),
                  _cat2(_cat2(_cat2(v1, v9), _cat2(v5, v13)), _cat2(_cat2(v3, v11), _cat2(v7, v15))))
    return tl.reshape(q, [BN, BK])


@triton.jit
def _gemm_rk_kernel(x_ptr, out_ptr, bias_ptr, w_ptr, sz_ptr, part_ptr, cnt_ptr, M, N, K, WPR, NG, stride_xm, G,
                    B: tl.constexpr, SBF16: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr,
                    BM: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, GM: tl.constexpr, ASM: tl.constexpr,
                    ASM_SRC: tl.constexpr, XA: tl.constexpr = False):
    """out[m, n] = sum_k x[m, k] (q[n, k] - z[n, g]) s[n, g]; grid (tiles, SPLIT)."""
    E: tl.constexpr = 32 // B
    BKW: tl.constexpr = BK // E
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # tiles in bands of GM weight-row tiles: the programs running together share weight tiles and x slices in L2
    num_m = tl.cdiv(M, BM)
    pid_n, pid_m = grouped_tile(pid, tl.cdiv(N, BN), num_m, GM)
    n = pid_n * BN + tl.arange(0, BN)
    m = pid_m * BM + tl.arange(0, BM)
    n_c = tl.minimum(n, N - 1)  # clamped rows/columns for the loads: no masks in the main loop
    m_c = tl.minimum(m, M - 1)
    steps = K // BK
    per = tl.cdiv(steps, SPLIT)
    k0 = pid_k * per
    k1 = tl.minimum(k0 + per, steps)
    wp = w_ptr + n_c[:, None].to(tl.int64) * WPR + k0 * BKW + tl.arange(0, BKW)[None, :]
    if XA:
        xp = x_ptr + m_c[:, None].to(tl.int64) * stride_xm + k0 * BK + tl.arange(0, BK)[None, :]
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    else:
        xp = x_ptr + m_c[None, :].to(tl.int64) * stride_xm + k0 * BK + tl.arange(0, BK)[:, None]
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    szp = sz_ptr + n_c.to(tl.int64) * NG
    for kt in range(k0, k1):
        wv = tl.load(wp)  # [BN, BKW]
        xk = tl.load(xp)  # [BK, BM] ([BM, BK] if XA)
        szv = tl.load(szp + (kt * BK) // G)  # [BN]
        wd = _decode(wv, szv, xk, B, SBF16, ASM, ASM_SRC, BN, BK)
        if XA:  # x [BM, BK] the first operand, the decoded weights (transposed) the second, from shared memory
            acc = tl.dot(xk, tl.trans(wd), acc)
        else:
            acc = tl.dot(wd, xk, acc)
        wp += BKW
        xp += BK
    if XA:
        acc = tl.trans(acc)
    mask = (n < N)[:, None] & (m < M)[None, :]
    off = m[None, :].to(tl.int64) * N + n[:, None]
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n_c).to(tl.float32)[:, None]
        tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tile = pid_n * num_m + pid_m
        slot = part_ptr + (tile.to(tl.int64) * SPLIT) * (BN * BM)
        loc = tl.arange(0, BN)[:, None] * BM + tl.arange(0, BM)[None, :]
        tl.store(slot + pid_k * (BN * BM) + loc, acc)
        tl.debug_barrier()  # every thread's partial stored before the release below
        old = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if old == SPLIT - 1:  # the last to arrive: the slots in order, so the sum does not depend on who came last
            tot = tl.load(slot + loc, cache_modifier=".cg")
            for j in range(1, SPLIT):
                tot += tl.load(slot + j * (BN * BM) + loc, cache_modifier=".cg")
            if HAS_BIAS:
                tot += tl.load(bias_ptr + n_c).to(tl.float32)[:, None]
            tl.store(out_ptr + off, tot.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")


# (BN, BM, BK, num_warps, num_stages, SPLIT, GM): the best geometric mean over the five Llama shapes at batch 256 in
# the H100 sweeps of 2026-11-28 (benchmarks/kernels/results/triton-gemm-h100-2026-11-28-*.jsonl): 0.60x BF16, against
# 0.41x for 128 x 128 tiles of 8 warps and 0.39x for dequantize + cuBLAS; x as the first operand (XA) measured slower
DEFAULT = dict(BN=64, BM=128, BK=128, num_warps=4, num_stages=3, SPLIT=1, GM=8)
TUNED: dict = {}


def bucket(M: int) -> int:
    return 32 if M <= 32 else 64 if M <= 64 else 128 if M <= 128 else 256


def config(M: int, N: int, K: int, group: int) -> dict:
    """The launch config for a batch of M rows: the tuned tile of M's bucket, BM no wider than the batch needs,
    BK dividing the group and K."""
    c = dict(DEFAULT, **TUNED.get(bucket(M), {}))
    c["BM"] = min(c["BM"], max(16, triton.next_power_of_2(M)))
    while c["BK"] > 16 and (group % c["BK"] or K % c["BK"]):
        c["BK"] //= 2
    return c


def supports(pk: dict, x2: torch.Tensor) -> bool:
    """Layouts and batches this kernel takes: 2/4/8-bit rk words, K and the group multiples of 16, a batch of at
    least MIN_M rows, 16-bit activations on a GPU (fp32 only under the interpreter)."""
    if not ON or pk["bits"] not in BITS or pk["K"] % 16 or pk["group"] % 16 or x2.shape[0] < MIN_M:
        return False
    if pk["bits"] == 8 and x2.dtype == torch.bfloat16:  # 128 + q is exact in bf16 only up to q = 127
        return False
    return x2.dtype in (torch.float16, torch.bfloat16) or (x2.dtype == torch.float32 and not x2.is_cuda)


_SCRATCH: dict = {}


def _scratch(device: torch.device, floats: int, ints: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Split-K slots and counters (:func:`leanq.kernels.cuda_rt.grow_scratch`)."""
    return grow_scratch(_SCRATCH, device, floats, ints)


def run_gemm_rk(x2: torch.Tensor, pk: dict, bias: torch.Tensor | None, cfg: dict | None = None) -> torch.Tensor:
    """x2 [M, K] -> [M, N] of x2.dtype (see :func:`supports`)."""
    M, K = x2.shape
    assert K == pk["K"] and pk["bits"] in BITS, (K, pk["K"], pk["bits"])
    N = pk["N"]
    c = dict(config(M, N, K, pk["group"]), **(cfg or {}))
    if K % c["BK"] or pk["group"] % c["BK"]:
        raise ValueError(f"triton-gemm: BK {c['BK']} must divide K {K} and the group {pk['group']}")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    tiles = triton.cdiv(N, c["BN"]) * triton.cdiv(M, c["BM"])
    split = max(1, min(int(c["SPLIT"]), K // c["BK"]))
    out = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    part = cnt = out
    asm = x2.is_cuda and not _INTERPRET
    if split > 1:
        sc = _scratch(x2.device, tiles * split * c["BN"] * c["BM"], tiles)
        if sc is None:
            split = 1
        else:
            part, cnt = sc
    _gemm_rk_kernel[(tiles, split)](
        x2, out, bias if bias is not None else out, pk["words"], pk["sz"], part, cnt, M, N, K,
        pk["words"].shape[1], pk["NG"], x2.stride(0), pk["group"], B=pk["bits"], SBF16=bool(pk["sbf16"]),
        HAS_BIAS=bias is not None, BN=c["BN"], BM=c["BM"], BK=c["BK"], SPLIT=split, GM=c["GM"], ASM=asm,
        XA=bool(c.get("XA", False)),
        ASM_SRC=_asm(pk["bits"], x2.dtype == torch.float16) if asm else "",
        num_warps=c["num_warps"], num_stages=c["num_stages"])
    return out
