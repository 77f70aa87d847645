"""How a checked Predict call reaches its model: straight through, or merged by the batcher when batching is on.

Both front ends reach the same batcher, so gRPC and REST requests share the same
batches: REST's threads call `Runner.run`, gRPC's event loop awaits
`Runner.run_async` (serving/grpc_service.py).  The time spent here is TF
Serving's runtime_latency.  Calls with an
image input take one of `serving.image_call_slots` first: each may decode
max_batch images of up to pipeline.max_image_pixels pixels, so the slots bound
the memory that image requests can hold at once, whatever the concurrency.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent import futures
from typing import Dict, Optional

import numpy as np

from clicklens.servables import IMAGE_BYTES
from serving.batcher import Batcher
from serving.metrics import Metrics
from serving.predict import PreparedCall, execute

PREDICT_API = "Predict"
_NO_SLOT = contextlib.nullcontext()


class Runner:
    """Runs prepared calls on loaded versions (LoadedVersion) and records their runtime latency."""

    def __init__(self, batcher: Optional[Batcher] = None, metrics: Optional[Metrics] = None,
                 image_call_slots: Optional[int] = None):
        self.batcher = batcher
        self.metrics = metrics or Metrics()
        self._image_slots = threading.BoundedSemaphore(image_call_slots) if image_call_slots else None
        self._settlers: Dict[asyncio.AbstractEventLoop, _Settler] = {}

    def _slot(self, call: PreparedCall):
        """A slot for a call with an image input (none needed for others, or when unbounded)."""
        if self._image_slots is None or IMAGE_BYTES not in call.specs:
            return _NO_SLOT
        return self._image_slots

    def run(self, loaded, call: PreparedCall) -> Dict[str, np.ndarray]:
        """The call's outputs; calls without a free batch dimension are never merged."""
        start = time.perf_counter()
        with self._slot(call):
            if self.batcher is not None and call.batchable:
                outputs = self.batcher.run(loaded, call)
            else:
                outputs = execute(call)
        self.metrics.runtime(loaded.name, PREDICT_API, time.perf_counter() - start)
        return outputs

    async def run_async(self, loaded, call: PreparedCall, executor: futures.Executor) -> Dict[str, np.ndarray]:
        """`run` for an event loop: a batchable text call waits on the batcher without holding a thread (the
        batch thread settles its future); any other call runs `run` on `executor`."""
        loop = asyncio.get_running_loop()
        if self.batcher is None or not call.batchable or self._slot(call) is not _NO_SLOT:
            return await loop.run_in_executor(executor, self.run, loaded, call)
        start = time.perf_counter()
        future = loop.create_future()
        settler = self._settlers.get(loop) or self._settlers.setdefault(loop, _Settler(loop))
        self.batcher.submit(loaded, call, lambda outputs, error: settler.settle(future, outputs, error))
        outputs = await future
        self.metrics.runtime(loaded.name, PREDICT_API, time.perf_counter() - start)
        return outputs


class _Settler:
    """Settles an event loop's futures from batch threads, waking the loop once for the calls of a batch
    rather than once per call (each wake-up is a write to the loop's self-pipe and a pass of the loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list = []

    def settle(self, future: asyncio.Future, outputs, error) -> None:
        """Called from a batch thread: `future` gets `outputs`, or raises `error`, on its loop."""
        with self._lock:
            self._pending.append((future, outputs, error))
            wake = len(self._pending) == 1
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._settle_pending)
            except RuntimeError:  # the loop has closed: the gRPC server stopped, and its requests with it
                pass

    def _settle_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for future, outputs, error in pending:
            if future.done():  # the request was cancelled (deadline, client gone) while its batch ran
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(outputs)
