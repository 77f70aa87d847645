"""Writing: tf.train.Examples exactly as clicklens.features declares them, dead letters, text files.

Feature names come only from clicklens.features; `serialize_example` fills every
field it is not given with the field's default, which is how padded
neighbour and negative slots are written ("" ids, b"" / zero images, 0 weights),
and writes the tf.train.Example bytes without TensorFlow.
"""


from typing import Any, Dict

import apache_beam as beam

from beam_pipelines.dead_letters import dead_letter_json
from beam_pipelines.progress import LogProgress
from beam_pipelines.split import SPLITS
from clicklens.workdir import join


def example_features(record: Dict[str, Any], image_source: str, max_neighbors: int,
                     hard_negatives: int) -> Dict[str, Any]:
    """The clicklens.features dict of one example record (neighbours and negatives beyond the slots dropped)."""
    from clicklens import features as F

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
    """Example record -> serialized tf.train.Example of the training spec (written without TensorFlow)."""

    def __init__(self, config):
        p = config.pipeline
        self._args = (p.image_source, p.feature_dim, p.max_neighbors, p.hard_negatives)
        self._serialize = None

    def setup(self):
        from clicklens import features as F

        self._serialize = F.ExampleSerializer(F.example_fields(*self._args))

    def process(self, record):
        image_source, _, max_neighbors, hard_negatives = self._args
        yield self._serialize(example_features(record, image_source, max_neighbors, hard_negatives))


class ToSerializedCorpusExample(beam.DoFn):
    """(image_id, image value) -> serialized tf.train.Example of the corpus spec (written without TensorFlow)."""

    def __init__(self, config):
        self._args = (config.pipeline.image_source, config.pipeline.feature_dim)
        self._serialize = self._id_key = self._image_key = None

    def setup(self):
        from clicklens import features as F

        self._serialize = F.ExampleSerializer(F.corpus_fields(*self._args))
        self._id_key, self._image_key = F.IMAGE_ID, F.image_key(self._args[0])

    def process(self, element):
        image_id, value = element
        yield self._serialize({self._id_key: image_id, self._image_key: _image_value(value)})


class WriteTFRecords(beam.PTransform):
    """Serialized examples -> `<prefix>-SSSSS-of-NNNNN.tfrecord.gz` (gzip from the suffix)."""

    def __init__(self, prefix: str, num_shards: int):
        super().__init__()
        self._prefix = prefix
        self._num_shards = num_shards

    def expand(self, serialized):
        return serialized | "Write" >> beam.io.WriteToTFRecord(
            self._prefix, file_name_suffix=".tfrecord.gz", num_shards=self._num_shards)


class WriteExamples(beam.PTransform):
    """{"examples": example records, "images": good images} -> `train-*`, `eval-*`, `corpus-*` under `out_dir`.

    Returns {split name: that split's example records}.
    """

    def __init__(self, config, out_dir: str):
        super().__init__()
        self._config = config
        self._out_dir = out_dir

    def expand(self, inputs):
        num_shards = self._config.pipeline.num_shards
        by_split = inputs["examples"] | "SplitByQuery" >> beam.Partition(
            lambda r, _: SPLITS.index(r["split"]), len(SPLITS))
        written = {}
        for index, name in enumerate(SPLITS):
            written[name] = by_split[index] | f"Log{name.title()}" >> LogProgress("WriteExamples", f"{name} examples")
            (written[name]
             | f"Serialize{name.title()}" >> beam.ParDo(ToSerializedExample(self._config))
             | f"Write{name.title()}" >> WriteTFRecords(join(self._out_dir, name), num_shards))
        (inputs["images"]
         | "SerializeCorpus" >> beam.ParDo(ToSerializedCorpusExample(self._config))
         | "WriteCorpus" >> WriteTFRecords(join(self._out_dir, "corpus"), num_shards))
        return written


class WriteDeadLetters(beam.PTransform):
    """The dead-letter PCollections of every stage -> `<prefix>-SSSSS-of-NNNNN.jsonl`, one JSON object per line.

    Returns all dead letters as one PCollection.
    """

    def __init__(self, prefix: str):
        super().__init__()
        self._prefix = prefix

    def expand(self, dead_letter_pcolls):
        records = (
            tuple(dead_letter_pcolls)
            | "Flatten" >> beam.Flatten()
            | "LogDeadLetters" >> LogProgress("DeadLetters", "dead-letter records")
        )
        (records
         | "ToJson" >> beam.Map(dead_letter_json)
         | "Write" >> beam.io.WriteToText(self._prefix, file_name_suffix=".jsonl", num_shards=1))
        return records


class WriteLines(beam.PTransform):
    """Text elements -> `<prefix>-SSSSS-of-NNNNN<suffix>`, one element per line (in no particular order)."""

    def __init__(self, prefix: str, suffix: str, num_shards: int):
        super().__init__()
        self._prefix = prefix
        self._suffix = suffix
        self._num_shards = num_shards

    def expand(self, lines):
        return lines | "Write" >> beam.io.WriteToText(self._prefix, file_name_suffix=self._suffix,
                                                      num_shards=self._num_shards)


class WriteSingleFile(beam.PTransform):
    """One text element -> exactly the file `path` (no shard suffix)."""

    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def expand(self, text):
        return text | "Write" >> beam.io.WriteToText(self._path, shard_name_template="", num_shards=1)
