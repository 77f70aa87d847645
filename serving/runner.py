"""How a checked Predict call reaches its model: straight through, or merged by the batcher when batching is on.

Both front ends call `Runner.run`, so gRPC and REST requests share the same
batches; the time spent here is TF Serving's runtime_latency.
"""

from __future__ import annotations

import time
from typing import Dict, Optional

import numpy as np

from serving.batcher import Batcher
from serving.metrics import Metrics
from serving.predict import PreparedCall, execute

PREDICT_API = "Predict"


class Runner:
    """Runs prepared calls on loaded versions (LoadedVersion) and records their runtime latency."""

    def __init__(self, batcher: Optional[Batcher] = None, metrics: Optional[Metrics] = None):
        self.batcher = batcher
        self.metrics = metrics or Metrics()

    def run(self, loaded, call: PreparedCall) -> Dict[str, np.ndarray]:
        """The call's outputs; calls without a free batch dimension are never merged."""
        start = time.perf_counter()
        if self.batcher is not None and call.batchable:
            outputs = self.batcher.run(loaded, call)
        else:
            outputs = execute(call)
        self.metrics.runtime(loaded.name, PREDICT_API, time.perf_counter() - start)
        return outputs
