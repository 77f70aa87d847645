"""Query tokenizing, image preparation and the tf.data input pipeline."""

import io

import numpy as np
import pytest
from PIL import Image

from clicklens import compat  # noqa: F401
import tensorflow as tf

from tests import trainer_synthetic as synth
from clicklens import features
from trainer import input as I
from clicklens.errors import ClicklensError
from clicklens.images import prepare_image, prepare_images
from clicklens.vocabulary import load_vocab
from trainer.tokenizer import QueryTokenizer


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return synth.write_workdir(tmp_path_factory.mktemp("trainer_input"))


@pytest.fixture(scope="module")
def tokenizer(workdir):
    return QueryTokenizer(workdir.vocab, 6)


def ids_of(tokens):
    vocab = synth.vocab_tokens()
    return [vocab.index(t) for t in tokens]


def test_tokenizer_normalises_splits_cjk_and_pads(tokenizer):
    out = tokenizer(tf.constant(["Red  SQUARE", "红色方形", "ＲＥＤ circles", "", "zebra red"])).numpy()
    assert out.dtype == np.int32 and out.shape == (5, 6)
    assert list(out[0]) == ids_of(["red", "square"]) + [0] * 4
    assert list(out[1]) == ids_of(list("红色方形")) + [0] * 2  # one token per ideograph
    assert list(out[2]) == ids_of(["red", "circle", "##s"]) + [0] * 3  # full-width folded, word pieces
    assert list(out[3]) == [0] * 6
    assert list(out[4][:2]) == [1, ids_of(["red"])[0]]  # unknown word -> [UNK]


def test_tokenizer_truncates_and_survives_a_saved_model(tokenizer, tmp_path):
    long = tf.constant(["red " * 10])
    assert list(tokenizer(long).numpy()[0]) == ids_of(["red"]) * 6
    tf.saved_model.save(tokenizer, str(tmp_path / "tok"))
    loaded = tf.saved_model.load(str(tmp_path / "tok"))
    q = tf.constant(["黄色 bar", "Blue circle"])
    np.testing.assert_array_equal(loaded(q).numpy(), tokenizer(q).numpy())


def test_vocab_must_start_with_reserved_tokens(tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_text("hello\n[PAD]\n[UNK]\n", encoding="utf-8")
    with pytest.raises(ClicklensError, match="must start with"):
        load_vocab(str(bad))
    with pytest.raises(ClicklensError, match="not found"):
        load_vocab(str(tmp_path / "missing.txt"))


def encoded(fmt, mode="RGB", size=(10, 6)):
    out = io.BytesIO()
    Image.new(mode, size, color=(255, 0, 0) if mode in ("RGB", "RGBA") else 255).save(out, fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("JPEG", "RGB"),
                                      ("GIF", "RGB"), ("BMP", "RGB")])
def test_prepare_image_formats(fmt, mode):
    image = prepare_image(encoded(fmt, mode), 8).numpy()
    assert image.shape == (8, 8, 3) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.max() > 0.9


def test_prepare_images_batch_and_empty_bytes():
    batch = prepare_images(tf.constant([encoded("PNG"), encoded("JPEG")]), 4)
    assert batch.shape == (2, 4, 4, 3)
    assert np.all(prepare_images(tf.constant([b""]), 4, allow_empty=True).numpy() == 0)
    with pytest.raises(tf.errors.InvalidArgumentError):
        prepare_image(b"", 4)
    with pytest.raises(tf.errors.InvalidArgumentError):
        prepare_image(b"not an image", 4)


def test_dataset_has_static_numeric_batches(workdir, tokenizer):
    config = synth.trainer_config()
    ds = I.make_dataset(config, workdir, "train", 8, training=True, tokenizer=tokenizer)
    for name, spec in ds.element_spec.items():
        assert spec.dtype != tf.string, name
        assert spec.shape.is_fully_defined() and spec.shape[0] == 8, (name, spec.shape)
    b = next(iter(ds))
    assert b[I.IMAGE].shape == (8, 16, 16, 3)
    assert b[I.NEIGHBOR_IMAGES].shape == (8, 2, 16, 16, 3)
    assert b[I.NEGATIVE_IMAGES].shape == (8, 1, 16, 16, 3)
    # The synthetic data leaves the last neighbour slot padded: weight 0, image zeros.
    assert np.all(b[I.NEIGHBOR_WEIGHTS].numpy()[:, 1] == 0)
    assert np.all(b[I.NEIGHBOR_IMAGES].numpy()[:, 1] == 0)
    assert np.all(b[I.NEIGHBOR_WEIGHTS].numpy()[:, 0] > 0)


def test_padded_neighbour_weight_is_zeroed_even_if_the_file_has_one(workdir, tokenizer):
    config = synth.trainer_config()
    spec = features.spec_from_config(config)
    values = {features.QUERY: "red", features.IMAGE_ID: "a", features.IMAGE: synth.png((1, 2, 3), "bar"),
              features.neighbor_weight_key(0): 0.9}  # slot 0 has a weight but no neighbour id
    record = features.make_example(values, spec).SerializeToString()
    parsed = tf.io.parse_example(tf.constant([record]), spec)
    out = I.to_model_inputs(config, parsed, tokenizer, training=False)
    assert out[I.NEIGHBOR_WEIGHTS].numpy().tolist() == [[0.0, 0.0]]
    assert out[I.NEGATIVE_MASK].numpy().tolist() == [[0.0]]


def test_missing_examples_is_a_clear_error(tmp_path, tokenizer):
    from clicklens.workdir import Workdir

    with pytest.raises(ClicklensError, match="no files match"):
        I.make_dataset(synth.trainer_config(), Workdir(str(tmp_path)), "train", 8, training=True, tokenizer=tokenizer)
