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

The contract is plain data (`example_fields`, `corpus_fields`: name -> kind,
length, default); `example_feature_spec` turns it into TensorFlow's parse spec
for the trainer, and `serialize_example` writes an example with no TensorFlow
at all (the pipeline's writers), byte for byte what
`make_example(...).SerializeToString(deterministic=True)` gives (tested).

Images are stored already prepared (`clicklens.images.prepared_png`), so the
trainer's decoding is the same function the exported graphs run on uploads.
The query vocabulary is the other half of the pipeline -> trainer contract:
`clicklens.vocabulary`.
"""

from __future__ import annotations

import struct
from typing import Dict, List, NamedTuple, Optional

from clicklens import compat  # noqa: F401  (must precede TensorFlow, which the spec functions import)

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

BYTES, FLOATS = "bytes", "floats"


class Field(NamedTuple):
    """One feature of the contract: BYTES (one value) or FLOATS (`length` values; a vector unless `scalar`),
    and its default (None: required)."""

    kind: str
    length: int
    default: object
    scalar: bool = True


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


def _image_field(image_source: str, feature_dim: int) -> Field:
    if image_source == "pixels":
        return Field(BYTES, 1, "")
    return Field(FLOATS, feature_dim, [0.0] * feature_dim, scalar=False)


def example_fields(image_source: str = "pixels", feature_dim: int = 0,
                   max_neighbors: int = 0, hard_negatives: int = 0) -> Dict[str, Field]:
    """The features of a training example (see the module docstring)."""
    image = image_key(image_source)
    fields = {
        QUERY: Field(BYTES, 1, ""),
        CATEGORY: Field(BYTES, 1, ""),
        IMAGE_ID: Field(BYTES, 1, None),
        image: _image_field(image_source, feature_dim),
        CLICK_WEIGHT: Field(FLOATS, 1, 0.0),
        CANDIDATE_PROBABILITY: Field(FLOATS, 1, 1.0),
    }
    for i in range(max_neighbors):
        fields[neighbor_key(i, IMAGE_ID)] = Field(BYTES, 1, "")
        fields[neighbor_key(i, image)] = _image_field(image_source, feature_dim)
        fields[neighbor_weight_key(i)] = Field(FLOATS, 1, 0.0)
    for j in range(hard_negatives):
        fields[negative_key(j, IMAGE_ID)] = Field(BYTES, 1, "")
        fields[negative_key(j, image)] = _image_field(image_source, feature_dim)
    return fields


def corpus_fields(image_source: str = "pixels", feature_dim: int = 0) -> Dict[str, Field]:
    """The features of a corpus example: one image and its id."""
    return {IMAGE_ID: Field(BYTES, 1, None), image_key(image_source): _image_field(image_source, feature_dim)}


def fields_from_config(config) -> Dict[str, Field]:
    """example_fields for a clicklens.config.Config."""
    p = config.pipeline
    return example_fields(p.image_source, p.feature_dim, p.max_neighbors, p.hard_negatives)


def _parse_spec(fields: Dict[str, Field]):
    import tensorflow as tf

    spec = {}
    for name, field in fields.items():
        dtype, shape = (tf.string if field.kind == BYTES else tf.float32), ([] if field.scalar else [field.length])
        spec[name] = (tf.io.FixedLenFeature(shape, dtype) if field.default is None
                      else tf.io.FixedLenFeature(shape, dtype, default_value=field.default))
    return spec


def example_feature_spec(image_source: str = "pixels", feature_dim: int = 0,
                         max_neighbors: int = 0, hard_negatives: int = 0):
    """The TensorFlow parse spec of a training example (tf.io.FixedLenFeature per feature)."""
    return _parse_spec(example_fields(image_source, feature_dim, max_neighbors, hard_negatives))


def corpus_feature_spec(image_source: str = "pixels", feature_dim: int = 0):
    """The TensorFlow parse spec of a corpus example: one image and its id."""
    return _parse_spec(corpus_fields(image_source, feature_dim))


def spec_from_config(config):
    """example_feature_spec for a clicklens.config.Config."""
    return _parse_spec(fields_from_config(config))


# ---------------------------------------------------------------------------
# Writing (used by the pipeline, and by tests that build small datasets).


def _check_known(features: Dict[str, object], names) -> None:
    unknown = features.keys() - names
    if unknown:
        raise ValueError(f"features not in the example spec: {sorted(unknown)}")


def _checked_value(name: str, field: Field, value):
    """A feature's value as written: bytes (BYTES) or a list of `field.length` floats; ValueError when off the
    contract (None is a missing required feature)."""
    if value is None:
        raise ValueError(f"feature {name} is required")
    if field.kind == BYTES:
        if isinstance(value, str):
            return value.encode("utf-8")
        if not isinstance(value, bytes):
            raise ValueError(f"feature {name} must be bytes or str, got {type(value).__name__}")
        return value
    values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if len(values) != field.length:
        raise ValueError(f"feature {name} must have {field.length} values, got {len(values)}")
    return values


def _checked_values(features: Dict[str, object], fields: Dict[str, Field]):
    """(name, kind, bytes or [floats]) per field, in field order; ValueError on anything off the contract."""
    _check_known(features, fields.keys())
    for name, field in fields.items():
        yield name, field.kind, _checked_value(name, field, features.get(name, field.default))


def _fields_of(spec) -> Dict[str, Field]:
    """A TensorFlow parse spec (as the spec functions return) or a fields dict -> a fields dict."""
    fields = {}
    for name, value in spec.items():
        if isinstance(value, Field):
            fields[name] = value
        else:
            floats = value.dtype.name == "float32"
            scalar = len(value.shape) == 0
            default = value.default_value
            if default is not None and hasattr(default, "tolist"):
                default = default.tolist()
            fields[name] = Field(FLOATS if floats else BYTES, 1 if scalar else int(value.shape[0]), default, scalar)
    return fields


def make_example(features: Dict[str, object], spec):
    """Builds a tf.train.Example holding exactly the keys of `spec` (a parse spec or a fields dict).

    Missing keys take the spec's default; a key that is not in the spec, or a
    value of the wrong kind or length, raises ValueError, so the writer can
    never drift from the contract.
    """
    import tensorflow as tf

    out = {}
    for name, kind, value in _checked_values(features, _fields_of(spec)):
        out[name] = (tf.train.Feature(bytes_list=tf.train.BytesList(value=[value])) if kind == BYTES
                     else tf.train.Feature(float_list=tf.train.FloatList(value=value)))
    return tf.train.Example(features=tf.train.Features(feature=out))


_ONE_BYTE_VARINTS = [bytes((n,)) for n in range(128)]


def _varint(n: int) -> bytes:
    if n < 128:
        return _ONE_BYTE_VARINTS[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _length_delimited(field_tag: bytes, payload: bytes) -> bytes:
    return field_tag + _varint(len(payload)) + payload


_TAG_1, _TAG_2 = b"\x0a", b"\x12"  # field 1 / field 2, wire type 2 (length-delimited)
_FLOAT32 = struct.Struct("<f")


def _encoded_floats(values: List[float]) -> bytes:
    if len(values) == 1:
        try:
            return _FLOAT32.pack(values[0])
        except OverflowError:
            pass  # past float32's range: numpy gives inf, as FloatList stores it
    import numpy as np

    with np.errstate(over="ignore"):
        return np.asarray(values, "<f4").tobytes()


class ExampleSerializer:
    """Serializes feature dicts of one contract (`fields`) to tf.train.Example bytes, without TensorFlow.

    Byte for byte `make_example(features, fields).SerializeToString(deterministic=True)`:
    Example{features: Features{feature: map<string, Feature>}}, the map's entries in
    deterministic serialization's key order, BytesList / packed FloatList values.  The key
    order and each entry's encoded key are worked out once, here, not per example.
    """

    def __init__(self, fields: Dict[str, Field]):
        self._names = frozenset(fields)
        # protobuf's deterministic order of map keys: bytewise, except that a key sorts after the longer keys
        # it is a prefix of ("image_id" before "image"); UTF-8 never holds 0xff, so the sentinel does exactly that.
        order = sorted(fields, key=lambda name: name.encode("utf-8") + b"\xff")
        self._plan = [(name, fields[name], _length_delimited(_TAG_1, name.encode("utf-8"))) for name in order]

    def __call__(self, features: Dict[str, object]) -> bytes:
        _check_known(features, self._names)
        entries = []
        for name, field, key in self._plan:
            value = _checked_value(name, field, features.get(name, field.default))
            if field.kind == BYTES:
                feature = _length_delimited(_TAG_1, _length_delimited(_TAG_1, value))  # bytes_list { value }
            else:
                packed = _length_delimited(_TAG_1, _encoded_floats(value)) if value else b""
                feature = _length_delimited(_TAG_2, packed)  # float_list { value (packed) }
            entry = key + _TAG_2 + _varint(len(feature)) + feature
            entries.append(_TAG_1 + _varint(len(entry)) + entry)
        return _length_delimited(_TAG_1, b"".join(entries))


def serialize_example(features: Dict[str, object], fields: Optional[Dict[str, Field]] = None, *,
                      spec=None) -> bytes:
    """The serialized tf.train.Example of `features` (checked like `make_example`), without TensorFlow.

    For many examples of one contract, build an `ExampleSerializer` once and call it.
    """
    return ExampleSerializer(fields if fields is not None else _fields_of(spec))(features)
