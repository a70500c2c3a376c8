"""Hybrid precision end to end: find the base modules, measure (or reuse) sensitivities, plan.

Used by :func:`leanq.api.quantize` when a budget (``bpw`` or ``max_size``) is
given; the result is a :class:`leanq.planner.Plan`, which is also the
``overrides(name) -> QuantSpec`` that :func:`leanq.pipeline.quantize_blocks` takes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .arch import block_targets, get_blocks, linear_weight
from .config import MethodConfig, QuantSpec
from .errors import LeanqError
from .planner import Plan, make_plan
from .rules import Rules
from .sensitivity import DEFAULT_CANDIDATES, SensitivityTable, check_compatible, load_table, measure, save_table

DEFAULT_SENS_SAMPLES = 32  # 32 x 512 tokens: enough for the proxy's ranking, a quarter of a full calibration pass
FISHER_SAMPLES = 8  # sequences of the forward+backward pass that measures each module's loss gain
DEFAULT_WEIGHTING = "fisher"


def add_gains(model: torch.nn.Module, table: SensitivityTable, ids: torch.Tensor) -> SensitivityTable:
    """Weight a table's output errors by each module's loss gain (one forward+backward over ``ids``)."""
    from .sensitivity import output_grad_gains, with_gains

    gains = output_grad_gains(model, ids, sorted(table.modules))
    return with_gains(table, gains, {"weighting": "fisher", "fisher_samples": int(ids.shape[0])})


def base_modules(model: torch.nn.Module, rules: Rules) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """({quantizable base module: (out, in)}, {base module kept float by a rule: (out, in)})."""
    from .pipeline import _blocks_prefix

    blocks = get_blocks(model)
    prefix = _blocks_prefix(model, blocks)
    quant, kept = {}, {}
    for i, block in enumerate(blocks):
        for rel, lin in block_targets(model, block, f"{prefix}.{i}", ()).items():
            full = f"{prefix}.{i}.{rel}"
            w, _ = linear_weight(lin)
            (kept if rules.is_kept(full) else quant)[full] = (w.shape[0], w.shape[1])
    return quant, kept


def fixed_file_bytes(model: torch.nn.Module, base: set[str], keep_dtype: str) -> int:
    """Bytes of model.safetensors outside the base linears, plus an upper estimate of its header.

    Tensors are counted once when tied, floats at ``keep_dtype``, as checkpoint.save stores them.
    """
    from .checkpoint import _unique_state

    size = torch.empty(0, dtype=getattr(torch, keep_dtype)).element_size()
    total, header = 0, 256
    for k, v in _unique_state(model).items():
        header += len(k) + 96
        if k.rsplit(".", 1)[0] in base:
            continue
        total += v.numel() * (size if v.is_floating_point() else v.element_size())
    header += sum(3 * (len(n) + 104) for n in base)  # up to qweight/scales/zeros per module
    return total + header


def _source_bytes(source: str) -> int:
    p = Path(source)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.glob("*.safetensors"))


def get_table(loaded, cfg: MethodConfig, rules: Rules, calib_path: Path, cache: str | None, samples: int,
              proxy: str = "rtn", candidates: tuple[QuantSpec, ...] = DEFAULT_CANDIDATES, device: str = "cpu",
              progress: bool = True, weighting: str = DEFAULT_WEIGHTING) -> SensitivityTable:
    """The cached table when it matches this model/calibration/proxy, else a fresh measurement (then cached).

    Every base module is measured, including those ``--keep`` leaves float now, so one
    cache serves any later set of rules.
    """
    from .data import calibration_ids

    quant, kept = base_modules(loaded.model, rules)
    meta = {"source": Path(loaded.source).name, "source_bytes": _source_bytes(loaded.source),
            "calib": Path(calib_path).name, "nsamples": samples, "seqlen": cfg.seqlen, "seed": cfg.seed,
            "proxy": proxy, "mse_clip": cfg.mse_clip, "weighting": weighting}
    if weighting not in ("none", "fisher"):
        raise LeanqError(f"sensitivity weighting must be 'none' or 'fisher', got {weighting!r}")
    if weighting == "fisher":
        meta["fisher_samples"] = min(FISHER_SAMPLES, samples)
    if cache and Path(cache).exists():
        table = load_table(cache)
        check_compatible(table, meta, set(quant) | set(kept), cache)
        if table.candidates != tuple(candidates):
            raise LeanqError(f"{cache}: measured other candidate settings; delete it or pass another --sensitivity-cache")
        return table
    ids = calibration_ids(loaded.tokenizer, calib_path, samples, cfg.seqlen, cfg.seed)
    table = measure(loaded.model, ids, meta, cfg, candidates, proxy=proxy, device=device, progress=progress)
    if weighting == "fisher":
        table = add_gains(loaded.model, table, ids[: meta["fisher_samples"]])
    table.meta = dict(table.meta, **meta)  # damp etc. from measure, the identity from here
    if cache:
        save_table(table, cache)
    return table


def plan_model(loaded, spec: QuantSpec, cfg: MethodConfig, rules: Rules, calib_path: Path, bpw: float | None = None,
               max_size: int | None = None, cache: str | None = None, samples: int = DEFAULT_SENS_SAMPLES,
               proxy: str = "", keep_dtype: str = "float16", device: str = "cpu",
               progress: bool = True, weighting: str = DEFAULT_WEIGHTING) -> tuple[Plan, SensitivityTable]:
    """Plan the decoder-block linears of ``loaded.model`` under one budget (see :mod:`leanq.planner`).

    proxy "" = the method's own rounding: each candidate measured as GPTQ would store it when the
    method is GPTQ, as RTN otherwise (what the plan will actually be quantized with).
    """
    if not proxy:
        proxy = "gptq" if cfg.name == "gptq" else "rtn"
    if spec.fmt not in ("int", "vq") or spec.in_scale:
        raise LeanqError("--bpw/--max-size plan plain integer or vq formats; use --method rtn, gptq or vq")
    extra = {}
    if spec.fmt == "vq":  # codebook candidates beside GPTQ integers, all measured under H (leanq.methods.vq)
        from .methods.vq import VQ_CANDIDATES

        extra, proxy = {"candidates": VQ_CANDIDATES}, "gptq"
    table = get_table(loaded, cfg, rules, calib_path, cache, samples, proxy, device=device, progress=progress,
                      weighting=weighting, **extra)
    fixed = 0
    if max_size:
        fixed = fixed_file_bytes(loaded.model, set(table.modules), keep_dtype)
    return plan_from_table(table, rules, bpw, max_size, fixed, keep_dtype)


def plan_from_table(table: SensitivityTable, rules: Rules, bpw: float | None = None, max_size: int | None = None,
                    fixed_bytes: int = 0, keep_dtype: str = "float16") -> tuple[Plan, SensitivityTable]:
    """Plan from a measured table alone (no model needed): rules pin or keep modules, the rest is chosen.

    Returns (plan, the table restricted to the modules that are quantized).
    """
    kept = {n: (m["out"], m["in"]) for n, m in table.modules.items() if rules.is_kept(n)}
    sub = SensitivityTable(table.candidates, {n: m for n, m in table.modules.items() if n not in kept}, table.meta,
                           table.seconds, table.check)
    pinned = {n: s for n in sub.modules if (s := rules.spec_for(n)) is not None}
    keep_bits = 8 * torch.empty(0, dtype=getattr(torch, keep_dtype)).element_size()
    plan = make_plan(sub, bpw=bpw, max_bytes=max_size, pinned=pinned, kept=kept, keep_bits=keep_bits,
                     fixed_bytes=fixed_bytes)
    return plan, sub
