"""One decode step's rotary embedding and static-cache write, as one kernel.

In transformers' Llama-family attention a decode step (batch 1, one token) does, after the q/k/v projection: the
rotary embedding of q and k (``q * cos + rotate_half(q) * sin``), the static cache's write of k and v at its write
position (``index_copy_``) and that position's advance (``cumulative_length += 1``).  Compiled, that is two or three
kernels of TorchInductor's a layer (about 3 us a layer of a 7B-shaped model's 1.76 ms step on an H200,
docs/PERFORMANCE.md, version 30).  :func:`rope_cache` does the rotation and the write in one launch: one program
per q head (rotated into the output) and one per k/v head (k rotated, both written into the cache at the position
read from the cache's counter).  The counter's advance stays with the caller, in torch: an op that advanced it
would mutate a tensor TorchInductor also reads for the positions and the mask, and TorchInductor 2.13 was seen
(on the CPU) to recompute those reads after such an op's in-place write, one position late.

The arithmetic is in float32 with one rounding to the output's dtype, as TorchInductor's fused kernels compute it;
transformers' eager code rounds each product to the model's dtype first, so the two differ by rounding only.

:func:`reference` is the same in torch (the CPU, and any device without Triton): it is the oracle of the Triton
kernel's tests (tests/test_kernels_rope_cache.py: on the CPU through TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools

import torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin over the last dim (its two halves swapped, the first negated), in float32."""
    h = x.shape[-1] // 2
    x = x.float()
    return x * cos.float() + torch.cat((-x[..., h:], x[..., :h]), -1) * sin.float()


def reference(qkv: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor, counter: torch.Tensor, hq: int, hkv: int) -> torch.Tensor:
    """``qkv``: one token's q, k and v projections side by side ([..., (hq + 2 hkv) * d], ``bias`` added when
    given, in float32); ``cos``/``sin``: its rotary embedding ([..., d]); ``keys``/``values``: a static cache
    layer's tensors [1, hkv, L, d], written at position ``counter`` (a 0-d integer tensor, read only). Returns the
    rotated q as [1, hq, 1, d] in qkv's dtype. No host synchronisation (the position stays on the device)."""
    d = keys.shape[-1]
    x = qkv.reshape(hq + 2 * hkv, d).float()
    if bias is not None:
        x = x + bias.reshape(hq + 2 * hkv, d).float()
    c, s = cos.reshape(d), sin.reshape(d)
    q = rotate(x[:hq], c, s).to(qkv.dtype)
    k = rotate(x[hq:hq + hkv], c, s).to(keys.dtype)
    pos = counter.reshape(1).to(torch.long)
    keys.index_copy_(2, pos, k.reshape(1, hkv, 1, d))
    values.index_copy_(2, pos, x[hq + hkv:].to(values.dtype).reshape(1, hkv, 1, d))
    return q.reshape(1, hq, 1, d)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rope_cache_kernel(qkv_ptr, bias_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, counter_ptr, q_ptr,
                          HQ, HKV, L, HAS_BIAS: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr):
        pid = tl.program_id(0)
        j = tl.arange(0, HALF)
        pos = tl.load(counter_ptr)
        base = pid * D  # q head pid, or k head pid - HQ: both start at pid * D in qkv
        x1 = tl.load(qkv_ptr + base + j).to(tl.float32)
        x2 = tl.load(qkv_ptr + base + HALF + j).to(tl.float32)
        if HAS_BIAS:
            x1 += tl.load(bias_ptr + base + j).to(tl.float32)
            x2 += tl.load(bias_ptr + base + HALF + j).to(tl.float32)
        o1 = x1 * tl.load(cos_ptr + j).to(tl.float32) - x2 * tl.load(sin_ptr + j).to(tl.float32)
        o2 = x2 * tl.load(cos_ptr + HALF + j).to(tl.float32) + x1 * tl.load(sin_ptr + HALF + j).to(tl.float32)
        if pid < HQ:
            tl.store(q_ptr + base + j, o1.to(q_ptr.dtype.element_ty))
            tl.store(q_ptr + base + HALF + j, o2.to(q_ptr.dtype.element_ty))
        else:
            h = pid - HQ
            dst = (h * L + pos) * D
            tl.store(keys_ptr + dst + j, o1.to(keys_ptr.dtype.element_ty))
            tl.store(keys_ptr + dst + HALF + j, o2.to(keys_ptr.dtype.element_ty))
            src = (HQ + HKV + h) * D
            v1 = tl.load(qkv_ptr + src + j).to(tl.float32)
            v2 = tl.load(qkv_ptr + src + HALF + j).to(tl.float32)
            if HAS_BIAS:
                v1 += tl.load(bias_ptr + src + j).to(tl.float32)
                v2 += tl.load(bias_ptr + src + HALF + j).to(tl.float32)
            tl.store(values_ptr + dst + j, v1.to(values_ptr.dtype.element_ty))
            tl.store(values_ptr + dst + HALF + j, v2.to(values_ptr.dtype.element_ty))

    return rope_cache_kernel


def triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def run_triton(qkv: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor, values: torch.Tensor, counter: torch.Tensor, hq: int, hkv: int) -> torch.Tensor:
    """:func:`reference` as one Triton launch."""
    d = keys.shape[-1]
    q = torch.empty(1, hq, 1, d, device=qkv.device, dtype=qkv.dtype)
    b = bias.to(qkv.dtype).contiguous() if bias is not None else qkv
    _kernel()[(hq + hkv,)](qkv.contiguous(), b, cos.contiguous(), sin.contiguous(), keys, values, counter, q,
                           hq, hkv, keys.shape[2], HAS_BIAS=bias is not None, D=d, HALF=d // 2, num_warps=1)
    return q


def fits(qkv: torch.Tensor, cos: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, counter: torch.Tensor,
         hq: int, hkv: int) -> bool:
    """The shapes the op takes: one token at batch 1, contiguous cache tensors [1, hkv, L, d] of one dtype and
    device, an even power-of-two head size, a 0-d integer counter on the same device."""
    d = keys.shape[-1] if keys.dim() == 4 else 0
    return (d >= 2 and d & (d - 1) == 0 and qkv.numel() == (hq + 2 * hkv) * d and cos.numel() == d
            and keys.shape[:2] == (1, hkv) and values.shape == keys.shape and values.dtype == keys.dtype
            and keys.is_contiguous() and values.is_contiguous() and counter.dim() == 0
            and not counter.is_floating_point()
            and len({t.device for t in (qkv, cos, keys, values, counter)}) == 1)


def _impl(qkv: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
          values: torch.Tensor, counter: torch.Tensor, hq: int, hkv: int) -> torch.Tensor:
    if qkv.is_cuda and triton_ok():
        return run_triton(qkv, bias, cos, sin, keys, values, counter, hq, hkv)
    return reference(qkv, bias, cos, sin, keys, values, counter, hq, hkv)


try:
    op = torch.library.custom_op("leanq::rope_cache", mutates_args=("keys", "values"))(_impl)

    @op.register_fake
    def _(qkv, bias, cos, sin, keys, values, counter, hq, hkv):
        return qkv.new_empty(1, hq, 1, keys.shape[-1])
except Exception:  # an older torch without custom_op: the attention is not folded
    op = None


def rope_cache(qkv: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor, values: torch.Tensor, counter: torch.Tensor, hq: int, hkv: int) -> torch.Tensor:
    """:func:`reference`'s work: one Triton kernel on a GPU (the op ``leanq::rope_cache`` under torch.compile, so
    TorchInductor keeps it whole), the torch reference elsewhere."""
    if torch.compiler.is_compiling():
        return op(qkv, bias, cos, sin, keys, values, counter, hq, hkv)
    return _impl(qkv, bias, cos, sin, keys, values, counter, hq, hkv)
