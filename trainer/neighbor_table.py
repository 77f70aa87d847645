"""Neighbours' embeddings from a table refreshed every N steps (opt-in: training.graph_neighbor_table_steps).

NSL's graph term puts each neighbour through the image tower with gradient,
and on a CPU the tower is nearly all of a training step: a batch's 3
neighbours per example about triple the tower's work (README, "Throughput").
With this opt-in, the tower embeds every corpus image (the image table,
trainer/image_table.py) every N optimizer steps, in inference mode and
without augmentation, and a batch looks its neighbours' embeddings up by
image key.  The graph term still pulls each example's image towards its
neighbours, now towards embeddings at most N steps old that are constants to
the optimizer; the tower embeds only positives and hard negatives.

Not NSL's exact gradient: a neighbour is not pulled back towards the image.
A refresh costs a forward pass over the corpus (about 0.1 s for the demo's
2,000 images on 2 cores, about a minute for 1M), so N should grow with the
corpus.  The table lives beside the model, not in its checkpoints: it is
rebuilt from the tower at the first step of every run.
"""

from __future__ import annotations

import logging
import time

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from trainer.callbacks import optimizer_step
from trainer.image_table import ImageTable, to_pixels

logger = logging.getLogger(__name__)

# Corpus images embedded per tower call during a refresh.
REFRESH_BATCH = 512


class NeighborEmbeddingTable:
    """The embedding of every image of an ImageTable, by the table's sorted keys; refreshed from a tower.

    Create it under the training strategy's scope, so that every replica
    reads its own copy of the embeddings.
    """

    def __init__(self, images: ImageTable, dim: int):
        self.images = images
        self.embeddings = tf.Variable(tf.zeros([len(images), dim]), trainable=False, name="neighbor_embeddings")
        self.refreshed_at = None  # the optimizer step of the last refresh

    def __len__(self) -> int:
        return len(self.images)

    @tf.function(reduce_retracing=True)
    def _embed(self, tower, rows):
        return tf.cast(tower(to_pixels(rows), training=False), tf.float32)

    def refresh(self, tower: tf.keras.Model) -> None:
        """Embeds every image with `tower` (inference mode, no augmentation) into the table."""
        parts = [self._embed(tower, self.images.pixels[start:start + REFRESH_BATCH])
                 for start in range(0, len(self), REFRESH_BATCH)]
        self.embeddings.assign(tf.concat(parts, axis=0))

    def lookup(self, keys: tf.Tensor) -> tf.Tensor:
        """int64 image keys [...] -> their embeddings [..., D] (no gradient); a key not in the table is an error."""
        found = tf.gather(self.embeddings, self.images.row_indices(tf.reshape(keys, [-1])))
        return tf.reshape(found, tf.concat([tf.shape(keys), [found.shape[-1]]], axis=0))


class RefreshNeighborTable(tf.keras.callbacks.Callback):
    """Refreshes a NeighborEmbeddingTable before the first step of a run and then every `every` steps."""

    def __init__(self, table: NeighborEmbeddingTable, tower: tf.keras.Model, every: int):
        super().__init__()
        self.table, self.tower, self.every = table, tower, every

    def on_train_batch_begin(self, batch, logs=None):
        step = optimizer_step(self.model)
        if self.table.refreshed_at is not None and step - self.table.refreshed_at < self.every:
            return
        started = time.perf_counter()
        self.table.refresh(self.tower)
        if self.table.refreshed_at is None:
            logger.info("graph term: neighbours' embeddings from a table of %d corpus images, refreshed every %d "
                        "steps (the first refresh took %.2f s)", len(self.table) - 1, self.every,
                        time.perf_counter() - started)
        self.table.refreshed_at = step
