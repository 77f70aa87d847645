"""Stage 4b: the content-similarity graph, so that images nobody was shown get graph neighbours too.

    good catalog images (image_id, prepared PNG | feature tuple)
      -> ContentEmbeddings: one unit vector per image, by `pipeline.content_graph.source`:
           pixels    the fixed descriptor of the prepared image (pixel_descriptor.py)
           features  the catalog's feature vector (ReadCatalogImages already dead-lettered
                     vectors of the wrong length)
           model     the newest exported image_encoder, in batches through Beam's RunInference
         a zero or non-finite vector has no direction to compare: it is dropped and
         counted, never matched
      -> LshNeighbors: random-hyperplane LSH (lsh.py), several rounds; per round the
         vectors are grouped by (round, bucket) and each bucket's exact cosine top k is
         kept; each image's lists are merged over the rounds
      -> ContentEdges: ((a, b), cosine), a < b, for each pair where one is among the
         other's top k (at least content_graph.min_similarity)

An image that could not be loaded is not among the good images: it was dead-lettered
once by ReadCatalogImages and has no embedding here, never a stand-in vector.
graph.BuildImageGraph merges these edges with the click edges.
"""


import functools
from typing import Any, Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

from beam_pipelines import lsh
from beam_pipelines.dead_letters import METRICS_NAMESPACE
from beam_pipelines.pixel_descriptor import describe
from beam_pipelines.progress import LogProgress
from clicklens.errors import ClicklensError
from clicklens.workdir import Workdir, join

# Output tags of ContentEmbeddings / BuildContentGraph.
EMBEDDINGS = "embeddings"
DROPPED = "dropped"
EDGES = "edges"

# The hyperplanes are drawn from this seed, so a re-run finds the same neighbours.
LSH_SEED = 20261123
# Images decoded per call when source=pixels.
DECODE_BATCH = 256


def encoder_dir(content_graph, workdir: Workdir) -> str:
    """The image_encoder SavedModel that source=model runs: content_graph.model_dir, or the newest export.

    `model_dir` may be a version folder (it holds saved_model.pb) or a model's base
    folder (the newest integer version in it is used).  Raises ClicklensError naming
    the folder when there is no SavedModel there, so the pipeline fails at start.
    """
    from apache_beam.io.filesystems import FileSystems
    from clicklens import servables

    base = content_graph.model_dir or workdir.export_model(servables.IMAGE_ENCODER)
    if FileSystems.exists(join(base, servables.SAVED_MODEL_PB)):
        return base
    versions = servables.version_dirs(base)
    if not versions:
        raise ClicklensError(
            f"pipeline: pipeline.content_graph.source is 'model' but {base} holds no exported image_encoder "
            f"(run `clicklens export` first, set pipeline.content_graph.model_dir, or choose another source)")
    return versions[max(versions)]


# --------------------------------------------------------------------------- embeddings


@functools.lru_cache(maxsize=None)
def png_decoder(image_size: int):
    """The trainer's decoding of the stored PNGs (the one image preparation; a no-op crop and resize here),
    as a tf.function over a batch, traced once per process and size.  Imports TensorFlow: on the worker,
    not when the pipeline is built."""
    from clicklens import compat  # noqa: F401  (must precede TensorFlow)
    import tensorflow as tf

    from clicklens.images import prepare_images

    return tf.function(lambda pngs: prepare_images(pngs, image_size, max_pixels=None),
                       input_signature=[tf.TensorSpec([None], tf.string)])


class DescribePixelsFn(beam.DoFn):
    """A batch of (image_id, prepared PNG) -> (image_id, pixel descriptor) for each."""

    def __init__(self, image_size: int):
        self._image_size = image_size
        self._decode = None

    def setup(self):
        self._decode = png_decoder(self._image_size)

    def process(self, batch: Sequence):
        ids = [image_id for image_id, _ in batch]
        pixels = self._decode([png for _, png in batch]).numpy()
        for image_id, image in zip(ids, pixels):
            yield image_id, describe(image)


class ImageEncoderHandler(ModelHandler):
    """RunInference model handler for an exported image_encoder: its serving_default signature, batched.

    The input is what the pipeline stores per image, which is exactly the
    signature's input (clicklens.servables): prepared PNG bytes for
    `image_bytes`, feature vectors for `image_features`.
    """

    def __init__(self, model_dir: str, input_name: str, batch_size: int):
        super().__init__(min_batch_size=1, max_batch_size=batch_size)
        self._model_dir = model_dir
        self._input_name = input_name

    def load_model(self):
        from clicklens import compat  # noqa: F401  (must precede TensorFlow)
        import tensorflow as tf

        return tf.saved_model.load(self._model_dir)

    def run_inference(self, batch: Sequence[Any], model, inference_args=None) -> Iterable[PredictionResult]:
        import tensorflow as tf

        from clicklens import servables

        if self._input_name == servables.IMAGE_FEATURES:
            inputs = tf.constant(np.asarray(batch, np.float32))
        else:
            inputs = tf.constant(list(batch), tf.string)
        outputs = model.signatures[servables.DEFAULT_SIGNATURE](**{self._input_name: inputs})
        embeddings = outputs[servables.EMBEDDING].numpy()
        return [PredictionResult(example, embedding) for example, embedding in zip(batch, embeddings)]

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE


class UnitVectorFn(beam.DoFn):
    """(image_id, vector) -> (image_id, float32 unit vector); a zero or non-finite vector -> DROPPED (its id)."""

    def process(self, element):
        image_id, vector = element
        vector = np.asarray(vector, np.float32).ravel()
        norm = np.linalg.norm(vector.astype(np.float64))  # float64, as lsh.similarities, for the same bits everywhere
        if not (np.isfinite(vector).all() and 0 < norm < np.inf):
            Metrics.counter(METRICS_NAMESPACE, "content_embeddings_dropped").inc()
            yield beam.pvalue.TaggedOutput(DROPPED, image_id)
            return
        yield image_id, (vector / norm).astype(np.float32)


class ContentEmbeddings(beam.PTransform):
    """Good images (image_id, PNG bytes | feature tuple) -> {EMBEDDINGS: (image_id, unit vector), DROPPED: image_id}.

    `source` is pixels, features or model; `model_dir` (source=model) is a SavedModel
    folder (see `encoder_dir`) and `image_input` its input name.
    """

    def __init__(self, source: str, image_size: int, model_dir: str = "", image_input: str = "",
                 batch_size: int = 64):
        super().__init__()
        if source not in ("pixels", "features", "model"):
            raise ValueError(f"content embedding source must be pixels, features or model, got {source!r}")
        self._source = source
        self._image_size = image_size
        self._model_dir = model_dir
        self._image_input = image_input
        self._batch_size = batch_size

    def expand(self, images):
        if self._source == "pixels":
            vectors = (
                images
                | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=DECODE_BATCH)
                | "Describe" >> beam.ParDo(DescribePixelsFn(self._image_size))
            )
        elif self._source == "features":
            vectors = images
        else:
            handler = ImageEncoderHandler(self._model_dir, self._image_input, self._batch_size)
            vectors = (
                images
                | "RunInference" >> RunInference(KeyedModelHandler(handler))
                | "Embedding" >> beam.MapTuple(lambda image_id, result: (image_id, result.inference))
            )
        checked = vectors | "UnitLength" >> beam.ParDo(UnitVectorFn()).with_outputs(DROPPED, main=EMBEDDINGS)
        embeddings = checked[EMBEDDINGS] | "LogEmbeddings" >> LogProgress("ContentEmbeddings", "content embeddings")
        return {EMBEDDINGS: embeddings, DROPPED: checked[DROPPED]}


# --------------------------------------------------------------------------- approximate neighbours


class MeanVectorFn(beam.CombineFn):
    """Vectors -> their mean (float32; summed in float64), where the LSH hyperplanes pass; None when empty."""

    def create_accumulator(self):
        return 0.0, 0  # (sum, count): 0.0 + the first vector is that vector

    def add_input(self, accumulator, vector):
        total, count = accumulator
        return total + np.asarray(vector, np.float64), count + 1

    def merge_accumulators(self, accumulators):
        totals, counts = zip(*accumulators)
        return sum(totals), sum(counts)

    def extract_output(self, accumulator):
        total, count = accumulator
        return (total / count).astype(np.float32) if count else None


class SignFn(beam.DoFn):
    """(image_id, unit vector) -> ((round, bucket), (image_id, split code, vector)), once per round.

    The number of bucket bits comes from the number of images (a side input), so a
    bucket holds about `bucket_size` images whatever the catalog size; the
    hyperplanes pass through the mean of all vectors (another side input).
    """

    def __init__(self, rounds: int, bucket_size: int, seed: int):
        self._rounds = rounds
        self._bucket_size = bucket_size
        self._seed = seed
        self._planes = {}

    def _round_planes(self, bits: int, dim: int):
        if (bits, dim) not in self._planes:
            self._planes[(bits, dim)] = [lsh.round_planes(self._seed, r, bits, dim) for r in range(self._rounds)]
        return self._planes[(bits, dim)]

    def process(self, element, num_images: int, center: np.ndarray):
        image_id, vector = element
        bits = lsh.num_bits(num_images, self._bucket_size)
        for round_index, planes in enumerate(self._round_planes(bits, len(vector))):
            code = int(lsh.signatures(vector[None, :], planes, center)[0])
            yield (round_index, code >> lsh.SPLIT_BITS), (image_id, code & ((1 << lsh.SPLIT_BITS) - 1), vector)


class BucketNeighborsFn(beam.DoFn):
    """((round, bucket), [(image_id, split code, vector)]) -> (image_id, [(neighbour, cosine)]) per member."""

    def __init__(self, k: int, min_similarity: float, max_bucket: int):
        self._args = (k, min_similarity, max_bucket)

    def process(self, element):
        _, members = element
        members = sorted(members, key=lambda m: m[0])  # the grouped order is the runner's: fix it
        ids = [image_id for image_id, _, _ in members]
        split_codes = np.array([code for _, code, _ in members], np.int64)
        vectors = np.stack([vector for _, _, vector in members])
        yield from lsh.bucket_neighbors(ids, vectors, split_codes, *self._args)


class MergeNeighborsFn(beam.CombineFn):
    """Several rounds' [(neighbour, cosine)] of one image -> its k most similar distinct neighbours."""

    def __init__(self, k: int):
        self._k = k

    def create_accumulator(self):
        return []

    def add_input(self, accumulator, neighbors):
        return lsh.merge_neighbors([accumulator, neighbors], self._k)

    def merge_accumulators(self, accumulators):
        return lsh.merge_neighbors(accumulators, self._k)

    def extract_output(self, accumulator):
        return accumulator


class LshNeighbors(beam.PTransform):
    """(image_id, unit vector) -> (image_id, [(neighbour id, cosine)]): approximate top k, most similar first.

    Only images with at least one neighbour of cosine >= min_similarity appear.
    """

    def __init__(self, k: int, min_similarity: float, rounds: int, bucket_size: int, max_bucket: int,
                 seed: int = LSH_SEED):
        super().__init__()
        self._k = k
        self._min_similarity = min_similarity
        self._rounds = rounds
        self._bucket_size = bucket_size
        self._max_bucket = max_bucket
        self._seed = seed

    def expand(self, embeddings):
        num_images = embeddings | "CountImages" >> beam.combiners.Count.Globally()
        center = (embeddings
                  | "Vectors" >> beam.Values()
                  | "MeanVector" >> beam.CombineGlobally(MeanVectorFn()))
        return (
            embeddings
            | "Sign" >> beam.ParDo(SignFn(self._rounds, self._bucket_size, self._seed),
                                   beam.pvalue.AsSingleton(num_images), beam.pvalue.AsSingleton(center))
            | "GroupByBucket" >> beam.GroupByKey()
            | "NeighborsInBucket" >> beam.ParDo(BucketNeighborsFn(self._k, self._min_similarity, self._max_bucket))
            | "MergeRounds" >> beam.CombinePerKey(MergeNeighborsFn(self._k))
        )


class ContentEdges(beam.PTransform):
    """(image_id, [(neighbour, cosine)]) -> ((a, b), cosine), a < b: each pair once, whichever side found it."""

    def expand(self, neighbors):
        return (
            neighbors
            | "Pairs" >> beam.FlatMapTuple(
                lambda a, nbrs: [((min(a, b), max(a, b)), sim) for b, sim in nbrs])
            | "OncePerPair" >> beam.CombinePerKey(max)  # both directions carry the same cosine
        )


class BuildContentGraph(beam.PTransform):
    """Good images -> {EMBEDDINGS, DROPPED (ids), EDGES: ((a, b), cosine), a < b} from a ContentGraphConfig.

    `image_size` and `image_input` are the pipeline's (prepared image side; the encoder's
    input name for source=model); `model_dir` is `encoder_dir(...)` for source=model.
    """

    def __init__(self, content_graph, image_size: int, model_dir: str = "", image_input: str = ""):
        super().__init__()
        self._cfg = content_graph
        self._image_size = image_size
        self._model_dir = model_dir
        self._image_input = image_input

    def expand(self, images):
        cfg = self._cfg
        embedded = images | "ContentEmbeddings" >> ContentEmbeddings(
            cfg.source, self._image_size, self._model_dir, self._image_input, cfg.batch_size)
        edges = (
            embedded[EMBEDDINGS]
            | "LshNeighbors" >> LshNeighbors(cfg.neighbors, cfg.min_similarity, cfg.lsh_rounds, cfg.bucket_size,
                                             cfg.max_bucket)
            | "ContentEdges" >> ContentEdges()
            | "LogEdges" >> LogProgress("ContentGraph", "content edges")
        )
        return {EMBEDDINGS: embedded[EMBEDDINGS], DROPPED: embedded[DROPPED], EDGES: edges}
