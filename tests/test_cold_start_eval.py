"""The cold-start evaluation's pieces without training: the pixel-kNN baseline, the ratios and the table
(trainer/cold_start.py), and the graph-node line the trainer logs (trainer/task.py, log_graph_nodes)."""

import json
import logging
import math
import re

import numpy as np
import pytest

from clicklens import compat  # noqa: F401  (before TensorFlow)
import tensorflow as tf

from clicklens.config import DEFAULT_CONFIG, load_config
from clicklens.workdir import Workdir
from tests import trainer_synthetic as synth
from trainer import cold_start
from trainer.corpus import embed_corpus
from trainer.model import build_model
from trainer.ranking import click_relevance
from trainer.task import log_graph_nodes
from trainer.tokenizer import QueryTokenizer

# --------------------------------------------------------------------------- the pixel-kNN baseline

# Unit vectors in a plane, one image per angle (degrees): the cosine of two images is cos(angle difference).
ANGLES = [0, 90, 10, 20, 30, 40, 50, 60, 70, 80, -10, -20, -30, -40]
IDS = [f"deg{a:+04d}" for a in ANGLES]
VECTORS = np.array([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in ANGLES], np.float32)
ROW_OF = {image_id: row for row, image_id in enumerate(IDS)}
QUERIES = ["warm", "cool", "never clicked"]
CLICKS = {
    # 3 x (1, 0) + 1 x (0, 1) = (3, 1): a profile at atan(1/3) = 18.43 degrees.  An image outside the
    # candidate vectors adds nothing.
    "warm": {"deg+000": 3.0, "deg+090": 1.0, "not-in-the-corpus": 5.0},
    "cool": {"deg-040": 2.0},
}


def ndcg(hit_ranks, num_relevant):
    """Binary-gain NDCG@10 by hand: hits at these 1-based ranks, `num_relevant` relevant images."""
    ideal = sum(1 / math.log2(r + 1) for r in range(1, min(num_relevant, 10) + 1))
    return sum(1 / math.log2(r + 1) for r in hit_ranks) / ideal


def test_click_profiles_are_click_weighted_sums_of_the_clicked_images_vectors():
    profiles = cold_start.click_profiles(QUERIES, CLICKS, ROW_OF, VECTORS)
    assert profiles.dtype == np.float32 and profiles.shape == (3, 2)
    # Not renormalised: the scale of a query's profile does not change its ranking.
    np.testing.assert_allclose(profiles[0], [3.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(profiles[1], 2.0 * VECTORS[ROW_OF["deg-040"]], atol=1e-6)
    # A query without clicks gets the zero vector: every candidate scores 0 and, ties going to the lower
    # index, its "ranking" is the candidate order.
    np.testing.assert_array_equal(profiles[2], [0.0, 0.0])
    assert cold_start.rank_subset(VECTORS, profiles[2:], np.arange(len(IDS)), IDS) == [IDS[:10]]


def test_pixel_knn_ranks_by_cosine_to_the_profile_and_scores_recall_and_ndcg():
    profiles = cold_start.click_profiles(QUERIES, CLICKS, ROW_OF, VECTORS)
    rankings = cold_start.rank_subset(VECTORS, profiles[:2], np.arange(len(IDS)), IDS)
    # warm: by angular distance from 18.43 degrees; the weight-1 click at 90 degrees is 14th of 14.
    assert rankings[0] == ["deg+020", "deg+010", "deg+030", "deg+000", "deg+040", "deg-010", "deg+050", "deg-020",
                           "deg+060", "deg-030"]
    assert rankings[1] == ["deg-040", "deg-030", "deg-020", "deg-010", "deg+000", "deg+010", "deg+020", "deg+030",
                           "deg+040", "deg+050"]
    relevant = [{"deg+090": 1.0, "deg+020": 1.0, "deg-030": 1.0, "deg+070": 1.0},  # hits at ranks 1 and 10
                {"deg-040": 1.0, "deg+090": 1.0}]  # a hit at rank 1
    metrics = cold_start._metrics(rankings, relevant)
    assert set(metrics) == {"recall@10", "ndcg@10"}
    assert metrics["recall@10"] == pytest.approx((2 / 4 + 1 / 2) / 2)
    assert metrics["ndcg@10"] == pytest.approx((ndcg([1, 10], 4) + ndcg([1], 2)) / 2)


def test_each_candidate_set_is_ranked_on_its_own():
    """Only the subset's rows compete (the 'cold' set: images that were never in the logs)."""
    profiles = cold_start.click_profiles(["warm"], CLICKS, ROW_OF, VECTORS)
    rows = np.array([ROW_OF[i] for i in ("deg+090", "deg+070", "deg-030", "deg+030", "deg+020")])
    ranking = cold_start.rank_subset(VECTORS, profiles, rows, IDS)
    assert ranking == [["deg+020", "deg+030", "deg-030", "deg+070", "deg+090"]]
    relevant = {"deg+090": 1.0, "deg+020": 1.0, "deg-030": 1.0, "deg+070": 1.0}
    metrics = cold_start._metrics(ranking, [relevant])
    assert metrics == pytest.approx({"recall@10": 1.0, "ndcg@10": ndcg([1, 3, 4, 5], 4)})


# --------------------------------------------------------------------------- ratios and the table

def figures(recall, ndcg_value):
    return {"recall@10": recall, "ndcg@10": ndcg_value}


def cell(num_queries, trained, pixel_knn, random):
    out = {"num_queries": num_queries, "trained": trained, "pixel_knn": pixel_knn, "random": random}
    out.update(cold_start.ratios(out))
    return out


def test_every_trained_figure_is_a_ratio_to_each_baseline():
    ratios = cold_start.ratios({"trained": figures(0.5, 0.4), "pixel_knn": figures(0.25, 0.5),
                                "random": figures(0.1, 0.08)})
    assert ratios == pytest.approx({"recall@10_vs_pixel_knn": 2.0, "recall@10_vs_random": 5.0,
                                    "ndcg@10_vs_pixel_knn": 0.8, "ndcg@10_vs_random": 5.0})
    # An undefined baseline (eval-split queries have no training clicks) or one that scored 0: no ratio.
    ratios = cold_start.ratios({"trained": figures(0.5, 0.4), "pixel_knn": None, "random": figures(0.0, 0.0)})
    assert ratios == {"recall@10_vs_pixel_knn": None, "recall@10_vs_random": None,
                      "ndcg@10_vs_pixel_knn": None, "ndcg@10_vs_random": None}


SECTION = {
    "relevance": "ground_truth", "k": 10, "num_images": {"all": 14, "logged": 9, "cold": 5},
    "train_queries": {
        "num_queries": 2,
        "all": cell(2, figures(0.5, 0.4), figures(0.25, 0.5), figures(0.1, 0.08)),
        "logged": cell(2, figures(0.0, 0.0), figures(0.5, 0.25), figures(0.2, 0.1)),
        "cold": cell(1, figures(0.6, 0.3), figures(0.3, 0.2), figures(0.0, 0.0)),
    },
    "eval_queries": {
        "num_queries": 1,
        "all": cell(1, figures(0.3, 0.2), None, figures(0.15, 0.1)),
        "logged": cell(1, figures(0.4, 0.3), None, figures(0.2, 0.1)),
        "cold": {"num_queries": 0},
    },
}


def parse_table(text):
    """{(group line, row label): [all, logged, cold]} of format_table's text (columns split by 2+ spaces)."""
    lines = text.splitlines()
    header = re.split(r"\s{2,}", lines[1].strip())
    rows, group = {"header": header}, None
    for line in lines[2:]:
        columns = re.split(r"\s{2,}", line.strip())
        if not line.startswith("  "):
            group = columns[0]
            continue
        rows[(group, columns[0])] = columns[1:]
    return rows


def test_format_table_prints_every_set_group_baseline_and_ratio():
    table = parse_table(cold_start.format_table(SECTION))
    assert table.pop("header") == ["all (14 images)", "logged (9 images)", "cold (5 images)"]
    train, held_out = "train queries (2)", "eval queries (1)"
    assert table == {
        (train, "trained"): ["0.500 / 0.400", "0.000 / 0.000", "0.600 / 0.300"],
        (train, "pixel-kNN over clicks"): ["0.250 / 0.500", "0.500 / 0.250", "0.300 / 0.200"],
        (train, "random"): ["0.100 / 0.080", "0.200 / 0.100", "0.000 / 0.000"],
        # recall@10 ratio / NDCG@10 ratio, as the figures above are recall@10 / NDCG@10.
        (train, "trained / pixel-kNN over clicks"): ["2.00x / 0.80x", "0.00x / 0.00x", "2.00x / 1.50x"],
        (train, "trained / random"): ["5.00x / 5.00x", "0.00x / 0.00x", "n/a"],
        (held_out, "trained"): ["0.300 / 0.200", "0.400 / 0.300", "n/a"],
        (held_out, "pixel-kNN over clicks"): ["n/a", "n/a", "n/a"],
        (held_out, "random"): ["0.150 / 0.100", "0.200 / 0.100", "n/a"],
        (held_out, "trained / pixel-kNN over clicks"): ["n/a", "n/a", "n/a"],
        (held_out, "trained / random"): ["2.00x / 2.00x", "2.00x / 3.00x", "n/a"],
    }


def test_format_table_of_a_skipped_section():
    assert cold_start.format_table({"skipped": "no logged images"}) == "cold start: skipped (no logged images)"


# --------------------------------------------------------------------------- evaluate, end to end, untrained

@pytest.fixture(scope="module")
def untrained_section(tmp_path_factory):
    """cold_start.evaluate over the synthetic workdir (24 images, 3 never logged) with a freshly initialised,
    seeded model: the real path (TFRecords, pixel vectors, ground truth), no training."""
    config = synth.trainer_config()
    workdir = synth.write_workdir(str(tmp_path_factory.mktemp("cold_start")), config)
    tokenizer = QueryTokenizer(workdir.vocab, config.model.max_query_tokens)
    tf.keras.utils.set_random_seed(1)
    model = build_model(config, tokenizer.vocab_size)
    corpus = embed_corpus(config, workdir, model.image_tower, log=False)
    return cold_start.evaluate(config, workdir, model, corpus, tokenizer, click_relevance(config, workdir, "eval"))


def test_evaluate_gives_recall_and_ndcg_ratios_in_every_cell(untrained_section):
    section = untrained_section
    assert section["num_images"] == {"all": 24, "logged": 24 - len(synth.COLD), "cold": len(synth.COLD)}
    keys = {"num_queries", "trained", "pixel_knn", "random", "recall@10_vs_pixel_knn", "recall@10_vs_random",
            "ndcg@10_vs_pixel_knn", "ndcg@10_vs_random"}
    for group in cold_start.GROUPS:
        for subset in cold_start.SUBSETS:
            values = section[group][subset]
            assert set(values) == keys, (group, subset)
            for metric in cold_start.REPORTED:
                for base in cold_start.BASELINES:
                    ratio = values[f"{metric}_vs_{base}"]
                    if group == "eval_queries" and base == "pixel_knn":
                        assert values[base] is None and ratio is None
                    else:
                        assert ratio == pytest.approx(values["trained"][metric] / values[base][metric])
    # Each never-logged image has a clicked twin of the same colour and shape (a shade darker or lighter):
    # pixel-kNN over the clicks ranks the one relevant cold image first for each of the 3 queries that have one.
    cold = section["train_queries"]["cold"]
    assert cold["num_queries"] == len(synth.COLD)
    assert cold["pixel_knn"] == pytest.approx({"recall@10": 1.0, "ndcg@10": 1.0})
    table = parse_table(cold_start.format_table(section))
    ratio_row = table[("train queries (12)", "trained / pixel-kNN over clicks")]
    assert ratio_row[2] == f"{cold['recall@10_vs_pixel_knn']:.2f}x / {cold['ndcg@10_vs_pixel_knn']:.2f}x"


# --------------------------------------------------------------------------- trainer/task.py: log_graph_nodes

GRAPH_ON = ["pipeline.max_neighbors=3", "training.graph_multiplier=0.1"]


def write_report(tmp_path, report):
    workdir = Workdir(str(tmp_path))
    tf.io.gfile.makedirs(workdir.examples)
    with open(workdir.report, "w", encoding="utf-8") as f:
        json.dump(report, f)
    return workdir


def graph_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "trainer.task" and "graph term" in r.getMessage()]


def test_log_graph_nodes_says_how_many_image_only_nodes_each_batch_holds(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="trainer.task")
    workdir = write_report(tmp_path, {"examples": {"image_only": 50, "train": 1000},
                                      "graph": {"cold_images_reached": 12}})
    log_graph_nodes(load_config(DEFAULT_CONFIG, GRAPH_ON), workdir, 64)
    # 50 of 1,000 train examples, so 50 x 64 / 1000 = 3.2 in a batch of 64.
    assert graph_lines(caplog) == ["graph term: 50 image-only nodes (12 cold images reached) among 1000 train "
                                   "examples: about 3.2 per batch of 64, each once per epoch"]


def test_log_graph_nodes_without_the_graph_section_or_a_report(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="trainer.task")
    config = load_config(DEFAULT_CONFIG, GRAPH_ON)
    log_graph_nodes(config, Workdir(str(tmp_path / "no_report")), 128)
    assert graph_lines(caplog) == []  # no report.json: nothing to say
    workdir = write_report(tmp_path, {"examples": {"image_only": 406, "train": 24762}})
    log_graph_nodes(config, workdir, 128)
    assert graph_lines(caplog) == ["graph term: 406 image-only nodes (? cold images reached) among 24762 train "
                                   "examples: about 2.1 per batch of 128, each once per epoch"]


@pytest.mark.parametrize("overrides", [["pipeline.max_neighbors=3", "training.graph_multiplier=0"],
                                       ["pipeline.max_neighbors=0", "training.graph_multiplier=0.1"]],
                         ids=["graph_multiplier=0", "max_neighbors=0"])
def test_log_graph_nodes_says_the_graph_term_is_off(tmp_path, caplog, overrides):
    caplog.set_level(logging.INFO, logger="trainer.task")
    workdir = write_report(tmp_path, {"examples": {"image_only": 50, "train": 1000}})
    log_graph_nodes(load_config(DEFAULT_CONFIG, overrides), workdir, 64)
    assert graph_lines(caplog) == ["graph term off: image-only nodes are not used"]
