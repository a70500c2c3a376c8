"""One decode step's attention with its rotary embedding and static-cache write, as one kernel.

After :mod:`.rope_cache` a folded decode step still ran transformers' attention function on the cache: on an H200
that is cuDNN's prefill kernel, about 6 us a layer for one query over a 272-position cache (docs/PERFORMANCE.md,
version 30), for reading at most 4.5 MB.  :func:`attend` does the rotary embedding, the cache write and the attention
in one launch, split over the cache (flash-decoding):

- the grid is (kv heads, splits); a program takes one kv head's G = hq / hkv query heads (GQA) and one chunk of the
  positions written so far (those after the write position are never read: a causal decoder masks them);
- each program rotates its q heads, and the one whose chunk holds the write position rotates k, writes k and v
  into the cache and adds the new position from registers (the others read only positions before it);
- scores in float32 (q and p rounded to the cache's dtype for the products, as a fused attention kernel does), an
  online softmax per chunk, the mask transformers passes applied (boolean: keep where true; float: added);
- the last program of a kv head to finish (an atomic ticket) combines the chunks' partial sums (while every
  position so far fits in the first chunk, that chunk's program writes the output alone); the tickets reset
  themselves, so the op is safe inside a CUDA graph. The counter's advance stays with the caller
  (:mod:`.rope_cache` says why).

Measured in a 7B-shaped decode on an H200 (version 30): 6.1 us a layer in its first form, no faster than cuDNN's
kernel, latency-bound (the position, k and v, the ticket, the combine: four round trips); the gain is the two or three
kernels and gaps it replaces.

:func:`reference` is the same in torch (the CPU, and the kernel's oracle in tests/test_kernels_decode_attention.py,
on the CPU through TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools

import torch

from . import rope_cache
from .cuda_rt import device_index, sm90, sm_count

BLOCK_N = 64  # positions per step of a program's loop
# Programmatic dependent launch (sm_90 on): the kernel is launched while the q/k/v GEMV before it ends, waits for it,
# and lets the o_proj GEMV after it start early (its first weight tile loaded while the attention runs). Off: 4-7%
# slower on an H200 in session 30, the early programs holding SM slots beside the q/k/v GEMV (docs/PERFORMANCE.md,
# version 31; bench_decode.py --attn pdl).
PDL = False
# Only the second half of that: the kernel launched as usual, after the q/k/v GEMV, lets the o_proj GEMV after it
# launch and load its first weight tile while the attention runs (griddepcontrol.launch_dependents; the GEMV waits
# for the attention's end before reading its output). Off: on an H200 in session 30, o_proj's GEMV added 4.0 us a
# layer after it instead of 5.7, but the decode's tokens/s did not move (docs/PERFORMANCE.md, version 31;
# bench_decode.py --attn trigger).
TRIGGER = False
# The fewest cache positions a program takes. One loop step (the measured setting): a 272-position cache of a 7B
# model is split in 5 chunks a kv head, combined through the ticket. Larger (e.g. 512): a short cache is read by one
# program a kv head, with no combine but a longer loop (Triton pipelines its loads): 1.5-2% slower in the 7B decode
# on an H200 in session 30 (docs/PERFORMANCE.md, version 31; bench_decode.py --attn chunk512).
MIN_CHUNK = BLOCK_N


def reference(qkv: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor, counter: torch.Tensor, mask: torch.Tensor | None, scaling: float, hq: int,
              hkv: int) -> torch.Tensor:
    """:func:`rope_cache.reference` (q rotated; k and v written at the counter's position), then
    softmax(q k^T * scaling + mask) v over the positions up to the written one, in float32. ``mask``: None, a
    boolean (keep where true) or an additive float tensor over the cache's positions. Returns [1, 1, hq * d] in
    qkv's dtype."""
    q = rope_cache.reference(qkv, bias, cos, sin, keys, values, counter, hq, hkv)
    d, length = keys.shape[-1], keys.shape[2]
    g = hq // hkv
    qf = q.reshape(hkv, g, d).to(keys.dtype).float()
    s = torch.einsum("hgd,hld->hgl", qf, keys[0].float()) * scaling
    valid = torch.arange(length, device=keys.device) <= counter
    if mask is not None:
        m = mask.reshape(length)
        if m.dtype == torch.bool:
            valid = valid & m
        else:
            s = s + m.float()
    s = s.masked_fill(~valid, float("-inf"))
    p = torch.softmax(s, -1)
    out = torch.einsum("hgl,hld->hgd", p, values[0].float())
    return out.reshape(1, 1, hq * d).to(qkv.dtype)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def decode_attention_kernel(qkv_ptr, bias_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, counter_ptr, ticket_ptr,
                                mask_ptr, acc_ptr, ml_ptr, out_ptr, HQ, HKV, L, CHUNK, scaling,
                                S: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                                HALF: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
                                MASK_KIND: tl.constexpr, PREC: tl.constexpr, GDC: tl.constexpr):
        if GDC == 1:  # launched early (programmatic dependent launch): wait for the q/k/v GEMV
            tl.extra.cuda.gdc_wait()
        if GDC >= 1:  # let the o_proj GEMV launch (it waits for this kernel's end before reading its output)
            tl.extra.cuda.gdc_launch_dependents()
        kvh = tl.program_id(0)
        sp = tl.program_id(1)
        pos = tl.load(counter_ptr)
        g = tl.arange(0, GP)
        gm = g < G
        j = tl.arange(0, HALF)
        c1 = tl.load(cos_ptr + j).to(tl.float32)
        c2 = tl.load(cos_ptr + HALF + j).to(tl.float32)
        s1 = tl.load(sin_ptr + j).to(tl.float32)
        s2 = tl.load(sin_ptr + HALF + j).to(tl.float32)
        # this kv head's q heads, rotated, in the cache's dtype (as they would be stored before the products)
        qrow = (kvh * G + g) * D
        q1 = tl.load(qkv_ptr + qrow[:, None] + j[None, :], mask=gm[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(qkv_ptr + qrow[:, None] + HALF + j[None, :], mask=gm[:, None], other=0.0).to(tl.float32)
        if HAS_BIAS:
            q1 += tl.load(bias_ptr + qrow[:, None] + j[None, :], mask=gm[:, None], other=0.0).to(tl.float32)
            q2 += tl.load(bias_ptr + qrow[:, None] + HALF + j[None, :], mask=gm[:, None], other=0.0).to(tl.float32)
        kd = keys_ptr.dtype.element_ty
        vd = values_ptr.dtype.element_ty
        qa = (q1 * c1[None, :] - q2 * s1[None, :]).to(kd)
        qb = (q2 * c2[None, :] + q1 * s2[None, :]).to(kd)
        kbase = keys_ptr + kvh * L * D
        vbase = values_ptr + kvh * L * D
        start = sp * CHUNK
        end = tl.minimum(start + CHUNK, pos)  # positions before the written one
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc1 = tl.zeros([GP, HALF], tl.float32)
        acc2 = tl.zeros([GP, HALF], tl.float32)
        for n0 in range(start, end, BLOCK):
            n = n0 + tl.arange(0, BLOCK)
            nm = n < end
            ka = tl.load(kbase + n[:, None] * D + j[None, :], mask=nm[:, None], other=0.0)
            kb = tl.load(kbase + n[:, None] * D + HALF + j[None, :], mask=nm[:, None], other=0.0)
            va = tl.load(vbase + n[:, None] * D + j[None, :], mask=nm[:, None], other=0.0)  # in flight with k's
            vb = tl.load(vbase + n[:, None] * D + HALF + j[None, :], mask=nm[:, None], other=0.0)
            sc = (tl.dot(qa, tl.trans(ka), input_precision=PREC)
                  + tl.dot(qb, tl.trans(kb), input_precision=PREC)) * scaling
            if MASK_KIND == 1:
                nm = nm & (tl.load(mask_ptr + n, mask=nm, other=0) != 0)
            if MASK_KIND == 2:
                sc += tl.load(mask_ptr + n, mask=nm, other=0.0).to(tl.float32)[None, :]
            sc = tl.where(nm[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(sc - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            pv = p.to(vd)
            acc1 = acc1 * alpha[:, None] + tl.dot(pv, va, input_precision=PREC)
            acc2 = acc2 * alpha[:, None] + tl.dot(pv, vb, input_precision=PREC)
            m_i = m_new
        if (pos >= start) & (pos < start + CHUNK) & (pos < L):
            # the new position: k rotated and v, written into the cache, and added from registers
            kr = (HQ + kvh) * D
            k1 = tl.load(qkv_ptr + kr + j).to(tl.float32)
            k2 = tl.load(qkv_ptr + kr + HALF + j).to(tl.float32)
            vr = (HQ + HKV + kvh) * D
            v1 = tl.load(qkv_ptr + vr + j).to(tl.float32)
            v2 = tl.load(qkv_ptr + vr + HALF + j).to(tl.float32)
            if HAS_BIAS:
                k1 += tl.load(bias_ptr + kr + j).to(tl.float32)
                k2 += tl.load(bias_ptr + kr + HALF + j).to(tl.float32)
                v1 += tl.load(bias_ptr + vr + j).to(tl.float32)
                v2 += tl.load(bias_ptr + vr + HALF + j).to(tl.float32)
            ka1 = (k1 * c1 - k2 * s1).to(kd)
            ka2 = (k2 * c2 + k1 * s2).to(kd)
            va1 = v1.to(vd)
            va2 = v2.to(vd)
            dst = pos * D
            tl.store(kbase + dst + j, ka1)
            tl.store(kbase + dst + HALF + j, ka2)
            tl.store(vbase + dst + j, va1)
            tl.store(vbase + dst + HALF + j, va2)
            sn = (tl.sum(qa.to(tl.float32) * ka1.to(tl.float32)[None, :], 1)
                  + tl.sum(qb.to(tl.float32) * ka2.to(tl.float32)[None, :], 1)) * scaling
            keep = gm
            if MASK_KIND == 1:
                keep = keep & (tl.load(mask_ptr + pos) != 0)
            if MASK_KIND == 2:
                sn += tl.load(mask_ptr + pos).to(tl.float32)
            sn = tl.where(keep, sn, float("-inf"))
            m_new = tl.maximum(m_i, sn)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(sn - m_use)
            l_i = l_i * alpha + p
            acc1 = acc1 * alpha[:, None] + p[:, None] * va1.to(tl.float32)[None, :]
            acc2 = acc2 * alpha[:, None] + p[:, None] * va2.to(tl.float32)[None, :]
            m_i = m_new
        orow = (kvh * G + g) * D
        od = out_ptr.dtype.element_ty
        if (pos < CHUNK) | (S == 1):  # one chunk holds every position so far: its program writes the output
            if sp == 0:
                inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)
                tl.store(out_ptr + orow[:, None] + j[None, :], (acc1 * inv[:, None]).to(od), mask=gm[:, None])
                tl.store(out_ptr + orow[:, None] + HALF + j[None, :], (acc2 * inv[:, None]).to(od),
                         mask=gm[:, None])
        else:
            part = (kvh * S + sp) * GP
            tl.store(acc_ptr + (part + g)[:, None] * D + j[None, :], acc1)
            tl.store(acc_ptr + (part + g)[:, None] * D + HALF + j[None, :], acc2)
            tl.store(ml_ptr + (part + g) * 2, m_i)
            tl.store(ml_ptr + (part + g) * 2 + 1, l_i)
            tl.debug_barrier()
            t = tl.atomic_add(ticket_ptr + kvh, 1)
            if t == S - 1:  # the last of this kv head's programs: combine the chunks
                mm = tl.full([GP], float("-inf"), tl.float32)
                ll = tl.zeros([GP], tl.float32)
                o1 = tl.zeros([GP, HALF], tl.float32)
                o2 = tl.zeros([GP, HALF], tl.float32)
                for s in tl.static_range(S):
                    row = (kvh * S + s) * GP + g
                    ms = tl.load(ml_ptr + row * 2, cache_modifier=".cg")
                    ls = tl.load(ml_ptr + row * 2 + 1, cache_modifier=".cg")
                    a1 = tl.load(acc_ptr + row[:, None] * D + j[None, :], cache_modifier=".cg")
                    a2 = tl.load(acc_ptr + row[:, None] * D + HALF + j[None, :], cache_modifier=".cg")
                    m_new = tl.maximum(mm, ms)
                    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                    wa = tl.exp(mm - m_use)
                    wb = tl.exp(ms - m_use)
                    ll = ll * wa + ls * wb
                    o1 = o1 * wa[:, None] + a1 * wb[:, None]
                    o2 = o2 * wa[:, None] + a2 * wb[:, None]
                    mm = m_new
                inv = 1.0 / tl.where(ll > 0, ll, 1.0)
                tl.store(out_ptr + orow[:, None] + j[None, :], (o1 * inv[:, None]).to(od), mask=gm[:, None])
                tl.store(out_ptr + orow[:, None] + HALF + j[None, :], (o2 * inv[:, None]).to(od), mask=gm[:, None])
                tl.store(ticket_ptr + kvh, 0)

    return decode_attention_kernel


def splits(length: int, hkv: int, device: torch.device) -> int:
    """Chunks of the cache per kv head: enough programs to cover the GPU's multiprocessors once, no chunk shorter
    than :data:`MIN_CHUNK` positions."""
    sms = sm_count(device_index(device)) if device.type == "cuda" else 8
    return max(1, min(-(-sms // hkv), -(-length // max(BLOCK_N, MIN_CHUNK))))


def _mask_kind(mask: torch.Tensor | None) -> int:
    return 0 if mask is None else 1 if mask.dtype == torch.bool else 2


def run_triton(qkv: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor, values: torch.Tensor, counter: torch.Tensor, ticket: torch.Tensor,
               mask: torch.Tensor | None, scaling: float, hq: int, hkv: int, n_splits: int | None = None,
               pdl: bool | None = None, trigger: bool | None = None) -> torch.Tensor:
    """:func:`reference` as one Triton launch (``ticket``: hkv int32 zeros the kernel counts on and leaves at
    zero; ``n_splits`` overrides :func:`splits`; ``pdl`` overrides :data:`PDL`, ``trigger`` :data:`TRIGGER`, both
    used on sm_90 and later only)."""
    d, length = keys.shape[-1], keys.shape[2]
    g = hq // hkv
    import triton

    gp = max(16, triton.next_power_of_2(g))
    s = n_splits or splits(length, hkv, qkv.device)
    chunk = -(-length // s)
    out = torch.empty(1, 1, hq * d, device=qkv.device, dtype=qkv.dtype)
    acc = torch.empty(hkv * s * gp * d if s > 1 else 1, device=qkv.device, dtype=torch.float32)
    ml = torch.empty(hkv * s * gp * 2 if s > 1 else 1, device=qkv.device, dtype=torch.float32)
    b = bias.to(qkv.dtype).contiguous() if bias is not None else qkv
    mk = mask.reshape(length).contiguous() if mask is not None else qkv
    args = (qkv.contiguous(), b, cos.contiguous(), sin.contiguous(), keys, values, counter, ticket, mk, acc, ml, out,
            hq, hkv, length, chunk, float(scaling))
    meta = dict(S=s, G=g, GP=gp, D=d, HALF=d // 2, BLOCK=BLOCK_N, HAS_BIAS=bias is not None,
                MASK_KIND=_mask_kind(mask), PREC="ieee" if keys.dtype == torch.float32 else "tf32", num_warps=4)
    pdl = PDL if pdl is None else pdl
    trigger = TRIGGER if trigger is None else trigger
    if (pdl or trigger) and qkv.is_cuda and sm90(device_index(qkv)):
        try:
            if pdl:
                _kernel()[(hkv, s)](*args, GDC=1, launch_pdl=True, **meta)
            else:
                _kernel()[(hkv, s)](*args, GDC=2, **meta)
            return out
        except Exception as e:  # a Triton without launch_pdl or the gdc intrinsics: say so once, launch plainly
            _no_pdl(e)
    _kernel()[(hkv, s)](*args, GDC=0, **meta)
    return out


def _no_pdl(e: Exception) -> None:
    global PDL, TRIGGER
    if PDL or TRIGGER:
        import warnings

        warnings.warn(f"leanq: decode attention without programmatic dependent launch ({str(e)[:160]})")
    PDL = TRIGGER = False


def fits(qkv: torch.Tensor, cos: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, counter: torch.Tensor,
         mask: torch.Tensor | None, hq: int, hkv: int) -> bool:
    """:func:`rope_cache.fits`, at least 32 values a head (the kernel's products take 16 a half), at most 16 q heads
    a kv head, and a mask that is None or one row over the cache's positions."""
    if not rope_cache.fits(qkv, cos, keys, values, counter, hq, hkv):
        return False
    d, length = keys.shape[-1], keys.shape[2]
    return (d >= 32 and hq // hkv <= 16
            and (mask is None or (mask.numel() == length and mask.shape[-1] == length and mask.device == keys.device
                                  and (mask.dtype == torch.bool or mask.is_floating_point()))))


def _impl(qkv: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
          values: torch.Tensor, counter: torch.Tensor, ticket: torch.Tensor, mask: torch.Tensor | None,
          scaling: float, hq: int, hkv: int) -> torch.Tensor:
    if qkv.is_cuda and rope_cache.triton_ok():
        return run_triton(qkv, bias, cos, sin, keys, values, counter, ticket, mask, scaling, hq, hkv)
    return reference(qkv, bias, cos, sin, keys, values, counter, mask, scaling, hq, hkv)


try:
    op = torch.library.custom_op("leanq::decode_attention", mutates_args=("keys", "values", "ticket"))(_impl)

    @op.register_fake
    def _(qkv, bias, cos, sin, keys, values, counter, ticket, mask, scaling, hq, hkv):
        return qkv.new_empty(1, 1, hq * keys.shape[-1])
except Exception:  # an older torch without custom_op
    op = None


def attend(qkv: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
           values: torch.Tensor, counter: torch.Tensor, ticket: torch.Tensor, mask: torch.Tensor | None,
           scaling: float, hq: int, hkv: int) -> torch.Tensor:
    """:func:`reference`'s work: one Triton kernel on a GPU (the op ``leanq::decode_attention`` under torch.compile),
    the torch reference elsewhere."""
    if torch.compiler.is_compiling():
        return op(qkv, bias, cos, sin, keys, values, counter, ticket, mask, scaling, hq, hkv)
    return _impl(qkv, bias, cos, sin, keys, values, counter, ticket, mask, scaling, hq, hkv)
