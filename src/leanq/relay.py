"""Run one decoder block over many calibration batches, pausing every batch at each linear.

GPTQ's calibration pipeline needs, for each linear, the Hessian of its input
over *all* calibration batches before that linear can be quantized; and the
inputs of later linears should come from the already-quantized earlier ones
("true sequential").  Done naively that is one forward pass per group of
linears.  Here each batch runs the block's own forward in its own thread, and
a wrapper around every target linear parks the thread at that linear until the
main thread has seen the same point in every batch, solved the linear and put
the quantized module in place; then each batch continues from where it stopped.
The block is thus computed exactly once per batch, with quantized weights —
which is also the input of the next block.

Exactly one thread runs at any time (the main thread hands a baton to batch 0,
1, ... in order), so the arithmetic, the order of every reduction and hence the
result are the same as a sequential program's: same inputs, same bytes.

The price is memory: every parked batch keeps its intermediate activations
(for SmolLM2-135M with 128 x 512 calibration tokens, ~1.6 GB in float32).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import torch
from torch import nn


class Abort(BaseException):
    """Raised inside a parked batch to unwind it when the run is abandoned."""


class Stop(Exception):
    """Ends a forward early once everything wanted from it is known."""


class StageLinear(nn.Module):
    """Stands in for a target linear during the relay.

    ``impl`` is None until the linear is quantized: a batch that reaches it
    first parks here (handing its input to the main thread); afterwards the
    call goes to ``impl`` (the quantized module).
    """

    def __init__(self, rel: str, relay: "Relay"):
        super().__init__()
        self.rel = rel
        self.impl: nn.Module | None = None
        # not a submodule attribute: the relay is not part of the module tree
        object.__setattr__(self, "relay", relay)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.impl is None:
            self.relay.park(self.rel, x)
        return self.impl(x, *args, **kwargs)


class _Batch(threading.Thread):
    """One calibration batch running ``fn()`` in its own thread, in turns with the main thread."""

    def __init__(self, fn: Callable[[], object]):
        super().__init__(daemon=True)
        self.fn = fn
        self.go = threading.Semaphore(0)
        self.back = threading.Semaphore(0)
        self.msg: tuple = ("new",)
        self.abort = False

    def run(self) -> None:
        self.go.acquire()
        try:
            if self.abort:
                raise Abort
            with torch.no_grad():  # grad mode is per thread
                self.msg = ("done", self.fn())
        except Abort:
            self.msg = ("aborted",)
        except BaseException as e:  # handed to the main thread, which raises it
            self.msg = ("error", e)
        self.back.release()

    def resume(self) -> tuple:
        """Main thread: let this batch run until it parks or ends; return its message."""
        self.go.release()
        self.back.acquire()
        return self.msg

    def park(self, msg: tuple) -> None:
        """This batch's thread: hand ``msg`` to the main thread and wait for the next turn."""
        self.msg = msg
        self.back.release()
        self.go.acquire()
        if self.abort:
            raise Abort

    def stop(self) -> None:
        self.abort = True
        if self.is_alive():
            self.go.release()
            self.join()


class Relay:
    """Drive ``len(calls)`` batches through a block stage by stage.

    calls: one zero-argument function per batch (runs the block on that batch).
    ``stages()`` yields, for each pause point, the name of the linear every
    batch stopped at and the list of their inputs in batch order; the caller
    must set that linear's ``impl`` (and its stage mates') before the next step.
    ``outputs`` then holds each batch's result.
    """

    def __init__(self, calls: list[Callable[[], object]]):
        self.batches = [_Batch(fn) for fn in calls]
        self.current: _Batch | None = None
        self.outputs: list = []
        self.seconds = 0.0  # time spent running the batches (for profiles)

    def park(self, rel: str, x: torch.Tensor) -> None:
        assert self.current is not None and threading.current_thread() is self.current
        self.current.park(("park", rel, x))

    def _step(self) -> list[tuple]:
        msgs = []
        t = time.perf_counter()
        for b in self.batches:
            self.current = b
            msg = b.resume()
            self.current = None
            if msg[0] == "error":
                raise msg[1]
            msgs.append(msg)
        self.seconds += time.perf_counter() - t
        return msgs

    def stages(self):
        for b in self.batches:
            b.start()
        try:
            while True:
                msgs = self._step()
                kinds = {m[0] for m in msgs}
                if kinds == {"done"}:
                    self.outputs = [m[1] for m in msgs]
                    return
                names = {m[1] for m in msgs if m[0] == "park"}
                if kinds != {"park"} or len(names) != 1:
                    raise RuntimeError(f"calibration batches diverged inside the block ({sorted(names)})")
                yield names.pop(), [m[2] for m in msgs]
        finally:
            self.close()

    def close(self) -> None:
        """Unwind every batch still parked (also after an error or an early return)."""
        for b in self.batches:
            b.stop()
