"""Perplexity (WikiText-2 protocol) and the size/memory report.

Protocol: the file is read as one string and tokenized without BOS; the ids
are cut into consecutive non-overlapping windows of ``window`` tokens (a
partial tail is dropped); each window is scored on its own, predicting tokens
2..window from their prefixes; ppl = exp(total NLL / tokens scored).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import tokenize
from .errors import LeanqError
from .formats.intq import bits_per_weight
from .modules import QuantLinear


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int = 1024, max_windows: int | None = None,
               device: str = "cpu", progress: bool = True) -> tuple[float, int]:
    """(ppl, tokens scored) of ``model`` over ``ids`` int64 [n]."""
    if window < 2:
        raise LeanqError(f"window must be at least 2 tokens, got {window}")
    n = len(ids) // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise LeanqError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    nll, count = 0.0, 0
    for i in tqdm(range(n), desc="perplexity", disable=not progress):
        x = ids[i * window : (i + 1) * window].unsqueeze(0).to(device)
        logits = model(x, use_cache=False).logits[0, :-1].float()
        nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += window - 1
    return math.exp(nll / count), count


def model_bytes(model) -> int:
    """Bytes of every parameter and buffer, tied tensors once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


@dataclass
class SizeReport:
    params: int  # parameters of the float model (tied counted once)
    quantized_params: int  # weights held in quantized linears
    quantized_bytes: int  # their stored bytes: codes + scales + zeros
    bits_per_weight: float  # quantized linears only, every overhead counted
    bits_per_weight_model: float  # whole model as stored on disk
    bytes_in_memory: int
    bytes_on_disk: int


def size_report(model, disk_path: str | Path | None, keep_bytes_per_param: int | None = None) -> SizeReport:
    q_params = q_bytes = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            q_params += m.in_features * m.out_features
            q_bytes += sum(b.numel() * b.element_size() for n, b in m.named_buffers() if n != "bias")
    seen, other = set(), 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            continue
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if t.data_ptr() in seen or not t.is_floating_point() or t.dim() == 0:
                continue
            seen.add(t.data_ptr())
            other += t.numel()
    params = q_params + other
    disk = _disk_bytes(disk_path) if disk_path else 0
    bpw = 8.0 * q_bytes / q_params if q_params else 8.0 * next(model.parameters()).element_size()
    return SizeReport(params, q_params, q_bytes, bpw, 8.0 * disk / params if disk else float("nan"),
                      model_bytes(model), disk)


def _disk_bytes(p: str | Path) -> int:
    p = Path(p)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


@dataclass
class EvalResult:
    model: str
    ppl: float
    tokens_scored: int
    windows: int
    window: int
    bits_per_weight: float
    bits_per_weight_model: float
    params: int
    bytes_on_disk: int
    bytes_in_memory: int
    seconds: float
    ppl_ratio: float | None = None
    baseline_ppl: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(model, tokenizer, text: str, name: str, disk_path=None, window: int = 1024,
             max_windows: int | None = None, device: str = "cpu", progress: bool = True) -> EvalResult:
    ids = tokenize(tokenizer, text)
    t0 = time.perf_counter()
    ppl, count = perplexity(model, ids, window, max_windows, device, progress)
    secs = time.perf_counter() - t0
    rep = size_report(model, disk_path)
    return EvalResult(name, ppl, count, count // (window - 1), window, rep.bits_per_weight, rep.bits_per_weight_model,
                      rep.params, rep.bytes_on_disk, rep.bytes_in_memory, secs)


def format_report(r: EvalResult, quant_seconds: float | None = None) -> str:
    mb = 1 << 20
    rows = [
        ("model", r.model),
        ("parameters", f"{r.params / 1e6:.1f} M"),
        ("bits per weight (quantized linears)", f"{r.bits_per_weight:.3f}"),
        ("bits per weight (whole model on disk)", f"{r.bits_per_weight_model:.3f}" if r.bytes_on_disk else "-"),
        ("bytes on disk", f"{r.bytes_on_disk / mb:.1f} MiB" if r.bytes_on_disk else "-"),
        ("bytes in memory", f"{r.bytes_in_memory / mb:.1f} MiB"),
        ("perplexity", f"{r.ppl:.3f}  ({r.windows} windows x {r.window} tokens, {r.tokens_scored} scored)"),
    ]
    if r.ppl_ratio is not None:
        rows.append(("ppl ratio to unquantized", f"{r.ppl_ratio:.3f}  (baseline {r.baseline_ppl:.3f})"))
    if quant_seconds is not None:
        rows.append(("quantization time", f"{quant_seconds:.1f} s"))
    rows.append(("evaluation time", f"{r.seconds:.1f} s"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)
