"""The content-similarity graph: LSH, the pixel descriptor, the merge with the click graph, cold images,
and the three embedding sources (pixels, features, model), on tiny data with Beam's FnApiRunner."""

import argparse
import glob
import io
import json
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipelines import content_graph, graph, images, lsh, pixel_descriptor
from beam_pipelines.dead_letters import DEAD_LETTER
from clicklens.config import ConfigError, config_from_dict
from clicklens.errors import ClicklensError
from clicklens.workdir import Workdir


def beam_pipeline():
    """A TestPipeline on the FnApiRunner (the DirectRunner would first try to download Prism)."""
    return BeamTestPipeline(runner=FnApiRunner())


def clustered_unit_vectors(n: int, dim: int, cluster_size: int, noise: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(1, n // cluster_size), dim))
    x = centers[rng.integers(0, len(centers), n)] + noise * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


# --------------------------------------------------------------------------- LSH


def test_lsh_recall_against_exact_neighbours():
    vectors = clustered_unit_vectors(3000, 32, cluster_size=20, noise=0.33)
    k = 10
    exact = lsh.exact_neighbors(vectors, np.arange(len(vectors)), k)
    found, sims = lsh.approximate_neighbors(vectors, k, min_similarity=-1.0, rounds=12, bucket_size=64,
                                            max_bucket=128)
    assert lsh.num_bits(3000, 64) == 5
    assert recall(found, exact) >= 0.9
    # One round alone finds far fewer: the rounds are what buys the recall.
    one_round, _ = lsh.approximate_neighbors(vectors, k, -1.0, rounds=1, bucket_size=64, max_bucket=128)
    assert recall(one_round, exact) < 0.8
    # Every reported similarity is the exact cosine, most similar first, never the image itself.
    rows = np.arange(len(vectors))[:, None]
    assert np.allclose(sims, np.sum(vectors[rows] * vectors[found], axis=-1), atol=1e-5)
    assert (np.diff(sims, axis=1) <= 0).all() and not (found == rows).any()


def test_top_k_within_a_bucket_is_exact_above_the_minimum():
    vectors = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]], np.float32)
    indices, sims = lsh.top_k_within(vectors, k=2, min_similarity=0.5)
    assert indices.tolist() == [[1, -1], [0, 2], [1, -1], [-1, -1]]
    assert sims[1].tolist() == pytest.approx([0.8, 0.6])
    # A bucket of one has no neighbour.
    assert lsh.top_k_within(vectors[:1], 3, -1.0)[0].tolist() == [[-1, -1, -1]]


def test_oversized_buckets_are_cut_and_identical_vectors_do_not_stall():
    chunks = lsh.bucket_chunks(np.zeros(1000, np.int64), max_bucket=300)  # 1,000 equal codes
    assert [len(c) for c in chunks] == [250, 250, 250, 250]
    assert sorted(np.concatenate(chunks).tolist()) == list(range(1000))
    ids = [f"i{j:04d}" for j in range(1000)]
    same = np.tile(np.array([[0.6, 0.8]], np.float32), (1000, 1))
    out = list(lsh.bucket_neighbors(ids, same, np.zeros(1000, np.int64), k=2, min_similarity=0.5, max_bucket=300))
    assert len(out) == 1000 and all(len(nbrs) == 2 for _, nbrs in out)
    # The bits grow with the catalog, so a bucket's expected size does not.
    assert [lsh.num_bits(n, 256) for n in (100, 10_000, 100_000, 1_000_000)] == [0, 5, 8, 11]


_KERNEL_SCRIPT = """
import hashlib, numpy as np
from beam_pipelines import lsh
vectors = np.random.default_rng(0).standard_normal((300, 72)).astype(np.float32)
vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
found, sims = lsh.top_k_within(vectors, 5, -1.0)
codes = lsh.signatures(vectors, lsh.round_planes(0, 0, 4, 72), lsh.mean_vector(vectors))
print(hashlib.sha256(found.tobytes() + sims.tobytes() + codes.tobytes()).hexdigest())
"""


def test_neighbours_and_similarities_are_the_same_bits_with_every_blas_kernel():
    """OpenBLAS picks its kernel by CPU (a float32 matmul's last bits differ between them, and did break the
    golden digests on an AVX-512 machine); OPENBLAS_CORETYPE forces the AVX2 and AVX ones here.  On a CPU where
    OpenBLAS ignores the variable the runs are simply alike."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = set()
    for coretype in ("", "Haswell", "Sandybridge"):
        env = dict(os.environ, OPENBLAS_CORETYPE=coretype, PYTHONPATH=repo)
        out = subprocess.run([sys.executable, "-c", _KERNEL_SCRIPT], env=env, cwd=repo, capture_output=True,
                             text=True, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1, digests


def test_beam_lsh_finds_exactly_what_the_numpy_lsh_finds():
    vectors = clustered_unit_vectors(600, 16, cluster_size=10, noise=0.4, seed=3)
    ids = [f"img_{j:04d}" for j in range(len(vectors))]  # id order = row order, as in the numpy run
    k, min_similarity, rounds, bucket_size, max_bucket = 3, 0.3, 4, 32, 48
    found, sims = lsh.approximate_neighbors(vectors, k, min_similarity, rounds, bucket_size, max_bucket,
                                            seed=content_graph.LSH_SEED)
    expected = [(ids[i], [(ids[j], pytest.approx(float(s), abs=1e-6)) for j, s in zip(row, row_sims) if j >= 0])
                for i, (row, row_sims) in enumerate(zip(found, sims)) if (row >= 0).any()]
    with beam_pipeline() as p:
        neighbors = (p | beam.Create(list(zip(ids, vectors)))
                     | content_graph.LshNeighbors(k, min_similarity, rounds, bucket_size, max_bucket))
        assert_that(neighbors, equal_to(expected))


# --------------------------------------------------------------------------- pixel descriptor


def _demo_image(shape, color, pattern, seed, background="light", size="large"):
    from clicklens.demo_data.images import draw_image, encode_png

    attributes = dict(shape=shape, color=color, pattern=pattern, background=background, size=size)
    return encode_png(draw_image(attributes, 64, np.random.default_rng(seed)))


def _describe_png(png: bytes, image_size: int = 32) -> np.ndarray:
    from clicklens.images import prepare_image

    return pixel_descriptor.describe(prepare_image(png, image_size).numpy())


def test_pixel_descriptor_puts_same_shape_and_colour_closest():
    # Three look-alikes per (shape, colour): position, rotation, size and shades jitter.  Another image of
    # the same colour but another shape, or of the same shape but another colour, is never the nearest.
    classes = [("circle", "red"), ("star", "red"), ("circle", "blue"), ("cross", "green"), ("triangle", "yellow")]
    labels, vectors = [], []
    for shape, color in classes:
        for _ in range(3):
            vectors.append(_describe_png(_demo_image(shape, color, "solid", seed=len(labels))))
            labels.append((shape, color))
    vectors = np.stack(vectors)
    assert vectors.shape[1] == pixel_descriptor.DIM
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    nearest = scores.argmax(axis=1)
    assert [labels[j] for j in nearest] == labels
    # Deterministic: the same image gives the same bytes of descriptor.
    png = _demo_image("ring", "pink", "solid", seed=1)
    assert _describe_png(png).tobytes() == _describe_png(png).tobytes()


def test_flat_image_has_the_zero_descriptor_and_is_dropped():
    flat = np.full((16, 16, 3), 0.7, np.float32)
    assert not pixel_descriptor.describe(flat).any()
    with beam_pipeline() as p:
        out = (p | beam.Create([("flat", pixel_descriptor.describe(flat)), ("nan", np.array([np.nan, 1.0])),
                                ("ok", np.array([3.0, 4.0]))])
               | beam.ParDo(content_graph.UnitVectorFn()).with_outputs(content_graph.DROPPED, main="unit"))
        assert_that(out.unit | beam.MapTuple(lambda i, v: (i, v.tolist())),
                    equal_to([("ok", [pytest.approx(0.6), pytest.approx(0.8)])]), label="unit")
        assert_that(out[content_graph.DROPPED], equal_to(["flat", "nan"]), label="dropped")


# --------------------------------------------------------------------------- merging with the click graph


def test_merged_weights_sources_and_top_k():
    click = [(("a", "b"), 0.9), (("a", "c"), 0.2), (("c", "d"), 0.3)]
    content = [(("a", "c"), 0.8), (("a", "e"), 0.8), (("b", "e"), 0.6), (("e", "f"), 0.0)]
    with beam_pipeline() as p:
        out = ({graph.CLICK: p | "Click" >> beam.Create(click), graph.CONTENT: p | "Content" >> beam.Create(content)}
               | graph.BuildImageGraph(content_weight=0.5, max_neighbors=2))
        # (a,c) is in both: 0.2 + 0.5 * 0.8; (e,f) weighs 0 and is no edge.
        assert_that(out["edges"], equal_to([
            (("a", "b"), (0.9, "click")), (("a", "c"), (pytest.approx(0.6), "both")), (("c", "d"), (0.3, "click")),
            (("a", "e"), (0.4, "content")), (("b", "e"), (pytest.approx(0.3), "content"))]), label="edges")
        # a: b 0.9, c 0.6, e 0.4 -> the top 2; e: a 0.4, b 0.3; d's only neighbour is c.
        assert_that(out["neighbors"], equal_to([
            ("a", [("b", 0.9), ("c", pytest.approx(0.6))]), ("b", [("a", 0.9), ("e", pytest.approx(0.3))]),
            ("c", [("a", pytest.approx(0.6)), ("d", 0.3)]), ("d", [("c", 0.3)]),
            ("e", [("a", 0.4), ("b", pytest.approx(0.3))])]), label="neighbors")


def test_content_ties_go_to_the_smaller_id_and_pairs_count_once():
    with beam_pipeline() as p:
        nbrs = p | beam.Create([("x", [("z", 0.9), ("y", 0.9)]), ("y", [("x", 0.9)]), ("z", [("x", 0.9)])])
        edges = nbrs | content_graph.ContentEdges()
        assert_that(edges, equal_to([(("x", "y"), 0.9), (("x", "z"), 0.9)]), label="edges")
        merged = {graph.CLICK: p | "NoClick" >> beam.Create([]), graph.CONTENT: edges} | graph.BuildImageGraph(1.0, 1)
        assert_that(merged["neighbors"], equal_to([("x", [("y", 0.9)]), ("y", [("x", 0.9)]), ("z", [("x", 0.9)])]),
                    label="top1")


# --------------------------------------------------------------------------- the pipeline on a tiny world


def _event(query, shown, clicked):
    return json.dumps({"session_id": "s", "time": 1.0, "query": query, "category": "color_shape",
                       "impressions": [{"image_id": i, "position": k + 1, "clicked": i in clicked}
                                       for k, i in enumerate(shown)]})


# Logged: a (red circle), b (blue star), c (red circle); cold (never logged): d (red circle), e (blue star);
# f is a cold image whose file is corrupt.
TINY_IMAGES = {"a": ("circle", "red"), "b": ("star", "blue"), "c": ("circle", "red"), "d": ("circle", "red"),
               "e": ("star", "blue")}


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("content")
    w = Workdir(str(root))
    os.makedirs(w.images)
    os.makedirs(w.logs)
    catalog = []
    for n, (image_id, (shape, color)) in enumerate(sorted(TINY_IMAGES.items())):
        with open(os.path.join(w.images, f"{image_id}.png"), "wb") as f:
            f.write(_demo_image(shape, color, "solid", seed=n))
        catalog.append({"image_id": image_id, "uri": f"images/{image_id}.png"})
    with open(os.path.join(w.images, "f.png"), "wb") as f:
        f.write(b"<html>not an image</html>")
    catalog.append({"image_id": "f", "uri": "images/f.png"})
    with open(w.catalog, "w") as f:
        f.write("".join(json.dumps(entry) + "\n" for entry in catalog))
    lines = [_event("red circle", ["a", "b", "c"], {"a", "c"})] * 2 + [_event("blue star", ["b", "a"], {"b"})]
    with open(os.path.join(w.logs, "part-0.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return w


def _tiny_config(*overrides, **content_graph_keys):
    content = {"neighbors": 2, "min_similarity": 0.8, **content_graph_keys}
    return config_from_dict({"pipeline": {"eval_fraction": 0.0, "max_neighbors": 2, "image_size": 32,
                                          "vocab_size": 100, "num_shards": 1, "content_graph": content}},
                            overrides=overrides)


def _train_examples(workdir, config):
    import tensorflow as tf
    from clicklens import features as F

    spec = F.spec_from_config(config)
    out = {}
    for s in tf.data.TFRecordDataset(sorted(glob.glob(workdir.split_glob("train"))), compression_type="GZIP"):
        ex = tf.io.parse_single_example(s, spec)
        neighbors = [(ex[F.neighbor_key(i, F.IMAGE_ID)].numpy().decode(), float(ex[F.neighbor_weight_key(i)]))
                     for i in range(config.pipeline.max_neighbors)]
        out[(ex[F.QUERY].numpy().decode(), ex[F.IMAGE_ID].numpy().decode())] = [n for n in neighbors if n[0]]
    return out


def test_cold_images_become_image_only_examples_with_content_neighbours(tiny_world):
    from beam_pipelines import pipeline

    stale = os.path.join(tiny_world.examples, "logged_images-00003-of-00004.txt")
    os.makedirs(tiny_world.examples, exist_ok=True)
    with open(stale, "w") as f:
        f.write("stale\n")
    config = _tiny_config()
    assert pipeline.run(config, tiny_world, argparse.Namespace(extra_args=[])) == 0

    examples = _train_examples(tiny_world, config)
    # d and e were never shown: their only neighbours are look-alikes, found by content.
    assert {key for key in examples if key[0] == ""} == {("", "d"), ("", "e")}
    assert {n for n, _ in examples[("", "d")]} <= {"a", "c"} and examples[("", "d")]
    assert [n for n, _ in examples[("", "e")]] == ["b"]
    assert all(0 < w <= 0.5 for _, w in examples[("", "d")] + examples[("", "e")])  # weight 0.5 x cosine
    # A clicked image keeps its co-clicked neighbour first (co-click rate 1 plus its content edge).
    assert examples[("red circle", "a")][0][0] == "c" and examples[("red circle", "a")][0][1] > 1.0

    report = pipeline.read_report(tiny_world)
    assert report["content_embeddings"] == {"computed": 5, "dropped": 0}  # f is not decodable: no embedding
    assert report["graph"]["cold_images"] == 2 and report["graph"]["cold_images_reached"] == 2
    assert report["graph"]["edges_by_source"]["both"] >= 1 and report["graph"]["edges_by_source"]["content"] >= 2
    assert sum(report["graph"]["edges_by_source"].values()) == report["graph"]["edges"]
    assert report["examples"]["image_only"] == 2
    dead = [json.loads(line) for path in glob.glob(os.path.join(tiny_world.examples, "dead_letter-*.jsonl"))
            for line in open(path, encoding="utf-8")]
    assert [(d["image_id"], d["reason"]) for d in dead] == [("f", "corrupt_image")]  # once

    logged = [line.strip() for path in glob.glob(tiny_world.logged_images_glob) for line in open(path)]
    assert sorted(logged) == ["a", "b", "c"]
    assert not os.path.exists(stale)


def test_source_none_gives_the_click_graph_alone(tiny_world):
    from beam_pipelines import pipeline

    config = _tiny_config(source="none")
    assert pipeline.run(config, tiny_world, argparse.Namespace(extra_args=[])) == 0
    examples = _train_examples(tiny_world, config)
    assert not [key for key in examples if key[0] == ""]
    # red circle: a and c co-clicked in both lists (rate 2/2); blue star: b alone.
    assert examples[("red circle", "a")] == [("c", 1.0)] and examples[("blue star", "b")] == []
    report = pipeline.read_report(tiny_world)
    assert report["graph"]["edges_by_source"] == {"click": 1, "content": 0, "both": 0}
    assert report["content_embeddings"] == {"computed": 0, "dropped": 0}
    assert report["graph"]["cold_images"] == 2 and report["graph"]["cold_images_reached"] == 0


# --------------------------------------------------------------------------- features and model sources


def test_feature_vectors_of_the_wrong_length_are_dead_lettered(tmp_path):
    catalog = tmp_path / "catalog.jsonl"
    entries = [{"image_id": "a", "features": [1, 0, 0]}, {"image_id": "b", "features": [0.9, 0.1, 0]},
               {"image_id": "short", "features": [1, 0]}, {"image_id": "zero", "features": [0, 0, 0]},
               {"image_id": "c", "features": [0, 0, 1]}]
    catalog.write_text("".join(json.dumps(e) + "\n" for e in entries))
    cfg = _tiny_config("pipeline.image_source=features", "pipeline.feature_dim=3",
                       "pipeline.content_graph.source=features", "model.image_tower=features").pipeline
    with beam_pipeline() as p:
        loaded = p | images.ReadCatalogImages(str(catalog), cfg.image_source, cfg.image_size, cfg.feature_dim)
        content = loaded[images.IMAGES] | content_graph.BuildContentGraph(cfg.content_graph, cfg.image_size)
        assert_that(loaded[DEAD_LETTER] | beam.Map(lambda d: (d["image_id"], d["reason"], d["detail"])),
                    equal_to([("short", "bad_feature_dim", "2 != 3")]), label="dead")
        assert_that(content[content_graph.DROPPED], equal_to(["zero"]), label="zero")
        assert_that(content[content_graph.EMBEDDINGS] | beam.Map(lambda kv: kv[0]), equal_to(["a", "b", "c"]),
                    label="embedded")
        assert_that(content[content_graph.EDGES], equal_to([(("a", "b"), pytest.approx(0.9 / np.hypot(0.9, 0.1)))]),
                    label="edges")


def test_features_source_needs_feature_vectors_and_pixels_source_needs_pixels(tiny_world):
    from beam_pipelines import pipeline

    with pytest.raises(ConfigError, match="content_graph.source: 'features' needs pipeline.image_source"):
        config_from_dict({"pipeline": {"content_graph": {"source": "features"}}})
    features_catalog = _tiny_config("pipeline.image_source=features", "pipeline.feature_dim=3",
                                    "model.image_tower=features")
    with pytest.raises(ClicklensError, match="no pixels to describe"):
        pipeline.check_inputs(features_catalog, tiny_world)


def test_model_source_without_an_export_fails_naming_the_folder(tiny_world):
    from beam_pipelines import pipeline

    config = _tiny_config("pipeline.content_graph.source=model")
    with pytest.raises(ClicklensError, match=f"{tiny_world.root}/export/image_encoder holds no exported"):
        pipeline.check_inputs(config, tiny_world)
    config = _tiny_config("pipeline.content_graph.source=model", "pipeline.content_graph.model_dir=/nowhere/enc")
    with pytest.raises(ClicklensError, match="/nowhere/enc holds no exported image_encoder"):
        pipeline.check_inputs(config, tiny_world)


def _save_mean_colour_encoder(path: str, image_size: int) -> None:
    """A tiny image_encoder with the servables contract: image_bytes -> embedding = mean RGB of the prepared image."""
    import tensorflow as tf
    from clicklens import servables as S
    from clicklens.images import prepare_images

    module = tf.Module()

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=S.IMAGE_BYTES)])
    def embed(image_bytes):
        return {S.EMBEDDING: tf.reduce_mean(prepare_images(image_bytes, image_size), axis=[1, 2])}

    tf.saved_model.save(module, path, signatures={S.DEFAULT_SIGNATURE: embed})


def test_model_source_runs_the_newest_exported_encoder(tmp_path):
    from clicklens import servables as S

    w = Workdir(str(tmp_path))
    old, new = os.path.join(w.export_model(S.IMAGE_ENCODER), "1"), os.path.join(w.export_model(S.IMAGE_ENCODER), "2")
    _save_mean_colour_encoder(new, 8)
    os.makedirs(old)  # an unfinished version (no saved_model.pb) is never used
    cfg = _tiny_config("pipeline.content_graph.source=model", "pipeline.content_graph.batch_size=2",
                       "pipeline.content_graph.min_similarity=0.99").pipeline
    assert content_graph.encoder_dir(cfg.content_graph, w) == new

    from PIL import Image

    def png(rgb):
        out = io.BytesIO()
        Image.new("RGB", (8, 8), rgb).save(out, format="PNG")
        return out.getvalue()

    good = [("red", png((200, 0, 0))), ("red2", png((180, 0, 0))), ("blue", png((0, 0, 200))),
            ("black", png((0, 0, 0)))]
    with beam_pipeline() as p:
        content = p | beam.Create(good) | content_graph.BuildContentGraph(cfg.content_graph, 8, new, S.IMAGE_BYTES)
        assert_that(content[content_graph.EMBEDDINGS] | beam.MapTuple(lambda i, v: (i, np.round(v, 3).tolist())),
                    equal_to([("red", [1.0, 0.0, 0.0]), ("red2", [1.0, 0.0, 0.0]), ("blue", [0.0, 0.0, 1.0])]),
                    label="embeddings")
        assert_that(content[content_graph.DROPPED], equal_to(["black"]), label="black_is_zero")
        assert_that(content[content_graph.EDGES], equal_to([(("red", "red2"), pytest.approx(1.0))]), label="edges")


def test_model_source_with_the_demo_export(demo_exported, small_config):
    """The real exported image_encoder of the demo chain, through RunInference, on a few corpus images."""
    import tensorflow as tf
    from clicklens import features as F
    from clicklens import servables as S

    model_dir = content_graph.encoder_dir(small_config.pipeline.content_graph, demo_exported)
    spec = F.corpus_feature_spec(small_config.pipeline.image_source, small_config.pipeline.feature_dim)
    files = sorted(glob.glob(demo_exported.split_glob("corpus")))
    corpus = [tf.io.parse_single_example(s, spec) for s in
              tf.data.TFRecordDataset(files, compression_type="GZIP").take(12)]
    good = [(ex[F.IMAGE_ID].numpy().decode(), ex[F.IMAGE].numpy()) for ex in corpus]
    signature = tf.saved_model.load(model_dir).signatures[S.DEFAULT_SIGNATURE]
    direct = signature(image_bytes=tf.constant([png for _, png in good]))[S.EMBEDDING].numpy()
    expected = {image_id: v / np.linalg.norm(v) for (image_id, _), v in zip(good, direct)}

    def check(embeddings):
        assert sorted(i for i, _ in embeddings) == sorted(expected)
        for image_id, vector in embeddings:
            assert vector.shape == (small_config.model.embedding_dim,)
            np.testing.assert_allclose(vector, expected[image_id], atol=1e-5)

    with beam_pipeline() as p:
        embedded = p | beam.Create(good) | content_graph.ContentEmbeddings(
            "model", small_config.pipeline.image_size, model_dir, S.IMAGE_BYTES, batch_size=5)
        assert_that(embedded[content_graph.EMBEDDINGS], check)
