"""The log-record and catalog contracts: what is accepted, what is refused and why."""

import json

import pytest

from clicklens.catalog import read_catalog, resolve_uri, uri_resolver
from clicklens.errors import BadRecord
from clicklens.log_schema import MAX_QUERY_CHARS, parse_log_line
from clicklens.queries import MAX_QUERY_INPUT_BYTES, normalize_query


def _line(**overrides) -> bytes:
    record = {"session_id": "s1", "time": 1.0, "query": "红色 圆形", "category": "color_shape", "locale": "zh",
              "impressions": [{"image_id": "img_1", "position": 1, "clicked": True, "dwell_ms": 1200}]}
    record.update(overrides)
    record = {k: v for k, v in record.items() if v is not ...}
    try:
        return json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate can only be written as a JSON escape
        return json.dumps(record).encode("utf-8")


def test_chinese_query_round_trips():
    record = parse_log_line(_line())
    assert record.query == "红色 圆形"
    assert parse_log_line(record.to_json()) == record


def test_normalization_folds_width_case_and_spaces_but_keeps_cjk():
    assert normalize_query("  ＲＥＤ\u3000Circle ") == "red circle"
    assert normalize_query("红色　圆形") == "红色 圆形"
    assert normalize_query("Κόκκινο") == "κόκκινο"


def test_a_long_query_is_refused_before_normalising_only_when_no_query_could_be_that_long():
    # Spaces fold away: a long raw query with a short normal form is a good record.
    assert parse_log_line(_line(query="red" + " " * (MAX_QUERY_INPUT_BYTES - 10) + "circle")).query == "red circle"
    # Alternating combining marks of two classes make NFKC's reordering quadratic: these 256 Ki characters
    # (a 512 KiB line) take Python's NFKC about 13 s, so they are refused before it runs.
    marks = "a" + "\u0301\u0316" * (1 << 17)
    with pytest.raises(BadRecord) as err:
        parse_log_line(_line(query=marks))
    assert err.value.reason == "query_too_long" and "before normalisation" in str(err.value)


@pytest.mark.parametrize("line, reason", [
    (b"\xff\xfe not utf-8", "not_utf8"),
    (b"", "empty_line"),
    (b"{not json", "bad_json"),
    (b"[1, 2]", "not_an_object"),
    (_line(query="   "), "empty_query"),
    (_line(query="字" * (MAX_QUERY_CHARS + 1)), "query_too_long"),
    (_line(query="red\ud800"), "not_utf8"),  # valid JSON (an escape), but no Unicode text
    (_line(session_id="s\udc80"), "not_utf8"),
    (_line(impressions=[{"image_id": "img\ud800", "position": 1, "clicked": True}]), "not_utf8"),
    (_line(query=..., query_image_id=None), "missing_query"),
    (_line(query_image_id="img_2"), "both_query_and_image"),
    (_line(session_id=""), "bad_session_id"),
    (_line(time="yesterday"), "bad_time"),
    (_line(impressions=[]), "no_impressions"),
    (_line(impressions=[{"image_id": "img_1", "position": 0, "clicked": True}]), "bad_impression"),
    (_line(impressions=[{"image_id": "img_1", "position": 1, "clicked": "yes"}]), "bad_impression"),
])
def test_bad_lines_name_their_reason(line, reason):
    with pytest.raises(BadRecord) as err:
        parse_log_line(line)
    assert err.value.reason == reason


def test_read_catalog_reports_bad_lines_and_skips_blanks(tmp_path):
    path = tmp_path / "catalog.jsonl"
    path.write_bytes(b'{"image_id": "a", "uri": "images/a.png"}\n\n{"image_id": ""}\n\xff\n'
                     b'{"image_id": "b", "features": [0.5, 1]}\n'
                     b'{"image_id": "c\\ud800", "uri": "c.png"}\n'  # an escaped lone surrogate: no Unicode text
                     b'{"image_id": "\\ud83d\\ude00", "uri": "d.png"}\n')  # an escaped pair: an emoji, kept
    bad = []
    entries = list(read_catalog(str(path), on_bad=lambda line, err: bad.append(err.reason)))
    assert [e.image_id for e in entries] == ["a", "b", "\U0001F600"]
    assert entries[1].features == (0.5, 1.0)
    assert bad == ["bad_image_id", "not_utf8", "not_utf8"]
    assert resolve_uri(entries[0].uri, str(path)) == str(tmp_path / "images" / "a.png")
    assert resolve_uri("gs://b/x.png", str(path)) == "gs://b/x.png"


@pytest.mark.parametrize("catalog", ["/a/b/catalog.jsonl", "catalog.jsonl", "./c.jsonl", "rel/dir/c.jsonl",
                                     "/c.jsonl", "a//b/c.jsonl", "../up/c.jsonl", "gs://bucket/x/c.jsonl"])
def test_the_catalogs_uri_resolver_agrees_with_resolve_uri(catalog):
    resolve = uri_resolver(catalog)
    for uri in ["images/x.png", "x.png", "./x.png", "../x.png", "a/../b.png", "/abs/x.png", "gs://b/y.png",
                ".hidden/x.png", "a//b.png", "dir/", "", "a/.b/c.png", "图片/猫.png"]:
        assert resolve(uri) == resolve_uri(uri, catalog), uri
