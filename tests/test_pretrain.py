"""Self-supervised pretraining of the image tower: loss, augmentations, the seeing report, `clicklens pretrain`
(one device and two replicas), its encoder as the content graph's model and image_init."""

import contextlib
import io
import json
import math
import re
import shutil

import numpy as np
import pytest

from clicklens import compat  # noqa: F401
import tensorflow as tf

from clicklens import cli
from clicklens.config import ConfigError, load_config
from clicklens.errors import ClicklensError
from clicklens.workdir import Workdir
from tests import trainer_synthetic as synth
from tests.conftest import DEMO_CONFIG, SMALL_WORLD, run_python, run_verb
from trainer import augment, losses, pretrain, seeing, task
from trainer.model import build_image_tower, restore_model, with_image_init_path

# 24 synthetic images, 8 per step: 3 steps per epoch.
PRETRAIN = ["pretrain.per_replica_batch_size=8", "pretrain.epochs=1", "pretrain.projection_dim=8",
            "pretrain.projection_hidden=16", "training.checkpoint_every_steps=2", "training.log_every_steps=1"]

COLOUR_OFF = ["pretrain.augment.brightness=0", "pretrain.augment.contrast=0", "pretrain.augment.saturation=0",
              "pretrain.augment.hue=0"]
# Both views are the image itself: a run is the same on any strategy.
IDENTITY_VIEWS = COLOUR_OFF + ["pretrain.augment.crop_min_area=1", "pretrain.augment.crop_max_area=1",
                               "pretrain.augment.flip=false", "pretrain.augment.blur_probability=0"]


def config(extra=()):
    return synth.trainer_config(PRETRAIN + list(extra))


# ---------------------------------------------------------------------------
# NT-Xent.


def test_nt_xent_matches_a_hand_computed_value():
    # Image 1's view a scores 1 with its other view, 0 with image 2's two views, itself not at all:
    # -log(e / (e + 2)) for each of the four views.
    views = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    loss = losses.nt_xent_loss(views, views, temperature=1.0).numpy()
    np.testing.assert_allclose(loss, [math.log(1 + 2 / math.e)] * 4, rtol=1e-6)
    # Temperature divides the scores; projections are normalised first.
    loss = losses.nt_xent_loss(3 * views, views, temperature=0.5).numpy()
    np.testing.assert_allclose(loss, [math.log(1 + 2 / math.e ** 2)] * 4, rtol=1e-6)


def test_nt_xent_is_lowest_when_the_views_of_each_image_match():
    rng = np.random.default_rng(0)
    a = tf.constant(rng.normal(size=(16, 8)), tf.float32)
    noisy = a + 0.1 * tf.constant(rng.normal(size=(16, 8)), tf.float32)
    shuffled = tf.gather(a, rng.permutation(16))
    matched, near, wrong = (float(tf.reduce_mean(losses.nt_xent_loss(a, b, 0.1))) for b in (a, noisy, shuffled))
    assert matched < near < wrong
    # Gradient descent on the loss pulls a view towards its own pair.
    b = tf.Variable(shuffled)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(losses.nt_xent_loss(a, b, 0.1))
    stepped = b - 0.5 * tape.gradient(loss, b)
    assert float(tf.reduce_mean(losses.nt_xent_loss(a, stepped, 0.1))) < float(loss)


def test_projection_dim_0_contrasts_the_towers_own_embeddings():
    settings = config(["pretrain.projection_dim=0"])
    model = pretrain.ContrastivePretrainer(build_image_tower(settings), settings.pretrain)
    images = _images(4)
    np.testing.assert_array_equal(model(images).numpy(), model.image_tower(images).numpy())
    assert len(model.trainable_variables) == len(model.image_tower.trainable_variables)


# ---------------------------------------------------------------------------
# Augmentations.


def _images(n=6, size=16, seed=0):
    return tf.constant(np.random.default_rng(seed).uniform(size=(n, size, size, 3)), tf.float32)


def test_views_keep_shape_and_range_and_differ():
    images = _images()
    settings = config(["pretrain.augment.brightness=0.4", "pretrain.augment.contrast=0.4",
                       "pretrain.augment.saturation=0.4", "pretrain.augment.hue=0.1",
                       "pretrain.augment.grayscale_probability=0.2", "pretrain.augment.blur_probability=0.5"]
                      ).pretrain.augment
    a, b = augment.random_view(images, settings), augment.random_view(images, settings)
    for view in (a, b):
        assert view.shape == images.shape and view.dtype == tf.float32
        assert float(tf.reduce_min(view)) >= 0.0 and float(tf.reduce_max(view)) <= 1.0
    assert not np.allclose(a.numpy(), b.numpy())


def test_every_switch_off_is_the_identity():
    off = config(IDENTITY_VIEWS).pretrain.augment
    images = _images()
    np.testing.assert_array_equal(augment.random_view(images, off).numpy(), images.numpy())


def test_colour_jitter_switched_off_keeps_colour_and_each_switch_changes_it():
    red = tf.tile(tf.constant([[[[0.8, 0.1, 0.1]]]]), [8, 16, 16, 1])
    off = config(COLOUR_OFF).pretrain.augment
    assert not augment.has_colour_jitter(off) and off.grayscale_probability == 0
    np.testing.assert_allclose(augment.random_view(red, off).numpy(), red.numpy(), atol=1e-6)
    for name, strength in (("brightness", 0.4), ("contrast", 0.4), ("saturation", 0.4), ("hue", 0.5)):
        one = config(COLOUR_OFF + [f"pretrain.augment.{name}={strength}", "pretrain.augment.jitter_probability=1"])
        views = augment.random_view(red, one.pretrain.augment).numpy()
        assert not np.allclose(views, red.numpy(), atol=1e-2), name
        if name != "hue":  # a small hue change keeps red red: channel order is kept
            assert np.all(views[..., 0] >= views[..., 1] - 1e-6), name


def test_default_jitter_keeps_hue_close():
    red = tf.tile(tf.constant([[[[0.8, 0.1, 0.1]]]]), [64, 16, 16, 1])
    hue = tf.image.rgb_to_hsv(augment.random_view(red, config().pretrain.augment))[..., 0].numpy()
    distance = np.minimum(hue, 1 - hue)  # red is hue 0 on the wheel
    assert distance.max() <= config().pretrain.augment.hue + 1e-3


def test_crops_and_flips_move_pixels():
    images = _images()
    crop = config(["pretrain.augment.flip=false", "pretrain.augment.crop_min_area=0.2"]).pretrain.augment
    assert not np.allclose(augment.random_view(images, crop).numpy(), images.numpy())
    flipped = augment.random_flip(tf.tile(images[:1], [64, 1, 1, 1])).numpy()
    mirrored = np.all(np.isclose(flipped, images[:1].numpy()[:, :, ::-1]), axis=(1, 2, 3))
    same = np.all(np.isclose(flipped, images[:1].numpy()), axis=(1, 2, 3))
    assert np.all(mirrored | same) and mirrored.any() and same.any()


def test_zoom_out_shrinks_the_object_inside_the_border_colour():
    # A bright square in the middle of a dark grey image.
    square = np.full([32, 32, 32, 3], 0.2, np.float32)
    square[:, 8:24, 8:24] = 0.9
    images = tf.constant(square)
    views = augment.random_resized_crop(images, 4.0, 1.0, max_area=4.0).numpy()  # exactly 2x zoom out
    assert views.shape == square.shape
    bright = (views > 0.55).all(axis=-1).sum(axis=(1, 2))
    # A 16 x 16 square seen at half size covers about 8 x 8 pixels (bilinear edges aside).
    assert np.all((bright >= 36) & (bright <= 100)), bright
    # Beyond the image's edges the view takes the border colour, not black.
    assert np.all(views[:, 0, 0] == pytest.approx(0.2, abs=1e-6)) and views.min() >= 0.2 - 1e-6
    # Shares of at most 1 never reach past the edges: the default path is the plain crop.
    inside = augment.random_resized_crop(images, 0.5, 1.0).numpy()
    assert inside.min() >= 0.2 - 1e-6 and not np.allclose(inside, square)


def test_blur_smooths_texture_and_keeps_flat_colour():
    flat = tf.fill([4, 16, 16, 3], 0.3)
    np.testing.assert_allclose(augment.gaussian_blur(flat, 1.5).numpy(), flat.numpy(), atol=1e-6)
    stripes = tf.tile(tf.constant([0.0, 1.0])[None, None, :, None], [64, 16, 8, 3])
    blurred = augment.gaussian_blur(stripes, 1.5)
    assert blurred.shape == stripes.shape
    assert float(tf.math.reduce_std(blurred)) < float(tf.math.reduce_std(stripes))


# ---------------------------------------------------------------------------
# The seeing metric (trainer/seeing.py).


def _seeing_world():
    """12 images in a plane, ranked by cosine: image i < 11 points at 15 * i degrees, image 11 the way image 0
    does (an exact neighbour, tied with it).  Lengths differ (image 10 is short): a dot product would rank
    otherwise."""
    angles = np.radians(15.0 * np.array(list(range(11)) + [0]))
    lengths = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0.1, 12])
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1) * lengths[:, None]
    return vectors, [f"img{i:02d}" for i in range(12)]


def test_image_to_image_recall_and_ndcg_by_hand():
    vectors, ids = _seeing_world()
    truth = {"img00": {"img11", "img05", "img09"}, "img11": {"img00", "img10"}, "img10": {"img11"},
             "img03": {"img02", "img04"}}
    queries = np.array([0, 11, 10, 3])
    # Each query's top 10 of the 11 other images leaves out the one farthest from it:
    #   img00: img11 (tied with img00 itself, dropped), img01 ... img09; img10 left out -> similar at ranks 1, 6, 10
    #   img11: img00 (tied, the lower row first), img01 ... img09; img10 left out -> 1 of 2, at rank 1
    #   img10: img09 ... img01, img00; img11 (tied with img00, the higher row) left out -> 0 of 1
    #   img03: img02 and img04 (15 degrees either side) first -> 2 of 2 at ranks 1 and 2
    recall = (1 + 1 / 2 + 0 + 1) / 4
    ideal2, ideal3 = 1 + 1 / math.log2(3), 1 + 1 / math.log2(3) + 1 / math.log2(4)
    ndcg = ((1 + 1 / math.log2(7) + 1 / math.log2(11)) / ideal3 + 1 / ideal2 + 0 + 1) / 4
    metrics = seeing.image_to_image(vectors, ids, truth, queries)
    assert metrics == {"recall@10": pytest.approx(recall, abs=1e-9), "ndcg@10": pytest.approx(ndcg, abs=1e-9)}
    # Each query on its own.
    alone = [seeing.image_to_image(vectors, ids, truth, np.array([q]))["recall@10"] for q in queries]
    assert alone == pytest.approx([1, 0.5, 0, 1], abs=1e-9)


def test_format_table_prints_each_space_figures_and_ratio():
    report = {"k": 10, "truth": "similar_images.jsonl", "num_queries": {"all": 24, "cold": 3},
              "mean_similar_per_image": 4.0,
              "raw_pixels": {"all": {"recall@10": 0.5, "ndcg@10": 0.25}, "cold": {"recall@10": 0.4, "ndcg@10": 0.3}},
              "pretrained": {"all": {"recall@10": 0.75, "ndcg@10": 0.625}},
              "click_trained": {"all": {"recall@10": 0.875, "ndcg@10": 0.5}, "cold": {"recall@10": 1, "ndcg@10": 1}},
              "random": {"all": {"recall@10": 0.0, "ndcg@10": 0.0}},
              "pretrained_vs_raw_pixels": 1.5, "click_trained_vs_raw_pixels": 1.75, "random_vs_raw_pixels": 0.0}
    lines = seeing.format_table(report).splitlines()
    assert "about 4 similar images each, so recall@10 <= 1.00" in lines[0]  # 10 / 4, but recall is at most 1
    assert re.split(r"\s{2,}", lines[1].strip()) == ["space", "all (24 query images)", "cold (3 query images)",
                                                      "recall@10 / pixels"]
    # One row per space present, in SPACES order; a subset a space lacks is n/a; a ratio of 0 is printed.
    assert [re.split(r"\s{2,}", line.strip()) for line in lines[2:]] == [
        ["raw pixels", "0.500 / 0.250", "0.400 / 0.300"],
        ["random tower", "0.000 / 0.000", "n/a", "0.00x"],
        ["pretrained tower", "0.750 / 0.625", "n/a", "1.50x"],
        ["click-trained tower", "0.875 / 0.500", "1.000 / 1.000", "1.75x"]]
    assert seeing.format_table({"skipped": "no W/raw/similar_images.jsonl"}) == (
        "seeing: skipped (no W/raw/similar_images.jsonl)")


# ---------------------------------------------------------------------------
# `clicklens pretrain` and model.image_init.


def _similar_images(workdir):
    """similar_images.jsonl for the synthetic world: same colour and shape."""
    catalog = synth.images()
    with tf.io.gfile.GFile(workdir.similar_images, "w") as f:
        for i, (colour, shape, _) in catalog.items():
            similar = [j for j, (c, s, _) in catalog.items() if (c, s) == (colour, shape) and j != i]
            f.write(json.dumps({"image_id": i, "similar_image_ids": similar}) + "\n")


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """A synthetic workdir after a 1-epoch `clicklens pretrain --config ... --workdir ... --set ...` (the command
    line, in process: config(), as YAML plus --set), and the verb's standard output."""
    root = tmp_path_factory.mktemp("pretrain")
    workdir = synth.write_workdir(root, config())
    _similar_images(workdir)
    config_yaml = synth.write_config_yaml(tmp_path_factory.mktemp("config") / "trainer-test.yaml")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["pretrain", "--config", config_yaml, "--workdir", str(root), *_sets(PRETRAIN)])
    assert code == 0
    return workdir, printed.getvalue()


@pytest.fixture(scope="module")
def pretrained(pretrained_run):
    return pretrained_run[0]


def _tower_weights(path):
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(path)
            if name.startswith("layer_with_weights") and "OPTIMIZER" not in name}


def test_pretrain_writes_tower_encoder_report_and_checkpoints(pretrained):
    assert tf.io.gfile.exists(pretrained.pretrained_tower + ".index")
    assert json.loads(open(pretrained.pretrained_tower + ".json").read())["model.cnn_filters"] == [4, 8]
    assert tf.train.latest_checkpoint(pretrain.pretrain_checkpoints(pretrained)).endswith("-3")
    assert tf.io.gfile.glob(pretrained.pretrain + "/tensorboard/*")
    report = json.loads(open(pretrained.pretrain + "/report.json").read())
    seeing = report["seeing"]
    assert seeing["num_queries"] == {"all": 24, "cold": 3}
    for space in ("raw_pixels", "random", "pretrained"):
        assert 0.0 <= seeing[space]["all"]["recall@10"] <= 1.0
    assert "pretrained_vs_raw_pixels" in seeing
    # No W/model here: no click-trained space (test_pretrain_reports_the_click_trained_tower_of_the_workdir).
    assert "click_trained" not in seeing and "click_trained_vs_raw_pixels" not in seeing
    # The image_encoder SavedModel embeds raw PNG bytes as the tower does.
    encoder = tf.saved_model.load(report["image_encoder"])
    png = synth.images()["red-circle-0"][2]
    embedding = encoder.signatures["serving_default"](image_bytes=tf.constant([png]))["embedding"]
    assert embedding.shape == (1, 8)


def test_pretrain_resumes_and_does_not_redo_finished_steps(pretrained, caplog):
    with caplog.at_level("INFO"):
        pretrain.pretrain(config(), pretrained)
    assert "all 3 pretraining steps already done" in caplog.text
    with caplog.at_level("INFO"):
        pretrain.pretrain(config(["pretrain.epochs=2", "pretrain.learning_rate=0.001"]), pretrained)
    assert "resuming from" in caplog.text and "at step 3 of 6" in caplog.text


def test_train_starts_the_image_tower_from_the_pretrained_weights(pretrained, tmp_path):
    saved = _tower_weights(pretrained.pretrained_tower)
    # Pretrained weights live in the pretraining workdir; train elsewhere, with image_init_path naming them.
    workdir = synth.write_workdir(tmp_path, config())
    settings = config(["model.image_init=pretrained", f"model.image_init_path={pretrained.pretrained_tower}",
                       "training.learning_rate=0", "training.steps_per_epoch=1", "training.augment=false"])
    model = task.train(settings, workdir)  # a zero learning rate: the weights after step 1 are those at step 0
    tower = build_image_tower(settings)
    for built, trained in zip(tower.weights, model.image_tower.weights):
        np.testing.assert_array_equal(built.numpy(), trained.numpy())
    assert sorted(np.concatenate([w.ravel() for w in saved.values()])) == pytest.approx(
        sorted(np.concatenate([w.numpy().ravel() for w in tower.weights])))
    random = build_image_tower(config())
    assert not np.allclose(random.weights[0].numpy(), tower.weights[0].numpy())


def test_image_init_path_defaults_to_the_workdir(pretrained):
    settings = with_image_init_path(config(["model.image_init=pretrained"]), pretrained)
    assert settings.model.image_init_path == pretrained.pretrained_tower
    build_image_tower(settings)  # loads
    assert with_image_init_path(config(), pretrained).model.image_init_path == ""


def test_pretrained_without_weights_is_a_clear_error(tmp_path):
    workdir = synth.write_workdir(tmp_path, config())
    with pytest.raises(ClicklensError, match="no pretrained image tower at .*run `clicklens pretrain` first"):
        task.train(config(["model.image_init=pretrained"]), workdir)


def test_a_tower_of_another_shape_is_a_clear_error(pretrained):
    settings = config(["model.image_init=pretrained", f"model.image_init_path={pretrained.pretrained_tower}",
                       "model.cnn_filters=[4, 16]"])
    with pytest.raises(ClicklensError, match=r"model.cnn_filters \[4, 8\] there, \[4, 16\] here"):
        build_image_tower(settings)


@pytest.mark.parametrize("override, key", [
    ("model.image_init=imagenet", "model.image_init"),
    ("pretrain.temperature=0", "pretrain.temperature"),
    ("pretrain.augment.hue=0.9", "pretrain.augment.hue"),
    ("pretrain.augment.crop_min_area=0", "pretrain.augment.crop_min_area"),
    ("pretrain.augment.crop_max_area=0.5", "pretrain.augment.crop_max_area"),
    ("pretrain.augment.colour=1", "pretrain.augment.colour"),
])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config([override])


def test_pretrain_needs_pixels(tmp_path):
    settings = synth.trainer_config(["pipeline.image_source=features", "pipeline.feature_dim=4",
                                     "model.image_tower=features"])
    with pytest.raises(ClicklensError, match="pipeline.image_source=pixels"):
        pretrain.corpus_pixels(settings, synth.write_workdir(tmp_path, config()))


def test_pretrain_prints_the_seeing_table_of_its_report(pretrained_run):
    workdir, printed = pretrained_run
    figures = json.loads(open(workdir.pretrain + "/report.json").read())["seeing"]
    assert seeing.format_table(figures) in printed
    row = next(line for line in printed.splitlines() if line.startswith("pretrained tower"))
    assert f"{figures['pretrained']['all']['recall@10']:.3f} / {figures['pretrained']['all']['ndcg@10']:.3f}" in row
    assert "click-trained tower" not in printed


def test_on_vertex_the_pretraining_checkpoints_are_no_click_trained_tower(pretrained, monkeypatch):
    # On Vertex AI, $AIP_CHECKPOINT_DIR is where `train` and `pretrain` both keep checkpoints; in a pretraining
    # job it holds the pretraining's own.  A partial restore of them used to be reported as a click-trained tower.
    monkeypatch.setenv("AIP_CHECKPOINT_DIR", pretrain.pretrain_checkpoints(pretrained))
    assert tf.train.latest_checkpoint(pretrain.pretrain_checkpoints(pretrained))
    assert set(pretrain.seeing_towers(config(), pretrained, None)) == {"random", "pretrained"}


# ---------------------------------------------------------------------------
# The pretrained image_encoder as the content graph's `model` source.


def test_the_content_graph_model_source_runs_the_pretrained_encoder(pretrained):
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that

    from beam_pipelines import content_graph
    from clicklens import servables as S
    from clicklens.images import prepare_images

    k = 2
    settings = config(["pipeline.content_graph.source=model",
                       f"pipeline.content_graph.model_dir={pretrained.pretrain}/image_encoder",
                       f"pipeline.content_graph.neighbors={k}", "pipeline.content_graph.min_similarity=-1",
                       "pipeline.content_graph.batch_size=5"])
    # model_dir names W/pretrain/image_encoder: its newest version, the one `pretrain` reported, is run.
    model_dir = content_graph.encoder_dir(settings.pipeline.content_graph, pretrained)
    assert model_dir == json.loads(open(pretrained.pretrain + "/report.json").read())["image_encoder"]
    catalog = synth.images()
    ids = sorted(catalog)
    pngs = tf.constant([catalog[i][2] for i in ids])
    direct = tf.saved_model.load(model_dir).signatures[S.DEFAULT_SIGNATURE](image_bytes=pngs)[S.EMBEDDING].numpy()
    # That encoder is the tower of W/pretrain/image_tower/weights, not a freshly initialised one.
    pixels = prepare_images(pngs, synth.IMAGE_SIZE)
    tower = build_image_tower(config(["model.image_init=pretrained",
                                      f"model.image_init_path={pretrained.pretrained_tower}"]))
    np.testing.assert_allclose(tower(pixels).numpy(), direct, atol=1e-5)
    assert not np.allclose(build_image_tower(config())(pixels).numpy(), direct, atol=1e-3)

    unit = direct / np.linalg.norm(direct, axis=1, keepdims=True)
    cosines = unit.astype(np.float64) @ unit.T.astype(np.float64)
    np.fill_diagonal(cosines, -np.inf)
    kth = np.sort(cosines, axis=1)[:, -k]  # each image's k-th best cosine
    row = {image_id: r for r, image_id in enumerate(ids)}

    def check_embeddings(embeddings):
        assert sorted(i for i, _ in embeddings) == ids
        for image_id, vector in embeddings:
            np.testing.assert_allclose(vector, unit[row[image_id]], atol=1e-5)

    def check_edges(edges):
        found = {pair: cosine for pair, cosine in edges}
        for (a, b), cosine in found.items():
            assert a < b and cosine == pytest.approx(cosines[row[a], row[b]], abs=1e-5)
        # With 24 images LSH keeps one bucket: the edges are each image's exact top k (up to ties within 1e-5).
        for a in ids:
            for b in ids:
                if a < b:
                    c = cosines[row[a], row[b]]
                    if c > kth[row[a]] + 1e-5 or c > kth[row[b]] + 1e-5:
                        assert (a, b) in found, (a, b)
                    elif c < kth[row[a]] - 1e-5 and c < kth[row[b]] - 1e-5:
                        assert (a, b) not in found, (a, b)
        assert len(found) >= len(ids) * k // 2

    with TestPipeline(runner=FnApiRunner()) as p:
        content = (p | beam.Create([(i, catalog[i][2]) for i in ids])
                   | content_graph.BuildContentGraph(settings.pipeline.content_graph, synth.IMAGE_SIZE, model_dir,
                                                     S.IMAGE_BYTES))
        assert_that(content[content_graph.EMBEDDINGS], check_embeddings, label="embeddings")
        assert_that(content[content_graph.EDGES], check_edges, label="edges")


# ---------------------------------------------------------------------------
# The click-trained tower as a fourth space (the demo chain's `clicklens train`).

DEMO_PRETRAIN = ["pretrain.epochs=1", "pretrain.steps_per_epoch=2", "pretrain.per_replica_batch_size=8"]


def test_pretrain_reports_the_click_trained_tower_of_the_workdir(demo_trained, tmp_path, capsys):
    """`clicklens pretrain` where `clicklens train` has run: W/model's tower is a space of the seeing report,
    with its own figures.  On a copy, so the shared demo workdir gets no W/pretrain."""
    original = demo_trained.root
    root = str(tmp_path / "w")
    shutil.copytree(original, root, ignore=lambda d, names: [n for n in names if d == original and
                                                             n in ("export", "pretrain")])
    capsys.readouterr()
    run_verb("pretrain", root, overrides=DEMO_PRETRAIN)
    printed = capsys.readouterr().out
    workdir = Workdir(root)
    figures = json.loads(open(workdir.pretrain + "/report.json").read())["seeing"]
    assert set(figures["click_trained"]) == set(figures["pretrained"]) == set(figures["num_queries"])
    assert figures["click_trained_vs_raw_pixels"] == pytest.approx(
        figures["click_trained"]["all"]["recall@10"] / figures["raw_pixels"]["all"]["recall@10"])
    # The figures are those of the tower restored from W/model, not of another space's.
    settings = pretrain.pretrain_config(load_config(DEMO_CONFIG, SMALL_WORLD + DEMO_PRETRAIN))
    clicked = seeing.evaluate(settings, workdir, {"click_trained": restore_model(settings, workdir).image_tower})
    for subset, metrics in clicked["click_trained"].items():
        assert figures["click_trained"][subset] == pytest.approx(metrics, abs=1e-9), subset
    assert figures["click_trained"]["all"]["ndcg@10"] != pytest.approx(figures["random"]["all"]["ndcg@10"])
    assert figures["click_trained"]["all"]["ndcg@10"] != pytest.approx(figures["pretrained"]["all"]["ndcg@10"])
    row = next(line for line in printed.splitlines() if line.startswith("click-trained tower"))
    all_figures = figures["click_trained"]["all"]
    assert f"{all_figures['recall@10']:.3f} / {all_figures['ndcg@10']:.3f}" in row


def test_a_click_trained_tower_of_another_shape_is_left_out(demo_trained, small_config, caplog):
    settings = pretrain.pretrain_config(load_config(DEMO_CONFIG, SMALL_WORLD + ["model.cnn_filters=[8, 8]"]))
    with caplog.at_level("WARNING"):
        towers = pretrain.seeing_towers(settings, demo_trained, pretrained=None)
    assert set(towers) == {"random", "pretrained"}
    assert "does not fit this config, left out" in caplog.text
    # The config it was trained with fits.
    assert "click_trained" in pretrain.seeing_towers(pretrain.pretrain_config(small_config), demo_trained, None)


# ---------------------------------------------------------------------------
# Two replicas (MirroredStrategy over two logical CPUs).

# Runs in a fresh interpreter: logical CPU devices must be configured before TensorFlow initialises.
MIRRORED_PRETRAIN = r"""
import glob, json, sys, tempfile
from clicklens import compat
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np
from tests import trainer_synthetic as synth
from tests.test_pretrain import _similar_images
from trainer import pretrain
from trainer.model import build_image_tower

OVERRIDES = json.loads(sys.argv[1])

def epoch_losses(workdir):
    found = []
    for path in glob.glob(workdir.pretrain + "/tensorboard/train/events*"):
        for event in tf.compat.v1.train.summary_iterator(path):
            found += [(event.step, float(tf.make_ndarray(v.tensor))) for v in event.summary.value
                      if v.tag == "epoch_loss"]
    return [loss for _, loss in sorted(found)]

out = {}
# One device, 8 images a step, in process.
config = synth.trainer_config(OVERRIDES + ["training.strategy=cpu", "pretrain.per_replica_batch_size=8"])
workdir = synth.write_workdir(tempfile.mkdtemp(), config)
tower = pretrain.pretrain(config, workdir)
out["cpu"] = {"replicas": tower.distribute_strategy.num_replicas_in_sync, "losses": epoch_losses(workdir)}
one_device = [w.numpy() for w in tower.weights]
# Two replicas of 4 images, through `python -m trainer.pretrain` (the Vertex AI entry point).
overrides = OVERRIDES + ["training.strategy=mirrored", "pretrain.per_replica_batch_size=4"]
config = synth.trainer_config(overrides)
root = tempfile.mkdtemp()
workdir = synth.write_workdir(root, config)
_similar_images(workdir)
args = ["--config", synth.write_config_yaml(root + "/config.yaml"), "--workdir", root]
code = pretrain.main(args + [a for o in overrides for a in ("--set", o)])
report = json.load(open(workdir.pretrain + "/report.json"))
saved = build_image_tower(config)
saved.load_weights(workdir.pretrained_tower).assert_existing_objects_matched()
out["mirrored"] = {"code": code, "losses": epoch_losses(workdir), "seeing": report["seeing"],
                   "steps": int(tf.train.latest_checkpoint(pretrain.pretrain_checkpoints(workdir)).rsplit("-", 1)[1]),
                   "max_weight_diff": max(float(np.max(np.abs(a - b.numpy())))
                                          for a, b in zip(one_device, saved.weights)),
                   "max_weight_change": max(float(np.max(np.abs(a.numpy() - b.numpy())))
                                            for a, b in zip(build_image_tower(config).weights, saved.weights))}
print(json.dumps(out))
"""


def test_mirrored_two_replicas_pretrain_as_one_device():
    # Identity views and the same seed: both runs see the same global batches of 8 images from the same weights.
    overrides = PRETRAIN + IDENTITY_VIEWS + ["pretrain.epochs=2"]
    proc = run_python(MIRRORED_PRETRAIN.replace("sys.argv[1]", repr(json.dumps(overrides))), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mirroring over 2 logical CPU devices" in proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, two = out["cpu"], out["mirrored"]
    # 24 images in global batches of 8 (2 replicas x 4): 3 steps an epoch.
    assert one["replicas"] == 1 and two["code"] == 0 and two["steps"] == 6
    assert len(one["losses"]) == 2 and two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert one["losses"][1] < one["losses"][0]
    assert two["max_weight_diff"] < 1e-5 < two["max_weight_change"]
    assert 0.0 <= two["seeing"]["pretrained"]["all"]["recall@10"] <= 1.0
