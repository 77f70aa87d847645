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

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf
import tensorflow_recommenders as tfrs

from clicklens import features
from clicklens.ground_truth import read_ground_truth
from trainer import input as model_input
from trainer.corpus import Corpus, embed_corpus, embed_queries, top_k_ids
from trainer.model import build_model, restore_model
from trainer.tokenizer import QueryTokenizer

logger = logging.getLogger(__name__)

RECALL_AT = (1, 5, 10, 50)
NDCG_AT = 10


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
    return {q: {i: 1.0 for i in ids} for q, ids in read_ground_truth(workdir.ground_truth, queries).items()}


def retrieve(query_tower, tokenizer, corpus: Corpus, queries: List[str], k: int) -> List[List[str]]:
    """Top-k corpus image ids for each query (exact search)."""
    index = tfrs.layers.factorized_top_k.BruteForce(k=k)
    index.index(tf.constant(corpus.embeddings), tf.constant(corpus.ids))
    ids = top_k_ids(lambda q: index(q, k=k)[1], embed_queries(tokenizer, query_tower, queries))
    return [[i.decode("utf-8") for i in row] for row in ids]


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
        corpus = embed_corpus(config, workdir, model.image_tower)
        k = min(max(RECALL_AT), len(corpus.ids))
        rankings = dict(zip(queries, retrieve(model.query_tower, tokenizer, corpus, queries, k)))
        report["corpus_size"] = len(corpus.ids)
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
