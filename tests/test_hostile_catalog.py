"""Hostile catalogs and inputs for `clicklens reindex` and the embedding tools (cluster-queries, label-images,
plot-embeddings): every bad line or image is a dead letter (reindex) or a counted warning (tools) with its
reason, every other image is indexed once, and nothing ends in a Python traceback.

The reindex and tools tests run the real verbs on copies of the demo chain's work directory (the shared
chain is never changed).  Covered elsewhere: bad JSON, a non-image file, a missing file and a duplicate id
in reindex (test_reindex.py); bombs and truncated headers in the image preparer (test_untrusted_images.py).
"""

import gzip
import json
import pathlib
import shutil
import struct
import zlib

import pytest

from tests.conftest import DEMO_CONFIG, SMALL_WORLD, run_verb
from tests.test_reindex import catalog_lines, copy_workdir, report
from clicklens import compat  # noqa: F401  (before TensorFlow)
from clicklens import corpus_embeddings, servables
from clicklens.catalog import CatalogEntry
from clicklens.errors import ClicklensError
from trainer import catalog_scan

SURROGATE_LINE = '{"image_id": "lone \\ud800 surrogate", "uri": "images/%s"}'


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels in a few hundred bytes (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def cli_main(verb, root, *extra, capsys):
    """(exit code, stderr) of `clicklens VERB` on the small world; never a traceback."""
    from clicklens import cli

    sets = [a for o in SMALL_WORLD for a in ("--set", o)]
    code = cli.main([verb, "--config", DEMO_CONFIG, "--workdir", str(root), *sets, *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


# ---------------------------------------------------------------------------
# The catalog scan alone (no demo chain).


def test_scan_dead_letters_each_hostile_line_and_keeps_odd_but_valid_ids(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(b"png bytes")
    (images / "a_folder").mkdir()
    odd_ids = ["L" * 10_240, "ctl\x01\x07", "图片 一"]
    lines = [b"not json", b'\xff\xfe{"image_id": "x"}', b'{"uri": "images/ok.png"}', b'{"image_id": "no uri"}',
             (SURROGATE_LINE % "ok.png").encode(), b'{"image_id": "folder", "uri": "images/a_folder"}',
             b'{"image_id": "gone", "uri": "images/gone.png"}', b'{"image_id": "dup", "uri": "images/ok.png"}',
             b'{"image_id": "dup", "uri": "images/other.png"}']
    lines += [json.dumps({"image_id": i, "uri": "images/ok.png"}, ensure_ascii=False).encode() for i in odd_ids]
    path = tmp_path / "catalog.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    scan = catalog_scan.scan_catalog(str(path), "pixels", 0)
    assert [i.entry.image_id for i in scan.images] == ["dup"] + odd_ids
    assert scan.images[0].entry.uri == "images/ok.png"  # the pipeline's rule picks one entry per id
    reasons = sorted((d["source"], d["reason"], d.get("image_id")) for d in scan.dead_letters)
    assert reasons == sorted([
        ("catalog", "bad_json", None), ("catalog", "not_utf8", None), ("catalog", "bad_image_id", None),
        ("catalog", "no_image", None), ("catalog", "not_utf8", None), ("catalog", "duplicate_image_id", None),
        ("image", "missing_image", "folder"), ("image", "missing_image", "gone")])
    surrogate = next(d for d in scan.dead_letters if "surrogate" in d["raw"])
    assert "lone surrogate" in surrogate["detail"]
    assert next(d for d in scan.dead_letters if d.get("image_id") == "folder")["detail"].endswith("IsADirectoryError")
    for record in scan.dead_letters:  # each can be written as one UTF-8 JSON line
        json.dumps(record, ensure_ascii=False).encode("utf-8")


def test_a_catalog_that_is_a_folder_or_missing_is_a_clear_error(tmp_path):
    with pytest.raises(ClicklensError, match="is a directory"):
        catalog_scan.scan_catalog(str(tmp_path), "pixels", 0)
    with pytest.raises(ClicklensError, match="not found"):
        catalog_scan.scan_catalog(str(tmp_path / "nope.jsonl"), "pixels", 0)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    scan = catalog_scan.scan_catalog(str(empty), "pixels", 0)
    assert (scan.images, scan.dead_letters, scan.lines) == ([], [], 0)


# ---------------------------------------------------------------------------
# `clicklens reindex` over a copy of the demo chain.


def test_reindex_dead_letters_hostile_images_and_ids_and_indexes_the_rest_once(demo_exported, tmp_path, capsys):
    w = copy_workdir(demo_exported, tmp_path / "w")
    images = pathlib.Path(w.images)
    lines = catalog_lines(w)
    first = json.loads(lines[0])
    good = (pathlib.Path(w.raw) / first["uri"]).read_bytes()
    (images / "zero.png").write_bytes(b"")
    (images / "truncated.png").write_bytes(good[:len(good) // 2])
    (images / "text.png").write_bytes("not an image, 图片\n".encode())
    (images / "bomb.png").write_bytes(png_header(40_000, 40_000))
    (images / "folder").mkdir()
    hostile = {"zero": "corrupt_image", "truncated": "corrupt_image", "text": "corrupt_image",
               "bomb": "image_too_large", "folder": "missing_image", "gone": "missing_image"}
    extra = [CatalogEntry(i, f"images/{i}.png" if i != "folder" else "images/folder").to_json() for i in hostile]
    odd_ids = ["L" * 10_240, "ctl\x01\x07", "图片 一"]  # valid, odd: indexed (a copy of the first image's file)
    extra += [CatalogEntry(i, first["uri"]).to_json() for i in odd_ids]
    extra += [SURROGATE_LINE % pathlib.Path(first["uri"]).name, '{"image_id": "no uri"}']
    pathlib.Path(w.catalog).write_bytes("".join(line + "\n" for line in lines + extra).encode("utf-8") + b"\xff\n")

    code, err = cli_main("reindex", w.root, capsys=capsys)
    assert code == 0, err
    r = report(w)
    dead = [json.loads(line) for line in pathlib.Path(r["dead_letters_file"]).read_text("utf-8").splitlines()]
    by_id = {d["image_id"]: d["reason"] for d in dead if d["source"] == "image"}
    assert {i: by_id[i] for i in hostile} == hostile
    assert sorted(d["reason"] for d in dead if d["source"] == "catalog") == ["no_image", "not_utf8", "not_utf8"]
    _, rows = corpus_embeddings.read_latest(w.corpus_embeddings)
    ids = [i.decode("utf-8") for i in rows.ids]
    assert len(ids) == len(set(ids)) and set(odd_ids) <= set(ids) and not set(hostile) & set(ids)
    # Nothing lost: every id of the catalog is indexed or dead-lettered.
    catalog_ids = {json.loads(line)["image_id"] for line in lines} | set(hostile) | set(odd_ids)
    assert catalog_ids == set(ids) | set(by_id)
    assert r["images"] == len(ids) and r["dead_lettered"]["total"] == len(dead)


@pytest.mark.parametrize("catalog", [b"", b"not json\n" + b'{"image_id": "gone", "uri": "images/gone.png"}\n'])
def test_reindex_of_a_catalog_with_no_usable_image_keeps_the_served_versions(demo_exported, tmp_path, capsys,
                                                                              catalog):
    w = copy_workdir(demo_exported, tmp_path / "w")
    before = servables.latest_version(w.export_model(servables.RETRIEVAL_SCANN))[0]
    pathlib.Path(w.catalog).write_bytes(catalog)
    code, err = cli_main("reindex", w.root, capsys=capsys)
    assert code == 2 and "no usable image" in err and "the served versions stay" in err
    if catalog:
        assert "1 catalog/bad_json, 1 image/missing_image" in err
    for name in servables.RETRIEVAL_MODELS:
        assert servables.latest_version(w.export_model(name))[0] == before


# ---------------------------------------------------------------------------
# The tools over a copy of the demo chain's raw/ and export/.


def copy_for_tools(source, root: pathlib.Path) -> pathlib.Path:
    shutil.copytree(source.raw, root / "raw")
    shutil.copytree(source.export, root / "export")
    return root


def log_line(query: str) -> bytes:
    return json.dumps({"session_id": "s", "time": 1.0, "query": query,
                       "impressions": [{"image_id": "img_00001", "position": 1, "clicked": True}]},
                      ensure_ascii=False).encode("utf-8")


def test_tools_leave_out_hostile_catalog_entries_and_log_lines(demo_exported, tmp_path, capsys, caplog):
    root = copy_for_tools(demo_exported, tmp_path / "w")
    raw = root / "raw"
    first = json.loads(catalog_lines(demo_exported)[0])
    (raw / "images" / "folder").mkdir()
    (raw / "images" / "zero.png").write_bytes(b"")
    with open(raw / "catalog.jsonl", "ab") as f:
        f.write(b'{"image_id": "folder", "uri": "images/folder"}\n{"image_id": "zero", "uri": "images/zero.png"}\n'
                + (SURROGATE_LINE % pathlib.Path(first["uri"]).name).encode() + b"\n\xff\xfe\nnot json\n"
                + json.dumps({"image_id": first["image_id"], "uri": "images/zero.png"}).encode() + b"\n"
                + json.dumps({"image_id": "图片 一", "uri": first["uri"]}, ensure_ascii=False).encode() + b"\n")
    (raw / "logs" / "part-9.jsonl").write_bytes(
        b"\xff\xfe not utf-8\n" + b"x" * (2 << 20) + b"\n" + log_line("q" * 100_000) + b"\n"
        + b'{"session_id": "s", "time": 1, "query": "lone \\ud800", "impressions": []}\n' + log_line("紫色 星星") + b"\n")

    output = tmp_path / "labels.json"
    run_verb("label-images", root, "--output", str(output))
    result = json.loads(output.read_text("utf-8"))
    ids = [i["image_id"] for i in result["images"]]
    assert len(ids) == len(set(ids)) and "图片 一" in ids and not {"folder", "zero"} & set(ids)
    assert any("catalog lines or images left out" in m and "duplicate_image_id" in m and "missing_image" in m
               and "not_utf8" in m for m in caplog.messages)
    run_verb("cluster-queries", root, "--output", str(tmp_path / "clusters.json"))
    clusters = json.loads((tmp_path / "clusters.json").read_text("utf-8"))
    queries = {q["query"] for c in clusters["clusters"] for q in c["queries"]}
    assert "紫色 星星" in queries and not any(len(q) > 1000 or "\ud800" in q for q in queries)
    run_verb("plot-embeddings", root, "--output", str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")


def test_tools_on_one_query_a_damaged_log_or_a_folder_as_output(demo_exported, tmp_path, capsys):
    root = copy_for_tools(demo_exported, tmp_path / "w")
    logs = root / "raw" / "logs"
    for path in logs.iterdir():
        path.unlink()
    (logs / "part-0.jsonl").write_bytes(log_line("紫色 星星") + b"\n")  # one distinct query: one cluster
    code, _ = cli_main("cluster-queries", root, "--output", str(tmp_path / "c.json"), capsys=capsys)
    assert code == 0 and json.loads((tmp_path / "c.json").read_text("utf-8"))["num_clusters"] == 1

    (tmp_path / "a_folder").mkdir()
    for verb in ("cluster-queries", "label-images", "plot-embeddings"):
        code, err = cli_main(verb, root, "--output", str(tmp_path / "a_folder"), capsys=capsys)
        assert code == 2 and "is a directory" in err

    (logs / "part-1.jsonl.gz").write_bytes(gzip.compress(log_line("red star") + b"\n")[:-9])  # cut short
    code, err = cli_main("cluster-queries", root, capsys=capsys)
    assert code == 2 and "part-1.jsonl.gz: damaged gzip file" in err
    (logs / "part-1.jsonl.gz").write_bytes(b"")
    for path in logs.iterdir():
        path.unlink()
    (logs / "part-0.jsonl").write_bytes(b"")
    code, err = cli_main("label-images", root, capsys=capsys)
    assert code == 2 and "no text queries" in err
