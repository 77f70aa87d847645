"""`clicklens generate-demo-data` over several days: dated log partitions, daily ground truth, tastes that drift."""

import collections
import datetime
import gzip
import itertools
import json
import pathlib

import numpy as np
import pytest

from clicklens.catalog import parse_catalog_line
from clicklens.config import config_from_dict
from clicklens.demo_data import generate, world
from clicklens.errors import BadRecord
from clicklens.log_schema import parse_log_line
from clicklens.workdir import Workdir

SMALL_DAYS = ["demo_data.num_images=300", "demo_data.num_sessions=3000", "demo_data.image_size=16",
              "demo_data.malformed_lines=20", "demo_data.num_log_shards=2"]
DATES = ["2026-01-01", "2026-01-02", "2026-01-03"]


def _config(*overrides):
    return config_from_dict({}, overrides=SMALL_DAYS + list(overrides)).demo_data


def _jsonl(path) -> list:
    return [json.loads(line) for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines()]


def _utc_date(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d")


def _log_files(logs: pathlib.Path) -> list:
    """Every file below raw/logs, relative to raw/ (as the manifest names them)."""
    return sorted(str(p.relative_to(logs.parent)) for p in logs.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def drifting(tmp_path_factory):
    """Three days of logs whose tastes drift from day 2."""
    root = tmp_path_factory.mktemp("days")
    cfg = _config("demo_data.days=3", "demo_data.drift_day=2")
    manifest = generate.generate(cfg, Workdir(str(root)))
    raw = root / "raw"
    catalog = [parse_catalog_line(line) for line in (raw / "catalog.jsonl").read_bytes().splitlines()]
    broken = set(itertools.chain(*manifest["broken_images"].values()))
    return {
        "cfg": cfg,
        "workdir": Workdir(str(root)),
        "raw": raw,
        "manifest": manifest,
        "attributes": {e.image_id: {k: v for k, v in e.extra if k in world.KINDS} for e in catalog},
        "good": {e.image_id for e in catalog} - broken,
        "truth": {date: {row["query"]: row for row in _jsonl(raw / "ground_truth" / f"dt={date}.jsonl")}
                  for date in DATES},
    }


@pytest.fixture(scope="module")
def records_by_partition(drifting):
    """{date: (valid records, rejected lines)} from each dt= partition."""
    out = {}
    for folder in sorted((drifting["raw"] / "logs").iterdir()):
        records, rejected = [], []
        for path in sorted(folder.glob("*.jsonl.gz")):
            with gzip.open(path, "rb") as f:
                for line in f.read().split(b"\n")[:-1]:
                    try:
                        records.append(parse_log_line(line))
                    except BadRecord:
                        rejected.append(line)
        out[folder.name.removeprefix("dt=")] = (records, rejected)
    return out


def _relevant(drifting, attributes) -> list:
    """The good images with every attribute in `attributes`, sorted."""
    return sorted(i for i in drifting["good"]
                  if all(drifting["attributes"][i][k] == v for k, v in attributes.items()))


def test_a_sixth_seed_stream_leaves_the_first_five_unchanged():
    five = np.random.SeedSequence(20261122).spawn(5)
    six = np.random.SeedSequence(20261122).spawn(6)
    for a, b in zip(five, six):
        assert np.random.default_rng(a).integers(1 << 30, size=8).tolist() == \
            np.random.default_rng(b).integers(1 << 30, size=8).tolist()


def test_logs_are_partitioned_by_utc_day(drifting, records_by_partition):
    cfg, manifest, logs = drifting["cfg"], drifting["manifest"], drifting["raw"] / "logs"
    assert sorted(p.name for p in logs.iterdir()) == [f"dt={d}" for d in DATES]  # nothing flat
    assert _log_files(logs) == sorted(manifest["log_files"])
    assert len(manifest["log_files"]) == len(DATES) * cfg.num_log_shards
    assert manifest["days"] == 3 and manifest["dates"] == DATES
    for date, (records, _) in records_by_partition.items():
        assert records and {_utc_date(r.time) for r in records} == {date}
        assert len(records) == manifest["sessions_by_day"][date]
        times = [r.time for r in records]
        assert times == sorted(times)
    assert sum(len(records) for records, _ in records_by_partition.values()) == cfg.num_sessions
    assert sum(len(bad) for _, bad in records_by_partition.values()) == cfg.malformed_lines
    assert sum(manifest["malformed_by_file"].values()) == cfg.malformed_lines
    assert sorted(records_by_partition) == DATES
    # Sessions are spread evenly: the days differ by at most one.
    counts = [len(records) for records, _ in records_by_partition.values()]
    assert max(counts) - min(counts) <= 1


def test_the_pipeline_logs_glob_finds_every_partition(drifting):
    from apache_beam.io.filesystems import FileSystems

    found = [m.path for m in FileSystems.match([drifting["workdir"].logs_glob])[0].metadata_list]
    raw = str(drifting["raw"])
    assert sorted(str(pathlib.Path(p).relative_to(raw)) for p in found) == sorted(drifting["manifest"]["log_files"])


def test_each_day_has_its_ground_truth_and_drifted_queries_change_meaning(drifting):
    manifest, truth = drifting["manifest"], drifting["truth"]
    assert manifest["daily_ground_truth"] == [f"ground_truth/dt={d}.jsonl" for d in DATES]
    assert manifest["drift_day"] == 2
    assert len({frozenset(day) for day in truth.values()}) == 1  # the same queries every day
    last = (drifting["raw"] / "ground_truth" / f"dt={DATES[-1]}.jsonl").read_bytes()
    assert (drifting["raw"] / "ground_truth.jsonl").read_bytes() == last

    new_meaning = {json.dumps(d["from"], sort_keys=True): d["to"] for d in manifest["drifted_intents"]}
    for d in manifest["drifted_intents"]:
        assert d["from"]["category"] == d["to"]["category"] and d["from"]["attributes"] != d["to"]["attributes"]
    drifted = set(manifest["drifted_queries"])
    assert drifted and drifted < set(truth[DATES[0]])
    for query, before in truth[DATES[0]].items():
        assert "drifted" not in before
        assert before["relevant_image_ids"] == _relevant(drifting, before["attributes"]), query
        words = json.dumps({"category": before["category"], "attributes": before["attributes"]}, sort_keys=True)
        for date in DATES[1:]:
            after = truth[date][query]
            assert (after["category"], after["attributes"]) == (before["category"], before["attributes"])
            if query in drifted:
                meant = new_meaning[words]
                assert after["drifted"] is True and after["means"] == meant
                assert after["relevant_image_ids"] == _relevant(drifting, meant["attributes"]), query
                assert after["relevant_image_ids"] != before["relevant_image_ids"]
            else:
                assert after == before, query


def test_clicks_follow_the_meaning_of_the_day(drifting, records_by_partition):
    truth, drifted = drifting["truth"], set(drifting["manifest"]["drifted_queries"])
    # (before or after the drift, clicked image relevant under the old meaning, under the new) -> clicks
    clicks = collections.Counter()
    for date, (records, _) in records_by_partition.items():
        for record in records:
            if record.is_image_query or record.query not in drifted:
                continue
            old = set(truth[DATES[0]][record.query]["relevant_image_ids"])
            new = set(truth[DATES[-1]][record.query]["relevant_image_ids"])
            for image_id in record.clicked_image_ids():
                clicks[(date >= DATES[1], image_id in old, image_id in new)] += 1

    def share(after_drift, meaning):
        total = sum(n for key, n in clicks.items() if key[0] == after_drift)
        return sum(n for key, n in clicks.items() if key[0] == after_drift and key[1 + meaning]) / total

    print({k: v for k, v in sorted(clicks.items())})
    assert sum(n for key, n in clicks.items() if not key[0]) > 100 and sum(clicks.values()) > 300
    assert share(False, 0) > 0.5 and share(False, 1) < 0.2  # day 1: the original meaning
    assert share(True, 1) > 0.5 and share(True, 0) < 0.2  # days 2 and 3: the new one


def test_one_day_keeps_the_flat_layout(tmp_path):
    manifest = generate.generate(_config(), Workdir(str(tmp_path)))
    raw = tmp_path / "raw"
    assert _log_files(raw / "logs") == sorted(manifest["log_files"])
    assert all(p.is_file() and p.name.startswith("part-") for p in (raw / "logs").iterdir())
    assert not (raw / "ground_truth").exists()
    assert not {"days", "dates", "drift_day", "drifted_intents", "daily_ground_truth"} & set(manifest)
    assert json.loads((raw / "manifest.json").read_text(encoding="utf-8")) == manifest


def test_one_day_can_drift_from_its_first_day(tmp_path):
    manifest = generate.generate(_config("demo_data.drift_day=1"), Workdir(str(tmp_path)))
    assert "days" not in manifest and manifest["drift_day"] == 1 and manifest["drifted_queries"]
    truth = {row["query"]: row for row in _jsonl(tmp_path / "raw" / "ground_truth.jsonl")}
    assert {q for q, row in truth.items() if row.get("drifted")} == set(manifest["drifted_queries"])
    assert not (tmp_path / "raw" / "ground_truth").exists()


def test_regenerating_with_another_layout_removes_the_old_files(tmp_path):
    from apache_beam.io.filesystems import FileSystems

    workdir, raw = Workdir(str(tmp_path)), tmp_path / "raw"

    def matched():
        return sorted(str(pathlib.Path(m.path).relative_to(raw))
                      for m in FileSystems.match([workdir.logs_glob])[0].metadata_list)

    dated = generate.generate(_config("demo_data.days=3"), workdir)
    assert matched() == sorted(dated["log_files"]) and (raw / "ground_truth").is_dir()

    flat = generate.generate(_config(), workdir)
    assert matched() == _log_files(raw / "logs") == sorted(flat["log_files"])
    assert not list((raw / "logs").glob("dt=*")) and not (raw / "ground_truth").exists()

    fewer_shards = generate.generate(_config("demo_data.days=2", "demo_data.num_log_shards=1"), workdir)
    assert matched() == _log_files(raw / "logs") == sorted(fewer_shards["log_files"])
    assert sorted(p.name for p in (raw / "ground_truth").iterdir()) == ["dt=2026-01-01.jsonl", "dt=2026-01-02.jsonl"]

    generate.generate(_config("demo_data.days=3", "demo_data.num_log_shards=2"), workdir)
    again = generate.generate(_config("demo_data.days=2", "demo_data.num_log_shards=1"), workdir)
    assert matched() == _log_files(raw / "logs") == sorted(again["log_files"])  # day 3 and shard 2 gone
    assert sorted(p.name for p in (raw / "logs").iterdir()) == ["dt=2026-01-01", "dt=2026-01-02"]
    assert sorted(p.name for p in (raw / "ground_truth").iterdir()) == ["dt=2026-01-01.jsonl", "dt=2026-01-02.jsonl"]
