"""Read a llama2.c checkpoint (e.g. stories260K.bin) into a transformers LlamaForCausalLM.

Format: 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size — negative for an unshared classifier —, seq_len), then float32
arrays: token embedding, attention norms, wq, wk, wv, wo, ffn norms, w1, w2,
w3, final norm, two RoPE tables (skipped), then the classifier if unshared.
llama2.c rotates interleaved pairs; transformers rotates halves, so the rows
of wq and wk are permuted per head to match.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from .errors import LeanqError


def load_llama2c(path: str | Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    p = Path(path)
    raw = p.read_bytes()
    if len(raw) < 28:
        raise LeanqError(f"{p}: too short for a llama2.c header")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = struct.unpack("<7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    if not (0 < dim <= 65536 and 0 < hidden <= 1 << 18 and 0 < n_layers <= 1024 and 0 < n_heads <= dim
            and 0 < n_kv <= n_heads and 0 < vocab <= 1 << 20 and 0 < seq <= 1 << 20 and dim % n_heads == 0):
        raise LeanqError(f"{p}: implausible llama2.c header {(dim, hidden, n_layers, n_heads, n_kv, vocab, seq)}")
    hd = dim // n_heads
    kv_dim = n_kv * hd
    sizes = [("embed", (vocab, dim)), ("attn_norm", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
             ("wk", (n_layers, kv_dim, dim)), ("wv", (n_layers, kv_dim, dim)), ("wo", (n_layers, dim, dim)),
             ("ffn_norm", (n_layers, dim)), ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
             ("w3", (n_layers, hidden, dim)), ("norm", (dim,)), ("rope", (seq * hd,))]
    if not shared:
        sizes.append(("cls", (vocab, dim)))
    need = 28 + 4 * sum(int(np.prod(s)) for _, s in sizes)
    if len(raw) < need:
        raise LeanqError(f"{p}: truncated ({len(raw)} bytes, header implies {need})")
    arr = np.frombuffer(raw, dtype="<f4", offset=28, count=(need - 28) // 4)
    t, off = {}, 0
    for name, shape in sizes:
        n = int(np.prod(shape))
        t[name] = torch.from_numpy(arr[off : off + n].copy()).reshape(shape)
        off += n

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=n_layers,
                      num_attention_heads=n_heads, num_key_value_heads=n_kv, max_position_embeddings=seq,
                      rms_norm_eps=1e-5, tie_word_embeddings=shared, rope_theta=10000.0)
    model = LlamaForCausalLM(cfg)

    def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
        # interleaved pairs (x0,x1),(x2,x3).. -> halves (x0,x2,..),(x1,x3,..) per head
        return w.view(heads, hd // 2, 2, dim).transpose(1, 2).reshape(heads * hd, dim)

    sd = {"model.embed_tokens.weight": t["embed"], "model.norm.weight": t["norm"],
          "lm_head.weight": t["embed"] if shared else t["cls"]}
    for i in range(n_layers):
        pre = f"model.layers.{i}."
        sd[pre + "input_layernorm.weight"] = t["attn_norm"][i]
        sd[pre + "post_attention_layernorm.weight"] = t["ffn_norm"][i]
        sd[pre + "self_attn.q_proj.weight"] = permute(t["wq"][i], n_heads)
        sd[pre + "self_attn.k_proj.weight"] = permute(t["wk"][i], n_kv)
        sd[pre + "self_attn.v_proj.weight"] = t["wv"][i]
        sd[pre + "self_attn.o_proj.weight"] = t["wo"][i]
        sd[pre + "mlp.gate_proj.weight"] = t["w1"][i]
        sd[pre + "mlp.down_proj.weight"] = t["w2"][i]
        sd[pre + "mlp.up_proj.weight"] = t["w3"][i]
    model.load_state_dict(sd, strict=False)
    if shared:
        model.tie_weights()
    model.eval()
    return model
