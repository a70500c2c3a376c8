"""Resumable block-by-block quantization: a state folder committed after every decoder block.

The sequential pipeline (:func:`leanq.pipeline.quantize_blocks`) finishes one
decoder block at a time; all it needs to go on from block ``i`` is the
quantized blocks before it and block ``i``'s inputs.  :class:`BlockState` keeps
exactly that in a folder (``leanq quantize --out DIR`` uses ``DIR.leanq-state``):

* ``block-NNN.safetensors`` — block ``NNN``'s tensors once it is quantized;
* ``inputs-NNN.safetensors`` — the inputs of block ``NNN`` (one tensor per
  calibration batch, bit for bit what the next block would have received);
* ``state.json`` — version, a fingerprint of everything that decides the
  result (settings, per-module specs, calibration tokens, source, device), the
  next block, and the module recipes so far.

Every file is written under a temporary name and renamed; ``state.json`` is
renamed last, so it is the commit point: a process killed at any instant leaves
either the previous state or the new one, never a mix.  Resuming replays the
finished blocks from their files and carries on with the same code, so the
result is byte-identical to an uninterrupted run (tests/test_resume.py kills a
real ``leanq quantize`` process with SIGKILL and compares the bytes).

Reading validates everything before use (a bounded JSON, the version, the
fingerprint, file sizes and SHA-256 of the block files, tensor names, shapes and
dtypes); any problem is one :class:`~leanq.errors.LeanqError` naming the file.
Tensors are read with ``safetensors`` only; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .checkpoint import _sha256
from .config import ModuleRecipe
from .errors import LeanqError

STATE_VERSION = 1
STATE_FILE = "state.json"
MAX_STATE_BYTES = 16 << 20


def state_folder_for(out: str | Path) -> Path:
    """The state folder of a checkpoint folder: ``OUT.leanq-state`` beside it."""
    out = Path(out)
    return out.parent / f"{out.name}.leanq-state"


def fingerprint(parts: dict) -> str:
    """SHA-256 of a JSON-able description of a run (key order does not matter)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _write_atomic(path: Path, write) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class BlockState:
    """Read and commit the per-block state of one quantization run."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.key = ""  # fingerprint of the run, set by the pipeline before load/commit

    # ---- reading ------------------------------------------------------------------------------

    def exists(self) -> bool:
        return (self.folder / STATE_FILE).is_file()

    def describe(self) -> str:
        """'block 12 of 30' for messages, or 'unreadable'."""
        try:
            d = self._read_json()
            return f"{d['next_block']} of {d['blocks']} blocks done"
        except LeanqError:
            return "unreadable"

    def _read_json(self) -> dict:
        p = self.folder / STATE_FILE
        try:
            if p.stat().st_size > MAX_STATE_BYTES:
                raise LeanqError(f"{p}: larger than {MAX_STATE_BYTES >> 20} MiB; not a leanq state file")
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LeanqError(f"{p}: unreadable state file ({type(e).__name__}); delete {self.folder} to start over") from None
        if not isinstance(d, dict) or type(d.get("version")) is not int:
            raise LeanqError(f"{p}: not a leanq state file")
        if d["version"] != STATE_VERSION:
            raise LeanqError(f"{p}: state version {d['version']} is not supported (this leanq writes {STATE_VERSION})")
        for k, t in (("fingerprint", str), ("next_block", int), ("blocks", int), ("modules", dict), ("files", dict)):
            if type(d.get(k)) is not t:
                raise LeanqError(f"{p}: field {k!r} missing or not a {t.__name__}")
        if not 0 <= d["next_block"] <= d["blocks"] <= 1 << 16:
            raise LeanqError(f"{p}: next_block {d['next_block']} outside 0..{d['blocks']}")
        return d

    def load(self, blocks: int) -> tuple[int, dict[str, ModuleRecipe]]:
        """(next block, module recipes of the finished blocks), after checking the state fits this run."""
        p = self.folder / STATE_FILE
        d = self._read_json()
        if d["fingerprint"] != self.key:
            raise LeanqError(f"{self.folder}: written by a run with other settings, calibration data or model; "
                             "rerun with the same ones, or delete it to start over")
        if d["blocks"] != blocks:
            raise LeanqError(f"{p}: made for a model of {d['blocks']} blocks, this one has {blocks}")
        for name, meta in d["files"].items():
            if not isinstance(meta, dict) or type(meta.get("bytes")) is not int:
                raise LeanqError(f"{p}: bad entry for file {name!r}")
            if "/" in name or "\\" in name or name.startswith(".") or not name.endswith(".safetensors"):
                raise LeanqError(f"{p}: lists a file {name!r} that a state never holds")
            f = self.folder / name
            if not f.is_file() or f.stat().st_size != meta["bytes"]:
                raise LeanqError(f"{f}: missing or not the size the state records; delete {self.folder} to start over")
            if "sha256" in meta and _sha256(f) != meta["sha256"]:
                raise LeanqError(f"{f}: contents differ from what the state records; delete {self.folder} to start over")
        modules = {}
        for name, m in d["modules"].items():
            if not isinstance(m, dict):
                raise LeanqError(f"{p}: module {name!r} is not an object")
            try:
                modules[name] = ModuleRecipe.from_dict(m)
            except LeanqError as e:
                raise LeanqError(f"{p}: {e}") from None
        self._files = d["files"]
        return d["next_block"], modules

    def _tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if name not in self._files:
            raise LeanqError(f"{self.folder / STATE_FILE}: lists no file {name}")
        try:
            return load_file(str(self.folder / name))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise LeanqError(f"{self.folder / name}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None

    def restore_block(self, i: int, block: nn.Module, expect: dict[str, torch.Tensor]) -> None:
        """Put block ``i``'s saved tensors into ``block`` (whose modules already have the saved layout)."""
        name = f"block-{i:03d}.safetensors"
        got = self._tensors(name)
        if set(got) != set(expect):
            extra, missing = sorted(set(got) - set(expect)), sorted(set(expect) - set(got))
            raise LeanqError(f"{self.folder / name}: tensors do not match the block "
                             f"(unexpected {extra[:3]}, missing {missing[:3]})")
        for k, t in got.items():
            e = expect[k]
            if t.shape != e.shape or t.dtype != e.dtype:
                raise LeanqError(f"{self.folder / name}: {k} is {t.dtype} {tuple(t.shape)}, "
                                 f"expected {e.dtype} {tuple(e.shape)}")
        for k, t in got.items():
            mod_name, _, attr = k.rpartition(".")
            mod = block.get_submodule(mod_name) if mod_name else block
            if attr in mod._parameters:
                mod._parameters[attr].data = t.to(mod._parameters[attr].device)
            else:
                mod._buffers[attr] = t.to(mod._buffers[attr].device)

    def inputs(self, i: int, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """Block ``i``'s inputs, checked against the freshly captured first-block inputs' layout."""
        name = f"inputs-{i:03d}.safetensors"
        got = self._tensors(name)
        if set(got) != {str(j) for j in range(len(like))}:
            raise LeanqError(f"{self.folder / name}: holds {len(got)} batches, this run has {len(like)}")
        out = []
        for j, x in enumerate(like):
            t = got[str(j)]
            if t.shape != x.shape or t.dtype != x.dtype:
                raise LeanqError(f"{self.folder / name}: batch {j} is {t.dtype} {tuple(t.shape)}, "
                                 f"expected {x.dtype} {tuple(x.shape)}")
            out.append(t.to(x.device))
        return out

    # ---- writing ------------------------------------------------------------------------------

    def start(self, blocks: int) -> None:
        """A fresh state: no block done (an older state in the folder is replaced)."""
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        self._files = {}
        self._modules: dict[str, dict] = {}
        self._blocks = blocks
        self._commit(0)

    def resume_from(self, blocks: int, modules: dict[str, ModuleRecipe]) -> None:
        self._blocks = blocks
        self._modules = {k: v.to_dict() for k, v in modules.items()}

    def commit(self, i: int, block: nn.Module, modules: dict[str, ModuleRecipe], inputs: list[torch.Tensor]) -> None:
        """Block ``i`` is done: save it and the next block's inputs, then move the commit point."""
        from safetensors.torch import save, save_file

        bname, iname = f"block-{i:03d}.safetensors", f"inputs-{i + 1:03d}.safetensors"
        data = save({k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()})
        _write_atomic(self.folder / bname, lambda t: t.write_bytes(data))
        batches = {str(j): x.detach().to("cpu").contiguous() for j, x in enumerate(inputs)}
        _write_atomic(self.folder / iname, lambda t: save_file(batches, str(t)))
        old_inputs = [n for n in self._files if n.startswith("inputs-")]
        self._files[bname] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self._files = {k: v for k, v in self._files.items() if not k.startswith("inputs-")}
        self._files[iname] = {"bytes": (self.folder / iname).stat().st_size}
        self._modules.update({k: v.to_dict() for k, v in modules.items()})
        self._commit(i + 1)
        for n in old_inputs:  # the previous block's inputs are no longer needed
            (self.folder / n).unlink(missing_ok=True)

    def _commit(self, next_block: int) -> None:
        d = {"version": STATE_VERSION, "fingerprint": self.key, "next_block": next_block, "blocks": self._blocks,
             "modules": self._modules, "files": self._files}
        _write_atomic(self.folder / STATE_FILE, lambda t: t.write_text(json.dumps(d, indent=1, sort_keys=True)))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
