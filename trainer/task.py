"""`clicklens train` and `python -m trainer.task` (the Vertex AI entry point).

Trains the two-tower model on W/examples/train-*, checkpointing every
`training.checkpoint_every_steps` steps so a killed run resumes where its last
checkpoint left off, then evaluates (trainer/evaluate.py).

Vertex AI's environment is honoured: AIP_CHECKPOINT_DIR (checkpoints),
AIP_TENSORBOARD_LOG_DIR (TensorBoard) and AIP_MODEL_DIR (the final model
weights and metrics.json are copied there).

    python -m trainer.task --config configs/tpu.yaml --workdir gs://B/run --set training.epochs=3
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens import cli
from clicklens.errors import ClicklensError
from clicklens.workdir import join
from trainer import input as model_input
from trainer import strategy as strategies
from trainer.callbacks import CheckpointEverySteps, TrainingProgress
from trainer.model import TwoTowerModel, build_model, checkpoint_dir
from trainer.tokenizer import QueryTokenizer

logger = logging.getLogger(__name__)


class TrainingDiverged(ClicklensError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def tensorboard_dir(workdir) -> str:
    """$AIP_TENSORBOARD_LOG_DIR on Vertex AI, else W/model/tensorboard."""
    return os.environ.get("AIP_TENSORBOARD_LOG_DIR") or workdir.tensorboard


def make_optimizer(training) -> tf.keras.optimizers.Optimizer:
    """The configured optimizer at training.learning_rate."""
    optimizers = {"adam": tf.keras.optimizers.Adam, "adagrad": tf.keras.optimizers.Adagrad,
                  "sgd": tf.keras.optimizers.SGD}
    return optimizers[training.optimizer](learning_rate=training.learning_rate)


def steps_per_epoch(config, workdir, global_batch: int) -> int:
    """training.steps_per_epoch, or one pass over train-* in whole global batches."""
    if config.training.steps_per_epoch:
        return config.training.steps_per_epoch
    examples = model_input.count_examples(workdir.split_glob("train"))
    steps = examples // global_batch
    if steps < 1:
        raise ClicklensError(f"{examples} training examples: fewer than one global batch of {global_batch} "
                             f"(lower training.per_replica_batch_size)")
    logger.info("%d training examples -> %d steps per epoch of %d", examples, steps, global_batch)
    return steps


def _check_eval_batches(workdir, global_batch: int) -> None:
    """Early stopping watches val_loss, which needs at least one whole global batch of eval-*."""
    examples = model_input.count_examples(workdir.split_glob("eval"))
    if examples < global_batch:
        # Keras would only warn that val_loss is missing and never stop.
        raise ClicklensError(f"training.early_stopping_patience watches the eval loss, but the {examples} eval "
                             f"examples are fewer than one global batch of {global_batch} (lower "
                             f"training.per_replica_batch_size, raise pipeline.eval_fraction or set "
                             f"training.early_stopping_patience=0)")


def _fit(model, dataset, callbacks, first_epoch: int, epochs: int, steps: int, skip: int, verbose, **kwargs):
    """model.fit from a resumed position: finishes a partly done epoch first, then the rest."""
    if skip:
        model.fit(dataset, initial_epoch=first_epoch, epochs=first_epoch + 1, steps_per_epoch=steps - skip,
                  callbacks=callbacks, verbose=verbose, **kwargs)
        first_epoch += 1
        if model.stop_training:
            return
    if first_epoch < epochs:
        model.fit(dataset, initial_epoch=first_epoch, epochs=epochs, steps_per_epoch=steps,
                  callbacks=callbacks, verbose=verbose, **kwargs)


def train(config, workdir) -> TwoTowerModel:
    """Trains (or resumes training) and returns the model with its final weights."""
    t = config.training
    tf.keras.utils.set_random_seed(t.seed)
    strategies.set_precision(t)
    strategy = strategies.make_strategy(t)
    global_batch = strategies.global_batch_size(t, strategy)
    tokenizer = QueryTokenizer(workdir.vocab, config.model.max_query_tokens)
    steps = steps_per_epoch(config, workdir, global_batch)
    total_steps = steps * t.epochs
    if t.early_stopping_patience:
        _check_eval_batches(workdir, global_batch)
    dataset = model_input.make_dataset(config, workdir, "train", global_batch, training=True, tokenizer=tokenizer)

    with strategy.scope():
        model = build_model(config, tokenizer.vocab_size)
        model.compile(optimizer=make_optimizer(t), steps_per_execution=t.steps_per_execution)
        # Optimizer slots exist before restoring, so a checkpoint restores them immediately.
        model.optimizer.build(model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    latest = tf.train.latest_checkpoint(checkpoint_dir(workdir))
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
    done = int(model.optimizer.iterations.numpy())
    if done:
        logger.info("resuming from %s at step %d of %d", latest, done, total_steps)
    if done >= total_steps:
        logger.info("all %d steps already done", total_steps)
        return model

    # Every multi-worker process must take part in saving; only the chief writes to the run's
    # directories, the others to a scratch directory removed at the end.
    scratch = None if strategies.is_chief(strategy) else tempfile.mkdtemp(prefix="clicklens-worker-")
    manager = tf.train.CheckpointManager(checkpoint, scratch or checkpoint_dir(workdir), max_to_keep=3)
    saver = CheckpointEverySteps(manager, t.checkpoint_every_steps)
    callbacks = [saver, TrainingProgress(total_steps, global_batch, t.log_every_steps),
                 tf.keras.callbacks.TensorBoard(scratch or tensorboard_dir(workdir), update_freq=t.checkpoint_every_steps)]
    kwargs = {}
    early_stopping = None
    if t.early_stopping_patience:
        kwargs["validation_data"] = model_input.make_dataset(config, workdir, "eval", global_batch,
                                                             training=False, tokenizer=tokenizer)
        early_stopping = tf.keras.callbacks.EarlyStopping(monitor="val_loss", patience=t.early_stopping_patience)
        callbacks.append(early_stopping)
    logger.info("training %d steps (%d epochs x %d) on global batches of %d", total_steps - done, t.epochs,
                steps, global_batch)
    started = time.time()
    try:
        _fit(model, dataset, callbacks, done // steps, t.epochs, steps, done % steps, verbose=0, **kwargs)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # A barrier: no worker leaves (and the chief's evaluation starts) until all have finished.
        strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1.0)), axis=None)
    if saver.diverged_at is not None:
        kept = tf.train.latest_checkpoint(checkpoint_dir(workdir))
        raise TrainingDiverged(
            f"training loss became NaN/inf at step {saver.diverged_at}; stopped. The last good checkpoint is kept: "
            f"{kept or 'none was written'} (lower training.learning_rate or use float32)")
    if early_stopping is not None and early_stopping.stopped_epoch:
        logger.info("early stopping: val_loss has not improved for %d epochs; stopped after epoch %d of %d",
                    t.early_stopping_patience, early_stopping.stopped_epoch + 1, t.epochs)
    logger.info("trained to step %d in %.1f s", int(model.optimizer.iterations.numpy()), time.time() - started)
    return model


def _copy_to_model_dir(model, workdir) -> None:
    """Vertex AI: writes the final weights and metrics.json under $AIP_MODEL_DIR."""
    model_dir = os.environ.get("AIP_MODEL_DIR")
    if not model_dir:
        return
    tf.train.Checkpoint(model=model).write(join(model_dir, "checkpoint", "model"))
    if tf.io.gfile.exists(workdir.metrics):
        tf.io.gfile.copy(workdir.metrics, join(model_dir, "metrics.json"), overwrite=True)
    logger.info("copied the model and metrics to AIP_MODEL_DIR=%s", model_dir)


def run(config, workdir, args) -> int:
    """The `clicklens train` verb: train, then evaluate into W/model/metrics.json."""
    from trainer import evaluate

    model = train(config, workdir)
    if not strategies.is_chief(model.distribute_strategy):
        return 0  # the chief evaluates and writes the outputs
    evaluate.evaluate_and_write(config, workdir, model)
    _copy_to_model_dir(model, workdir)
    return 0


def main(argv=None) -> int:
    """`python -m trainer.task --config ... --workdir ... --set ...`: the `train` verb's command line."""
    return cli.main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
