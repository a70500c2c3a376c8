"""The CLI end to end on a tiny model, and one clear line for each bad input."""

import json
import subprocess
import sys

import pytest
import torch

from leanq.cli import main


def run(capsys, *args):
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_quantize_eval_info_generate(tiny_hf_folder, text_file, tmp_path, capsys):
    out = tmp_path / "q"
    rc, o, e = run(capsys, "quantize", str(tiny_hf_folder), "--method", "gptq", "--bits", "4", "--group-size", "32",
                   "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "--out", str(out), "--device", "cpu")
    assert rc == 0, e
    assert "bits per weight" in o and (out / "leanq.json").is_file()

    rc, o, e = run(capsys, "eval", str(out), "--data", str(text_file), "--window", "32", "--max-windows", "3",
                   "--json", "--baseline", str(tiny_hf_folder), "--device", "cpu")
    assert rc == 0, e
    r = json.loads(o)
    for k in ("ppl", "bits_per_weight", "bytes_on_disk", "bytes_in_memory", "seconds", "ppl_ratio"):
        assert k in r
    assert r["tokens_scored"] == 3 * 31 and r["ppl"] > 1 and 4 < r["bits_per_weight"] < 5

    rc, o, e = run(capsys, "info", str(out), "--kernels")
    # the kernels listed are those of the GPU when there is one
    kernel = "kernels on cuda" if torch.cuda.is_available() else "reference-int"
    assert rc == 0 and "gptq" in o and "int4 g32 asym" in o and kernel in o
    # GPTQ's refinements are on by default and recorded in the recipe
    assert "act_order=True" in o and "mse_clip=True" in o

    rc, o, e = run(capsys, "generate", str(out), "--prompt", "The quick", "--max-new-tokens", "5", "--device", "cpu")
    assert rc == 0 and o.startswith("The quick")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_generate_on_a_gpu_releases_the_integer_layers(tiny_hf_folder, tmp_path, capsys, monkeypatch, graph):
    """On a GPU, generate hands the 4-bit layers to the CUDA kernels (their decoder layers folded) before decoding,
    eagerly and through leanq.hf_graph."""
    from leanq.kernels import cuda_int

    out = tmp_path / "q"
    rc, _, e = run(capsys, "quantize", str(tiny_hf_folder), "--method", "rtn", "--bits", "4", "--group-size", "32",
                   "--out", str(out), "--device", "cpu")
    assert rc == 0, e
    freed, release = [], cuda_int.release_stored_rk
    monkeypatch.setattr(cuda_int, "release_stored_rk", lambda m, **kw: freed.append(release(m, **kw)) or freed[-1])
    rc, o, e = run(capsys, "generate", str(out), "--prompt", "The quick", "--max-new-tokens", "5", "--device", "cuda",
                   *(["--graph"] if graph else []))
    assert rc == 0, e
    assert o.startswith("The quick") and freed and freed[0] > 0


BAD = [
    (["quantize", "no/such/model", "--out", "x"], "no such file or folder"),
    (["eval", "no/such/dir"], "no such file or folder"),
    (["info", "."], "leanq.json: missing"),
    (["quantize", "{folder}", "--bits", "9", "--out", "{tmp}/o"], "bits must be"),
    (["quantize", "{folder}", "--group-size", "12", "--out", "{tmp}/o"], "group size"),
    (["quantize", "{folder}", "--method", "gptq", "--calib", "{tmp}/none.txt", "--out", "{tmp}/o"], "no such file"),
    (["eval", "{folder}", "--data", "{tmp}/none.txt"], "no such file"),
    (["eval", "{folder}", "--data", "{tmp}/empty.txt"], "empty"),
    (["eval", "{folder}", "--data", "{tmp}/binary.txt"], "not UTF-8"),
    (["eval", "{folder}", "--data", "{text}", "--window", "100000"], "fewer than one window"),
    (["quantize", "{tmp}/model.gguf", "--out", "{tmp}/o"], "not a GGUF file"),
]


@pytest.mark.parametrize("args,msg", BAD, ids=[m for _, m in BAD])
def test_bad_input_one_line(args, msg, tiny_hf_folder, text_file, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00abc")
    (tmp_path / "model.gguf").write_bytes(b"NOPE" + b"\0" * 64)
    fmt = dict(folder=tiny_hf_folder, tmp=tmp_path, text=text_file)
    rc, o, e = run(capsys, *[a.format(**fmt) for a in args], "--device", "cpu") if args[0] in ("quantize", "eval") \
        else run(capsys, *args)
    assert rc == 2
    lines = e.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("leanq: error:") and msg in lines[0], e
    assert not (tmp_path / "o").exists()


def test_missing_data_says_how_to_provide(tiny_hf_folder, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LEANQ_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import leanq.data as data

    monkeypatch.setattr(data, "data_roots", lambda: [tmp_path])
    rc, o, e = run(capsys, "eval", str(tiny_hf_folder), "--device", "cpu")
    assert rc == 2 and "LEANQ_DATA" in e and "WikiText-2" in e


def test_help_teaches():
    r = subprocess.run([sys.executable, "-m", "leanq", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "examples:" in r.stdout and "quantize" in r.stdout
    r = subprocess.run([sys.executable, "-m", "leanq", "quantize", "--help"], capture_output=True, text=True)
    assert "--group-size" in r.stdout and "gptq" in r.stdout


def test_training_settings_on_an_untrained_method_are_refused(tiny_hf_folder, tmp_path, capsys):
    from leanq.cli import main

    rc = main(["quantize", str(tiny_hf_folder), "--method", "gptq", "--init", "vq", "--out", str(tmp_path / "o")])
    assert rc != 0 and not (tmp_path / "o").exists()
    assert "--init applies to the trained methods" in capsys.readouterr().err
