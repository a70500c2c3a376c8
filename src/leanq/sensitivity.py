"""Per-module sensitivity: how much damage each candidate setting does to each module alone.

The proxy for module m (weight W [out, in]) under candidate setting c is the
layer-output error under the calibration Hessian H = 2/n · XᵀX of its input:

    damage(m, c) = tr(ΔW H ΔWᵀ) = 2/n · Σ_tokens ||ΔW x||²,   ΔW = Ŵ_c − W

where Ŵ_c is what the quantizer (RTN, or GPTQ with that same H) stores for W.
The H of every module comes from one run of the sequential pipeline on the
float model (``pipeline.quantize_blocks(..., on_hessian=...)`` with a float32
"cast" spec, which leaves every weight unchanged), so measuring costs one
calibration pass plus one quantization per (module, candidate).  Each H is
used as soon as it is built and then dropped.

:func:`check_proxy` checks the proxy against the true change in calibration
loss when only one module is quantized, for a sample of modules, and reports
Spearman's rank correlation.

Measurements are cached as JSON (:func:`save_table` / :func:`load_table`,
validated when read) so re-planning at another budget costs seconds.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import MethodConfig, QuantSpec
from .errors import LeanqError
from .formats.intq import expected_shapes, find_params, group_size_of

TABLE_VERSION = 1
MAX_TABLE_BYTES = 64 << 20

#: the candidate settings measured unless told otherwise (asymmetric ints)
DEFAULT_CANDIDATES: tuple[QuantSpec, ...] = (
    QuantSpec(bits=2, group_size=64),
    QuantSpec(bits=3, group_size=128),
    QuantSpec(bits=3, group_size=64),
    QuantSpec(bits=4, group_size=128),
    QuantSpec(bits=4, group_size=64),
    QuantSpec(bits=8, group_size=None),
    QuantSpec(fmt="float", dtype="float16"),
)
PROXY_METHODS = ("rtn", "gptq")


def module_bits(spec: QuantSpec, out_features: int, in_features: int, bias: bool = False) -> int:
    """Exact stored size in bits of one module: codes, scales, zeros (and a float32 bias)."""
    if spec.fmt == "float":
        size = torch.empty(0, dtype=getattr(torch, spec.dtype)).element_size()
        total = out_features * in_features * size
    else:
        total = sum(math.prod(shape) * torch.empty(0, dtype=dt).element_size()
                    for shape, dt in expected_shapes(spec, out_features, in_features).values())
    return 8 * (total + (4 * out_features if bias else 0))


def split_name(name: str) -> tuple[int, str]:
    """'model.layers.3.mlp.down_proj' -> (3, 'mlp.down_proj'); (-1, name) when there is no index."""
    m = re.match(r"^(.*?)\.(\d+)\.(.+)$", name)
    return (int(m.group(2)), m.group(3)) if m else (-1, name)


def rtn_dequant(w: torch.Tensor, spec: QuantSpec, mse_clip: bool) -> torch.Tensor:
    """What RTN stores for ``w`` [out, in], dequantized to float32 [out, in].

    Same maths as ``methods.rtn`` (``find_params`` is row-wise), but every full
    group of the matrix is one row of a single batched call instead of a loop
    over groups: the sensitivity pass quantizes every module several times.
    """
    w = w.detach().float()
    if spec.fmt == "float":
        return w.to(getattr(torch, spec.dtype)).float()
    if spec.fmt != "int":
        raise LeanqError(f"sensitivity: only int and float candidates are supported, got {spec.describe()}")
    out, n = w.shape
    g = group_size_of(spec, n)
    qmax = (1 << spec.bits) - 1
    nfull = n // g
    parts = []
    for lo, hi, rows in ((0, nfull * g, nfull), (nfull * g, n, 1)):
        if hi <= lo:
            continue
        width = (hi - lo) // rows
        x = w[:, lo:hi].reshape(out * rows, width)
        s, z = find_params(x, spec, mse_clip)
        q = torch.clamp(torch.round(x / s[:, None]) + z[:, None], 0, qmax)
        parts.append(((q - z[:, None]) * s[:, None]).reshape(out, hi - lo))
    return torch.cat(parts, dim=1)


def hessian_damage(dw: torch.Tensor, h: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) for ΔW [out, in], H [in, in] (float64 sum for stability)."""
    return float(((dw.double() @ h.double()) * dw.double()).sum().clamp(min=0.0))


def quantized_weight(w: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec, cfg: MethodConfig, proxy: str) -> torch.Tensor:
    """Ŵ float32 [out, in] of candidate ``spec`` with the proxy's method."""
    if spec.fmt == "vq" or (cfg.name == "vq" and spec.fmt == "int"):
        # what --method vq stores: codebooks fitted under H, integers by its GPTQ (leanq.methods.vq)
        from .methods.vq import vq

        return vq(w, h, spec, cfg).dequantize(torch.float32)
    if proxy == "gptq" and spec.fmt == "int":
        from .methods.gptq import gptq

        return gptq(w, h, spec, cfg).dequantize(torch.float32)
    return rtn_dequant(w, spec, cfg.mse_clip)


@dataclass
class SensitivityTable:
    """Damage of every candidate on every module, plus what the numbers depend on.

    modules: {full name: {"out": int, "in": int, "bias": bool, "damage": [float per candidate]}}
    meta: model source, calibration and proxy settings (compared on reuse).
    check: the proxy check (pairs and Spearman correlation), if run.
    """

    candidates: tuple[QuantSpec, ...]
    modules: dict[str, dict]
    meta: dict
    seconds: float = 0.0
    check: dict = field(default_factory=dict)

    def damage(self, name: str) -> list[float]:
        """Predicted damage of each candidate on ``name``: the output error, times the module's
        loss gain when one was measured (:func:`output_grad_gains`)."""
        m = self.modules[name]
        g = m.get("gain", 1.0)
        return [g * d for d in m["damage"]]

    def bits(self, name: str, k: int) -> int:
        m = self.modules[name]
        return module_bits(self.candidates[k], m["out"], m["in"], m["bias"])

    def to_json(self) -> str:
        d = {"version": TABLE_VERSION, "kind": "leanq-sensitivity", "meta": self.meta, "seconds": self.seconds,
             "candidates": [c.to_dict() for c in self.candidates], "modules": self.modules, "check": self.check}
        return json.dumps(d, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> "SensitivityTable":
        try:
            d = json.loads(text, parse_constant=_refuse)
        except (ValueError, RecursionError) as e:
            raise LeanqError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("kind") != "leanq-sensitivity":
            raise LeanqError(f"{where}: not a leanq sensitivity file")
        if type(d.get("version")) is not int or d["version"] != TABLE_VERSION:
            raise LeanqError(f"{where}: version {d.get('version')!r} is not supported (this leanq reads {TABLE_VERSION})")
        cands, mods, meta = d.get("candidates"), d.get("modules"), d.get("meta")
        if not isinstance(cands, list) or not cands or not isinstance(mods, dict) or not mods or not isinstance(meta, dict):
            raise LeanqError(f"{where}: candidates, modules and meta must be present and non-empty")
        try:
            specs = tuple(QuantSpec.from_dict(c) for c in cands)
        except (LeanqError, TypeError) as e:
            raise LeanqError(f"{where}: bad candidate ({e})") from None
        for name, m in mods.items():
            ok = (isinstance(m, dict) and {"out", "in", "bias", "damage"} <= set(m) <= {"out", "in", "bias", "damage", "gain"}
                  and (type(m.get("gain", 1.0)) in (int, float) and math.isfinite(m.get("gain", 1.0)) and m.get("gain", 1.0) >= 0)
                  and all(type(m[k]) is int and 0 < m[k] <= 1 << 20 for k in ("out", "in"))
                  and type(m["bias"]) is bool and isinstance(m["damage"], list) and len(m["damage"]) == len(specs)
                  and all(type(v) in (int, float) and math.isfinite(v) and v >= 0 for v in m["damage"]))
            if not ok:
                raise LeanqError(f"{where}: entry for module {name!r} is malformed")
        secs = d.get("seconds", 0.0)
        check = d.get("check", {})
        if type(secs) not in (int, float) or not isinstance(check, dict):
            raise LeanqError(f"{where}: malformed seconds/check fields")
        return cls(specs, mods, meta, float(secs), check)


def _refuse(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


def save_table(table: SensitivityTable, path: str | Path) -> Path:
    """Write atomically (temp file + rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(table.to_json())
    os.replace(tmp, p)
    return p


def load_table(path: str | Path) -> SensitivityTable:
    p = Path(path)
    if not p.is_file():
        raise LeanqError(f"{p}: no such sensitivity file")
    if p.stat().st_size > MAX_TABLE_BYTES:
        raise LeanqError(f"{p}: too large to be a sensitivity file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LeanqError(f"{p}: not UTF-8 text") from None
    return SensitivityTable.from_json(text, str(p))


def check_compatible(table: SensitivityTable, meta: dict, names: set[str], where: str) -> None:
    """A cached table must describe this model, calibration and proxy, and exactly these modules."""
    for k, v in meta.items():
        if table.meta.get(k) != v:
            raise LeanqError(f"{where}: measured with {k}={table.meta.get(k)!r}, but this run has {k}={v!r}; "
                             f"delete the file or pass another --sensitivity-cache")
    if set(table.modules) != names:
        missing = sorted(names - set(table.modules))[:2] or sorted(set(table.modules) - names)[:2]
        raise LeanqError(f"{where}: its modules do not match this model's quantized modules (e.g. {missing})")


def measure(model: torch.nn.Module, calib: torch.Tensor, meta: dict, cfg: MethodConfig,
            candidates: tuple[QuantSpec, ...] = DEFAULT_CANDIDATES, keep: tuple[str, ...] = (),
            proxy: str = "rtn", device: str = "cpu", progress: bool = True) -> SensitivityTable:
    """Measure every (target module, candidate) damage on a *copy* of the float ``model``.

    calib: int64 [nsamples, seqlen] token ids.  The model itself is not changed.
    """
    from .pipeline import quantize_blocks

    if proxy not in PROXY_METHODS:
        raise LeanqError(f"sensitivity proxy must be one of {', '.join(PROXY_METHODS)}, got {proxy!r}")
    t0 = time.perf_counter()
    work = copy.deepcopy(model)
    mods: dict[str, dict] = {}
    bar = tqdm(desc="sensitivity", unit="module", disable=not progress)

    def on_hessian(name: str, w: torch.Tensor, h: torch.Tensor) -> None:
        w = w.detach().float()
        dmg = []
        for spec in candidates:
            dw = quantized_weight(w, h, spec, cfg, proxy) - w
            dmg.append(hessian_damage(dw, h))
        mods[name] = {"out": w.shape[0], "in": w.shape[1], "bias": False, "damage": dmg}
        bar.update(1)

    # a float32 "cast" spec leaves every weight bit-identical, so each block's
    # inputs are the float model's; any data-driven method name makes the
    # pipeline build Hessians (gptq is always registered)
    recipe = quantize_blocks(work, QuantSpec(fmt="float", dtype="float32"), MethodConfig(name="gptq", seed=cfg.seed, true_sequential=True),
                             calib, keep=keep, device=device, progress=False, on_hessian=on_hessian)
    bar.close()
    for name, mr in recipe.items():
        mods[name]["bias"] = mr.bias
    del work
    m = dict(meta, proxy=proxy, mse_clip=cfg.mse_clip, damp=cfg.damp if proxy == "gptq" else None)
    return SensitivityTable(tuple(candidates), mods, m, time.perf_counter() - t0)


# ---------------------------------------------------------------------------
# checking the proxy against the real loss


@torch.no_grad()
def calib_loss(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy over ``ids`` int64 [n, seqlen]."""
    tot, cnt = 0.0, 0
    for s in range(0, ids.shape[0], batch_size):
        x = ids[s : s + batch_size]
        logits = model(x, use_cache=False).logits[:, :-1].float()
        tot += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        cnt += x[:, 1:].numel()
    return tot / cnt


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va and vb else float("nan")


def check_proxy(model: torch.nn.Module, ids: torch.Tensor, table: SensitivityTable, n_modules: int = 8,
                candidate_ids: tuple[int, ...] | None = None, progress: bool = True) -> dict:
    """True loss change when only one module is quantized (RTN), for ``n_modules`` spread over the model.

    ids: int64 [n, seqlen] held-out calibration tokens.  The model is restored afterwards.
    Returns {"base_loss", "pairs": [{module, candidate, proxy, dloss}], "spearman"}.
    """
    from .arch import linear_weight

    names = sorted(table.modules, key=lambda n: (split_name(n)[0], n))
    step = max(1, len(names) // n_modules)
    sample = names[step // 2 :: step][:n_modules]
    if candidate_ids is None:  # the two cheapest int settings: where the damage is large enough to see
        ints = [k for k, c in enumerate(table.candidates) if c.fmt == "int"]
        candidate_ids = tuple(sorted(ints, key=lambda k: module_bits(table.candidates[k], 64, 64))[:2])
    mods = dict(model.named_modules())
    base = calib_loss(model, ids)
    pairs = []
    for name in tqdm(sample, desc="proxy check", disable=not progress):
        w, _ = linear_weight(mods[name])
        orig = w.clone()
        for k in candidate_ids:
            spec = table.candidates[k]
            w.copy_(rtn_dequant(orig, spec, table.meta.get("mse_clip", True)).to(w.dtype))
            try:
                loss = calib_loss(model, ids)
            finally:
                w.copy_(orig)
            pairs.append({"module": name, "candidate": spec.describe(), "proxy": table.damage(name)[k],
                          "output_error": table.modules[name]["damage"][k], "dloss": loss - base})
    return dict({"base_loss": base, "tokens": int(ids.numel()), "pairs": pairs}, **proxy_correlations(pairs))


def proxy_correlations(pairs: list[dict]) -> dict:
    """Spearman of the planner's proxy and of the plain output error against the true loss change."""
    out = {}
    for key, name in (("proxy", "spearman"), ("output_error", "spearman_output_error")):
        rho = spearman([p[key] for p in pairs], [p["dloss"] for p in pairs]) if len(pairs) > 2 else float("nan")
        out[name] = rho if math.isfinite(rho) else None
    return out


def output_grad_gains(model: torch.nn.Module, ids: torch.Tensor, names: list[str], batch_size: int = 2) -> dict[str, float]:
    """Loss gain of each module's output error: E_tokens ||∂ℓ/∂y||² / (4 · out_features).

    ℓ is one token's next-token loss and y [out] the module's output at that token.  To
    second order (Fisher, taken isotropic within a module) a small output error Δy raises
    the mean token loss by ½ · E||g||²/out · E||Δy||², and the proxy tr(ΔW H ΔWᵀ) is
    2 · E||Δy||², so gain × proxy estimates the loss change in nats per token.  One
    forward and backward pass over ``ids`` int64 [n, seqlen]; the model is not changed.
    """
    mods = dict(model.named_modules())
    sq = {n: 0.0 for n in names}
    handles = []

    def track(name):
        def fwd(mod, args, out):
            if out.requires_grad:
                out.register_hook(lambda g: sq.__setitem__(name, sq[name] + float(g.double().pow(2).sum())))
        return fwd

    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings()
    handles.append(emb.register_forward_hook(lambda m, a, o: o.requires_grad_(True)))
    handles += [mods[n].register_forward_hook(track(n)) for n in names]
    ntok = 0
    try:
        with torch.enable_grad():
            for s in range(0, ids.shape[0], batch_size):
                x = ids[s : s + batch_size]
                logits = model(x, use_cache=False).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                         reduction="sum")
                loss.backward()
                ntok += x[:, 1:].numel()
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    from .arch import linear_weight

    return {n: sq[n] / ntok / (4.0 * linear_weight(mods[n])[0].shape[0]) for n in names}


def with_gains(table: SensitivityTable, gains: dict[str, float], info: dict) -> SensitivityTable:
    """A copy of ``table`` whose damages are weighted by measured loss gains."""
    mods = {n: dict(m, gain=float(gains[n])) for n, m in table.modules.items()}
    return SensitivityTable(table.candidates, mods, {**table.meta, **info, "weighting": "fisher"}, table.seconds, {})
