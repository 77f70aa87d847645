"""Running a function over many inputs a batch at a time (embedding a corpus, a query list, ...)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def map_batches(fn: Callable[[Sequence], np.ndarray], values: Sequence, batch_size: int) -> np.ndarray:
    """np.concatenate([fn(values[i:i + batch_size]) for each batch]), rows in input order.

    `fn` returns one row per input (a numpy array or a tensor with `.numpy()`);
    an empty `values` gives an empty array.
    """
    out = []
    for start in range(0, len(values), batch_size):
        rows = fn(values[start:start + batch_size])
        out.append(rows.numpy() if hasattr(rows, "numpy") else np.asarray(rows))
    return np.concatenate(out) if out else np.zeros((0,), np.float32)
