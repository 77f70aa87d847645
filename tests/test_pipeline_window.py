"""The daily loop's pipeline side (issue 17): a window of dated logs (pipeline.as_of, window_days), time decay
(half_life_days) and stable vocabulary ids (base_vocab, vocab_capacity).

Pure functions first; then one tiny hand-made world (55 records over dated partitions and a flat
file) run three times, in-process: a window, the same window with decay and a base vocabulary, and a
window no record falls in.
"""

import argparse
import datetime
import glob
import gzip
import io
import json
import math
import os

import pytest

from beam_pipelines import pipeline, vocab, window
from beam_pipelines.click_stats import PositionQueryStatsFn, QueryStatsFn, query_event, slot_event
from clicklens.config import config_from_dict
from clicklens.errors import ClicklensError
from clicklens.log_schema import Impression, LogRecord
from clicklens.workdir import Workdir
from tests.pipeline_digest import tfrecords

AS_OF = "2024-03-10"
DAY = datetime.date(2024, 3, 10)


def at(day: str, hour: float) -> float:
    """Seconds since the epoch of `hour` o'clock UTC on `day`."""
    return window.day_start(datetime.date.fromisoformat(day)) + hour * 3600


# --------------------------------------------------------------------------- the window, pure


def test_window_days_and_times():
    w = window.LogWindow(AS_OF, 5)
    assert w.first_day == datetime.date(2024, 3, 6) and w.last_day == DAY
    assert w.contains_time(at("2024-03-06", 0)) and w.contains_time(at("2024-03-10", 23.999))
    assert not w.contains_time(at("2024-03-05", 23.999)) and not w.contains_time(at("2024-03-11", 0))
    unbounded = window.LogWindow(AS_OF)
    assert unbounded.first_day is None and unbounded.contains_time(0.0)
    assert not unbounded.contains_time(at("2024-03-11", 1))
    assert w.describe() == "pipeline.as_of=2024-03-10, pipeline.window_days=5 (2024-03-06 .. 2024-03-10)"
    assert window.utc_day(at("2024-03-06", 23.5)) == datetime.date(2024, 3, 6)
    assert window.utc_day(-1.0) == datetime.date(1969, 12, 31)


def test_files_are_skipped_by_their_dt_folder_only():
    w = window.LogWindow(AS_OF, 5)
    assert window.partition_day("gs://b/logs/dt=2024-03-02/part-0.jsonl.gz") == datetime.date(2024, 3, 2)
    assert window.partition_day("/w/logs/dt=2024-01-01/x/dt=2024-03-07/p.jsonl") == datetime.date(2024, 3, 7)
    assert window.partition_day("/w/logs/dt=2024-03-02.jsonl.gz") is None  # a file name, not a folder
    assert window.partition_day("/w/logs/dt=2024-13-40/p.jsonl") is None    # not a day: read, records dated
    paths = ["/l/dt=2024-03-05/a.gz", "/l/dt=2024-03-06/a.gz", "/l/dt=2024-03-10/a.gz", "/l/dt=2024-03-11/a.gz",
             "/l/flat.jsonl.gz"]
    assert window.split_files(w, paths) == (paths[1:3] + paths[4:], [paths[0], paths[3]])
    assert window.split_files(window.LogWindow(AS_OF), paths) == (paths[:3] + paths[4:], [paths[3]])
    assert window.split_files(window.LogWindow(), paths) == (paths, [])  # no as_of: every file is read


def test_decay_weight_halves_every_half_life_of_whole_days_before_as_of():
    w = window.LogWindow(AS_OF, 0, 2.0)
    assert w.weight(at(AS_OF, 0)) == w.weight(at(AS_OF, 23.5)) == 1.0  # as_of itself: a click counts 1
    assert w.weight(at("2024-03-08", 12)) == pytest.approx(0.5)
    assert w.weight(at("2024-03-06", 0)) == pytest.approx(0.5 ** 2)
    no_decay = window.LogWindow(AS_OF, 7).weight(at("2024-03-06", 0))
    assert no_decay == 1 and isinstance(no_decay, int)


def _text(time, shown, clicked):
    return LogRecord("s", time, tuple(Impression(i, k + 1, i in clicked) for k, i in enumerate(shown)), query="q")


def test_click_stats_weigh_impressions_and_clicks_by_the_decay():
    decay = window.LogWindow(AS_OF, 0, 1.0)
    records = [_text(at("2024-03-09", 12), ["a", "b"], {"a"}),  # a day before as_of: weight 0.5
               _text(at("2024-03-08", 12), ["b", "a"], {"b"})]  # two days before: 0.25
    fn = QueryStatsFn()
    stats = fn.extract_output(fn.merge_accumulators(
        [fn.add_input(fn.create_accumulator(), e) for r in records for _, e in query_event(r, decay)]))
    assert stats.events == 2
    assert stats.images["a"][:3] == pytest.approx((0.75, 0.5, 0.5 * 1 + 0.25 * 2))
    assert stats.images["b"][:3] == pytest.approx((0.75, 0.25, 0.5 * 2 + 0.25 * 1))
    slots = PositionQueryStatsFn()
    acc = slots.create_accumulator()
    for r in records:
        for _, e in slot_event(r, 0.0, "none", decay):
            acc = slots.add_input(acc, e)
    by_slot = slots.extract_output(acc).images["a"]
    assert by_slot[:3] == pytest.approx((0.75, 0.5, 1.0)) and by_slot.by_slot == pytest.approx((1, 0.5, 0.5, 0.5,
                                                                                              2, 0.25, 0, 0))
    # Without decay every figure stays an int (the outputs of a run without as_of are unchanged).
    undecayed = fn.extract_output(fn.add_input(fn.create_accumulator(), next(query_event(records[0]))[1]))
    assert undecayed.images["a"][:3] == (1, 1, 1) and all(type(v) is int for v in undecayed.images["a"][:3])


# --------------------------------------------------------------------------- the vocabulary merge, pure


def test_merge_vocabulary_keeps_base_ids_and_appends_new_tokens_up_to_capacity():
    base = ["[PAD]", "[UNK]", "zebra", "red"]
    learned = ["[PAD]", "[UNK]", "b", "red", "##s", "blue"]
    assert vocab.merge_vocabulary(learned, base, 100) == (base + ["b", "##s", "blue"], 4, 3, 0)
    assert vocab.merge_vocabulary(learned, base, 6) == (base + ["b", "##s"], 4, 2, 1)
    assert vocab.merge_vocabulary(learned, base, 3) == (base, 4, 0, 3)  # a base over capacity is kept whole


# --------------------------------------------------------------------------- a tiny dated world

IMAGES = ["a", "b", "c", "d", "e", "f"]


def _line(query, day, hour, shown, clicked, session):
    return LogRecord(session, at(day, hour), tuple(Impression(i, k + 1, i in clicked) for k, i in enumerate(shown)),
                     query=query).to_json()


def _lines(n, query, day, shown, clicked, tag):
    return [_line(query, day, 12, shown, clicked, f"{tag}{k}") for k in range(n)]


# Window 2024-03-06 .. 2024-03-10 (as_of 2024-03-10, window_days 5).  12 events a query and day: the
# WordPiece learner keeps whole words from about 10 occurrences on.
N = 12
PARTITIONS = {
    # In the window.  "red": a clicked on its first day, b on its last (N clicks each); one record of the
    # partition is dated 2024-03-02, outside the window (every record is kept by its own day).
    "2024-03-06": _lines(N, "red", "2024-03-06", ["a", "b"], {"a"}, "old")
    + [_line("misdated", "2024-03-02", 9, ["e"], {"e"}, "m0")],
    "2024-03-10": _lines(N, "red", "2024-03-10", ["b", "a"], {"b"}, "new")
    + _lines(N, "blue sky", "2024-03-10", ["c", "d"], {"c"}, "sky"),
    # Outside the window: never opened (a valid partition, and one that is not gzip at all).
    "2024-03-02": _lines(3, "stale", "2024-03-02", ["e"], {"e"}, "st"),
}
# A file outside any dt= folder: its records are kept by their day.
FLAT = (_lines(N, "green", "2024-03-08", ["d", "f"], {"d"}, "gr")     # in the window
        + _lines(2, "ancient", "2024-03-03", ["f"], {"f"}, "an")      # before it
        + _lines(2, "future", "2024-03-12", ["f"], {"f"}, "fu"))     # after as_of
IN_WINDOW = 4 * N
BASE_VOCAB = ["[PAD]", "[UNK]", "zebra", "red", "##x"]


def _write_world(root) -> Workdir:
    from PIL import Image

    w = Workdir(str(root))
    os.makedirs(w.images)
    catalog = []
    for k, image_id in enumerate(IMAGES):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (40 * k, 255 - 40 * k, 0)).save(buf, format="PNG")
        (root / "raw" / "images" / f"{image_id}.png").write_bytes(buf.getvalue())
        catalog.append(json.dumps({"image_id": image_id, "uri": f"images/{image_id}.png"}))
    (root / "raw" / "catalog.jsonl").write_text("\n".join(catalog) + "\n")
    for day, lines in PARTITIONS.items():
        folder = os.path.join(w.logs, f"dt={day}")
        os.makedirs(folder)
        with open(os.path.join(folder, "part-0.jsonl.gz"), "wb") as f:
            f.write(gzip.compress(("\n".join(lines) + "\n").encode()))
    corrupt = os.path.join(w.logs, "dt=2024-03-01")
    os.makedirs(corrupt)
    with open(os.path.join(corrupt, "part-0.jsonl.gz"), "w") as f:
        f.write("not gzip: the run fails if it ever opens this file\n")
    with open(os.path.join(w.logs, "extra.jsonl.gz"), "wb") as f:
        f.write(gzip.compress(("\n".join(FLAT) + "\n").encode()))
    return w


def _config(*overrides):
    return config_from_dict({"pipeline": {"eval_fraction": 0.0, "max_neighbors": 2, "image_size": 8,
                                          "vocab_size": 100, "num_shards": 1, "min_clicks": 5,
                                          "as_of": AS_OF, "window_days": 5,
                                          "content_graph": {"source": "none"}}}, overrides=list(overrides))


def _run(config, w):
    assert pipeline.run(config, w, argparse.Namespace(extra_args=[])) == 0
    return pipeline.read_report(w)


def _pairs(w):
    """{(query, image_id): click_weight} of the train examples."""
    import tensorflow as tf

    out = {}
    for path in glob.glob(os.path.join(w.examples, "train-*.tfrecord.gz")):
        for record in tfrecords(path):
            f = tf.train.Example.FromString(record).features.feature
            out[(f["query"].bytes_list.value[0].decode(), f["image_id"].bytes_list.value[0].decode())] = (
                f["click_weight"].float_list.value[0])
    return out


def _vocab(w):
    with open(w.vocab, encoding="utf-8") as f:
        return f.read().splitlines()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return _write_world(tmp_path_factory.mktemp("window"))


@pytest.fixture(scope="module")
def windowed(world):
    """The world's run with a window and no decay: (report, train pairs, vocabulary)."""
    report = _run(_config(), world)
    return report, _pairs(world), _vocab(world)


@pytest.fixture(scope="module")
def decayed(world, windowed, tmp_path_factory):
    """The same window with a half-life of one day and a base vocabulary (another work dir, the same raw/):
    (report, train pairs, vocabulary, base, capacity)."""
    root = tmp_path_factory.mktemp("decayed")
    os.symlink(world.raw, root / "raw")
    base = root / "base_vocab.txt"
    base.write_text("\n".join(BASE_VOCAB) + "\n", encoding="utf-8")
    # The decay leaves the vocabulary's input alone (one count per search event), so the run learns the
    # tokens the windowed run wrote: cap the merge just after "blue", so later new tokens are left out.
    new = [t for t in windowed[2] if t not in BASE_VOCAB]
    capacity = len(BASE_VOCAB) + new.index("blue") + 1
    assert capacity < len(BASE_VOCAB) + len(new)
    w = Workdir(str(root))
    report = _run(_config("pipeline.half_life_days=1", f"pipeline.base_vocab={base}",
                          f"pipeline.vocab_capacity={capacity}"), w)
    return report, _pairs(w), _vocab(w), new, capacity


def test_window_reads_its_partitions_and_days_only(windowed):
    report, pairs, tokens = windowed
    # The corrupt partition was never opened (no skip_corrupt_files), nor the stale one.
    assert report["window"] == {
        "as_of": AS_OF, "window_days": 5, "half_life_days": 0.0, "first_day": "2024-03-06", "last_day": AS_OF,
        "files_matched": 5, "files_read": 3, "files_skipped": 2,
        "records_in_window": IN_WINDOW, "records_outside": 5, "records_after_as_of": 2,
        "first_record_day": "2024-03-06", "last_record_day": "2024-03-10"}
    assert report["log_records"] == {"read": IN_WINDOW + 5, "ok": IN_WINDOW + 5}
    assert report["dead_letter_records"] == 0 and report["log_files"]["corrupt"] == 0
    assert "base_vocab" not in report
    # Records outside the window (flat file, or misdated in a partition) count for nothing.
    assert sorted(pairs) == [("blue sky", "c"), ("green", "d"), ("red", "a"), ("red", "b")]
    assert pairs[("red", "a")] == pairs[("red", "b")] == pytest.approx(math.log1p(N))
    assert {"red", "blue", "sky", "green"} <= set(tokens)
    assert not {"ancient", "future", "stale", "misdated"} & set(tokens)


def test_decay_drops_a_pair_clicked_only_on_old_days(decayed):
    report, pairs, _, _, _ = decayed
    assert report["window"]["half_life_days"] == 1.0 and report["window"]["records_in_window"] == IN_WINDOW
    # min_clicks 5: red/b's 12 clicks on as_of weigh 12; red/a's, four days older, 12 * 0.5 ** 4 = 0.75;
    # blue sky/c's as red/b's; green/d's, two days older, 12 * 0.5 ** 2 = 3.
    assert sorted(pairs) == [("blue sky", "c"), ("red", "b")]
    assert pairs[("red", "b")] == pytest.approx(math.log1p(N), rel=1e-6)


def test_base_vocab_tokens_keep_their_ids_and_new_ones_follow_up_to_capacity(decayed):
    report, _, tokens, new, capacity = decayed
    assert tokens == BASE_VOCAB + new[:capacity - len(BASE_VOCAB)]
    assert tokens.index("zebra") == 2 and tokens.index("red") == 3 and tokens.index("blue") == capacity - 1
    assert report["vocab_size"] == capacity
    assert report["base_vocab"] == {"path": report["base_vocab"]["path"], "capacity": capacity,
                                    "base_tokens": len(BASE_VOCAB), "new_tokens_added": capacity - len(BASE_VOCAB),
                                    "new_tokens_left_out": len(new) - (capacity - len(BASE_VOCAB))}
    assert report["base_vocab"]["path"].endswith("base_vocab.txt")


# --------------------------------------------------------------------------- failures, clear and early


def test_a_window_with_no_record_stops_the_run_naming_as_of(world, tmp_path):
    # The dt= partitions are all outside 2024-02-01 .. 2024-02-10, but the flat file has to be read to know.
    os.symlink(world.raw, tmp_path / "raw")
    w = Workdir(str(tmp_path))
    with pytest.raises(ClicklensError, match=r"empty log window: pipeline.as_of=2024-02-10, "
                                             r"pipeline.window_days=10 \(2024-02-01 .. 2024-02-10\)"):
        pipeline.run(_config("pipeline.as_of='2024-02-10'", "pipeline.window_days=10"), w,
                     argparse.Namespace(extra_args=[]))
    assert not os.path.exists(w.report)


def test_check_inputs_refuses_a_window_no_log_file_is_in(world, tmp_path):
    os.symlink(world.raw, tmp_path / "raw")
    only_partitions = _config("pipeline.logs=" + os.path.join(world.logs, "dt=*", "*.jsonl.gz"),
                              "pipeline.as_of='2024-02-10'")
    with pytest.raises(ClicklensError, match=r"no log file in the window pipeline.as_of=2024-02-10, "
                                             r"pipeline.window_days=5 .* all in dt= partitions outside it"):
        pipeline.check_inputs(only_partitions, Workdir(str(tmp_path)))


@pytest.mark.parametrize("content, error", [(None, "not found"), ("red\n[PAD]\n", "must start with"),
                                            ("[PAD]\n[UNK]\nred\nred\n", "duplicate")])
def test_check_inputs_refuses_a_bad_base_vocab_naming_the_setting(world, tmp_path, content, error):
    path = tmp_path / "vocab.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ClicklensError, match=rf"pipeline.base_vocab: .*{error}"):
        pipeline.check_inputs(_config(f"pipeline.base_vocab={path}"), world)


@pytest.mark.parametrize("key", ["window_days=3", "half_life_days=2"])
def test_a_window_or_decay_without_as_of_is_refused_naming_the_key(world, key):
    with pytest.raises(ClicklensError, match=rf"pipeline.{key.split('=')[0]}: needs pipeline.as_of"):
        pipeline.check_inputs(_config("pipeline.window_days=0", f"pipeline.{key}", "pipeline.as_of=''"), world)
