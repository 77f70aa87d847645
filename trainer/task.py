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

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Optional, Tuple

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens import cli, training_runs
from clicklens.errors import ClicklensError
from clicklens.training_runs import checkpoint_dir
from clicklens.vocabulary import load_vocab
from clicklens.workdir import join
from trainer import input as model_input
from trainer import strategy as strategies
from trainer import warm_start
from trainer.callbacks import CheckpointEverySteps, RetrievalEarlyStopping, TrainingProgress, optimizer_step
from trainer.evaluate import eval_retrieval_measure, evaluate_and_write
from trainer.model import TwoTowerModel, build_model, restore_checkpoint, with_image_init_path, without_start_weights
from trainer.neighbor_table import NeighborEmbeddingTable, RefreshNeighborTable
from trainer.tokenizer import QueryTokenizer

logger = logging.getLogger(__name__)


class TrainingDiverged(ClicklensError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def tensorboard_dir(workdir) -> str:
    """$AIP_TENSORBOARD_LOG_DIR on Vertex AI, else W/model/tensorboard."""
    return os.environ.get("AIP_TENSORBOARD_LOG_DIR") or workdir.tensorboard


def learning_rate(training, total_steps: int = 0):
    """training.learning_rate, or with lr_schedule=warmup_cosine a linear warmup to it and a cosine decay to 0.

    The schedule spans `total_steps` (all epochs); early stopping may end the
    run before the decay does.  Without `total_steps` the rate is constant.
    """
    if training.lr_schedule == "constant" or total_steps < 2:
        return training.learning_rate
    warmup = int(training.warmup_fraction * total_steps)
    if not warmup:
        return tf.keras.optimizers.schedules.CosineDecay(training.learning_rate, total_steps)
    return tf.keras.optimizers.schedules.CosineDecay(0.0, total_steps - warmup, warmup_target=training.learning_rate,
                                                     warmup_steps=warmup)


def make_optimizer(training, total_steps: int = 0) -> tf.keras.optimizers.Optimizer:
    """The configured optimizer with learning_rate(training, total_steps)."""
    optimizers = {"adam": tf.keras.optimizers.Adam, "adagrad": tf.keras.optimizers.Adagrad,
                  "sgd": tf.keras.optimizers.SGD}
    return optimizers[training.optimizer](learning_rate=learning_rate(training, total_steps))


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
    """Early stopping on the eval loss needs at least one whole global batch of eval-*."""
    examples = model_input.count_examples(workdir.split_glob("eval"))
    if examples < global_batch:
        # Keras would only warn that val_loss is missing and never stop.
        raise ClicklensError(f"training.early_stopping_metric=loss watches the eval loss, but the {examples} eval "
                             f"examples are fewer than one global batch of {global_batch} (lower "
                             f"training.per_replica_batch_size, raise pipeline.eval_fraction, watch "
                             f"training.early_stopping_metric=recall@10 or set training.early_stopping_patience=0)")


# Next to the checkpoints: where a run that stopped early says so (training_runs.read_record / write_record).
EARLY_STOPPING = "early_stopping.json"


def _early_stop_path(workdir) -> str:
    return join(checkpoint_dir(workdir), EARLY_STOPPING)


def _early_stop_record(workdir) -> dict:
    """What an earlier run that stopped early recorded next to its checkpoints ({} when none did)."""
    return training_runs.read_record(checkpoint_dir(workdir), EARLY_STOPPING)


def log_graph_nodes(config, workdir, global_batch: int) -> None:
    """Says how many image-only graph nodes (images with neighbours but no clicked query) each epoch trains on.

    They sit in train-* beside the clicked pairs, so every epoch puts each one
    through the graph term once; they are never retrieval candidates.
    """
    if not (config.pipeline.max_neighbors and config.training.graph_multiplier > 0):
        logger.info("graph term off: image-only nodes are not used")
        return
    if not tf.io.gfile.exists(workdir.report):
        return
    with tf.io.gfile.GFile(workdir.report) as f:
        report = json.load(f)
    examples = report.get("examples", {})
    image_only, train = examples.get("image_only", 0), examples.get("train", 0)
    graph = report.get("graph", {})
    logger.info("graph term: %d image-only nodes (%s cold images reached) among %d train examples: about %.1f "
                "per batch of %d, each once per epoch", image_only, graph.get("cold_images_reached", "?"), train,
                image_only * global_batch / max(train, 1), global_batch)


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


def start_plan(config, workdir) -> Tuple[object, Optional[warm_start.WarmStart]]:
    """What a run starts from: `config` with model.image_init_path defaulted, and training.warm_start's source
    (warm_start.resolve).  A warm-started or resumed run takes every weight from a checkpoint, so its config
    drops the starting weights: the pretrained tower's or backbone's file is neither read nor needed."""
    config = with_image_init_path(config, workdir)
    source = warm_start.resolve(config.training.warm_start, checkpoint_dir(workdir))
    if source is not None or tf.train.latest_checkpoint(checkpoint_dir(workdir)):
        config = without_start_weights(config)
    return config, source


def train(config, workdir) -> TwoTowerModel:
    """Trains (or resumes training) and returns the model with its final weights."""
    return _train(*start_plan(config, workdir), workdir)


def _train(config, source: Optional[warm_start.WarmStart], workdir) -> TwoTowerModel:
    """`train` from start_plan's config and warm-start source."""
    t = config.training
    tf.keras.utils.set_random_seed(t.seed)
    strategies.set_precision(t)
    strategy = strategies.make_strategy(t)
    # The evaluation at the end reads eval-* and corpus-*: a missing or damaged one must not wait for it.
    model_input.check_examples(workdir, ("train", "eval", "corpus"))
    global_batch = strategies.global_batch_size(t, strategy)
    tokenizer = QueryTokenizer(workdir.vocab, config.model.max_query_tokens)
    steps = steps_per_epoch(config, workdir, global_batch)
    epochs = run_epochs(t, checkpoint_dir(workdir), source)
    total_steps = steps * epochs
    if t.early_stopping_patience and t.early_stopping_metric == "loss":
        _check_eval_batches(workdir, global_batch)
    log_graph_nodes(config, workdir, global_batch)
    dataset = model_input.make_dataset(config, workdir, "train", global_batch, training=True, tokenizer=tokenizer)

    with strategy.scope():
        model = build_model(config, tokenizer.vocab_size)
        model.compile(optimizer=make_optimizer(t, total_steps), steps_per_execution=t.steps_per_execution)
        # Optimizer slots exist before restoring, so a checkpoint restores them immediately.
        model.optimizer.build(model.trainable_variables)
        if model_input.uses_neighbor_table(config):
            model.neighbor_table = NeighborEmbeddingTable(model_input.image_table_for(config, workdir),
                                                          model.image_tower.output_shape[-1])
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    latest = start_weights(config, workdir, model, strategy, source, epochs)
    if latest:
        restore_checkpoint(checkpoint, latest, checkpoint_dir(workdir)).assert_existing_objects_matched()
    done = int(model.optimizer.iterations.numpy())
    stopped = _early_stop_record(workdir)
    if done and stopped.get("step") == done:
        logger.info("training stopped early at step %d (epoch %d; %s); delete %s to train on", done,
                    stopped["stopped_after_epoch"], stopped["reason"], _early_stop_path(workdir))
        return model
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
    callbacks = [saver, TrainingProgress(total_steps, global_batch, t.log_every_steps)]
    if model.neighbor_table is not None:
        callbacks.insert(0, RefreshNeighborTable(model.neighbor_table, model.image_tower,
                                                 t.graph_neighbor_table_steps))
    kwargs = {}
    early_stopping = None
    # A one-epoch run has nothing to stop early or to choose between: no evaluation after its epoch.
    watch_eval = t.early_stopping_patience and epochs > 1
    start_epoch = early_stopping_start(t, epochs)
    if watch_eval:
        logger.info("early stopping: eval %s, patience %d, counting from epoch %d of %d",
                    t.early_stopping_metric, t.early_stopping_patience, start_epoch + 1, epochs)
    if watch_eval and t.early_stopping_metric == "loss":
        kwargs["validation_data"] = model_input.make_dataset(config, workdir, "eval", global_batch,
                                                             training=False, tokenizer=tokenizer)
        early_stopping = tf.keras.callbacks.EarlyStopping(monitor="val_loss", patience=t.early_stopping_patience,
                                                          start_from_epoch=start_epoch)
        callbacks.append(early_stopping)
    elif watch_eval:
        early_stopping = RetrievalEarlyStopping(eval_retrieval_measure(config, workdir, tokenizer),
                                                t.early_stopping_metric, t.early_stopping_patience,
                                                start_epoch=start_epoch)
        callbacks.append(early_stopping)
    # Last, so it also records the val_* figures the callbacks above add to the epoch's logs.
    callbacks.append(tf.keras.callbacks.TensorBoard(scratch or tensorboard_dir(workdir),
                                                    update_freq=t.checkpoint_every_steps))
    logger.info("training %d steps (%d epochs x %d) on global batches of %d", total_steps - done, epochs,
                steps, global_batch)
    started = time.time()
    try:
        _fit(model, dataset, callbacks, done // steps, epochs, steps, done % steps, verbose=0, **kwargs)
        if isinstance(early_stopping, RetrievalEarlyStopping) and early_stopping.restore_best():
            logger.info("restored the weights of epoch %d (eval %s %.4f)", early_stopping.best_epoch + 1,
                        t.early_stopping_metric, early_stopping.best)
            manager.save(checkpoint_number=optimizer_step(model))  # the final checkpoint holds the best weights
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    strategies.wait_for_all_workers(strategy)
    if saver.diverged_at is not None:
        kept = tf.train.latest_checkpoint(checkpoint_dir(workdir))
        raise TrainingDiverged(
            f"training loss became NaN/inf at step {saver.diverged_at}; stopped. The last good checkpoint is kept: "
            f"{kept or 'none was written'} (lower training.learning_rate or use float32)")
    if early_stopping is not None and early_stopping.stopped_epoch and early_stopping.stopped_epoch + 1 < epochs:
        reason = f"eval {t.early_stopping_metric} has not improved for {t.early_stopping_patience} epochs"
        logger.info("early stopping: %s; stopped after epoch %d of %d", reason, early_stopping.stopped_epoch + 1,
                    epochs)
        if strategies.is_chief(strategy):
            # A later `clicklens train` finds this and does not train past the stopping point.
            training_runs.write_record(checkpoint_dir(workdir), EARLY_STOPPING, {
                "step": optimizer_step(model), "stopped_after_epoch": early_stopping.stopped_epoch + 1,
                "reason": reason})
    if strategies.is_chief(strategy):
        # A later warm_start=latest run starts from here.
        training_runs.mark_finished(checkpoint_dir(workdir), time.time() - started)
    logger.info("trained to step %d in %.1f s", int(model.optimizer.iterations.numpy()), time.time() - started)
    return model


def early_stopping_start(training, epochs: int) -> int:
    """The first epoch (0-based) whose lack of improvement counts toward early stopping's patience.

    training.early_stopping_start_epoch, or half of the run's `epochs`: by then the warmup + cosine schedule
    has brought the learning rate below half its peak.  Counted from the first epoch, a small eval split's
    noise (eval recall@10 moving by +-0.02 between epochs over ~400 queries) stopped runs that were still
    learning (README, "New images").
    """
    if training.early_stopping_start_epoch is not None:
        return training.early_stopping_start_epoch
    return epochs // 2


def run_epochs(training, checkpoints: str, source: Optional[warm_start.WarmStart]) -> int:
    """training.warm_start_epochs for a warm-started run (also when it resumes: its plan says where it started),
    training.epochs for a run from random weights."""
    warm = source is not None or (tf.train.latest_checkpoint(checkpoints) is not None
                                  and training_runs.read_run_plan(checkpoints).get("started_from"))
    return (training.warm_start_epochs or training.epochs) if warm else training.epochs


def start_weights(config, workdir, model, strategy, source: Optional[warm_start.WarmStart], epochs: int):
    """The checkpoint this run resumes from, or None after starting `model` from an earlier run's weights
    (`source`, warm_start.resolve's answer for training.warm_start) or leaving it freshly initialised.

    The chief also records the vocabulary the run trains with next to its checkpoints.
    """
    directory = checkpoint_dir(workdir)
    if source is not None:
        with strategy.scope():
            warm_start.restore_into(model, source, load_vocab(workdir.vocab), build_model, config)
        strategies.wait_for_all_workers(strategy)  # every worker has read the weights before they move
        if source.archive and strategies.is_chief(strategy):
            training_runs.archive_finished_run(directory)
    latest = None if source is not None else tf.train.latest_checkpoint(directory)
    if strategies.is_chief(strategy) and latest is None:  # a new run
        training_runs.record_run_vocab(directory, workdir.vocab)
        training_runs.write_run_plan(directory, epochs, source.checkpoint if source is not None else "")
    return latest


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
    config, source = start_plan(config, workdir)  # the evaluation's untrained baseline starts as this run does
    with model_input.naming_damaged_examples(workdir):
        model = _train(config, source, workdir)
        if not strategies.is_chief(model.distribute_strategy):
            return 0  # the chief evaluates and writes the outputs
        evaluate_and_write(config, workdir, model)
    _copy_to_model_dir(model, workdir)
    return 0


def main(argv=None) -> int:
    """`python -m trainer.task --config ... --workdir ... --set ...`: the `train` verb's command line."""
    return cli.main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
