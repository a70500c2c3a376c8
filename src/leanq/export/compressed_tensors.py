"""Export to compressed-tensors "pack-quantized": the format llm-compressor writes and
vLLM and ``transformers`` (with the ``compressed-tensors`` package) load.

The mapping is exact — no value is requantized:

* leanq stores unsigned codes u in [0, 2^b) with an integer zero point z
  (asymmetric) or the implicit z = 2^(b-1) (symmetric); w = (u - z) · s.
* compressed-tensors stores signed codes q = u - 2^(b-1) and a signed zero
  point zp = z - 2^(b-1) (asymmetric) or none (symmetric); w = (q - zp) · s.
  Both differences are the same integer; the float16 scales are copied
  (widened to float32, which every float16 value is exactly).
* Its packing is a dense little-endian bit stream of the unsigned codes
  (q + 2^(b-1)) cut into int32 words — exactly leanq's byte stream, read as
  int32.  Zero points are packed the same way along the output dimension.
* compressed-tensors needs the group size to divide the input width; leanq
  allows a shorter last group.  Such a layer is written with group size
  gcd(g, in) and each scale/zero repeated g / gcd times, which describes the
  very same weights (e.g. SmolLM2's 576-wide inputs at g128 become g64).  All
  group-wise layers share the smallest such size, so the file holds one scheme.

What cannot be expressed is refused with one error naming the setting:
bit widths other than 4 and 8 (the widths vLLM's compressed-tensors kernels
run), non-integer formats (nf4, fp8, w8a8 — no exact counterpart here),
AWQ's per-input-column ``in_scale``, and GPT-2's Conv1D layers.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import LeanqError
from . import move_into_place, temp_beside

SUPPORTED_BITS = (4, 8)
_LEANQ_FILES = ("leanq.json", "model.safetensors", "config.json")


def _as_int32_words(b: torch.Tensor, nwords: int) -> torch.Tensor:
    """uint8 [rows, nbytes] little-endian byte stream -> int32 [rows, nwords] (zero padded or cut)."""
    rows, n = b.shape
    need = 4 * nwords
    if n < need:
        b = torch.nn.functional.pad(b, (0, need - n))
    a = np.ascontiguousarray(b[:, :need].numpy())
    return torch.from_numpy(a.view("<i4").astype(np.int32)).reshape(rows, nwords)


def refusal(spec, in_features: int, model_type: str) -> str | None:
    """Why a module of this spec cannot be written as compressed-tensors (None: it can)."""
    if model_type == "gpt2":
        return "GPT-2's Conv1D layers are not nn.Linear, which is what compressed-tensors quantizes"
    if spec.fmt != "int":
        return f"format {spec.fmt!r} ({spec.describe()}) has no exact compressed-tensors counterpart; only int is exported"
    if spec.bits not in SUPPORTED_BITS:
        return (f"int{spec.bits} is not exported: vLLM's compressed-tensors kernels run 4- and 8-bit integer "
                f"weights only (quantize with --bits 4 or --bits 8)")
    if getattr(spec, "in_scale", False):
        return "AWQ's per-input-column in_scale has no compressed-tensors field; re-quantize without it"
    if spec.group_size is not None and math.gcd(spec.group_size, in_features) < 8:
        return f"group size {spec.group_size} and input width {in_features} share no group of 8 or more columns"
    return None


def convert_module(m, g2: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """A leanq int QuantLinear -> (compressed-tensors tensors without prefix, weight args dict).

    g2: the group size to write (must divide both the leanq group and the width); default gcd(g, in).
    """
    spec, n, out, b = m.spec, m.in_features, m.out_features, m.spec.bits
    g = spec.group_size
    args = {"num_bits": b, "type": "int", "symmetric": bool(spec.sym), "dynamic": False}
    scales = m.scales.detach().cpu()
    zeros = None if spec.sym else m.int_weight().zero_points().round().to(torch.uint8).cpu()  # [out, ngroups]
    if g is None:
        args.update(strategy="channel", group_size=None)
    else:
        g2 = g2 or math.gcd(g, n)
        if g % g2 or n % g2:
            raise ValueError(f"group {g2} does not split group {g} and width {n}")
        if g2 != g:  # split each leanq group into g // g2 equal groups sharing its parameters
            k, ng2 = g // g2, n // g2
            scales = scales.repeat_interleave(k, dim=1)[:, :ng2]
            zeros = None if zeros is None else zeros.repeat_interleave(k, dim=1)[:, :ng2]
        args.update(strategy="group", group_size=g2)
    t = {
        "weight_packed": _as_int32_words(m.qweight.detach().cpu(), math.ceil(n * b / 32)),
        # float32, not leanq's float16: the same values, but transformers' loader dequantizes in the
        # scale's dtype, and float16 products would round (2.9e-4 relative logit error on a tiny model)
        "weight_scale": scales.to(torch.float32).contiguous(),
        "weight_shape": torch.tensor([out, n], dtype=torch.int64),
    }
    if zeros is not None:
        from ..formats.packing import pack

        zt = pack(zeros.t().contiguous(), b)  # [ngroups, bytes] stream along the output dimension
        t["weight_zero_point"] = _as_int32_words(zt, math.ceil(out * b / 32)).t().contiguous()
    if m.bias is not None:
        t["bias"] = m.bias.detach().cpu()
    return t, args


def export_compressed_tensors(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``out`` (a Hugging Face folder) from the leanq checkpoint folder ``src``."""
    from safetensors.torch import save_file

    from ..checkpoint import load, state_to_save
    from ..modules import QuantLinear

    src, out = Path(src), Path(out)
    model, _, recipe = load(src)
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quant:
        raise LeanqError(f"{src}: has no quantized layers to export")
    for name, m in quant.items():
        why = refusal(m.spec, m.in_features, recipe.model_type)
        if why:
            raise LeanqError(f"{src}: cannot export {name} ({m.spec.describe()}) to compressed-tensors: {why}")

    state = {k: v for k, v in state_to_save(model, recipe.keep_dtype).items() if k.rsplit(".", 1)[0] not in quant}
    groups: dict[str, dict] = {}  # json of the weight args -> scheme
    # one group size for all group-wise layers: transformers' dequantizing loader handles a single
    # dense scheme (two groups, g128 and g64, failed its weight conversion on SmolLM2)
    common = 0
    for m in quant.values():
        if m.spec.group_size is not None:
            common = math.gcd(common, math.gcd(m.spec.group_size, m.in_features))
    for name, m in sorted(quant.items()):
        tensors, args = convert_module(m, common or None)
        state.update({f"{name}.{k}": v for k, v in tensors.items()})
        key = json.dumps(args, sort_keys=True)
        groups.setdefault(key, {"targets": [], "weights": args, "input_activations": None, "output_activations": None})
        groups[key]["targets"].append(name)
    qcfg = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": s for i, (_, s) in enumerate(sorted(groups.items()))},
        "ignore": [],  # only the modules named in targets are quantized
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    cfg["quantization_config"] = qcfg
    cfg["torch_dtype"] = cfg["dtype"] = recipe.keep_dtype

    tmp = temp_beside(out, overwrite, is_dir=True)
    tmp.mkdir()
    try:
        meta = {"format": "pt", "producer": "leanq export", "leanq_source": src.name,
                "leanq_recipe": (src / "leanq.json").read_text(encoding="utf-8")}
        save_file({k: v.contiguous() for k, v in sorted(state.items())}, str(tmp / "model.safetensors"), metadata=meta)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True) + "\n")
        for f in sorted(src.iterdir()):  # tokenizer and generation files travel as they are
            if f.is_file() and f.name not in _LEANQ_FILES:
                shutil.copy2(f, tmp / f.name)
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
