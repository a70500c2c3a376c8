"""leanq's recorded rows beside the peers', and the verdict per setting (pure: json only, no torch).

leanq's rows are not re-run by the peer command (they need a GPU); they are read at table time
from the result files leanq's own benchmark scripts wrote (benchmarks/quality/results/*.json), on
the same protocol. Each row spec names the file and the row inside it, so every number in the
table comes from that file.

Verdict rule (issue 3): at a setting, leanq's best row (lowest ppl) must have lower ppl than every
peer row whose bpw is the same or higher. Peer rows with fewer bits are listed apart (they are
not in the comparison); peer rows without a result yet (pending, or failed and to be re-run)
make the verdict "pending" unless leanq already loses to a measured row.
"""

from __future__ import annotations

import json
from pathlib import Path

from bpw import fmt_ppl

OURS = "leanq"
# the core protocol: wiki.test.raw, 1024-token windows, first 48 (49,104 predictions)
PROTOCOL = {"windows": 48, "window": 1024, "tokens_scored": 49104}
UNRESOLVED = ("pending", "error")  # a peer row with no result yet
EPS = 1e-9  # bpw equality tolerance ("same or higher bits per weight")


# ---- leanq's recorded rows --------------------------------------------------------------------

def _with_flags(command: str, flags: str) -> str:
    """Insert extra ``leanq quantize`` flags before its ``--out``."""
    if not flags:
        return command
    if " --out " not in command:
        raise ValueError(f"no --out in {command!r}")
    return command.replace(" --out ", f" {flags} --out ", 1)


def load_leanq_row(spec: dict, repo: Path) -> dict:
    """One leanq row from a recorded result file.

    ``spec``: key, setting, method, groups, source (path from the repository root), row (the
    row's name in that file); optional ``flags`` (quantize flags the recorded command omits,
    with ``why``). Returns a table row (the dicts markdown_table takes) with status "ok", or
    "error" and a note when the file or row is missing or was not measured on the core protocol.
    """
    rec = {"key": spec["key"], "setting": spec["setting"], "library": OURS, "method": spec["method"],
           "groups": spec.get("groups"), "status": "ok", "note": "", "source": spec["source"], "row": spec["row"]}
    path = Path(repo) / spec["source"]
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        rec.update(status="error", note=f"cannot read {spec['source']}: {type(e).__name__}")
        return rec
    r = data.get(spec["row"])
    if r is None and data.get("model") == spec["row"]:  # a file holding one row
        r = data
    if not isinstance(r, dict):
        rec.update(status="error", note=f"no row {spec['row']!r} in {spec['source']}")
        return rec
    ppl = r.get("ppl", r.get("ppl_test"))  # learned_gpu.py calls the windows 1-48 figure ppl_test
    bad = [f"{k} {r[k]} (want {v})" for k, v in PROTOCOL.items() if k in r and r[k] != v]
    if "windows" not in r:
        bad.append("windows not recorded")
    if r.get("smoke"):
        bad.append("a smoke run")
    if ppl is None or r.get("bits_per_weight") is None:
        bad.append("no ppl or bits_per_weight")
    cmd = _with_flags(r.get("command") or "", spec.get("flags", ""))
    machine = r.get("machine") or "?"
    rec.update(ppl=ppl, bpw=r.get("bits_per_weight"), command=cmd, machine=machine,
               device=machine.split(";")[0].strip(), leanq_quant_s=r.get("quant_seconds"))
    if bad:
        rec.update(status="error", note=f"{spec['source']} [{spec['row']}] is not the core protocol: " + ", ".join(bad))
        return rec
    q = r.get("quant_seconds")
    t = f", quantized in {q:.0f} s" if q and q >= 1 else (f", quantized in {q:.1f} s" if q else "")
    note = f"recorded: `{spec['source'].rsplit('/', 1)[-1]}` [{spec['row']}], {rec['device']}{t}; `{cmd}`"
    if spec.get("flags"):
        note += f" ({spec['flags']}: {spec.get('why', 'the recorded command omits it')})"
    rec["note"] = note
    return rec


def load_leanq_rows(specs: list[dict], repo: Path) -> list[dict]:
    return [load_leanq_row(s, repo) for s in specs]


# ---- verdict ----------------------------------------------------------------------------------

def _name(r: dict) -> str:
    return f"{r['library']} {r['method']}"


def _desc(r: dict) -> str:
    bpw = f"{r['bpw']:.3f}" if r.get("bpw") is not None else "?"
    return f"{_name(r)}: {fmt_ppl(r.get('ppl'))} at {bpw} bpw"


def verdict(rows: list[dict], setting: str, ours: str = OURS) -> dict:
    """Does leanq's best row at ``setting`` have lower ppl than every peer row at the same or higher bpw?

    Returns a dict: setting; status ("holds", "does not hold", "pending", "no leanq row"); best (leanq's
    row); compared (peer rows with bpw >= best's, by ppl); losses (those whose ppl is not higher than
    best's); pending (peer rows with no result yet); fewer_bits (peer rows with bpw < best's, not
    compared); unavailable (rows a library cannot produce). Peer rows are every row of the setting
    whose library is neither ``ours`` nor "-".
    """
    at = [r for r in rows if r.get("setting") == setting]
    mine = [r for r in at if r.get("library") == ours and r.get("status", "ok") == "ok" and r.get("ppl") is not None]
    peers = [r for r in at if r.get("library") not in (ours, "-", None)]
    out = {"setting": setting, "best": None, "compared": [], "losses": [], "fewer_bits": [],
           "pending": [r for r in peers if r.get("status") in UNRESOLVED],
           "unavailable": [r for r in peers if r.get("status") not in UNRESOLVED + ("ok",)]}
    if not mine:
        out["status"] = "no leanq row"
        return out
    best = min(mine, key=lambda r: (r["ppl"], r.get("bpw") or 0.0))
    out["best"] = best
    done = [r for r in peers if r.get("status", "ok") == "ok" and r.get("ppl") is not None]
    for r in done:
        # a peer row of unknown bpw is compared (it might have more bits)
        if r.get("bpw") is not None and best.get("bpw") is not None and r["bpw"] < best["bpw"] - EPS:
            out["fewer_bits"].append(r)
        else:
            out["compared"].append(r)
    out["compared"].sort(key=lambda r: r["ppl"])
    out["fewer_bits"].sort(key=lambda r: r["ppl"])
    out["losses"] = [r for r in out["compared"] if not best["ppl"] < r["ppl"]]
    if out["losses"]:
        out["status"] = "does not hold"
    elif out["pending"]:
        out["status"] = "pending"
    else:
        out["status"] = "holds"
    return out


def verdict_text(v: dict) -> str:
    """One markdown paragraph for a verdict() result."""
    s = v["setting"]
    if v["status"] == "no leanq row":
        return f"- **{s}: no leanq row** to compare."
    b = v["best"]
    head = f"- **{s}: {v['status']}.** leanq's best: {b['method']}, ppl {fmt_ppl(b['ppl'])} at {b['bpw']:.3f} bpw."
    parts = [head]
    if v["losses"]:
        parts.append(f"Not lower than (peer rows at >= {b['bpw']:.3f} bpw): " + "; ".join(_desc(r) for r in v["losses"]) + ".")
    wins = [r for r in v["compared"] if r not in v["losses"]]
    if wins:
        strongest = wins[0]
        gap = (b["ppl"] / strongest["ppl"] - 1) * 100
        parts.append(f"Lower than the {len(wins)} measured peer row(s) at >= {b['bpw']:.3f} bpw "
                     f"(strongest: {_desc(strongest)}, leanq {gap:+.1f}%): " + "; ".join(_desc(r) for r in wins) + ".")
    elif not v["losses"]:
        parts.append(f"No measured peer row at >= {b['bpw']:.3f} bpw yet.")
    if v["pending"]:
        parts.append("pending: " + "; ".join(
            _name(r) + (" (failed; to re-run)" if r.get("status") == "error" else "") for r in v["pending"]) + ".")
    if v["fewer_bits"]:
        lower = [r for r in v["fewer_bits"] if r["ppl"] < b["ppl"]]
        parts.append("Peer rows with fewer bits (not compared): " + "; ".join(_desc(r) for r in v["fewer_bits"])
                     + (f" — of which lower ppl than leanq's best: {'; '.join(_name(r) for r in lower)}" if lower else "")
                     + ".")
    if v["unavailable"]:
        parts.append("Not available: " + "; ".join(
            _name(r) + ("" if r.get("status") == "not available" else f" ({r['status']})") for r in v["unavailable"]) + ".")
    return " ".join(parts)
