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


# Under a CTR threshold, raw and debiased CTR (prior 0.05, n0 10; propensities 1 at position 1, 0.2 at 10):
#   image   slot: n, clicks   raw CTR          debiased CTR
#   top     1: 20, 2          2.5/30 = .083    .083
#   deep   10: 20, 2          2.5/30 = .083    2.5/(20*.2+10) = .179
#   deeper 10: 20, 3          3.5/30 = .117    3.5/14 = .250
#   edge    1:  5, 1          1.5/15 = .100    .100   (exactly at 0.1: "strictly above" drops it)
#   hot     1: 10, 6          6.5/20 = .325    .325
THRESHOLD_STATS = [("top", PairStats(20, 2, 20, (1, 20, 2, 2.0))),
                   ("deep", PairStats(20, 2, 200, (10, 20, 2, 2.0))),
                   ("deeper", PairStats(20, 3, 200, (10, 20, 3, 3.0))),
                   ("edge", PairStats(5, 1, 5, (1, 5, 1, 1.0))),
                   ("hot", PairStats(10, 6, 10, (1, 10, 6, 6.0)))]


@pytest.mark.parametrize("category, kept_raw, kept_debiased", [
    ("", {"hot"}, {"deep", "deeper", "hot"}),                     # ctr_threshold_default 0.15
    ("other", {"hot"}, {"deep", "deeper", "hot"}),                # a category without its own threshold
    ("strict", {"hot"}, {"deeper", "hot"}),                       # 0.2: deep's .179 is not enough
    ("lenient", {"deeper", "hot"}, {"deep", "deeper", "hot"}),    # 0.1: edge's .100 is not above it
])
def test_ctr_threshold_reads_the_debiased_ctr(category, kept_raw, kept_debiased):
    from clicklens.config import config_from_dict

    pipeline = {"ctr_threshold_default": 0.15, "ctr_threshold_by_category": {"strict": 0.2, "lenient": 0.1},
                "ctr_prior": 0.05, "ctr_prior_impressions": 10.0, "min_clicks": 1, "top_n_per_query": 50}
    rules = {bias: selection.SelectionRules.from_config(
        config_from_dict({"pipeline": dict(pipeline, position_bias=bias)}).pipeline) for bias in ("none", "pbm")}
    assert rules["pbm"].threshold(category) == rules["none"].threshold(category)
    edge = dict(THRESHOLD_STATS)["edge"]
    assert edge.smoothed_ctr(0.05, 10.0) == 0.1  # exactly, so the "lenient" case tests "strictly above"
    table = {1: 1.0, 10: 0.2}
    raw = selection.select_for_query("q", category, THRESHOLD_STATS, rules["none"])
    comparison = []
    debiased = selection.select_for_query("q", category, THRESHOLD_STATS, rules["pbm"], propensities=table,
                                          comparison=comparison)
    assert {p.image_id for p in raw} == kept_raw
    assert {p.image_id for p in debiased} == kept_debiased
    assert all(p.category == category for p in raw + debiased)
    # The comparison's raw selection is the one position_bias=none makes.
    (c,) = comparison
    assert (c.pairs, c.selected_raw, c.selected_debiased, c.selected_both) == (
        5, len(kept_raw), len(kept_debiased), len(kept_raw & kept_debiased))


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
    impressions = [{"image_id": f"i{k}", "position": p, "clicked": False} for k, p in enumerate(positions)]
    for impression in impressions:
        if impression["position"] is _MISSING:
            del impression["position"]
    return json.dumps({"session_id": "s", "time": 1.0, "query": "red", "impressions": impressions}).encode()


_MISSING = object()  # the impression has no "position" key at all


@pytest.mark.parametrize("positions, reason, detail", [
    ([1, 2, 2], "duplicate_position", "impressions[2].position=2 is shown twice"),
    ([1, MAX_IMPRESSIONS + 1], "position_out_of_range", f"impressions[1].position={MAX_IMPRESSIONS + 1} > "),
    ([1, 0], "bad_impression", "impressions[1].position=0"),
    ([1, None], "bad_impression", "impressions[1].position=None"),
    ([1, _MISSING], "bad_impression", "impressions[1].position=None"),
    ([-1, 2], "bad_impression", "impressions[0].position=-1"),
    ([1, 2.0], "bad_impression", "impressions[1].position=2.0"),
    ([1, "2"], "bad_impression", "impressions[1].position='2'"),
    ([True, 2], "bad_impression", "impressions[0].position=True"),
])
def test_bad_positions_are_dead_lettered(positions, reason, detail):
    record, bad = parse_or_dead_letter(_line(positions))
    assert record is None and bad["reason"] == reason and bad["detail"].startswith(detail)
    assert bad["source"] == "log" and json.loads(bad["raw"]) == json.loads(_line(positions))


def test_positions_up_to_max_impressions_in_any_order_are_kept():
    record, bad = parse_or_dead_letter(_line([MAX_IMPRESSIONS, 3, 1]))
    assert bad is None and [i.position for i in record.impressions] == [MAX_IMPRESSIONS, 3, 1]


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


def test_small_world_raw_and_debiased_ctr_disagree(demo_world, tmp_path):
    # ~10 s: one pipeline run over the small world with pbm alone (no dwell weighting, which would also make
    # the two differ) and a CTR threshold, so the selections can differ too (threshold 0 keeps every clicked pair).
    os.symlink(demo_world.raw, tmp_path / "raw")
    run_verb("pipeline", tmp_path, overrides=["pipeline.position_bias=pbm", "pipeline.ctr_threshold_default=0.1"])
    report = json.loads((tmp_path / "examples" / "report.json").read_text())
    bias = report["position_bias"]
    assert bias["settings"]["min_dwell_ms"] == 0.0
    c = bias["selection"]
    assert set(c) == set(selection.SelectionComparison._fields)
    # The demo's noisy ranker shows each pair at varying positions, so dividing by expected examinations reorders
    # clicked images of a query: the raw CTR order is not the debiased one on a visible share of image pairs
    # (9-10 % in four small worlds, seeds 20261122, 7, 11 and ranker_quality_weight 0, 0.3, 1; the floor is 1 %).
    assert 0 < c["clicked_pairs"] <= c["pairs"] == report["pairs"]
    assert 0 < c["rank_changed"] < c["clicked_pairs"]
    assert 0.01 < c["discordant_image_pairs"] / c["clicked_image_pairs"] < 1
    # Expected examinations <= impressions: the debiased CTR clears the threshold for pairs shown deep whose raw
    # CTR does not; those pairs are selected by the debiased figures only.  (The few selected by the raw figures
    # only are top-N's: queries with more than 50 clicked images, ranked by clicks vs inverse-propensity clicks.)
    assert c["selected_both"] <= c["selected_raw"] and c["selected_both"] < c["selected_debiased"]
    assert c["selected_debiased"] == report["selected_pairs"]
    # The truth the fit is measured against: P(examined) falls with the position, from 1 at the top.
    manifest = json.loads((tmp_path / "raw" / "manifest.json").read_text())
    truth = manifest["examination_propensities"]
    max_impressions = manifest["config"]["max_impressions"]
    assert sorted(map(int, truth)) == list(range(1, max_impressions + 1))
    values = [truth[str(p)] for p in range(1, max_impressions + 1)]
    assert values[0] == 1.0 and all(a > b > 0 for a, b in zip(values, values[1:]))


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
