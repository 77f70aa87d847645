"""`clicklens evaluate` (also run at the end of `clicklens train`).

Embeds every corpus image with the image tower, retrieves the top 50 for
each distinct eval query (tfrs.layers.factorized_top_k.BruteForce) and scores
the ranking against two relevance sources:

- `selected_pairs`: the eval examples' (query, image) pairs, graded by click
  weight (held-out queries: the pipeline splits train / eval by query);
- `ground_truth`: W/raw/ground_truth.jsonl when it exists (the demo
  generator's true relevance), binary, for the eval queries it covers.

Metrics: recall@1/5/10/50 (share of a query's relevant images in its top K,
averaged over queries), MRR (first relevant image within the top 50), and
NDCG@10.  The same metrics for the freshly initialised model (same seed,
same run) give the baseline.  Everything goes to W/model/metrics.json.
"""

from __future__ import annotations

import collections
import json
import logging
import math
from typing import Dict, List, Mapping, Sequence

from trainer import compat  # noqa: F401  (must precede TensorFlow)
import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from trainer import features
from trainer import input as model_input
from trainer.model import build_model, restore_model
from trainer.preprocess import QueryTokenizer

logger = logging.getLogger(__name__)

RECALL_AT = (1, 5, 10, 50)
NDCG_AT = 10


def embed_corpus(config, workdir, image_tower, batch_size: int = 256):
    """(image ids [N] as str, float32 embeddings [N, D]) of every corpus-* image."""
    spec = features.corpus_feature_spec(config.pipeline.image_source, config.pipeline.feature_dim)
    image = features.image_key(config.pipeline.image_source)
    # Decoding runs inside tf.data (graph mode, parallel), not eagerly image by image.
    batches = model_input.raw_examples(config, workdir.split_glob("corpus"), spec, batch_size).map(
        lambda b: (b[features.IMAGE_ID], model_input.image_batch(config, b[image])),
        num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    ids, embeddings = [], []
    for batch_ids, pixels in batches:
        embeddings.append(image_tower(pixels, training=False).numpy())
        ids.extend(v.decode("utf-8") for v in batch_ids.numpy())
    return ids, np.concatenate(embeddings, axis=0)


def eval_relevance(config, workdir) -> Dict[str, Dict[str, float]]:
    """{query: {image id: summed click weight}} of the eval examples that carry a query."""
    relevance: Dict[str, Dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    for batch in model_input.raw_examples(config, workdir.split_glob("eval")):
        for query, image_id, weight in zip(batch[features.QUERY].numpy(), batch[features.IMAGE_ID].numpy(),
                                           batch[features.CLICK_WEIGHT].numpy()):
            if query and weight > 0:
                relevance[query.decode("utf-8")][image_id.decode("utf-8")] += float(weight)
    return {q: dict(r) for q, r in relevance.items()}


def ground_truth_relevance(workdir, queries: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """{query: {image id: 1.0}} from W/raw/ground_truth.jsonl for `queries`; {} when the file is absent."""
    if not tf.io.gfile.exists(workdir.ground_truth):
        return {}
    wanted = set(queries)
    out = {}
    with tf.io.gfile.GFile(workdir.ground_truth, "r") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            if record["query"] in wanted and record["relevant_image_ids"]:
                out[record["query"]] = {i: 1.0 for i in record["relevant_image_ids"]}
    return out


def retrieve(query_tower, tokenizer, corpus_ids, corpus_embeddings, queries: List[str], k: int,
             batch_size: int = 512) -> List[List[str]]:
    """Top-k corpus image ids for each query (exact search)."""
    index = tfrs.layers.factorized_top_k.BruteForce(k=k)
    index.index(tf.constant(corpus_embeddings), tf.constant(corpus_ids))
    out = []
    for start in range(0, len(queries), batch_size):
        tokens = tokenizer(tf.constant(queries[start:start + batch_size]))
        _, ids = index(query_tower(tokens, training=False), k=k)
        out.extend([[i.decode("utf-8") for i in row] for row in ids.numpy()])
    return out


def ranking_metrics(rankings: Sequence[Sequence[str]], relevance: Sequence[Mapping[str, float]]) -> Dict[str, float]:
    """recall@K, MRR and graded NDCG@10 averaged over queries (rankings[i] scored by relevance[i])."""
    sums = collections.Counter()
    for ranked, gains in zip(rankings, relevance):
        hits = [ranked_id in gains for ranked_id in ranked]
        for k in RECALL_AT:
            sums[f"recall@{k}"] += sum(hits[:k]) / len(gains)
        first = next((rank for rank, hit in enumerate(hits, start=1) if hit), None)
        sums["mrr"] += 1.0 / first if first else 0.0
        dcg = sum(gains.get(i, 0.0) / math.log2(r + 2) for r, i in enumerate(ranked[:NDCG_AT]))
        ideal = sum(g / math.log2(r + 2) for r, g in enumerate(sorted(gains.values(), reverse=True)[:NDCG_AT]))
        sums[f"ndcg@{NDCG_AT}"] += dcg / ideal if ideal > 0 else 0.0
    n = max(len(rankings), 1)
    names = [f"recall@{k}" for k in RECALL_AT] + ["mrr", f"ndcg@{NDCG_AT}"]
    return {name: sums[name] / n for name in names}


def evaluate_models(config, workdir, models: Mapping[str, object]) -> Dict[str, object]:
    """Metrics of each named model against every relevance source that exists."""
    tokenizer = QueryTokenizer(workdir.vocab, config.model.max_query_tokens)
    selected = eval_relevance(config, workdir)
    queries = sorted(selected)
    sources = {"selected_pairs": selected}
    truth = ground_truth_relevance(workdir, queries)
    if tf.io.gfile.exists(workdir.ground_truth):
        sources["ground_truth"] = truth
        if not truth:
            logger.warning("%s covers none of the %d eval queries", workdir.ground_truth, len(queries))
    report: Dict[str, object] = {"num_eval_queries": len(queries)}
    for name, model in models.items():
        corpus_ids, corpus_embeddings = embed_corpus(config, workdir, model.image_tower)
        k = min(max(RECALL_AT), len(corpus_ids))
        rankings = dict(zip(queries, retrieve(model.query_tower, tokenizer, corpus_ids, corpus_embeddings,
                                              queries, k)))
        report["corpus_size"] = len(corpus_ids)
        for source, relevance in sources.items():
            qs = sorted(relevance)
            section = report.setdefault(source, {"num_queries": len(qs)})
            section[name] = ranking_metrics([rankings[q] for q in qs], [relevance[q] for q in qs])
    for source in sources:
        section = report[source]
        if "trained" in section and "untrained" in section:
            base = section["untrained"]["recall@10"]
            section["recall@10_vs_untrained"] = section["trained"]["recall@10"] / base if base > 0 else None
    return report


def evaluate_and_write(config, workdir, trained_model) -> Dict[str, object]:
    """Evaluates the trained model and the same model freshly initialised; writes W/model/metrics.json."""
    tf.keras.utils.set_random_seed(config.training.seed)  # initialised as the training run was
    vocab_size = trained_model.query_tower.get_layer("token_embedding").input_dim
    untrained = build_model(config, vocab_size)
    report = evaluate_models(config, workdir, {"trained": trained_model, "untrained": untrained})
    tf.io.gfile.makedirs(workdir.model)
    with tf.io.gfile.GFile(workdir.metrics, "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    for source in ("selected_pairs", "ground_truth"):
        if source in report:
            s = report[source]
            logger.info("%s (%d queries): recall@10 %.4f (untrained %.4f), MRR %.4f, NDCG@10 %.4f", source,
                        s["num_queries"], s["trained"]["recall@10"], s["untrained"]["recall@10"],
                        s["trained"]["mrr"], s["trained"]["ndcg@10"])
    logger.info("wrote %s", workdir.metrics)
    return report


def run(config, workdir, args) -> int:
    """The `clicklens evaluate` verb."""
    evaluate_and_write(config, workdir, restore_model(config, workdir))
    return 0
