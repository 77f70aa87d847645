"""`clicklens export --gate`: a worse candidate is not published; the decision and both figures are reported."""

import json

import pytest

from clicklens import compat  # noqa: F401
import tensorflow as tf

from clicklens import servables as S
from tests import trainer_synthetic as synth
from trainer import export, gate, task
from trainer.model import build_model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A trained synthetic model exported once (version 1, no gate)."""
    workdir = synth.write_workdir(str(tmp_path_factory.mktemp("gate") / "w"))
    config = synth.trainer_config(["training.steps_per_epoch=30", "export.k=5"])
    model = task.train(config, workdir)
    version, _ = export.export(config, workdir, model)
    assert version == 1
    return config, workdir, model


def _versions(workdir):
    return {name: sorted(S.version_dirs(workdir.export_model(name))) for name in S.MODEL_NAMES}


def test_the_same_model_passes_and_is_published_as_one_version(served):
    config, workdir, model = served
    version, report = export.export(config, workdir, model, gate=True)
    g = report["gate"]
    assert g["decision"] == "publish" and g["served_version"] == 1 and report["published"]
    # The same weights through the served SavedModels and the candidate's towers: the same figures.
    assert g["candidate"]["selected_pairs"]["recall@10"] == pytest.approx(g["served"]["selected_pairs"]["recall@10"],
                                                                        abs=1e-6)
    assert "ground_truth" in g["candidate"]
    assert all(v == [1, version] for v in _versions(workdir).values())  # all four models at the new version


def test_a_worse_candidate_is_rejected_and_nothing_is_written(served):
    config, workdir, model = served
    before = _versions(workdir)
    tf.keras.utils.set_random_seed(123)
    untrained = build_model(config, model.query_tower.get_layer("token_embedding").input_dim)
    strict = synth.trainer_config(["training.steps_per_epoch=30", "export.k=5", "export.gate_tolerance=0.0"])
    version, report = export.export(strict, workdir, untrained, gate=True)
    g = report["gate"]
    assert version is None and not report["published"] and g["decision"] == "reject"
    assert g["candidate"]["selected_pairs"]["recall@10"] < g["served"]["selected_pairs"]["recall@10"]
    assert _versions(workdir) == before
    on_disk = json.loads(tf.io.gfile.GFile(f"{workdir.export}/report.json").read())
    assert on_disk["gate"]["decision"] == "reject"
    assert not tf.io.gfile.glob(f"{workdir.export}/*/.tmp-*")  # nothing staged left behind


def test_the_decision_is_the_metric_within_the_tolerance(served):
    config = served[0]
    lenient = synth.trainer_config(["training.steps_per_epoch=30", "export.k=5", "export.gate_tolerance=1.0"])
    assert gate.decide(lenient, {"selected_pairs": {"recall@10": 0.0}}, {"selected_pairs": {"recall@10": 0.9}})
    assert not gate.decide(config, {"selected_pairs": {"recall@10": 0.5}}, {"selected_pairs": {"recall@10": 0.9}})
    assert gate.decide(config, {"selected_pairs": {"recall@10": 0.0}}, None)  # nothing served


def test_nothing_served_means_publish(tmp_path):
    workdir = synth.write_workdir(str(tmp_path / "w"))
    assert gate.served_version(workdir) is None
