"""tf.data input: the pipeline's TFRecords -> fixed-shape numeric batches.

Everything that touches strings happens here, on the host: parsing, query
tokenizing, image decoding and augmentation, hashing image ids.  The model
only ever sees the numeric features named below, with static shapes
(`drop_remainder=True`, fixed token padding, fixed neighbour / negative
slots), so the same model runs on TPU, GPU and CPU.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import logging
import re
import struct
import zlib
from typing import Dict, Optional

import numpy as np

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens import features
from clicklens.errors import ClicklensError
from clicklens.images import prepare_images
from trainer import augment, graph_batches
from trainer.image_table import ImageTable, load_image_table, to_pixels
from trainer.tokenizer import QueryTokenizer

logger = logging.getLogger(__name__)

# The model's input features (all numeric).
QUERY_TOKENS = "query_tokens"            # int32 [B, max_query_tokens]
IMAGE = "image"                          # float32 [B, S, S, 3] or [B, feature_dim]
IMAGE_KEY = "image_key"                  # int64 [B], hash of image_id (accidental-hit removal)
CLICK_WEIGHT = features.CLICK_WEIGHT     # float32 [B]
CANDIDATE_PROBABILITY = features.CANDIDATE_PROBABILITY  # float32 [B]
NEIGHBOR_IMAGES = "neighbor_images"      # float32 [B, K, ...image]
NEIGHBOR_KEYS = "neighbor_keys"          # int64 [B, K], hash of neighbour ids (padded: empty_key())
NEIGHBOR_WEIGHTS = "neighbor_weights"    # float32 [B, K], 0 for padded slots
NEGATIVE_IMAGES = "negative_images"      # float32 [B, J, ...image]
NEGATIVE_KEYS = "negative_keys"          # int64 [B, J]
NEGATIVE_MASK = "negative_mask"          # float32 [B, J], 1 for real negatives


def image_id_key(image_ids):
    """tf.string image ids -> int64 keys (a 63-bit hash; collisions inside a batch are negligible)."""
    return tf.strings.to_hash_bucket_fast(image_ids, 2 ** 63 - 1)


def empty_key() -> tf.Tensor:
    """The key of a padded slot's empty id (its image is all zeros).

    A function, not a module constant: an eager op at import time would start
    TensorFlow's runtime before MultiWorkerMirroredStrategy can configure it.
    """
    return image_id_key(tf.constant(""))


# Serialized examples parsed and tokenized per call.
PARSE_BATCH = 256


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
    # The pipeline wrote these PNGs after checking the originals: no header checks per training step.
    return prepare_images(values, config.pipeline.image_size, allow_empty=True, max_pixels=None)


def uses_image_table(config) -> bool:
    """Whether training looks images up in the corpus image table (trainer/image_table.py)."""
    return config.training.image_table and config.pipeline.image_source == "pixels"


# Light augmentation: random left-right flips per image, one brightness shift and one contrast factor per batch.
MAX_BRIGHTNESS_DELTA = 0.1
CONTRAST_RANGE = (0.9, 1.1)


def _augmented(images, keep, flip, brightness, contrast):
    """uint8 or float32 pixels [N, S, S, 3] -> float32 [0, 1]: mirrored where `flip` [N], then
    (x - mean) * contrast + mean + brightness (tf.image's adjust_brightness then adjust_contrast), clipped;
    rows not `keep` [N] are zeros.

    Written for speed on the host: the flip works on the uint8 rows, only on the images it mirrors
    (augment.flip_where), and brightness is added after the contrast (the same sum, one pass fewer).  As
    tf.image's random_* ops on float pixels, augmentation took about 5/6 of the input pipeline's time on a
    2-core CPU (README, "Throughput").
    """
    images = tf.image.convert_image_dtype(augment.flip_where(images, flip), tf.float32)
    images = tf.clip_by_value(tf.image.adjust_contrast(images, contrast) + brightness, 0.0, 1.0)
    return images * tf.cast(keep, tf.float32)[:, tf.newaxis, tf.newaxis, tf.newaxis]


def _augment(images, keys, seed: int):
    """Light augmentation of pixels [N, S, S, 3] with keys [N]: a random flip per image, one brightness shift
    and one contrast factor for the batch (as tf.image's random_flip_left_right, random_brightness and
    random_contrast draw them); rows of the empty id's key stay zeros."""
    return _augmented(images, keys != empty_key(),
                      tf.random.uniform([tf.shape(images)[0]], seed=seed) < 0.5,
                      tf.random.uniform([], -MAX_BRIGHTNESS_DELTA, MAX_BRIGHTNESS_DELTA, seed=seed),
                      tf.random.uniform([], *CONTRAST_RANGE, seed=seed))


# Each image slot of a batch and the slot's image keys.
_SLOTS = ((IMAGE, IMAGE_KEY), (NEIGHBOR_IMAGES, NEIGHBOR_KEYS), (NEGATIVE_IMAGES, NEGATIVE_KEYS))


def _to_slots(distinct_pixels, index, batch: Dict[str, tf.Tensor], slots) -> Dict[str, tf.Tensor]:
    """The pixels of a batch's distinct images ([D, ...]; `index` [N]: the distinct image of each slot, the slots'
    keys concatenated in `slots` order) -> each slot's images."""
    pixels = tf.gather(distinct_pixels, index)
    out, offset = {}, 0
    for images, keys in slots:
        size = tf.size(batch[keys])
        out[images] = tf.reshape(pixels[offset:offset + size],
                                 tf.concat([tf.shape(batch[keys]), tf.shape(pixels)[1:]], axis=0))
        offset += size
    return out


def images_from_table(table: ImageTable, batch: Dict[str, tf.Tensor],
                      augment_seed: Optional[int]) -> Dict[str, tf.Tensor]:
    """Every image slot of a batch, from the image table: each distinct image looked up and, with
    `augment_seed`, augmented once, so that equal keys mean equal pixels (trainer/distinct_images.py relies
    on it) and the work is per distinct image, not per slot.  Padded slots are zeros."""
    slots = [(images, keys) for images, keys in _SLOTS if keys in batch]
    keys = tf.concat([tf.reshape(batch[k], [-1]) for _, k in slots], axis=0)
    distinct, index = tf.unique(keys)
    rows = table.rows(distinct)
    pixels = to_pixels(rows) if augment_seed is None else _augment(rows, distinct, augment_seed)
    return _to_slots(pixels, index, batch, slots)


def augment_each_distinct_image(inputs: Dict[str, tf.Tensor], seed: int) -> Dict[str, tf.Tensor]:
    """Augments every distinct image of a batch once, the same wherever it appears (positive, neighbour,
    negative), so that equal image keys always mean equal pixels (trainer/distinct_images.py relies on it).
    Padded slots stay zeros."""
    slots = [(images, keys) for images, keys in _SLOTS if images in inputs]
    pixel_shape = tf.shape(inputs[IMAGE])[1:]
    keys = tf.concat([tf.reshape(inputs[k], [-1]) for _, k in slots], axis=0)
    pixels = tf.concat([tf.reshape(inputs[i], tf.concat([[-1], pixel_shape], 0)) for i, _ in slots], axis=0)
    distinct, index = tf.unique(keys)
    first = tf.math.unsorted_segment_min(tf.range(tf.shape(keys)[0]), index, tf.shape(distinct)[0])
    return {**inputs, **_to_slots(_augment(tf.gather(pixels, first), distinct, seed), index, inputs, slots)}


def _stack_slots(parsed, key_fn, feature: str, count: int):
    return tf.stack([parsed[key_fn(i, feature)] for i in range(count)], axis=1)


# The raw image features of a parsed batch, kept until the images are decoded (no image table).
_RAW = {IMAGE: "raw_image", NEIGHBOR_IMAGES: "raw_neighbor_images", NEGATIVE_IMAGES: "raw_negative_images"}


def _uses_neighbors(config) -> bool:
    # Neighbours are only read when the graph term is on.
    return bool(config.pipeline.max_neighbors and config.training.graph_multiplier > 0)


def uses_neighbor_table(config) -> bool:
    """Whether neighbours' embeddings come from a refreshed table (trainer/neighbor_table.py): the batches then
    carry neighbour keys and weights, no neighbour images."""
    return _uses_neighbors(config) and config.training.graph_neighbor_table_steps > 0


def parse_examples(config, records, tokenizer: QueryTokenizer, with_image_bytes: bool) -> Dict[str, tf.Tensor]:
    """Serialized examples [B] -> numeric_features of them (image bytes parsed only `with_image_bytes`)."""
    image = features.image_key(config.pipeline.image_source)
    spec = features.spec_from_config(config)
    if not with_image_bytes:  # the images come from the image table: do not copy their bytes out
        spec = {name: value for name, value in spec.items() if name != image and not name.endswith("_" + image)}
    return numeric_features(config, tf.io.parse_example(records, spec), tokenizer, with_image_bytes)


def numeric_features(config, parsed: Dict[str, tf.Tensor], tokenizer: QueryTokenizer,
                     with_image_bytes: bool) -> Dict[str, tf.Tensor]:
    """A parsed batch of examples -> its numeric features (tokens, keys, weights) and, with
    `with_image_bytes`, its raw image features (decoded later by `add_images`)."""
    image = features.image_key(config.pipeline.image_source)
    out = {
        QUERY_TOKENS: tokenizer(parsed[features.QUERY]),
        IMAGE_KEY: image_id_key(parsed[features.IMAGE_ID]),
        CLICK_WEIGHT: parsed[features.CLICK_WEIGHT],
        CANDIDATE_PROBABILITY: parsed[features.CANDIDATE_PROBABILITY],
    }
    if with_image_bytes:
        out[_RAW[IMAGE]] = parsed[image]
    k = config.pipeline.max_neighbors
    if _uses_neighbors(config):
        ids = _stack_slots(parsed, features.neighbor_key, features.IMAGE_ID, k)
        weights = tf.stack([parsed[features.neighbor_weight_key(i)] for i in range(k)], axis=1)
        out[NEIGHBOR_KEYS] = image_id_key(ids)
        # A padded slot has an empty id; its weight is forced to 0 whatever the file says.
        out[NEIGHBOR_WEIGHTS] = tf.where(tf.strings.length(ids) > 0, weights, 0.0)
        if with_image_bytes:
            out[_RAW[NEIGHBOR_IMAGES]] = _stack_slots(parsed, features.neighbor_key, image, k)
    j = config.pipeline.hard_negatives
    if j:
        ids = _stack_slots(parsed, features.negative_key, features.IMAGE_ID, j)
        out[NEGATIVE_KEYS] = image_id_key(ids)
        out[NEGATIVE_MASK] = tf.cast(tf.strings.length(ids) > 0, tf.float32)
        if with_image_bytes:
            out[_RAW[NEGATIVE_IMAGES]] = _stack_slots(parsed, features.negative_key, image, j)
    return out


def _decode_slots(config, raw):
    """[B, count] raw image features -> [B, count, ...] model images."""
    flat_shape = tf.concat([[-1], tf.shape(raw)[2:]], axis=0)
    decoded = image_batch(config, tf.reshape(raw, flat_shape))
    return tf.reshape(decoded, tf.concat([tf.shape(raw)[:2], tf.shape(decoded)[1:]], axis=0))


def add_images(config, batch: Dict[str, tf.Tensor], table: Optional[ImageTable], training: bool) -> Dict[str, tf.Tensor]:
    """A batch of parsed examples -> the model's inputs: images from the table (or decoded), augmented."""
    out = {name: value for name, value in batch.items() if name not in _RAW.values()}
    augmenting = training and config.training.augment and config.pipeline.image_source == "pixels"
    if table is not None:
        with_images = batch
        if uses_neighbor_table(config):  # the model looks neighbours up: only their keys and weights go along
            with_images = {name: value for name, value in batch.items() if name != NEIGHBOR_KEYS}
        out.update(images_from_table(table, with_images, config.training.seed if augmenting else None))
        return out
    for images, keys in _SLOTS:
        if keys not in batch:
            continue
        if images == IMAGE:
            out[images] = image_batch(config, batch[_RAW[images]])
        else:
            out[images] = _decode_slots(config, batch[_RAW[images]])
    if augmenting:
        out = augment_each_distinct_image(out, config.training.seed)
    return out


def to_model_inputs(config, parsed: Dict[str, tf.Tensor], tokenizer: QueryTokenizer,
                    training: bool) -> Dict[str, tf.Tensor]:
    """A parsed batch of training examples -> the model's numeric features (images decoded from the examples)."""
    return add_images(config, numeric_features(config, parsed, tokenizer, with_image_bytes=True), None, training)


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


_TABLES: Dict[tuple, ImageTable] = {}


def image_table_for(config, workdir) -> ImageTable:
    """The image table of W/examples/corpus-* (built once per process for the same files and size)."""
    files = list_files(workdir.split_glob("corpus"))
    key = (tuple(files), tuple(tf.io.gfile.stat(f).mtime_nsec for f in files), config.pipeline.image_size)
    if key not in _TABLES:
        _TABLES.clear()
        _TABLES[key] = load_image_table(config, files, image_id_key)
    return _TABLES[key]


def _graph_built_batches(config, examples: tf.data.Dataset, batch_size: int, repeat: bool) -> tf.data.Dataset:
    """Batches of the numeric examples chosen from the graph (trainer/graph_batches.py), held in memory."""
    columns = {name: [] for name in examples.element_spec}
    for batch in examples.batch(4096):
        for name, value in batch.items():
            columns[name].append(value.numpy())
    columns = {name: np.concatenate(parts) for name, parts in columns.items()}
    indices = functools.partial(graph_batches.batch_indices, columns[IMAGE_KEY], columns[NEIGHBOR_KEYS],
                                int(empty_key().numpy()), batch_size, config.training.seed, repeat)
    tensors = {name: tf.constant(value) for name, value in columns.items()}
    return (tf.data.Dataset.from_generator(indices, output_signature=tf.TensorSpec([batch_size], tf.int64))
            .map(lambda index: {name: tf.gather(value, index) for name, value in tensors.items()}))


def make_dataset(config, workdir, split: str, global_batch_size: int, training: bool,
                 tokenizer: Optional[QueryTokenizer] = None, repeat: Optional[bool] = None) -> tf.data.Dataset:
    """Batches of model inputs from `W/examples/<split>-*.tfrecord.gz`.

    With `training`, files and examples are shuffled, the data repeats forever
    and pixel images are lightly augmented.  Batches always have exactly
    `global_batch_size` examples (drop_remainder) so shapes are static.

    With `training.image_table` (pixels), examples are parsed and tokenized once
    and cached in memory as small numeric records (keys, tokens, weights), and
    each batch gathers its images from the corpus image table; otherwise each
    batch decodes its examples' own PNGs.  With the table, the graph term on and
    `training.graph_batches`, training batches are built from the graph instead
    of shuffled (trainer/graph_batches.py).
    """
    if tokenizer is None:
        tokenizer = QueryTokenizer(workdir.vocab, config.model.max_query_tokens)
    table = image_table_for(config, workdir) if uses_image_table(config) else None
    repeat = training if repeat is None else repeat
    ds = _record_dataset(list_files(workdir.split_glob(split)), training, config.training.seed)
    ds = ds.batch(PARSE_BATCH).map(lambda records: parse_examples(config, records, tokenizer, table is None),
                                   num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
    if training and table is not None and _uses_neighbors(config) and config.training.graph_batches:
        ds = _graph_built_batches(config, ds, global_batch_size, repeat)
    else:
        if table is not None:
            ds = ds.cache()
        if training:
            ds = ds.shuffle(config.training.shuffle_buffer, seed=config.training.seed,
                            reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()
        ds = ds.batch(global_batch_size, drop_remainder=True)
    ds = ds.map(lambda batch: _set_static_batch(add_images(config, batch, table, training), global_batch_size),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


# Records per file, by (path, size, modification time): a split that check_examples read at a verb's start is
# not read again to be counted.
_RECORDS: Dict[tuple, int] = {}


def damage(err: Exception) -> str:
    """TensorFlow's error message without the function and op names it wraps it in."""
    text = re.sub(r"\{\{.*?\}\}\s*", "", getattr(err, "message", None) or str(err))
    if "truncated record" in text:
        return "cut short: it ends in the middle of a record"
    if "incorrect header check" in text:
        return "not gzip data: its first bytes are not a gzip header"
    return re.sub(r"\s*\[Op:.*$", "", text, flags=re.S).strip() or type(err).__name__


# TFRecord framing around each record's bytes: its length (8 bytes) and two CRCs (4 each).
RECORD_FRAMING = 16
GZIP_MIN_BYTES = 20  # a gzip file's header (10), an empty deflate stream (2) and its trailer (8)


def _gzip_incomplete(path: str, decoded_bytes: int) -> str:
    """Why the gzip file at `path` stops short of its end ("" when it is whole).

    TensorFlow's gzip reader takes a file cut short at a record boundary (or
    before its first record) for the end of the data: the records after the
    cut would be silently lost.  A whole gzip file ends with the length of
    what it holds (ISIZE, mod 2**32); when that is not what was read (or the
    file holds several gzip members), Python's gzip reads it to its end.
    """
    with tf.io.gfile.GFile(path, "rb") as f:
        length = f.size()
        if length < GZIP_MIN_BYTES:
            return f"{length} bytes: too short for a gzip file"
        f.seek(length - 4)
        if struct.unpack("<I", f.read(4))[0] == decoded_bytes % 2 ** 32:
            return ""
    try:
        with tf.io.gfile.GFile(path, "rb") as raw, gzip.GzipFile(fileobj=raw) as f:
            while f.read(1 << 20):
                pass
    except EOFError as err:
        return f"cut short: {err}"
    except (OSError, zlib.error) as err:  # a bad CRC or length, garbage after the data
        return f"not whole gzip data: {err}"
    return ""


def count_file(path: str) -> int:
    """Number of records in one gzip TFRecord file, read to its end; ClicklensError naming the file when it is
    cut short or is not gzip TFRecords (the pipeline stopped while writing it, or it was changed since)."""
    stat = tf.io.gfile.stat(path)
    key = (path, stat.length, stat.mtime_nsec)
    if key not in _RECORDS:
        ds = tf.data.TFRecordDataset(path, compression_type="GZIP")
        zero = tf.constant(0, tf.int64)
        try:
            records, decoded = ds.reduce((zero, zero), lambda state, record: (
                state[0] + 1, state[1] + tf.cast(tf.strings.length(record), tf.int64) + RECORD_FRAMING))
            problem = _gzip_incomplete(path, int(decoded.numpy()))
        except tf.errors.DataLossError as err:
            problem = damage(err)
        if problem:
            raise ClicklensError(f"{path}: damaged TFRecord file ({problem}): run `clicklens pipeline` again "
                                 f"to rewrite the examples")
        _RECORDS[key] = int(records.numpy())
    return _RECORDS[key]


def count_examples(pattern: str) -> int:
    """Number of records in the gzip TFRecords matching `pattern` (one pass, on the host)."""
    return sum(count_file(path) for path in list_files(pattern))


# The most bytes of one split that check_examples reads through before a verb's work.  Up to this size the
# extra read costs seconds; a larger split (a catalog of millions of images on GCS, where Beam's writes are
# all-or-nothing) is only listed, and damage in it is named when the verb reaches it (naming_damaged_examples).
CHECK_READ_LIMIT_BYTES = 1 << 30


def check_examples(workdir, splits) -> None:
    """Before a verb's work: each split (train, eval, corpus) has TFRecords and, up to CHECK_READ_LIMIT_BYTES a
    split, every file reads to its end.  A missing or damaged file is a ClicklensError then, not a traceback
    from deep inside tf.data after an hour of training.

    It runs TensorFlow ops: call it after the distribution strategy is made (MultiWorkerMirroredStrategy must
    configure collective ops before any op runs)."""
    for split in splits:
        files = list_files(workdir.split_glob(split))
        _check_shards_complete(files)
        if sum(tf.io.gfile.stat(path).length for path in files) <= CHECK_READ_LIMIT_BYTES:
            for path in files:
                count_file(path)


def _check_shards_complete(files) -> None:
    """ClicklensError when Beam's shard names (`-00003-of-00008`) show that some shards of a set are missing (a
    copy or sync that stopped half way): the rest would train on part of the data without a word."""
    shards: Dict[tuple, set] = {}
    for path in files:
        match = re.search(r"^(.*)-(\d+)-of-(\d+)(\D*)$", path)
        if match:
            shards.setdefault((match[1], int(match[3]), match[4]), set()).add(int(match[2]))
    for (prefix, total, suffix), present in sorted(shards.items()):
        missing = sorted(set(range(total)) - present)
        if missing:
            raise ClicklensError(f"{prefix}-*-of-{total:05d}{suffix}: {len(missing)} of {total} shards missing "
                                 f"(the first: {prefix}-{missing[0]:05d}-of-{total:05d}{suffix}): run `clicklens "
                                 f"pipeline` again, or copy the examples whole")


@contextlib.contextmanager
def naming_damaged_examples(workdir):
    """Turns a DataLossError from reading W/examples (a shard cut short or overwritten since the pipeline wrote
    it) into a ClicklensError that says what to do, instead of a traceback from inside tf.data."""
    try:
        yield
    except tf.errors.DataLossError as err:
        raise ClicklensError(f"a damaged TFRecord file under {workdir.examples} ({damage(err)}): run `clicklens "
                             f"pipeline` again to rewrite the examples") from None


def raw_examples(config, pattern: str, spec=None, batch_size: int = 256) -> tf.data.Dataset:
    """Parsed (not preprocessed) batches of the records matching `pattern`, in file order, last batch kept."""
    spec = spec or features.spec_from_config(config)
    ds = tf.data.TFRecordDataset(list_files(pattern), compression_type="GZIP")
    return ds.batch(batch_size).map(lambda r: tf.io.parse_example(r, spec), num_parallel_calls=tf.data.AUTOTUNE)
