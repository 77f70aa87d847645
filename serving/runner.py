"""How a checked Predict call reaches its model: straight through, or merged by the batcher when batching is on.

Both front ends call `Runner.run`, so gRPC and REST requests share the same
batches; the time spent here is TF Serving's runtime_latency.  Calls with an
image input take one of `serving.image_call_slots` first: each may decode
max_batch images of up to pipeline.max_image_pixels pixels, so the slots bound
the memory that image requests can hold at once, whatever the concurrency.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Dict, Optional

import numpy as np

from clicklens.servables import IMAGE_BYTES
from serving.batcher import Batcher
from serving.metrics import Metrics
from serving.predict import PreparedCall, execute

PREDICT_API = "Predict"


class Runner:
    """Runs prepared calls on loaded versions (LoadedVersion) and records their runtime latency."""

    def __init__(self, batcher: Optional[Batcher] = None, metrics: Optional[Metrics] = None,
                 image_call_slots: Optional[int] = None):
        self.batcher = batcher
        self.metrics = metrics or Metrics()
        self._image_slots = threading.BoundedSemaphore(image_call_slots) if image_call_slots else None

    def _slot(self, call: PreparedCall):
        """A slot for a call with an image input (none needed for others, or when unbounded)."""
        if self._image_slots is None or IMAGE_BYTES not in call.specs:
            return contextlib.nullcontext()
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
