"""Pure helpers of the peer benchmark: bit counting, group choice, the table.

Nothing here imports a peer library (or torch), so the main test venv can test it.

Counting rule (bits per weight of the decoder-block linears, "bpw"):
  * codes: the bits each library's storage spends per weight, as a number of bits
    per code (4-bit codes packed two to a byte count 4; HQQ's 3-bit codes packed ten
    to an int32 count 3.2);
  * scales, zero points, absmax: every tensor the library keeps beside the codes,
    numel x its width. A floating-point scale or zero that the library keeps in the
    *model's* dtype is counted at 16 bits (we run the model in float32 only because
    this is a CPU; a deployed model is fp16/bf16, and leanq's own scales are fp16);
    a width the library fixes itself (bitsandbytes' fp32 absmax, torchao int4's bf16
    scale and zero) is counted as it is. Integer zero points count at the width
    they are stored in when the library's checkpoint packs them (compressed-tensors
    packs them at the weight's bit width), else at their dtype's width.
  * bpw = sum over linears of (codes + side tensors) / sum of weights.
Embeddings, norms and the head stay float in every row and are not counted.
"""

from __future__ import annotations

import math

DTYPE_BITS = {
    "float64": 64, "float32": 32, "float16": 16, "bfloat16": 16, "float8_e4m3fn": 8,
    "int64": 64, "int32": 32, "int16": 16, "int8": 8, "uint8": 8, "bool": 8,
}


def dtype_bits(dtype) -> int:
    """Width in bits of a dtype given as a torch dtype or its name ("torch.float16" or "float16")."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BITS:
        raise ValueError(f"unknown dtype {dtype!r}")
    return DTYPE_BITS[name]


def side_bits(numel: int, dtype, model_dtype_float: bool = False) -> int:
    """Bits of one side tensor (scale/zero/absmax) of ``numel`` values.

    ``model_dtype_float``: the library keeps this tensor in the model's float dtype,
    so it is counted at 16 bits whatever we ran with (see the module docstring).
    """
    if numel < 0:
        raise ValueError("numel must be >= 0")
    return numel * (16 if model_dtype_float else dtype_bits(dtype))


def layer_bits(n_weights: int, code_bits: float, side: list[int]) -> float:
    """Total stored bits of one linear: codes at ``code_bits`` per weight plus side tensor bits."""
    if n_weights <= 0 or code_bits <= 0:
        raise ValueError("a quantized layer has weights and codes")
    return n_weights * code_bits + sum(side)


def bits_per_weight(layers: list[tuple[int, float]]) -> float:
    """(n_weights, total_bits) per layer -> bits per weight over all of them."""
    n = sum(w for w, _ in layers)
    if n == 0:
        raise ValueError("no layers")
    return sum(b for _, b in layers) / n


def pick_group(in_features: int, want: int, fallbacks: tuple[int, ...] = (64, 32)) -> int:
    """``want`` if it divides ``in_features``, else the first fallback that does.

    Libraries that need whole groups per row (compressed-tensors, torchao) cannot use
    g128 on SmolLM2's 576-wide inputs (576 = 4.5 x 128); they get g64 there.
    """
    for g in (want, *fallbacks):
        if g > 0 and in_features % g == 0:
            return g
    raise ValueError(f"no group size in {(want, *fallbacks)} divides {in_features}")


def expected_group_bpw(shapes: list[tuple[int, int]], bits: int, group: int, side_per_group: int,
                       fallbacks: tuple[int, ...] = (64, 32)) -> float:
    """bpw of whole-group-per-row integer quantization of ``shapes`` [(out, in)] with ``side_per_group`` bits
    of scale+zero per group, g = pick_group(in, group): a check on what the runner counts from real tensors."""
    layers = []
    for out, inp in shapes:
        g = pick_group(inp, group, fallbacks)
        n = out * inp
        layers.append((n, layer_bits(n, bits, [out * math.ceil(inp / g) * side_per_group])))
    return bits_per_weight(layers)


def fmt_ppl(p: float | None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "-"
    if p >= 1000:
        return f"{p:,.0f}"
    return f"{p:.2f}"


def _cell(x) -> str:
    """A table cell: a pipe or a newline inside it would break the markdown row."""
    return str(x).replace("|", "/").replace("\n", " ")


def markdown_table(rows: list[dict], fp32_ppl: float | None) -> str:
    """Rows (dicts from the runner's cache) -> a markdown table in the order given."""
    head = ("| setting | library | method | groups | bpw | ppl | ratio to FP32 | quant CPU s (wall s) | note |\n"
            "|---|---|---|---|---|---|---|---|---|")
    out = [head]
    for r in rows:
        ppl = r.get("ppl")
        ratio = "-"
        if ppl is not None and fp32_ppl:
            ratio = f"{ppl / fp32_ppl:,.0f}" if ppl / fp32_ppl >= 100 else f"{ppl / fp32_ppl:.3f}"
        bpw = f"{r['bpw']:.3f}" if r.get("bpw") is not None else "-"
        qt = "-"
        if r.get("quant_cpu_s") is not None:  # CPU seconds (wall seconds): see run_peers._since
            qt = f"{r['quant_cpu_s']:.0f} ({r['quant_s']:.0f})"
        elif r.get("quant_s") is not None:
            qt = f"{r['quant_s']:.0f}"
        note = r.get("note") or ""
        if r.get("status") not in (None, "ok"):
            note = f"**{r['status']}**: {note}"
        cells = [r["setting"], r["library"], r["method"], r.get("groups") or "-", bpw, fmt_ppl(ppl), ratio, qt, note]
        out.append("| " + " | ".join(_cell(x) for x in cells) + " |")
    return "\n".join(out)
