"""The compatibility module makes the pinned stack importable in any order."""

import itertools

import pytest

from tests.conftest import run_python

CHECK = """
import {order}
import neural_structured_learning as nsl
import tensorflow as tf
import tensorflow_recommenders as tfrs
assert tf.__version__.startswith("2.20"), tf.__version__
assert tf.keras.layers.Dense.__module__.startswith("tf_keras"), tf.keras.layers.Dense.__module__
base = tf.keras.Sequential([tf.keras.layers.Dense(2, input_shape=(3,))])
graph = nsl.keras.GraphRegularization(base, nsl.configs.make_graph_reg_config(max_neighbors=1))
task = tfrs.tasks.Retrieval()
loss = task(tf.eye(3), tf.eye(3))
assert float(loss) > 0
print("ok", type(graph).__name__, type(task).__name__)
"""


@pytest.mark.parametrize("order", list(itertools.permutations(["trainer", "beam_pipelines", "serving"])),
                         ids=lambda o: "-".join(o))
def test_any_import_order_gives_working_nsl_and_tfrs(order):
    result = run_python(CHECK.format(order=", ".join(order)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok GraphRegularization Retrieval" in result.stdout


def test_neighbor_naming_matches_nsl():
    import neural_structured_learning as nsl

    from clicklens import features

    config = nsl.configs.GraphNeighborConfig()
    assert features.NBR_PREFIX == config.prefix
    assert features.NBR_WEIGHT_SUFFIX == config.weight_suffix


def test_only_compat_knows_the_workarounds(repo_root):
    """No module but clicklens/compat.py sets TF_USE_LEGACY_KERAS or stubs tensorflow.estimator."""
    offenders = []
    packages = ("clicklens", "trainer", "beam_pipelines", "serving", "benchmarks")
    for path in itertools.chain(*(repo_root.joinpath(p).rglob("*.py") for p in packages)):
        if path.name == "compat.py":
            continue
        text = path.read_text(encoding="utf-8")
        if "TF_USE_LEGACY_KERAS" in text or "tensorflow.estimator" in text:
            offenders.append(str(path.relative_to(repo_root)))
    assert offenders == []
