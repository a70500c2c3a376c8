"""kernels/rope_cache.py: the decode step's rotary embedding and static-cache write in one kernel, against its torch
reference and against transformers' own code; and the attention fold that uses it (cuda_int.fold_decoder).

The Triton kernel runs on the GPU when there is one, else through Triton's interpreter (TRITON_INTERPRET=1, set
before triton is imported).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from leanq.kernels import rope_cache as rc

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(hq: int, hkv: int, d: int, length: int, pos: int, bias: bool, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = (hq + 2 * hkv) * d
    qkv = torch.randn(1, 1, n, generator=g).to(DEV, dtype)
    b = torch.randn(n, generator=g).to(DEV, dtype) if bias else None
    ang = torch.rand(d // 2, generator=g) * 6.0
    cos, sin = (f(torch.cat([ang, ang])).reshape(1, 1, d).to(DEV, dtype) for f in (torch.cos, torch.sin))
    keys, values = (torch.randn(1, hkv, length, d, generator=g).to(DEV, dtype) for _ in range(2))  # not zeros
    counter = torch.tensor(pos, device=DEV)
    return qkv, b, cos, sin, keys, values, counter


def _transformers_step(qkv, bias, cos, sin, keys, values, pos, hq, hkv):
    """What transformers' Llama attention and StaticLayer.update compute for one token (float32)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    d = keys.shape[-1]
    x = (qkv.reshape(-1) + (bias if bias is not None else 0)).float()
    q = x[:hq * d].reshape(1, 1, hq, d).transpose(1, 2)
    k = x[hq * d:(hq + hkv) * d].reshape(1, 1, hkv, d).transpose(1, 2)
    v = x[(hq + hkv) * d:].reshape(1, 1, hkv, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos.float(), sin.float())
    keys, values = keys.clone().float(), values.clone().float()
    keys[:, :, pos], values[:, :, pos] = k[:, :, 0], v[:, :, 0]
    return q, keys, values


@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 32), (6, 6, 16), (8, 1, 64)])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("how", ["triton", "reference"])
def test_rope_cache_matches_transformers(hq, hkv, d, bias, how):
    """Both forms (the Triton kernel: GPU or interpreter) rotate q and write the rotated k and v at the counter's
    position and nowhere else (the counter left as it was); q and the cache as transformers' code computes them
    (float32)."""
    pos, length = 5, 9
    qkv, b, cos, sin, keys, values, counter = _inputs(hq, hkv, d, length, pos, bias, seed=hq + d)
    q_ref, k_ref, v_ref = _transformers_step(qkv, b, cos, sin, keys, values, pos, hq, hkv)
    if how == "triton":
        pytest.importorskip("triton")
        q = rc.run_triton(qkv, b, cos, sin, keys, values, counter, hq, hkv)
    else:
        q = rc.reference(qkv, b, cos, sin, keys, values, counter, hq, hkv)
    assert q.shape == (1, hq, 1, d)
    assert torch.allclose(q.float(), q_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(keys.float(), k_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(values.float(), v_ref, rtol=1e-5, atol=1e-5)
    assert counter.item() == pos


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_cache_kernel_is_the_reference_in_half_precision(dtype):
    """In 16-bit the kernel and the reference round once from the same float32 values: equal bytes, over several
    steps (the caller advancing the counter each time). (Triton's interpreter truncates float32 to bfloat16 instead of
    rounding, so bfloat16 is checked on a GPU only.)"""
    pytest.importorskip("triton")
    if DEV == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter truncates to bfloat16 (the GPU rounds): checked on a GPU")
    hq, hkv, d = 4, 2, 32
    a = list(_inputs(hq, hkv, d, 8, 2, True, dtype, seed=3))
    b = [t.clone() if t is not None else None for t in a]
    for _ in range(3):
        qa = rc.run_triton(*a, hq, hkv)
        qb = rc.reference(*b, hq, hkv)
        assert torch.equal(qa, qb)
        a[-1] += 1
        b[-1] += 1
    assert all(torch.equal(x, y) for x, y in zip(a, b) if x is not None)


def test_fits_takes_one_token_of_a_static_cache_layer():
    qkv, _, cos, _, keys, values, counter = _inputs(4, 2, 32, 9, 0, False)
    assert rc.fits(qkv, cos, keys, values, counter, 4, 2)
    assert not rc.fits(qkv, cos, keys, values, counter, 4, 1)  # heads that do not add up
    assert not rc.fits(torch.cat([qkv, qkv], 1), cos, keys, values, counter, 4, 2)  # two tokens
    assert not rc.fits(qkv, cos, keys.transpose(2, 3), values, counter, 4, 2)  # not contiguous
    assert not rc.fits(qkv, cos, keys, values, counter.float(), 4, 2)
    assert not rc.fits(qkv, cos, keys, values, counter.reshape(1), 4, 2)


def _decode(model, ids, steps: int, compiled: bool, length: int = 16):
    """A prompt's forward, then ``steps`` greedy tokens through a static cache (the model compiled for them when
    ``compiled``): the logits of each step and the cache."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=length)
    outs = []
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        f = torch.compile(model) if compiled else model
        for i in range(steps):
            pos = torch.tensor([ids.shape[1] + i], device=ids.device)
            out = f(tok, past_key_values=cache, use_cache=True, cache_position=pos)
            outs.append(out.logits[:, -1].clone())
            tok = out.logits[:, -1:].argmax(-1)
    return torch.stack(outs), cache


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("attend", [True, False], ids=["attention", "rope-only"])
def test_folded_attention_keeps_the_logits_and_the_cache(family, compiled, attend):
    """fold_decoder's attention fold on the CPU (the ops' torch paths; Qwen2 with q/k/v biases): a static-cache decode
    keeps the unfolded model's logits, cache contents and write positions, eagerly and under torch.compile (the ops
    writing the cache in place); each decode step calls the op (decode_attention with ``attend``, else rope_cache)
    once a layer, a prompt never."""
    torch._dynamo.reset()
    from test_kernels_cuda_int import _folded_tiny_llama

    from leanq.kernels import cuda_int as ci
    from leanq.kernels import decode_attention as da

    model = _folded_tiny_llama(family)
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    ref, c0 = _decode(model, ids, 4, False)
    assert ci.fold_decoder(model, attend=attend) == 2 * 5
    assert ci.fold_decoder(model) == 0
    calls = []
    mod = da if attend else rc
    impl = mod._impl
    try:
        mod._impl = lambda *a: (calls.append(a[-2:]), impl(*a))[1]
        got, c1 = _decode(model, ids, 4, compiled)
    finally:
        mod._impl = impl
        torch._dynamo.reset()
    if not compiled:
        assert calls == [(4, 2)] * 8
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(c0.layers, c1.layers):
        assert a.cumulative_length.item() == b.cumulative_length.item() == 10
        assert torch.allclose(a.keys, b.keys, rtol=1e-5, atol=1e-5)
        assert torch.allclose(a.values, b.values, rtol=1e-5, atol=1e-5)


def test_folded_attention_runs_the_class_forward_off_its_path():
    """A dynamic cache, a prompt, batch 2: the folded attention runs transformers' own forward (same logits as
    before folding); fold_decoder(rope=False) leaves the attention alone."""
    from test_kernels_cuda_int import _folded_tiny_llama

    from leanq.kernels import cuda_int as ci

    model = _folded_tiny_llama()
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        ref_static = model.generate(ids, cache_implementation="static", **kw)
        assert ci.fold_decoder(model) == 2 * 5
        assert torch.equal(model.generate(ids, **kw), ref)
        assert torch.equal(model.generate(ids, cache_implementation="static", **kw), ref_static)
    model = _folded_tiny_llama()
    assert ci.fold_decoder(model, rope=False) == 2 * 4
    assert not hasattr(model.model.layers[0].self_attn, "leanq_heads")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_released_model_decodes_through_the_kernel_on_a_gpu():
    """On the GPU in bfloat16: release_stored_rk (folded, the rotary embedding and cache write included) against the
    dispatch table in a static-cache decode, eagerly and compiled: the logits within 2e-2, the write positions
    advanced once a step."""
    from test_kernels_cuda_int import _tiny_llama_4bit

    from leanq.kernels import cuda_int as ci

    model = _tiny_llama_4bit().to("cuda", torch.bfloat16)
    ids = torch.randint(0, 100, (1, 6), device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    ref, _ = _decode(model, ids, 4, False)
    assert ci.release_stored_rk(model) > 0
    assert hasattr(model.model.layers[0].self_attn, "leanq_heads")
    for compiled in (False, True):
        torch._dynamo.reset()
        got, cache = _decode(model, ids, 4, compiled)
        assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-2
        assert all(layer.cumulative_length.item() == 10 for layer in cache.layers)
    torch._dynamo.reset()


def test_folded_attention_leaves_sliding_window_caches_to_transformers():
    """Mistral's sliding-window layers get StaticSlidingWindowLayer caches (they roll when full): the folded
    attention runs transformers' forward there (the op never called) and the logits stay the unfolded model's."""
    from test_kernels_cuda_int import _folded_tiny_llama

    from leanq.kernels import cuda_int as ci
    from leanq.kernels import decode_attention as da

    model = _folded_tiny_llama("mistral")
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    ref, cache = _decode(model, ids, 3, False)
    assert all(type(layer).__name__ != "StaticLayer" for layer in cache.layers)
    assert ci.fold_decoder(model) == 2 * 5
    calls, impls = [], (da._impl, rc._impl)
    try:
        da._impl = lambda *a: calls.append("attention")
        rc._impl = lambda *a: calls.append("rope")
        got, _ = _decode(model, ids, 3, False)
    finally:
        da._impl, rc._impl = impls
    assert not calls and torch.allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_folded_eager_attention_keeps_transformers_attention_function():
    """With eager attention (chosen for its weights) the fold rotates and writes the cache in one kernel but leaves the
    attention to transformers' function: rope_cache is called, decode_attention never."""
    from test_kernels_cuda_int import _folded_tiny_llama

    from leanq.kernels import cuda_int as ci
    from leanq.kernels import decode_attention as da

    model = _folded_tiny_llama()
    model.config._attn_implementation = "eager"
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    ref, _ = _decode(model, ids, 3, False)
    assert ci.fold_decoder(model) == 2 * 5
    calls, impls = [], (da._impl, rc._impl)
    try:
        da._impl = lambda *a: (calls.append("attention"), impls[0](*a))[1]
        rc._impl = lambda *a: (calls.append("rope"), impls[1](*a))[1]
        got, _ = _decode(model, ids, 3, False)
    finally:
        da._impl, rc._impl = impls
    assert calls == ["rope"] * 6 and torch.allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cache_positions_advanced_once_by_the_last_folded_attention(monkeypatch, compiled):
    """cuda_int.ADVANCE_ONCE: the folded layers leave their write positions to the model's last folded attention,
    which advances them all in one op; the logits, caches and positions stay the unfolded model's, eagerly and
    compiled, and nothing is left pending after a step."""
    torch._dynamo.reset()
    from test_kernels_cuda_int import _folded_tiny_llama

    from leanq.kernels import cuda_int as ci

    model = _folded_tiny_llama()
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    ref, c0 = _decode(model, ids, 4, False)
    assert ci.fold_decoder(model) == 2 * 5
    attns = [layer.self_attn for layer in model.model.layers]
    assert [a.leanq_order for a in attns] == ["first", "last"] and attns[0].leanq_pending is attns[1].leanq_pending
    monkeypatch.setattr(ci, "ADVANCE_ONCE", True)
    foreach = []
    real = torch._foreach_add_
    monkeypatch.setattr(torch, "_foreach_add_", lambda ts, v: (foreach.append(len(ts)), real(ts, v))[1])
    try:
        got, c1 = _decode(model, ids, 4, compiled)
    finally:
        torch._dynamo.reset()
    if not compiled:
        assert foreach == [2] * 4
    assert not attns[0].leanq_pending
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(c0.layers, c1.layers):
        assert a.cumulative_length.item() == b.cumulative_length.item() == 10
        assert torch.allclose(a.keys, b.keys, rtol=1e-5, atol=1e-5)
