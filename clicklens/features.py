"""The training-example contract: what the pipeline writes and the trainer parses.

Every `tf.train.Example` in `train-*`, `eval-*` has these features:

| feature                         | type            | meaning |
|---------------------------------|-----------------|---------|
| `query`                         | bytes           | normalised query text (UTF-8); "" for an image-only graph node |
| `category`                      | bytes           | query category; "" when unknown |
| `image_id`                      | bytes           | the positive image |
| `image`                         | bytes           | encoded PNG, `image_size` square (pixels source) |
| `image_features`                | float[feature_dim] | precomputed vector (features source) |
| `click_weight`                  | float           | weight of the query-image pair in the loss; 0 for image-only nodes |
| `candidate_probability`         | float           | the image's share of training examples (logQ correction) |
| `NL_nbr_<i>_image_id`           | bytes           | i-th graph neighbour, "" when padded |
| `NL_nbr_<i>_image` / `_image_features` | as above | its image; b"" / zeros when padded |
| `NL_nbr_<i>_weight`             | float           | edge weight; 0 when padded |
| `neg_<j>_image_id`, `neg_<j>_image` / `_image_features` | as above | shown-but-not-clicked hard negatives, "" when padded |

Neighbour features follow neural_structured_learning's naming
(`nsl.configs.GraphNeighborConfig().prefix` and `.weight_suffix`);
all `max_neighbors` slots and all `hard_negatives` slots are always written, so
batches have static shapes.  `corpus-*` files hold one example per image with
only `image_id` and `image` / `image_features`.

Images are stored already prepared (`clicklens.images.prepared_png`), so the
trainer's decoding is the same function the exported graphs run on uploads.
The query vocabulary is the other half of the pipeline -> trainer contract:
`clicklens.vocabulary`.
"""

from __future__ import annotations

from typing import Dict, List

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

QUERY = "query"
CATEGORY = "category"
IMAGE_ID = "image_id"
IMAGE = "image"
IMAGE_FEATURES = "image_features"
CLICK_WEIGHT = "click_weight"
CANDIDATE_PROBABILITY = "candidate_probability"

# neural_structured_learning's defaults (nsl.configs.GraphNeighborConfig),
# restated so this module does not import NSL; a test checks they agree.
NBR_PREFIX = "NL_nbr_"
NBR_WEIGHT_SUFFIX = "_weight"
NEG_PREFIX = "neg_"


def image_key(image_source: str) -> str:
    """The feature that holds an image for the given pipeline.image_source."""
    return IMAGE if image_source == "pixels" else IMAGE_FEATURES


def neighbor_key(i: int, feature: str) -> str:
    """`NL_nbr_<i>_<feature>`, the NSL name of a neighbour's feature."""
    return f"{NBR_PREFIX}{i}_{feature}"


def neighbor_weight_key(i: int) -> str:
    """`NL_nbr_<i>_weight`."""
    return f"{NBR_PREFIX}{i}{NBR_WEIGHT_SUFFIX}"


def negative_key(j: int, feature: str) -> str:
    """`neg_<j>_<feature>`, the j-th hard negative's feature."""
    return f"{NEG_PREFIX}{j}_{feature}"


def _image_spec(image_source: str, feature_dim: int) -> tf.io.FixedLenFeature:
    if image_source == "pixels":
        return tf.io.FixedLenFeature([], tf.string, default_value="")
    return tf.io.FixedLenFeature([feature_dim], tf.float32, default_value=[0.0] * feature_dim)


def example_feature_spec(image_source: str = "pixels", feature_dim: int = 0,
                         max_neighbors: int = 0, hard_negatives: int = 0) -> Dict[str, tf.io.FixedLenFeature]:
    """The parse spec of a training example (see the module docstring)."""
    image = image_key(image_source)
    spec = {
        QUERY: tf.io.FixedLenFeature([], tf.string, default_value=""),
        CATEGORY: tf.io.FixedLenFeature([], tf.string, default_value=""),
        IMAGE_ID: tf.io.FixedLenFeature([], tf.string),
        image: _image_spec(image_source, feature_dim),
        CLICK_WEIGHT: tf.io.FixedLenFeature([], tf.float32, default_value=0.0),
        CANDIDATE_PROBABILITY: tf.io.FixedLenFeature([], tf.float32, default_value=1.0),
    }
    for i in range(max_neighbors):
        spec[neighbor_key(i, IMAGE_ID)] = tf.io.FixedLenFeature([], tf.string, default_value="")
        spec[neighbor_key(i, image)] = _image_spec(image_source, feature_dim)
        spec[neighbor_weight_key(i)] = tf.io.FixedLenFeature([], tf.float32, default_value=0.0)
    for j in range(hard_negatives):
        spec[negative_key(j, IMAGE_ID)] = tf.io.FixedLenFeature([], tf.string, default_value="")
        spec[negative_key(j, image)] = _image_spec(image_source, feature_dim)
    return spec


def corpus_feature_spec(image_source: str = "pixels", feature_dim: int = 0) -> Dict[str, tf.io.FixedLenFeature]:
    """The parse spec of a corpus example: one image and its id."""
    return {IMAGE_ID: tf.io.FixedLenFeature([], tf.string), image_key(image_source): _image_spec(image_source, feature_dim)}


def spec_from_config(config) -> Dict[str, tf.io.FixedLenFeature]:
    """example_feature_spec for a clicklens.config.Config."""
    p = config.pipeline
    return example_feature_spec(p.image_source, p.feature_dim, p.max_neighbors, p.hard_negatives)


# ---------------------------------------------------------------------------
# Writing (used by the pipeline, and by tests that build small datasets).


def _bytes(value: bytes | str) -> tf.train.Feature:
    if isinstance(value, str):
        value = value.encode("utf-8")
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _floats(values: List[float]) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


def make_example(features: Dict[str, object], spec: Dict[str, tf.io.FixedLenFeature]) -> tf.train.Example:
    """Builds a tf.train.Example holding exactly the keys of `spec`.

    Missing keys take the spec's default; a key that is not in the spec, or a
    value of the wrong kind or length, raises ValueError, so the writer can
    never drift from the contract.
    """
    unknown = set(features) - set(spec)
    if unknown:
        raise ValueError(f"features not in the example spec: {sorted(unknown)}")
    out = {}
    for key, fspec in spec.items():
        value = features.get(key, fspec.default_value)
        if value is None:
            raise ValueError(f"feature {key} is required")
        if fspec.dtype == tf.string:
            if not isinstance(value, (bytes, str)):
                raise ValueError(f"feature {key} must be bytes or str, got {type(value).__name__}")
            out[key] = _bytes(value)
        else:
            values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
            expected = fspec.shape[0] if fspec.shape else 1
            if len(values) != expected:
                raise ValueError(f"feature {key} must have {expected} values, got {len(values)}")
            out[key] = _floats(values)
    return tf.train.Example(features=tf.train.Features(feature=out))
