"""`clicklens export`: versioned SavedModels for TF Serving, and models.config.

    W/export/query_encoder/<v>/          raw query strings -> embedding, hash_code
    W/export/image_encoder/<v>/          raw image bytes   -> embedding, hash_code
    W/export/retrieval_scann/<v>/        tfrs ScaNN over the whole corpus (needs ScaNN's ops to serve)
    W/export/retrieval_bruteforce/<v>/   tfrs BruteForce (TF + tensorflow-text ops: stock TF Serving)
    W/export/models.config               TF Serving ModelServerConfig for all four
    W/export/report.json                 recall@k of ScaNN vs brute force and of Hamming vs float

Each version directory is written under a temporary name and renamed into
place when complete (with its warmup requests in assets.extra/), so a server
polling the base path never sees a half-written version; an existing version
is never overwritten.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from trainer import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf
import tensorflow_recommenders as tfrs
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from serving import models_config, saved_models
from trainer import export_signatures as sigs
from trainer import features, preprocess
from trainer.errors import ClicklensError
from trainer.workdir import Workdir, join

logger = logging.getLogger(__name__)

QUERY_ENCODER = "query_encoder"
IMAGE_ENCODER = "image_encoder"
RETRIEVAL_SCANN = "retrieval_scann"
RETRIEVAL_BRUTEFORCE = "retrieval_bruteforce"
MODEL_NAMES = (QUERY_ENCODER, IMAGE_ENCODER, RETRIEVAL_SCANN, RETRIEVAL_BRUTEFORCE)
SCANN_SAVE_OPTIONS = tf.saved_model.SaveOptions(namespace_whitelist=["Scann"])
EMBED_BATCH = 256
RECALL_QUERIES = 500
WARMUP_QUERIES = ["红色 圆形", "red circle"]  # a CJK and a Latin query warm both tokenizer paths


class Corpus(NamedTuple):
    """Every candidate image: ids (bytes [N]) and embeddings (float32 [N, D])."""

    ids: np.ndarray
    embeddings: np.ndarray
    sample_image: object  # one raw image (bytes, or a feature vector) for warmup requests


class Servable(NamedTuple):
    """A module ready to save: its signatures and save options."""

    module: tf.Module
    signatures: Dict[str, object]
    options: Optional[tf.saved_model.SaveOptions] = None


# ---------------------------------------------------------------------------
# Inputs: towers, corpus, recall queries.


def build_encoders(config, workdir: Workdir, model=None) -> sigs.Encoders:
    """The trained towers (restored from W/model unless given) plus the in-graph tokenizer."""
    if model is None:
        from trainer.model import restore_model

        model = restore_model(config, workdir)
    tokenizer = preprocess.QueryTokenizer(workdir.vocab, config.model.max_query_tokens)
    p = config.pipeline
    return sigs.Encoders(tokenizer, model.query_tower, model.image_tower, p.image_source, p.image_size, p.feature_dim)


def _records(glob: str, spec) -> tf.data.Dataset:
    files = tf.io.gfile.glob(glob)
    if not files:
        raise ClicklensError(f"no files match {glob} (run `clicklens pipeline` first)")
    return tf.data.TFRecordDataset(sorted(files), compression_type="GZIP").map(
        lambda record: tf.io.parse_single_example(record, spec))


def embed_corpus(encoders: sigs.Encoders, config, workdir: Workdir) -> Corpus:
    """Embeds every image of W/examples/corpus-*; duplicate ids keep their first image."""
    p = config.pipeline
    image_key = features.image_key(p.image_source)
    dataset = _records(workdir.split_glob("corpus"), features.corpus_feature_spec(p.image_source, p.feature_dim))
    embed = tf.function(encoders.embed_images)
    ids, embeddings, sample = [], [], None
    for batch in dataset.batch(EMBED_BATCH):
        if sample is None:
            sample = batch[image_key][0].numpy()
        ids.append(batch[features.IMAGE_ID].numpy())
        embeddings.append(embed(batch[image_key]).numpy())
    if not ids:
        raise ClicklensError(f"{workdir.split_glob('corpus')}: the corpus is empty")
    ids, embeddings = np.concatenate(ids), np.concatenate(embeddings).astype(np.float32)
    _, first = np.unique(ids, return_index=True)
    if len(first) < len(ids):
        logger.warning("corpus has %d duplicate image ids; keeping the first of each", len(ids) - len(first))
        keep = np.sort(first)
        ids, embeddings = ids[keep], embeddings[keep]
    logger.info("embedded %d corpus images (dim %d)", len(ids), embeddings.shape[1])
    return Corpus(ids, embeddings, sample)


def recall_queries(encoders: sigs.Encoders, workdir: Workdir, corpus: Corpus, limit: int = RECALL_QUERIES) -> np.ndarray:
    """Query embeddings to measure recall with: distinct eval queries, else corpus images."""
    queries: List[bytes] = []
    if tf.io.gfile.glob(workdir.split_glob("eval")):
        spec = {features.QUERY: tf.io.FixedLenFeature([], tf.string, default_value="")}
        seen = set()
        for row in _records(workdir.split_glob("eval"), spec).as_numpy_iterator():
            q = row[features.QUERY]
            if q and q not in seen:
                seen.add(q)
                queries.append(q)
                if len(queries) >= limit:
                    break
    if not queries:
        return corpus.embeddings[:limit]
    embed = tf.function(encoders.embed_queries)
    return np.concatenate([embed(tf.constant(queries[i:i + EMBED_BATCH])).numpy()
                           for i in range(0, len(queries), EMBED_BATCH)])


# ---------------------------------------------------------------------------
# Retrieval indexes (tfrs.layers.factorized_top_k).


def effective_k(k: int, corpus_size: int) -> int:
    if k > corpus_size:
        logger.warning("export.k=%d exceeds the corpus size; exporting k=%d", k, corpus_size)
    return min(k, corpus_size)


def scann_layer(embeddings: np.ndarray, ids: np.ndarray, k: int, scann_config) -> tfrs.layers.factorized_top_k.ScaNN:
    """A ScaNN index (dot product) over the candidates, parameters from config.export.scann."""
    num_leaves = min(scann_config.num_leaves, len(embeddings))
    if num_leaves < scann_config.num_leaves:
        logger.warning("export.scann.num_leaves=%d exceeds the corpus size; using %d",
                       scann_config.num_leaves, num_leaves)
    layer = tfrs.layers.factorized_top_k.ScaNN(
        k=k,
        distance_measure="dot_product",
        num_leaves=num_leaves,
        num_leaves_to_search=min(scann_config.num_leaves_to_search, num_leaves),
        dimensions_per_block=scann_config.dimensions_per_block,
        num_reordering_candidates=scann_config.num_reordering_candidates or None,
        name="scann")
    return layer.index(tf.constant(embeddings), tf.constant(ids))


def bruteforce_layer(embeddings: np.ndarray, ids: np.ndarray, k: int,
                     binary: bool = False) -> tfrs.layers.factorized_top_k.BruteForce:
    """An exact index over the candidates (over their +1/-1 codes when `binary`)."""
    candidates = sigs.signed_code(tf.constant(embeddings)) if binary else tf.constant(embeddings)
    return tfrs.layers.factorized_top_k.BruteForce(k=k, name="bruteforce").index(candidates, tf.constant(ids))


def recall_at_k(approximate_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |approximate top-k ∩ exact top-k| / k."""
    hits = [len(set(a) & set(e)) / len(e) for a, e in zip(approximate_ids, exact_ids)]
    return float(np.mean(hits))


def top_ids(retrieval: sigs.Retrieval, query_embeddings: np.ndarray) -> np.ndarray:
    out = [retrieval.search_embeddings(tf.constant(query_embeddings[i:i + EMBED_BATCH]))[sigs.IMAGE_IDS].numpy()
           for i in range(0, len(query_embeddings), EMBED_BATCH)]
    return np.concatenate(out)


# ---------------------------------------------------------------------------
# The four servables.


def build_servables(config, encoders: sigs.Encoders, corpus: Corpus) -> Dict[str, Servable]:
    """The four modules, indexed over `corpus`, with their signatures traced."""
    k = effective_k(config.export.k, len(corpus.ids))
    scann = sigs.Retrieval(encoders, scann_layer(corpus.embeddings, corpus.ids, k, config.export.scann), k,
                           name=RETRIEVAL_SCANN)
    brute = sigs.Retrieval(encoders, bruteforce_layer(corpus.embeddings, corpus.ids, k, config.export.hamming), k,
                           binary=config.export.hamming, name=RETRIEVAL_BRUTEFORCE)
    servables = {}
    for name, module, options in [(QUERY_ENCODER, sigs.QueryEncoder(encoders), None),
                                  (IMAGE_ENCODER, sigs.ImageEncoder(encoders), None),
                                  (RETRIEVAL_SCANN, scann, SCANN_SAVE_OPTIONS),
                                  (RETRIEVAL_BRUTEFORCE, brute, None)]:
        servables[name] = Servable(module, module.signatures(), options)
    return servables


def measure_recall(config, corpus: Corpus, query_embeddings: np.ndarray,
                   servables: Dict[str, Servable]) -> Dict[str, float]:
    """recall@k of the ScaNN index and of Hamming retrieval, both against exact float retrieval."""
    k = effective_k(config.export.k, len(corpus.ids))
    exact = sigs.Retrieval(None, bruteforce_layer(corpus.embeddings, corpus.ids, k), k)
    hamming = sigs.Retrieval(None, bruteforce_layer(corpus.embeddings, corpus.ids, k, binary=True), k, binary=True)
    exact_ids = top_ids(exact, query_embeddings)
    return {
        f"scann_recall_at_{k}": recall_at_k(top_ids(servables[RETRIEVAL_SCANN].module, query_embeddings), exact_ids),
        f"hamming_recall_at_{k}": recall_at_k(top_ids(hamming, query_embeddings), exact_ids),
    }


# ---------------------------------------------------------------------------
# Writing versions.


def existing_versions(base_path: str) -> List[int]:
    if not tf.io.gfile.isdir(base_path):
        return []
    return sorted(int(e.rstrip("/")) for e in tf.io.gfile.listdir(base_path) if e.rstrip("/").isdigit())


def choose_version(workdir: Workdir, requested: int) -> int:
    """`requested`, or one above the newest version of any model when 0; never an existing one."""
    existing = {v for name in MODEL_NAMES for v in existing_versions(workdir.export_model(name))}
    if requested == 0:
        return max(existing, default=0) + 1
    if requested in existing:
        raise ClicklensError(f"export.version={requested} already exists under {workdir.export}; "
                             "versions are never overwritten (use 0 for the next one)")
    return requested


def warmup_logs(name: str, servable: Servable, sample_image) -> List[prediction_log_pb2.PredictionLog]:
    """One PredictRequest per signature, batched over the warmup inputs, as PredictionLogs."""
    logs = []
    for signature, function in servable.signatures.items():
        args, kwargs = function.structured_input_signature
        (spec,) = list(args) + list(kwargs.values())
        input_name = spec.name
        if input_name == sigs.QUERY:
            value = tf.make_tensor_proto([q.encode("utf-8") for q in WARMUP_QUERIES], dtype=tf.string)
        else:
            value = tf.make_tensor_proto(np.stack([sample_image]), dtype=spec.dtype)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = name
        request.model_spec.signature_name = signature
        request.inputs[input_name].CopyFrom(value)
        logs.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))
    return logs


def save_version(servable: Servable, base_path: str, version: int,
                 warmup: List[prediction_log_pb2.PredictionLog]) -> str:
    """Writes <base_path>/<version>/ via a temporary directory renamed into place; returns the path."""
    final = join(base_path, str(version))
    if tf.io.gfile.exists(final):
        raise ClicklensError(f"{final} already exists; versions are never overwritten")
    tmp = join(base_path, f".tmp-{version}")
    if tf.io.gfile.exists(tmp):
        tf.io.gfile.rmtree(tmp)
    tf.io.gfile.makedirs(base_path)
    tf.saved_model.save(servable.module, tmp, signatures=servable.signatures, options=servable.options)
    tf.io.gfile.makedirs(join(tmp, "assets.extra"))
    with tf.io.TFRecordWriter(join(tmp, saved_models.WARMUP_FILE)) as writer:
        for log in warmup:
            writer.write(log.SerializeToString())
    tf.io.gfile.rename(tmp, final)
    return final


def export(config, workdir: Workdir, model=None) -> Tuple[int, Dict[str, object]]:
    """Exports all four SavedModels as one new version, writes models.config and the report."""
    version = choose_version(workdir, config.export.version)
    encoders = build_encoders(config, workdir, model)
    corpus = embed_corpus(encoders, config, workdir)
    servables = build_servables(config, encoders, corpus)
    report: Dict[str, object] = {"version": version, "corpus_size": int(len(corpus.ids)),
                                 "k": effective_k(config.export.k, len(corpus.ids)),
                                 "hamming_bruteforce": config.export.hamming}
    query_embeddings = recall_queries(encoders, workdir, corpus)
    report["recall_queries"] = int(len(query_embeddings))
    report.update(measure_recall(config, corpus, query_embeddings, servables))
    logger.info("recall vs exact float retrieval: %s",
                {k: round(v, 4) for k, v in report.items() if "recall_at" in k})
    paths = {}
    for name, servable in servables.items():
        paths[name] = save_version(servable, workdir.export_model(name), version,
                                   warmup_logs(name, servable, corpus.sample_image))
        logger.info("wrote %s", paths[name])
    base_paths = {name: _absolute(workdir.export_model(name)) for name in MODEL_NAMES}
    models_config.write(workdir.models_config, models_config.build(base_paths, config.export.keep_versions))
    report["models"] = paths
    with tf.io.gfile.GFile(join(workdir.export, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    logger.info("wrote %s (version %d)", workdir.models_config, version)
    return version, report


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def run(config, workdir: Workdir, args) -> int:
    """The `export` verb."""
    export(config, workdir)
    return 0
