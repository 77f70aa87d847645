"""Training and serving prepare inputs with one function each, and the two sides agree.

- Queries: `clicklens.queries.normalize_query` (Python: pipeline, generator,
  tools) and `normalize_queries` (graph ops: the tokenizer inside training and
  every exported query signature) give the same bytes for arbitrary text.
- Images: an image that went through the pipeline (LoadImages -> stored PNG
  -> the trainer's input decoding) has the pixels and the embedding that the
  exported `image_encoder` computes from the original upload.
"""

import io
import json
import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from clicklens import compat  # noqa: F401
import tensorflow as tf

from clicklens import servables
from clicklens.config import config_from_dict
from clicklens.queries import WHITESPACE, normalize_queries, normalize_query

# ---------------------------------------------------------------------------
# Queries.

CJK = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)
FULL_WIDTH_LATIN = st.characters(min_codepoint=0xFF01, max_codepoint=0xFF5E)
MIXED_CASE_LATIN = st.sampled_from("AaBbZzÄäÉéÇçßẞİıΣσςΚκДдǅǰ")
ODD_WHITESPACE = st.sampled_from(" \t\n\x0b\x0c\r\x1c\x85\xa0\u1680\u2002\u2009\u200a\u2028\u202f\u205f\u3000")
COMBINING_MARKS = st.characters(min_codepoint=0x0300, max_codepoint=0x036F)
INVISIBLES = st.sampled_from("\u00ad\u200b\u200c\u200d\u200e\u2060\ufeff\ufe0f")
ANY_ASSIGNED = st.characters(exclude_categories=("Cs", "Cn"))
QUERY_TEXT = st.text(st.one_of(CJK, FULL_WIDTH_LATIN, MIXED_CASE_LATIN, ODD_WHITESPACE, COMBINING_MARKS,
                               INVISIBLES, ANY_ASSIGNED), max_size=40)


def graph_normalize(texts):
    return [b.decode("utf-8") for b in normalize_queries(tf.constant([t.encode("utf-8") for t in texts])).numpy()]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(QUERY_TEXT, min_size=1, max_size=16))
def test_graph_and_python_query_normalisation_agree(texts):
    assert graph_normalize(texts) == [normalize_query(t) for t in texts]


def test_normalisation_examples_both_sides():
    cases = {"  ＲＥＤ\u3000Circle ": "red circle", "红色　圆形": "红色 圆形", "Κόκκινο": "κόκκινο",
             "Stra\u00dfe": "strasse", "zero\u200bwidth": "zerowidth", "e\u0301": "é", "a\t\n\u2028b": "a b", "": ""}
    assert [normalize_query(t) for t in cases] == list(cases.values())
    assert graph_normalize(list(cases)) == list(cases.values())


def test_whitespace_is_what_python_splits_on():
    """The explicit whitespace class equals str.isspace(), so the two sides split where Python would."""
    ours = {chr(c) for lo, hi in WHITESPACE for c in range(lo, hi + 1)}
    python = {chr(c) for c in range(0x110000) if chr(c).isspace()}
    assert ours == python


def test_every_assigned_code_point_folds_the_same_on_both_sides():
    """All ~280k code points Python's Unicode database knows, one string each, in a few batched calls."""
    code_points = [chr(c) for c in range(0x110000)
                   if not 0xD800 <= c <= 0xDFFF and unicodedata.category(chr(c)) != "Cn"]
    mismatches = []
    for start in range(0, len(code_points), 50000):
        chunk = code_points[start:start + 50000]
        for text, graph in zip(chunk, graph_normalize(chunk)):
            if graph != normalize_query(text):
                mismatches.append(hex(ord(text)))
    assert mismatches == []


# ---------------------------------------------------------------------------
# Images.

IMAGE_SIZE = 12


def _encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def _odd_images():
    """{name: encoded bytes}: non-square, odd-sized, greyscale, palette, RGBA, GIF and JPEG images."""
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 61, 3), dtype=np.uint8))
    tall = Image.fromarray(np.tile(np.linspace(0, 255, 53, dtype=np.uint8)[:, None, None], (1, 19, 3)))
    grey = Image.fromarray(rng.integers(0, 256, (23, 41), dtype=np.uint8), mode="L")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    rgba = Image.fromarray(np.dstack([np.asarray(tall), np.full((53, 19), 128, np.uint8)]), mode="RGBA")
    return {"wide_rgb.png": _encoded(rgb, "PNG"), "tall.png": _encoded(tall, "PNG"),
            "grey.png": _encoded(grey, "PNG"), "palette.png": _encoded(palette, "PNG"),
            "rgba.png": _encoded(rgba, "PNG"), "palette.gif": _encoded(palette, "GIF"),
            "wide.jpg": _encoded(rgb, "JPEG"), "square.bmp": _encoded(rgb.crop((0, 0, 30, 30)), "BMP")}


@pytest.fixture(scope="module")
def pipeline_and_upload(tmp_path_factory):
    """The odd images as the pipeline stores them (LoadImages in a real Beam run) and as uploaded."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from beam_pipelines import images as image_stage
    from clicklens.catalog import CatalogEntry

    root = tmp_path_factory.mktemp("parity")
    uploads = _odd_images()
    entries = []
    for name, data in uploads.items():
        (root / name).write_bytes(data)
        entries.append(CatalogEntry(image_id=name, uri=name))
    catalog = str(root / "catalog.jsonl")
    (root / "catalog.jsonl").write_text("\n".join(e.to_json() for e in entries) + "\n", encoding="utf-8")
    output = root / "stored.jsonl"
    with beam.Pipeline(runner=FnApiRunner()) as p:
        loaded = (p | beam.Create(entries)
                  | image_stage.LoadImages(catalog, "pixels", IMAGE_SIZE))
        (loaded[image_stage.IMAGES]
         | beam.MapTuple(lambda image_id, png: json.dumps([image_id, png.hex()]))
         | beam.io.WriteToText(str(output), shard_name_template=""))
    stored = {image_id: bytes.fromhex(png) for image_id, png in map(json.loads, output.read_text().splitlines())}
    assert set(stored) == set(uploads), "every odd image must survive the pipeline"
    return stored, uploads


def _training_pixels(config, png_bytes):
    """What the trainer's input pipeline feeds the image tower for stored PNGs."""
    from trainer import input as model_input

    return model_input.image_batch(config, tf.constant(png_bytes)).numpy()


def test_pipeline_and_served_graph_prepare_the_same_pixels(pipeline_and_upload):
    from clicklens.images import prepare_images

    stored, uploads = pipeline_and_upload
    config = config_from_dict({"pipeline": {"image_size": IMAGE_SIZE}})
    names = sorted(uploads)
    trained_on = _training_pixels(config, [stored[n] for n in names])
    served = prepare_images(tf.constant([uploads[n] for n in names]), IMAGE_SIZE).numpy()
    assert trained_on.shape == served.shape == (len(names), IMAGE_SIZE, IMAGE_SIZE, 3)
    # The stored PNG rounds each channel to 1/255; nothing else may differ (no crop-vs-squash, no colour shift).
    np.testing.assert_allclose(trained_on, served, atol=0.5 / 255 + 1e-6)
    for name, image in zip(names, trained_on):
        assert image.std() > 0.01, f"{name} came out blank"


def test_non_square_images_are_centre_cropped_not_squashed(pipeline_and_upload):
    """A vertical gradient 53 high, 19 wide: after a centre crop the middle 19 rows remain, so the
    prepared image spans only part of the gradient (a squash would span it all)."""
    stored, _ = pipeline_and_upload
    column = np.asarray(Image.open(io.BytesIO(stored["tall.png"])).convert("L"), np.float32)[:, IMAGE_SIZE // 2]
    expected_span = 255.0 * 19 / 53
    assert column.max() - column.min() == pytest.approx(expected_span, abs=255.0 / 53 * 2)


def test_exported_image_encoder_gives_the_training_embedding(pipeline_and_upload, tmp_path):
    """A real exported image_encoder SavedModel on the raw uploads vs the tower on the pipeline's pixels."""
    from trainer import export_signatures as sigs
    from trainer.model import build_image_tower

    stored, uploads = pipeline_and_upload
    config = config_from_dict({"pipeline": {"image_size": IMAGE_SIZE},
                               "model": {"embedding_dim": 8, "cnn_filters": [4, 8]}})
    tf.keras.utils.set_random_seed(1)
    tower = build_image_tower(config)
    encoders = sigs.Encoders(None, None, tower, "pixels", IMAGE_SIZE)
    module = sigs.ImageEncoder(encoders)
    path = str(tmp_path / "image_encoder" / "1")
    tf.saved_model.save(module, path, signatures=module.signatures())
    serve = tf.saved_model.load(path).signatures[servables.TEXT_SIGNATURE]

    names = sorted(uploads)
    served = serve(**{servables.IMAGE_BYTES: tf.constant([uploads[n] for n in names])})[servables.EMBEDDING].numpy()
    trained = tower(_training_pixels(config, [stored[n] for n in names]), training=False).numpy()
    cosine = np.sum(served * trained, axis=1)  # both towers end in L2 normalisation
    assert np.all(cosine > 0.999), dict(zip(names, cosine.round(5)))
