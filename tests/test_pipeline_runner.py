"""The whole pipeline on a tiny hand-made world (two worker processes), and Beam options from the CLI."""

import argparse
import glob
import io
import json
import os

import pytest

from clicklens.config import config_from_dict
from clicklens.errors import ClicklensError
from clicklens.workdir import Workdir

DATAFLOW_ARGS = ["--runner", "DataflowRunner", "--project", "p", "--region", "r",
                 "--temp_location", "gs://b/t", "--setup_file", "./setup.py"]


def _event(query, shown, clicked, category="color", image_query=None, session="s"):
    """One log line: `shown` at positions 1.., those in `clicked` clicked."""
    record = {"session_id": session, "time": 1.0, "category": category,
              "impressions": [{"image_id": i, "position": k + 1, "clicked": i in clicked} for k, i in enumerate(shown)]}
    if image_query:
        record["query_image_id"] = image_query
    else:
        record["query"] = query
    return json.dumps(record)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """Images a-d (+ x, whose file is missing) and a handful of events; numbers in the test are by hand."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny")
    w = Workdir(str(root))
    os.makedirs(w.images)
    os.makedirs(w.logs)
    catalog = []
    for image_id in "abcdx":
        if image_id != "x":
            buf = io.BytesIO()
            Image.new("RGB", (12, 12), (40 * "abcd".index(image_id), 0, 0)).save(buf, format="PNG")
            with open(os.path.join(w.images, f"{image_id}.png"), "wb") as f:
                f.write(buf.getvalue())
        catalog.append(json.dumps({"image_id": image_id, "uri": f"images/{image_id}.png"}))
    with open(w.catalog, "w") as f:
        f.write("\n".join(catalog) + "\n")
    lines = [_event("Red", ["a", "b"], {"a", "b"})] * 3 + [
        _event("blue", ["c", "a"], {"c"}),
        _event("red", ["x"], {"x"}),
        _event(None, ["b"], {"b"}, image_query="a"),
        _event(None, ["c"], {"c"}, image_query="d"),
        "{broken",
    ]
    with open(os.path.join(w.logs, "part-0.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return w


def _config():
    # The click graph alone (content_graph.source none): the numbers below are the click arithmetic
    # (tests/test_content_graph.py runs this kind of world with the content graph).
    return config_from_dict({"pipeline": {"eval_fraction": 0.0, "max_neighbors": 2, "image_size": 8,
                                          "vocab_size": 100, "num_shards": 1, "hard_negatives": 1,
                                          "content_graph": {"source": "none"}}})


def test_tiny_world_with_two_worker_processes(tiny_world):
    # ~30 s: two Beam worker processes each import TensorFlow.
    import tensorflow as tf
    from beam_pipelines import pipeline
    from clicklens import features as F
    from clicklens.vocabulary import RESERVED_TOKENS

    config = _config()
    args = argparse.Namespace(extra_args=["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"])
    assert pipeline.run(config, tiny_world, args) == 0

    spec = F.spec_from_config(config)
    files = sorted(glob.glob(tiny_world.split_glob("train")))
    examples = {}
    for s in tf.data.TFRecordDataset(files, compression_type="GZIP").as_numpy_iterator():
        ex = tf.io.parse_single_example(s, spec)
        key = (ex[F.QUERY].numpy().decode(), ex[F.IMAGE_ID].numpy().decode())
        examples[key] = (ex[F.neighbor_key(0, F.IMAGE_ID)].numpy().decode(), float(ex[F.neighbor_weight_key(0)]),
                         ex[F.neighbor_key(1, F.IMAGE_ID)].numpy().decode(), float(ex[F.CLICK_WEIGHT]),
                         float(ex[F.CANDIDATE_PROBABILITY]), ex[F.negative_key(0, F.IMAGE_ID)].numpy().decode(),
                         ex[F.negative_key(0, F.IMAGE)].numpy()[:4])
    # red: a and b clicked 3 times (log 4); x's image is missing, so its example is dropped.
    # blue: c clicked once (log 2); a shown but never clicked for blue.
    # Edges: (a,b) co-click 3/3 + similar click 1/1 = 2.0; (c,d) similar click 1/1 = 1.0; (a,c) co-click 0/1.
    # d is a graph node without a query: an image-only example.  4 train examples, one per image.
    # Hard negative: a was shown for blue and never clicked; red's images were all clicked.
    lw, png = pytest.approx, b"\x89PNG"
    assert examples == {
        ("red", "a"): ("b", 2.0, "", lw(1.3862944), 0.25, "", b""),
        ("red", "b"): ("a", 2.0, "", lw(1.3862944), 0.25, "", b""),
        ("blue", "c"): ("d", 1.0, "", lw(0.6931472), 0.25, "a", png),
        ("", "d"): ("c", 1.0, "", 0.0, 0.25, "", b""),
    }
    report = pipeline.read_report(tiny_world)
    assert report["log_records"] == {"read": 8, "ok": 7}
    assert report["pairs"] == 5 and report["selected_pairs"] == 4  # blue-a shown, never clicked
    assert report["graph"] == {"edges": 2, "nodes": 4, "neighbor_links": 4, "cold_images": 0,
                               "cold_images_reached": 0, "edges_by_source": {"click": 2, "content": 0, "both": 0}}
    assert report["content_embeddings"] == {"computed": 0, "dropped": 0}
    assert report["examples"] == {"train": 4, "eval": 0, "corpus": 4, "image_only": 1, "dropped_bad_image": 1}
    assert report["bad_records"] == {"log": {"bad_json": 1}, "image": {"missing_image": 1}}
    assert report["neighbors_per_example"] == {"1": 4}
    assert report["negatives_per_example"] == {"0": 3, "1": 1}
    with open(tiny_world.vocab, encoding="utf-8") as f:
        vocab = f.read().splitlines()
    # Words this rare (4 events) stay below the learner's count threshold: they are spelled in pieces.
    assert vocab[:2] == RESERVED_TOKENS and set("redblu") <= set(vocab) and "##e" in vocab


def test_unknown_cli_options_are_beam_pipeline_options(tiny_world):
    from apache_beam.options.pipeline_options import GoogleCloudOptions, SetupOptions, StandardOptions
    from beam_pipelines import pipeline
    from clicklens import cli

    args = cli.parse_args(["pipeline", "--workdir", tiny_world.root, *DATAFLOW_ARGS])
    options = pipeline.pipeline_options(args.extra_args)
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    gcp = options.view_as(GoogleCloudOptions)
    assert (gcp.project, gcp.region, gcp.temp_location) == ("p", "r", "gs://b/t")
    assert options.view_as(SetupOptions).setup_file == "./setup.py"
    # make_pipeline hands these options to beam.Pipeline and leaves the runner to Beam.  (Not built
    # here: a Dataflow pipeline object already talks to GCS to check the staging bucket.)
    assert pipeline.local_runner(options) is None
    # With no options: the local FnApiRunner, never Prism (which would download a binary).
    assert type(pipeline.local_runner(pipeline.pipeline_options([]))).__name__ == "FnApiRunner"


def test_options_unknown_to_beam_are_refused_by_name():
    from beam_pipelines import pipeline
    from clicklens.errors import ClicklensError

    with pytest.raises(ClicklensError, match="--runnr"):
        pipeline.pipeline_options(["--runnr", "DataflowRunner", "--project", "p"])
    pipeline.pipeline_options(["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"])


def test_missing_inputs_are_clear_errors(tmp_path):
    from beam_pipelines import pipeline
    from clicklens.errors import ClicklensError

    with pytest.raises(ClicklensError, match="no log files match"):
        pipeline.check_inputs(_config(), Workdir(str(tmp_path)))
    bad = config_from_dict({"pipeline": {"entity_patterns": ["("]}})
    (tmp_path / "raw" / "logs").mkdir(parents=True)
    (tmp_path / "raw" / "logs" / "a.jsonl").write_text("{}\n")
    (tmp_path / "raw" / "catalog.jsonl").write_text("")
    with pytest.raises(ClicklensError, match="entity_patterns"):
        pipeline.check_inputs(bad, Workdir(str(tmp_path)))


def test_a_failed_rerun_keeps_the_last_good_outputs(tiny_world, tmp_path):
    import shutil

    from beam_pipelines import pipeline

    w = Workdir(str(tmp_path / "w"))
    shutil.copytree(tiny_world.raw, w.raw)
    args = argparse.Namespace(extra_args=[])
    assert pipeline.run(_config(), w, args) == 0
    good = {name: open(os.path.join(w.examples, name), "rb").read() for name in os.listdir(w.examples)}
    assert "report.json" in good and any(name.startswith("train-") for name in good)
    # A second run that dies half-way: a ".gz" shard that is really plain text.
    with open(os.path.join(w.logs, "part-1.jsonl.gz"), "w") as f:
        f.write(_event("red", ["a"], {"a"}) + "\n")
    with pytest.raises(ClicklensError, match=r"unreadable input file .*part-1\.jsonl\.gz.*BadGzipFile.*after 0 lines"
                                             r".*pipeline\.skip_corrupt_files=true"):
        pipeline.run(_config(), w, args)
    assert {name: open(os.path.join(w.examples, name), "rb").read() for name in os.listdir(w.examples)} == good
    # Fixed, the next run replaces them, and its staging folder is gone.
    os.remove(os.path.join(w.logs, "part-1.jsonl.gz"))
    assert pipeline.run(_config(), w, args) == 0
    assert sorted(os.listdir(w.examples)) == sorted(good) and not os.path.exists(os.path.join(w.root, "examples.next"))


def test_a_truncated_gzip_shard_is_an_error_naming_the_file(tiny_world, tmp_path):
    import gzip
    import shutil

    from beam_pipelines import pipeline

    w = Workdir(str(tmp_path / "w"))
    shutil.copytree(tiny_world.raw, w.raw)
    whole = gzip.compress(("\n".join(_event("red", ["a"], {"a"}) for _ in range(2000)) + "\n").encode())
    with open(os.path.join(w.logs, "part-1.jsonl.gz"), "wb") as f:
        f.write(whole[: len(whole) * 2 // 3])  # cut: Beam's own reader would stop quietly part-way
    with pytest.raises(ClicklensError, match=r"part-1\.jsonl\.gz: EOFError.*after \d+ lines.*skip_corrupt_files"):
        pipeline.run(_config(), w, argparse.Namespace(extra_args=[]))
    assert not os.path.exists(w.examples)  # nothing published from a half-read run
