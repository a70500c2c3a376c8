"""The per-step timeline of benchmarks/decode/profile_decode.py, on synthetic profiler events (no GPU)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "decode"))

import profile_decode as pd  # noqa: E402


def _ev(dev: str, name: str, a: float, b: float):
    return NS(device_type=NS(name=dev), name=name, time_range=NS(start=a, end=b))


def _steps(n: int, host: float = 10.0, pre: bool = True) -> list:
    """n decode steps 100 us apart: a stop check ending ``host`` us before each graph launch (20 us), one eager
    kernel between them, then three kernels (gaps of 5 and 2 us) ending 25 us before the next stop check's end."""
    ev = []
    for i in range(n):
        t = 100.0 * i
        ev.append(_ev("CPU", "cudaStreamSynchronize", t - host - 20, t - host))
        if pre:
            ev.append(_ev("CUDA", "eager", t - host + 1, t - host + 2))
        ev += [_ev("CPU", "cudaGraphLaunch", t, t + 20), _ev("CUDA", "k", t + 5, t + 30),
               _ev("CUDA", "k", t + 35, t + 60), _ev("CUDA", "k", t + 62, t + 65)]
    return ev


def test_timeline_splits_each_step_at_the_stop_check_and_the_launch():
    tl = pd.timeline(_steps(6))
    # the first launch (the prompt's graph) and the last (no next launch) are left out
    assert tl == dict(step=100.0, host_pre=10.0, pre_kernels=1, launch_host=20.0, launch_to_gpu=5.0, span=60.0,
                      busy=53.0, kernels=3, wake=25.0, steps=4)
    assert tl["host_pre"] + tl["launch_to_gpu"] + tl["span"] + tl["wake"] == tl["step"]


def test_timeline_follows_the_host_time_and_skips_steps_without_a_stop_check():
    assert pd.timeline(_steps(6, host=30.0))["host_pre"] == 30.0
    assert pd.timeline(_steps(6, pre=False))["pre_kernels"] == 0
    ev = [e for e in _steps(6) if e.name != "cudaStreamSynchronize"]
    assert pd.timeline(ev)["steps"] == 0


def test_busy_counts_overlapping_kernels_once():
    assert pd.busy_us([(0, 10), (5, 12), (20, 25)]) == 17


def test_attn_variants_set_the_folded_attention_options_and_default_leaves_them(monkeypatch):
    """bench_decode.set_attn_variant: ``default`` keeps the library's settings (the one-op cache advance on),
    ``plain`` turns every option off, '+' joins them, and an unknown name is refused."""
    import bench_decode as bd

    from leanq.kernels import cuda_int as ci
    from leanq.kernels import decode_attention as da

    for mod, name in ((ci, "ADVANCE_ONCE"), (da, "PDL"), (da, "TRIGGER"), (da, "MIN_CHUNK")):
        monkeypatch.setattr(mod, name, getattr(mod, name))
    assert ci.ADVANCE_ONCE and not da.PDL and da.MIN_CHUNK == da.BLOCK_N
    bd.set_attn_variant("default")
    assert ci.ADVANCE_ONCE and not da.PDL
    bd.set_attn_variant("plain")
    assert not ci.ADVANCE_ONCE and not da.PDL and da.MIN_CHUNK == da.BLOCK_N
    bd.set_attn_variant("pdl+once+chunk512")
    assert ci.ADVANCE_ONCE and da.PDL and not da.TRIGGER and da.MIN_CHUNK == 512
    bd.set_attn_variant("trigger")
    assert da.TRIGGER and not da.PDL and not ci.ADVANCE_ONCE
    with pytest.raises(SystemExit):
        bd.set_attn_variant("fast")


def test_read_floor_kernel_reads_every_word_once():
    """benchmarks/kernels/read_floor.py's streaming read (the ceiling it measures only counts if every word is
    read): its per-block sums equal torch's, a partial last block included (Triton's interpreter on the CPU)."""
    pytest.importorskip("triton")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "kernels"))
    import read_floor as rf

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    w = torch.randint(-2 ** 31, 2 ** 31 - 1, (3 * 64 + 17,), dtype=torch.int32,
                      generator=torch.Generator().manual_seed(0)).to(dev)
    out = torch.empty(4, dtype=torch.int32, device=dev)
    got = rf.read_sum(w, out, 64).long() & 0xFFFFFFFF
    assert torch.equal(got, rf.reference(w, 64))
    assert rf.layer_bytes(4096, 11008, 4) == 4096 * 11008 // 2 + 4096 * 86 * 4
    # the persistent form: program p sums blocks p, p + 3, ...; together every word once
    po = torch.empty(3, dtype=torch.int32, device=dev)
    got = rf.read_sum_persistent(w, po, 32, 3, warps=1).long() & 0xFFFFFFFF
    blocks = rf.reference(w, 32)
    assert torch.equal(got, torch.stack([blocks[p::3].sum() & 0xFFFFFFFF for p in range(3)]))
