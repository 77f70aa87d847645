"""A tiny synthetic examples/ directory for the trainer tests (no generator, no pipeline).

Images are 16x16 PNGs: a coloured shape on a grey background.  Each image's
queries name its colour and shape, in English or Chinese, so a model can
learn them; some examples are image-only graph nodes (no query, weight 0).
The COLD images are new uploads: never logged (left out of
logged_images-*.txt), in train-* only as image-only nodes, relevant in the
ground truth.
Neighbours are images of the same colour; hard negatives are of another
colour.  Files are written with clicklens.features.make_example, exactly as the
pipeline writes them.
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from clicklens import compat  # noqa: F401
import tensorflow as tf

from clicklens import features, vocabulary
from clicklens.config import config_from_dict
from clicklens.workdir import Workdir

COLOURS = {"red": ((220, 30, 30), "红色"), "green": ((30, 200, 30), "绿色"), "blue": ((30, 30, 220), "蓝色"),
           "yellow": ((230, 220, 20), "黄色")}
SHAPES = {"square": "方形", "circle": "圆形", "bar": "条形"}
IMAGE_SIZE = 16
COLD = ("blue-circle-1", "blue-square-1", "red-bar-1")

# Small everything: the trainer tests share this config (plus per-test overrides).
TRAINER_TEST_CONFIG = {
    "pipeline": {"image_size": IMAGE_SIZE, "max_neighbors": 2, "hard_negatives": 1, "num_shards": 2},
    "model": {"embedding_dim": 8, "token_embedding_dim": 8, "max_query_tokens": 6, "cnn_filters": [4, 8]},
    "training": {"per_replica_batch_size": 8, "epochs": 1, "steps_per_epoch": 6, "checkpoint_every_steps": 2,
                 "learning_rate": 0.01, "shuffle_buffer": 64},
}


def trainer_config(overrides=()):
    """The trainer tests' Config."""
    return config_from_dict(TRAINER_TEST_CONFIG, "trainer-test", overrides)


def write_config_yaml(path: str) -> str:
    """TRAINER_TEST_CONFIG as a YAML file, for `clicklens --config`."""
    import yaml

    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(TRAINER_TEST_CONFIG, f)
    return str(path)


def png(colour, shape: str, size: int = IMAGE_SIZE) -> bytes:
    """A PNG of a coloured shape."""
    pixels = np.full((size, size, 3), 128, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2
    if shape == "square":
        inside = (abs(yy - c) < size / 3) & (abs(xx - c) < size / 3)
    elif shape == "circle":
        inside = (yy - c) ** 2 + (xx - c) ** 2 < (size / 3) ** 2
    else:
        inside = abs(yy - c) < size / 8
    pixels[inside] = colour
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def images():
    """{image id: (colour name, shape name, png bytes)}: two variants of every colour x shape."""
    out = {}
    for colour, (rgb, _) in COLOURS.items():
        for shape in SHAPES:
            for variant in range(2):
                shade = tuple(max(0, v - 40 * variant) for v in rgb)
                out[f"{colour}-{shape}-{variant}"] = (colour, shape, png(shade, shape))
    return out


def vocab_tokens():
    """A vocab.txt with the English words, the Chinese characters and a few word pieces."""
    words = list(COLOURS) + list(SHAPES)
    chars = sorted({ch for zh, _ in [(v[1], 0) for v in COLOURS.values()] for ch in zh} |
                   {ch for zh in SHAPES.values() for ch in zh})
    return vocabulary.RESERVED_TOKENS + words + chars + ["##s", "photo"]


def write_workdir(root: str, config=None, nan_weight: bool = False) -> Workdir:
    """Writes examples/{train,eval,corpus}-*.tfrecord.gz, vocab.txt and raw/ground_truth.jsonl under root."""
    config = config or trainer_config()
    workdir = Workdir(str(root))
    tf.io.gfile.makedirs(workdir.examples)
    tf.io.gfile.makedirs(workdir.raw)
    spec = features.spec_from_config(config)
    catalog = images()
    ids = sorted(catalog)
    rng = np.random.default_rng(0)
    k, j = config.pipeline.max_neighbors, config.pipeline.hard_negatives

    def example(image_id, query, weight):
        colour, shape, data = catalog[image_id]
        same = [i for i in ids if catalog[i][0] == colour and i != image_id]
        other = [i for i in ids if catalog[i][0] != colour]
        values = {features.QUERY: query, features.CATEGORY: "shapes", features.IMAGE_ID: image_id,
                  features.IMAGE: data, features.CLICK_WEIGHT: weight,
                  features.CANDIDATE_PROBABILITY: 1.0 / len(ids)}
        for n, nbr in enumerate(rng.choice(same, size=min(k - 1, len(same)), replace=False)):
            values[features.neighbor_key(n, features.IMAGE_ID)] = nbr
            values[features.neighbor_key(n, features.IMAGE)] = catalog[nbr][2]
            values[features.neighbor_weight_key(n)] = float(rng.uniform(0.2, 1.0))
        # the last neighbour slot stays padded
        for n, neg in enumerate(rng.choice(other, size=j, replace=False)):
            values[features.negative_key(n, features.IMAGE_ID)] = neg
            values[features.negative_key(n, features.IMAGE)] = catalog[neg][2]
        return features.make_example(values, spec).SerializeToString()

    def queries(image_id):
        colour, shape, _ = catalog[image_id]
        return [f"{colour} {shape}", f"{COLOURS[colour][1]}{SHAPES[shape]}", f"{colour.upper()} {shape}s"]

    train, evals = [], []
    for image_id in ids:
        if image_id in COLD:
            train.append(example(image_id, "", 0.0))
            continue
        for q in queries(image_id):
            weight = float("nan") if nan_weight else float(rng.uniform(0.5, 2.0))
            train.append(example(image_id, q, weight))
        train.append(example(image_id, "", 0.0))  # an image-only graph node
        evals.append(example(image_id, f"{catalog[image_id][0]} photo", 1.0))
    rng.shuffle(train)
    corpus_spec = features.corpus_feature_spec()
    corpus = [features.make_example({features.IMAGE_ID: i, features.IMAGE: catalog[i][2]}, corpus_spec)
              .SerializeToString() for i in ids]
    options = tf.io.TFRecordOptions(compression_type="GZIP")
    for split, records in (("train", train), ("eval", evals), ("corpus", corpus)):
        for shard in range(2):
            path = f"{workdir.examples}/{split}-{shard:05d}-of-00002.tfrecord.gz"
            with tf.io.TFRecordWriter(path, options) as w:
                for record in records[shard::2]:
                    w.write(record)
    with tf.io.gfile.GFile(workdir.vocab, "w") as f:
        f.write("\n".join(vocab_tokens()) + "\n")
    with tf.io.gfile.GFile(workdir.ground_truth, "w") as f:
        for colour in COLOURS:
            relevant = [i for i in ids if catalog[i][0] == colour]
            f.write(json.dumps({"query": f"{colour} photo", "relevant_image_ids": relevant}) + "\n")
            for shape in SHAPES:
                relevant = [i for i in ids if catalog[i][:2] == (colour, shape)]
                f.write(json.dumps({"query": f"{colour} {shape}", "relevant_image_ids": relevant}) + "\n")
    with tf.io.gfile.GFile(f"{workdir.examples}/logged_images-00000-of-00001.txt", "w") as f:
        f.write("".join(f"{i}\n" for i in ids if i not in COLD))
    return workdir


# A hand-made training batch in which images repeat as positives, graph neighbours and hard negatives: 6
# examples, 2 neighbour slots, 1 negative slot (24 slots, 7 distinct images + the padded one).  Keys stand in
# for image-id hashes; None marks a padded slot (the empty id's key).
GRAPH_BATCH_IMAGE_KEYS = [11, 12, 11, 13, 14, 12]
GRAPH_BATCH_NEIGHBOR_KEYS = [[12, 13], [11, None], [12, 15], [16, 11], [11, 12], [17, None]]
GRAPH_BATCH_NEIGHBOR_WEIGHTS = [[0.5, 1.0], [2.0, 0.0], [1.0, 0.3], [0.7, 0.2], [0.4, 0.9], [1.0, 0.0]]
GRAPH_BATCH_NEGATIVE_KEYS = [[15], [13], [14], [12], [None], [11]]


def graph_batch_keys(keys) -> np.ndarray:
    """int64 keys with None replaced by the empty id's key."""
    from trainer import input as model_input

    keys = np.array(keys, dtype=object)
    return np.where(np.equal(keys, None), int(model_input.empty_key().numpy()), keys).astype(np.int64)


def key_rows(keys: np.ndarray) -> np.ndarray:
    """uint8 image rows [..., S, S, 3] for int64 keys: the same random image for the same key, zeros for the
    empty id's key (as the image table holds them)."""
    from trainer import input as model_input

    empty = int(model_input.empty_key().numpy())
    out = np.zeros(keys.shape + (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for index, key in np.ndenumerate(keys):
        if key != empty:
            out[index] = np.random.default_rng(int(key)).integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    return out


def graph_batch() -> dict:
    """The model inputs of the hand-made batch above, pixels as the image table gives them."""
    from trainer import input as model_input
    from trainer.image_table import to_pixels

    image = graph_batch_keys(GRAPH_BATCH_IMAGE_KEYS)
    neighbors = graph_batch_keys(GRAPH_BATCH_NEIGHBOR_KEYS)
    negatives = graph_batch_keys(GRAPH_BATCH_NEGATIVE_KEYS)
    empty = int(model_input.empty_key().numpy())
    values = {
        model_input.QUERY_TOKENS: np.array([[5, 6, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0], [5, 8, 9, 0, 0, 0],
                                            [6, 0, 0, 0, 0, 0], [0] * 6, [9, 5, 0, 0, 0, 0]], np.int32),
        model_input.IMAGE_KEY: image, model_input.IMAGE: to_pixels(key_rows(image)),
        model_input.CLICK_WEIGHT: np.array([1.0, 0.5, 2.0, 1.0, 0.0, 1.5], np.float32),
        model_input.CANDIDATE_PROBABILITY: np.array([0.2, 0.1, 0.2, 0.05, 0.1, 0.1], np.float32),
        model_input.NEIGHBOR_KEYS: neighbors, model_input.NEIGHBOR_IMAGES: to_pixels(key_rows(neighbors)),
        model_input.NEIGHBOR_WEIGHTS: np.array(GRAPH_BATCH_NEIGHBOR_WEIGHTS, np.float32),
        model_input.NEGATIVE_KEYS: negatives, model_input.NEGATIVE_IMAGES: to_pixels(key_rows(negatives)),
        model_input.NEGATIVE_MASK: (negatives != empty).astype(np.float32),
    }
    return {name: tf.constant(value) for name, value in values.items()}
