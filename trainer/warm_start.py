"""Warm start: a new training run starts from an earlier run's final weights (training.warm_start).

The daily loop (`clicklens update`) retrains every day on a window of logs;
starting from yesterday's model instead of random weights reaches the same
quality in a fraction of the steps.  Three things make that safe:

- Every run copies the vocabulary it trains with next to its checkpoints, and
  the chief marks a run that ended (clicklens/training_runs.py), so a later
  run can tell a finished run (start a new one from it) from an interrupted one
  (resume it, as without warm start).
- `training.warm_start: latest` moves a finished run's checkpoints to
  `W/model/previous/` (`archive_finished_run`) and starts the new run from its
  newest checkpoint; a path names a checkpoint prefix, a checkpoint folder or
  another work directory.
- Token rows are carried over by token, not by id (`carry_over`): a token of
  the old vocabulary keeps its trained row wherever it sits in the new one,
  and a new token starts from the fresh model's random row.  The pipeline's
  `pipeline.base_vocab` keeps old ids stable anyway, so rows do not even move.

Every other variable of both towers is copied as is; a shape that differs
(the model config changed) is an error that names the variable.  The
optimizer starts fresh unless `training.warm_start_optimizer` is set: then its
slots (Adam's moments, Adagrad's accumulators) are carried over the same way
(`carry_over_optimizer`), but not its step counter, so the learning-rate
schedule (warmup, cosine) starts again for the new run.
"""

from __future__ import annotations

import logging
from typing import List, NamedTuple, Optional

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens import servables as S
from clicklens.errors import ClicklensError
from clicklens.vocabulary import load_vocab
from clicklens.training_runs import RUN_VOCAB, is_finished, previous_run_dir
from clicklens.workdir import join
from trainer.model import reading_checkpoint, without_start_weights

logger = logging.getLogger(__name__)


class WarmStart(NamedTuple):
    """Where a run starts from: an earlier run's checkpoint and the vocabulary its token rows belong to."""

    checkpoint: str
    vocab: List[str]
    # The checkpoint is a finished run's in this run's own folder: archive it once its weights are read.
    archive: bool = False
    # The checkpoint is an exported SavedModel's variables (towers only, no optimizer).
    export: bool = False


def _export_version(path: str) -> str:
    """The SavedModel folder `path` names: a version folder, or a model's base path (its newest version);
    "" when it names neither."""
    if tf.io.gfile.exists(join(path, S.SAVED_MODEL_PB)):
        return path
    versions = S.version_dirs(path)
    return versions[max(versions)] if versions else ""


def _from_export(version_dir: str) -> WarmStart:
    """An exported query_encoder / image_encoder version: its variables and the vocabulary kept beside them."""
    vocab_path = join(version_dir, S.EXPORT_VOCAB)
    if not tf.io.gfile.exists(vocab_path):
        raise ClicklensError(f"training.warm_start: {vocab_path} not found: warm-start from an exported "
                             f"{S.QUERY_ENCODER} or {S.IMAGE_ENCODER} (exports keep their vocabulary there), or "
                             "from the run's checkpoints")
    return WarmStart(join(version_dir, "variables", "variables"), load_vocab(vocab_path), export=True)


def _from_path(path: str, archive: bool = False) -> WarmStart:
    """A checkpoint prefix, a checkpoint folder, a work directory (its model/checkpoints), or an exported
    encoder (a version folder or the model's folder: its newest version)."""
    exported = _export_version(path)
    if exported:
        return _from_export(exported)
    if tf.io.gfile.exists(path + ".index"):
        prefix, folder = path, path.rsplit("/", 1)[0]
    else:
        folder = path
        if not tf.train.latest_checkpoint(folder) and tf.io.gfile.isdir(join(path, "model", "checkpoints")):
            folder = join(path, "model", "checkpoints")
        prefix = tf.train.latest_checkpoint(folder)
        if prefix is None:
            raise ClicklensError(f"training.warm_start: no checkpoint at {path} (give a checkpoint prefix, a "
                                 "checkpoint folder, a work directory or an exported encoder)")
    vocab_path = join(folder, RUN_VOCAB)
    if not tf.io.gfile.exists(vocab_path):
        raise ClicklensError(f"training.warm_start: {vocab_path} not found: the vocabulary the checkpoint was "
                             "trained with is needed to carry its token rows over (clicklens train writes it)")
    return WarmStart(prefix, load_vocab(vocab_path), archive)


def resolve(warm_start: str, checkpoints: str) -> Optional[WarmStart]:
    """What a fresh run in `checkpoints` starts from under training.warm_start, or None for random weights.

    Only a fresh run is warm-started: an interrupted run resumes from its own
    checkpoint as always.  With `latest`, a finished run found in
    `checkpoints` is the source (`archive` set: the caller moves it away once
    its weights are read), else the one archived in W/model/previous/.
    Nothing is changed on disk here.
    """
    if warm_start == "none":
        return None
    if warm_start != "latest":
        if tf.train.latest_checkpoint(checkpoints):
            return None  # this run's own checkpoints: resume
        return _from_path(warm_start)
    if tf.train.latest_checkpoint(checkpoints):
        if not is_finished(checkpoints):
            return None  # an interrupted run: resume it
        return _from_path(checkpoints, archive=True)
    previous = previous_run_dir(checkpoints)
    if not tf.train.latest_checkpoint(previous):
        logger.info("warm start: no earlier finished run under %s; starting from random weights", previous)
        return None
    return _from_path(previous)


def _pairs(new_tower: tf.keras.Model, old_tower: tf.keras.Model):
    new, old = new_tower.weights, old_tower.weights
    if [v.name for v in new] != [v.name for v in old]:
        raise ClicklensError(f"training.warm_start: the {new_tower.name} variables differ from the checkpoint's "
                             "(the model config changed?)")
    return zip(new, old)


def _carry_rows(new_var: tf.Variable, old_var: tf.Variable, new_vocab: List[str], old_ids: dict) -> int:
    """Copies the rows of the tokens both vocabularies share from old_var into new_var; returns how many."""
    rows = new_var.numpy()
    old_rows = old_var.numpy()
    carried = 0
    for new_id, token in enumerate(new_vocab):
        old_id = old_ids.get(token)
        if old_id is not None:
            rows[new_id] = old_rows[old_id]
            carried += 1
    new_var.assign(rows)
    return carried


def _copy(new_var: tf.Variable, old_var: tf.Variable, new_vocab: List[str], old_ids: dict) -> int:
    """One variable (or optimizer slot) from the old run: token rows by token, anything else as it is."""
    if "token_embedding" in new_var.name:
        return _carry_rows(new_var, old_var, new_vocab, old_ids)
    if new_var.shape != old_var.shape:
        raise ClicklensError(f"training.warm_start: {new_var.name} has shape {new_var.shape} here and "
                             f"{old_var.shape} in the checkpoint (the model config changed)")
    new_var.assign(old_var)
    return 0


def carry_over(model, old_model, new_vocab: List[str], old_vocab: List[str]) -> dict:
    """Copies the old model's tower weights into `model`: token rows by token, the rest as they are.

    Returns counts for the log: tokens carried over, new tokens (random rows).
    """
    old_ids = {token: i for i, token in enumerate(old_vocab)}
    carried = 0
    for new_var, old_var in [*_pairs(model.query_tower, old_model.query_tower),
                             *_pairs(model.image_tower, old_model.image_tower)]:
        carried += _copy(new_var, old_var, new_vocab, old_ids)
    return {"tokens_carried": carried, "new_tokens": len(new_vocab) - carried,
            "old_tokens_dropped": len(set(old_vocab) - set(new_vocab))}


def carry_over_optimizer(optimizer, old_optimizer, new_vocab: List[str], old_vocab: List[str]) -> int:
    """Copies the old run's optimizer slots into `optimizer` (both built over their models' trainable variables):
    token rows by token (a new token's slots stay zero), the rest as they are; not the step counter.

    Returns how many slot variables were copied.
    """
    new_slots = [v for v in optimizer.variables if v is not optimizer.iterations]
    old_slots = [v for v in old_optimizer.variables if v is not old_optimizer.iterations]
    if [v.name for v in new_slots] != [v.name for v in old_slots]:
        raise ClicklensError("training.warm_start_optimizer: the optimizer's slots differ from the checkpoint's "
                             "(training.optimizer or the model config changed?)")
    old_ids = {token: i for i, token in enumerate(old_vocab)}
    for new_slot, old_slot in zip(new_slots, old_slots):
        _copy(new_slot, old_slot, new_vocab, old_ids)
    return len(new_slots)


def restore_into(model, source: WarmStart, new_vocab: List[str], build_model, config) -> dict:
    """Builds the old run's model for its vocabulary, restores `source.checkpoint` and carries it into `model`
    (and, with training.warm_start_optimizer, its optimizer slots into `model.optimizer`, which must be built).

    The old model is built without its starting weights (backbone file, pretrained tower): the checkpoint
    holds every weight.
    """
    if source.export and config.training.warm_start_optimizer:
        raise ClicklensError(f"training.warm_start_optimizer: {source.checkpoint} is an export, which has no "
                             "optimizer slots; warm-start from the run's checkpoints instead")
    old_model = build_model(without_start_weights(config), len(source.vocab))
    if source.export:
        # An exported module keeps both towers under its `encoders` (trainer/export_signatures.py).
        towers = tf.Module()
        towers.query_tower, towers.image_tower = old_model.query_tower, old_model.image_tower
        parts = {"encoders": towers}
    else:
        parts = {"model": old_model}
    if config.training.warm_start_optimizer:
        # The same optimizer class and settings as this run's, built over the old model's variables.
        parts["optimizer"] = model.optimizer.__class__.from_config(model.optimizer.get_config())
        parts["optimizer"].build(old_model.trainable_variables)
    try:
        # Every variable built here must get its value (an export or a run without optimizer slots would
        # otherwise leave some silently at their initial values); the rest of the checkpoint is not needed.
        # read(), not restore(): restore() adds a save counter, which an export's variables do not have.
        with reading_checkpoint(source.checkpoint, "Set training.warm_start=none to train from scratch, or "
                                                   "name a whole checkpoint"):
            tf.train.Checkpoint(**parts).read(source.checkpoint).assert_existing_objects_matched().expect_partial()
    except (ValueError, AssertionError) as err:  # a variable of another shape, or one the checkpoint lacks
        raise ClicklensError(f"training.warm_start: {source.checkpoint} does not fit this model (the model config "
                             f"changed?): {err}") from None
    counts = carry_over(model, old_model, new_vocab, source.vocab)
    if "optimizer" in parts:
        counts["optimizer_slots"] = carry_over_optimizer(model.optimizer, parts["optimizer"], new_vocab,
                                                         source.vocab)
    logger.info("warm start from %s: %d token rows carried over, %d new tokens start random, %d old tokens gone%s",
                source.checkpoint, counts["tokens_carried"], counts["new_tokens"], counts["old_tokens_dropped"],
                f"; {counts['optimizer_slots']} optimizer slots carried over" if "optimizer" in parts else
                "; the optimizer starts fresh")
    return counts
