"""Unit tests of the pipeline's transforms, each alone, against numbers computed by hand."""

import base64
import io
import json
import math

import apache_beam as beam
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipelines import dead_letters, graph, images, neighbors, outputs, parse, record_coder, selection, split, vocab
from beam_pipelines.click_stats import PairStats, QueryClickStats, QueryStats
from clicklens.log_schema import Impression, LogRecord


def beam_pipeline():
    """A TestPipeline on the FnApiRunner (the DirectRunner would first try to download Prism)."""
    return BeamTestPipeline(runner=FnApiRunner())


def text_event(query, shown, clicked=(), category="", session="s"):
    return LogRecord(session_id=session, time=0.0, query=query, category=category,
                     impressions=tuple(Impression(img, i + 1, img in clicked) for i, img in enumerate(shown)))


def image_event(source, shown, clicked=()):
    return LogRecord(session_id="s", time=0.0, query_image_id=source,
                     impressions=tuple(Impression(img, i + 1, img in clicked) for i, img in enumerate(shown)))


# --------------------------------------------------------------------------- stage 1: parsing


GOOD_LINE = json.dumps({"session_id": "s1", "time": 1.0, "query": "  Red  CIRCLE ", "category": "Color",
                        "impressions": [{"image_id": "a", "position": 1, "clicked": True}]}).encode()


def test_parse_or_dead_letter_keeps_raw_and_reason():
    record, bad = parse.parse_or_dead_letter(GOOD_LINE)
    assert bad is None and record.query == "red circle" and record.category == "color"
    _, bad = parse.parse_or_dead_letter(b"{not json")
    assert bad == {"source": "log", "reason": "bad_json", "raw": "{not json", "detail": bad["detail"]}
    _, bad = parse.parse_or_dead_letter(b"\xff\xfe{}")
    assert bad["reason"] == "not_utf8" and bad["raw_encoding"] == "base64"
    assert base64.b64decode(bad["raw"]) == b"\xff\xfe{}"
    json.loads(dead_letters.dead_letter_json(bad))  # always one valid JSON line


def test_parse_logs_transform_splits_good_and_dead_letters():
    with beam_pipeline() as p:
        # A lone surrogate in a JSON escape is valid JSON but no Unicode text: the record coder (UTF-8) would
        # fail on it at the next stage boundary, and the whole run with it.
        surrogate = GOOD_LINE.replace(b"CIRCLE", b"CIRCLE\\ud800")
        out = p | beam.Create([GOOD_LINE, b"[1, 2]", b"", "红色".encode("gbk"), surrogate]) | parse.ParseLogs()
        assert_that(out[parse.RECORDS] | beam.Map(lambda r: r.query), equal_to(["red circle"]), label="good")
        assert_that(out[dead_letters.DEAD_LETTER] | beam.Map(lambda d: d["reason"]),
                    equal_to(["not_an_object", "empty_line", "not_utf8", "not_utf8"]), label="bad")


def test_parsed_records_cross_stages_in_the_log_record_coder_not_pickle():
    records = [
        LogRecord("s1", 1.5, (Impression("a", 1, True, 2500.0), Impression("b", 2, False)), query="红色 圆形",
                  category="color", locale="zh"),
        LogRecord("s2", 0.0, (Impression("c", 7, False),), query_image_id="a"),
    ]
    coder = record_coder.LogRecordCoder()
    for record in records:
        assert coder.decode(coder.encode(record)) == record
    assert coder.encode(records[0]) != coder.encode(records[1])
    assert beam.coders.registry.get_coder(LogRecord) == coder
    with beam_pipeline() as p:
        parsed = p | beam.Create([GOOD_LINE]) | parse.ParseLogs()
        assert parsed[parse.RECORDS].element_type is LogRecord
        # A side input makes the records cross a stage boundary, encoded by the coder and decoded again.
        count = parsed[parse.RECORDS] | "Count" >> beam.combiners.Count.Globally()
        out = parsed[parse.RECORDS] | beam.Map(lambda r, n: (r, n), beam.pvalue.AsSingleton(count))
        assert_that(out, equal_to([(parse.parse_log_line(GOOD_LINE), 1)]))


# --------------------------------------------------------------------------- stage 2: click statistics


def test_click_stats_and_query_category():
    events = [
        text_event("red", ["a", "b"], clicked=["a"], category="color"),
        text_event("red", ["b", "c", "a"], clicked=["b"], category="color"),
        text_event("red", ["a"], category=""),
        text_event("blue", ["a"], category="shape"),
        text_event("blue", ["a"], category="color"),
        image_event("a", ["b", "c"], clicked=["b"]),  # query-by-image: not a (query, image) pair
    ]
    with beam_pipeline() as p:
        stats = p | beam.Create(events) | QueryClickStats()
        # a for "red": shown at 1, 3, 1 -> 3 impressions, 1 click, positions 5.
        # "red": color twice, "" once -> color; "blue": tie 1-1 -> the smaller name.
        assert_that(stats, equal_to([
            ("red", QueryStats("color", 3, {"a": PairStats(3, 1, 5), "b": PairStats(2, 1, 3),
                                            "c": PairStats(1, 0, 2)})),
            ("blue", QueryStats("color", 2, {"a": PairStats(2, 0, 2)})),
        ]))


def test_smoothed_ctr_and_mean_position():
    stats = PairStats(impressions=2, clicks=1, position_sum=3)
    assert stats.mean_position == 1.5
    assert stats.smoothed_ctr(prior=0.05, prior_impressions=10) == pytest.approx((1 + 0.5) / 12)
    assert stats.smoothed_ctr(prior=0.0, prior_impressions=0) == 0.5


# --------------------------------------------------------------------------- stage 3: selection

RAW_CTR = dict(ctr_prior=0.0, ctr_prior_impressions=0.0)  # CTR = clicks / impressions, easy to check


def test_ctr_threshold_per_category_with_default():
    rules = selection.SelectionRules(ctr_threshold_default=0.1, ctr_threshold_by_category=(("color", 0.3),),
                                     **RAW_CTR)
    shown = [("a", PairStats(10, 3, 10)), ("b", PairStats(10, 5, 10)), ("c", PairStats(10, 1, 10))]
    # color: threshold 0.3 -> a (0.3, not above) and c (0.1) out.
    assert [s.image_id for s in selection.select_for_query("red", "color", shown, rules)] == ["b"]
    # unknown category: default 0.1 -> c (0.1, not above) out.
    assert [s.image_id for s in selection.select_for_query("red", "shape", shown, rules)] == ["b", "a"]


def test_top_n_min_clicks_and_click_weight():
    rules = selection.SelectionRules(top_n_per_query=2, min_clicks=2, **RAW_CTR)
    shown = [("a", PairStats(10, 4, 10)), ("b", PairStats(5, 4, 10)), ("c", PairStats(10, 5, 10)),
             ("d", PairStats(1, 1, 1))]
    selected = selection.select_for_query("q", "", shown, rules)
    # c has most clicks; a and b tie on 4 clicks, b has the higher CTR (0.8 > 0.4); d has < 2 clicks.
    assert [s.image_id for s in selected] == ["c", "b"]
    assert [s.click_weight for s in selected] == [pytest.approx(math.log(6)), pytest.approx(math.log(5))]


def test_entity_cap_applies_only_to_matching_queries():
    rules = selection.SelectionRules(entity_patterns=(r"^taylor\b", "明星"), entity_cap=1, **RAW_CTR)
    shown = [(f"i{k}", PairStats(10, 10 - k, 10)) for k in range(4)]
    assert len(selection.select_for_query("taylor swift", "", shown, rules)) == 1
    assert len(selection.select_for_query("明星 照片", "", shown, rules)) == 1
    assert len(selection.select_for_query("red taylor", "", shown, rules)) == 4


def test_hard_negatives_are_shown_but_never_clicked_most_shown_first():
    rules = selection.SelectionRules(hard_negatives=2, **RAW_CTR)
    shown = [("pos", PairStats(5, 2, 5)), ("n1", PairStats(3, 0, 9)), ("n2", PairStats(7, 0, 9)),
             ("n3", PairStats(3, 0, 9)), ("clicked", PairStats(9, 1, 9))]
    (first, *_) = selection.select_for_query("q", "", shown, rules)
    assert first.negatives == ("n2", "n1")


def test_select_pairs_applies_each_querys_category():
    rules = selection.SelectionRules(ctr_threshold_by_category=(("color", 0.6),), **RAW_CTR)
    with beam_pipeline() as p:
        stats = p | beam.Create([("red", QueryStats("color", 2, {"a": PairStats(2, 1, 2), "b": PairStats(1, 1, 1)})),
                                 ("blue", QueryStats("", 1, {"a": PairStats(2, 1, 2)}))])
        out = stats | beam.ParDo(selection.SelectPairsFn(rules))
        assert_that(out | beam.Map(lambda s: (s.query, s.category, s.image_id)),
                    equal_to([("red", "color", "b"), ("blue", "", "a")]))


# --------------------------------------------------------------------------- stage 4: graph

GRAPH_EVENTS = [
    text_event("x", ["a", "b", "c"], clicked=["a", "b"]),
    text_event("y", ["a", "b"], clicked=["a"]),
    image_event("a", ["b", "c"], clicked=["b"]),
    image_event("b", ["a"]),
]


# (d, e): shown together in 4 lists, co-clicked in 1; (d, f), (e, f): shown together 4 times, never co-clicked.
OFTEN_SHOWN_EVENTS = [text_event("z", ["d", "e", "f"], clicked=["d", "e"])] + [text_event("z", ["e", "d", "f"])] * 3


@pytest.mark.parametrize("max_pairs", [graph.CountPairsInBundleFn.MAX_PAIRS, 1])
def test_edge_stats_coclick_and_similar_click_rates(max_pairs, monkeypatch):
    # max_pairs=1: the per-bundle counts are flushed after every record; they add up the same.
    monkeypatch.setattr(graph.CountPairsInBundleFn, "MAX_PAIRS", max_pairs)
    with beam_pipeline() as p:
        stats = p | beam.Create(GRAPH_EVENTS + OFTEN_SHOWN_EVENTS) | graph.ComputeEdgeStats()
        # (a,b): shown together in the 2 text lists (the image list of "a" shows b, c: a is the query, not
        # shown), co-clicked in x; similar: b shown for a (clicked), a shown for b (not) -> 2 shown, 1 click.
        # (a,c): co-shown in x but never co-clicked, so co_shown is not counted; c shown for a, not clicked.
        # (b,c): co-shown twice, never co-clicked, no similar-image event: no stats at all.
        # (d,e): co-shown 4 times, co-clicked once -> co-click rate 1/4.
        assert_that(stats, equal_to([
            (("a", "b"), graph.EdgeStats(2, 1, 2, 1)),
            (("a", "c"), graph.EdgeStats(0, 0, 1, 0)),
            (("d", "e"), graph.EdgeStats(4, 1, 0, 0)),
        ]))


def test_coclick_rate_is_one_over_co_shown_and_never_co_clicked_pairs_get_no_edge():
    with beam_pipeline() as p:
        click_edges = p | beam.Create(GRAPH_EVENTS + OFTEN_SHOWN_EVENTS) | graph.ClickEdges(
            coclick_weight=1.0, similar_click_weight=0.5, min_weight=0.1)
        # With no content edges the graph is the click graph, each edge tagged "click".
        graph_out = {graph.CLICK: click_edges, graph.CONTENT: p | "NoContent" >> beam.Create([])} | (
            graph.BuildImageGraph(content_weight=0.5, max_neighbors=2))
        # (a,b) = 1/2 + 0.5 * 1/2; (d,e) = 1/4; (a,c) weighs 0; (b,c), (d,f), (e,f) were never co-clicked.
        assert_that(click_edges, equal_to([(("a", "b"), 0.75), (("d", "e"), 0.25)]), label="click_edges")
        assert_that(graph_out["edges"], equal_to([(("a", "b"), (0.75, "click")), (("d", "e"), (0.25, "click"))]),
                    label="edges")
        assert_that(graph_out["neighbors"], equal_to([
            ("a", [("b", 0.75)]), ("b", [("a", 0.75)]), ("d", [("e", 0.25)]), ("e", [("d", 0.25)])]),
            label="neighbors")


def test_edge_weight_is_the_configured_linear_combination():
    stats = graph.EdgeStats(co_shown=2, co_clicks=1, similar_shown=4, similar_clicks=1)
    assert stats.coclick_rate == 0.5 and stats.similar_click_rate == 0.25
    assert stats.weight(coclick_weight=1.0, similar_click_weight=2.0) == pytest.approx(0.5 + 0.5)
    assert graph.EdgeStats().weight(1.0, 1.0) == 0.0


def test_each_pair_is_counted_at_its_smaller_id_only():
    text = text_event("x", ["c", "a", "b", "a"], clicked=["b", "c"])
    # The query image b is also shown: it counts as co-shown, but not as its own similar image.
    by_image = image_event("b", ["a", "c", "b"], clicked=["c"])
    counts = {}
    assert graph.add_click_pairs(counts, text) == 1
    assert graph.add_click_pairs(counts, by_image) == 2
    assert set(counts) == {"a", "b"}  # c is the larger id of every pair
    assert counts["b"][graph.CO_CLICKED] == {"c": 1} and not counts["a"][graph.CO_CLICKED]
    assert counts["a"][graph.SIMILAR_SHOWN] == {"b": 1} and counts["a"][graph.SIMILAR_CLICKED] == {"b": 0}
    assert counts["b"][graph.SIMILAR_SHOWN] == {"c": 1} and counts["b"][graph.SIMILAR_CLICKED] == {"c": 1}
    shown = graph.ShownPairs()
    for event in (text, by_image):
        assert graph.shown_images(event) == ["a", "b", "c"]
        shown.add(graph.shown_images(event))
    shown.add(["d"])  # a list of one image has no pair
    assert shown.size == 6
    assert shown.counts_by_image() == {"a": {"b": 2, "c": 2}, "b": {"c": 2}}
    for a, shown_with in shown.counts_by_image().items():
        counts[a][graph.SHOWN].update(shown_with)
    pair_counts = graph.PairCountsFn()

    def edge_stats(image_id):
        # Two bundles' counts of the same image merge to the counts of one.
        bundles = [pair_counts.add_input(pair_counts.create_accumulator(), counts[image_id]),
                   pair_counts.create_accumulator()]
        return sorted(pair_counts.extract_output(pair_counts.compact(pair_counts.merge_accumulators(bundles))))

    # (a,b), (a,c): shown together twice, never co-clicked, so "both shown" is not kept; b shown for a's image.
    assert edge_stats("a") == [("b", graph.EdgeStats(0, 0, 1, 0))]
    # (b,c): shown together twice, co-clicked once in x, c shown once for b and clicked.
    assert edge_stats("b") == [("c", graph.EdgeStats(2, 1, 1, 1))]


def test_image_graph_is_symmetric_top_k_above_min_weight():
    with beam_pipeline() as p:
        edges = p | beam.Create([(("a", "b"), 0.9), (("a", "c"), 0.5), (("a", "d"), 0.5), (("c", "d"), 0.2)])
        top = edges | graph.TopNeighbors(k=2)
        # a keeps b and, of the tied c/d, the smaller id c; every edge also appears from its other end.
        assert_that(top, equal_to([
            ("a", [("b", 0.9), ("c", 0.5)]), ("b", [("a", 0.9)]),
            ("c", [("a", 0.5), ("d", 0.2)]), ("d", [("a", 0.5), ("c", 0.2)]),
        ]), label="top")
        stats = p | "Stats" >> beam.Create([(("a", "b"), graph.EdgeStats(2, 1, 0, 0)),
                                            (("a", "c"), graph.EdgeStats(10, 1, 0, 0)),
                                            (("b", "c"), graph.EdgeStats(0, 0, 3, 1))])
        weighted = stats | graph.WeightEdges(coclick_weight=1.0, similar_click_weight=0.5, min_weight=0.15)
        # 0.5 kept; 0.1 < 0.15 dropped; 0.5 * 1/3 = 0.1667 kept.
        assert_that(weighted, equal_to([(("a", "b"), 0.5), (("b", "c"), pytest.approx(1 / 6))]), label="weights")


# --------------------------------------------------------------------------- stages 5-6: joins


def _records_by_key(records):
    return {(r["query"], r["image_id"]): r for r in records}


def test_neighbor_join_pads_drops_bad_slots_and_makes_image_only_nodes():
    pairs = [selection.SelectedPair("red", "color", "a", 1.0, ("n", "gone")),
             selection.SelectedPair("blue", "", "gone", 2.0)]
    nbrs = [("a", [("b", 0.9), ("gone", 0.8), ("c", 0.4)]), ("c", [("a", 0.4)]), ("b", [("a", 0.9)]),
            ("gone", [("a", 0.8)])]
    good = [("a", b"A"), ("b", b"B"), ("c", b"C"), ("n", b"N")]
    with beam_pipeline() as p:
        good_images = p | "Images" >> beam.Create(good)
        links = {"neighbors": p | "Nbrs" >> beam.Create(nbrs), "images": good_images} | neighbors.AttachNeighborImages()
        joined = {"pairs": p | "Pairs" >> beam.Create(pairs), "images": good_images, "neighbors": links,
                  "bad": p | "Bad" >> beam.Create([("gone", "missing_image")])} | neighbors.JoinExamplesPerImage(0.0)
        with_negs = {"examples": joined[neighbors.EXAMPLES], "images": good_images} | neighbors.AttachHardNegatives()
        final = {neighbors.EXAMPLES: with_negs, neighbors.TRAIN_COUNTS: joined[neighbors.TRAIN_COUNTS]} | (
            neighbors.AddCandidateProbability())

        def check(records):
            by_key = _records_by_key(records)
            # "gone" has no image: its example is dropped; as a neighbour its slot is removed; as a negative too.
            assert set(by_key) == {("red", "a"), ("", "b"), ("", "c")}
            red = by_key[("red", "a")]
            assert [(n, w) for n, w, _ in red["neighbors"]] == [("b", 0.9), ("c", 0.4)]
            assert [v for _, _, v in red["neighbors"]] == [b"B", b"C"]
            assert red["negatives"] == [("n", b"N")]
            # b and c are graph nodes with no query: image-only examples, weight 0, train split.
            assert by_key[("", "b")]["click_weight"] == 0.0 and by_key[("", "b")]["split"] == split.TRAIN
            # 3 train examples, one per image.
            assert all(r["candidate_probability"] == pytest.approx(1 / 3) for r in records)

        assert_that(final, check)
        assert_that(joined[neighbors.DROPPED], equal_to([1]), label="dropped")
        assert_that(joined[dead_letters.DEAD_LETTER], equal_to([]), label="no_dead_letter_for_known_bad")


def test_unknown_image_is_dead_lettered_once():
    with beam_pipeline() as p:
        joined = {"pairs": p | "Pairs" >> beam.Create([selection.SelectedPair("q", "", "ghost", 1.0)]),
                  "images": p | "Images" >> beam.Create([]), "neighbors": p | "Nbrs" >> beam.Create([]),
                  "bad": p | "Bad" >> beam.Create([])} | neighbors.JoinExamplesPerImage(0.1)
        assert_that(joined[dead_letters.DEAD_LETTER] | beam.Map(lambda d: (d["reason"], d["image_id"])),
                    equal_to([("not_in_catalog", "ghost")]))


def test_written_example_has_every_slot_padded():
    import tensorflow as tf
    from clicklens import features as F

    spec = F.example_feature_spec("pixels", 0, max_neighbors=3, hard_negatives=2)
    record = neighbors.make_record("红色 圆形", "color", "a", b"A", 1.5, split.TRAIN, [("b", 0.7, b"B")])
    record["negatives"] = [("n", b"N")]
    record["candidate_probability"] = 0.25
    features = outputs.example_features(record, "pixels", max_neighbors=3, hard_negatives=2)
    parsed = tf.io.parse_single_example(F.make_example(features, spec).SerializeToString(), spec)
    assert parsed[F.QUERY].numpy().decode() == "红色 圆形"
    assert parsed[F.neighbor_key(0, F.IMAGE_ID)].numpy() == b"b"
    assert parsed[F.neighbor_weight_key(0)].numpy() == pytest.approx(0.7)
    for i in (1, 2):
        assert parsed[F.neighbor_key(i, F.IMAGE_ID)].numpy() == b""
        assert parsed[F.neighbor_key(i, F.IMAGE)].numpy() == b""
        assert parsed[F.neighbor_weight_key(i)].numpy() == 0.0
    assert parsed[F.negative_key(0, F.IMAGE_ID)].numpy() == b"n"
    assert parsed[F.negative_key(1, F.IMAGE_ID)].numpy() == b""
    # Feature vectors pad with zeros.
    fspec = F.example_feature_spec("features", 2, max_neighbors=2)
    record = neighbors.make_record("q", "", "a", (0.5, 1.0), 1.0, split.TRAIN, [])
    parsed = tf.io.parse_single_example(
        F.make_example(outputs.example_features(record, "features", 2, 0), fspec).SerializeToString(), fspec)
    assert parsed[F.neighbor_key(1, F.IMAGE_FEATURES)].numpy().tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------- stage 7: images


RED, BLUE = (200, 10, 10), (10, 10, 200)


def _png(size=20):
    """A size x 2*size PNG: red in the centre square, blue in the top and bottom quarters."""
    from PIL import Image

    image = Image.new("RGB", (size, size * 2), BLUE)
    image.paste(Image.new("RGB", (size, size), RED), (0, size // 2))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_load_images_resizes_and_dead_letters_missing_and_corrupt(tmp_path):
    import numpy as np
    import tensorflow as tf
    from clicklens.images import prepared_png

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "ok.png").write_bytes(_png())
    (tmp_path / "images" / "bad.png").write_bytes(_png()[:40])
    catalog = str(tmp_path / "catalog.jsonl")
    lines = [json.dumps({"image_id": "ok", "uri": "images/ok.png"}).encode(),
             json.dumps({"image_id": "bad", "uri": "images/bad.png"}).encode(),
             json.dumps({"image_id": "missing", "uri": "images/missing.png"}).encode(),
             json.dumps({"image_id": "ok", "uri": "images/other.png"}).encode(),  # duplicate id
             b"not json"]
    with beam_pipeline() as p:
        cat = p | beam.Create(lines) | images.ReadCatalog()
        loaded = cat["entries"] | images.LoadImages(catalog, "pixels", image_size=8)

        def check_images(elements):
            [(image_id, png)] = elements
            assert image_id == "ok"
            # The core's image preparation, byte for byte: centre crop (the red square), then resize to 8 x 8.
            assert png == prepared_png(_png(), 8)
            pixels = tf.io.decode_png(png, channels=3).numpy().astype(int)
            assert pixels.shape == (8, 8, 3)
            assert np.abs(pixels - np.array(RED)).max() <= 1

        assert_that(loaded[images.IMAGES], check_images, label="good")
        assert_that(loaded[dead_letters.DEAD_LETTER] | beam.Map(lambda d: (d["image_id"], d["reason"])),
                    equal_to([("bad", "corrupt_image"), ("missing", "missing_image")]), label="bad")
        assert_that(cat[dead_letters.DEAD_LETTER] | beam.Map(lambda d: d["reason"]),
                    equal_to(["duplicate_image_id", "bad_json"]), label="catalog")


# --------------------------------------------------------------------------- stage 8: split, vocabulary


def test_query_split_is_stable_and_disjoint():
    queries = [f"query {i}" for i in range(2000)] + ["红色 圆形", ""]
    splits = {q: split.query_split(q, 0.1) for q in queries}
    assert splits == {q: split.query_split(q, 0.1) for q in queries}
    assert splits[""] == split.TRAIN
    assert 0.07 < sum(s == split.EVAL for s in splits.values()) / len(queries) < 0.13
    assert all(split.query_split(q, 0.0) == split.TRAIN for q in queries)


def test_vocabulary_has_reserved_tokens_first_and_every_cjk_character(tmp_path):
    import tensorflow_text as text
    from clicklens import vocabulary as V

    queries = [("red circle", 30), ("红色 圆形", 20), ("large blue square", 12), ("Ｂｌｕｅ 条纹", 11), ("稀有", 1)]
    words = vocab.basic_tokenize([q for q, _ in queries])
    assert words[1] == ["红", "色", "圆", "形"]  # CJK ideographs are single words
    counts = {}
    for (_, n), ws in zip(queries, words):
        for w in ws:
            counts[w] = counts.get(w, 0) + n
    tokens = vocab.learn_vocabulary(counts.items(), vocab_size=200)
    assert tokens[:2] == V.RESERVED_TOKENS
    assert {"red", "circle", "blue", "红", "色", "圆", "形", "条", "纹", "稀", "有"} <= set(tokens)
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(tokens), encoding="utf-8")
    tokenizer = text.BertTokenizer(str(vocab_file), **V.BERT_TOKENIZER_PARAMS)
    ids = tokenizer.tokenize([q for q, _ in queries]).merge_dims(1, -1).to_list()
    assert all(1 not in row for row in ids)  # no [UNK]


def test_learn_vocabulary_transform_counts_query_events():
    # (query, search events) per distinct query, as the click statistics give them.
    with beam_pipeline() as p:
        tokens = p | beam.Create([("red circle", 12), ("红色", 3)]) | vocab.LearnVocabulary(vocab_size=100)

        def check(result):
            [vocabulary] = result
            assert vocabulary[:2] == ["[PAD]", "[UNK]"]
            assert {"red", "circle", "红", "色"} <= set(vocabulary)

        assert_that(tokens, check)


# --------------------------------------------------------------------------- the report's totals


def test_report_totals_sum_each_figure_across_bundles_and_fill_zeros():
    from beam_pipelines import report

    values = {
        "edges": {"edges": report.count, "edges.heavy": lambda e: int(e > 1), "weight": lambda e: e},
        "more_edges": {"edges": report.count},  # a name shared by two inputs adds up
        "nothing": {"nothing": report.count, "nothing.sum": lambda e: e},
    }
    with beam_pipeline() as p:
        edges = p | "Edges" >> beam.Create([1, 2, 3, 0], reshuffle=True)  # may arrive in several bundles
        more = p | "More" >> beam.Create(["x", "y"])
        nothing = p | "Nothing" >> beam.Create([])
        totals = {"edges": edges, "more_edges": more, "nothing": nothing} | report.Totals(values)
        assert_that(totals, equal_to([{"edges": 6, "edges.heavy": 2, "weight": 6, "nothing": 0, "nothing.sum": 0}]))


def test_shown_pairs_counts_lists_of_every_length_like_a_dict_would():
    import collections
    import itertools
    import random

    rng = random.Random(7)
    ids = [f"img_{i:02d}" for i in range(12)]
    shown = graph.ShownPairs()
    expected = collections.defaultdict(collections.Counter)
    for _ in range(200):
        listed = sorted(rng.sample(ids, rng.randint(1, 9)))
        shown.add(listed)
        for a, b in itertools.combinations(listed, 2):
            expected[a][b] += 1
    assert shown.size == sum(sum(c.values()) for c in expected.values())
    assert shown.counts_by_image() == {a: dict(c) for a, c in expected.items()}
