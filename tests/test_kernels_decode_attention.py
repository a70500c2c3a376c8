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
@pytest.mark.parametrize("hq,hkv,d,length,pos",
                         [(32, 32, 128, 272, 200), (32, 8, 128, 4096, 3000), (14, 2, 64, 300, 17)])
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
    c = [t.clone() if t is not None else None for t in a]
    plain = da.run_triton(*a, ticket, mask, d ** -0.5, hq, hkv, pdl=False, trigger=False)
    torch.mul(b[0], 1.0, out=b[0])  # a kernel before it
    early = da.run_triton(*b, ticket, mask, d ** -0.5, hq, hkv, pdl=True)
    assert torch.equal(plain, early) and torch.equal(a[4], b[4]) and not ticket.any()
    trig = da.run_triton(*c, ticket, mask, d ** -0.5, hq, hkv, pdl=False, trigger=True)
    after = torch.mul(trig, 2.0)  # a kernel after it
    assert torch.equal(plain, trig) and torch.equal(after, plain * 2) and torch.equal(a[4], c[4]) and not ticket.any()



_SM90 = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from leanq.kernels import decode_attention, rope_cache
out = []
for mod, types, consts, options in json.loads(sys.argv[1]):
    kernel = {"decode_attention": decode_attention, "rope_cache": rope_cache}[mod]._kernel()
    names = kernel.arg_names
    sig = {n: types.get(n, "constexpr") for n in names}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items()})
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, **options))
    out.append(ck.asm["ptx"])
print(json.dumps(out))
"""


def _compile_sm90(specs: list) -> list[str]:
    """Compile Triton kernels for an sm_90 GPU without one (Triton's own ptxas), in a process without Triton's
    interpreter: the code generation the interpreter skips (loop-carried types, intrinsics) is checked on the CPU
    too. ``specs``: (module, argument types, constexprs, options); returns each kernel's PTX."""
    import json
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _SM90, json.dumps(specs)], capture_output=True, text=True, env=env,
                       timeout=600)
    if r.returncode and ("ptxas" in r.stderr.lower() or "GPUTarget" in r.stderr or "ASTSource" in r.stderr):
        pytest.skip(f"this Triton cannot compile for sm_90 here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_kernels_compile_for_sm90():
    """The decode-attention kernel in the 7B decode's configuration (bf16, 5 chunks, a boolean mask; MHA and GQA),
    without programmatic dependent launch, launched early (griddepcontrol's wait and trigger in its PTX) and only
    letting the next kernel in (the trigger alone), in one chunk with a bias
    and no mask, and the rope-cache kernel compile for sm_90."""
    if torch.cuda.is_available():
        pytest.skip("the GPU tests launch them")
    types = dict(qkv_ptr="*bf16", bias_ptr="*bf16", cos_ptr="*bf16", sin_ptr="*bf16", keys_ptr="*bf16",
                 values_ptr="*bf16", counter_ptr="*i64", ticket_ptr="*i32", mask_ptr="*i1", acc_ptr="*fp32",
                 ml_ptr="*fp32", out_ptr="*bf16", HQ="i32", HKV="i32", L="i32", CHUNK="i32", scaling="fp32",
                 q_ptr="*bf16")
    specs = [("decode_attention", types, dict(S=5, G=g, GP=16, D=128, HALF=64, BLOCK=64, HAS_BIAS=False,
                                              MASK_KIND=1, PREC="tf32", GDC=gdc), dict(launch_pdl=gdc == 1))
             for g in (1, 4) for gdc in (0, 1, 2)]
    specs.append(("decode_attention", types, dict(S=1, G=1, GP=16, D=128, HALF=64, BLOCK=64, HAS_BIAS=True,
                                                  MASK_KIND=0, PREC="tf32", GDC=0), {}))  # one chunk (MIN_CHUNK)
    specs.append(("rope_cache", types, dict(HAS_BIAS=True, D=128, HALF=64), {}))
    ptx = _compile_sm90(specs)
    assert ["griddepcontrol.wait" in p for p in ptx] == [False, True, False] * 2 + [False, False]
    assert ["griddepcontrol.launch_dependents" in p for p in ptx] == [False, True, True] * 2 + [False, False]
    assert all("st.global" in p for p in ptx)
