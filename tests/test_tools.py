"""The embedding tools: cluster-queries, label-images, plot-embeddings on the demo export, plus their numerics."""

import collections
import json
import random
import re

import numpy as np
import pytest

from serving import embedding_math, embedding_plot, tools
from tests.conftest import run_verb

CJK = re.compile(r"[\u3000-\u9fff]")


# ---------------------------------------------------------------------------
# The numerics on data whose answer is known.


def test_kmeans_recovers_separated_blobs():
    rng = np.random.default_rng(1)
    centers = np.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [-5.0, -5.0, 0]])
    truth = np.repeat(np.arange(4), 50)
    x = centers[truth] + rng.normal(scale=0.3, size=(200, 3))
    labels, found, inertia = embedding_math.kmeans(x, 4, seed=3)
    # Same partition up to renaming: every true blob maps to exactly one found cluster.
    assert {tuple(sorted(set(labels[truth == t]))) for t in range(4)} == {(c,) for c in range(4)}
    assert inertia < 200 * 3 * 0.3 ** 2 * 1.5
    assert np.allclose(np.sort(found, axis=0), np.sort(centers, axis=0), atol=0.2)
    with pytest.raises(Exception, match="k-means"):
        embedding_math.kmeans(x, 0)


def test_pca_and_nearest():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 5)) * np.array([10.0, 3.0, 0.1, 0.1, 0.1])
    points, ratio = embedding_math.pca_2d(x)
    assert points.shape == (300, 2) and ratio[0] > ratio[1] > 0.05 and ratio.sum() > 0.99
    assert abs(np.corrcoef(points[:, 0], x[:, 0])[0, 1]) > 0.99
    queries = np.eye(3)
    candidates = np.array([[0.1, 0, 0], [0.9, 0.1, 0], [0, 0.5, 0.5], [0, 0, 2.0]])
    top, scores = embedding_math.nearest(queries, candidates, 2)
    assert top.tolist() == [[1, 0], [2, 1], [3, 2]]
    assert np.allclose(scores[2], [2.0, 0.5])


def test_default_num_clusters_is_bounded():
    assert embedding_math.default_num_clusters(1) == 1
    assert embedding_math.default_num_clusters(3) == 2
    assert embedding_math.default_num_clusters(1530) == 28
    assert embedding_math.default_num_clusters(10 ** 6) == 100


# ---------------------------------------------------------------------------
# The verbs on the demo export, judged against the demo world's ground truth.


def _ground_truth(workdir):
    with open(workdir.ground_truth, encoding="utf-8") as f:
        return {row["query"]: row for row in map(json.loads, f)}


def test_cluster_queries_puts_translations_together(demo_exported, tmp_path):
    output = tmp_path / "clusters.json"
    run_verb("cluster-queries", demo_exported.root, "--output", str(output))
    result = json.loads(output.read_text(encoding="utf-8"))
    report = (tmp_path / "clusters.txt").read_text(encoding="utf-8")
    assert result["model"]["name"] == "query_encoder" and result["num_clusters"] >= 2
    cluster_of = {q["query"]: c["cluster"] for c in result["clusters"] for q in c["queries"]}
    assert len(cluster_of) == result["num_queries"] == sum(c["size"] for c in result["clusters"])
    assert f"{result['num_clusters']} clusters" in report and CJK.search(report)

    # A query and its translation name the same attributes, one in English and one in Chinese.
    truth = _ground_truth(demo_exported)
    by_meaning = collections.defaultdict(lambda: ([], []))
    for query in cluster_of:
        if query in truth:
            key = json.dumps(truth[query]["attributes"], sort_keys=True)
            by_meaning[key][bool(CJK.search(query))].append(query)
    pairs = [(en, zh) for english, chinese in by_meaning.values() for en in english for zh in chinese]
    assert len(pairs) > 100
    together = np.mean([cluster_of[en] == cluster_of[zh] for en, zh in pairs])
    # Chance: two random queries land in the same cluster with probability sum((size / n)^2).
    sizes = np.array([c["size"] for c in result["clusters"]], float)
    chance = float(((sizes / sizes.sum()) ** 2).sum())
    print(f"translations in the same cluster: {together:.3f} (chance {chance:.3f}, {len(pairs)} pairs)")
    assert together > 2 * chance


def test_label_images_beats_shuffled_labels(demo_exported, tmp_path):
    output = tmp_path / "labels.json"
    run_verb("label-images", demo_exported.root, "--output", str(output))
    result = json.loads(output.read_text(encoding="utf-8"))
    images = result["images"]
    assert set(result["models"]) == {"query_encoder", "image_encoder"}
    assert len(images) >= 290  # the catalog's images minus the broken ones
    assert all(len(i["labels"]) == tools.LABELS_PER_IMAGE for i in images)
    assert all(a["lift"] >= b["lift"] for i in images for a, b in zip(i["labels"], i["labels"][1:]))
    assert len({label["query"] for i in images for label in i["labels"]}) > 50  # not the same few hub queries

    truth = _ground_truth(demo_exported)

    def relevance(pairs):
        return np.mean([image_id in set(truth[q]["relevant_image_ids"]) for image_id, q in pairs])

    pairs = [(i["image_id"], label["query"]) for i in images for label in i["labels"]]
    # Chance: the same labels given to other images (controls for how specific the label queries are).
    rng = random.Random(0)
    shuffled_ids = [image_id for image_id, _ in pairs]
    chance = np.mean([relevance(list(zip(rng.sample(shuffled_ids, len(shuffled_ids)), [q for _, q in pairs])))
                      for _ in range(5)])
    precision = relevance(pairs)
    print(f"zero-shot label precision {precision:.3f} (shuffled {chance:.3f})")
    assert precision > 1.5 * chance


def test_plot_embeddings_draws_queries_and_images(demo_exported, tmp_path):
    from PIL import Image

    output = tmp_path / "plot.png"
    run_verb("plot-embeddings", demo_exported.root, "--output", str(output))
    with Image.open(output) as image:
        assert image.format == "PNG" and image.size == embedding_plot.PLOT_SIZE
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    colors = {tuple(p) for p in pixels[::7]}
    assert (0x4E, 0x79, 0xA7) in colors and (0xF2, 0x8E, 0x2B) in colors  # query dots and image dots
    assert (pixels != 255).any(1).mean() > 0.05


def test_tools_explain_a_missing_export(tmp_path):
    from clicklens import cli

    code = cli.main(["cluster-queries", "--workdir", str(tmp_path)])
    assert code == 2
