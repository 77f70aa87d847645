"""Hostile logs: robot sessions over the click cap (pipeline.max_clicks_per_session*) and corrupt .gz
shards (pipeline.skip_corrupt_files), on tiny hand-made worlds run in-process (a few seconds a run)."""

import argparse
import gzip
import io
import json
import os

import pytest

from clicklens.config import config_from_dict
from clicklens.log_schema import Impression, LogRecord
from clicklens.workdir import Workdir
from tests.pipeline_digest import output_digests
from tests.test_pipeline_runner import _event as log_line

# Images of the normal sessions, and 40 that only robots click.
NORMAL_IMAGES = ["a", "b", "c", "d"]
ROBOT_IMAGES = [f"r{i:02d}" for i in range(40)]


def _event(session, query, shown, clicked, image_query=None):
    return log_line(query, shown, clicked, image_query=image_query, session=session)


def _clicked_list(session, query, n, images, image_query=None):
    """One record of `n` impressions cycling over `images`, every one clicked (what a scraper logs)."""
    shown = [images[k % len(images)] for k in range(n)]
    return _event(session, query, shown, set(shown), image_query)


NORMAL_LINES = [
    *(_event(f"h{k}", "Red", ["a", "b"], {"a", "b"}) for k in range(3)),
    _event("h3", "blue", ["c", "a"], {"c"}),
    _event("h4", None, ["b"], {"b"}, image_query="a"),
    _event("h4", None, ["c"], {"c"}, image_query="d"),  # h4: one session, two records
    "{broken",
]
# A human session split over two shards, within the caps: nothing of it may be dropped.
NORMAL_SECOND_SHARD = [_event("h5", "green", ["d", "c"], {"d"}), _event("h5", "green", ["d", "b"], {"d", "b"})]
ROBOT_LINES = [
    # Over both default caps in one record (the robot: 1,000 clicked impressions on a line).
    _clicked_list("bot1", "red", 1000, ROBOT_IMAGES + ["a", "b"]),
    _clicked_list("bot2", "buy now", 1000, ROBOT_IMAGES),
    # Over max_clicks_per_session (100) only: 30 queries of 40 clicks each (each under the per-query 50).
    *(_clicked_list("bot3", f"watch {q}", 40, ROBOT_IMAGES) for q in range(30)),
    # Over max_clicks_per_session_query (50) only: 60 clicks for one query image.
    _clicked_list("bot4", None, 60, ROBOT_IMAGES, image_query="a"),
]


def _write_world(root, shards):
    """A work dir with a catalog of NORMAL_IMAGES + ROBOT_IMAGES (tiny PNGs) and the given log shards."""
    from PIL import Image

    w = Workdir(str(root))
    os.makedirs(w.images)
    os.makedirs(w.logs)
    catalog = []
    for k, image_id in enumerate(NORMAL_IMAGES + ROBOT_IMAGES):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (5 * k, 255 - 5 * k, 0)).save(buf, format="PNG")
        with open(os.path.join(w.images, f"{image_id}.png"), "wb") as f:
            f.write(buf.getvalue())
        catalog.append(json.dumps({"image_id": image_id, "uri": f"images/{image_id}.png"}))
    with open(w.catalog, "w") as f:
        f.write("\n".join(catalog) + "\n")
    for name, lines in shards.items():
        with open(os.path.join(w.logs, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return w


def _config(*overrides):
    return config_from_dict({"pipeline": {"eval_fraction": 0.0, "max_neighbors": 2, "image_size": 8,
                                          "vocab_size": 100, "num_shards": 1,
                                          "content_graph": {"source": "none"}}}, overrides=list(overrides))


def _run(config, w):
    from beam_pipelines import pipeline

    assert pipeline.run(config, w, argparse.Namespace(extra_args=[])) == 0
    return pipeline.read_report(w)


def _dead_letters(w):
    found = []
    for name in sorted(os.listdir(w.examples)):
        if name.startswith("dead_letter-"):
            with open(os.path.join(w.examples, name), encoding="utf-8") as f:
                found += [json.loads(line) for line in f if line.strip()]
    return found


# Outputs that must be the same with the robots capped as without them (dead letters and the report say
# what was dropped, so they differ).
SAME_AS_WITHOUT_ROBOTS = ("train", "eval", "corpus", "logged_images", "vocab.txt")


def test_robot_sessions_inflate_examples_and_edges_unless_capped(tmp_path):
    # ~35 s: three in-process pipeline runs (each ~11 s of Beam overhead; the data are tiny).
    robot_shards = {"part-0.jsonl": NORMAL_LINES + ROBOT_LINES[:2], "part-1.jsonl": NORMAL_SECOND_SHARD + ROBOT_LINES[2:]}
    normal = _write_world(tmp_path / "normal", {"part-0.jsonl": NORMAL_LINES, "part-1.jsonl": NORMAL_SECOND_SHARD})
    uncapped = _write_world(tmp_path / "uncapped", robot_shards)
    capped = _write_world(tmp_path / "capped", robot_shards)

    base = _run(_config(), normal)
    # The issue: nothing bounds a session's weight.
    inflated = _run(_config("pipeline.max_clicks_per_session=0", "pipeline.max_clicks_per_session_query=0"), uncapped)
    # The defaults (100 per session, 50 per session and query) drop the four robots whole.
    report = _run(_config(), capped)

    def examples(r):
        return r["examples"]["train"] + r["examples"]["eval"]

    print(f"examples: normal {examples(base)}, robots uncapped {examples(inflated)}, capped {examples(report)}; "
          f"graph edges: {base['graph']['edges']}, {inflated['graph']['edges']}, {report['graph']['edges']}")
    assert examples(inflated) >= 5 * examples(base) and inflated["graph"]["edges"] >= 50 * base["graph"]["edges"]
    assert inflated["session_click_cap"]["sessions_dropped"] == 0

    # Capped: the outputs are exactly those of the normal sessions alone.
    want, got = output_digests(normal.examples), output_digests(capped.examples)
    assert {k: got[k] for k in SAME_AS_WITHOUT_ROBOTS} == {k: want[k] for k in SAME_AS_WITHOUT_ROBOTS}
    robot_lines = len(ROBOT_LINES)
    robot_clicks = 1000 + 1000 + 30 * 40 + 60
    assert report["session_click_cap"] == {"sessions_dropped": 4, "records_dropped": robot_lines,
                                           "clicks_dropped": robot_clicks, "impressions_dropped": robot_clicks}
    assert report["log_records"] == {"read": base["log_records"]["read"] + robot_lines,
                                     "ok": base["log_records"]["ok"] + robot_lines}
    assert report["bad_records"] == {**base["bad_records"], "session": {"session_click_cap": 4}}
    assert report["dead_letter_records"] == base["dead_letter_records"] + 4
    changed = {"session_click_cap", "log_records", "bad_records", "dead_letter_records"}
    assert {k: v for k, v in report.items() if k not in changed} == {k: v for k, v in base.items() if k not in changed}

    robots = {d["session_id"]: d for d in _dead_letters(capped) if d["source"] == "session"}
    assert sorted(robots) == ["bot1", "bot2", "bot3", "bot4"]
    assert all(d["reason"] == "session_click_cap" and d["raw"] == d["session_id"] for d in robots.values())
    assert {s: (d["records"], d["clicks"], d["max_query_clicks"]) for s, d in robots.items()} == {
        "bot1": (1, 1000, 1000), "bot2": (1, 1000, 1000), "bot3": (30, 1200, 40), "bot4": (1, 60, 60)}
    assert "max_clicks_per_session=100" in robots["bot3"]["detail"]


def test_session_tally_sums_every_record_of_a_session():
    from beam_pipelines import sessions

    def record(session, query=None, image=None, clicks=0, shown=3):
        return LogRecord(session, 1.0, tuple(Impression(f"i{k}", k + 1, k < clicks) for k in range(shown)),
                         query=query, query_image_id=image)

    fn = sessions.SessionTallyFn()
    records = [record("s", query="x", clicks=2), record("s", query="x", clicks=3, shown=5),
               record("s", image="x", clicks=4, shown=4), record("s", query="y")]
    # Two accumulators merged, as a lifted combine sees a session split over workers.
    halves = [fn.create_accumulator(), fn.create_accumulator()]
    for k, r in enumerate(records):
        session_id, tally = sessions.record_tally(r)
        assert session_id == "s"
        fn.add_input(halves[k % 2], tally)
    tally = fn.extract_output(fn.merge_accumulators(halves))
    # Text query "x" and query image "x" are different queries: 5 clicks for one, 4 for the other.
    assert tally == sessions.SessionTally(records=4, impressions=15, clicks=9, max_query_clicks=5, max_query="q:x")
    assert not sessions.is_robot(tally, 9, 5)
    assert sessions.is_robot(tally, 8, 5) and sessions.is_robot(tally, 9, 4)
    assert not sessions.is_robot(tally, 0, 0)  # 0: no cap
    assert fn.extract_output(fn.create_accumulator()) == sessions.SessionTally(0, 0, 0, 0, "")


def _corrupt_shards(logs_dir):
    """A real gzip shard cut two-thirds in, and a plain-text file named .gz; -> lines the truncated one holds."""
    whole = gzip.compress(("\n".join(_event(f"t{k}", "red", ["a"], {"a"}) for k in range(2000)) + "\n").encode())
    with open(os.path.join(logs_dir, "part-1.jsonl.gz"), "wb") as f:
        f.write(whole[: len(whole) * 2 // 3])
    with open(os.path.join(logs_dir, "part-2.jsonl.gz"), "w") as f:
        f.write(_event("p", "red", ["a"], {"a"}) + "\n")


# What _read_logs's pipeline collected (a module global: Beam pickles the DoFn, by reference to this module).
_COLLECTED = {}


def _keep(element, name):
    _COLLECTED.setdefault(name, []).append(element)


def _read_logs(pattern, skip):
    """ReadLogs alone, in-process -> (lines, records, dead letters, corrupt-file dead letters)."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from beam_pipelines import dead_letters, parse

    names = (parse.LINES, parse.RECORDS, dead_letters.DEAD_LETTER, parse.CORRUPT_FILES)
    _COLLECTED.clear()
    with beam.Pipeline(runner=FnApiRunner()) as p:
        logs = p | parse.ReadLogs(pattern, skip)
        for name in names:
            logs[name] | f"Keep{name}" >> beam.Map(_keep, name)
    return [_COLLECTED.get(name, []) for name in names]


@pytest.mark.parametrize("name, error", [("part-1.jsonl.gz", "EOFError"), ("part-2.jsonl.gz", "BadGzipFile")])
def test_a_corrupt_gzip_shard_stops_read_logs_by_default(tmp_path, name, error):
    _corrupt_shards(tmp_path)
    with pytest.raises(Exception, match=rf"unreadable input file .*{name}: {error}"):
        _read_logs(str(tmp_path / name), skip=False)


def test_skip_corrupt_files_dead_letters_each_file_and_keeps_the_lines_read(tmp_path):
    _corrupt_shards(tmp_path)
    (tmp_path / "part-0.jsonl").write_text(_event("h", "blue", ["c"], {"c"}) + "\n")
    lines, records, dead, corrupt = _read_logs(str(tmp_path / "part-*"), skip=True)
    assert sorted(dead, key=lambda d: d["file"]) == sorted(corrupt, key=lambda d: d["file"])
    by_file = {os.path.basename(d["file"]): d for d in corrupt}
    assert sorted(by_file) == ["part-1.jsonl.gz", "part-2.jsonl.gz"]
    truncated, fake = by_file["part-1.jsonl.gz"], by_file["part-2.jsonl.gz"]
    assert {d["source"] for d in corrupt} == {"log_file"} and {d["reason"] for d in corrupt} == {"corrupt_file"}
    assert fake["lines_read"] == 0 and "BadGzipFile" in fake["detail"] and fake["raw"] == fake["file"]
    assert 0 < truncated["lines_read"] < 2000 and "EOFError" in truncated["detail"]
    # The lines read before the fault are kept, each a whole record: none of them is a bad line.
    assert len(lines) == len(records) == 1 + truncated["lines_read"]
    assert sorted(r.session_id for r in records) == sorted(["h"] + [f"t{k}" for k in range(truncated["lines_read"])])


def test_skip_corrupt_files_run_finishes_and_reports_them(tmp_path):
    # ~12 s: one in-process pipeline run.  (Without the setting such shards stop the run, naming the file and
    # the setting: tests/test_pipeline_runner.py.)
    w = _write_world(tmp_path / "w", {"part-0.jsonl": NORMAL_LINES})
    _corrupt_shards(w.logs)
    report = _run(_config("pipeline.skip_corrupt_files=true"), w)
    corrupt = [d for d in _dead_letters(w) if d["source"] == "log_file"]
    kept = {os.path.basename(d["file"]): d["lines_read"] for d in corrupt}
    assert sorted(kept) == ["part-1.jsonl.gz", "part-2.jsonl.gz"] and kept["part-2.jsonl.gz"] == 0
    assert report["log_files"] == {"corrupt": 2, "corrupt_lines_kept": kept["part-1.jsonl.gz"]}
    assert report["bad_records"]["log_file"] == {"corrupt_file": 2}
    assert report["log_records"] == {"read": len(NORMAL_LINES) + kept["part-1.jsonl.gz"],
                                     "ok": len(NORMAL_LINES) - 1 + kept["part-1.jsonl.gz"]}
