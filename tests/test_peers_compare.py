"""The peer table's leanq rows and verdict (benchmarks/peers/compare.py): pure, no peer library, no torch."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks/peers"))
import compare  # noqa: E402


def row(lib, ppl, bpw, setting="4-bit", status="ok", method=None):
    return {"key": f"{lib}-{method or ppl}", "setting": setting, "library": lib, "method": method or f"m{ppl}",
            "ppl": ppl, "bpw": bpw, "status": status}


def pending(lib, setting="4-bit"):
    return {"key": f"{lib}-p", "setting": setting, "library": lib, "method": "p", "status": "pending"}


def test_leanq_wins_against_every_peer_at_same_or_more_bits():
    rows = [row("leanq", 26.8, 4.21), row("leanq", 27.3, 4.19), row("a", 28.3, 4.27), row("b", 30.8, 4.5),
            row("c", 33.1, 4.21), row("-", 24.3, 32, setting="FP32")]
    v = compare.verdict(rows, "4-bit")
    assert v["status"] == "holds"
    assert v["best"]["ppl"] == 26.8
    assert [r["ppl"] for r in v["compared"]] == [28.3, 30.8, 33.1]  # same bpw (4.21) is compared
    assert v["losses"] == [] and v["fewer_bits"] == [] and v["pending"] == []
    t = compare.verdict_text(v)
    assert "**4-bit: holds.**" in t and "(strongest: a m28.3: 28.30 at 4.270 bpw, leanq -5.3%)" in t


def test_leanq_loses_to_a_peer_with_more_bits_even_with_rows_pending():
    rows = [row("leanq", 24.39, 8.023, "8-bit"), row("torchao", 24.36, 8.035, "8-bit"), pending("quanto", "8-bit")]
    v = compare.verdict(rows, "8-bit")
    assert v["status"] == "does not hold"  # a measured loss does not wait for the pending rows
    assert [r["library"] for r in v["losses"]] == ["torchao"]
    assert "Not lower than" in compare.verdict_text(v)


def test_equal_ppl_is_not_a_win():
    v = compare.verdict([row("leanq", 30.0, 3.2), row("p", 30.0, 3.3)], "4-bit")
    assert v["status"] == "does not hold"


def test_pending_peer_blocks_the_claim():
    rows = [row("leanq", 29.9, 3.17, "3-bit"), row("hqq", 600.0, 3.2, "3-bit"), pending("llmc", "3-bit"),
            {**pending("x", "3-bit"), "status": "error", "note": "boom"}]
    v = compare.verdict(rows, "3-bit")
    assert v["status"] == "pending"
    assert {r["library"] for r in v["pending"]} == {"llmc", "x"}
    t = compare.verdict_text(v)
    assert "pending: llmc p; x p (failed; to re-run)." in t


def test_peer_with_fewer_bits_is_listed_not_compared():
    rows = [row("leanq", 26.8, 4.21), row("cheap", 25.0, 4.10), row("dear", 30.0, 4.5)]
    v = compare.verdict(rows, "4-bit")
    assert v["status"] == "holds"  # the 25.0 row has fewer bits: out of the comparison
    assert [r["library"] for r in v["fewer_bits"]] == ["cheap"]
    assert [r["library"] for r in v["compared"]] == ["dear"]
    t = compare.verdict_text(v)
    assert "fewer bits (not compared): cheap m25.0: 25.00 at 4.100 bpw" in t
    assert "lower ppl than leanq's best: cheap m25.0" in t  # said, not hidden


def test_not_available_rows_and_no_leanq_row():
    rows = [row("leanq", 48.0, 2.3, "2-bit"), {**pending("quanto", "2-bit"), "status": "not available"}]
    v = compare.verdict(rows, "2-bit")
    assert v["status"] == "holds" and [r["library"] for r in v["unavailable"]] == ["quanto"]
    assert "No measured peer row" in compare.verdict_text(v)
    # a leanq row that failed to load is not a best row
    v = compare.verdict([{**row("leanq", 1.0, 2.3, "2-bit"), "status": "error"}, row("p", 50.0, 2.5, "2-bit")], "2-bit")
    assert v["status"] == "no leanq row"


def _write(tmp_path, data):
    p = tmp_path / "r.json"
    p.write_text(json.dumps(data))
    return {"key": "k", "setting": "4-bit", "method": "GPTQ", "groups": "g128", "source": "r.json", "row": "g4"}


def test_load_leanq_row_reads_the_file(tmp_path):
    rec = {"ppl": 27.3, "bits_per_weight": 4.1875, "windows": 48, "window": 1024, "tokens_scored": 49104,
           "quant_seconds": 354.2, "machine": "CPU (2 cores); torch 2.13.0+cpu",
           "command": "leanq quantize m --method gptq --out g4; leanq eval g4 --max-windows 48"}
    spec = _write(tmp_path, {"g4": rec})
    r = compare.load_leanq_row(spec, tmp_path)
    assert r["status"] == "ok" and r["library"] == "leanq" and r["ppl"] == 27.3 and r["bpw"] == 4.1875
    assert "`r.json` [g4], CPU (2 cores), quantized in 354 s" in r["note"]
    r = compare.load_leanq_row({**spec, "flags": "--two-pass", "why": "old"}, tmp_path)
    assert r["command"].startswith("leanq quantize m --method gptq --two-pass --out g4;")
    assert "(--two-pass: old)" in r["note"]


def test_load_leanq_row_learned_file_and_protocol_check(tmp_path):
    spec = _write(tmp_path, {"g4": {"ppl_test": 29.9, "bits_per_weight": 3.17, "windows": 48, "smoke": False,
                                    "command": "c --out x"}})
    assert compare.load_leanq_row(spec, tmp_path)["ppl"] == 29.9
    spec = _write(tmp_path, {"g4": {"ppl": 20.0, "bits_per_weight": 4.0, "windows": 16, "command": "c --out x"}})
    r = compare.load_leanq_row(spec, tmp_path)
    assert r["status"] == "error" and "windows 16 (want 48)" in r["note"]
    assert compare.load_leanq_row({**spec, "row": "nope"}, tmp_path)["status"] == "error"
    assert compare.load_leanq_row({**spec, "source": "missing.json"}, tmp_path)["status"] == "error"


def test_every_leanq_row_of_the_peer_table_loads_from_its_recorded_file():
    import run_peers

    rows = compare.load_leanq_rows(run_peers.LEANQ_ROWS, ROOT)
    bad = [(r["key"], r["note"]) for r in rows if r["status"] != "ok"]
    assert not bad
    assert {r["setting"] for r in rows} >= {"8-bit", "4-bit", "3-bit", "2-bit"}
    assert len({r["key"] for r in rows}) == len(rows)
    by = {r["key"]: r for r in rows}
    assert by["leanq-awqgptq4"]["ppl"] == pytest.approx(26.80, abs=0.005)
    assert by["leanq-qat3"]["ppl"] == pytest.approx(29.91, abs=0.005)
    assert by["leanq-qat2"]["ppl"] == pytest.approx(48.15, abs=0.005)


def test_table_ratio_of_a_collapsed_row_is_readable():
    import bpw

    t = bpw.markdown_table([row("leanq", 78318.0, 2.3, "2-bit")], 24.34)
    assert "| 78,318 | 3,218 |" in t
