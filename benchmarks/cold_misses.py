"""Where the cold-start misses are: cold recall@10 by the attributes a query names, and how often the
never-logged images' graph neighbours share each attribute.

    .venv/bin/python benchmarks/cold_misses.py --workdir W [--runs graph_off-seed1 content_pixels-seed1]

W is a `benchmarks/cold_start.py` workdir.  For each trained run under W/runs/ it restores the model
from its checkpoints, embeds the catalog, ranks the never-logged ("cold") images for every train-split
query with a relevant cold image, and prints recall@10 per query kind (the demo world's ground truth names
each query's attributes: "color_pattern_shape", ...) beside the best possible (a query with more than 10
relevant images cannot reach 1).  Then, from each run's training examples, the share of the cold images'
neighbour slots that hold an image of the same shape, colour and pattern (catalog.jsonl's attributes).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clicklens import compat  # noqa: F401,E402

from clicklens import features  # noqa: E402
from clicklens.config import load_config  # noqa: E402
from clicklens.ground_truth import read_ground_truth, read_ground_truth_extra  # noqa: E402
from clicklens.workdir import Workdir  # noqa: E402
from trainer import input as model_input  # noqa: E402
from trainer.cold_start import K, read_logged_images  # noqa: E402
from trainer.corpus import embed_corpus, embed_queries  # noqa: E402
from trainer.model import restore_model  # noqa: E402
from trainer.ranking import click_relevance, exact_top_k, ranking_metrics  # noqa: E402
from trainer.tokenizer import QueryTokenizer  # noqa: E402

ATTRIBUTES = ("shape", "color", "pattern")


def recall_by_kind(config, workdir: Workdir):
    """{kind: (queries, mean relevant cold images, best possible, recall@K)} over train-split queries, plus 'all'."""
    model = restore_model(config, workdir)
    tokenizer = QueryTokenizer(workdir.vocab, config.model.max_query_tokens)
    corpus = embed_corpus(config, workdir, model.image_tower, log=False)
    ids = [i.decode("utf-8") for i in corpus.ids]
    logged = read_logged_images(workdir)
    cold_rows = np.array([r for r, image_id in enumerate(ids) if image_id not in logged])
    cold_ids = {ids[r] for r in cold_rows}
    truth = read_ground_truth(workdir.ground_truth, click_relevance(config, workdir, "train"))
    relevant = {q: ids_ & cold_ids for q, ids_ in truth.items() if ids_ & cold_ids}
    queries = sorted(relevant)
    kind_of = read_ground_truth_extra(workdir.ground_truth, "category")
    top = exact_top_k(corpus.embeddings[cold_rows], embed_queries(tokenizer, model.query_tower, queries), K)
    rankings = [[ids[cold_rows[c]] for c in row] for row in top]
    groups = collections.defaultdict(list)
    for row, query in enumerate(queries):
        groups[kind_of.get(query, "unknown")].append(row)
    groups["all"] = list(range(len(queries)))
    out = {}
    for kind, rows in groups.items():
        sizes = [len(relevant[queries[r]]) for r in rows]
        recall = ranking_metrics([rankings[r] for r in rows],
                                 [dict.fromkeys(relevant[queries[r]], 1.0) for r in rows])[f"recall@{K}"]
        out[kind] = (len(rows), float(np.mean(sizes)), float(np.mean([min(K, n) / n for n in sizes])), recall)
    return out


def neighbour_agreement(config, workdir: Workdir):
    """(cold images, {attribute: share of their neighbour slots with the same value}) from W/examples/train-*."""
    catalog = {}
    with open(workdir.catalog, encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            if all(a in record for a in ATTRIBUTES):
                catalog[record["image_id"]] = record
    logged = read_logged_images(workdir)
    slots = [features.neighbor_key(i, features.IMAGE_ID) for i in range(config.pipeline.max_neighbors)]
    neighbours = {}
    for batch in model_input.raw_examples(config, workdir.split_glob("train")):
        columns = [batch[features.IMAGE_ID].numpy()] + [batch[s].numpy() for s in slots]
        for image_id, *found in zip(*columns):
            image_id = image_id.decode("utf-8")
            if image_id not in logged and image_id in catalog and any(found):
                neighbours[image_id] = [n.decode("utf-8") for n in found if n]
    same = collections.defaultdict(list)
    for image_id, others in neighbours.items():
        for other in others:
            if other not in catalog:
                continue
            a, b = catalog[image_id], catalog[other]
            for attribute in ATTRIBUTES:
                same[attribute].append(a[attribute] == b[attribute])
            same["shape+color"].append(a["shape"] == b["shape"] and a["color"] == b["color"])
            same["all three"].append(all(a[x] == b[x] for x in ATTRIBUTES))
    return len(neighbours), {name: float(np.mean(values)) for name, values in same.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a benchmarks/cold_start.py workdir")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--runs", nargs="*", help="names under W/runs/ (default: every finished run)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    runs_dir = pathlib.Path(args.workdir) / "runs"
    names = args.runs or sorted(p.name for p in runs_dir.iterdir() if (p / "model" / "metrics.json").exists())
    tables = {}
    for name in names:
        workdir = Workdir(str(runs_dir / name))
        tables[name] = recall_by_kind(config, workdir)
        cold_images, agreement = neighbour_agreement(config, workdir)
        print(f"{name}: {cold_images} cold images have graph neighbours"
              + ("; their neighbour slots hold the same " + ", ".join(f"{k} {v:.2f}" for k, v in agreement.items())
                 if agreement else ""), flush=True)
    kinds = sorted(tables[names[0]], key=lambda k: (k == "all", -tables[names[0]][k][0]))
    print(f"\ncold recall@{K} of train-split queries by the attributes they name")
    print(f"{'query kind':28s} {'queries':>7s} {'relevant':>8s} {'best':>6s} " + " ".join(f"{n:>22s}" for n in names))
    for kind in kinds:
        count, relevant, best, _ = tables[names[0]][kind]
        cells = " ".join(f"{tables[n][kind][3]:22.3f}" if kind in tables[n] else f"{'-':>22s}" for n in names)
        print(f"{kind:28s} {count:7d} {relevant:8.1f} {best:6.3f} {cells}")


if __name__ == "__main__":
    main()
