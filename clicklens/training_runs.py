"""A training run's folder: what a later run needs to know about it (the warm-start contract).

Next to a run's checkpoints (W/model/checkpoints, or $AIP_CHECKPOINT_DIR) the
chief keeps the vocabulary the run trains with (`RUN_VOCAB`) and, once the
run has ended, `FINISHED` naming its last checkpoint.  A finished run that a
new one starts from moves to W/model/previous/ (`archive_finished_run`).

`clicklens train` writes these (trainer/task.py, trainer/warm_start.py);
`clicklens update` reads them to choose the pipeline's base vocabulary and
to start a from-scratch run.  TensorFlow is imported only inside the
functions (gfile for gs:// paths), so the command line stays light.
"""

from __future__ import annotations

import json
import logging
import os

from clicklens.workdir import join

logger = logging.getLogger(__name__)

RUN_VOCAB = "vocab.txt"
FINISHED = "finished.json"
PREVIOUS_RUN = "previous"
# The run's plan (its epochs and where it started from), so a resumed warm-started run keeps its length.
RUN_PLAN = "run.json"


def checkpoint_dir(workdir) -> str:
    """Where a run's checkpoints live: $AIP_CHECKPOINT_DIR on Vertex AI, else W/model/checkpoints."""
    return os.environ.get("AIP_CHECKPOINT_DIR") or workdir.checkpoints


def read_record(checkpoints: str, name: str) -> dict:
    """A JSON record a run keeps next to its checkpoints ({} when there is none)."""
    import tensorflow as tf

    path = join(checkpoints, name)
    if not tf.io.gfile.exists(path):
        return {}
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def write_record(checkpoints: str, name: str, record: dict) -> None:
    """Writes a JSON record next to a run's checkpoints (the folder is created when missing)."""
    import tensorflow as tf

    tf.io.gfile.makedirs(checkpoints)
    with tf.io.gfile.GFile(join(checkpoints, name), "w") as f:
        json.dump(record, f)


def write_run_plan(checkpoints: str, epochs: int, started_from: str) -> None:
    """Records a new run's number of epochs and the checkpoint it started from ("" = random weights)."""
    write_record(checkpoints, RUN_PLAN, {"epochs": int(epochs), "started_from": started_from})


def read_run_plan(checkpoints: str) -> dict:
    """The plan a run recorded when it started ({} when none did)."""
    return read_record(checkpoints, RUN_PLAN)


def record_run_vocab(checkpoints: str, vocab_path: str) -> None:
    """Copies the vocabulary this run trains with next to its checkpoints (a later warm start maps rows by it)."""
    import tensorflow as tf

    tf.io.gfile.makedirs(checkpoints)
    tf.io.gfile.copy(vocab_path, join(checkpoints, RUN_VOCAB), overwrite=True)


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def mark_finished(checkpoints: str, fit_seconds: float = 0.0) -> None:
    """Records that the run in `checkpoints` ended (trained all its steps or stopped early) at its newest
    checkpoint, and how long its training steps took (this session's, without start-up or evaluation)."""
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(checkpoints)
    if latest is not None:
        write_record(checkpoints, FINISHED, {"checkpoint": _basename(latest), "fit_seconds": round(fit_seconds, 2)})


def read_finished(checkpoints: str) -> dict:
    """What a finished run recorded ({} when the run in `checkpoints` has not finished)."""
    return read_record(checkpoints, FINISHED)


def is_finished(checkpoints: str) -> bool:
    """Whether `checkpoints` holds a run that ended at its newest checkpoint."""
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(checkpoints)
    return latest is not None and read_finished(checkpoints).get("checkpoint") == _basename(latest)


def previous_run_dir(checkpoints: str) -> str:
    """W/model/previous/ for checkpoints in W/model/checkpoints (a sibling folder of the checkpoints)."""
    return join(checkpoints.rstrip("/").rsplit("/", 1)[0], PREVIOUS_RUN)


def _copy_folder(source: str, target: str) -> None:
    import tensorflow as tf

    tf.io.gfile.makedirs(target)
    for name in tf.io.gfile.listdir(source):
        if not tf.io.gfile.isdir(join(source, name)):
            tf.io.gfile.copy(join(source, name), join(target, name), overwrite=True)


def archive_finished_run(checkpoints: str) -> str:
    """Moves a finished run's checkpoint folder to W/model/previous/ (replacing the one there); returns it.

    Copy then delete, not rename: rename of folders is not atomic (or not
    possible) on object stores.  A crash in between leaves both copies, and
    the next attempt archives again.
    """
    import tensorflow as tf

    previous = previous_run_dir(checkpoints)
    if tf.io.gfile.exists(previous):
        tf.io.gfile.rmtree(previous)
    _copy_folder(checkpoints, previous)
    tf.io.gfile.rmtree(checkpoints)
    tf.io.gfile.makedirs(checkpoints)
    logger.info("warm start: the finished run's checkpoints moved to %s", previous)
    return previous
