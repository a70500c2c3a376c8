"""leanq.hf_graph: transformers' generate with each decode step replayed from one CUDA graph.

On the CPU: the keys that decide when a graph is recorded again, the compiled call's arguments, enable/disable and
the refusal of a model that cannot generate. On a GPU: the graph's logits against the same forward run eagerly
(bit for bit when the graph holds eager kernels), one graph for a whole generate, a new one for a new cache, and a
quantized checkpoint through the compiled forward."""

import copy

import pytest
import torch

from leanq import hf_graph
from leanq.checkpoint import load, save
from leanq.errors import LeanqError

from conftest import tiny_model, tiny_tokenizer
from test_checkpoint import quantized

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _generate(m, ids, new: int, **kw):
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, cache_implementation="static",
                         pad_token_id=0, eos_token_id=None, return_dict_in_generate=True, output_logits=True, **kw)
    return out.sequences, torch.stack(out.logits, 1).float()


def _every_device(m):
    """A CompileConfig that lets generate ask for the compiled call off a GPU too (transformers' own switch)."""
    from transformers import CompileConfig

    cc = CompileConfig()
    cc._compile_all_devices = True
    return cc


def test_keys_hold_for_a_generate_and_change_with_its_cache():
    """Every decode step of one generate has the same key (fixed shapes, the same cache tensors); a generate of
    another length gets a cache, and a key, of its own; the tokens are those of plain generate."""
    m = tiny_model()
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(0))
    ref, _ = _generate(m, ids, 6)
    hf_graph.enable(m, compile=False)
    keys = []
    real = hf_graph.GraphedCall.__call__

    def spy(self, *a, **kw):
        keys.append(hf_graph.call_key(kw))
        return real(self, *a, **kw)

    try:
        hf_graph.GraphedCall.__call__ = spy
        got, _ = _generate(m, ids, 6, compile_config=_every_device(m))
        n = len(keys)
        _generate(m, ids, 11, compile_config=_every_device(m))
    finally:
        hf_graph.GraphedCall.__call__ = real
    assert torch.equal(got, ref)
    assert n == 5 and len(keys) == 15  # the decode steps (the first token comes from prefill)
    assert None not in keys and len(set(keys[:n])) == 1 and len(set(keys[n:])) == 1 and keys[0] != keys[-1]
    call = hf_graph.graphed_call(m)
    assert call is not None and call.captures == 0 and call.replays == 0  # CPU tensors: no graph


def test_call_key_refuses_what_a_graph_cannot_hold():
    assert hf_graph.call_key({"x": torch.zeros(2), "flag": True}) == (("flag", "v", True),
                                                                       ("x", "t", (2,), torch.float32, "cpu"))
    assert hf_graph.call_key({"x": torch.zeros(2), "cache": object()}) is None
    assert hf_graph.call_key({"x": torch.zeros(2), "opts": [1, 2]}) is None


def _static_cache(fill: float, layers: int = 3, length: int = 8):
    from transformers import LlamaConfig, StaticCache

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=50)
    c = StaticCache(config=cfg, max_cache_len=length)
    for i in range(layers):
        c.update(torch.full((1, 2, 1, 16), fill), torch.full((1, 2, 1, 16), -fill), i)
    return c


def test_a_new_cache_of_the_same_layout_is_adopted():
    """The check that picks replay: the same call matches, a new cache of the same layout is adopted (its contents
    move into the graph's tensors and the old cache keeps its own contents), any other change records anew."""
    old, new = _static_cache(1.0), _static_cache(2.0)
    kw = dict(input_ids=torch.zeros(1, 1, dtype=torch.long), past_key_values=old, use_cache=True)
    out = {"logits": torch.zeros(1), "past_key_values": old}
    ids = kw["input_ids"]
    rec = hf_graph._Recorded(graph=None, names=frozenset(kw), tensors={"input_ids": (ids.shape, ids.dtype, ids.device)},
                             plain={"use_cache": True}, cache_name="past_key_values", cache=old,
                             bindings=hf_graph._bindings(old), inputs={}, out=out)
    match = hf_graph.GraphedCall._match
    assert match(rec, kw) == "same"
    assert match(rec, dict(kw, use_cache=False)) is None and match(rec, dict(kw, input_ids=torch.zeros(1, 2))) is None
    assert match(rec, dict(kw, past_key_values=_static_cache(1.0, length=9))) is None
    assert match(rec, dict(kw, extra=1)) is None
    graph_tensors = [t for _, _, t in rec.bindings]
    assert match(rec, dict(kw, past_key_values=new)) == "adopt"
    call = hf_graph.GraphedCall(None)
    call._adopt(rec, new)
    assert all(t is g for (_, _, t), g in zip(hf_graph._bindings(new), graph_tensors))
    assert rec.cache is new and out["past_key_values"] is new
    assert all(float(layer.keys.abs().max()) == 2.0 and int(layer.cumulative_length) == 1 for layer in new.layers)
    assert all(float(layer.keys.abs().max()) == 1.0 for layer in old.layers)
    assert not any(t is g for (_, _, t), g in zip(hf_graph._bindings(old), graph_tensors))
    assert match(rec, dict(kw, past_key_values=new)) == "same" and call.adoptions == 1


def test_compile_kwargs_drop_graph_trees():
    from transformers import CompileConfig

    kw = hf_graph._compile_kwargs(CompileConfig(options={"triton.cudagraphs": True, "max_autotune": False}))
    assert "mode" not in kw and kw["options"] == {"max_autotune": False} and kw["dynamic"] is False
    assert hf_graph._compile_kwargs(None) == {"dynamic": False}
    import torch._inductor.config as inductor_config

    before = inductor_config.triton.enable_pdl
    with hf_graph._inductor_pdl(True):
        assert inductor_config.triton.enable_pdl
    with hf_graph._inductor_pdl(False):
        assert inductor_config.triton.enable_pdl == before
    assert inductor_config.triton.enable_pdl == before


def test_enable_disable_and_refusal():
    m = tiny_model()
    cls_call = type(m).get_compiled_call
    assert hf_graph.enable(m) is m and "get_compiled_call" in vars(m)
    twin = copy.deepcopy(m)  # a copy's calls are its own, not the original's
    assert twin.get_compiled_call.__self__ is twin and twin.generate.__self__ is twin
    assert isinstance(m.get_compiled_call(None), hf_graph.GraphedCall) and hf_graph.graphed_call(m) is not None
    assert hf_graph.graphed_call(twin) is None
    hf_graph.disable(m)
    assert "get_compiled_call" not in vars(m) and m.get_compiled_call.__func__ is cls_call
    with pytest.raises(LeanqError, match="not a transformers generation model"):
        hf_graph.enable(torch.nn.Linear(2, 2))


@cuda
def test_graph_replays_the_eager_step_bit_for_bit():
    """compile=False: the graph holds the forward's eager kernels, so every step's logits equal generate's eager
    run exactly; one graph serves the whole generate, and the next generate (same cache reset, or a new one)."""
    m = tiny_model().to("cuda", torch.float16)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(1)).cuda()
    ref_tok, ref = _generate(m, ids, 12, disable_compile=True)
    hf_graph.enable(m, compile=False)
    for _ in range(2):
        tok, got = _generate(m, ids, 12)
        assert torch.equal(tok, ref_tok) and torch.equal(got, ref)
    call = hf_graph.graphed_call(m)
    assert (call.captures, call.adoptions, call.replays) == (1, 1, 21)  # the second generate's cache adopted
    tok, got = _generate(m, ids, 20)  # another cache length: recorded again
    assert call.captures == 2
    ref_tok, ref = _generate(hf_graph.disable(m), ids, 20, disable_compile=True)
    assert torch.equal(got, ref)


@cuda
@pytest.mark.parametrize("pdl,prefill", [(False, False), (True, False), (False, True)],
                         ids=["plain", "inductor-pdl", "compiled-prefill"])
def test_quantized_checkpoint_through_the_compiled_graph(tmp_path, pdl, prefill):
    """A 4-bit checkpoint on the GPU (leanq's kernels inside torch.compile's graph, with and without inductor's
    programmatic dependent launch, and with the prompt through the dynamic-shape compile): the graph's logits
    follow the eager forward's to compiled-kernel rounding, the tokens agree, and a second generate repeats the
    first."""
    import torch._inductor.config as inductor_config

    m, recipe = quantized()
    ck = save(m, tiny_tokenizer(), recipe, tmp_path / "ck")
    gpu, _, _ = load(ck, device="cuda")
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(2)).cuda()
    ref_tok, ref = _generate(gpu, ids, 16, disable_compile=True)
    torch._dynamo.reset()
    hf_graph.enable(gpu, pdl=pdl, prefill=prefill)
    tok, got = _generate(gpu, ids, 16)
    tok2, got2 = _generate(gpu, ids, 16)
    assert float((got - ref).norm() / ref.norm()) < 1e-2
    assert torch.equal(tok, ref_tok)
    assert torch.equal(tok2, tok) and torch.equal(got2, got)
    assert hf_graph.graphed_call(gpu).replays > 0
    assert hf_graph.graphed_call(gpu).prefills == (2 if prefill else 0)
    assert not inductor_config.triton.enable_pdl  # as it was


def test_calls_a_graph_cannot_hold_run_the_compiled_forward():
    """Positional arguments, CPU tensors, no tensors, objects that are not a static cache, two caches: each call goes
    to the wrapped forward as it is, and nothing is recorded."""
    seen = []

    def fn(*a, **kw):
        seen.append((a, sorted(kw)))
        return "out"

    call = hf_graph.GraphedCall(fn)
    x = torch.zeros(1, 1, dtype=torch.long)
    c1, c2 = _static_cache(1.0), _static_cache(2.0)
    for a, kw in [((x,), {}), ((), {"input_ids": x}), ((), {"use_cache": True}), ((), {"input_ids": x, "o": object()}),
                  ((), {"input_ids": x, "a": c1, "b": c2})]:
        assert call(*a, **kw) == "out"
    assert len(seen) == 5 and call.rec is None and call.captures == call.replays == 0


def test_gives_up_after_graphs_that_are_never_replayed(monkeypatch):
    """A plain argument that changes every call would record a graph per call: after MAX_IDLE_RECORDS such graphs in
    a row the call runs without graphs, with a warning; graphs that are replayed reset the count."""
    monkeypatch.setattr(hf_graph, "_on_gpu", lambda tensors: True)  # the recording itself is faked below

    def fake_record(self, kw, tensors, cname):
        self.rec = hf_graph._Recorded(graph=None, names=frozenset(kw), plain={"step": kw["step"]}, cache_name=None,
                                      tensors={"x": (kw["x"].shape, kw["x"].dtype, kw["x"].device)}, cache=None,
                                      bindings=[], inputs={}, out=None)
        self.captures += 1
        return self.fn(**kw)

    monkeypatch.setattr(hf_graph.GraphedCall, "_record", fake_record)
    call = hf_graph.GraphedCall(lambda **kw: kw["step"])
    x = torch.zeros(2)
    assert [call(x=x, step=i) for i in range(3)] == [0, 1, 2] and call.captures == 3 and not call.given_up
    call.rec.graph = type("G", (), {"replay": lambda self: None})()
    assert call(x=x, step=2) is None and call.rec.replays == 1  # a replay (of the fake graph: no output)
    assert [call(x=x, step=i) for i in range(3, 6)] == [3, 4, 5] and not call.given_up  # the count restarted
    with pytest.warns(UserWarning, match="never replayed"):
        assert call(x=x, step=6) == 6
    assert call.given_up and call.rec is None and call.captures == 6
    assert call(x=x, step=7) == 7 and call.captures == 6


def test_deferred_stop_check_is_allowed_on_cuda_only_inside_an_enabled_generate():
    """transformers' DeferredStopCheck (the stop decision read one step late) is allowed on CUDA while a generate of a
    model given to enable(defer_stop=True) runs, for a cache that is not returned; everywhere else transformers' own
    rule holds (Apple's GPUs only)."""
    from transformers import LogitsProcessor
    from transformers.generation.utils import DeferredStopCheck

    class Seen(LogitsProcessor):
        def __init__(self):
            self.defer = []

        def __call__(self, input_ids, scores):
            self.defer.append(hf_graph._DEFER.get())
            return scores

    cuda_dev = torch.device("cuda")
    m = tiny_model()
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(3))
    seen = Seen()
    plain = m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, logits_processor=[seen])
    assert seen.defer == [False] * 4 and not DeferredStopCheck.is_supported(cuda_dev, None, False, False)
    hf_graph.enable(m, compile=False)
    assert "generate" in vars(m)
    seen = Seen()
    out = m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, logits_processor=[seen])
    assert seen.defer == [True] * 4 and torch.equal(out, plain)  # on the CPU the check itself stays per step
    assert not hf_graph._DEFER.get() and not DeferredStopCheck.is_supported(cuda_dev, None, False, False)
    token = hf_graph._DEFER.set(True)
    try:
        assert DeferredStopCheck.is_supported(cuda_dev, None, False, False)
        assert DeferredStopCheck.is_supported(cuda_dev, _static_cache(1.0), False, False)
        assert not DeferredStopCheck.is_supported(cuda_dev, _static_cache(1.0), True, False)  # a returned cache
        assert not DeferredStopCheck.is_supported(cuda_dev, None, False, True)  # an assistant model
        assert not DeferredStopCheck.is_supported(torch.device("cpu"), None, False, False)
    finally:
        hf_graph._DEFER.reset(token)
    hf_graph.disable(m)
    assert "generate" not in vars(m)
    hf_graph.enable(m, defer_stop=False)
    assert "generate" not in vars(m)
    hf_graph.disable(m)


@cuda
@pytest.mark.parametrize("eos_at", [None, 5], ids=["max-length", "eos"])
def test_deferred_stop_check_leaves_the_tokens_as_they_were(eos_at):
    """The graphed generate with the deferred stop check gives the tokens of the eager generate, stopping at the
    length asked or at an end token (where the extra step it ran is undone), and it did defer."""
    from transformers.generation import utils as gen_utils

    m = tiny_model().to("cuda", torch.float16)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(4)).cuda()
    kw = dict(max_new_tokens=12, do_sample=False, cache_implementation="static", pad_token_id=0)
    with torch.no_grad():
        ref = m.generate(ids, eos_token_id=None, disable_compile=True, **kw)
        eos = None if eos_at is None else int(ref[0, 6 + eos_at])
        if eos is not None:
            ref = m.generate(ids, eos_token_id=eos, disable_compile=True, **kw)
            assert ref.shape[1] < 6 + 12  # it stopped at the end token
        used = []
        real = gen_utils.DeferredStopCheck.__init__

        def spy(self, *a, **k):
            used.append(True)
            real(self, *a, **k)

        gen_utils.DeferredStopCheck.__init__ = spy
        try:
            hf_graph.enable(m, compile=False)
            got = [m.generate(ids, eos_token_id=eos, **kw) for _ in range(2)]
        finally:
            gen_utils.DeferredStopCheck.__init__ = real
            hf_graph.disable(m)
    assert used == [True, True]
    assert all(torch.equal(g, ref) for g in got)


def test_calls_of_more_than_one_token_go_to_the_prefill_compile(monkeypatch):
    """A prompt's forward (more tokens than one) runs the prefill function and records nothing, so alternating prompt
    and decode calls keep the one decode graph instead of recording one graph per call."""
    monkeypatch.setattr(hf_graph, "_on_gpu", lambda tensors: True)  # the recording itself is faked below

    def fake_record(self, kw, tensors, cname):
        x = kw["input_ids"]
        self.rec = hf_graph._Recorded(graph=type("G", (), {"replay": lambda self: None})(), names=frozenset(kw),
                                      plain={}, cache_name=None, tensors={"input_ids": (x.shape, x.dtype, x.device)},
                                      cache=None, bindings=[], inputs={"input_ids": x.clone()}, out="graph")
        self.captures += 1
        return "recorded"

    monkeypatch.setattr(hf_graph.GraphedCall, "_record", fake_record)
    call = hf_graph.GraphedCall(lambda **kw: "decode", prefill_fn=lambda **kw: f"prefill {kw['input_ids'].shape[-1]}")
    one = torch.zeros(1, 1, dtype=torch.long)
    got = []
    for t in (5, 7, 5):
        got.append(call(input_ids=torch.zeros(1, t, dtype=torch.long)))
        got += [call(input_ids=one) for _ in range(3)]
    assert got == ["prefill 5", "recorded", "graph", "graph", "prefill 7", "graph", "graph", "graph",
                   "prefill 5", "graph", "graph", "graph"]
    assert (call.prefills, call.captures, call.replays) == (3, 1, 8) and not call.given_up
    emb = hf_graph.GraphedCall(lambda **kw: "decode", prefill_fn=lambda **kw: "prefill")
    assert emb(inputs_embeds=torch.zeros(1, 4, 8)) == "prefill" and hf_graph._tokens({"inputs_embeds": torch.zeros(1, 1, 8)}) == 1
    assert hf_graph._tokens({"use_cache": True}) == 0


def test_prefill_option_sends_the_prompt_to_the_compiled_call():
    """enable(prefill=True): a generate with a static cache (and no chunk size of its own) runs transformers'
    chunked prefill in one chunk, which asks for the compiled call: the prompt goes to the prefill function once per
    generate, and the tokens are those of a plain generate. Without a static cache nothing changes."""
    m = tiny_model()
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = m.generate(ids, cache_implementation="static", **kw)
        hf_graph.enable(m, compile=False, prefill=True)
        got = [m.generate(ids, cache_implementation="static", compile_config=_every_device(m), **kw) for _ in range(2)]
        call = hf_graph.graphed_call(m)
        assert call is not None and call.prefills == 2
        assert all(torch.equal(g, ref) for g in got)
        assert torch.equal(m.generate(ids, **kw), ref)  # a dynamic cache: no chunked prefill asked
        assert call.prefills == 2
        hf_graph.disable(m)
        hf_graph.enable(m, compile=False)  # prefill off: the prompt runs as transformers runs it
        m.generate(ids, cache_implementation="static", compile_config=_every_device(m), **kw)
        assert hf_graph.graphed_call(m).prefills == 0
    hf_graph.disable(m)


def test_prompts_of_two_lengths_through_one_dynamic_compile():
    """compile=True, prefill=True on the CPU (transformers' own switch lets generate ask for the compiled call off
    a GPU): prompts of two lengths run through the prefill compile with dynamic shapes and give the eager tokens."""
    m = tiny_model()
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None,
              cache_implementation="static")
    prompts = [torch.randint(0, 96, (1, t), generator=torch.Generator().manual_seed(t)) for t in (7, 10)]
    torch._dynamo.reset()
    with torch.no_grad():
        refs = [m.generate(p, **kw) for p in prompts]
        hf_graph.enable(m, prefill=True)
        try:
            got = [m.generate(p, compile_config=_every_device(m), **kw) for p in prompts]
            assert hf_graph.graphed_call(m).prefills == 2
        finally:
            hf_graph.disable(m)
            torch._dynamo.reset()
    assert all(torch.equal(g, r) for g, r in zip(got, refs))
