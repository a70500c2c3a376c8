"""Text files for calibration and evaluation, found by flag, LEANQ_DATA, or ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import LeanqError

EVAL_FILE = "wikitext-2/wiki.test.raw"
CALIB_FILE = "wikitext-2/wiki.valid.tokens"
_HOW = ("give a UTF-8 text file with {flag} FILE, or set LEANQ_DATA to a folder holding {rel} "
        "(any UTF-8 text works; WikiText-2 is the standard)")


def data_roots() -> list[Path]:
    """Where data files are looked for, in order."""
    roots = []
    if os.environ.get("LEANQ_DATA"):
        roots.append(Path(os.environ["LEANQ_DATA"]))
    here = Path(__file__).resolve()
    roots += [Path.cwd() / "../shared/data", Path.cwd() / "shared/data"]
    if len(here.parents) > 3:  # a source checkout: <repo>/src/leanq/data.py, shared/ beside <repo>
        roots.append(here.parents[3] / "shared/data")
    return roots


def find_file(path: str | None, rel: str, flag: str) -> Path:
    """An explicit path, else ``rel`` under the first data root that has it."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise LeanqError(f"{p}: no such file; " + _HOW.format(flag=flag, rel=rel))
        return p
    for root in data_roots():
        if (root / rel).is_file():
            return (root / rel).resolve()
    raise LeanqError(f"no {rel} found; " + _HOW.format(flag=flag, rel=rel))


def read_text(p: Path) -> str:
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LeanqError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise LeanqError(f"{p}: cannot be read ({e.strerror})") from None
    if not text.strip():
        raise LeanqError(f"{p}: the file is empty")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one sequence of ids, no BOS: int64 [n]."""
    if tokenizer is None:
        raise LeanqError("this model has no tokenizer, so it cannot read text")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "sequence longer than max length" is expected here
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_ids(tokenizer, path: Path, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets: int64 [nsamples, seqlen]."""
    ids = tokenize(tokenizer, read_text(path))
    if len(ids) <= seqlen:
        raise LeanqError(f"{path}: only {len(ids)} tokens, fewer than one calibration window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
