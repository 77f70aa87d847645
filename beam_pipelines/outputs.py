"""Writing: tf.train.Examples exactly as trainer.features declares them, dead letters, single files.

Feature names come only from trainer.features; `make_example` fills every
spec key it is not given with the spec's default, which is how padded
neighbour and negative slots are written ("" ids, b"" / zero images, 0 weights).
"""


from typing import Any, Dict

import apache_beam as beam

from beam_pipelines.parse import dead_letter_json


def example_features(record: Dict[str, Any], image_source: str, max_neighbors: int,
                     hard_negatives: int) -> Dict[str, Any]:
    """The trainer.features dict of one example record (neighbours and negatives beyond the slots dropped)."""
    from trainer import features as F

    image = F.image_key(image_source)
    out = {
        F.QUERY: record["query"],
        F.CATEGORY: record["category"],
        F.IMAGE_ID: record["image_id"],
        image: _image_value(record["image"]),
        F.CLICK_WEIGHT: record["click_weight"],
        F.CANDIDATE_PROBABILITY: record["candidate_probability"],
    }
    for i, (nbr_id, weight, value) in enumerate(record["neighbors"][:max_neighbors]):
        out[F.neighbor_key(i, F.IMAGE_ID)] = nbr_id
        out[F.neighbor_key(i, image)] = _image_value(value)
        out[F.neighbor_weight_key(i)] = weight
    for j, (neg_id, value) in enumerate(record["negatives"][:hard_negatives]):
        out[F.negative_key(j, F.IMAGE_ID)] = neg_id
        out[F.negative_key(j, image)] = _image_value(value)
    return out


def _image_value(value):
    return list(value) if isinstance(value, tuple) else value


class ToSerializedExample(beam.DoFn):
    """Example record -> serialized tf.train.Example of the training spec."""

    def __init__(self, config):
        p = config.pipeline
        self._args = (p.image_source, p.feature_dim, p.max_neighbors, p.hard_negatives)
        self._spec = None

    def setup(self):
        from trainer import features as F

        image_source, feature_dim, max_neighbors, hard_negatives = self._args
        self._spec = F.example_feature_spec(image_source, feature_dim, max_neighbors, hard_negatives)

    def process(self, record):
        from trainer import features as F

        image_source, _, max_neighbors, hard_negatives = self._args
        features = example_features(record, image_source, max_neighbors, hard_negatives)
        yield F.make_example(features, self._spec).SerializeToString(deterministic=True)


class ToSerializedCorpusExample(beam.DoFn):
    """(image_id, image value) -> serialized tf.train.Example of the corpus spec."""

    def __init__(self, config):
        self._args = (config.pipeline.image_source, config.pipeline.feature_dim)
        self._spec = None

    def setup(self):
        from trainer import features as F

        self._spec = F.corpus_feature_spec(*self._args)

    def process(self, element):
        from trainer import features as F

        image_id, value = element
        features = {F.IMAGE_ID: image_id, F.image_key(self._args[0]): _image_value(value)}
        yield F.make_example(features, self._spec).SerializeToString(deterministic=True)


class WriteTFRecords(beam.PTransform):
    """Serialized examples -> `<prefix>-SSSSS-of-NNNNN.tfrecord.gz` (gzip from the suffix)."""

    def __init__(self, prefix: str, num_shards: int):
        super().__init__()
        self._prefix = prefix
        self._num_shards = num_shards

    def expand(self, serialized):
        return serialized | "Write" >> beam.io.WriteToTFRecord(
            self._prefix, file_name_suffix=".tfrecord.gz", num_shards=self._num_shards)


class WriteDeadLetters(beam.PTransform):
    """Dead-letter dicts -> `<prefix>-SSSSS-of-NNNNN.jsonl`, one JSON object per line."""

    def __init__(self, prefix: str):
        super().__init__()
        self._prefix = prefix

    def expand(self, records):
        return (
            records
            | "ToJson" >> beam.Map(dead_letter_json)
            | "Write" >> beam.io.WriteToText(self._prefix, file_name_suffix=".jsonl", num_shards=1)
        )


class WriteSingleFile(beam.PTransform):
    """One text element -> exactly the file `path` (no shard suffix)."""

    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def expand(self, text):
        return text | "Write" >> beam.io.WriteToText(self._path, shard_name_template="", num_shards=1)
