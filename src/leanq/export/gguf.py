"""Export to GGUF (llama.cpp) through the ``gguf`` package: Q8_0, Q4_0, Q4_1 blocks.

GGUF's legacy quants cut each row into blocks of 32 weights along the input
dimension, with one float16 scale per block (Q8_0: w = d·q, q int8;
Q4_0: w = d·(q - 8), q in 0..15; Q4_1: w = d·q + m).  leanq's int weights are
w = s·k with k = u - z an integer and one float16 scale s per group, so a
block that lies inside one leanq group is written *without requantizing*:

* Q8_0: d = s, q = k whenever -128 <= k <= 127 (every sym int8 and all int2..7);
* Q4_0: d = s, q = k + 8 when k in [-8, 7] (every symmetric int2..4), or
  d = -s, q = 8 - k when k in [-7, 8];
* Q4_1: d = s, m = s·c, q = k - c when max(k) - min(k) <= 15 (every int2..4,
  symmetric or not), with the offset c chosen so that m is a float16 exactly
  where one exists; otherwise only m is rounded.

Blocks that cannot be mapped (a leanq group narrower than 32, an int8 asym
block, AWQ's in_scale, nf4/fp8 formats) are requantized from leanq's
dequantized values with gguf's reference quantizer.  ``export_gguf`` returns
the extra error this adds: relative squared error against leanq's weights and
the share of blocks written exactly.

The embeddings and head are written as F16/BF16/F32 as leanq kept them, norms
as F32; q/k projections are permuted into llama.cpp's rotary layout (the same
permutation its converter applies, undone by readers).  The tokenizer
(tokenizer.json of a BPE model) goes into the tokenizer.ggml.* metadata.
Only the llama architecture is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import LeanqError
from . import move_into_place, temp_beside

QTYPES = ("Q8_0", "Q4_0", "Q4_1")
BLOCK = 32
_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf: str) -> str:
    """HF llama parameter name -> GGUF tensor name."""
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    parts = hf.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) >= 5:
        rest, kind = ".".join(parts[3:-1]), parts[-1]
        if rest in _NAMES:
            return f"blk.{parts[2]}.{_NAMES[rest]}.{kind}"
    raise LeanqError(f"tensor {hf!r} has no GGUF name (only the llama architecture is exported)")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k rows: [heads, 2, d/2, ...] -> [heads, d/2, 2, ...]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape[:-1], -1)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 32] codes 0..15 -> [n, 16] bytes: low nibble from the first half, high from the second."""
    q = q.astype(np.uint8)
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def encode_blocks(s: np.ndarray | None, k: np.ndarray | None, w: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of 32 -> (GGUF block bytes [n, bytes_per_block], exact mask [n]).

    s, k: float32 / int32 [n, 32] per-element leanq scale and integer (None: no
    leanq grid, requantize everything); w: float32 [n, 32] leanq's values.
    """
    import gguf

    gt = getattr(gguf.GGMLQuantizationType, qtype)
    out = gguf.quants.quantize(w.astype(np.float32), gt).reshape(len(w), -1)  # reference fallback for every block
    exact = np.zeros(len(w), dtype=bool)
    if s is None or not len(w):
        return out, exact
    uniform = (s == s[:, :1]).all(1) & np.isfinite(s[:, 0])
    d = s[:, 0:1]
    kmin, kmax = k.min(1), k.max(1)
    if qtype == "Q8_0":
        ok = uniform & (kmin >= -128) & (kmax <= 127)
        blk = np.concatenate([_f16_bytes(d), k.astype(np.int8).view(np.uint8)], 1)
        out[ok], exact = blk[ok], ok
    elif qtype == "Q4_0":
        pos = uniform & (kmin >= -8) & (kmax <= 7)
        neg = uniform & ~pos & (kmin >= -7) & (kmax <= 8)
        for ok, sign in ((pos, 1), (neg, -1)):
            blk = np.concatenate([_f16_bytes(sign * d), _nibbles(np.clip(sign * k + 8, 0, 15))], 1)
            out[ok] = blk[ok]
        exact = pos | neg
    else:  # Q4_1
        ok = uniform & (kmax - kmin <= 15)
        # any offset c in [kmax - 15, kmin] works (q = k - c); take the one whose m = s*c float16
        # holds exactly (c = 0 or a power of two usually), else the closest: most blocks become bit-exact
        cands = kmin[:, None] - np.arange(16)[None, :]  # [n, 16]
        exact_m = d * cands
        err = np.abs(exact_m.astype(np.float16).astype(np.float32) - exact_m)
        err = np.where(cands >= (kmax - 15)[:, None], err, np.inf)
        c = np.take_along_axis(cands, err.argmin(1)[:, None], 1)  # [n, 1]
        m = d * c
        blk = np.concatenate([_f16_bytes(d), _f16_bytes(m), _nibbles(np.clip(k - c, 0, 15))], 1)
        out[ok], exact = blk[ok], ok
    return out, exact


def _leanq_grid(m) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per-element (scale, integer) [out, in] of an int QuantLinear, or (None, None)."""
    spec = m.spec
    if spec.fmt != "int" or getattr(m, "in_scale", None) is not None:
        return None, None
    iw = m.int_weight()
    g = m.in_features if spec.group_size is None else spec.group_size
    s = iw.scales.float().repeat_interleave(g, 1)[:, : m.in_features]
    z = iw.zero_points().repeat_interleave(g, 1)[:, : m.in_features]
    k = iw.codes().to(torch.int32) - z.round().to(torch.int32)
    return s.numpy(), k.numpy()


def _dequantized(m) -> torch.Tensor:
    from ..formats.layouts import container

    return (m.weight.float() if m.spec.fmt == "float" else container(m).dequantize(torch.float32)).detach().cpu()


def choose_qtype(spec, asked: str) -> str:
    if asked != "auto":
        return asked
    if spec.fmt == "int" and spec.bits <= 4:
        return "Q4_0" if spec.sym else "Q4_1"
    return "Q8_0"


def _tokenizer_fields(src: Path, writer, vocab_size: int) -> None:
    """tokenizer.ggml.* from a BPE tokenizer.json (+ tokenizer_config.json for special ids)."""
    import gguf

    f = src / "tokenizer.json"
    if not f.is_file():
        raise LeanqError(f"{src}: has no tokenizer.json; a GGUF file needs its tokenizer")
    tj = json.loads(f.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise LeanqError(f"{f}: tokenizer model {model.get('type')!r} is not exported to GGUF yet (BPE only)")
    vocab = dict(model["vocab"])
    special = set()
    for t in tj.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        if t.get("special"):
            special.add(t["id"])
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_type(src))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    cfg = src / "tokenizer_config.json"
    tc = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {}
    ids = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
           "pad": writer.add_pad_token_id}
    for kind, add in ids.items():
        tok = tc.get(f"{kind}_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if isinstance(tok, str) and tok in vocab:
            add(vocab[tok])
    writer.add_add_bos_token(False)
    tmpl = src / "chat_template.jinja"
    if tmpl.is_file():
        writer.add_chat_template(tmpl.read_text(encoding="utf-8"))
    elif isinstance(tc.get("chat_template"), str):
        writer.add_chat_template(tc["chat_template"])


def _pre_type(src: Path) -> str:
    """llama.cpp's pre-tokenizer name: the source GGUF's when leanq can find it, else 'default'."""
    from ..models import _BUILTIN, resolve

    try:
        recipe_source = json.loads((src / "leanq.json").read_text(encoding="utf-8")).get("source", "")
        for name, (_, fname, _) in _BUILTIN.items():
            if recipe_source == fname:
                from gguf import GGUFReader

                r = GGUFReader(resolve(name))
                if "tokenizer.ggml.pre" in r.fields:
                    return str(r.fields["tokenizer.ggml.pre"].contents())
    except (LeanqError, OSError, ValueError, KeyError):
        pass
    return "default"


def export_gguf(src: str | Path, out: str | Path, overwrite: bool = False, qtype: str = "auto") -> dict:
    """Write the leanq checkpoint ``src`` as one GGUF file ``out``; returns the error report."""
    import gguf

    from ..checkpoint import load
    from ..modules import QuantLinear

    src, out = Path(src), Path(out)
    if qtype not in QTYPES + ("auto",):
        raise LeanqError(f"GGUF type {qtype!r} is not written; choose one of {', '.join(QTYPES)} or auto")
    model, _, recipe = load(src)
    cfg = model.config
    if cfg.model_type != "llama":
        raise LeanqError(f"{src}: model type {cfg.model_type!r} is not exported to GGUF yet (llama only)")
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head

    tmp = temp_beside(out, overwrite, is_dir=False)
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(src.name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", None))
    if rope is not None:
        w.add_rope_freq_base(float(rope))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_string("general.source.leanq_recipe", (src / "leanq.json").read_text(encoding="utf-8"))
    _tokenizer_fields(src, w, cfg.vocab_size)

    # exact_blocks: mapped onto leanq's grid without requantizing; bitexact_blocks: decode to leanq's values bit for bit
    report = {"qtypes": {}, "blocks": 0, "exact_blocks": 0, "bitexact_blocks": 0, "sq_err": 0.0, "sq_ref": 0.0}
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    seen = set()
    for name, t in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if owner in quant or name in seen:
            continue
        if name == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False):
            continue
        seen.add(name)
        a = t.detach().float().numpy()
        if a.ndim == 1:
            w.add_tensor(gguf_name(name), a.astype(np.float32))
        elif recipe.keep_dtype == "float32":
            w.add_tensor(gguf_name(name), a.astype(np.float32))
        elif recipe.keep_dtype == "bfloat16":
            w.add_tensor(gguf_name(name), gguf.quants.quantize(a, gguf.GGMLQuantizationType.BF16),
                         raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(gguf_name(name), a.astype(np.float16))
    for name, m in sorted(quant.items()):
        gname = gguf_name(name + ".weight")
        if m.in_features % BLOCK:
            raise LeanqError(f"{name}: input width {m.in_features} is not a multiple of GGUF's block of {BLOCK}")
        if m.bias is not None:
            raise LeanqError(f"{name}: has a bias, which llama GGUF files do not carry")
        qt = choose_qtype(m.spec, qtype)
        wq = _dequantized(m).numpy()
        s, k = _leanq_grid(m)
        if gname.endswith(("attn_q.weight", "attn_k.weight")):
            heads = n_head if "attn_q" in gname else n_kv
            wq = _permute(wq, heads)
            s, k = (None, None) if s is None else (_permute(s, heads), _permute(k, heads))
        nb = wq.size // BLOCK
        data, exact = encode_blocks(None if s is None else s.reshape(nb, BLOCK), None if k is None else k.reshape(nb, BLOCK),
                                    wq.reshape(nb, BLOCK), qt)
        gt = getattr(gguf.GGMLQuantizationType, qt)
        back = gguf.quants.dequantize(data.reshape(wq.shape[0], -1), gt).reshape(wq.shape)
        report["sq_err"] += float(((back - wq).astype(np.float64) ** 2).sum())
        report["sq_ref"] += float((wq.astype(np.float64) ** 2).sum())
        report["blocks"] += nb
        report["exact_blocks"] += int(exact.sum())
        report["bitexact_blocks"] += int((back.reshape(nb, BLOCK) == wq.reshape(nb, BLOCK)).all(1).sum())
        report["qtypes"][qt] = report["qtypes"].get(qt, 0) + 1
        w.add_tensor(gname, data.reshape(wq.shape[0], -1), raw_dtype=gt)
    ftype = {"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
             "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
    main = max(report["qtypes"], key=report["qtypes"].get) if report["qtypes"] else None
    if main:
        w.add_file_type(ftype[main])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        move_into_place(tmp, out)
    except BaseException:
        w.close()
        if tmp.exists():
            tmp.unlink()
        raise
    report["rel_sq_err"] = report["sq_err"] / max(report["sq_ref"], 1e-30)
    report["exact_share"] = report["exact_blocks"] / max(report["blocks"], 1)
    report["bitexact_share"] = report["bitexact_blocks"] / max(report["blocks"], 1)
    report["out"] = str(out)
    return report


