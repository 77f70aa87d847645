"""The ScaNN index export serves (trainer/scann_index.py) and its auto parameters (trainer/scann_tuning.py).

Tiny corpora and real ScaNN; no timed assertions (speeds are only checked to be reported).
"""

import dataclasses
import json
import logging

import numpy as np
import pytest

from tests.conftest import run_python
from clicklens import compat  # noqa: F401
import tensorflow as tf

from clicklens import servables
from clicklens.config import ConfigError, ScannConfig, config_from_dict
from clicklens.errors import ClicklensError
from trainer import export, export_signatures as sigs, ranking, scann_index, scann_tuning
from trainer.corpus import Corpus
from trainer.scann_index import ScannParams


CENTERS = np.random.default_rng(123).normal(size=(20, 16))


def clustered(rng, n, dim=16):
    """Unit vectors around 20 fixed centres: every corpus and query set of these tests shares them."""
    centers = CENTERS[:, :dim]
    x = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def ids_for(n, prefix="img"):
    return np.array([f"{prefix}{i}".encode() for i in range(n)])


def exact_ids(corpus, ids, queries, k):
    return ids[ranking.exact_top_k(corpus, queries, k)]


def search_ids(index, queries):
    return index(tf.constant(queries))[1].numpy()


# ---------------------------------------------------------------------------
# Config: null = auto, explicit values validated with the key named.


def test_scann_keys_default_to_auto_and_explicit_ones_are_validated():
    config = config_from_dict({})
    assert config.export.min_recall == 0.95
    assert dataclasses.asdict(config.export.scann) == {
        "num_leaves": None, "num_leaves_to_search": None, "quantization": "auto",
        "dimensions_per_block": None, "num_reordering_candidates": None}
    pinned = config_from_dict({}, overrides=["export.scann.num_leaves=300", "export.scann.num_leaves=null"])
    assert pinned.export.scann.num_leaves is None
    bad = [({"scann": {"num_leaves": 10, "num_leaves_to_search": 20}}, "export.scann.num_leaves_to_search"),
           ({"scann": {"quantization": "none", "num_reordering_candidates": 100}},
            "export.scann.num_reordering_candidates"),
           ({"scann": {"quantization": "none", "dimensions_per_block": 2}}, "export.scann.dimensions_per_block"),
           ({"k": 50, "scann": {"num_reordering_candidates": 20}}, "export.scann.num_reordering_candidates"),
           ({"scann": {"quantization": "pq"}}, "export.scann.quantization"),
           ({"min_recall": 1.5}, "export.min_recall"),
           ({"scann": {"num_leaves_to_search": 0}}, "export.scann.num_leaves_to_search")]
    for export_section, key in bad:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config_from_dict({"export": export_section}, source="bad.yaml")
    # No re-scoring is an explicit choice, not auto.
    assert config_from_dict({"export": {"scann": {"num_reordering_candidates": 0}}}).export.scann \
        .num_reordering_candidates == 0


# ---------------------------------------------------------------------------
# The layout rule.


def test_auto_layout_grows_with_the_corpus():
    auto = ScannConfig()
    small, keys = scann_tuning.choose_layout(300, 16, 10, auto)
    assert small.is_exact and set(keys) == {f.name for f in dataclasses.fields(ScannConfig)}
    assert scann_tuning.choose_layout(19_999, 64, 10, auto)[0].is_exact
    for n, leaves in [(20_000, 141), (1_000_000, 1000), (10_000_000, 3162)]:
        layout, _ = scann_tuning.choose_layout(n, 64, 10, auto)
        assert (layout.num_leaves, layout.quantization, layout.dimensions_per_block) == (leaves, "ah", 2)
    # At least 2k images per leaf on average: k=100 over 20,000 images gives 100 leaves, not 141.
    assert scann_tuning.choose_layout(20_000, 64, 100, auto)[0].num_leaves == 100
    leaves, reorders = scann_tuning.search_depths(scann_tuning.choose_layout(1_000_000, 64, 10, auto)[0], auto, 10)
    assert leaves[:8] == [1, 2, 3, 4, 6, 9, 14, 21] and leaves[-1] == 1000
    assert reorders == [40, 80, 160, 320]


def test_pinned_keys_are_used_as_given():
    pinned = ScannConfig(num_leaves=10, num_leaves_to_search=5)
    layout, keys = scann_tuning.choose_layout(300, 16, 10, pinned)
    assert (layout.num_leaves, layout.quantization) == (10, "none")  # small corpus: exact scores in the leaves
    assert scann_tuning.search_depths(layout, pinned, 10) == ([5], [0])
    assert "num_leaves" not in keys and "num_leaves_to_search" not in keys
    # Pinning a re-scoring depth (or a block size) means AH, whatever the size.
    layout, _ = scann_tuning.choose_layout(300, 16, 10, ScannConfig(num_reordering_candidates=50))
    assert (layout.num_leaves, layout.quantization, layout.dimensions_per_block) == (1, "ah", 2)


def test_impossible_pins_name_the_key():
    with pytest.raises(ClicklensError, match=r"export\.scann\.num_leaves=400 exceeds the corpus size \(300"):
        scann_tuning.choose_layout(300, 16, 10, ScannConfig(num_leaves=400))
    with pytest.raises(ClicklensError, match=r"export\.scann\.num_leaves_to_search=5 exceeds the 1 leaves"):
        scann_tuning.choose_layout(300, 16, 10, ScannConfig(num_leaves_to_search=5))
    with pytest.raises(ClicklensError, match=r"export\.scann\.dimensions_per_block=32 exceeds"):
        scann_tuning.choose_layout(300, 16, 10, ScannConfig(quantization="ah", dimensions_per_block=32))


# ---------------------------------------------------------------------------
# The tuning pass.


def test_tuning_keeps_a_setting_meeting_min_recall_and_reports_every_try():
    rng = np.random.default_rng(0)
    corpus = clustered(rng, 4000)
    queries, derived = scann_tuning.tuning_queries(np.zeros((0, 16), np.float32), corpus)
    assert derived == len(queries) == scann_tuning.MIN_TUNING_QUERIES
    config = ScannConfig(num_leaves=40, quantization="ah")  # a tree over a small corpus: real tuning, fast
    tuning = scann_tuning.tune(corpus, 10, queries, config, min_recall=0.9)
    try:
        assert tuning.met and tuning.chosen.meets(0.9)
        assert tuning.params.num_leaves == 40 and tuning.params.quantization == "ah"
        passing = [t.params for t in tuning.trials if t.meets(0.9)]
        assert tuning.params in passing
        # Per re-scoring depth, the leaves searched grow until min_recall: the setting before the one that met
        # it did not.
        tried = [(t.params.num_reordering_candidates, t.params.num_leaves_to_search) for t in tuning.trials]
        assert len(tried) == len(set(tried)) > 1
        report = json.loads(json.dumps(tuning.report()))
        assert report["params"] == tuning.params.as_dict() and report["met_min_recall"] is True
        assert set(report["auto_keys"]) == {"num_leaves_to_search", "dimensions_per_block",
                                            "num_reordering_candidates"}
        assert len(report["tried"]) == len(tuning.trials)
        for row in report["tried"]:
            assert 0.0 <= row["recall"] <= 1.0 and row["queries_per_second"] > 0 and row["queries_per_cpu_second"] > 0
        # What the index serves is what tuning measured.
        index = scann_index.ScannIndex.from_searcher(tuning.searcher, ids_for(4000), 10, tuning.params)
        recall = scann_tuning.recall_at_k(search_ids(index, queries), exact_ids(corpus, ids_for(4000), queries, 10))
        assert recall == pytest.approx(tuning.chosen.recall, abs=1e-6)
    finally:
        scann_index.release(tuning.searcher)


def test_fully_pinned_parameters_are_measured_not_changed():
    rng = np.random.default_rng(1)
    corpus = clustered(rng, 3000)
    config = ScannConfig(num_leaves=30, num_leaves_to_search=2, quantization="ah", dimensions_per_block=4,
                         num_reordering_candidates=20)
    queries, _ = scann_tuning.tuning_queries(clustered(rng, 50), corpus)
    tuning = scann_tuning.tune(corpus, 10, queries, config, min_recall=0.95)
    scann_index.release(tuning.searcher)
    assert tuning.params == ScannParams(30, 2, "ah", 4, 20)
    assert len(tuning.trials) == 1 and tuning.report()["auto_keys"] == []


def test_unreachable_min_recall_keeps_the_most_accurate_and_says_so(caplog):
    rng = np.random.default_rng(2)
    corpus = clustered(rng, 3000)
    queries, _ = scann_tuning.tuning_queries(np.zeros((0, 16), np.float32), corpus)
    config = ScannConfig(num_leaves=30, quantization="ah", num_reordering_candidates=0)  # AH codes only
    with caplog.at_level(logging.WARNING, logger="trainer.scann_tuning"):
        tuning = scann_tuning.tune(corpus, 10, queries, config, min_recall=1.0)
    scann_index.release(tuning.searcher)
    assert not tuning.met and tuning.report()["met_min_recall"] is False
    assert tuning.chosen.recall == max(t.recall for t in tuning.trials)
    assert "NOT MET" in caplog.text


def test_small_corpora_get_exact_brute_force():
    rng = np.random.default_rng(3)
    corpus = clustered(rng, 300)
    index, report = export.scann_retrieval_index(config_from_dict({}), Corpus(ids_for(300), corpus, None),
                                                 clustered(rng, 30))
    assert report["params"]["num_leaves"] == 1 and report["params"]["quantization"] == "none"
    assert report["recall"] == 1.0 and report["corpus_derived_queries"] == scann_tuning.MIN_TUNING_QUERIES - 30
    queries = clustered(rng, 20)
    np.testing.assert_array_equal(search_ids(index, queries), exact_ids(corpus, ids_for(300), queries, 10))


def test_exact_reference_and_corpus_queries():
    rng = np.random.default_rng(4)
    corpus, queries = clustered(rng, 5000), clustered(rng, 7)
    expected = np.argsort(-(queries @ corpus.T), axis=1)[:, :10]
    np.testing.assert_array_equal(ranking.exact_top_k(corpus, queries, 10), expected)
    # Rows added after the first 4,000: only they are scored, with the same top k as a whole pass.
    previous = ranking.exact_top_k(corpus[:4000], queries, 10)
    np.testing.assert_array_equal(ranking.exact_top_k_grown(corpus, queries, 10, previous, 4000), expected)
    assert ranking.exact_top_k_grown(corpus[:4000], queries, 10, previous, 4000) is previous
    derived = scann_tuning.corpus_queries(corpus, 100)
    assert derived.shape == (100, 16) and np.isfinite(derived).all()
    # Near the corpus but not on it: a derived query's best match is not (always) an exact copy of itself.
    assert not np.isclose((derived @ corpus.T).max(axis=1), np.linalg.norm(derived, axis=1)).all()


# ---------------------------------------------------------------------------
# The served index.


def test_two_indexes_in_one_process_each_search_their_own_corpus():
    rng = np.random.default_rng(5)
    params = ScannParams(1, 1, "none")  # exact: the right corpus gives recall 1, another one about 0
    queries = clustered(rng, 5)
    indexes = []
    for name in ("a", "b"):
        corpus = clustered(rng, 2000)
        searcher = scann_index.build_searcher(corpus, 5, params)
        indexes.append((scann_index.ScannIndex.from_searcher(searcher, ids_for(2000, name), 5, params), corpus, name))
        scann_index.release(searcher)
    for index, corpus, name in indexes:
        found = search_ids(index, queries)
        assert all(i.startswith(name.encode()) for i in found.ravel())
        np.testing.assert_array_equal(found, exact_ids(corpus, ids_for(2000, name), queries, 5))


def test_a_short_result_gets_empty_ids_not_another_image():
    rng = np.random.default_rng(6)
    corpus = clustered(rng, 300)
    params = ScannParams(10, 1, "none")  # one of 10 leaves searched: far fewer than the 150 images asked for
    searcher = scann_index.build_searcher(corpus, 150, params)
    index = scann_index.ScannIndex.from_searcher(searcher, ids_for(300), 150, params)
    scann_index.release(searcher)
    scores, ids = (t.numpy() for t in index(tf.constant(clustered(rng, 4))))
    assert ids.shape == scores.shape == (4, 150)
    missing = np.isnan(scores)
    assert missing.any() and (ids[missing] == b"").all() and (ids[~missing] != b"").all()
    assert all(len(set(row[row != b""])) == (row != b"").sum() for row in ids)  # no image twice


def save_scann_retrieval(corpus, path) -> sigs.Retrieval:
    """A ScaNN retrieval module over `corpus` (AH, 30 leaves), saved at `path` with a search-by-embedding
    signature; returns the module."""
    params = ScannParams(30, 5, "ah", 2, 40)
    searcher = scann_index.build_searcher(corpus, 10, params)
    module = sigs.Retrieval(None, scann_index.ScannIndex.from_searcher(searcher, ids_for(len(corpus)), 10, params), 10)
    scann_index.release(searcher)
    spec = tf.TensorSpec([None, corpus.shape[1]], tf.float32, name="embedding")
    signature = tf.function(module.search_embeddings).get_concrete_function(spec)
    tf.saved_model.save(module, str(path), signatures={"serving_default": signature},
                        options=export.SCANN_SAVE_OPTIONS)
    return module


def test_saved_scann_index_serves_the_same_top_k_after_a_fresh_load_with_scann_ops_only(tmp_path):
    rng = np.random.default_rng(7)
    corpus, queries = clustered(rng, 3000), clustered(rng, 6)
    module = save_scann_retrieval(corpus, tmp_path / "m")
    expected = module.search_embeddings(tf.constant(queries))[servables.IMAGE_IDS].numpy()
    code = f"""
import json
from clicklens import compat
import numpy as np, tensorflow as tf
from tensorflow.python.framework import op_def_registry
from serving import saved_models
path = {str(tmp_path / "m")!r}
unregistered = sorted(op for op in saved_models.op_types(path) if op_def_registry.get(op) is None)
function = saved_models.load(path).signatures["serving_default"]
ids = function(embedding=tf.constant(np.array({queries.tolist()}, np.float32)))["image_ids"].numpy()
print("RESULT" + json.dumps({{"ids": [[x.decode() for x in row] for row in ids], "unregistered": unregistered}}))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.split("RESULT", 1)[1])
    assert got["ids"] == [[x.decode() for x in row] for row in expected]
    # Before serving/saved_models.load registers ScaNN's op library, only ScaNN's ops are unknown.
    assert got["unregistered"] == ["Scann>ScannSearchBatched", "Scann>TensorsToScann"]


def test_a_retired_scann_version_frees_its_searcher(tmp_path):
    import gc
    import shutil

    from clicklens import models_config
    from serving import saved_models
    from serving.model_registry import ModelRegistry

    rng = np.random.default_rng(8)
    corpus, queries = clustered(rng, 3000), clustered(rng, 3)
    base = tmp_path / "retrieval_scann"
    module = save_scann_retrieval(corpus, base / "1")
    config = tmp_path / "models.config"
    models_config.write(str(config), models_config.build({"retrieval_scann": str(base)}))
    registry = ModelRegistry(models_config.read(str(config)), max_batch=8)
    registry.poll()
    (old_handle,) = saved_models.searcher_handles(registry.get("retrieval_scann").model)
    shutil.copytree(base / "1", base / "2")
    registry.poll()  # version 2 takes over; nothing holds version 1 any more
    gc.collect()
    with pytest.raises(tf.errors.NotFoundError):  # already destroyed by the registry
        tf.raw_ops.DestroyResourceOp(resource=old_handle, ignore_lookup_error=False)
    served = registry.get("retrieval_scann")
    assert served.version == 2
    found = served.model.signatures["serving_default"](embedding=tf.constant(queries))["image_ids"].numpy()
    np.testing.assert_array_equal(found, module.search_embeddings(tf.constant(queries))["image_ids"].numpy())
    (new_handle,) = saved_models.searcher_handles(served.model)
    tf.raw_ops.DestroyResourceOp(resource=new_handle, ignore_lookup_error=False)  # still there: no error


def test_bruteforce_index_blocks_give_the_exact_top_k():
    rng = np.random.default_rng(8)
    corpus, queries = clustered(rng, 1000), clustered(rng, 9)
    expected = exact_ids(corpus, ids_for(1000), queries, 10)
    for block_rows in (1000, 300, 7):  # one block; blocks with a short last one; blocks smaller than k
        index = sigs.BruteForceIndex(corpus, ids_for(1000), 10, block_rows=block_rows)
        scores, ids = (t.numpy() for t in index(tf.constant(queries)))
        np.testing.assert_array_equal(ids, expected)
        np.testing.assert_allclose(scores, np.sort(queries @ corpus.T, axis=1)[:, ::-1][:, :10], rtol=1e-5)


# ---------------------------------------------------------------------------
# Bad input: an error naming the images, or a documented outcome.


def test_bad_corpora_are_refused_with_the_images_named():
    rng = np.random.default_rng(9)
    corpus, ids = clustered(rng, 50), ids_for(50)
    export.check_corpus(ids, corpus)
    cases = [(np.concatenate([ids[:49], ids[:1]]), corpus, "1 duplicate image ids, e.g. 'img0'"),
             (ids, np.where(np.arange(50)[:, None] == 3, np.nan, corpus).astype(np.float32),
              "1 images with non-finite embeddings, e.g. 'img3'"),
             (ids, np.where(np.arange(50)[:, None] == 7, np.inf, corpus).astype(np.float32), "'img7'"),
             (ids, np.where(np.arange(50)[:, None] == 5, 0.0, corpus).astype(np.float32),
              "1 images with all-zero embeddings, e.g. 'img5'"),
             (ids[:0], corpus[:0], "N >= 1")]
    for bad_ids, bad_corpus, words in cases:
        with pytest.raises(ClicklensError, match=words.replace("(", r"\(")):
            export.check_corpus(bad_ids, bad_corpus)


def test_a_one_image_corpus_exports_k_1(caplog):
    corpus = np.array([[0.6, 0.8]], np.float32)
    with caplog.at_level(logging.WARNING):
        index, report = export.scann_retrieval_index(config_from_dict({}), Corpus(ids_for(1), corpus, None),
                                                     np.zeros((0, 2), np.float32))
    assert "exporting k=1" in caplog.text
    assert report["params"]["num_leaves"] == 1 and report["recall"] == 1.0
    scores, ids = (t.numpy() for t in index(tf.constant([[1.0, 0.0], [0.0, -1.0]])))
    assert ids.tolist() == [[b"img0"], [b"img0"]]
    np.testing.assert_allclose(scores, [[0.6], [-0.8]], rtol=1e-6)


def test_a_corpus_smaller_than_the_pinned_leaf_count_is_an_error():
    corpus = clustered(np.random.default_rng(10), 50)
    config = config_from_dict({"export": {"scann": {"num_leaves": 100}}})
    with pytest.raises(ClicklensError, match=r"export\.scann\.num_leaves=100 exceeds the corpus size \(50 images\)"):
        export.scann_retrieval_index(config, Corpus(ids_for(50), corpus, None), np.zeros((0, 16), np.float32))


def test_duplicate_ids_in_the_corpus_files_keep_the_first_image(tmp_path, caplog):
    """The documented outcome of trainer.corpus.embed_corpus: one image per id, the first in file order."""
    from clicklens import features
    from clicklens.workdir import Workdir
    from trainer.corpus import embed_corpus

    config = config_from_dict({"pipeline": {"image_source": "features", "feature_dim": 3},
                               "model": {"image_tower": "features"}})
    workdir = Workdir(str(tmp_path))
    tf.io.gfile.makedirs(workdir.examples)
    spec = features.corpus_feature_spec("features", 3)
    rows = [("a", [1, 0, 0]), ("b", [0, 1, 0]), ("a", [0, 0, 1]), ("c", [1, 1, 0])]
    with tf.io.TFRecordWriter(workdir.split_glob("corpus").replace("*", "00000-of-00001"), "GZIP") as writer:
        for image_id, vector in rows:
            writer.write(features.make_example({features.IMAGE_ID: image_id, features.image_key("features"): vector},
                                               spec).SerializeToString())
    with caplog.at_level(logging.WARNING):
        corpus = embed_corpus(config, workdir, lambda x, training: x)
    assert "1 duplicate image ids; keeping the first of each" in caplog.text
    assert corpus.ids.tolist() == [b"a", b"b", b"c"]
    np.testing.assert_array_equal(corpus.embeddings, [[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    export.check_corpus(corpus.ids, corpus.embeddings)
