"""Request batching: concurrent Predict calls of one model, version and signature merged into one call.

TF Serving's BatchingSession over a shared batch scheduler, in Python:

- Each checked call (serving/predict.py's PreparedCall) joins the queue of its
  (version, signature, outputs, input shapes); calls whose inputs differ past
  the batch dimension get separate queues unless `pad_variable_length_inputs`,
  which pads them (with the tensor's first element, as TF Serving) instead.
- `num_batch_threads` threads, shared by all queues, each take the oldest
  ready queue: full (`max_batch_size` rows), or its oldest call has waited
  `batch_timeout_micros` (0: whatever is queued when a thread is free).
- A batch is padded up to the next of `allowed_batch_sizes` with copies of a
  row, run once, and its outputs cut back into each call's rows.
- If the merged call fails (one undecodable image fails the whole graph run),
  each call of the batch is run on its own, so only the bad one fails.
- A call with more rows than `max_batch_size` gets INVALID_ARGUMENT, and one
  that finds its queue full (`max_enqueued_batches` batches) UNAVAILABLE, with
  TF Serving's messages.
"""

from __future__ import annotations

import bisect
import collections
import logging
import threading
import time
from typing import Callable, Deque, Dict, List, Optional, Sequence

import grpc
import numpy as np

from serving.batching_options import BatchingOptions
from serving.metrics import Metrics
from serving.predict import PreparedCall, ServingError, execute, invalid

logger = logging.getLogger(__name__)


Callback = Callable[[Optional[Dict[str, np.ndarray]], Optional[BaseException]], None]


class _Task:
    """One call waiting in a queue; `on_done(outputs, error)` is called from a batch thread when it has run."""

    __slots__ = ("call", "rows", "enqueued", "on_done", "outputs", "error")

    def __init__(self, call: PreparedCall, on_done: Callback):
        self.call = call
        self.rows = call.batch_size
        self.enqueued = time.monotonic()
        self.on_done = on_done
        self.outputs: Optional[Dict[str, np.ndarray]] = None
        self.error: Optional[BaseException] = None

    def finish(self) -> None:
        try:
            self.on_done(self.outputs, self.error)
        except Exception:  # noqa: BLE001  (a broken callback must not stop the batch thread)
            logger.exception("batch completion callback failed")


def padded_size(allowed_batch_sizes: Sequence[int], rows: int) -> int:
    """The smallest allowed size >= rows (rows itself when no sizes are configured)."""
    if not allowed_batch_sizes:
        return rows
    return allowed_batch_sizes[bisect.bisect_left(allowed_batch_sizes, rows)]


def merge_inputs(calls: Sequence[PreparedCall], target_rows: int, pad_variable_length: bool) -> Dict[str, np.ndarray]:
    """The calls' inputs stacked along the batch dimension, padded to `target_rows` rows."""
    merged = {}
    for name in calls[0].inputs:
        arrays = [c.inputs[name] for c in calls]
        if pad_variable_length:
            dims = np.max([a.shape[1:] for a in arrays], axis=0) if arrays[0].ndim > 1 else ()
            arrays = [_pad_dims(a, tuple(dims)) for a in arrays]
        rows = sum(len(a) for a in arrays)
        if target_rows > rows:  # copies of the last call's first row, as TF Serving pads
            arrays.append(np.repeat(arrays[-1][:1], target_rows - rows, axis=0))
        merged[name] = np.concatenate(arrays, axis=0)
    return merged


def _pad_dims(array: np.ndarray, dims: tuple) -> np.ndarray:
    if array.shape[1:] == dims:
        return array
    if array.size == 0:
        raise invalid("cannot pad an empty tensor")
    padded = np.full((array.shape[0],) + dims, array.flat[0], dtype=array.dtype)
    padded[tuple(slice(0, n) for n in array.shape)] = array
    return padded


def split_outputs(outputs: Dict[str, np.ndarray], rows: Sequence[int], total: int) -> List[Dict[str, np.ndarray]]:
    """Each call's rows of a merged call's outputs; ValueError if an output has no batch dimension."""
    for name, value in outputs.items():
        if value.ndim == 0 or value.shape[0] != total:
            raise ValueError(f"output {name!r} of shape {value.shape} has no batch dimension of {total}")
    parts, start = [], 0
    for n in rows:
        parts.append({name: value[start:start + n] for name, value in outputs.items()})
        start += n
    return parts


class Batcher:
    """Queues per (version, signature, outputs, input shapes), served by a shared pool of batch threads."""

    def __init__(self, options: BatchingOptions, metrics: Optional[Metrics] = None):
        self.options = options
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._queues: Dict[tuple, Deque[_Task]] = {}
        self._rows: Dict[tuple, int] = {}
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, name=f"{options.thread_pool_name}_{i}", daemon=True)
                         for i in range(options.num_batch_threads)]

    def start(self) -> None:
        """Starts the batch threads."""
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Refuses new calls, runs the queued ones, and joins the batch threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=60)

    def queued_rows(self) -> int:
        """Rows waiting in all queues."""
        with self._cond:
            return sum(self._rows.values())

    def _key(self, loaded, call: PreparedCall) -> tuple:
        if self.options.pad_variable_length_inputs:
            shapes = tuple((name, a.ndim) for name, a in sorted(call.inputs.items()))
        else:
            shapes = tuple((name, a.shape[1:]) for name, a in sorted(call.inputs.items()))
        return id(loaded), call.signature_name, tuple(call.output_names), shapes

    def run(self, loaded, call: PreparedCall) -> Dict[str, np.ndarray]:
        """Runs a batchable call as part of a batch of `loaded`'s calls; blocks until its outputs are ready."""
        # A bare lock released by the batch thread: a cheaper one-shot signal than threading.Event,
        # whose Condition machinery is interpreted Python on both sides (measurable per request).
        done = threading.Lock()
        done.acquire()
        result: list = []

        def finish(outputs, error) -> None:
            result.extend((outputs, error))
            done.release()

        self.submit(loaded, call, finish)
        done.acquire()
        outputs, error = result
        if error is not None:
            raise error
        return outputs

    def submit(self, loaded, call: PreparedCall, on_done: Callback) -> None:
        """Queues a batchable call; `on_done(outputs, error)` is called from a batch thread once it has run.
        Raises ServingError at once for a call that is too large or finds its queue full."""
        o = self.options
        if call.batch_size > o.max_batch_size:
            raise invalid(f"Task size {call.batch_size} is larger than maximum input batch size {o.max_batch_size}")
        key = self._key(loaded, call)
        task = _Task(call, on_done)
        with self._cond:
            if self._stopping:
                raise ServingError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            queued = self._rows.get(key, 0)
            if queued + task.rows > o.max_enqueued_batches * o.max_batch_size:
                raise ServingError(grpc.StatusCode.UNAVAILABLE,
                                   "The batch scheduling queue to which this task was submitted is full")
            self._queues.setdefault(key, collections.deque()).append(task)
            self._rows[key] = queued + task.rows
            # A batch thread needs waking only when the queue gains its first call (its timeout starts)
            # or fills up; otherwise its timed wait already covers this queue.
            if queued == 0 or self._rows[key] >= o.max_batch_size:
                self._cond.notify()

    # -- batch threads -----------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
            if batch is None:
                return
            self._process(batch)

    def _next_batch(self) -> Optional[List[_Task]]:
        """Waits (holding the condition's lock) for a ready queue and takes a batch from it; None to stop."""
        timeout = self.options.batch_timeout_micros / 1e6
        while True:
            now = time.monotonic()
            ready, wait = None, None
            for key, queue in self._queues.items():
                waited = now - queue[0].enqueued
                if self._stopping or waited >= timeout or self._rows[key] >= self.options.max_batch_size:
                    if ready is None or queue[0].enqueued < self._queues[ready][0].enqueued:
                        ready = key
                else:
                    wait = timeout - waited if wait is None else min(wait, timeout - waited)
            if ready is not None:
                batch = self._take(ready)
                if self._queues:
                    self._cond.notify()  # another idle thread may start on what is left
                return batch
            if self._stopping:
                return None
            self._cond.wait(wait)

    def _take(self, key: tuple) -> List[_Task]:
        queue, batch, rows = self._queues[key], [], 0
        while queue and (not batch or rows + queue[0].rows <= self.options.max_batch_size):
            task = queue.popleft()
            batch.append(task)
            rows += task.rows
        self._rows[key] -= rows
        if not queue:
            del self._queues[key], self._rows[key]
        return batch

    def _process(self, batch: List[_Task]) -> None:
        start = time.monotonic()
        for task in batch:
            self.metrics.queued(self.options.thread_pool_name, start - task.enqueued, task.rows)
        rows = [task.rows for task in batch]
        total = padded_size(self.options.allowed_batch_sizes, sum(rows))
        try:
            merged = merge_inputs([t.call for t in batch], total, self.options.pad_variable_length_inputs)
            self.metrics.batch(total, total - sum(rows))
            outputs = execute(batch[0].call, merged)
            for task, part in zip(batch, split_outputs(outputs, rows, total)):
                task.outputs = part
        except Exception as err:  # noqa: BLE001  (the calls are retried one by one below)
            if len(batch) == 1:
                batch[0].error = err
            else:
                logger.debug("a batch of %d calls failed (%s); running them one by one", len(batch), err)
                self._run_alone(batch)
        finally:
            for task in batch:
                task.finish()

    def _run_alone(self, batch: List[_Task]) -> None:
        for task in batch:
            self.metrics.batch(task.rows, 0)
            try:
                task.outputs = execute(task.call)
            except Exception as err:  # noqa: BLE001  (handed to the request's thread)
                task.error = err
