"""Distribution strategy and numeric precision from the `training` config section.

`make_strategy` is the one place that knows how to reach each kind of
device: `tpu` (TPUClusterResolver + TPU system initialisation), `mirrored`
(every local GPU; several logical CPUs when there is no GPU, which is how the
tests exercise real multi-replica code), `multiworker` (TF_CONFIG), `cpu`, and
`auto` (TPU if one resolves, else GPUs, else CPU).  Asking for a device that
is not there is a ClicklensError naming it, never a silent CPU run.
"""

from __future__ import annotations

import json
import logging
import os

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens.errors import ClicklensError

logger = logging.getLogger(__name__)


def _tpu_strategy(tpu: str) -> tf.distribute.Strategy:
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except Exception as err:  # the resolver raises several unrelated types when there is no TPU
        raise ClicklensError(f"training.strategy=tpu: no TPU found at training.tpu={tpu!r} ({err})") from None
    return tf.distribute.TPUStrategy(resolver)


def _mirrored_strategy() -> tf.distribute.Strategy:
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy([d.name for d in gpus])
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) > 1:
        logger.warning("training.strategy=mirrored: no GPU, mirroring over %d logical CPU devices", len(cpus))
        return tf.distribute.MirroredStrategy([d.name for d in cpus])
    raise ClicklensError("training.strategy=mirrored: no GPU found (use training.strategy=cpu or auto)")


def _multiworker_strategy() -> tf.distribute.Strategy:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ClicklensError("training.strategy=multiworker: TF_CONFIG is not set (it lists the cluster's workers)")
    try:
        cluster = json.loads(raw).get("cluster", {})
    except ValueError as err:
        raise ClicklensError(f"training.strategy=multiworker: TF_CONFIG is not valid JSON ({err})") from None
    if not cluster.get("worker") and not cluster.get("chief"):
        raise ClicklensError("training.strategy=multiworker: TF_CONFIG names no workers")
    return tf.distribute.MultiWorkerMirroredStrategy()


def make_strategy(training) -> tf.distribute.Strategy:
    """The tf.distribute strategy for `training.strategy` (a trainer.config.TrainingConfig)."""
    kind = training.strategy
    if kind == "tpu":
        strategy = _tpu_strategy(training.tpu)
    elif kind == "mirrored":
        strategy = _mirrored_strategy()
    elif kind == "multiworker":
        strategy = _multiworker_strategy()
    elif kind == "cpu":
        strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    elif kind == "auto":
        try:
            strategy = _tpu_strategy(training.tpu)
        except ClicklensError:
            gpus = tf.config.list_logical_devices("GPU")
            if len(gpus) > 1:
                strategy = tf.distribute.MirroredStrategy([d.name for d in gpus])
            else:
                strategy = tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    else:
        raise ClicklensError(f"training.strategy: unknown strategy {kind!r}")
    logger.info("strategy %s with %d replica(s)", type(strategy).__name__, strategy.num_replicas_in_sync)
    return strategy


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's outputs (always, except non-chief multi-workers)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    resolver = strategy.cluster_resolver
    if resolver is None or resolver.task_type is None:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def needs_static_shapes(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` compiles steps with XLA for devices that need every shape fixed (TPUs)."""
    return isinstance(strategy, (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy))


def global_batch_size(training, strategy: tf.distribute.Strategy) -> int:
    """per_replica_batch_size x replicas in sync."""
    return training.per_replica_batch_size * strategy.num_replicas_in_sync


def set_precision(training) -> None:
    """Sets the global Keras mixed-precision policy (float32, mixed_bfloat16 or mixed_float16).

    Under mixed_float16, Model.compile wraps the optimizer in a
    LossScaleOptimizer, and the model's train step scales the loss through
    optimizer.minimize.
    """
    policy = training.precision
    if policy == "mixed_float16" and not tf.config.list_logical_devices("GPU"):
        logger.warning("training.precision=mixed_float16 without a GPU: correct but slow on CPU")
    tf.keras.mixed_precision.set_global_policy(policy)


def wait_for_all_workers(strategy: tf.distribute.Strategy) -> None:
    """A barrier under MultiWorkerMirroredStrategy (no worker leaves, and the chief's evaluation or export does
    not start, until all have finished); nothing under any other strategy."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1.0)), axis=None)
