"""Typed, versioned configuration that is saved inside every checkpoint.

A :class:`QuantSpec` says how one weight matrix is stored (the *format*);
a :class:`MethodConfig` says how its values were chosen (the *method*);
a :class:`Recipe` records both for every module of a model, plus where the
model came from, so a checkpoint says exactly how it was made.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import LeanqError

RECIPE_VERSION = 1
FORMATS = ("int", "float", "nf4", "fp8", "w8a8", "vq")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
MAX_DIM = 1 << 20  # bound on widths and group sizes read from files, so a recipe cannot ask for absurd tensors


@dataclass(frozen=True)
class QuantSpec:
    """Storage format of one weight matrix.

    fmt="int": integer codes of ``bits`` bits, one scale (and for asymmetric
    specs one integer zero point) per group of ``group_size`` consecutive input
    columns of each output row.  ``group_size=None`` means one group per row
    (per-channel).  When ``group_size`` does not divide the input width the last
    group of each row is shorter; its scale and zero are counted like any other.

    fmt="float": the weight is kept in float of dtype ``dtype``.

    fmt="nf4": 4-bit normal-float levels, one float16 absmax per block of
    ``group_size`` input columns (``leanq.formats.nf4``).  fmt="fp8": FP8 E4M3
    weights with one float16 scale per output row (``leanq.formats.fp8``).
    fmt="w8a8": int8 weights per row plus int8 activations quantized per token
    at run time, with a stored SmoothQuant vector (``leanq.formats.w8a8``).

    in_scale (fmt="int" only): a float16 vector [in] is stored beside the codes
    and the weight is ``dequant(codes) / in_scale`` column-wise (AWQ's
    activation-aware scaling, kept per module instead of folded elsewhere).
    Defaults keep checkpoints written before these fields existed valid.

    fmt="vq" (``leanq.formats.vq``): vectors of ``vq_dim`` consecutive input
    weights, each stored as ``vq_books`` indices of ``bits`` bits (1..8; so
    ``bits · vq_books / vq_dim`` index bits per weight) into learned float16
    codebooks of 2**bits entries (summed: residual codebooks),
    one codebook set per tile of ``vq_rows`` rows × ``vq_cols`` columns (None:
    the whole height / width), one float16 scale per row and group of
    ``group_size`` input columns (None: per row).  The vq_* fields are left out of the JSON
    of other formats, so their recipes read exactly as before.
    """

    fmt: str = "int"
    bits: int = 4
    group_size: int | None = 128
    sym: bool = False
    dtype: str = "float16"
    in_scale: bool = False
    vq_dim: int = 0
    vq_books: int = 1
    vq_rows: int | None = None
    vq_cols: int | None = None

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise LeanqError(f"unknown format {self.fmt!r}; choose one of {', '.join(FORMATS)}")
        if self.fmt == "vq":
            _check_vq(self)
        elif (self.vq_dim, self.vq_books, self.vq_rows, self.vq_cols) != (0, 1, None, None):
            raise LeanqError("vq_dim, vq_books, vq_rows and vq_cols apply to fmt='vq' only")
        if self.fmt == "int":
            if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
                raise LeanqError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
            if self.group_size is not None and (not isinstance(self.group_size, int) or not 8 <= self.group_size <= MAX_DIM or self.group_size % 8):
                raise LeanqError(f"group size must be a positive multiple of 8 (or none for per-channel), got {self.group_size!r}")
        if self.fmt == "nf4":
            if self.bits != 4:
                raise LeanqError(f"nf4 stores 4-bit codes, got bits={self.bits!r}")
            if self.group_size is not None and (not isinstance(self.group_size, int) or not 8 <= self.group_size <= MAX_DIM or self.group_size % 8):
                raise LeanqError(f"nf4 block size must be a positive multiple of 8 (or none for per-row), got {self.group_size!r}")
        if self.fmt in ("fp8", "w8a8") and (self.bits != 8 or self.group_size is not None or not self.sym):
            raise LeanqError(f"{self.fmt} is 8-bit, symmetric, one scale per output row (bits=8, group_size=None, sym=True)")
        if self.in_scale and self.fmt != "int":
            raise LeanqError("in_scale applies to fmt='int' only")
        if self.dtype not in FLOAT_DTYPES:
            raise LeanqError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, got {self.dtype!r}")

    def describe(self) -> str:
        if self.fmt == "vq":
            tile = f"{self.vq_rows or 'all'}x{self.vq_cols or 'all'}"
            g = "per-row" if self.group_size is None else f"g{self.group_size}"
            return f"vq d{self.vq_dim} {self.bits}-bit x{self.vq_books} tile {tile} scales {g}"
        if self.fmt == "float":
            return self.dtype
        if self.fmt == "nf4":
            return f"nf4 block {self.group_size or 'per-row'}"
        if self.fmt in ("fp8", "w8a8"):
            return {"fp8": "fp8 e4m3 per-channel", "w8a8": "int8 weights + dynamic int8 activations"}[self.fmt]
        g = "per-channel" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits} {g} {'sym' if self.sym else 'asym'}{' +in_scale' if self.in_scale else ''}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.fmt != "vq":  # defaults, validated above: keep other formats' JSON as it was
            for k in ("vq_dim", "vq_books", "vq_rows", "vq_cols"):
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantSpec":
        return cls(**_checked_fields(cls, d, "quant spec"))


TRAINED_METHODS = ("learned", "qat")  # methods that optimise their values (leanq.learned, leanq.qat)
TRAINED_FIELDS = ("steps", "lr", "scale_lr", "init", "lora_rank", "train_batch", "target")


@dataclass(frozen=True)
class MethodConfig:
    """How the integer values are chosen.

    name: the registered method ("rtn", "gptq", ...).
    damp: GPTQ's dampening, as a fraction of the mean Hessian diagonal.
    block_size: GPTQ's lazy-update block width.
    act_order: GPTQ processes columns by decreasing Hessian diagonal; group
        parameters are then fixed up front from the original weights ("static
        groups") so the stored layout stays plain contiguous groups.
    mse_clip: search a clipping ratio per group that minimises the squared
        rounding error, instead of plain min/max scaling.
    refit: after GPTQ has fixed the codes, re-solve each row's group scales by
        least squares under the Hessian (zero points stay integers).
    nsamples, seqlen, seed: the calibration set (sequences of seqlen tokens).
    smooth: SmoothQuant migration strength alpha for w8a8 (0 = no smoothing).
    true_sequential: each linear's calibration inputs come from a block whose
        earlier linears are already quantized (one forward pass per block,
        :mod:`leanq.relay`); False: every linear of a block sees the float
        block's activations (two passes per block, less memory).  Recipes
        written before this field existed were made the False way.
    steps, lr, scale_lr, init, lora_rank, train_batch: the trained methods
        (leanq.learned, leanq.qat): optimisation steps (per block for "learned",
        in all for "qat"), the learning rate of the rounding offsets / latent
        weights and of the clipping / step sizes, the method that gives the
        starting point, LoRA rank (0 = off), sequences per step, and learned
        PTQ's block targets ("float": the float model's activations, "same":
        the float block on the quantized inputs).  Omitted from
        the JSON of other methods, so their recipes read as before.
    """

    name: str = "rtn"
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    mse_clip: bool = False
    refit: bool = False
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    smooth: float = 0.5
    true_sequential: bool = False
    steps: int = 0
    lr: float = 0.0
    scale_lr: float = 0.0
    init: str = ""
    lora_rank: int = 0
    train_batch: int = 0
    target: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.name not in TRAINED_METHODS:
            for k in TRAINED_FIELDS:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MethodConfig":
        return cls(**_checked_fields(cls, d, "method config"))


@dataclass(frozen=True)
class ModuleRecipe:
    """What was done to one module: its storage spec, method and shape."""

    spec: QuantSpec
    method: str
    in_features: int
    out_features: int
    bias: bool

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "method": self.method, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModuleRecipe":
        d = _checked_fields(cls, d, "module recipe")
        spec = QuantSpec.from_dict(_expect(d["spec"], dict, "spec"))
        for k in ("in_features", "out_features"):
            v = d[k]
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= 1 << 20:
                raise LeanqError(f"module recipe: {k} must be a positive integer, got {v!r}")
        return cls(spec=spec, method=_expect(d["method"], str, "method"), in_features=d["in_features"],
                   out_features=d["out_features"], bias=_expect(d["bias"], bool, "bias"))


@dataclass(frozen=True)
class Recipe:
    """Everything needed to rebuild a quantized model from its tensors."""

    source: str
    model_type: str
    method: MethodConfig
    default_spec: QuantSpec
    modules: dict[str, ModuleRecipe] = field(default_factory=dict)
    keep_dtype: str = "float16"
    leanq_version: str = ""
    version: int = RECIPE_VERSION

    def to_json(self) -> str:
        d = {
            "version": self.version,
            "leanq_version": self.leanq_version,
            "source": self.source,
            "model_type": self.model_type,
            "method": self.method.to_dict(),
            "default_spec": self.default_spec.to_dict(),
            "keep_dtype": self.keep_dtype,
            "modules": {k: v.to_dict() for k, v in sorted(self.modules.items())},
        }
        return json.dumps(d, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "recipe") -> "Recipe":
        try:
            # NaN/Infinity literals and floats that overflow to inf are refused; ValueError also
            # covers integers longer than Python's int-string digit limit
            d = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise LeanqError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise LeanqError(f"{where}: expected a JSON object")
        try:
            version = d.get("version")
            if type(version) is not int or version != RECIPE_VERSION:  # true == 1 in Python
                raise LeanqError(f"recipe version {version!r} is not supported (this leanq reads version {RECIPE_VERSION})")
            mods = _expect(d.get("modules"), dict, "modules")
            if d.get("keep_dtype") not in FLOAT_DTYPES:
                raise LeanqError(f"keep_dtype must be one of {', '.join(FLOAT_DTYPES)}")
            return cls(
                source=_expect(d.get("source"), str, "source"),
                model_type=_expect(d.get("model_type"), str, "model_type"),
                method=MethodConfig.from_dict(_expect(d.get("method"), dict, "method")),
                default_spec=QuantSpec.from_dict(_expect(d.get("default_spec"), dict, "default_spec")),
                modules={_expect(k, str, "module name"): ModuleRecipe.from_dict(_expect(v, dict, repr(k))) for k, v in mods.items()},
                keep_dtype=d["keep_dtype"],
                leanq_version=_expect(d.get("leanq_version", ""), str, "leanq_version"),
                version=version,
            )
        except LeanqError as e:
            raise LeanqError(f"{where}: {e}") from None


def _check_vq(s: QuantSpec) -> None:
    """Bounds of a vector-quantized spec (indices are packed with at most 8 bits)."""
    def pos(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_DIM

    if not pos(s.vq_dim) or s.vq_dim > 8:
        raise LeanqError(f"vq: vector length vq_dim must be 1..8, got {s.vq_dim!r}")
    if not pos(s.bits) or s.bits > 8:
        raise LeanqError(f"vq: index bits must be 1..8, got bits={s.bits!r}")
    if not pos(s.vq_books) or s.vq_books > 4:
        raise LeanqError(f"vq: vq_books (residual codebooks) must be 1..4, got {s.vq_books!r}")
    for k in ("vq_rows", "vq_cols", "group_size"):
        v = getattr(s, k)
        if v is not None and (not pos(v) or (k != "vq_rows" and v % s.vq_dim)):
            raise LeanqError(f"vq: {k} must be none or a positive{' multiple of vq_dim' if k != 'vq_rows' else ''} "
                             f"integer, got {v!r}")


def _expect(v: Any, typ: type, what: str) -> Any:
    if not isinstance(v, typ):
        raise LeanqError(f"{what}: expected {typ.__name__}, got {type(v).__name__}")
    return v


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number leanq accepts")


def _finite_float(text: str) -> float:
    v = float(text)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:20]} overflows")
    return v


def _checked_fields(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    """Reject unknown keys and wrongly typed values before building a dataclass."""
    if not isinstance(d, dict):
        raise LeanqError(f"{what}: expected a JSON object")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise LeanqError(f"{what}: unknown field(s) {', '.join(sorted(map(repr, unknown)))}")  # repr: names may hold newlines
    missing = [f.name for f in names.values()
               if f.name not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise LeanqError(f"{what}: missing field(s) {', '.join(missing)}")
    simple = {"int": int, "float": (int, float), "bool": bool, "str": str}
    for k, v in d.items():
        t = str(names[k].type).replace(" ", "")
        if t == "int|None":
            ok = v is None or (isinstance(v, int) and not isinstance(v, bool))
        elif t in simple:
            ok = isinstance(v, simple[t]) and (t == "bool" or not isinstance(v, bool))
        else:
            ok = True  # nested objects are checked by their own from_dict
        if not ok:
            raise LeanqError(f"{what}: field {k!r} has the wrong type ({type(v).__name__})")
    return d
