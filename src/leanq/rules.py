"""Pattern rules: which modules stay float and which get their own storage spec.

Two kinds of rule, both written as comma-separated lists on the command line:

* ``--keep 'lm_head,*.layers.0.*'``: modules whose full name matches one of the
  patterns are not quantized at all (they stay float, saved in ``keep_dtype``).
* ``--override '*.down_proj=8,*.v_proj=4:g64'``: ``PATTERN=SPEC`` pairs, where
  SPEC is ``BITS[:gSIZE|:gnone][:sym|:asym]`` (an integer format) or one of
  ``float16``/``fp16``/``bfloat16``/``bf16`` (kept float inside a QuantLinear).
  Fields left out are taken from the default spec (``--bits/--group-size/--sym``),
  so ``'*.down_proj=8'`` with the default ``4-bit g128 asym`` means int8 g128 asym.

Patterns are shell globs (:mod:`fnmatch`) on the full module name, e.g.
``model.layers.3.mlp.down_proj``; ``*`` also matches dots.

Precedence (documented, tested):

1. ``keep`` wins over every override: a kept module is never quantized.
2. Among overrides, the **last** matching rule wins, like later command-line
   options overriding earlier ones.  "Most specific" is not used because the
   specificity of two globs is not well defined (``*.layers.1*`` vs ``*.mlp.*``).
3. A module no rule matches gets the default spec (or the planner's choice).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, replace

from .config import QuantSpec
from .errors import LeanqError

_FLOATS = {"float16": "float16", "fp16": "float16", "f16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def split_list(text: str | None) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c')."""
    if not text:
        return ()
    return tuple(p.strip() for p in text.split(",") if p.strip())


def parse_spec(text: str, default: QuantSpec) -> QuantSpec:
    """``BITS[:gSIZE|:gnone][:sym|:asym]`` or a float dtype name -> QuantSpec.

    Unspecified fields come from ``default``; a malformed text raises one LeanqError.
    """
    t = text.strip().lower()
    if t in _FLOATS:
        return QuantSpec(fmt="float", bits=default.bits, group_size=default.group_size, sym=default.sym,
                         dtype=_FLOATS[t])
    parts = t.split(":")
    if not re.fullmatch(r"\d+", parts[0]):
        raise LeanqError(f"spec {text!r}: expected BITS[:gSIZE|:gnone][:sym], e.g. 4:g64 or 8:gnone:sym, or float16")
    bits = int(parts[0])
    group, sym = default.group_size, default.sym
    seen: set[str] = set()
    for p in parts[1:]:
        key = "g" if p.startswith("g") else p
        if key in seen or (key in ("sym", "asym") and ({"sym", "asym"} & seen)):
            raise LeanqError(f"spec {text!r}: {p!r} given twice")
        seen.add(key)
        if p in ("gnone", "gchannel"):
            group = None
        elif re.fullmatch(r"g\d+", p):
            group = int(p[1:])
        elif p == "sym":
            sym = True
        elif p == "asym":
            sym = False
        else:
            raise LeanqError(f"spec {text!r}: unknown field {p!r} (use gSIZE, gnone, sym or asym)")
    base = default if default.fmt == "int" else QuantSpec()
    return replace(base, fmt="int", bits=bits, group_size=group, sym=sym)


@dataclass(frozen=True)
class Rules:
    """Parsed keep patterns and ordered (pattern, spec) overrides."""

    keep: tuple[str, ...] = ()
    overrides: tuple[tuple[str, QuantSpec], ...] = ()

    def is_kept(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.keep)

    def spec_for(self, name: str) -> QuantSpec | None:
        """The override for ``name`` (last matching rule wins), None when no rule matches.

        Kept modules return None too: they never reach the quantizer.
        """
        if self.is_kept(name):
            return None
        hit = None
        for pat, spec in self.overrides:
            if fnmatch.fnmatchcase(name, pat):
                hit = spec
        return hit

    __call__ = spec_for  # usable directly as pipeline.quantize_blocks(overrides=...)

    def describe(self) -> list[str]:
        out = [f"keep {p}" for p in self.keep]
        out += [f"{p} = {s.describe()}" for p, s in self.overrides]
        return out


def parse_rules(keep: str | tuple[str, ...] | None, overrides: str | tuple[str, ...] | None,
                default: QuantSpec) -> Rules:
    """Build :class:`Rules` from CLI text (comma lists) or tuples of items."""
    keep_t = split_list(keep) if isinstance(keep, str) or keep is None else tuple(keep)
    items = split_list(overrides) if isinstance(overrides, str) or overrides is None else tuple(overrides)
    parsed = []
    for item in items:
        pat, eq, spec = item.partition("=")
        if not eq or not pat.strip() or not spec.strip():
            raise LeanqError(f"override {item!r}: expected PATTERN=SPEC, e.g. '*.down_proj=8' or '*.v_proj=4:g64'")
        parsed.append((pat.strip(), parse_spec(spec, default)))
    return Rules(keep_t, tuple(parsed))
