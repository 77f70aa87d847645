"""Untrusted image bytes: the pixel limit read from headers, GIFs cut to their first frame (clicklens/images.py)."""

import io

import numpy as np
import pytest
from PIL import Image

from clicklens import compat  # noqa: F401
import tensorflow as tf

from clicklens import servables
from clicklens.images import MAX_PIXELS, PngPreparer, prepare_image, untrusted_image_bytes

FORMATS = ["PNG", "JPEG", "GIF", "BMP", "WEBP"]


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


@tf.function
def prepare(image_bytes, max_pixels):
    return prepare_image(image_bytes, 8, max_pixels=max_pixels)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_limit_is_read_from_every_formats_header(fmt):
    data = encode(noise(30, 20), fmt)
    assert prepare(data, 600).shape == (8, 8, 3)  # exactly at the limit
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image too large to decode.*\[30\] \[x\] \[20\]"):
        prepare(data, 599)


def test_webp_lossless_and_bmp_top_down_headers():
    lossless = encode(noise(30, 20), "WEBP", lossless=True)
    assert lossless[12:16] == b"VP8L"
    with pytest.raises(tf.errors.InvalidArgumentError, match="too large"):
        prepare(lossless, 599)
    bmp = bytearray(encode(noise(30, 20), "BMP"))
    bmp[22:26] = (-20).to_bytes(4, "little", signed=True)  # a top-down bitmap declares a negative height
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[30\] \[x\] \[20\]"):
        prepare(bytes(bmp), 599)


def test_a_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("1", (20000, 20000)), "PNG", optimize=True)  # 48 KB, 400 megapixels
    assert len(bomb) < 100_000
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[20000\] \[x\] \[20000\].*40000000"):
        prepare(bomb, MAX_PIXELS)
    with pytest.raises(tf.errors.InvalidArgumentError, match="too large"):
        PngPreparer(8)(bomb)


def test_an_animated_gif_is_decoded_as_its_first_frame_only():
    frames = [noise(60, 40, seed).quantize(64) for seed in range(12)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], disposal=2)
    every_frame = tf.io.decode_image(gif, channels=3, expand_animations=True).numpy()
    assert every_frame.shape[0] == 12
    cut = tf.function(untrusted_image_bytes)(gif).numpy()
    assert len(cut) < len(gif) / 5
    first = tf.io.decode_image(cut, channels=3, expand_animations=True).numpy()
    assert first.shape[0] == 1 and np.array_equal(first[0], every_frame[0])
    # the model sees the first frame's pixels, as when TensorFlow decoded every frame
    expected = tf.image.resize(tf.image.convert_image_dtype(every_frame[0], tf.float32)[:, 10:50], [8, 8],
                               antialias=True)
    assert np.allclose(prepare(gif, MAX_PIXELS).numpy(), np.clip(expected.numpy(), 0, 1), atol=1e-6)


def test_a_gif_cut_into_tiny_blocks_is_refused():
    gif = encode(noise(10, 10).quantize(16), "GIF")
    header_end = 13 + 3 * 2 ** ((gif[10] & 7) + 1)
    comments = b"\x21\xfe\x01X\x00" * 20000  # 20,000 one-byte comment blocks before the image
    fragmented = gif[:header_end] + comments + gif[header_end:]
    with pytest.raises(tf.errors.InvalidArgumentError, match="too fragmented"):
        prepare(fragmented, MAX_PIXELS)
    assert prepare(gif[:header_end] + comments[:500] + gif[header_end:], MAX_PIXELS).shape == (8, 8, 3)


@pytest.mark.parametrize("data", [b"GIF89a", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBP", b"BM"])
def test_truncated_headers_are_refused_not_crashed(data):
    with pytest.raises(tf.errors.InvalidArgumentError):
        prepare(data, MAX_PIXELS)


def test_the_exported_image_signature_refuses_a_bomb(tmp_path):
    from trainer import export_signatures as sigs

    tower = tf.keras.Sequential([tf.keras.layers.GlobalAveragePooling2D()])
    module = sigs.ImageEncoder(sigs.Encoders(None, None, tower, "pixels", 8, max_image_pixels=10_000))
    path = str(tmp_path / "image_encoder" / "1")
    tf.saved_model.save(module, path, signatures=module.signatures())
    serve = tf.saved_model.load(path).signatures[servables.TEXT_SIGNATURE]
    small = encode(noise(100, 100), "PNG")
    assert serve(**{servables.IMAGE_BYTES: tf.constant([small])})[servables.EMBEDDING].shape == (1, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[101\] \[x\] \[100\]"):
        serve(**{servables.IMAGE_BYTES: tf.constant([small, encode(noise(101, 100), "PNG")])})


def test_the_pipeline_dead_letters_a_bomb_with_its_own_reason(tmp_path):
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from beam_pipelines import images

    (tmp_path / "ok.png").write_bytes(encode(noise(40, 30), "PNG"))
    (tmp_path / "bomb.png").write_bytes(encode(Image.new("1", (3000, 3000)), "PNG", optimize=True))
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text('{"image_id": "ok", "uri": "ok.png"}\n{"image_id": "bomb", "uri": "bomb.png"}\n')
    with beam.Pipeline() as p:
        out = p | images.ReadCatalogImages(str(catalog), "pixels", 8, max_image_pixels=1_000_000)
        assert_that(out[images.IMAGES] | beam.Keys(), equal_to(["ok"]), label="good")
        assert_that(out[images.BAD_IMAGE_IDS], equal_to([("bomb", "image_too_large")]), label="bad")


def test_catalog_uris_outside_the_catalog_folder_are_not_read_unless_allowed(tmp_path):
    from clicklens.catalog import CatalogEntry, inside_catalog, read_image_input
    from clicklens.errors import BadRecord

    catalog = str(tmp_path / "catalog" / "catalog.jsonl")
    (tmp_path / "catalog" / "images").mkdir(parents=True)
    (tmp_path / "catalog" / "images" / "a.png").write_bytes(b"png")
    (tmp_path / "secret.txt").write_bytes(b"secret")
    read = lambda path: open(path, "rb").read()  # noqa: E731
    assert read_image_input(CatalogEntry("a", "images/a.png"), catalog, "pixels", 0, read) == b"png"
    for uri in ("../secret.txt", str(tmp_path / "secret.txt"), "/etc/passwd", "images/../../secret.txt"):
        with pytest.raises(BadRecord) as err:
            read_image_input(CatalogEntry("x", uri), catalog, "pixels", 0, lambda path: pytest.fail(f"read {path}"))
        assert err.value.reason == "uri_outside_catalog"
    assert read_image_input(CatalogEntry("x", "../secret.txt"), catalog, "pixels", 0, read, allow_outside=True) == b"secret"
    assert inside_catalog("gs://b/images/a.png", "gs://b/catalog.jsonl")
    assert not inside_catalog("gs://other/a.png", "gs://b/catalog.jsonl")
    assert not inside_catalog("/data/a.png", "gs://b/catalog.jsonl")


def test_preparing_many_images_at_once_gives_each_images_own_result():
    prepare = PngPreparer(16)
    good = [encode(noise(40 + i, 30, seed=i), "PNG") for i in range(3)] + [encode(noise(20, 20), "JPEG")]
    mixed = good[:2] + [b"not an image", b""] + good[2:]
    assert prepare.many(good) == [prepare(g) for g in good]  # one call for the list
    results = prepare.many(mixed)
    assert [r for r in results if isinstance(r, bytes)] == [prepare(g) for g in good]
    assert [type(r) for r in results[2:4]] == [tf.errors.InvalidArgumentError] * 2
    assert prepare.many([]) == []
