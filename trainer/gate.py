"""`clicklens export --gate`: a new model is published only if it is not worse than the one being served.

The served version is the newest version of the exported encoders (what a
server polling W/export answers with).  Both it and the candidate are scored
by the same code on the same data: every image of today's corpus
(W/examples/corpus-*) is embedded by each model's own image encoder from the
stored image bytes, each distinct eval query by its query encoder from the raw
text, the top 50 are exact dot-product search, and the metrics are those of
`clicklens evaluate` (trainer/ranking.py) against the eval split's clicked
pairs (`selected_pairs`) and, when it exists, W/raw/ground_truth.jsonl
(`ground_truth`, the demo world's oracle: reported, never decisive, as real
logs have none).

The candidate passes when its `export.gate_metric` on `selected_pairs` is at
least the served one's minus `export.gate_tolerance`; with nothing served it
passes.  The decision and both sets of figures go to W/export/report.json.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import numpy as np

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens import features
from clicklens import servables as S
from clicklens.batching import map_batches
from clicklens.errors import ClicklensError
from clicklens.workdir import Workdir
from trainer import input as model_input
from trainer.evaluate import ground_truth_relevance
from trainer.ranking import RECALL_AT, click_relevance, exact_top_k, ranking_metrics

logger = logging.getLogger(__name__)

EMBED_BATCH = 256
DECISIVE_SOURCE = "selected_pairs"


def served_version(workdir: Workdir) -> Optional[int]:
    """The newest version both exported encoders have (what is being served), or None before any export."""
    queries = S.version_dirs(workdir.export_model(S.QUERY_ENCODER))
    images = S.version_dirs(workdir.export_model(S.IMAGE_ENCODER))
    common = set(queries) & set(images)
    return max(common) if common else None


def load_served_encoders(workdir: Workdir, version: int):
    """Both encoders of an exported version, loaded (trainer/saved_encoders.py)."""
    from trainer.saved_encoders import SavedEncoders

    folders = (S.version_dirs(workdir.export_model(S.QUERY_ENCODER))[version],
               S.version_dirs(workdir.export_model(S.IMAGE_ENCODER))[version])
    return SavedEncoders(tf.saved_model.load(folders[0]), tf.saved_model.load(folders[1]), version, folders)


def corpus_images(config, workdir: Workdir) -> Tuple[List[str], list]:
    """(image ids, stored images: PNG bytes or feature vectors) of W/examples/corpus-*, each id once."""
    p = config.pipeline
    key = features.image_key(p.image_source)
    spec = features.corpus_feature_spec(p.image_source, p.feature_dim)
    ids, images, seen = [], [], set()
    for batch in model_input.raw_examples(config, workdir.split_glob("corpus"), spec, EMBED_BATCH):
        for image_id, image in zip(batch[features.IMAGE_ID].numpy(), batch[key].numpy()):
            if image_id not in seen:
                seen.add(image_id)
                ids.append(image_id.decode("utf-8"))
                images.append(image)
    if not ids:
        raise ClicklensError(f"{workdir.split_glob('corpus')}: the corpus is empty")
    return ids, images


def relevance_sources(config, workdir: Workdir) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{source: {query: {image id: gain}}}: the eval split's clicked pairs, and the ground truth when there is one."""
    selected = click_relevance(config, workdir, "eval")
    if not selected:
        raise ClicklensError(f"export --gate: {workdir.split_glob('eval')} has no query to compare the models on "
                             "(raise pipeline.eval_fraction)")
    sources = {DECISIVE_SOURCE: selected}
    truth = ground_truth_relevance(workdir, sorted(selected))
    if truth:
        sources["ground_truth"] = truth
    return sources


def score(encoders, ids: List[str], images: list, sources) -> Dict[str, Dict[str, float]]:
    """Ranking metrics of one model (anything with embed_queries / embed_images on raw inputs) per source."""
    dtype = encoders.image_spec().dtype
    corpus = map_batches(lambda rows: encoders.embed_images(tf.constant(np.stack(rows) if dtype != tf.string
                                                                        else list(rows), dtype)),
                         images, EMBED_BATCH).astype(np.float32)
    queries = sorted({q for relevance in sources.values() for q in relevance})
    embedded = map_batches(lambda batch: encoders.embed_queries(tf.constant(batch, tf.string)),
                           [q.encode("utf-8") for q in queries], EMBED_BATCH).astype(np.float32)
    top = exact_top_k(corpus, embedded, min(max(RECALL_AT), len(ids)))
    rankings = {q: [ids[r] for r in row] for q, row in zip(queries, top)}
    out = {}
    for source, relevance in sources.items():
        qs = sorted(relevance)
        out[source] = {"num_queries": len(qs),
                       **ranking_metrics([rankings[q] for q in qs], [relevance[q] for q in qs])}
    return out


def decide(config, candidate: Dict[str, Dict[str, float]], served: Optional[Dict[str, Dict[str, float]]]) -> bool:
    """Whether the candidate may be published (export.gate_metric on selected_pairs, within gate_tolerance)."""
    if served is None:
        return True
    metric = config.export.gate_metric
    return candidate[DECISIVE_SOURCE][metric] >= served[DECISIVE_SOURCE][metric] - config.export.gate_tolerance


def gate(config, workdir: Workdir, candidate_encoders) -> Dict[str, object]:
    """Scores the candidate and the served version on today's eval set; the decision and both sets of figures."""
    ids, images = corpus_images(config, workdir)
    sources = relevance_sources(config, workdir)
    version = served_version(workdir)
    candidate = score(candidate_encoders, ids, images, sources)
    served = score(load_served_encoders(workdir, version), ids, images, sources) if version is not None else None
    passed = decide(config, candidate, served)
    metric, tolerance = config.export.gate_metric, config.export.gate_tolerance
    report = {"metric": metric, "source": DECISIVE_SOURCE, "tolerance": tolerance, "served_version": version,
              "corpus_size": len(ids), "candidate": candidate, "served": served,
              "decision": "publish" if passed else "reject"}
    if served is None:
        logger.info("gate: nothing served yet; publishing")
    else:
        logger.info("gate: candidate %s %.4f vs served version %d %.4f (tolerance %.4f): %s", metric,
                    candidate[DECISIVE_SOURCE][metric], version, served[DECISIVE_SOURCE][metric], tolerance,
                    report["decision"])
    return report
