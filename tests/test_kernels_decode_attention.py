"""kernels/decode_attention.py: one decode step's rotary embedding, cache write and attention in one kernel, against
its torch reference and transformers' sdpa. The Triton kernel runs on the GPU when there is one, else through
Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from test_kernels_rope_cache import DEV, _inputs

from leanq.kernels import decode_attention as da

# (q heads, kv heads, head size, cache length, write position, splits)
CASES = [(4, 2, 32, 80, 5, 1), (4, 2, 32, 80, 70, 3), (8, 8, 64, 200, 130, 4), (8, 1, 32, 100, 99, 2),
         (4, 2, 32, 80, 0, 3)]


def _mask(kind: str, length: int, pos: int):
    g = torch.Generator().manual_seed(length + pos)
    if kind == "none":
        return None
    keep = torch.rand(1, 1, 1, length, generator=g) > 0.3
    keep[..., pos] = True
    if kind == "bool":
        return keep.to(DEV)
    return torch.where(keep, 0.0, -1e9).to(DEV)


@pytest.mark.parametrize("hq,hkv,d,length,pos,s", CASES)
@pytest.mark.parametrize("kind", ["none", "bool", "float"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_decode_attention_matches_reference(hq, hkv, d, length, pos, s, kind, bias):
    """The kernel (split over the cache as given, chunks combined by the last program of each kv head) against the
    torch reference in float32: the same output, k and v written at the position only, the counter not moved, the
    tickets back at zero."""
    pytest.importorskip("triton")
    a = _inputs(hq, hkv, d, length, pos, bias, seed=hq + pos)
    b = [t.clone() if t is not None else None for t in a]
    mask = _mask(kind, length, pos)
    ticket = torch.zeros(hkv, dtype=torch.int32, device=DEV)
    out = da.run_triton(*a, ticket, mask, 0.17, hq, hkv, n_splits=s)
    ref = da.reference(*b, mask, 0.17, hq, hkv)
    assert out.shape == (1, 1, hq * d)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b) if x is not None)
    assert a[-1].item() == pos and not ticket.any()


def test_reference_is_transformers_sdpa_attention():
    """The reference's attention is transformers' sdpa attention over the cache after StaticLayer's write."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from leanq.kernels import rope_cache as rc

    hq, hkv, d, length, pos = 4, 2, 32, 24, 9
    a = _inputs(hq, hkv, d, length, pos, False, seed=7)
    b = [t.clone() if t is not None else None for t in a]
    mask = _mask("bool", length, pos)
    mask[..., pos + 1:] = False  # a causal mask: nothing after the written position
    out = da.reference(*a, mask, d ** -0.5, hq, hkv)
    q = rc.reference(*b, hq, hkv)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, hq // hkv
    want, _ = sdpa_attention_forward(module, q, b[4], b[5], mask, scaling=d ** -0.5)
    assert torch.allclose(out, want.reshape(1, 1, -1), rtol=1e-5, atol=1e-6)


def test_fits_and_splits():
    qkv, _, cos, _, keys, values, counter = _inputs(4, 2, 32, 80, 0, False)
    assert da.fits(qkv, cos, keys, values, counter, None, 4, 2)
    assert da.fits(qkv, cos, keys, values, counter, _mask("bool", 80, 0), 4, 2)
    assert not da.fits(qkv, cos, keys, values, counter, torch.ones(2, 1, 1, 80, dtype=torch.bool, device=DEV), 4, 2)
    assert not da.fits(qkv, cos, keys, values, counter, torch.ones(1, 1, 1, 80, dtype=torch.int64, device=DEV), 4, 2)
    small = _inputs(4, 2, 16, 80, 0, False)
    assert not da.fits(small[0], small[2], small[4], small[5], small[6], None, 4, 2)  # 16 values a head
    assert da.splits(272, 32, torch.device("cpu")) >= 1
    assert da.splits(64, 1, torch.device("cpu")) == 1  # one loop step: one chunk


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d,length,pos", [(32, 32, 128, 272, 200), (32, 8, 128, 4096, 3000), (14, 2, 64, 300, 17)])
def test_decode_attention_in_half_precision_on_a_gpu(dtype, hq, hkv, d, length, pos):
    """In 16-bit on the GPU (the model shapes of a 7B Llama-2 and an 8B Llama-3, and a Qwen2-like GQA), with the
    default splits: within 1e-2 of the float32 reference, the cache written as the reference writes it."""
    a = _inputs(hq, hkv, d, length, pos, False, dtype, seed=pos)
    b = [t.clone() if t is not None else None for t in a]
    mask = _mask("bool", length, pos)
    mask[..., pos + 1:] = False
    ticket = torch.zeros(hkv, dtype=torch.int32, device=DEV)
    out = da.run_triton(*a, ticket, mask, d ** -0.5, hq, hkv).float()
    from leanq.kernels import rope_cache as rc

    rc.reference(*b, hq, hkv)  # the cache written in 16-bit as the kernel writes it (one rounding)
    assert torch.equal(a[4], b[4]) and torch.equal(a[5], b[5]) and not ticket.any()
    ref = da.reference(*[t.float() if t is not None and t.is_floating_point() else t for t in b], mask, d ** -0.5,
                       hq, hkv)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs an sm_90 GPU (programmatic dependent launch)")
def test_decode_attention_with_pdl_is_the_same_kernel():
    """Launched early (PDL: it waits for the kernel before it and lets the next one in) the kernel writes the same
    bytes as launched plainly, after a GEMV that lets it in early."""
    hq, hkv, d, length, pos = 32, 32, 128, 272, 200
    a = _inputs(hq, hkv, d, length, pos, False, torch.bfloat16, seed=11)
    b = [t.clone() if t is not None else None for t in a]
    ticket = torch.zeros(hkv, dtype=torch.int32, device=DEV)
    mask = _mask("bool", length, pos)
    plain = da.run_triton(*a, ticket, mask, d ** -0.5, hq, hkv, pdl=False)
    torch.mul(b[0], 1.0, out=b[0])  # a kernel before it
    early = da.run_triton(*b, ticket, mask, d ** -0.5, hq, hkv, pdl=True)
    assert torch.equal(plain, early) and torch.equal(a[4], b[4]) and not ticket.any()
