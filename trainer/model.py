"""The two-tower retrieval model: query tower, image tower, losses (tfrs.Model).

Both towers take numeric inputs only (token ids, float pixels or feature
vectors; see trainer/input.py) and end in a float32 projection plus L2
normalisation, so embeddings are float32 unit vectors under any mixed
precision policy and dot products are cosine similarities.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from typing import Dict

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf
import tensorflow_recommenders as tfrs

from trainer import distinct_images, losses
from trainer import input as model_input
from trainer.strategy import needs_static_shapes
from clicklens.errors import ClicklensError
from clicklens.training_runs import checkpoint_dir
from clicklens.vocabulary import PAD_ID, load_vocab

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Query tower.


class MaskedMeanPooling(tf.keras.layers.Layer):
    """Mean of token vectors over non-padding tokens ([B, T, E], ids [B, T] -> [B, E])."""

    def call(self, vectors, token_ids):
        mask = tf.cast(tf.not_equal(token_ids, PAD_ID), vectors.dtype)[..., tf.newaxis]
        total = tf.reduce_sum(vectors * mask, axis=1)
        return total / tf.maximum(tf.reduce_sum(mask, axis=1), tf.cast(1.0, vectors.dtype))


class PositionEmbedding(tf.keras.layers.Layer):
    """Adds a learned vector per position to [B, T, E] token vectors."""

    def build(self, input_shape):
        self.positions = self.add_weight(name="positions", shape=input_shape[1:],
                                         initializer=tf.keras.initializers.RandomNormal(stddev=0.02))

    def call(self, vectors):
        return vectors + tf.cast(self.positions, vectors.dtype)


class TransformerBlock(tf.keras.layers.Layer):
    """A post-norm transformer encoder block that attends only to real tokens."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.width, self.heads, self.dropout = width, heads, dropout
        self.attention = tf.keras.layers.MultiHeadAttention(heads, width // heads, dropout=dropout)
        self.attention_norm = tf.keras.layers.LayerNormalization()
        self.hidden = tf.keras.layers.Dense(2 * width, activation="gelu")
        self.output_dense = tf.keras.layers.Dense(width)
        self.output_norm = tf.keras.layers.LayerNormalization()

    def call(self, vectors, token_ids, training=None):
        mask = tf.not_equal(token_ids, PAD_ID)
        attended = self.attention(vectors, vectors, attention_mask=mask[:, tf.newaxis, :], training=training)
        vectors = self.attention_norm(vectors + attended)
        return self.output_norm(vectors + self.output_dense(self.hidden(vectors)))

    def get_config(self):
        return {**super().get_config(), "width": self.width, "heads": self.heads, "dropout": self.dropout}


class L2Normalize(tf.keras.layers.Layer):
    """x / ||x|| on the last axis.

    Unlike UnitNormalization's epsilon of 1e-12 on the squared norm, the tiny
    epsilon here still normalises the vanishingly small outputs (~1e-10) of
    an untrained deep backbone in inference mode.
    """

    def call(self, x):
        return tf.math.l2_normalize(x, axis=-1, epsilon=1e-30)


def _embedding_head(x, config, name: str):
    """Dropout, float32 projection to embedding_dim, L2 normalisation."""
    if config.model.dropout:
        x = tf.keras.layers.Dropout(config.model.dropout)(x)
    # float32 even under a mixed policy: embeddings are compared across towers and exported.
    x = tf.keras.layers.Dense(config.model.embedding_dim, dtype="float32", name=f"{name}_projection")(x)
    return L2Normalize(dtype="float32", name=f"{name}_l2_normalize")(x)


def build_query_tower(config, vocab_size: int) -> tf.keras.Model:
    """int32 [B, max_query_tokens] token ids -> float32 [B, embedding_dim], unit length."""
    m = config.model
    tokens = tf.keras.Input(shape=(m.max_query_tokens,), dtype=tf.int32, name="query_tokens")
    x = tf.keras.layers.Embedding(vocab_size, m.token_embedding_dim, name="token_embedding")(tokens)
    if m.query_tower == "transformer":
        x = PositionEmbedding(name="position_embedding")(x)
        for i in range(m.transformer_layers):
            block = TransformerBlock(m.token_embedding_dim, m.transformer_heads, m.dropout, name=f"transformer_{i}")
            x = block(x, tokens)
    x = MaskedMeanPooling(name="masked_mean")(x, tokens)
    return tf.keras.Model(tokens, _embedding_head(x, config, "query"), name="query_tower")


# ---------------------------------------------------------------------------
# Image towers.


def image_input_shape(config):
    """Shape of one image as the image tower takes it."""
    if config.model.image_tower == "features":
        return (config.pipeline.feature_dim,)
    return (config.pipeline.image_size, config.pipeline.image_size, 3)


_BACKBONES = {
    # name -> (constructor, preprocessing of [0, 255] RGB; None when the model includes its own)
    "EfficientNetB0": (lambda: tf.keras.applications.EfficientNetB0, None),
    "MobileNetV3Small": (lambda: tf.keras.applications.MobileNetV3Small, None),
    "ResNet50": (lambda: tf.keras.applications.ResNet50, lambda: tf.keras.applications.resnet50.preprocess_input),
}


def _load_backbone_weights(backbone: tf.keras.Model, weights: str) -> None:
    """Loads `weights` (an .h5 file or a TF-format checkpoint prefix from `save_weights`) into `backbone`.

    Every backbone variable must come from the file: a file saved from another
    architecture or input size is a ClicklensError, never a silent partial load.
    """
    try:
        status = backbone.load_weights(weights)
        if status is not None:  # TF checkpoint format matches loosely unless asked
            status.assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.OpError) as e:
        raise ClicklensError(f"model.backbone_weights: {weights} does not fit {backbone.name} "
                             f"(include_top=False, pooling='avg', input {backbone.input_shape[1:]}): {e}") from e


def _backbone_features(pixels, config):
    m = config.model
    weights = m.backbone_weights
    if weights and not (tf.io.gfile.exists(weights) or tf.io.gfile.exists(weights + ".index")):
        raise ClicklensError(f"model.backbone_weights: {weights} not found (weights are never downloaded)")
    constructor, preprocess = (f() if f else None for f in _BACKBONES[m.backbone])
    x = tf.keras.layers.Rescaling(255.0, name="to_0_255")(pixels)
    if preprocess is not None:
        x = preprocess(x)
    # Built with weights=None (nothing is ever downloaded), then loaded here so that both
    # .h5 files and TF checkpoints work and a mismatched file is a clear error.
    backbone = constructor(include_top=False, weights=None, input_shape=image_input_shape(config), pooling="avg")
    if weights:
        _load_backbone_weights(backbone, weights)
    return backbone(x)


def build_image_tower(config) -> tf.keras.Model:
    """float32 [B, S, S, 3] pixels in [0, 1] (or [B, feature_dim]) -> float32 [B, embedding_dim], unit length."""
    m = config.model
    inputs = tf.keras.Input(shape=image_input_shape(config), dtype=tf.float32, name="image")
    if m.image_tower == "features":
        x = tf.keras.layers.Dense(max(2 * m.embedding_dim, 128), activation="relu", name="features_hidden")(inputs)
    elif m.image_tower == "backbone":
        x = _backbone_features(inputs, config)
    else:
        x = inputs
        for i, filters in enumerate(m.cnn_filters):
            x = tf.keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv_{i}")(x)
            x = tf.keras.layers.MaxPool2D(name=f"pool_{i}")(x) if x.shape[1] > 1 else x
        x = tf.keras.layers.GlobalAveragePooling2D(name="global_pool")(x)
        x = tf.keras.layers.Dense(2 * m.embedding_dim, activation="relu", name="cnn_hidden")(x)
    tower = tf.keras.Model(inputs, _embedding_head(x, config, "image"), name="image_tower")
    if m.image_init == "pretrained":
        load_pretrained_tower(tower, config)
    return tower


# ---------------------------------------------------------------------------
# The pretrained image tower (trainer/pretrain.py writes it).

# The model and pipeline keys that decide the image tower's variables; a pretrained tower fits when they agree.
TOWER_KEYS = ("model.image_tower", "model.backbone", "model.cnn_filters", "model.embedding_dim",
              "model.dropout", "pipeline.image_size", "pipeline.feature_dim")


def tower_description(config) -> Dict[str, object]:
    """{key: value} of TOWER_KEYS, stored next to pretrained weights."""
    return {key: getattr(getattr(config, key.split(".")[0]), key.split(".")[1]) for key in TOWER_KEYS}


def without_start_weights(config):
    """`config` whose model builds without its starting weights (backbone file, pretrained tower), for a model
    whose every weight then comes from a checkpoint: those files are neither needed nor read."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, backbone_weights="",
                                                                 image_init="random"))


def with_image_init_path(config, workdir):
    """`config` with model.image_init_path defaulted to W/pretrain/image_tower/weights (image_init=pretrained)."""
    m = config.model
    if m.image_init != "pretrained" or m.image_init_path:
        return config
    return dataclasses.replace(config, model=dataclasses.replace(m, image_init_path=workdir.pretrained_tower))


def load_pretrained_tower(tower: tf.keras.Model, config) -> None:
    """Loads model.image_init_path into `tower`: every variable, from a tower of the same shape, or ClicklensError."""
    path = config.model.image_init_path
    if not path:
        raise ClicklensError("model.image_init=pretrained: model.image_init_path is not set (`clicklens train` "
                             "defaults it to <workdir>/pretrain/image_tower/weights)")
    if not tf.io.gfile.exists(path + ".index"):
        raise ClicklensError(f"model.image_init=pretrained: no pretrained image tower at {path} (run `clicklens "
                             f"pretrain` first, set model.image_init_path, or use model.image_init=random)")
    described = path + ".json"
    if tf.io.gfile.exists(described):
        with tf.io.gfile.GFile(described) as f:
            saved = json.load(f)
        ours = tower_description(config)
        differ = [f"{key} {saved[key]!r} there, {ours[key]!r} here" for key in TOWER_KEYS
                  if key in saved and saved[key] != ours[key]]
        if differ:
            raise ClicklensError(f"model.image_init=pretrained: the tower at {path} was pretrained with another "
                                 f"shape: {'; '.join(differ)} (pretrain again or change these keys)")
    try:
        tower.load_weights(path).assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.OpError) as e:
        raise ClicklensError(f"model.image_init=pretrained: {path} does not fit this image tower: {e}") from e
    logger.info("image tower starts from the pretrained weights %s", path)


# ---------------------------------------------------------------------------
# The model.


class TwoTowerModel(tfrs.Model):
    """Query and image towers trained with a click-weighted retrieval loss plus graph regularization.

    Loss per replica = (sum over local examples of [retrieval loss + graph
    multiplier * sum_i w_i D(h(image), h(neighbour_i))]) / global batch size,
    plus scaled regularization losses.  Retrieval and graph parts are
    tracked separately (`retrieval_loss`, `graph_loss`) for TensorBoard.

    Graph regularization uses NSL's distance (nsl.lib.pairwise_distance_wrapper)
    rather than wrapping in nsl.keras.GraphRegularization: that wrapper
    regularizes a single-input model on its own outputs, whereas here the
    neighbours must go through the image tower only, alongside a second
    (query) tower and a retrieval loss that needs both.
    """

    def __init__(self, config, query_tower: tf.keras.Model, image_tower: tf.keras.Model):
        super().__init__(name="two_tower")
        self.query_tower = query_tower
        self.image_tower = image_tower
        t = config.training
        self.loss_type = t.loss
        self.temperature = t.temperature
        self.triplet_margin = t.triplet_margin
        self.logq_correction = t.logq_correction
        self.remove_accidental_hits = t.remove_accidental_hits
        self.graph_multiplier = t.graph_multiplier
        self.graph_distance = t.graph_distance
        self.graph_neighbor_gradient = t.graph_neighbor_gradient
        # With training.graph_neighbor_table_steps, trainer.task attaches a trainer.neighbor_table
        # NeighborEmbeddingTable here (a plain object: not in the checkpoints).
        self.neighbor_table = None
        self.image_chunk_size = t.image_chunk_size
        # One call of a batch's exact number of distinct images, unless the devices need static shapes.
        self.static_image_batch = not t.dynamic_image_batch or needs_static_shapes(tf.distribute.get_strategy())
        # Batch normalisation would see other statistics over the distinct images alone: every slot instead.
        self.tower_mixes_batch = distinct_images.mixes_batch(image_tower)
        self.task = losses.retrieval_task(t.temperature, t.remove_accidental_hits)
        self.loss_tracker = tf.keras.metrics.Mean(name="loss")
        self.retrieval_tracker = tf.keras.metrics.Mean(name="retrieval_loss")
        self.graph_tracker = tf.keras.metrics.Mean(name="graph_loss")

    @property
    def metrics(self):
        return [self.loss_tracker, self.retrieval_tracker, self.graph_tracker]

    # -- embeddings ---------------------------------------------------------

    def _embed_images(self, inputs, training):
        """Embeds positives, neighbours and hard negatives; each distinct image once (trainer/distinct_images.py)."""
        image = inputs[model_input.IMAGE]
        batch = image.shape[0]
        use_graph = self.graph_multiplier > 0 and model_input.NEIGHBOR_KEYS in inputs
        from_table = use_graph and self.neighbor_table is not None
        slots = [(image, inputs[model_input.IMAGE_KEY], True)]
        if use_graph and not from_table:
            if model_input.NEIGHBOR_IMAGES not in inputs:
                raise ClicklensError("the batches carry neighbour keys but no neighbour images "
                                     "(training.graph_neighbor_table_steps): attach a "
                                     "trainer.neighbor_table.NeighborEmbeddingTable to the model")
            slots.append((inputs[model_input.NEIGHBOR_IMAGES], inputs[model_input.NEIGHBOR_KEYS], False))
        if model_input.NEGATIVE_IMAGES in inputs:
            slots.append((inputs[model_input.NEGATIVE_IMAGES], inputs[model_input.NEGATIVE_KEYS], True))
        shape = (-1,) + tuple(image.shape[1:])
        images = tf.concat([tf.reshape(pixels, shape) for pixels, _, _ in slots], axis=0)
        if self.image_chunk_size and not self.tower_mixes_batch:
            keys = tf.concat([tf.reshape(k, [-1]) for _, k, _ in slots], axis=0)
            needs_gradient = None
            if not self.graph_neighbor_gradient:
                needs_gradient = tf.concat([tf.fill([k.shape.num_elements()], grad) for _, k, grad in slots], axis=0)
            embeddings = distinct_images.embed_distinct(self.image_tower, images, keys, self.image_chunk_size,
                                                        training, needs_gradient, self.static_image_batch)
        else:
            embeddings = self.image_tower(images, training=training)
        out = {"image": embeddings[:batch]}
        offset = batch
        dim = embeddings.shape[-1]
        if from_table:
            out["neighbors"] = tf.cast(self.neighbor_table.lookup(inputs[model_input.NEIGHBOR_KEYS]), embeddings.dtype)
        elif use_graph:
            k = inputs[model_input.NEIGHBOR_IMAGES].shape[1]
            out["neighbors"] = tf.reshape(embeddings[offset:offset + batch * k], [batch, k, dim])
            offset += batch * k
        if model_input.NEGATIVE_IMAGES in inputs:
            j = inputs[model_input.NEGATIVE_IMAGES].shape[1]
            out["negatives"] = tf.reshape(embeddings[offset:offset + batch * j], [batch, j, dim])
        return out

    # -- losses -------------------------------------------------------------

    def _retrieval_losses(self, query, images, inputs):
        """Per-example click-weighted retrieval loss [B] for the configured loss type."""
        weights = inputs[model_input.CLICK_WEIGHT]
        batch = query.shape[0]
        candidates = [images["image"]]
        ids = [inputs[model_input.IMAGE_KEY]]
        probabilities = [inputs[model_input.CANDIDATE_PROBABILITY]]
        # An image-only graph node (click weight 0) is no one's candidate: no query's clicks drew it, and
        # as an in-batch negative with its tiny sampling probability (logQ) it would push every image
        # without clicks, i.e. every new image, away from every query.
        valid = [tf.cast(weights > 0, tf.float32)]
        if "negatives" in images:
            negatives = images["negatives"]
            j = negatives.shape[1]
            candidates.append(tf.reshape(negatives, [batch * j, -1]))
            ids.append(tf.reshape(inputs[model_input.NEGATIVE_KEYS], [-1]))
            # Hard negatives are not drawn in proportion to their frequency the way in-batch
            # candidates are; they get the batch's mean probability, i.e. a neutral correction.
            probabilities.append(tf.fill([batch * j], tf.reduce_mean(probabilities[0])))
            valid.append(tf.reshape(inputs[model_input.NEGATIVE_MASK], [-1]))
        # All replicas' candidates: the loss is the same on any number of replicas.
        candidates = tf.concat([losses.gather_across_replicas(c) for c in candidates], axis=0)
        ids = tf.concat([losses.gather_across_replicas(c) for c in ids], axis=0)
        probabilities = tf.concat([losses.gather_across_replicas(c) for c in probabilities], axis=0)
        valid = tf.concat([losses.gather_across_replicas(c) for c in valid], axis=0)

        if self.loss_type == "softmax":
            with losses.float32_policy():
                return self.task(query, candidates, sample_weight=weights,
                                 candidate_sampling_probability=probabilities if self.logq_correction else None,
                                 candidate_ids=ids if self.remove_accidental_hits else None,
                                 compute_metrics=False, compute_batch_metrics=False,
                                 score_mask=tf.logical_or(valid[tf.newaxis, :] > 0,
                                                          tf.eye(batch, tf.shape(valid)[0]) > 0))
        positive_scores = tf.reduce_sum(query * images["image"], axis=-1)
        if self.loss_type == "pairwise" and "negatives" in images:
            # (query, clicked, shown-but-not-clicked) triples from the example's own impressions.
            negative_scores = tf.einsum("bd,bjd->bj", query, images["negatives"])
            mask = inputs[model_input.NEGATIVE_MASK]
            if self.remove_accidental_hits:
                same = tf.equal(inputs[model_input.NEGATIVE_KEYS], inputs[model_input.IMAGE_KEY][:, tf.newaxis])
                mask = mask * (1.0 - tf.cast(same, tf.float32))
        else:
            negative_scores = tf.matmul(query, candidates, transpose_b=True)
            mask = losses.negative_mask(batch, ids, valid, self.remove_accidental_hits)
        if self.loss_type == "triplet":
            return losses.triplet_loss(positive_scores, negative_scores, mask, weights, self.triplet_margin)
        return losses.pairwise_loss(positive_scores, negative_scores, mask, weights, self.temperature)

    def loss_parts(self, inputs: Dict[str, tf.Tensor], training: bool = False) -> Dict[str, tf.Tensor]:
        """{"retrieval_loss", "graph_loss"}: this replica's shares of the global-batch mean losses."""
        query = self.query_tower(inputs[model_input.QUERY_TOKENS], training=training)
        images = self._embed_images(inputs, training)
        batch = query.shape[0]
        context = tf.distribute.get_replica_context()
        global_batch = batch * (context.num_replicas_in_sync if context else 1)
        retrieval = tf.reduce_sum(self._retrieval_losses(query, images, inputs)) / global_batch
        if "neighbors" in images:
            per_example = losses.graph_loss(images["image"], images["neighbors"],
                                            inputs[model_input.NEIGHBOR_WEIGHTS], self.graph_distance)
            graph = self.graph_multiplier * tf.reduce_sum(per_example) / global_batch
        else:
            graph = tf.constant(0.0)
        return {"retrieval_loss": retrieval, "graph_loss": graph}

    def compute_loss(self, inputs, training: bool = False) -> tf.Tensor:
        """This replica's share of the total loss (retrieval + graph + regularization)."""
        inputs, _, _ = tf.keras.utils.unpack_x_y_sample_weight(inputs)  # train_on_batch passes (x,)
        parts = self.loss_parts(inputs, training)
        total = parts["retrieval_loss"] + parts["graph_loss"]
        if self.losses:
            total += tf.nn.scale_regularization_loss(tf.add_n(self.losses))
        self._track(parts, total)
        return total

    def _track(self, parts, total):
        # Each replica reports its local mean (share * replicas); Mean averages replicas on read.
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync if context else 1
        self.loss_tracker.update_state(total * replicas)
        self.retrieval_tracker.update_state(parts["retrieval_loss"] * replicas)
        self.graph_tracker.update_state(parts["graph_loss"] * replicas)

    def train_step(self, inputs):
        """One step; the optimizer applies loss scaling under mixed_float16 (compute_gradients)."""
        with tf.GradientTape() as tape:
            total = self.compute_loss(inputs, training=True)
        grads_and_vars = self.optimizer.compute_gradients(total, self.trainable_variables, tape=tape)
        # The token embedding's gradient is IndexedSlices, whose sparse update (Unique, segment
        # sums) has data-dependent shapes; dense gradients keep the step static-shaped for TPUs.
        grads_and_vars = [(tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g, v)
                          for g, v in grads_and_vars]
        self.optimizer.apply_gradients(grads_and_vars)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, inputs):
        """Evaluation losses (no update)."""
        self.compute_loss(inputs, training=False)
        return {m.name: m.result() for m in self.metrics}


def build_model(config, vocab_size: int) -> TwoTowerModel:
    """A freshly initialised two-tower model for `config` and a vocabulary of `vocab_size` tokens."""
    return TwoTowerModel(config, build_query_tower(config, vocab_size), build_image_tower(config))


_NOT_THE_CHECKPOINTS_FAULT = (tf.errors.PermissionDeniedError, tf.errors.UnauthenticatedError,
                              tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                              tf.errors.ResourceExhaustedError, tf.errors.CancelledError, tf.errors.AbortedError)


@contextlib.contextmanager
def reading_checkpoint(path: str, advice: str):
    """Turns an error from reading checkpoint `path` whose files are missing or cut short (a run stopped while
    writing it, or some of them were deleted) into a ClicklensError naming it, followed by `advice`."""
    try:
        yield
    except _NOT_THE_CHECKPOINTS_FAULT:
        raise  # a permission, a network failure, memory: the checkpoint may be whole
    # Missing files come as a plain OpError ("No such file or directory"), cut short as IndexError ("Read less
    # bytes than requested").
    except (tf.errors.OpError, IndexError) as err:
        reason = getattr(err, "message", None) or str(err)
        raise ClicklensError(f"{path}: cannot read this checkpoint ({reason.strip()}): its files are missing or "
                             f"cut short. {advice}") from None


def restore_checkpoint(checkpoint: tf.train.Checkpoint, path: str, directory: str, verb: str = "train"):
    """checkpoint.restore(path), or a ClicklensError naming `path` when its files are missing or cut short."""
    with reading_checkpoint(path, f"Point model_checkpoint_path in {directory}/checkpoint at an earlier ckpt-N "
                                  f"that is whole, or delete {directory} and run `clicklens {verb}` again"):
        return checkpoint.restore(path)


def restore_model(config, workdir) -> TwoTowerModel:
    """build_model + the latest checkpoint under checkpoint_dir(workdir); ClicklensError if there is none."""
    directory = checkpoint_dir(workdir)
    latest = tf.train.latest_checkpoint(directory)
    if latest is None:
        raise ClicklensError(f"no checkpoint under {directory} (run `clicklens train` first)")
    # Export and evaluate work on machines that do not have the starting weights' files.
    model = build_model(without_start_weights(config), len(load_vocab(workdir.vocab)))
    # The optimizer's slots stay unread.
    status = restore_checkpoint(tf.train.Checkpoint(model=model), latest, directory).expect_partial()
    try:
        status.assert_existing_objects_matched()
    except AssertionError as err:  # e.g. a pretraining checkpoint: an image tower and no query tower
        raise ClicklensError(f"{latest} is not a checkpoint of this two-tower model (some of its weights are "
                             f"missing: {str(err)[:300]})") from None
    logger.info("restored %s", latest)
    return model
