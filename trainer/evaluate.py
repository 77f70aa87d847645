"""`clicklens evaluate` (also run at the end of `clicklens train`).

Embeds every corpus image with the image tower, retrieves the top 50 for
each distinct eval query (exact search) and scores the ranking against two
relevance sources:

- `selected_pairs`: the eval examples' (query, image) pairs, graded by click
  weight (held-out queries: the pipeline splits train / eval by query);
- `ground_truth`: W/raw/ground_truth.jsonl when it exists (the demo
  generator's true relevance), binary, for the eval queries it covers.

Metrics: recall@1/5/10/50 (share of a query's relevant images in its top K,
averaged over queries), MRR (first relevant image within the top 50), and
NDCG@10.  The same metrics for the freshly initialised model (same seed,
same run) give the baseline.

`cold_start` separates new images from old (trainer/cold_start.py): with a
ground truth, recall@10 and NDCG@10 over all images, logged images only and
never-logged images only, for train-split queries (seen query) and eval-split
queries, next to a random ranking and pixel-kNN over clicks.  Everything goes
to W/model/metrics.json, and the cold-start table is printed.
"""

from __future__ import annotations

import json
import logging
from typing import Dict, List, Mapping, Sequence

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens.errors import ClicklensError
from clicklens.ground_truth import read_ground_truth
from trainer import cold_start
from trainer import input as model_input
from trainer.corpus import Corpus, embed_corpus, embed_queries
from trainer.model import build_model, restore_model, with_image_init_path
from trainer.ranking import RECALL_AT, click_relevance, exact_top_k, ranking_metrics
from trainer.tokenizer import QueryTokenizer

logger = logging.getLogger(__name__)


def ground_truth_relevance(workdir, queries: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """{query: {image id: 1.0}} from W/raw/ground_truth.jsonl for `queries`; {} when the file is absent."""
    return {q: {i: 1.0 for i in ids} for q, ids in read_ground_truth(workdir.ground_truth, queries).items()}


def retrieve(query_tower, tokenizer, corpus: Corpus, queries: List[str], k: int) -> List[List[str]]:
    """Top-k corpus image ids for each query (exact search)."""
    rows = exact_top_k(corpus.embeddings, embed_queries(tokenizer, query_tower, queries), k)
    ids = [i.decode("utf-8") for i in corpus.ids]
    return [[ids[r] for r in row] for row in rows]


def eval_retrieval_measure(config, workdir, tokenizer: QueryTokenizer):
    """A function model -> {"recall@10", "ndcg@10"} of the eval split's clicked pairs over the whole corpus.

    What early stopping watches after each epoch: the same exact retrieval and
    metrics as the final evaluation's `selected_pairs`, without the untrained
    baseline or the ground truth (a demo-only oracle that must not pick the epoch).
    """
    selected = click_relevance(config, workdir, "eval")
    queries = sorted(selected)
    if not queries:
        raise ClicklensError(f"training.early_stopping_metric={config.training.early_stopping_metric} needs eval "
                             f"examples with a query, and {workdir.split_glob('eval')} has none (raise "
                             f"pipeline.eval_fraction or set training.early_stopping_patience=0)")

    def measure(model) -> Dict[str, float]:
        corpus = embed_corpus(config, workdir, model.image_tower, log=False)
        rankings = retrieve(model.query_tower, tokenizer, corpus, queries, 10)
        metrics = ranking_metrics(rankings, [selected[q] for q in queries])
        return {"recall@10": metrics["recall@10"], "ndcg@10": metrics["ndcg@10"]}

    return measure


def evaluate_models(config, workdir, models: Mapping[str, object]) -> Dict[str, object]:
    """Metrics of each named model against every relevance source that exists."""
    tokenizer = QueryTokenizer(workdir.vocab, config.model.max_query_tokens)
    selected = click_relevance(config, workdir, "eval")
    queries = sorted(selected)
    sources = {"selected_pairs": selected}
    truth = ground_truth_relevance(workdir, queries)
    if tf.io.gfile.exists(workdir.ground_truth):
        sources["ground_truth"] = truth
        if not truth:
            logger.warning("%s covers none of the %d eval queries", workdir.ground_truth, len(queries))
    report: Dict[str, object] = {"num_eval_queries": len(queries)}
    corpora = {}
    for name, model in models.items():
        corpus = corpora[name] = embed_corpus(config, workdir, model.image_tower)
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
    if "trained" in models and tf.io.gfile.exists(workdir.ground_truth):
        report["cold_start"] = cold_start.evaluate(config, workdir, models["trained"], corpora["trained"], tokenizer,
                                                   selected)
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
    if "cold_start" in report:
        print(cold_start.format_table(report["cold_start"]), flush=True)
    logger.info("wrote %s", workdir.metrics)
    return report


def run(config, workdir, args) -> int:
    """The `clicklens evaluate` verb."""
    model_input.check_examples(workdir, ("eval", "corpus"))
    # The untrained baseline starts as training did: from the pretrained tower with model.image_init=pretrained.
    with model_input.naming_damaged_examples(workdir):
        evaluate_and_write(with_image_init_path(config, workdir), workdir, restore_model(config, workdir))
    return 0
