"""Position bias (issue 16): the PBM fit by EM, debiased clicks, dwell weighting, bad positions, the pipeline run."""

import json
import math
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from beam_pipelines import position_bias, selection
from beam_pipelines.click_stats import PairStats, PositionQueryStatsFn, QueryStats, slot_event
from beam_pipelines.parse import parse_or_dead_letter
from beam_pipelines.propensity_plot import propensity_png
from clicklens.log_schema import MAX_IMPRESSIONS, Impression, LogRecord
from tests.conftest import run_verb

TRUTH = {p: p ** -0.7 for p in range(1, 11)}


def _pbm_data(num_pairs=600, shows=40, seed=0):
    """PbmData of a log drawn from a PBM with TRUTH: each pair shown `shows` times at noisy positions."""
    rng = np.random.default_rng(seed)
    alpha = rng.uniform(0.05, 0.9, num_pairs)
    home = rng.integers(1, 11, num_pairs)
    pairs, totals = [], {}
    for k in range(num_pairs):
        positions = np.clip(home[k] + rng.integers(-3, 4, shows), 1, 10)
        clicks = rng.random(shows) < np.array([TRUTH[p] for p in positions]) * alpha[k]
        counts = {}
        for p, c in zip(positions, clicks):
            counts.setdefault(int(p), [0, 0])
            counts[int(p)][0] += 1
            counts[int(p)][1] += int(c)
        pairs.append(tuple((("", p), n, c) for p, (n, c) in sorted(counts.items())))
        for p, (n, c) in counts.items():
            t = totals.setdefault(("", p), [0, 0])
            t[0] += n
            t[1] += c
    return position_bias.PbmData(totals, sorted(pairs))


def test_em_recovers_known_propensities():
    fit = position_bias.fit_pbm(_pbm_data(), iterations=2000, tolerance=1e-6)
    estimated = {int(p): v for p, v in fit["propensities"].items()}
    assert estimated[1] == 1.0 and fit["relative_to"] == {"1": 1}
    assert max(abs(estimated[p] - TRUTH[p]) for p in TRUTH) < 0.05
    # Raw CTR by position confounds examination with which pairs the ranker put there.
    assert fit["positions_without_propensity"] == [] and fit["pairs_fitted"] == 600


def test_em_fits_one_set_of_propensities_per_segment():
    en, zh = _pbm_data(seed=1), _pbm_data(seed=2)
    relabel = lambda data, segment: position_bias.PbmData(  # noqa: E731
        {(segment, p): t for (_, p), t in data.totals.items()},
        [tuple(((segment, p), n, c) for (_, p), n, c in pair) for pair in data.pairs])
    en, zh = relabel(en, "en"), relabel(zh, "zh")
    fit = position_bias.fit_pbm(position_bias.PbmData({**en.totals, **zh.totals}, sorted(en.pairs + zh.pairs)),
                                iterations=2000, tolerance=1e-6)
    assert set(fit["propensities"]) == {"en", "zh"} and fit["relative_to"] == {"en": {"1": 1}, "zh": {"1": 1}}
    table = position_bias.propensity_table(fit)
    assert max(abs(table[(s, p)] - TRUTH[p]) for s in ("en", "zh") for p in TRUTH) < 0.05
    assert position_bias.slot_key("", 3) == 3 and position_bias.as_slot(3) == ("", 3)
    assert propensity_png(fit)[:4] == b"\x89PNG"


def test_em_that_does_not_converge_fails_loudly():
    with pytest.raises(position_bias.NotConverged, match="not converged after 3 iterations"):
        position_bias.fit_pbm(_pbm_data(num_pairs=50), iterations=3, tolerance=1e-9)
    with pytest.raises(position_bias.NotConverged, match="no \\(query, image\\) pair"):
        position_bias.fit_pbm(position_bias.PbmData({("", 1): [5, 1]}, []), iterations=100, tolerance=1e-5)


def test_a_position_never_shown_gets_no_propensity():
    data = _pbm_data(num_pairs=100)
    keep = [tuple(row for row in pair if row[0][1] != 3) for pair in data.pairs]
    data = position_bias.PbmData({slot: t for slot, t in data.totals.items() if slot[1] != 3},
                                 sorted(pair for pair in keep if len(pair) >= 2))
    fit = position_bias.fit_pbm(data, iterations=2000, tolerance=1e-5)
    assert "3" not in fit["propensities"] and fit["positions_without_propensity"] == [3]
    assert 3 not in position_bias.propensity_table(fit) and 2 in position_bias.propensity_table(fit)


def test_fit_input_keeps_pairs_with_enough_impressions_at_two_positions():
    stats = {"a": PairStats(12, 3, 30, (1, 6, 2, 2.0, 4, 6, 1, 1.0)),
             "b": PairStats(12, 3, 12, (1, 12, 3, 3.0)),                # one position: no information
             "c": PairStats(3, 1, 6, (1, 1, 1, 1.0, 3, 2, 0, 0.0))}     # too few impressions
    totals, pairs = position_bias.fit_input(("q", QueryStats("", 3, stats)), min_impressions=10)
    assert pairs == [(1, 6, 2, 4, 6, 1)]
    assert totals == {1: [19, 6], 4: [6, 1], 3: [2, 0]}


def test_inverse_propensity_clicks_are_clipped():
    table = {1: 1.0, 5: 0.4, 20: 0.02}
    by_slot = (1, 10, 2, 2.0, 5, 10, 2, 2.0, 20, 5, 1, 1.0, 30, 1, 0, 0.0)  # (slot key, n, clicks, weighted) each
    d = position_bias.debias(by_slot, table, clip=0.1)
    assert d.clicks == 5.0
    assert d.ips_clicks == pytest.approx(2 + 2 / 0.4 + 1 / 0.1)  # position 20 clipped to 0.1
    assert d.examinations == pytest.approx(10 + 10 * 0.4 + 5 * 0.1 + 1 * 1.0)  # 30: no propensity, not reweighted
    assert d.not_reweighted == 1
    assert d.smoothed_ctr(0.05, 10) == pytest.approx((5 + 0.5) / (d.examinations + 10))
    assert position_bias.debias(by_slot, None, 0.1).ips_clicks == 5.0  # dwell weighting alone


def test_dwell_weighting():
    assert position_bias.dwell_weight(1000.0, 0.0) == 1.0      # off
    assert position_bias.dwell_weight(None, 5000.0) == 1.0     # not logged
    assert position_bias.dwell_weight(1000.0, 5000.0) == pytest.approx(0.2)
    assert position_bias.dwell_weight(9000.0, 5000.0) == 1.0


def test_debiased_selection_prefers_clicks_deep_in_the_page():
    rules = selection.SelectionRules(top_n_per_query=1, position_bias="pbm", propensity_clip=0.1)
    table = {1: 1.0, 10: 0.2}
    shown = [("top", PairStats(20, 4, 20, (1, 20, 4, 4.0))),      # CTR 0.2 where everyone looks
             ("deep", PairStats(20, 3, 200, (10, 20, 3, 3.0)))]   # CTR 0.15 where 1 in 5 looks
    raw = selection.select_for_query("q", "", shown, selection.SelectionRules(top_n_per_query=1))
    comparison = []
    debiased = selection.select_for_query("q", "", shown, rules, propensities=table, comparison=comparison)
    assert [p.image_id for p in raw] == ["top"] and [p.image_id for p in debiased] == ["deep"]
    assert debiased[0].click_weight == pytest.approx(math.log1p(3 / 0.2))
    assert comparison == [selection.SelectionComparison(2, 2, 2, 1, 1, 1, 1, 0)]
    # A short click counts less: under min_clicks=1 a single 1 s click (min_dwell 5 s) is not a positive.
    short = [("a", PairStats(5, 1, 5, (1, 5, 1, position_bias.dwell_weight(1000.0, 5000.0))))]
    dwell_rules = selection.SelectionRules(min_dwell_ms=5000.0)
    assert selection.select_for_query("q", "", short, dwell_rules) == []
    assert len(selection.select_for_query("q", "", short, selection.SelectionRules())) == 1


def test_click_stats_by_slot_sum_per_position_and_segment():
    records = [LogRecord("s1", 1.0, (Impression("a", 1, True, 1000.0), Impression("b", 2, False)), query="red",
                         locale="en"),
               LogRecord("s2", 2.0, (Impression("b", 1, True, 9000.0), Impression("a", 2, False)), query="red",
                         locale="zh"),
               LogRecord("s3", 3.0, (Impression("a", 1, False),), query="red", locale="en")]
    fn = PositionQueryStatsFn()
    for by, expected_a in [("none", (1, 2, 1, 0.2, 2, 1, 0, 0.0)),
                           ("locale", (("en", 1), 2, 1, 0.2, ("zh", 2), 1, 0, 0.0))]:
        accs = [fn.add_input(fn.create_accumulator(), event)
                for r in records for _, event in slot_event(r, 5000.0, by)]
        stats = fn.extract_output(fn.merge_accumulators(accs))
        assert stats.events == 3 and stats.images["a"][:3] == (3, 1, 4)
        assert stats.images["a"].by_slot == expected_a


def test_inversions_count_discordant_pairs():
    assert selection.inversions([0, 1, 2, 3]) == 0
    assert selection.inversions([3, 2, 1, 0]) == 6
    assert selection.inversions([1, 0, 3, 2, 4]) == 2


def _line(positions):
    return json.dumps({"session_id": "s", "time": 1.0, "query": "red",
                       "impressions": [{"image_id": f"i{k}", "position": p, "clicked": False}
                                       for k, p in enumerate(positions)]}).encode()


@pytest.mark.parametrize("positions, reason", [
    ([1, 2, 2], "duplicate_position"),
    ([1, MAX_IMPRESSIONS + 1], "position_out_of_range"),
    ([1, 0], "bad_impression"),
    ([1, None], "bad_impression"),
])
def test_bad_positions_are_dead_lettered(positions, reason):
    record, bad = parse_or_dead_letter(_line(positions))
    assert record is None and bad["reason"] == reason


def _records(seed=1, sessions=3000):
    """LogRecords of one query from a PBM with TRUTH over 12 images; longer dwell on the attractive ones."""
    rng = np.random.default_rng(seed)
    alpha = np.linspace(0.8, 0.05, 12)
    out = []
    for s in range(sessions):
        order = np.argsort(-(alpha + rng.normal(0, 0.3, 12)))[:10]
        impressions = []
        for p, i in enumerate(order, start=1):
            clicked = bool(rng.random() < TRUTH[p] * alpha[i])
            impressions.append(Impression(f"img{i:02d}", p, clicked, 8000.0 if clicked else None))
        out.append(LogRecord(f"s{s}", float(s), tuple(impressions), query="red", category="color", locale="en"))
    return out


def test_select_training_pairs_with_pbm_in_beam():
    rules = selection.SelectionRules(position_bias="pbm")
    settings = position_bias.PbmSettings(iterations=2000, tolerance=1e-6, min_impressions=10)
    with BeamTestPipeline(runner=FnApiRunner()) as p:
        out = p | beam.Create(_records()) | selection.SelectTrainingPairs(rules, settings)
        errors = out[selection.PROPENSITIES] | beam.Map(
            lambda fit: max(abs(fit["propensities"][str(k)] - v) for k, v in TRUTH.items()) < 0.1)
        assert_that(errors, equal_to([True]), label="CloseToTruth")
        counts = out[selection.COMPARISON] | beam.Map(lambda c: (c.pairs, c.selected_debiased))
        assert_that(counts, equal_to([(12, 12)]), label="Comparison")


def test_propensity_plot_is_a_png():
    fit = {"propensities": {"1": 1.0, "2": 0.7, "3": 0.5},
           "ctr_by_position": {"1": 0.4, "2": 0.25, "3": 0.1}}
    image = Image.open(__import__("io").BytesIO(propensity_png(fit)))
    assert image.format == "PNG" and image.size[0] > 100


def test_pipeline_with_pbm_writes_the_fit_and_the_plot(demo_world, tmp_path):
    # ~25 s: one pipeline run over the small world's raw inputs with position_bias=pbm.
    os.symlink(demo_world.raw, tmp_path / "raw")
    run_verb("pipeline", tmp_path, overrides=["pipeline.position_bias=pbm", "pipeline.min_dwell_ms=4000"])
    report = json.loads((tmp_path / "examples" / "report.json").read_text())
    bias = report["position_bias"]
    assert bias["settings"] == {"model": "pbm", "by": "none", "propensity_clip": 0.1, "min_dwell_ms": 4000.0}
    fit = bias["fit"]
    assert fit["propensities"]["1"] == 1.0 and fit["iterations"] <= 1000
    # The small world's lists are 10-20 long: every position 1-20 is shown and fitted, none without.
    assert sorted(map(int, fit["propensities"])) == list(range(1, 21))
    assert fit["positions_without_propensity"] == []
    manifest = json.loads((tmp_path / "raw" / "manifest.json").read_text())
    truth = manifest["examination_propensities"]
    assert max(abs(fit["propensities"][p] - truth[p]) for p in truth) < 0.15  # small world: a loose bound
    assert bias["selection"]["selected_debiased"] == report["selected_pairs"]
    assert bias["selection"]["pairs"] == report["pairs"]
    with Image.open(tmp_path / "examples" / "position_bias.png") as plot:
        assert plot.format == "PNG"


@pytest.fixture(scope="module")
def gap_world(tmp_path_factory):
    """Four images of one query shown at positions 1, 2 and 4 (never 3), in varying order, with a few clicks."""
    import io

    from clicklens.workdir import Workdir

    root = tmp_path_factory.mktemp("gap")
    w = Workdir(str(root))
    os.makedirs(w.images)
    os.makedirs(w.logs)
    catalog = []
    for k, image_id in enumerate("abcd"):
        buf = io.BytesIO()
        Image.new("RGB", (12, 12), (60 * k, 0, 0)).save(buf, format="PNG")
        (root / "raw" / "images" / f"{image_id}.png").write_bytes(buf.getvalue())
        catalog.append(json.dumps({"image_id": image_id, "uri": f"images/{image_id}.png"}))
    (root / "raw" / "catalog.jsonl").write_text("\n".join(catalog) + "\n")
    rng = np.random.default_rng(3)
    lines = []
    for s in range(120):
        order = rng.permutation(list("abcd"))[:3]
        lines.append(json.dumps({"session_id": f"s{s}", "time": float(s), "query": "red", "impressions": [
            {"image_id": i, "position": p, "clicked": bool(rng.random() < 0.6 / p)} for i, p in zip(order, (1, 2, 4))]}))
    (root / "raw" / "logs" / "part-0.jsonl").write_text("\n".join(lines) + "\n")
    return w


def _gap_config(**pipeline):
    from clicklens.config import config_from_dict

    return config_from_dict({"pipeline": {"eval_fraction": 0.0, "image_size": 8, "vocab_size": 100, "num_shards": 1,
                                          "content_graph": {"source": "none"}, "position_bias": "pbm",
                                          "position_bias_min_impressions": 5, **pipeline}})


def test_tiny_pipeline_reports_a_position_never_shown_and_plots(gap_world):
    # ~15 s: one pipeline run on four images.
    from beam_pipelines import pipeline

    pipeline.run_pipeline(_gap_config(), gap_world)
    fit = pipeline.read_report(gap_world)["position_bias"]["fit"]
    assert sorted(fit["propensities"]) == ["1", "2", "4"] and fit["positions_without_propensity"] == [3]
    assert fit["propensities"]["1"] == 1.0 and fit["propensities"]["4"] < fit["propensities"]["2"] < 1.0
    assert os.path.exists(os.path.join(gap_world.examples, "position_bias.png"))


def test_tiny_pipeline_fails_loudly_when_em_does_not_converge(gap_world):
    # ~15 s: the run stops naming the fit; the previous outputs stay.
    from beam_pipelines import pipeline
    from clicklens.errors import ClicklensError

    with pytest.raises(ClicklensError, match="position bias EM failed: not converged after 2 iterations"):
        pipeline.run_pipeline(_gap_config(position_bias_iterations=2, position_bias_tolerance=1e-9), gap_world)
    with pytest.raises(ClicklensError, match="no \\(query, image\\) pair"):
        pipeline.run_pipeline(_gap_config(position_bias_min_impressions=10_000), gap_world)
