"""`clicklens pretrain` and `python -m trainer.pretrain` (its Vertex AI entry point): the image tower learns to see.

SimCLR on every decodable catalog image, logged or not: the pipeline's
`corpus-*` split already holds each good catalog image once, prepared, so it
is the image table pretraining reads (trainer/image_table.py), no extra
pipeline stage.  Each step takes a global batch of images, makes two random
views of each (trainer/augment.py), puts both through the same image tower
`train` builds (trainer/model.py), and minimises NT-Xent (trainer/losses.py)
with every other view of the global batch as a negative.  By default the loss
is on the tower's own embeddings; with `pretrain.projection_dim` it is on a
projection head's output, and the head is dropped at the end (on the demo the
head made the embeddings that get compared worse: README, "Pretraining").
The tower's weights go to
W/pretrain/image_tower/weights, where `model.image_init: pretrained` finds
them, and as an image_encoder SavedModel to W/pretrain/image_encoder/<v>/,
which the content graph's `model` source can use before any click training
(`pipeline.content_graph.model_dir`).

Strategy, precision, optimizer, learning-rate schedule, checkpoints (resume),
TensorBoard, progress lines and seed come from the `training` section, as in
`train`; epochs, batch size, rate, temperature, head and augmentations from
`pretrain`.  At the end the seeing evaluation (trainer/seeing.py) is printed
and written to W/pretrain/report.json.  Vertex AI's AIP_CHECKPOINT_DIR,
AIP_TENSORBOARD_LOG_DIR and AIP_MODEL_DIR are honoured.

SimCLR rather than BYOL or SimSiam: on 2 CPU cores a step of all three costs
two passes through the tower (BYOL adds a third for its momentum copy), and
SimCLR's explicit negatives make it learn from the first epochs at the
modest batches a CPU affords, whereas SimSiam and BYOL avoid collapse only
through their predictor and schedules that take hundreds of epochs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens import cli
from clicklens import servables as S
from clicklens.errors import ClicklensError
from clicklens.training_runs import checkpoint_dir
from clicklens.workdir import join
from trainer import augment, losses, seeing
from trainer import input as model_input
from trainer import strategy as strategies
from trainer.callbacks import CheckpointEverySteps, TrainingProgress, optimizer_step
from trainer.export_signatures import Encoders, ImageEncoder
from trainer.image_table import to_pixels
from trainer.model import build_image_tower, restore_checkpoint, restore_model, tower_description
from trainer.task import TrainingDiverged, make_optimizer

logger = logging.getLogger(__name__)


class ContrastivePretrainer(tf.keras.Model):
    """The image tower plus a projection head, trained with NT-Xent on pairs of views."""

    def __init__(self, image_tower: tf.keras.Model, pretrain):
        super().__init__(name="pretrainer")
        self.image_tower = image_tower
        layers = []
        if pretrain.projection_dim:  # 0: no head, the loss is on the tower's own embeddings
            if pretrain.projection_hidden:
                layers.append(tf.keras.layers.Dense(pretrain.projection_hidden, activation="relu",
                                                    name="head_hidden"))
            layers.append(tf.keras.layers.Dense(pretrain.projection_dim, dtype="float32", name="head_output"))
        self.head = tf.keras.Sequential(layers, name="projection_head")
        self.temperature = pretrain.temperature
        self.loss_tracker = tf.keras.metrics.Mean(name="loss")

    @property
    def metrics(self):
        return [self.loss_tracker]

    def call(self, images, training=False):
        return self.head(self.image_tower(images, training=training), training=training)

    def compute_loss(self, views, training: bool = False) -> tf.Tensor:
        """This replica's share of the global-batch mean NT-Xent (both views of every image)."""
        view_a, view_b = views
        local = view_a.shape[0]
        # One tower call for both views: batch statistics (a backbone's batch norm) see the whole batch.
        projections = self(tf.concat([view_a, view_b], axis=0), training=training)
        per_view = losses.nt_xent_loss(projections[:local], projections[local:], self.temperature)
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync if context else 1
        total = tf.reduce_sum(per_view) / (2 * local * replicas)
        if self.losses:
            total += tf.nn.scale_regularization_loss(tf.add_n(self.losses))
        self.loss_tracker.update_state(total * replicas)  # this replica's mean; Mean averages replicas
        return total

    def train_step(self, views):
        """One step; the optimizer applies loss scaling under mixed_float16 (compute_gradients)."""
        with tf.GradientTape() as tape:
            total = self.compute_loss(views, training=True)
        grads_and_vars = self.optimizer.compute_gradients(total, self.trainable_variables, tape=tape)
        self.optimizer.apply_gradients(grads_and_vars)
        return {m.name: m.result() for m in self.metrics}


# ---------------------------------------------------------------------------
# Data and paths.


def pretrain_config(config):
    """`config` as pretraining builds its tower: from random weights (model.image_init is what `train` starts from)."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, image_init="random"))


def corpus_pixels(config, workdir) -> tf.Tensor:
    """uint8 [N, S, S, 3]: every corpus image once, from the image table (its empty-id zero row left out)."""
    if config.pipeline.image_source != "pixels":
        raise ClicklensError("clicklens pretrain needs pipeline.image_source=pixels (its views are pixel crops, "
                             "flips and colour jitter)")
    table = model_input.image_table_for(config, workdir)
    return tf.boolean_mask(table.pixels, table.keys != model_input.empty_key())


def make_dataset(config, pixels: tf.Tensor, global_batch: int) -> tf.data.Dataset:
    """Endless (view_a, view_b) batches: images shuffled every epoch, each view drawn independently."""
    count = int(pixels.shape[0])
    view = config.pretrain.augment

    def views(rows):
        images = to_pixels(tf.gather(pixels, rows))
        return augment.random_view(images, view), augment.random_view(images, view)

    ds = tf.data.Dataset.range(count).shuffle(count, seed=config.training.seed, reshuffle_each_iteration=True)
    return (ds.repeat().batch(global_batch, drop_remainder=True)
            .map(views, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))


def steps_per_epoch(config, images: int, global_batch: int) -> int:
    """pretrain.steps_per_epoch, or one pass over the corpus in whole global batches."""
    if config.pretrain.steps_per_epoch:
        return config.pretrain.steps_per_epoch
    if images < global_batch:
        raise ClicklensError(f"{images} corpus images: fewer than one global batch of {global_batch} "
                             f"(lower pretrain.per_replica_batch_size)")
    return images // global_batch


def pretrain_checkpoints(workdir) -> str:
    """$AIP_CHECKPOINT_DIR on Vertex AI, else W/pretrain/checkpoints."""
    return os.environ.get("AIP_CHECKPOINT_DIR") or join(workdir.pretrain, "checkpoints")


def pretrain_tensorboard(workdir) -> str:
    """$AIP_TENSORBOARD_LOG_DIR on Vertex AI, else W/pretrain/tensorboard."""
    return os.environ.get("AIP_TENSORBOARD_LOG_DIR") or join(workdir.pretrain, "tensorboard")


def _schedule(config):
    """The `training` section with pretrain's rate, for make_optimizer (same optimizer and schedule as train)."""
    return dataclasses.replace(config.training, learning_rate=config.pretrain.learning_rate)


# ---------------------------------------------------------------------------
# Pretraining.


def pretrain(config, workdir) -> tf.keras.Model:
    """Pretrains (or resumes pretraining) and returns the image tower with its final weights."""
    config = pretrain_config(config)
    t, p = config.training, config.pretrain
    tf.keras.utils.set_random_seed(t.seed)
    strategies.set_precision(t)
    strategy = strategies.make_strategy(t)
    model_input.check_examples(workdir, ("corpus",))
    global_batch = p.per_replica_batch_size * strategy.num_replicas_in_sync
    pixels = corpus_pixels(config, workdir)
    steps = steps_per_epoch(config, int(pixels.shape[0]), global_batch)
    total_steps = steps * p.epochs
    logger.info("pretraining on %d corpus images (every decodable catalog image): %d steps per epoch of %d "
                "images x 2 views", pixels.shape[0], steps, global_batch)
    dataset = make_dataset(config, pixels, global_batch)

    with strategy.scope():
        model = ContrastivePretrainer(build_image_tower(config), p)
        model.compile(optimizer=make_optimizer(_schedule(config), total_steps),
                      steps_per_execution=t.steps_per_execution)
        model.build(model.image_tower.input_shape)
        model.optimizer.build(model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    latest = tf.train.latest_checkpoint(pretrain_checkpoints(workdir))
    if latest:
        status = restore_checkpoint(checkpoint, latest, pretrain_checkpoints(workdir), "pretrain")
        status.assert_existing_objects_matched()
    done = optimizer_step(model)
    if done >= total_steps:
        logger.info("all %d pretraining steps already done", total_steps)
        return model.image_tower
    if done:
        logger.info("resuming from %s at step %d of %d", latest, done, total_steps)

    scratch = None if strategies.is_chief(strategy) else tempfile.mkdtemp(prefix="clicklens-worker-")
    manager = tf.train.CheckpointManager(checkpoint, scratch or pretrain_checkpoints(workdir), max_to_keep=3)
    saver = CheckpointEverySteps(manager, t.checkpoint_every_steps)
    callbacks = [saver, TrainingProgress(total_steps, global_batch, t.log_every_steps),
                 tf.keras.callbacks.TensorBoard(scratch or pretrain_tensorboard(workdir),
                                                update_freq=t.checkpoint_every_steps)]
    logger.info("pretraining %d steps (%d epochs x %d)", total_steps - done, p.epochs, steps)
    started = time.time()
    try:
        first = done // steps
        if done % steps:  # finish the partly done epoch first
            model.fit(dataset, initial_epoch=first, epochs=first + 1, steps_per_epoch=steps - done % steps,
                      callbacks=callbacks, verbose=0)
            first += 1
        if first < p.epochs and not model.stop_training:
            model.fit(dataset, initial_epoch=first, epochs=p.epochs, steps_per_epoch=steps, callbacks=callbacks,
                      verbose=0)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    strategies.wait_for_all_workers(strategy)
    if saver.diverged_at is not None:
        raise TrainingDiverged(f"pretraining loss became NaN/inf at step {saver.diverged_at}; stopped (lower "
                               f"pretrain.learning_rate or use float32)")
    logger.info("pretrained to step %d in %.1f s", optimizer_step(model), time.time() - started)
    return model.image_tower


# ---------------------------------------------------------------------------
# Outputs.


def save_tower(config, tower: tf.keras.Model, path: str) -> None:
    """The tower's weights at `path` (a save_weights prefix) and its shape keys at `path`.json."""
    tf.io.gfile.makedirs(path.rsplit("/", 1)[0])
    tower.save_weights(path)
    with tf.io.gfile.GFile(path + ".json", "w") as f:
        json.dump(tower_description(config), f, indent=2)
    logger.info("wrote the pretrained image tower to %s", path)


def save_image_encoder(config, workdir, tower: tf.keras.Model) -> str:
    """The tower as an image_encoder SavedModel (raw image bytes -> embedding) under W/pretrain/image_encoder/<v>/."""
    p = config.pipeline
    encoders = Encoders(None, None, tower, p.image_source, p.image_size, p.feature_dim, p.max_image_pixels)
    module = ImageEncoder(encoders)
    base = join(workdir.pretrain, S.IMAGE_ENCODER)
    version = max(S.version_dirs(base, complete_only=False), default=0) + 1
    tmp, final = S.start_version(base, version)
    tf.saved_model.save(module, tmp, signatures=module.signatures())
    tf.io.gfile.rename(tmp, final)
    logger.info("wrote %s (pipeline.content_graph.source=model with pipeline.content_graph.model_dir=%s uses it)",
                final, base)
    return final


def seeing_towers(config, workdir, pretrained: tf.keras.Model):
    """{random, pretrained, click_trained (when W/model has a checkpoint that fits)} image towers."""
    tf.keras.utils.set_random_seed(config.training.seed)
    towers = {"random": build_image_tower(config), "pretrained": pretrained}
    # On Vertex AI checkpoint_dir is $AIP_CHECKPOINT_DIR, which in a pretraining job holds the pretraining's own
    # checkpoints: restore_model refuses them (not a whole two-tower model), so there is no click-trained row.
    if tf.io.gfile.exists(checkpoint_dir(workdir)) and tf.train.latest_checkpoint(checkpoint_dir(workdir)):
        try:
            towers["click_trained"] = restore_model(config, workdir).image_tower
        except (ClicklensError, ValueError, tf.errors.OpError) as e:
            logger.warning("seeing: the click-trained tower of %s does not fit this config, left out (%s)",
                           checkpoint_dir(workdir), str(e).splitlines()[0])
    return towers


def run(config, workdir, args) -> int:
    """The `clicklens pretrain` verb: pretrain, save the tower, evaluate seeing into W/pretrain/report.json."""
    started = time.time()
    with model_input.naming_damaged_examples(workdir):
        tower = pretrain(config, workdir)
    seconds = time.time() - started
    if not strategies.is_chief(tower.distribute_strategy):
        return 0
    config = pretrain_config(config)
    save_tower(config, tower, workdir.pretrained_tower)
    encoder = save_image_encoder(config, workdir, tower)
    report = {"seconds": seconds, "image_encoder": encoder, "weights": workdir.pretrained_tower,
              "seeing": seeing.evaluate(config, workdir, seeing_towers(config, workdir, tower))}
    with tf.io.gfile.GFile(workdir.pretrain_report, "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    print(seeing.format_table(report["seeing"]), flush=True)
    model_dir = os.environ.get("AIP_MODEL_DIR")
    if model_dir:
        save_tower(config, tower, join(model_dir, "image_tower", "weights"))
    return 0


def main(argv=None) -> int:
    """`python -m trainer.pretrain --config ... --workdir ... --set ...`: the `pretrain` verb's command line."""
    return cli.main(["pretrain", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
