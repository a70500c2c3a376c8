"""Interrupted quantization: SIGKILL a real `leanq quantize` at a block, resume, same bytes; bad states refused."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_model, tiny_tokenizer
from leanq.checkpoint import RECIPE, WEIGHTS
from leanq.resume import STATE_FILE, state_folder_for

LAYERS = 4


@pytest.fixture
def folder4(tmp_path: Path) -> Path:
    """A tiny random Llama of LAYERS blocks as a Hugging Face folder."""
    d = tmp_path / "tiny4"
    tok = tiny_tokenizer()
    tiny_model("llama", vocab_size=len(tok), num_hidden_layers=LAYERS).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


def quantize(model: Path, text: Path, out: Path, *extra: str, kill_after: int | None = None, method="gptq",
             bits="3") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LEANQ_KILL_AFTER_BLOCK"}
    if kill_after is not None:
        env["LEANQ_KILL_AFTER_BLOCK"] = str(kill_after)
    cmd = [sys.executable, "-m", "leanq", "quantize", str(model), "--method", method, "--bits", bits,
           "--group-size", "32", "--calib", str(text), "--nsamples", "6", "--seqlen", "32", "--device", "cpu",
           "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def in_process(capsys, model: Path, text: Path, out: Path, *extra: str, method="gptq", bits="3"):
    """The same command through leanq.cli.main (no kill needed): (rc, last stderr line)."""
    from leanq.cli import main

    rc = main(["quantize", str(model), "--method", method, "--bits", bits, "--group-size", "32", "--calib",
               str(text), "--nsamples", "6", "--seqlen", "32", "--device", "cpu", "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    return rc, err.splitlines()[-1] if err else ""


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_kill_at_a_random_block_then_resume_gives_the_same_bytes(folder4, text_file, tmp_path, method="gptq"):
    whole = tmp_path / "whole"
    r = quantize(folder4, text_file, whole, method=method)
    assert r.returncode == 0, r.stderr
    assert not state_folder_for(whole).exists()  # removed once the checkpoint is in place

    k = random.Random(method).randrange(LAYERS - 1)  # a block that is not the last
    out = tmp_path / "cut"
    r = quantize(folder4, text_file, out, kill_after=k, method=method)
    assert r.returncode == -signal.SIGKILL
    assert not out.exists()  # no partial checkpoint at the output path
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cut")]
    st = json.loads((state_folder_for(out) / STATE_FILE).read_text())
    assert st["next_block"] == k + 1

    # without --resume the state is not silently thrown away
    r = quantize(folder4, text_file, out, method=method)
    assert r.returncode != 0 and "--resume" in r.stderr and "Traceback" not in r.stderr
    assert state_folder_for(out).exists()

    r = quantize(folder4, text_file, out, "--resume", method=method)
    assert r.returncode == 0, r.stderr
    assert f"{k + 1}/{LAYERS}" in r.stderr  # the progress bar starts at the resumed block
    assert files(out) == files(whole)
    assert not state_folder_for(out).exists()


def test_killed_twice_and_a_resume_with_nothing_to_resume(folder4, text_file, tmp_path, capsys):
    m = "awq+gptq"  # its per-channel scales travel through the state too
    whole = tmp_path / "whole"
    assert in_process(capsys, folder4, text_file, whole, "--resume", method=m)[0] == 0  # no state: a plain run
    out = tmp_path / "cut"
    assert quantize(folder4, text_file, out, kill_after=0, method=m).returncode == -signal.SIGKILL
    assert quantize(folder4, text_file, out, "--resume", kill_after=2, method=m).returncode == -signal.SIGKILL
    assert json.loads((state_folder_for(out) / STATE_FILE).read_text())["next_block"] == 3
    assert in_process(capsys, folder4, text_file, out, "--resume", method=m)[0] == 0
    assert files(out) == files(whole)


def test_resume_refuses_other_settings_and_damaged_states(folder4, text_file, tmp_path, capsys):
    out = tmp_path / "cut"
    assert quantize(folder4, text_file, out, kill_after=1).returncode == -signal.SIGKILL
    st = state_folder_for(out)

    rc, err = in_process(capsys, folder4, text_file, out, "--resume", bits="4")  # other settings
    assert rc == 2 and "other settings" in err

    block = st / "block-000.safetensors"
    good = block.read_bytes()
    block.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # same size, one bit flipped
    rc, err = in_process(capsys, folder4, text_file, out, "--resume")
    assert rc == 2 and "differ" in err
    block.write_bytes(good)

    inputs = next(st.glob("inputs-*.safetensors"))
    data = inputs.read_bytes()
    inputs.write_bytes(data[: len(data) // 2])  # truncated
    rc, err = in_process(capsys, folder4, text_file, out, "--resume")
    assert rc == 2 and "size" in err
    inputs.write_bytes(data)

    sj = st / STATE_FILE
    text = sj.read_text()
    for bad in ("{", "[]", json.dumps({**json.loads(text), "version": 99}),
                json.dumps({**json.loads(text), "next_block": 99}),
                json.dumps({**json.loads(text), "files": {"../x": {"bytes": 1}}})):
        sj.write_text(bad)
        rc, err = in_process(capsys, folder4, text_file, out, "--resume")
        assert rc == 2 and err.startswith("leanq: error") and STATE_FILE in err, err
    sj.write_text(text)
    assert in_process(capsys, folder4, text_file, out, "--resume")[0] == 0
    assert (out / WEIGHTS).is_file() and (out / RECIPE).is_file()


def test_no_state_writes_none_and_existing_output_is_refused_before_work(folder4, text_file, tmp_path, capsys,
                                                                         monkeypatch):
    out = tmp_path / "q"
    monkeypatch.setattr("leanq.resume.BlockState.commit", lambda *a: pytest.fail("a state was written"))
    assert in_process(capsys, folder4, text_file, out, "--no-state")[0] == 0
    assert not state_folder_for(out).exists()
    monkeypatch.setattr("leanq.api.load_float", lambda *a: pytest.fail("the model was loaded"))
    rc, err = in_process(capsys, folder4, text_file, out)
    assert rc == 2 and "already exists" in err


def _json_values():
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-2, 1 << 40) | st.floats(allow_nan=True) | st.text(max_size=12)
    return st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                        max_leaves=12)


def test_state_reader_gives_one_clear_error_for_any_json(tmp_path):
    """Random state.json contents (and random values for each field of a valid one): LeanqError or a valid load."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from leanq.errors import LeanqError
    from leanq.resume import STATE_VERSION, BlockState

    folder = tmp_path / "s.leanq-state"
    folder.mkdir()
    good = {"version": STATE_VERSION, "fingerprint": "k", "next_block": 1, "blocks": 2, "files": {},
            "modules": {"m": {"spec": {"fmt": "int", "bits": 4, "group_size": 32}, "method": "gptq",
                              "in_features": 64, "out_features": 64, "bias": False}}}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(_json_values(), st.sampled_from(sorted(good)).flatmap(
        lambda k: _json_values().map(lambda v: {**good, k: v}))), st.booleans())
    def check(doc, raw):
        (folder / STATE_FILE).write_text(json.dumps(doc) if not raw else json.dumps(doc)[:-1])
        s = BlockState(folder)
        s.key = "k"
        try:
            s.load(2)
        except LeanqError as e:
            assert str(e) and "\n" not in str(e)

    check()
