"""Export leanq checkpoints to formats other runtimes load: compressed-tensors, GGUF."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import LeanqError

FORMATS = ("compressed-tensors", "gguf")


def export(src: str | Path, fmt: str, out: str | Path, overwrite: bool = False, **kw) -> Path:
    """Export the leanq checkpoint folder ``src`` to ``out`` in format ``fmt``."""
    if fmt == "compressed-tensors":
        from .compressed_tensors import export_compressed_tensors

        return export_compressed_tensors(src, out, overwrite=overwrite)
    if fmt == "gguf":
        from .gguf import export_gguf

        return export_gguf(src, out, overwrite=overwrite, **kw)
    raise LeanqError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


def temp_beside(out: Path, overwrite: bool, is_dir: bool) -> Path:
    """A fresh temporary path next to ``out`` (same file system, so the final rename is atomic)."""
    if out.exists() and not overwrite:
        raise LeanqError(f"{out}: already exists; choose another --out or pass --overwrite")
    if out.exists() and out.is_dir() != is_dir:
        raise LeanqError(f"{out}: exists and is a {'folder' if out.is_dir() else 'file'}; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    return tmp


def move_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` (fsynced files; a folder is swapped via a side name)."""
    for f in ([tmp] if tmp.is_file() else list(tmp.iterdir())):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if out.is_dir():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
