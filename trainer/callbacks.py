"""Keras callbacks of a training run: checkpoints every N steps, progress lines, early stopping on retrieval.

Keras' own progress output is one bar per epoch (or one line per epoch in a
log file); a long epoch on a TPU pod or a 2-core laptop needs steps, speed and
an ETA every few hundred steps instead.  Keras' EarlyStopping watches a logged
number such as the eval loss; a retrieval model should stop when retrieval
stops improving, which needs the whole corpus embedded after each epoch.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Dict

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

logger = logging.getLogger(__name__)


def optimizer_step(model: tf.keras.Model) -> int:
    """The number of optimizer steps taken so far (restored with a checkpoint, unlike Keras' batch index)."""
    return int(model.optimizer.iterations.numpy())


class CheckpointEverySteps(tf.keras.callbacks.Callback):
    """Saves every `every` optimizer steps and at the end, but never after a NaN loss.

    A non-finite loss stops training at once; the weights it produced are not
    saved, so the newest checkpoint on disk is the last good one.
    """

    def __init__(self, manager: tf.train.CheckpointManager, every: int):
        super().__init__()
        self.manager = manager
        self.every = every
        self.diverged_at = None
        self._last_saved = None

    def on_train_begin(self, logs=None):
        if self._last_saved is None:
            self._last_saved = optimizer_step(self.model)

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        step = optimizer_step(self.model)
        if loss is not None and not math.isfinite(float(loss)):
            self.diverged_at = step
            self.model.stop_training = True
            return
        if step - self._last_saved >= self.every:
            self.manager.save(checkpoint_number=step)
            self._last_saved = step

    def on_train_end(self, logs=None):
        step = optimizer_step(self.model)
        if self.diverged_at is None and step > self._last_saved:
            self.manager.save(checkpoint_number=step)
            self._last_saved = step


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class TrainingProgress(tf.keras.callbacks.Callback):
    """Logs one line every `every` optimizer steps: step, loss parts, examples/s and the ETA of the run."""

    def __init__(self, total_steps: int, global_batch: int, every: int):
        super().__init__()
        self.total_steps = total_steps
        self.global_batch = global_batch
        self.every = every
        self._last_logged = None
        self._started = None
        self._first_step = None

    def on_train_begin(self, logs=None):
        if self._started is None:  # a resumed run calls fit twice; measure from the first call
            self._started = time.time()
            self._first_step = self._last_logged = optimizer_step(self.model)

    def on_train_batch_end(self, batch, logs=None):
        step = optimizer_step(self.model)
        if step - self._last_logged >= self.every or step >= self.total_steps:
            self._last_logged = step
            self.log_line(step, logs or {})

    def on_epoch_end(self, epoch, logs=None):
        """The eval metrics of the epoch, when fit has validation data (early stopping watches them)."""
        evaluated = {name: value for name, value in (logs or {}).items() if name.startswith("val_")}
        if evaluated:
            logger.info("epoch %d: %s", epoch + 1,
                        ", ".join(f"{name} {float(value):.4f}" for name, value in sorted(evaluated.items())))

    def log_line(self, step: int, logs) -> None:
        elapsed = max(time.time() - self._started, 1e-9)
        rate = (step - self._first_step) / elapsed  # steps per second in this process
        eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
        parts = ", ".join(f"{name} {float(logs[name]):.4f}"
                          for name in ("loss", "retrieval_loss", "graph_loss") if name in logs)
        logger.info("step %d/%d (%d%%) %s; %.0f examples/s; ETA %s", step, self.total_steps,
                    100 * step // max(self.total_steps, 1), parts, rate * self.global_batch,
                    _duration(eta) if math.isfinite(eta) else "?")


class RetrievalEarlyStopping(tf.keras.callbacks.Callback):
    """After each epoch: measures eval retrieval metrics, logs them and stops when `metric` stops improving.

    `measure(model)` returns e.g. {"recall@10": ..., "ndcg@10": ...}; the values
    are added to the epoch's logs as `val_<name>` (TensorBoard shows them).
    Training stops after `patience` epochs without an improvement of more than
    `min_delta`, counting only epochs from `start_epoch` on (0-based, as Keras'
    EarlyStopping `start_from_epoch`; the best epoch is tracked from the first);
    `restore_best()` then puts back the best epoch's weights.
    """

    def __init__(self, measure: Callable[[tf.keras.Model], Dict[str, float]], metric: str, patience: int,
                 min_delta: float = 1e-3, start_epoch: int = 0):
        super().__init__()
        self.measure = measure
        self.metric = metric
        self.patience = patience
        self.min_delta = min_delta
        self.start_epoch = start_epoch
        self.best = -math.inf
        self.best_epoch = None
        self.last_epoch = None
        self.stopped_epoch = None
        self._best_weights = None
        self._wait = 0

    def on_epoch_end(self, epoch, logs=None):
        started = time.time()
        values = self.measure(self.model)
        if logs is not None:
            logs.update({f"val_{name}": value for name, value in values.items()})
        self.last_epoch = epoch
        current = values[self.metric]
        if current > self.best + self.min_delta:
            self.best, self.best_epoch, self._wait = current, epoch, 0
            self._best_weights = self.model.get_weights()
        elif epoch >= self.start_epoch:
            self._wait += 1
        logger.info("epoch %d: eval %s (best %s %.4f at epoch %d; measured in %.1f s)", epoch + 1,
                    ", ".join(f"{name} {value:.4f}" for name, value in sorted(values.items())),
                    self.metric, self.best, self.best_epoch + 1, time.time() - started)
        if self._wait >= self.patience:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def restore_best(self) -> bool:
        """Puts back the best epoch's weights if a later epoch was worse; True when it did."""
        if self._best_weights is None or self.best_epoch == self.last_epoch:
            return False
        self.model.set_weights(self._best_weights)
        return True
