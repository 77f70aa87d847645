"""`clicklens export`: versioned SavedModels for TF Serving, and models.config.

    W/export/query_encoder/<v>/          raw query strings -> embedding, hash_code
    W/export/image_encoder/<v>/          raw image bytes   -> embedding, hash_code
    W/export/retrieval_scann/<v>/        ScaNN over the whole corpus (trainer/scann_index.py; needs ScaNN's ops)
    W/export/retrieval_bruteforce/<v>/   exact top-k (TF + tensorflow-text ops: stock TF Serving)
    W/export/models.config               TF Serving ModelServerConfig for all four
    W/export/report.json                 the ScaNN parameters (chosen and tried), recall@k of ScaNN
                                         vs brute force and of Hamming vs float
    W/export/corpus_embeddings/<v>/      the corpus rows the retrieval models hold: ids, content hashes of the
                                         catalog's images, embeddings (clicklens/corpus_embeddings.py), so
                                         `clicklens reindex` (trainer/reindex.py) embeds only new images

The ScaNN index's auto parameters are tuned here (trainer/scann_tuning.py) on
the held-out eval queries, topped up with corpus-derived ones when there are
fewer than 200.  Each version directory is written under a temporary name and
renamed into place when complete (with its warmup requests in assets.extra/),
so a server polling the base path never sees a half-written version; an
existing version is never overwritten.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from clicklens import corpus_embeddings, features, models_config
from clicklens import servables as S
from clicklens.catalog import catalog_path
from clicklens.errors import ClicklensError
from clicklens.workdir import Workdir, join
from trainer import export_signatures as sigs
from trainer import input as model_input
from trainer import scann_index, scann_tuning
from trainer.catalog_scan import scan_catalog
from trainer.corpus import Corpus, embed_corpus, embed_queries, top_k_ids
from trainer.scann_tuning import recall_at_k
from trainer.tokenizer import QueryTokenizer

logger = logging.getLogger(__name__)

SCANN_SAVE_OPTIONS = tf.saved_model.SaveOptions(namespace_whitelist=["Scann"])
RECALL_QUERIES = 500
WARMUP_QUERIES = ["红色 圆形", "red circle"]  # a CJK and a Latin query warm both tokenizer paths


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
    tokenizer = QueryTokenizer(workdir.vocab, config.model.max_query_tokens)
    p = config.pipeline
    return sigs.Encoders(tokenizer, model.query_tower, model.image_tower, p.image_source, p.image_size, p.feature_dim,
                         p.max_image_pixels)


def distinct_eval_queries(config, workdir: Workdir, limit: int = RECALL_QUERIES) -> List[bytes]:
    """The first `limit` distinct non-empty eval queries in file order (none without an eval split)."""
    distinct: Dict[bytes, None] = {}  # insertion-ordered set: the first `limit` distinct queries in file order
    if tf.io.gfile.glob(workdir.split_glob("eval")):
        spec = {features.QUERY: tf.io.FixedLenFeature([], tf.string, default_value="")}
        for batch in model_input.raw_examples(config, workdir.split_glob("eval"), spec):
            distinct.update((q, None) for q in batch[features.QUERY].numpy() if q)
            if len(distinct) >= limit:
                break  # enough: the rest of the eval split need not be read
    return list(distinct)[:limit]


def eval_query_embeddings(encoders: sigs.Encoders, config, workdir: Workdir,
                          limit: int = RECALL_QUERIES) -> np.ndarray:
    """float32 [Q, D]: the first `limit` distinct eval queries (file order), embedded; Q may be 0."""
    queries = distinct_eval_queries(config, workdir, limit)
    if not queries:
        return np.zeros((0, config.model.embedding_dim), np.float32)
    return embed_queries(encoders.tokenizer, encoders.query_tower, queries)


def recall_queries(encoders: sigs.Encoders, config, workdir: Workdir, corpus: Corpus,
                   limit: int = RECALL_QUERIES) -> np.ndarray:
    """Query embeddings to measure recall with: distinct eval queries, else corpus images."""
    queries = eval_query_embeddings(encoders, config, workdir, limit)
    return queries if len(queries) else corpus.embeddings[:limit]


# ---------------------------------------------------------------------------
# Retrieval indexes.


def effective_k(k: int, corpus_size: int) -> int:
    if k > corpus_size:
        logger.warning("export.k=%d exceeds the corpus size; exporting k=%d", k, corpus_size)
    return min(k, corpus_size)


def check_corpus(ids: np.ndarray, embeddings: np.ndarray) -> None:
    """ClicklensError unless every image has one id and a finite, non-zero embedding.

    A NaN makes ScaNN's k-means abort the process, and an all-zero embedding
    (a tower that output nothing) would score 0 against every query: both mean
    a broken model or input, so the export stops and names the images.
    """
    if embeddings.ndim != 2 or len(embeddings) != len(ids) or not len(ids):
        raise ClicklensError(f"corpus: expected ids [N] and embeddings [N, D] with N >= 1, got "
                             f"{np.shape(ids)} and {np.shape(embeddings)}")
    unique, counts = np.unique(ids, return_counts=True)
    for what, bad in [("duplicate image ids", unique[counts > 1]),
                      ("images with non-finite embeddings", ids[~np.isfinite(embeddings).all(axis=1)]),
                      ("images with all-zero embeddings", ids[~embeddings.any(axis=1)])]:
        if len(bad):
            named = ", ".join(repr(x.decode("utf-8", "replace") if isinstance(x, bytes) else x) for x in bad[:5])
            raise ClicklensError(f"corpus: {len(bad)} {what}, e.g. {named}; not exporting an index over them")


def scann_retrieval_index(config, corpus: Corpus, held_out_queries: np.ndarray,
                          previous: Optional[scann_index.ScannParams] = None,
                          ) -> Tuple[scann_index.ScannIndex, Dict[str, object]]:
    """The ScaNN index over the corpus and its report: export.scann as given, its null keys tuned.

    Tuned on the held-out query embeddings, topped up with corpus-derived ones
    to scann_tuning.MIN_TUNING_QUERIES.  `previous` (reindex: the params of the
    index being replaced) is tried first on the layout derived for this corpus
    (scann_tuning.tune).
    """
    k = effective_k(config.export.k, len(corpus.ids))
    queries, derived = scann_tuning.tuning_queries(held_out_queries, corpus.embeddings)
    tuning = scann_tuning.tune(corpus.embeddings, k, queries, config.export.scann, config.export.min_recall,
                               previous=previous)
    try:
        index = scann_index.ScannIndex.from_searcher(tuning.searcher, corpus.ids, k, tuning.params)
    finally:
        scann_index.release(tuning.searcher)
    return index, {**tuning.report(), "corpus_derived_queries": derived}


def bruteforce_index(embeddings: np.ndarray, ids: np.ndarray, k: int, binary: bool = False) -> sigs.BruteForceIndex:
    """An exact index over the candidates (over their +1/-1 codes when `binary`)."""
    candidates = np.where(embeddings > 0, 1.0, -1.0).astype(np.float32) if binary else embeddings
    return sigs.BruteForceIndex(candidates, ids, k)


def top_ids(retrieval: sigs.Retrieval, query_embeddings: np.ndarray) -> np.ndarray:
    """bytes [Q, k]: the ids a retrieval module returns for each query embedding."""
    return top_k_ids(lambda q: retrieval.search_embeddings(q)[S.IMAGE_IDS], query_embeddings)


# ---------------------------------------------------------------------------
# The four servables.


def bruteforce_retrieval(config, encoders, corpus: Corpus) -> sigs.Retrieval:
    """The retrieval_bruteforce module over `corpus` (exact search: no index to build), not yet traced.

    `encoders` is a sigs.Encoders, or anything with its embed_queries /
    embed_images / image_spec (trainer/saved_encoders.py: the exported ones).
    """
    k = effective_k(config.export.k, len(corpus.ids))
    return sigs.Retrieval(encoders, bruteforce_index(corpus.embeddings, corpus.ids, k, config.export.hamming), k,
                          binary=config.export.hamming, name=S.RETRIEVAL_BRUTEFORCE)


def scann_retrieval(config, encoders, corpus: Corpus, scann_top_k: scann_index.ScannIndex) -> sigs.Retrieval:
    """The retrieval_scann module over `corpus` with the built index `scann_top_k`, not yet traced."""
    return sigs.Retrieval(encoders, scann_top_k, effective_k(config.export.k, len(corpus.ids)), name=S.RETRIEVAL_SCANN)


def save_options(name: str) -> Optional[tf.saved_model.SaveOptions]:
    """How model `name` is saved: retrieval_scann keeps ScaNN's ops in its graph."""
    return SCANN_SAVE_OPTIONS if name == S.RETRIEVAL_SCANN else None


def bruteforce_servable(config, encoders, corpus: Corpus) -> Servable:
    """retrieval_bruteforce over `corpus`, signatures traced."""
    brute = bruteforce_retrieval(config, encoders, corpus)
    return Servable(brute, brute.signatures())


def scann_servable(config, encoders, corpus: Corpus, scann_top_k: scann_index.ScannIndex) -> Servable:
    """retrieval_scann over `corpus` with the built index `scann_top_k`, signatures traced."""
    scann = scann_retrieval(config, encoders, corpus, scann_top_k)
    return Servable(scann, scann.signatures(), save_options(S.RETRIEVAL_SCANN))


def retrieval_servables(config, encoders, corpus: Corpus,
                        scann_top_k: scann_index.ScannIndex) -> Dict[str, Servable]:
    """retrieval_scann and retrieval_bruteforce over `corpus`, signatures traced."""
    return {S.RETRIEVAL_SCANN: scann_servable(config, encoders, corpus, scann_top_k),
            S.RETRIEVAL_BRUTEFORCE: bruteforce_servable(config, encoders, corpus)}


def build_servables(config, encoders: sigs.Encoders, corpus: Corpus,
                    scann_top_k: scann_index.ScannIndex) -> Dict[str, Servable]:
    """The four modules over `corpus` (`scann_top_k` from scann_retrieval_index), signatures traced."""
    servables = {}
    for name, module in [(S.QUERY_ENCODER, sigs.QueryEncoder(encoders)),
                         (S.IMAGE_ENCODER, sigs.ImageEncoder(encoders))]:
        servables[name] = Servable(module, module.signatures())
    servables.update(retrieval_servables(config, encoders, corpus, scann_top_k))
    return servables


def measure_recall(config, corpus: Corpus, query_embeddings: np.ndarray,
                   servables: Dict[str, Servable]) -> Dict[str, float]:
    """recall@k of the ScaNN index and of Hamming retrieval, both against exact float retrieval."""
    k = effective_k(config.export.k, len(corpus.ids))
    exact = sigs.Retrieval(None, bruteforce_index(corpus.embeddings, corpus.ids, k), k)
    hamming = sigs.Retrieval(None, bruteforce_index(corpus.embeddings, corpus.ids, k, binary=True), k, binary=True)
    exact_ids = top_ids(exact, query_embeddings)
    return {
        f"scann_recall_at_{k}": recall_at_k(top_ids(servables[S.RETRIEVAL_SCANN].module, query_embeddings), exact_ids),
        f"hamming_recall_at_{k}": recall_at_k(top_ids(hamming, query_embeddings), exact_ids),
    }


# ---------------------------------------------------------------------------
# Writing versions.


def choose_version(workdir: Workdir, requested: int) -> int:
    """`requested`, or one above the newest version of any model (or corpus embeddings) when 0; never an
    existing one."""
    existing = {v for name in S.MODEL_NAMES for v in S.version_dirs(workdir.export_model(name), complete_only=False)}
    existing |= corpus_embeddings.all_version_numbers(workdir.corpus_embeddings)
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
        if input_name == S.QUERY:
            value = tf.make_tensor_proto([q.encode("utf-8") for q in WARMUP_QUERIES], dtype=tf.string)
        else:
            value = tf.make_tensor_proto(np.stack([sample_image]), dtype=spec.dtype)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = name
        request.model_spec.signature_name = signature
        request.inputs[input_name].CopyFrom(value)
        logs.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))
    return logs


def stage_version(servable: Servable, base_path: str, version: int,
                  warmup: List[prediction_log_pb2.PredictionLog], vocab_path: str = "") -> Tuple[str, str]:
    """Writes version `version` of a model under a temporary name; (temporary folder, final folder).

    With `vocab_path`, the vocabulary the model's query tower was trained with goes along (S.EXPORT_VOCAB).
    """
    tmp, final = S.start_version(base_path, version)
    tf.saved_model.save(servable.module, tmp, signatures=servable.signatures, options=servable.options)
    tf.io.gfile.makedirs(join(tmp, "assets.extra"))
    with tf.io.TFRecordWriter(join(tmp, S.WARMUP_FILE)) as writer:
        for log in warmup:
            writer.write(log.SerializeToString())
    if vocab_path:
        tf.io.gfile.copy(vocab_path, join(tmp, S.EXPORT_VOCAB))
    return tmp, final


def save_version(servable: Servable, base_path: str, version: int,
                 warmup: List[prediction_log_pb2.PredictionLog]) -> str:
    """Writes <base_path>/<version>/ via a temporary directory renamed into place; returns the path."""
    tmp, final = stage_version(servable, base_path, version, warmup)
    tf.io.gfile.rename(tmp, final)
    return final


def publish_together(servables: Dict[str, Servable], workdir: Workdir, version: int,
                     sample_image) -> Dict[str, str]:
    """Writes every model's version under a temporary name first, then renames them all into place back to
    back, so a polling server finds the encoders and the retrieval models built from them within moments of
    each other (and none of them when writing fails).  {name: final folder}."""
    staged = {}
    try:
        for name, servable in servables.items():
            vocab = workdir.vocab if name in (S.QUERY_ENCODER, S.IMAGE_ENCODER) else ""
            staged[name] = stage_version(servable, workdir.export_model(name), version,
                                         warmup_logs(name, servable, sample_image), vocab)
    except BaseException:
        for tmp, _ in staged.values():
            tf.io.gfile.rmtree(tmp)
        raise
    return publish_staged(staged)


def publish_staged(staged: Dict[str, Tuple[str, str]]) -> Dict[str, str]:
    """Renames each model's staged version folder into place, back to back; {name: final folder}."""
    for name, (tmp, final) in staged.items():
        tf.io.gfile.rename(tmp, final)
        logger.info("wrote %s", final)
    return {name: final for name, (_, final) in staged.items()}


def corpus_hashes(config, workdir: Workdir, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(hashes, stats), bytes [N] each: the content hash of each corpus image's catalog input as it is now,
    and its file's stat (corpus_embeddings.file_stat); b"" when unknown.

    Without a catalog (an export on a machine that has only W/examples and
    W/model), every hash is unknown and the first reindex re-embeds everything.
    """
    path = catalog_path(config, workdir)
    if not tf.io.gfile.exists(path):
        logger.warning("no catalog at %s: the corpus embeddings are kept without content hashes, so "
                       "`clicklens reindex` will re-embed every image", path)
        unknown = np.full(len(ids), corpus_embeddings.UNKNOWN_HASH.encode(), dtype=bytes)
        return unknown, unknown
    scan = scan_catalog(path, config.pipeline.image_source, config.pipeline.feature_dim,
                        allow_outside_uris=config.pipeline.allow_outside_uris)
    by_id = {image.entry.image_id.encode("utf-8"): image for image in scan.images}
    found = [by_id.get(bytes(i)) for i in ids]
    hashes = np.array([image.hash.encode("ascii") if image else b"" for image in found], dtype=bytes)
    stats = np.array([image.stat.encode("utf-8") if image else b"" for image in found], dtype=bytes)
    unknown = int(np.sum(hashes == b""))
    if unknown:
        logger.warning("%d of %d corpus images have no readable catalog entry in %s now; `clicklens reindex` "
                       "will not reuse their embeddings", unknown, len(ids), path)
    return hashes, stats


def write_corpus_embeddings(workdir: Workdir, version: int, corpus: Corpus, hashes: np.ndarray, stats: np.ndarray,
                            image_encoder_version: int, image_source: str, scann_params: Dict[str, object],
                            written_by: str) -> str:
    """W/export/corpus_embeddings/<version>/: the rows of retrieval <version>, for the next reindex."""
    rows = corpus_embeddings.CorpusEmbeddings(corpus.ids, hashes, corpus.embeddings, image_encoder_version,
                                              image_source, written_by, scann_params, stats)
    return corpus_embeddings.write(workdir.corpus_embeddings, version, rows)


def export(config, workdir: Workdir, model=None, gate: bool = False) -> Tuple[Optional[int], Dict[str, object]]:
    """Exports all four SavedModels as one new version, writes models.config, the report and the corpus
    embeddings (with the catalog's content hashes).

    With `gate`, the candidate is first compared with the version being served (trainer/gate.py); a
    candidate that is worse beyond export.gate_tolerance is not published: (None, report).
    """
    version = choose_version(workdir, config.export.version)
    encoders = build_encoders(config, workdir, model)
    gate_report = None
    if gate:
        from trainer import gate as gates

        gate_report = gates.gate(config, workdir, encoders)
        if gate_report["decision"] == "reject":
            report = {"version": None, "published": False, "gate": gate_report}
            _write_report(workdir, report)
            logger.warning("gate: the candidate is not published; version %s stays served",
                           gate_report["served_version"])
            return None, report
    corpus = embed_corpus(config, workdir, encoders.image_tower)
    check_corpus(corpus.ids, corpus.embeddings)
    eval_queries = eval_query_embeddings(encoders, config, workdir)
    scann, scann_report = scann_retrieval_index(config, corpus, eval_queries)
    servables = build_servables(config, encoders, corpus, scann)
    report: Dict[str, object] = {"version": version, "corpus_size": int(len(corpus.ids)),
                                 "k": effective_k(config.export.k, len(corpus.ids)),
                                 "hamming_bruteforce": config.export.hamming, "scann": scann_report}
    query_embeddings = eval_queries if len(eval_queries) else corpus.embeddings[:RECALL_QUERIES]
    report["recall_queries"] = int(len(query_embeddings))
    report.update(measure_recall(config, corpus, query_embeddings, servables))
    logger.info("recall vs exact float retrieval: %s",
                {k: round(v, 4) for k, v in report.items() if "recall_at" in k})
    if gate_report is not None:
        report["gate"] = gate_report
    paths = publish_together(servables, workdir, version, corpus.sample_image)
    base_paths = {name: _absolute(workdir.export_model(name)) for name in S.MODEL_NAMES}
    models_config.write(workdir.models_config, models_config.build(base_paths, config.export.keep_versions))
    report["models"] = paths
    report["corpus_embeddings"] = write_corpus_embeddings(
        workdir, version, corpus, *corpus_hashes(config, workdir, corpus.ids), version,
        config.pipeline.image_source, scann_report["params"], "export")
    logger.info("wrote %s", report["corpus_embeddings"])
    report["published"] = True
    _write_report(workdir, report)
    logger.info("wrote %s (version %d)", workdir.models_config, version)
    return version, report


def _write_report(workdir: Workdir, report: Dict[str, object]) -> None:
    tf.io.gfile.makedirs(workdir.export)
    with tf.io.gfile.GFile(join(workdir.export, "report.json"), "w") as f:
        json.dump(report, f, indent=2)


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def run(config, workdir: Workdir, args) -> int:
    """The `export` verb (`--gate`: publish only a candidate not worse than the served version)."""
    model_input.check_examples(workdir, ("corpus",))  # eval-* is optional here, and only its start is read
    with model_input.naming_damaged_examples(workdir):
        export(config, workdir, gate=getattr(args, "gate", False))
    return 0
