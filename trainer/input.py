"""tf.data input: the pipeline's TFRecords -> fixed-shape numeric batches.

Everything that touches strings happens here, on the host: parsing, query
tokenizing, image decoding and augmentation, hashing image ids.  The model
only ever sees the numeric features named below, with static shapes
(`drop_remainder=True`, fixed token padding, fixed neighbour / negative
slots), so the same model runs on TPU, GPU and CPU.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens import features
from clicklens.errors import ClicklensError
from clicklens.images import prepare_images
from trainer.tokenizer import QueryTokenizer

logger = logging.getLogger(__name__)

# The model's input features (all numeric).
QUERY_TOKENS = "query_tokens"            # int32 [B, max_query_tokens]
IMAGE = "image"                          # float32 [B, S, S, 3] or [B, feature_dim]
IMAGE_KEY = "image_key"                  # int64 [B], hash of image_id (accidental-hit removal)
CLICK_WEIGHT = features.CLICK_WEIGHT     # float32 [B]
CANDIDATE_PROBABILITY = features.CANDIDATE_PROBABILITY  # float32 [B]
NEIGHBOR_IMAGES = "neighbor_images"      # float32 [B, K, ...image]
NEIGHBOR_WEIGHTS = "neighbor_weights"    # float32 [B, K], 0 for padded slots
NEGATIVE_IMAGES = "negative_images"      # float32 [B, J, ...image]
NEGATIVE_KEYS = "negative_keys"          # int64 [B, J]
NEGATIVE_MASK = "negative_mask"          # float32 [B, J], 1 for real negatives


def image_id_key(image_ids):
    """tf.string image ids -> int64 keys (a 63-bit hash; collisions inside a batch are negligible)."""
    return tf.strings.to_hash_bucket_fast(image_ids, 2 ** 63 - 1)


def list_files(pattern: str):
    """The files matching a glob, sorted; ClicklensError when there are none."""
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise ClicklensError(f"no files match {pattern} (run `clicklens pipeline` first)")
    return files


def image_batch(config, values):
    """Parsed image feature of a batch (bytes [B] or floats [B, F]) -> model input."""
    if config.pipeline.image_source == "features":
        return tf.cast(values, tf.float32)
    return prepare_images(values, config.pipeline.image_size, allow_empty=True)


def _augment(images, seed: int):
    """Light augmentation of a pixel batch: random flips and brightness / contrast jitter."""
    images = tf.image.random_flip_left_right(images, seed=seed)
    images = tf.image.random_brightness(images, 0.1, seed=seed)
    images = tf.image.random_contrast(images, 0.9, 1.1, seed=seed)
    return tf.clip_by_value(images, 0.0, 1.0)


def _slots(config, parsed, key_fn, count: int):
    """Stacks slots 0..count-1 of an image feature -> ([B, count, ...] images, [B, count] id strings)."""
    image = features.image_key(config.pipeline.image_source)
    ids = tf.stack([parsed[key_fn(i, features.IMAGE_ID)] for i in range(count)], axis=1)
    raw = tf.stack([parsed[key_fn(i, image)] for i in range(count)], axis=1)
    batch = tf.shape(ids)[0]
    flat_shape = tf.concat([[-1], tf.shape(raw)[2:]], axis=0)
    decoded = image_batch(config, tf.reshape(raw, flat_shape))
    out_shape = tf.concat([[batch, count], tf.shape(decoded)[1:]], axis=0)
    return tf.reshape(decoded, out_shape), ids


def to_model_inputs(config, parsed: Dict[str, tf.Tensor], tokenizer: QueryTokenizer,
                    training: bool) -> Dict[str, tf.Tensor]:
    """A parsed batch of training examples -> the model's numeric features."""
    image = features.image_key(config.pipeline.image_source)
    out = {
        QUERY_TOKENS: tokenizer(parsed[features.QUERY]),
        IMAGE: image_batch(config, parsed[image]),
        IMAGE_KEY: image_id_key(parsed[features.IMAGE_ID]),
        CLICK_WEIGHT: parsed[features.CLICK_WEIGHT],
        CANDIDATE_PROBABILITY: parsed[features.CANDIDATE_PROBABILITY],
    }
    if training and config.training.augment and config.pipeline.image_source == "pixels":
        out[IMAGE] = _augment(out[IMAGE], config.training.seed)
    k = config.pipeline.max_neighbors
    if k and config.training.graph_multiplier > 0:  # neighbours are only decoded when the graph term is on
        images, ids = _slots(config, parsed, features.neighbor_key, k)
        weights = tf.stack([parsed[features.neighbor_weight_key(i)] for i in range(k)], axis=1)
        out[NEIGHBOR_IMAGES] = images
        # A padded slot has an empty id; its weight is forced to 0 whatever the file says.
        out[NEIGHBOR_WEIGHTS] = tf.where(tf.strings.length(ids) > 0, weights, 0.0)
    j = config.pipeline.hard_negatives
    if j:
        images, ids = _slots(config, parsed, features.negative_key, j)
        out[NEGATIVE_IMAGES] = images
        out[NEGATIVE_KEYS] = image_id_key(ids)
        out[NEGATIVE_MASK] = tf.cast(tf.strings.length(ids) > 0, tf.float32)
    return out


def _set_static_batch(inputs: Dict[str, tf.Tensor], batch_size: int) -> Dict[str, tf.Tensor]:
    """Pins the batch dimension (the reshapes above lose it) so every shape is static."""
    out = {}
    for name, value in inputs.items():
        shape = value.shape.as_list()
        shape[0] = batch_size
        out[name] = tf.ensure_shape(value, shape)
    return out


def _record_dataset(files, training: bool, seed: int):
    ds = tf.data.Dataset.from_tensor_slices(files)
    if training:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    return ds.interleave(lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
                         cycle_length=min(len(files), 8), num_parallel_calls=tf.data.AUTOTUNE,
                         deterministic=True)


def make_dataset(config, workdir, split: str, global_batch_size: int, training: bool,
                 tokenizer: Optional[QueryTokenizer] = None, repeat: Optional[bool] = None) -> tf.data.Dataset:
    """Batches of model inputs from `W/examples/<split>-*.tfrecord.gz`.

    With `training`, files and examples are shuffled, the data repeats forever
    and pixel images are lightly augmented.  Batches always have exactly
    `global_batch_size` examples (drop_remainder) so shapes are static.
    """
    if tokenizer is None:
        tokenizer = QueryTokenizer(workdir.vocab, config.model.max_query_tokens)
    spec = features.spec_from_config(config)
    ds = _record_dataset(list_files(workdir.split_glob(split)), training, config.training.seed)
    if training:
        ds = ds.shuffle(config.training.shuffle_buffer, seed=config.training.seed, reshuffle_each_iteration=True)
    if training if repeat is None else repeat:
        ds = ds.repeat()
    ds = ds.batch(global_batch_size, drop_remainder=True)
    ds = ds.map(lambda records: _set_static_batch(
        to_model_inputs(config, tf.io.parse_example(records, spec), tokenizer, training), global_batch_size),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def count_examples(pattern: str) -> int:
    """Number of records in the gzip TFRecords matching `pattern` (one pass, on the host)."""
    ds = tf.data.TFRecordDataset(list_files(pattern), compression_type="GZIP")
    return int(ds.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1).numpy())


def raw_examples(config, pattern: str, spec=None, batch_size: int = 256) -> tf.data.Dataset:
    """Parsed (not preprocessed) batches of the records matching `pattern`, in file order, last batch kept."""
    spec = spec or features.spec_from_config(config)
    ds = tf.data.TFRecordDataset(list_files(pattern), compression_type="GZIP")
    return ds.batch(batch_size).map(lambda r: tf.io.parse_example(r, spec), num_parallel_calls=tf.data.AUTOTUNE)
