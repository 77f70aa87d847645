"""trainer/scann_update.py: a saved ScaNN index changed in place of a rebuild (`clicklens reindex`).

A real tree + AH index over clustered vectors, saved as a retrieval model's checkpoint lays it out,
read back, updated with scann's own upsert / delete, and searched through `ScannIndex` as a served
model searches it.
"""

import dataclasses

import numpy as np
import pytest

from clicklens import compat  # noqa: F401  (before TensorFlow)
import tensorflow as tf

from tests.conftest import DEMO_CONFIG
from trainer import ranking, scann_index, scann_update
from trainer.scann_index import ScannIndex, ScannParams

DIM, K = 16, 5
PARAMS = ScannParams(num_leaves=20, num_leaves_to_search=20, quantization="ah", dimensions_per_block=2,
                     num_reordering_candidates=200)


def unit_rows(rng, count: int, centres: np.ndarray) -> np.ndarray:
    rows = centres[rng.integers(0, len(centres), count)] + 0.3 * rng.normal(size=(count, DIM))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def ids_of(names) -> np.ndarray:
    return np.array([n.encode() for n in names], dtype=object)


@pytest.fixture(scope="module")
def export_config():
    from clicklens.config import load_config

    return load_config(DEMO_CONFIG, ["export.scann.num_leaves=20", "export.scann.quantization=ah",
                                     "export.scann.dimensions_per_block=2"]).export


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(SavedIndex, ids, rows, centres) of a 2,000-point index saved under a retrieval model's names."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, DIM))
    rows = unit_rows(rng, 2000, centres)
    ids = ids_of(f"img_{i}" for i in range(len(rows)))
    searcher = scann_index.build_searcher(rows, K, PARAMS)
    try:
        index = ScannIndex.from_searcher(searcher, ids, K, PARAMS)
    finally:
        scann_index.release(searcher)
    folder = tmp_path_factory.mktemp("retrieval_scann") / "1"
    tf.train.Checkpoint(top_k=index).write(str(folder / "variables" / "variables"))
    return scann_update.read_saved_index(str(folder)), ids, rows, centres


def top_ids(tensors, ids, queries) -> np.ndarray:
    index = ScannIndex.from_tensors(tensors, ids, K, PARAMS)
    _, found = index(tf.constant(queries))
    return found.numpy()


def test_an_update_holds_exactly_the_new_rows_and_finds_each_new_one(saved, export_config):
    saved_index, ids, rows, centres = saved
    np.testing.assert_array_equal(saved_index.ids, ids)
    rng = np.random.default_rng(1)
    removed, changed = list(range(0, 60)), list(range(60, 80))
    new_rows = rows.copy()
    new_rows[changed] = unit_rows(rng, len(changed), centres)
    added = unit_rows(rng, 100, centres)
    keep = [i for i in range(len(rows)) if i not in removed]
    corpus_ids = np.concatenate([ids[keep], ids_of(f"new_{i}" for i in range(len(added)))])
    corpus_rows = np.concatenate([new_rows[keep], added])

    update = scann_update.update_index(saved_index, ids, rows, corpus_ids, corpus_rows, K, corpus_rows[:300],
                                       PARAMS, export_config, rows_since_build=7)

    assert update.why == ""
    assert update.counts == {"added": 100, "removed": 60, "changed": 20}
    assert update.rows_since_build == 7 + 180
    assert sorted(update.ids.tolist()) == sorted(corpus_ids.tolist())
    # Each point's vector is the corpus row of its id (the changed ones too), so re-scoring is exact.
    row_of = dict(zip(corpus_ids.tolist(), corpus_rows))
    position = {image_id: i for i, image_id in enumerate(update.ids.tolist())}
    for image_id in corpus_ids.tolist()[::37] + [ids[60], ids[79], b"new_0", b"new_99"]:
        np.testing.assert_array_equal(update.index_tensors["dataset"][position[image_id]], row_of[image_id])
    assert len(update.index_tensors["datapoint_to_token"]) == len(update.index_tensors["hashed_dataset"]) \
        == len(corpus_ids)
    # Served: every added and changed image is its own nearest neighbour; no removed id comes back.
    probes = np.concatenate([added, new_rows[changed]])
    found = top_ids(update.index_tensors, update.ids, probes)
    assert [row[0] for row in found] == [f"new_{i}".encode() for i in range(100)] + list(ids[changed])
    removed_ids = set(ids[removed].tolist())
    assert not removed_ids & set(found.ravel().tolist())
    assert update.trial.meets(export_config.min_recall)
    report = update.report(export_config.min_recall, 300)
    assert report["updated"] == update.counts and report["params"] == PARAMS.as_dict()


def test_no_update_when_a_rebuild_is_due(saved, export_config):
    saved_index, ids, rows, centres = saved
    rng = np.random.default_rng(2)
    grown_ids = np.concatenate([ids, ids_of(f"new_{i}" for i in range(300))])
    grown_rows = np.concatenate([rows, unit_rows(rng, 300, centres)])

    def update(corpus_ids, corpus_rows, config=export_config, params=PARAMS, since=0):
        return scann_update.update_index(saved_index, ids, rows, corpus_ids, corpus_rows, K, corpus_rows[:200],
                                         params, config, since)

    assert update(grown_ids, grown_rows).why == ""
    # More than a fifth of the index changed since its build, counting earlier updates.
    assert "more than 20%" in update(grown_ids, grown_rows, since=200).why
    # Auto leaves: 2,300 images call for an exact index, not this tree.
    auto = dataclasses.replace(export_config, scann=dataclasses.replace(
        export_config.scann, num_leaves=None, quantization="auto", dimensions_per_block=None))
    assert "a rebuild would use brute force" in update(grown_ids, grown_rows, config=auto).why
    # A pinned depth other than the index's.
    pinned = dataclasses.replace(export_config, scann=dataclasses.replace(export_config.scann,
                                                                          num_leaves_to_search=3))
    assert "num_leaves_to_search is 3" in update(grown_ids, grown_rows, config=pinned).why
    # The kept depth misses min_recall on the updated index.
    shallow = dataclasses.replace(PARAMS, num_leaves_to_search=1, num_reordering_candidates=K)
    strict = dataclasses.replace(export_config, min_recall=0.999)
    assert "short of export.min_recall" in update(grown_ids, grown_rows, config=strict, params=shallow).why
    # Only partitioned AH indexes are updated.
    exact = ScannParams(num_leaves=1, num_leaves_to_search=1, quantization="none")
    assert "only a partitioned AH index" in update(grown_ids, grown_rows, params=exact).why


def test_a_kept_depth_short_of_min_recall_searches_deeper_instead_of_rebuilding(saved, export_config):
    saved_index, ids, rows, centres = saved
    rng = np.random.default_rng(2)
    grown_ids = np.concatenate([ids, ids_of(f"new_{i}" for i in range(300))])
    grown_rows = np.concatenate([rows, unit_rows(rng, 300, centres)])
    queries = unit_rows(np.random.default_rng(3), 200, centres)  # not corpus points: their neighbours span leaves
    one_leaf = dataclasses.replace(PARAMS, num_leaves_to_search=1, num_reordering_candidates=50)

    def update(min_recall):
        return scann_update.update_index(saved_index, ids, rows, grown_ids, grown_rows, K, queries, one_leaf,
                                         dataclasses.replace(export_config, min_recall=min_recall), 0)

    # Unreachable: the kept depth and the three deeper steps are all tried, then a rebuild is asked for.
    unreachable = update(1.01)
    assert "and 3 deeper ones" in unreachable.why
    assert [t.params.num_leaves_to_search for t in unreachable.trials] == [1, 2, 3, 4]
    # A min_recall between what one leaf and what the best deeper step reach (2 standard errors off each).
    bounds = [t.recall - 2 * t.recall_standard_error for t in unreachable.trials]
    assert max(bounds[1:]) > bounds[0], f"one leaf already as good as more: {bounds}"
    min_recall = (bounds[0] + max(bounds[1:])) / 2
    deepened = update(min_recall)
    assert deepened.why == ""
    depths = [t.params.num_leaves_to_search for t in deepened.trials]
    assert depths[0] == 1 and depths[-1] > 1
    assert all(not t.meets(min_recall) for t in deepened.trials[:-1]) and deepened.trial.meets(min_recall)
    assert deepened.params == dataclasses.replace(one_leaf, num_leaves_to_search=depths[-1])
    report = deepened.report(min_recall, len(queries))
    assert report["params"]["num_leaves_to_search"] == depths[-1] and len(report["tried"]) == len(depths)


def test_a_watch_updates_the_index_it_kept_as_it_would_the_one_read_back(saved, export_config, monkeypatch):
    saved_index, ids, rows, centres = saved
    rng = np.random.default_rng(4)
    first_ids = np.concatenate([ids, ids_of(f"a_{i}" for i in range(50))])
    first_rows = np.concatenate([rows, unit_rows(rng, 50, centres)])
    queries = first_rows[:200]
    first = scann_update.update_index(saved_index, ids, rows, first_ids, first_rows, K, queries, PARAMS,
                                      export_config, 0)
    second_ids = np.concatenate([first_ids, ids_of(f"b_{i}" for i in range(50))])
    second_rows = np.concatenate([first_rows, unit_rows(rng, 50, centres)])

    read_back = scann_update.update_index(scann_update.SavedIndex(first.index_tensors, first.ids), first_ids,
                                          first_rows, second_ids, second_rows, K, queries, PARAMS, export_config, 50)
    scored = []
    real = ranking.exact_top_k
    for module in (ranking, scann_update):
        monkeypatch.setattr(module, "exact_top_k", lambda rows_, *a: scored.append(len(rows_)) or real(rows_, *a))
    monkeypatch.setattr(scann_update, "load_pybind", lambda *a: pytest.fail("the kept searcher was read back"))
    kept = scann_update.update_index(first.saved, first_ids, first_rows, second_ids, second_rows, K, queries, PARAMS,
                                     export_config, 50)
    assert scored == [50]  # only the rows added since the kept check
    np.testing.assert_array_equal(kept.ids, read_back.ids)
    for field in ("dataset", "hashed_dataset", "datapoint_to_token"):
        np.testing.assert_array_equal(kept.index_tensors[field], read_back.index_tensors[field])
    assert kept.trial.recall == read_back.trial.recall
    np.testing.assert_array_equal(kept.saved.exact.top, read_back.saved.exact.top)
