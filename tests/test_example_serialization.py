"""The pipeline's TensorFlow-free example writer gives exactly TensorFlow's deterministic serialization."""

import pytest

from clicklens import compat  # noqa: F401
import tensorflow as tf

from clicklens import features as F


def tf_bytes(values, fields):
    return F.make_example(values, fields).SerializeToString(deterministic=True)


@pytest.mark.parametrize("values", [
    {F.QUERY: "红色 圆形", F.CATEGORY: "color", F.IMAGE_ID: "img_1", F.IMAGE: b"\x89PNG\x00" * 70,
     F.CLICK_WEIGHT: 0.6931471805599453, F.CANDIDATE_PROBABILITY: 1 / 3,
     F.neighbor_key(0, F.IMAGE_ID): "img_2", F.neighbor_key(0, F.IMAGE): b"x" * 300,
     F.neighbor_weight_key(0): 1e-8, F.negative_key(0, F.IMAGE_ID): "img_3", F.negative_key(0, F.IMAGE): b""},
    {F.IMAGE_ID: "only the required one"},  # every other slot padded with its default
    {F.IMAGE_ID: "a", F.CLICK_WEIGHT: 3.4e38 * 10, F.CANDIDATE_PROBABILITY: float("nan")},
])
def test_pixels_examples(values):
    fields = F.example_fields("pixels", 0, max_neighbors=3, hard_negatives=2)
    assert F.serialize_example(values, fields) == tf_bytes(values, fields)
    assert F.serialize_example(values, spec=F.example_feature_spec("pixels", 0, 3, 2)) == tf_bytes(values, fields)


def test_one_serializer_for_many_examples():
    fields = F.example_fields("pixels", 0, max_neighbors=2, hard_negatives=1)
    serialize = F.ExampleSerializer(fields)
    examples = [{F.IMAGE_ID: f"img_{i}", F.QUERY: "蓝色" * i, F.IMAGE: b"\x89" * (40 * i),
                 F.neighbor_weight_key(1): i / 7, F.neighbor_key(0, F.IMAGE): b"n" * (100 * i)} for i in range(4)]
    assert [serialize(values) for values in examples] == [tf_bytes(values, fields) for values in examples]


def test_feature_vector_examples_and_corpus_examples():
    fields = F.example_fields("features", 4, max_neighbors=1)
    values = {F.IMAGE_ID: "a", F.IMAGE_FEATURES: [0.1, -2.0, 3.5, 1e-30], F.neighbor_key(0, F.IMAGE_ID): "b",
              F.neighbor_key(0, F.IMAGE_FEATURES): (1.0, 2.0, 3.0, 4.0), F.neighbor_weight_key(0): 0.5}
    assert F.serialize_example(values, fields) == tf_bytes(values, fields)
    corpus = F.corpus_fields("features", 1)
    assert F.serialize_example({F.IMAGE_ID: "c", F.IMAGE_FEATURES: [7.0]}, corpus) == tf_bytes(
        {F.IMAGE_ID: "c", F.IMAGE_FEATURES: [7.0]}, corpus)
    parsed = tf.io.parse_single_example(F.serialize_example(values, fields), F.example_feature_spec("features", 4, 1))
    assert parsed[F.IMAGE_FEATURES].numpy().tolist() == pytest.approx([0.1, -2.0, 3.5, 1e-30])


def test_off_contract_values_are_refused_like_make_example():
    fields = F.example_fields("pixels", 0, max_neighbors=1)
    for bad in ({F.IMAGE_ID: "a", "not_a_feature": b""}, {}, {F.IMAGE_ID: 3}, {F.IMAGE_ID: "a", F.CLICK_WEIGHT: [1, 2]}):
        with pytest.raises(ValueError):
            F.serialize_example(bad, fields)
        with pytest.raises(ValueError):
            F.make_example(bad, fields)
