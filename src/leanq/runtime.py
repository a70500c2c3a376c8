"""A lean decoder for Llama-family models (leanq checkpoints, float Hugging Face folders, llama GGUF files), without
transformers.

``transformers`` is how leanq builds, calibrates and evaluates models, and ``leanq generate`` runs through its
``generate`` by default.  This module is the small alternative for running a result: greedy decoding with a static
KV cache, written over the same quantized layers (:class:`leanq.modules.QuantLinear`, whose kernels the dispatch
table picks) and plain float tensors.  Nothing of transformers is imported, which matters on a small CPU: importing
its Llama modelling code costs about 115 MB of resident memory (measured, docs/PERFORMANCE.md), more than a 4-bit
135M-parameter model holds.

What it runs: ``model_type`` "llama" (Llama 1-3 shapes without RoPE scaling, SmolLM, TinyLlama and alike, biases
as config.json says), "mistral" (within its sliding window) and "qwen2" (q/k/v biases, full attention): RMSNorm,
rotary position embeddings (the half-split convention of Hugging Face weights), grouped-query attention, SwiGLU.
Anything else in config.json is refused with one line that names the field.

On a GPU, ``generate(..., graph=True)`` runs the decode steps as :meth:`LeanLlama.step`, one fixed-shape step (the
next token and position in device tensors, one cache tensor per layer, attention over the whole cache masked)
compiled by torch.compile and captured as a CUDA graph, replayed once per token with no host synchronisation in
between: the host's per-step work, which bounds transformers' ``generate`` on a fast GPU, leaves the critical path.
:func:`from_transformers` puts the decoder over a transformers model's own modules (a model built or quantized in
memory).

Float tensors stay in the dtype they are stored in; float linears run in that dtype (a 16-bit tied embedding is
the LM head's weight without a float32 copy: half the bytes, and on this project's 2-core CPU a 4x faster head
product).  The residual stream, norms and attention are float32 on the CPU (``act_dtype``).

GGUF files (llama architecture, byte-level BPE tokenizer) are read with the ``gguf`` package: every tensor dequantized
to float32 and q/k rows put back from llama.cpp's rotary order, the tokenizer built from the file's vocabulary and
merges as transformers builds it, so both runtimes give the same ids.

The oracle is transformers' own model: tests/test_runtime.py compares logits and greedy tokens on tiny random
models (float, quantized, GGUF), and SmolLM2's GGUF tokenizer and tokens against transformers'.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LeanqError
from .modules import QuantLinear

MAX_CONFIG_BYTES = 1 << 20
FAMILIES = ("llama", "mistral", "qwen2")
_PROJ = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


@dataclass(frozen=True)
class LlamaShape:
    """The fields of config.json the decoder needs, checked."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    eps: float
    rope_theta: float
    max_positions: int
    tied: bool
    eos: tuple[int, ...] = ()
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    window: int | None = None  # mistral's sliding window: exact only while every position sees the whole past

    @classmethod
    def from_config(cls, d: dict, where: str = "config.json") -> "LlamaShape":
        if not isinstance(d, dict):
            raise LeanqError(f"{where}: expected a JSON object")
        mt = d.get("model_type")
        if mt not in FAMILIES:
            raise LeanqError(f"{where}: model_type {mt!r}: the lean runtime runs {', '.join(FAMILIES)} models "
                             f"(use the default runtime)"[:300])

        def pos_int(k: str, default=None, hi: int = 1 << 24) -> int:
            v = d.get(k, default)
            if type(v) is not int or not 0 < v <= hi:
                raise LeanqError(f"{where}: {k} must be an integer in 1..{hi}, got {v!r}"[:200])
            return v

        hidden, heads = pos_int("hidden_size"), pos_int("num_attention_heads", hi=4096)
        kv = pos_int("num_key_value_heads", heads, hi=4096)
        hd = d.get("head_dim")
        hd = pos_int("head_dim", hi=4096) if hd is not None else hidden // heads
        if d.get("head_dim") is None and hidden % heads:
            raise LeanqError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        if heads % kv or hd % 2:
            raise LeanqError(f"{where}: num_attention_heads {heads} must be a multiple of num_key_value_heads {kv}, "
                             f"and head_dim {hd} even")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise LeanqError(f"{where}: hidden_act {act!r}: the lean runtime supports 'silu' only")
        flags = {}
        for k in ("attention_bias", "mlp_bias", "use_sliding_window"):
            v = d.get(k)
            if v is not None and not isinstance(v, bool):
                raise LeanqError(f"{where}: {k} must be true or false, got {v!r}"[:200])
            flags[k] = bool(v)
        layer_types = d.get("layer_types") or []
        if mt == "qwen2" and (flags["use_sliding_window"] or any(t != "full_attention" for t in layer_types)):
            raise LeanqError(f"{where}: sliding-window layers: the lean runtime runs qwen2 with full attention only")
        window = d.get("sliding_window") if mt == "mistral" else None
        if window is not None and (type(window) is not int or window <= 0):
            raise LeanqError(f"{where}: sliding_window must be a positive integer or null, got {window!r}"[:200])
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise LeanqError(f"{where}: rope_parameters must be an object")
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype != "default":
            raise LeanqError(f"{where}: RoPE type {rtype!r}: the lean runtime supports the default RoPE only")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        eps = d.get("rms_norm_eps", 1e-6)
        for k, v in (("rope_theta", theta), ("rms_norm_eps", eps)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e12 or not math.isfinite(v):
                raise LeanqError(f"{where}: {k} must be a positive number, got {v!r}"[:200])
        tied = d.get("tie_word_embeddings", False)
        if not isinstance(tied, bool):
            raise LeanqError(f"{where}: tie_word_embeddings must be true or false")
        eos = d.get("eos_token_id")
        eos = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos if isinstance(eos, list) else []
        return cls(vocab=pos_int("vocab_size"), hidden=hidden, layers=pos_int("num_hidden_layers", hi=4096),
                   heads=heads, kv_heads=kv, head_dim=hd, inter=pos_int("intermediate_size"), eps=float(eps),
                   rope_theta=float(theta), max_positions=pos_int("max_position_embeddings", 2048),
                   tied=tied, eos=tuple(e for e in eos if type(e) is int and e >= 0),
                   qkv_bias=flags["attention_bias"] or mt == "qwen2", o_bias=flags["attention_bias"] and mt != "qwen2",
                   mlp_bias=flags["mlp_bias"] and mt == "llama", window=window)


def read_config(folder: Path) -> LlamaShape:
    f = folder / "config.json"
    if not f.is_file():
        raise LeanqError(f"{f}: missing")
    if f.stat().st_size > MAX_CONFIG_BYTES:
        raise LeanqError(f"{f}: too large to be a model config")
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LeanqError(f"{f}: not a JSON config ({str(e).splitlines()[0]})") from None
    return LlamaShape.from_config(d, str(f))


class FloatLinear(nn.Module):
    """y = x W^T (+ b) in the weight's own dtype (activations cast there and back)."""

    def __init__(self, n_in: int, n_out: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(n_out), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        b = self.bias.to(w.dtype) if self.bias is not None else None
        return F.linear(x.to(w.dtype), w, b).to(x.dtype)


def _linear(name: str, n_in: int, n_out: int, recipe, bias: bool = False) -> nn.Module:
    mr = recipe.modules.get(name) if recipe is not None else None
    if mr is None:
        return FloatLinear(n_in, n_out, bias)
    if (mr.in_features, mr.out_features, mr.bias) != (n_in, n_out, bias):
        raise LeanqError(f"leanq.json: module {name!r} is {mr.out_features}x{mr.in_features}"
                         f"{' with a bias' if mr.bias else ''}; config.json gives {n_out}x{n_in}"
                         f"{' with a bias' if bias else ''}")
    return QuantLinear(n_in, n_out, mr.spec, bias)


class Block(nn.Module):
    def __init__(self, s: LlamaShape, prefix: str, recipe):
        super().__init__()
        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        dims = {"q_proj": (s.hidden, q), "k_proj": (s.hidden, kv), "v_proj": (s.hidden, kv), "o_proj": (q, s.hidden),
                "gate_proj": (s.hidden, s.inter), "up_proj": (s.hidden, s.inter), "down_proj": (s.inter, s.hidden)}
        self.input_layernorm = _Weight(s.hidden)
        self.post_attention_layernorm = _Weight(s.hidden)
        self.self_attn = nn.Module()
        self.mlp = nn.Module()
        bias = {"q_proj": s.qkv_bias, "k_proj": s.qkv_bias, "v_proj": s.qkv_bias, "o_proj": s.o_bias,
                "gate_proj": s.mlp_bias, "up_proj": s.mlp_bias, "down_proj": s.mlp_bias}
        for part, names in _PROJ.items():
            for n in names:
                setattr(getattr(self, part), n, _linear(f"{prefix}.{part}.{n}", *dims[n], recipe, bias[n]))


class _Weight(nn.Module):
    """A module that only holds ``weight`` (norms, the embedding), for Hugging Face's parameter names."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape), requires_grad=False)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (w.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per head over a whole cache with a mask, as plain products and an fp32 softmax: q [heads, 1, d],
    k and v [kv heads, L, d], mask [L] (True: attend) -> [heads, d]. Written out rather than through
    scaled_dot_product_attention, whose kernel for a masked query on a GPU (memory-efficient attention) measured
    run-to-run differences in the last bits at some cache lengths (H200, torch 2.11): greedy tokens then differed
    between repeated generates. These products and the softmax give the same bits every run."""
    kvh, d = k.shape[0], q.shape[-1]
    qg = q.reshape(kvh, -1, d)  # the query heads that share each key head
    s = torch.matmul(qg, k.transpose(1, 2)).float() * (d ** -0.5)  # [kv heads, group, L]
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).to(v.dtype)
    return torch.matmul(p, v).reshape(q.shape[0], d)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), -1)
    return x * cos + rot * sin


class LeanLlama(nn.Module):
    """Parameter names as in Hugging Face's LlamaForCausalLM (``model.layers.3.mlp.up_proj.qweight``), so the
    checkpoint's tensors load by name."""

    def __init__(self, s: LlamaShape, recipe=None):
        super().__init__()
        self.shape = s
        self.model = nn.Module()
        self.model.embed_tokens = _Weight(s.vocab, s.hidden)
        self.model.layers = nn.ModuleList(Block(s, f"model.layers.{i}", recipe) for i in range(s.layers))
        self.model.norm = _Weight(s.hidden)
        if not s.tied:
            self.lm_head = _linear("lm_head", s.hidden, s.vocab, recipe)
        elif recipe is not None and "lm_head" in recipe.modules:
            raise LeanqError("leanq.json: lm_head is quantized but config.json ties it to the embedding")
        self.act_dtype = torch.float32
        # the static cache: keys and values, one [kv heads, positions, head dim] tensor per layer each (separate
        # tensors, not views of one: a compiled step then updates each in place rather than copying a shared base)
        self._kv: tuple[list, list] | None = None
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._graphs: dict = {}  # (cache length, new tokens) -> a captured decode step and its buffers (CUDA)
        self._step_fn = None  # the compiled fixed-shape step (CUDA)

    # -- decoding -------------------------------------------------------------------------------------------
    def head(self, h: torch.Tensor) -> torch.Tensor:
        if self.shape.tied:
            w = self.model.embed_tokens.weight
            return F.linear(h.to(w.dtype), w).float()
        return self.lm_head(h).float()

    def _tables(self, n: int, device) -> None:
        s = self.shape
        r = self._rope
        if r is not None and r[0].shape[0] >= n and r[0].device == device and r[0].dtype == self.act_dtype:
            return
        inv = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=torch.int64, device=device).float()
                                      / s.head_dim))
        f = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv[None]
        e = torch.cat((f, f), -1)
        self._rope = (e.cos().to(self.act_dtype), e.sin().to(self.act_dtype))

    def reset(self, max_len: int) -> None:
        """A static cache for ``max_len`` positions (prompt + new tokens)."""
        s = self.shape
        if not 0 < max_len <= s.max_positions:
            raise LeanqError(f"{max_len} positions: this model takes 1..{s.max_positions}")
        if s.window is not None and max_len > s.window:
            raise LeanqError(f"{max_len} positions: past the model's sliding window ({s.window}), which the lean "
                             f"runtime does not apply; use the default runtime")
        dev = self.model.norm.weight.device
        shape = (s.kv_heads, max_len, s.head_dim)
        kv = self._kv
        t0 = kv[0][0] if kv is not None else None
        if t0 is not None and tuple(t0.shape) == shape and t0.device == dev and t0.dtype == self.act_dtype:
            for t in kv[0] + kv[1]:  # the same storage: a captured decode step keeps pointing at it
                t.zero_()
        else:
            self._kv = tuple([torch.zeros(shape, device=dev, dtype=self.act_dtype) for _ in range(s.layers)]
                             for _ in range(2))
            self._graphs.clear()
        self._tables(max_len, dev)

    def forward(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """ids [T] at positions pos..pos+T-1 (the cache holds 0..pos-1) -> logits [vocab] of the last one."""
        s = self.shape
        assert self._kv is not None and self._rope is not None, "call reset() first"
        kc, vc = self._kv
        t = ids.shape[0]
        end = pos + t
        if end > kc[0].shape[1]:
            raise LeanqError(f"position {end} is past the cache ({kc[0].shape[1]}); reset() with a larger max_len")
        emb = self.model.embed_tokens.weight
        x = emb[ids].to(self.act_dtype)  # [T, hidden]
        cos, sin = self._rope[0][pos:end], self._rope[1][pos:end]
        causal = t > 1
        mask = None
        if causal and pos:
            mask = torch.ones(t, end, dtype=torch.bool, device=x.device).tril(pos)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kc[i][:, pos:end] = k
            vc[i][:, pos:end] = v
            o = F.scaled_dot_product_attention(q.unsqueeze(0), kc[i][:, :end].unsqueeze(0), vc[i][:, :end].unsqueeze(0),
                                               attn_mask=mask, is_causal=causal and not pos,
                                               enable_gqa=s.heads != s.kv_heads)
            return o[0].transpose(0, 1)

        x = self._layers(x, cos, sin, attend)
        return self.head(_rms(x[-1:], self.model.norm.weight, s.eps))[0]

    def _layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
        """The decoder layers over x [T, hidden] at the rotary angles cos, sin [T, head dim]; ``attend(i, q, k, v)``
        (q [heads, T, d], k and v [kv heads, T, d], rotated) stores layer i's keys and values in the cache and
        returns the attention's output, [T, heads, d] in that order ([heads, d] for one token)."""
        s = self.shape
        t = x.shape[0]
        for i, b in enumerate(self.model.layers):
            a = b.self_attn
            h = _rms(x, b.input_layernorm.weight, s.eps)
            q = a.q_proj(h).view(t, s.heads, s.head_dim).transpose(0, 1)
            k = a.k_proj(h).view(t, s.kv_heads, s.head_dim).transpose(0, 1)
            v = a.v_proj(h).view(t, s.kv_heads, s.head_dim).transpose(0, 1)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            x = x + a.o_proj(attend(i, q, k, v).reshape(t, s.heads * s.head_dim))
            h = _rms(x, b.post_attention_layernorm.weight, s.eps)
            m = b.mlp
            x = x + m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))
        return x

    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decode step in fixed shapes (what a CUDA graph can hold): token ``tok`` [1] at position ``pos`` [1],
        both device tensors; its keys and values go into the cache at ``pos`` and it attends over the whole cache
        with the positions after ``pos`` masked. Returns the greedy next token [1]. The arithmetic of
        :meth:`forward` for one token."""
        s = self.shape
        assert self._kv is not None and self._rope is not None, "call reset() first"
        kc, vc = self._kv
        x = self.model.embed_tokens.weight.index_select(0, tok).to(self.act_dtype)  # [1, hidden]
        cos, sin = self._rope[0].index_select(0, pos), self._rope[1].index_select(0, pos)
        mask = torch.arange(kc[0].shape[1], device=x.device) <= pos

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kc[i].index_copy_(1, pos, k)
            vc[i].index_copy_(1, pos, v)
            return _attend_one(q, kc[i], vc[i], mask)

        x = self._layers(x, cos, sin, attend)
        return self.head(_rms(x, self.model.norm.weight, s.eps)).argmax(-1)

    @torch.inference_mode()
    def generate(self, ids: list[int], max_new_tokens: int, stop_at_eos: bool = True, graph: bool = False,
                 check_every: int = 16) -> list[int]:
        """Greedy continuation of ``ids``: the new token ids (fewer when an end-of-sequence token comes).

        ``graph``: the decode steps run :meth:`step` with the next token and position kept on the device. On a GPU
        the step is compiled (torch.compile) and captured in a CUDA graph, replayed once per token with no host
        synchronisation in between; the end-of-sequence check reads the tokens every ``check_every`` steps (the
        steps past an end-of-sequence token are computed and dropped). Elsewhere the same step runs eagerly."""
        if not ids or max_new_tokens < 0:
            raise LeanqError("generate: needs at least one prompt token and max_new_tokens >= 0")
        if min(ids) < 0 or max(ids) >= self.shape.vocab:
            raise LeanqError(f"generate: token ids must lie in 0..{self.shape.vocab - 1}")
        if check_every < 1:
            raise LeanqError("generate: check_every must be at least 1")
        if graph and max_new_tokens > 1:
            return self._generate_fixed(ids, max_new_tokens, stop_at_eos, check_every)
        self.reset(len(ids) + max_new_tokens)
        dev = self.model.norm.weight.device
        logits = self(torch.tensor(ids, device=dev), 0)
        out: list[int] = []
        pos = len(ids)
        while len(out) < max_new_tokens:
            nxt = int(logits.argmax())
            out.append(nxt)
            if stop_at_eos and nxt in self.shape.eos or len(out) == max_new_tokens:
                break
            logits = self(torch.tensor([nxt], device=dev), pos)
            pos += 1
        return out

    def _generate_fixed(self, ids: list[int], n: int, stop_at_eos: bool, check_every: int) -> list[int]:
        """:meth:`generate` with ``graph``: the prompt as usual, then n - 1 fixed-shape steps (see there)."""
        self.reset(len(ids) + n)
        dev = self.model.norm.weight.device
        first = self(torch.tensor(ids, device=dev), 0).argmax().view(1)
        key = (self._kv[0][0].shape[1], n)
        bufs = self._graphs.get(key)
        if bufs is None:
            bufs = dict(tok=torch.zeros(1, dtype=torch.long, device=dev), pos=torch.zeros(1, dtype=torch.long, device=dev),
                        out=torch.zeros(n, dtype=torch.long, device=dev), slot=torch.ones(1, dtype=torch.long, device=dev))
        tok, pos, out, slot = bufs["tok"], bufs["pos"], bufs["out"], bufs["slot"]

        def start() -> None:  # the state after the prompt: its greedy token, the next position
            tok.copy_(first)
            pos.fill_(len(ids))
            out.zero_()
            out[:1].copy_(first)
            slot.fill_(1)

        start()
        cuda = dev.type == "cuda"
        if cuda:
            for t in self._kv[0] + self._kv[1]:  # static inputs of the compiled step, updated in place
                torch._dynamo.mark_static_address(t)
            if self._step_fn is None:
                self._step_fn = torch.compile(self.step, fullgraph=True, dynamic=False)
        fn = self._step_fn if cuda else self.step

        def advance() -> None:
            nxt = fn(tok, pos)
            out.index_copy_(0, slot, nxt)
            tok.copy_(nxt)
            pos.add_(1)
            slot.add_(1)

        eos = torch.tensor(self.shape.eos, dtype=torch.long, device=dev) if stop_at_eos and self.shape.eos else None
        done = 1
        if cuda and "graph" not in bufs:
            from .hf_graph import run_and_record

            _, bufs["graph"], _ = run_and_record(advance, dev)  # one step for real (it compiles), then captured
            self._graphs[key] = bufs
            start()  # every step from the graph, as in later calls (the warm-up's cache entry is written again)
        run = bufs["graph"].replay if cuda else advance
        while done < n:
            if eos is not None and done % check_every == 0 and bool(torch.isin(out[:done], eos).any()):
                break
            run()
            done += 1
        toks = out[:done].tolist()
        if eos is not None:
            ends = [i for i, t in enumerate(toks) if t in self.shape.eos]
            toks = toks[:ends[0] + 1] if ends else toks
        return toks


def from_transformers(model: nn.Module) -> LeanLlama:
    """A LeanLlama over a transformers Llama-family model's own modules and tensors, without copies: its linears
    (float ``nn.Linear``, or leanq's QuantLinear with whatever kernel layout they hold), norms and embedding. For
    decoding a model built or quantized in memory; the activations as :func:`load` sets them for the device."""
    cfg = model.config.to_dict()
    s = LlamaShape.from_config(cfg, "model.config")
    src = model.model
    if len(src.layers) != s.layers:
        raise LeanqError(f"model.config: {s.layers} layers, the model holds {len(src.layers)}")
    if any(hasattr(m, "rk_pro") for m in src.layers.modules()):
        raise LeanqError("the model's decoder layers are folded into its GEMVs (cuda_int.release_stored_rk's "
                         "default); release it with fold=False to run it here")

    def lin(m: nn.Module) -> nn.Module:  # nn.Linear as FloatLinear (activations cast to its dtype), on its tensors
        if isinstance(m, nn.Linear):
            with torch.device("meta"):
                f = FloatLinear(m.in_features, m.out_features, m.bias is not None)
            f.weight, f.bias = m.weight, m.bias
            return f
        return m

    with torch.device("meta"):
        lm = LeanLlama(s)
    lm.model.embed_tokens.weight = src.embed_tokens.weight
    lm.model.norm.weight = src.norm.weight
    for b, layer in zip(lm.model.layers, src.layers):
        b.input_layernorm.weight = layer.input_layernorm.weight
        b.post_attention_layernorm.weight = layer.post_attention_layernorm.weight
        for part, names in _PROJ.items():
            for n in names:
                setattr(getattr(b, part), n, lin(getattr(getattr(layer, part), n)))
    if not s.tied:
        lm.lm_head = lin(model.lm_head)
    lm.act_dtype = torch.float32 if src.norm.weight.device.type == "cpu" else torch.bfloat16
    return lm.eval()


# -- loading --------------------------------------------------------------------------------------------------
def _weight_files(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    idx = folder / "model.safetensors.index.json"
    if not idx.is_file():
        raise LeanqError(f"{folder}: no model.safetensors (or model.safetensors.index.json)")
    try:
        wm = json.loads(idx.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(wm.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise LeanqError(f"{idx}: not a safetensors index (needs a 'weight_map' object)") from None
    files = []
    for n in names:
        if not isinstance(n, str) or "/" in n or "\\" in n or n.startswith("."):
            raise LeanqError(f"{idx}: shard name {n!r} is not a file name in this folder"[:200])
        if not (folder / n).is_file():
            raise LeanqError(f"{folder / n}: missing (listed in {idx.name})")
        files.append(folder / n)
    return files


def load(path: str | Path, device: str = "cpu", release: bool = True) -> tuple[LeanLlama, object]:
    """A leanq checkpoint folder, a float Hugging Face folder or a llama GGUF file -> (LeanLlama, tokenizer or None).

    Checkpoints are verified as :func:`leanq.checkpoint.load` does (size and sha256 of the weights, every tensor's
    name, dtype, shape and finiteness, the codes' ranges); a GGUF file's tensors are dequantized to float32, as
    transformers does for the default runtime.  ``release``: on the CPU, 4-bit layers keep only the packed CPU
    kernel's copy (:func:`leanq.kernels.cpu_int4.release_stored`); on a GPU, integer layers only the CUDA kernels'
    layout (:func:`leanq.kernels.cuda_int.release_stored_rk`)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        model, tok = _load_gguf(p)
    elif p.is_dir():
        model, tok = _load_folder(p)
    else:
        raise LeanqError(f"{p}: neither a folder nor a .gguf file; the lean runtime reads leanq checkpoints, float "
                         f"Hugging Face folders and llama GGUF files")
    model.eval().to(device)
    model.act_dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if release and device == "cpu":
        from .kernels import cpu_int4

        cpu_int4.release_stored(model)
    elif release and str(device).startswith("cuda"):
        from .kernels import cuda_int

        cuda_int.release_stored_rk(model)  # the CUDA GEMV alone, q/k/v and gate/up fused under torch.compile
    return model, tok


def _load_folder(p: Path) -> tuple[LeanLlama, object]:
    from safetensors import SafetensorError, safe_open

    from .checkpoint import RECIPE, _check_codes, read_recipe, verified_weights

    recipe = None
    if (p / RECIPE).is_file():
        recipe, files = read_recipe(p)
        wfiles = [verified_weights(p, files)]
        if recipe.model_type not in FAMILIES:
            raise LeanqError(f"{p}: model type {recipe.model_type!r}: the lean runtime runs {', '.join(FAMILIES)} "
                             f"models"[:300])
    else:
        wfiles = _weight_files(p)
    s = read_config(p)
    file_bytes = sum(f.stat().st_size for f in wfiles)
    with torch.device("meta"):
        model = LeanLlama(s, recipe)
    expected = dict(model.state_dict())
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    keep = getattr(torch, recipe.keep_dtype) if recipe is not None else None

    def float_kept(k: str, ref: torch.Tensor) -> bool:
        return ref.is_floating_point() and k.rsplit(".", 1)[0] not in quant

    need = sum(v.numel() * (2 if float_kept(k, v) else v.element_size()) for k, v in expected.items())
    if need > file_bytes:  # a config that describes more than the files hold: refuse before allocating
        raise LeanqError(f"{p / 'config.json'}: describes tensors of at least {need} bytes, but the weights "
                         f"hold {file_bytes}")
    state: dict[str, torch.Tensor] = {}
    try:
        for f in wfiles:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    if k not in expected:
                        # a float folder's rotary table, or the head it ties to the embedding, is not needed
                        if (recipe is None and k.endswith("rotary_emb.inv_freq")) or (s.tied and k == "lm_head.weight"):
                            continue
                        raise LeanqError(f"{f}: unexpected tensor {k!r}"[:300])
                    t = st.get_tensor(k)
                    ref = expected[k]
                    fl = float_kept(k, ref)
                    # a checkpoint's float tensors are in its keep dtype; a float folder's in any float dtype
                    want = (keep if keep is not None else "a float") if fl else ref.dtype
                    ok_dtype = t.dtype == want or (want == "a float" and t.is_floating_point())
                    if tuple(t.shape) != tuple(ref.shape) or not ok_dtype:
                        raise LeanqError(f"{f}: tensor {k} is {t.dtype} {tuple(t.shape)}, expected {want} "
                                         f"{tuple(ref.shape)}")
                    if t.is_floating_point() and t.element_size() > 1 and not torch.isfinite(t).all():
                        raise LeanqError(f"{f}: tensor {k} holds NaN or Inf")
                    if fl and (t.dtype not in (torch.float32, torch.float16, torch.bfloat16)
                               or k.endswith("norm.weight")):
                        t = t.float()
                    # a copy: safetensors' tensors may be views of the file's mapping, which would then stay
                    # resident as long as any one of them lives (the 4-bit codes after the CPU kernel repacked them)
                    state[k] = t.clone()
    except SafetensorError as e:
        raise LeanqError(f"{p}: not a valid safetensors file ({e})") from None
    missing = sorted(set(expected) - set(state))
    if missing:
        raise LeanqError(f"{p}: weights lack {missing[:3]}")
    _check_codes(model, state, quant)
    model.load_state_dict(state, strict=True, assign=True)
    tok = None
    if (p / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(p / "tokenizer.json"))
        except ImportError:
            tok = None
        except Exception as e:  # the tokenizers library raises plain Exception on a malformed file
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LeanqError(f"{p / 'tokenizer.json'}: unreadable ({why})") from None
    return model, tok


# -- GGUF -------------------------------------------------------------------------------------------------------
_GGUF_PRE = ("default", "gpt2", "smollm")  # pre-tokenizers transformers splits with GPT-2's own pattern


def _gguf_meta(r, key: str, default=None):
    f = r.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as e:  # a damaged field: gguf raises ValueError, IndexError, UnicodeDecodeError, ...
        raise LeanqError(f"GGUF metadata {key}: unreadable ({type(e).__name__})") from None


def _byte_spelling() -> dict[int, str]:
    """Byte-level BPE's alphabet: each byte as one printable character (printable Latin-1 bytes as themselves,
    the other 68 as the code points from 256 up, in byte order)."""
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _gguf_tokenizer(r, p: Path):
    """The file's byte-level BPE tokenizer ('gpt2' model), built as transformers builds it for the default runtime:
    the vocabulary in the byte alphabet, the merges, GPT-2's split pattern, control tokens kept whole."""
    model = _gguf_meta(r, "tokenizer.ggml.model")
    if model is None:
        return None
    pre = _gguf_meta(r, "tokenizer.ggml.pre", "default")
    if model != "gpt2" or pre not in _GGUF_PRE:
        raise LeanqError(f"{p}: tokenizer {model!r} (pre-tokenizer {pre!r}): the lean runtime builds byte-level BPE "
                         f"tokenizers with pre-tokenizer {', '.join(_GGUF_PRE)}; use the default runtime"[:300])
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = _gguf_meta(r, "tokenizer.ggml.tokens") or []
    merges = _gguf_meta(r, "tokenizer.ggml.merges") or []
    types = _gguf_meta(r, "tokenizer.ggml.token_type") or []
    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")), i)
    try:
        tk = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges]))
    except Exception as e:  # the tokenizers library raises plain Exception on bad merges
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LeanqError(f"{p}: tokenizer merges unusable ({why})") from None
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True)
                           for t, ty in zip(tokens, types) if ty == 3 and set(t) <= alphabet])  # 3: control
    tk.add_tokens([AddedToken(t, normalized=False) for t, ty in zip(tokens, types) if ty == 4 and t in vocab])
    if _gguf_meta(r, "tokenizer.ggml.add_bos_token", False):
        raise LeanqError(f"{p}: the tokenizer adds a BOS token, which the lean runtime's GGUF reader does not do yet")
    return tk


def _load_gguf(p: Path) -> tuple[LeanLlama, object]:
    import numpy as np
    from gguf import quants

    from .export.gguf import gguf_name
    from .models import open_gguf

    r = open_gguf(p)
    arch = _gguf_meta(r, "general.architecture")
    if arch != "llama":
        raise LeanqError(f"{p}: architecture {arch!r}: the lean runtime reads llama GGUF files only")

    def num(key: str, default=None):
        v = _gguf_meta(r, f"llama.{key}", default)
        return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else v

    tensors = {t.name: t for t in r.tensors}
    heads = num("attention.head_count")
    hidden = num("embedding_length")
    cfg = {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": num("block_count"),
           "intermediate_size": num("feed_forward_length"), "num_attention_heads": heads,
           "num_key_value_heads": num("attention.head_count_kv", heads), "rope_theta": num("rope.freq_base", 10000.0),
           "rms_norm_eps": num("attention.layer_norm_rms_epsilon", 1e-5),
           "max_position_embeddings": num("context_length", 2048),
           "tie_word_embeddings": "output.weight" not in tensors,
           "eos_token_id": _gguf_meta(r, "tokenizer.ggml.eos_token_id")}
    emb = tensors.get("token_embd.weight")
    cfg["vocab_size"] = num("vocab_size") or (int(emb.shape[-1]) if emb is not None else None)
    if num("attention.key_length") is not None:
        cfg["head_dim"] = num("attention.key_length")
    scaling = _gguf_meta(r, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        cfg["rope_parameters"] = {"rope_type": scaling}
    s = LlamaShape.from_config(cfg, str(p))
    if num("rope.dimension_count", s.head_dim) != s.head_dim:
        raise LeanqError(f"{p}: rotary dimensions {num('rope.dimension_count')} of head size {s.head_dim}: partial "
                         f"rotary embeddings are not supported by the lean runtime")
    with torch.device("meta"):
        model = LeanLlama(s)
    expected = dict(model.state_dict())
    names = {gguf_name(k): k for k in expected}
    extra = sorted(set(tensors) - set(names) - {"rope_freqs.weight"})
    if extra:
        raise LeanqError(f"{p}: tensors the llama layout does not have: {extra[:3]}"[:300])
    need = sum(v.numel() for v in expected.values())
    have = sum(int(tensors[g].n_elements) for g in names if g in tensors)
    if have < need:
        missing = sorted(g for g in names if g not in tensors)
        what = f"lacks {missing[:3]}" if missing else "tensors smaller than its metadata says"
        raise LeanqError(f"{p}: {what}"[:300])
    state = {}
    for g, k in names.items():
        t = tensors[g]
        shape = tuple(int(x) for x in reversed(list(t.shape)))  # GGUF lists dimensions innermost first
        if shape != tuple(expected[k].shape):
            raise LeanqError(f"{p}: tensor {g} is {list(shape)}, the metadata needs {list(expected[k].shape)}")
        try:
            a = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except (NotImplementedError, ValueError) as e:
            raise LeanqError(f"{p}: tensor {g} of type {t.tensor_type.name}: cannot be dequantized ({e})"[:300]) \
                from None
        if g.endswith(("attn_q.weight", "attn_k.weight")):  # back from llama.cpp's rotary row order
            n = s.heads if g.endswith("attn_q.weight") else s.kv_heads
            a = a.reshape(n, a.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(shape)
        w = torch.from_numpy(np.array(a, dtype=np.float32, copy=True))  # owned, not a view of the mapped file
        if not torch.isfinite(w).all():
            raise LeanqError(f"{p}: tensor {g} holds NaN or Inf")
        state[k] = w
    model.load_state_dict(state, strict=True, assign=True)
    return model, _gguf_tokenizer(r, p)
