"""The batching parameters the server runs with: from serving.batching or a TF Serving batching_parameters_file.

Both routes give the same `BatchingOptions`, checked as TF Serving checks
them (shared_batch_scheduler.h, bundle_factory_util.cc): positive sizes and
thread counts, `allowed_batch_sizes` increasing with its last entry equal to
`max_batch_size`.  Unset fields of a file take TF Serving's defaults.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Tuple

from clicklens.errors import ClicklensError
from serving.tf_serving_protos import BatchingParameters, read_text_proto

# TF Serving's defaults: SharedBatchScheduler::QueueOptions and the server's batch thread pool name.
DEFAULT_MAX_BATCH_SIZE = 1000
DEFAULT_MAX_ENQUEUED_BATCHES = 10
DEFAULT_THREAD_POOL_NAME = "model_server_batch_threads"
UNSUPPORTED_FIELDS = ("enable_large_batch_splitting", "max_execution_batch_size")


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """One server's batching parameters (TF Serving's BatchingParameters, resolved)."""

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = DEFAULT_MAX_ENQUEUED_BATCHES
    num_batch_threads: int = 1
    allowed_batch_sizes: Tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False
    thread_pool_name: str = DEFAULT_THREAD_POOL_NAME


def check(options: BatchingOptions, source: str) -> BatchingOptions:
    """Returns `options` if TF Serving would accept them; ClicklensError naming the field otherwise."""
    for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
        if getattr(options, name) < 1:
            raise ClicklensError(f"{source}: {name}: must be positive, got {getattr(options, name)}")
    if options.batch_timeout_micros < 0:
        raise ClicklensError(f"{source}: batch_timeout_micros: must be non-negative, "
                             f"got {options.batch_timeout_micros}")
    sizes = options.allowed_batch_sizes
    if any(size < 1 for size in sizes):
        raise ClicklensError(f"{source}: allowed_batch_sizes: entries must be positive, got {list(sizes)}")
    if any(later <= earlier for earlier, later in zip(sizes, sizes[1:])):
        raise ClicklensError(f"{source}: allowed_batch_sizes: entries must be monotonically increasing, "
                             f"got {list(sizes)}")
    if sizes and sizes[-1] != options.max_batch_size:
        raise ClicklensError(f"{source}: allowed_batch_sizes: last entry must match max_batch_size; last entry "
                             f"was {sizes[-1]}; expected {options.max_batch_size}")
    return options


def from_proto(params, source: str) -> BatchingOptions:
    """BatchingOptions from a BatchingParameters message (fields it leaves unset take TF Serving's defaults)."""
    for name in UNSUPPORTED_FIELDS:
        if params.HasField(name):
            raise ClicklensError(f"{source}: {name}: not supported by clicklens serve (it never splits a request "
                                 "across batches); remove it")

    def value(name: str, default):
        return getattr(params, name).value if params.HasField(name) else default

    options = BatchingOptions(
        max_batch_size=value("max_batch_size", DEFAULT_MAX_BATCH_SIZE),
        batch_timeout_micros=value("batch_timeout_micros", 0),
        max_enqueued_batches=value("max_enqueued_batches", DEFAULT_MAX_ENQUEUED_BATCHES),
        num_batch_threads=value("num_batch_threads", os.cpu_count() or 1),
        allowed_batch_sizes=tuple(params.allowed_batch_sizes),
        pad_variable_length_inputs=params.pad_variable_length_inputs,
        thread_pool_name=value("thread_pool_name", "") or DEFAULT_THREAD_POOL_NAME)
    return check(options, source)


def read_file(path: str) -> BatchingOptions:
    """BatchingOptions from a TF Serving batching_parameters_file (text proto)."""
    return from_proto(read_text_proto(path, BatchingParameters), path)


def from_config(batching) -> Optional[BatchingOptions]:
    """The options serving.batching asks for, or None when batching is off (the default)."""
    if not batching.enabled:
        return None
    if batching.batching_parameters_file:
        return read_file(batching.batching_parameters_file)
    return check(BatchingOptions(
        max_batch_size=batching.max_batch_size,
        batch_timeout_micros=batching.batch_timeout_micros,
        max_enqueued_batches=batching.max_enqueued_batches,
        num_batch_threads=batching.num_batch_threads or os.cpu_count() or 1,
        allowed_batch_sizes=tuple(batching.allowed_batch_sizes),
        pad_variable_length_inputs=batching.pad_variable_length_inputs), "serving.batching")
