"""CPU kernel for 4-bit integer weights: PyTorch's packed int4 matmul (``_weight_int4pack_mm_for_cpu``).

The reference kernel dequantizes the whole weight on every call, which on a CPU costs more than the
float matmul it replaces.  PyTorch ships a packed int4 x float GEMM for CPUs
(``aten._convert_weight_to_int4pack_for_cpu`` packs int32 codes [N, K];
``aten._weight_int4pack_mm_for_cpu(x [M, K], packed, qgroup, scale_and_zero [K/qgroup, N, 2])``
computes x @ W^T with W = (q - 8) * scale + zero, qgroup in {32, 64, 128, 256} dividing K;
float32, bfloat16 and float16 activations).  Each layer is repacked into that layout once, at first
use, and cached on the module (``m._cache``, never saved: checkpoints keep leanq's format).

Mapping leanq's W = (q - z) * s:  scale = s,  zero = (8 - z) * s.

Group sizes: qgroup is the largest of 256/128/64/32 that divides both leanq's group size g and K; each
leanq group's scale is repeated over its g / qgroup sub-groups.  A shorter last group (K % g != 0, e.g.
SmolLM2's 576-wide inputs at g128: groups 128, 128, 128, 128, 64) then spans whole sub-groups, since
qgroup divides K and g.  Layers where no qgroup fits, or whose output width is not a multiple of 16
(the packing's row tile), fall back to the reference.
"""

from __future__ import annotations

import os

import torch

from ..formats.intq import group_size_of
from ..formats.packing import unpack
from . import Kernel, drop_stored, register_kernel

QGROUPS = (256, 128, 64, 32)
# rows (tokens) up to which the packed kernel runs: decoding and small batches.  Larger inputs (prefill,
# perplexity windows of 1024 tokens) keep the reference, whose one dequantization per call is cheap beside
# an MKL matmul of that size; it also leaves evaluation numerics exactly as they were.
# On by default since session 5: on the quiet 2-core CPU, SmolLM2 at 4 bits decodes 1.23-1.26x faster
# than FP32 with it (docs/PERFORMANCE.md).  Under heavy contention it measured slower (session 2), and it
# rounds float32 activations to bf16 (relative error ~3e-3); LEANQ_CPU_INT4_MAX_ROWS=0 turns it off.
MAX_ROWS = int(os.environ.get("LEANQ_CPU_INT4_MAX_ROWS", "32"))


def _have_ops() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


HAVE_OPS = _have_ops()


def qgroup_for(group: int, k: int) -> int | None:
    """The packed op's group size for a leanq group size and input width, or None."""
    for q in QGROUPS:
        if group % q == 0 and k % q == 0:
            return q
    return None


def repack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, sym: bool, k: int, group: int,
           dtype: torch.dtype) -> dict:
    """Packed weight, scale_and_zero [K/qg, N, 2] of ``dtype`` and qg from leanq's stored tensors."""
    qg = qgroup_for(group, k)
    assert qg is not None, (group, k)
    n, ng = scales.shape
    codes = unpack(qweight, 4, k).to(torch.int32).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8)
    s = scales.float()
    z = torch.full_like(s, 8.0) if sym else unpack(zeros, 4, ng).float()
    rep = group // qg
    nsub = k // qg
    s = s.repeat_interleave(rep, dim=1)[:, :nsub]
    zero = ((8.0 - z) * scales.float()).repeat_interleave(rep, dim=1)[:, :nsub]
    sz = torch.stack([s, zero], -1).transpose(0, 1).contiguous().to(dtype)  # [K/qg, N, 2]
    return dict(packed=packed, sz=sz, qg=qg)


def packed_for(m, dtype: torch.dtype) -> dict:
    """The repacked tensors of QuantLinear ``m`` for activations of ``dtype``, built once and cached.

    Keyed on the stored buffers' storage and version counters (load_state_dict invalidates it).  Inside
    torch.compile the key is not checked (data pointers cannot be traced): the copy built by an eager call
    serves, as for the GPU layouts (kernels.cached_layout)."""
    hit = m._cache.get("cpu-int4")
    if "cpu-int4-only" in m._cache or (hit is not None and torch.compiler.is_compiling()):
        pk = hit[1]  # stored buffers released (only the packed copy is left), or tracing
        return pk if pk["sz"].dtype == dtype else dict(pk, sz=pk["sz"].to(dtype))
    key = tuple((t.data_ptr(), t._version) for t in (m.qweight, m.scales, m.zeros)) + (dtype,)
    if hit is None or hit[0] != key:
        pk = repack(m.qweight, m.scales, m.zeros, m.spec.sym, m.in_features, group_size_of(m.spec, m.in_features),
                    dtype)
        m._cache["cpu-int4"] = hit = (key, pk)
    return hit[1]


def supports(m, x: torch.Tensor) -> bool:
    if not HAVE_OPS or m.fmt != "int" or m.spec.bits != 4 or x.shape[-1] != m.in_features:
        return False
    if m.out_features % 16:  # the packing works on 16-row tiles
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.numel() // x.shape[-1] > MAX_ROWS:
        return False
    return qgroup_for(group_size_of(m.spec, m.in_features), m.in_features) is not None


# The op's float32 path is scalar code on this build (measured, 1 x 576 @ 576 x 1536 on the 2-core CPU:
# 5.7 ms float32 vs 0.7 ms bfloat16 activations, float32 F.linear 0.33 ms), so float32 inputs are
# rounded to bfloat16 for the op and the output returned in float32 (relative error ~3e-3, the
# rounding of a bf16 activation).
OP_DTYPE = {torch.float32: torch.bfloat16, torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}


def run(m, x: torch.Tensor) -> torch.Tensor:
    dt = OP_DTYPE[x.dtype]
    pk = packed_for(m, dt)
    x2 = x.reshape(-1, x.shape[-1])
    in_scale = getattr(m, "in_scale", None)
    if in_scale is not None:  # AWQ stores W diag(in_scale): x @ (W'/in_scale)^T = (x/in_scale) @ W'^T
        x2 = x2.float() / in_scale.float()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(dt).contiguous(), pk["packed"], pk["qg"], pk["sz"])
    y = y.to(x.dtype)
    if m.bias is not None:
        y = y + m.bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], m.out_features)


def release_stored(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Inference only: repack every supported 4-bit CPU layer now and free its stored-format buffers
    (keeping both would hold the codes twice).  Afterwards those layers run only through this kernel
    and cannot be saved.  Returns the bytes freed."""
    freed = 0
    for m in model.modules():
        if getattr(m, "fmt", None) != "int" or not hasattr(m, "qweight") or m.qweight.device.type != "cpu":
            continue
        if not supports(m, torch.empty(1, m.in_features, device="meta", dtype=dtype)):
            continue
        packed_for(m, OP_DTYPE[dtype])
        m._cache["cpu-int4-only"] = True
        freed += drop_stored(m)
    return freed


CPU_INT4 = register_kernel(Kernel("cpu-int4pack", "int", ("cpu",), supports, run, priority=10))
