"""Strategies: a real two-replica MirroredStrategy matches one device (also with the refreshed neighbour table);
absent devices are clear errors."""

import json

import pytest

from tests.conftest import run_python
from tests.trainer_synthetic import trainer_config
from clicklens.errors import ClicklensError

# Runs in a fresh interpreter: logical CPU devices must be configured before TensorFlow initialises.
MIRRORED_VS_ONE_DEVICE = r"""
import json, sys, tempfile
from clicklens import compat
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np
from tests import trainer_synthetic as synth
from trainer import input as I
from trainer.model import build_model
from trainer.tokenizer import QueryTokenizer
from trainer.strategy import make_strategy, global_batch_size
from trainer.task import make_optimizer
from trainer.neighbor_table import NeighborEmbeddingTable, RefreshNeighborTable

workdir = synth.write_workdir(tempfile.mkdtemp())
results, initial = {}, None
for kind, per_replica, table_steps in (("cpu", 8, 0), ("mirrored", 4, 0), ("cpu", 8, 2), ("mirrored", 4, 2)):
    config = synth.trainer_config([f"training.strategy={kind}", f"training.per_replica_batch_size={per_replica}",
                                   "training.graph_multiplier=0.5",
                                   f"training.graph_neighbor_table_steps={table_steps}"])
    strategy = make_strategy(config.training)
    batch = global_batch_size(config.training, strategy)
    tokenizer = QueryTokenizer(workdir.vocab, config.model.max_query_tokens)
    # Same global batches for both runs: no shuffling or augmentation.
    data = I.make_dataset(config, workdir, "train", batch, training=False, tokenizer=tokenizer, repeat=True)
    with strategy.scope():
        model = build_model(config, tokenizer.vocab_size)
        model.compile(make_optimizer(config.training))
        callbacks = []
        if table_steps:
            model.neighbor_table = NeighborEmbeddingTable(I.image_table_for(config, workdir), 8)
            callbacks.append(RefreshNeighborTable(model.neighbor_table, model.image_tower, table_steps))
    if initial is None:
        initial = [v.numpy() for v in model.trainable_variables]
    for variable, value in zip(model.trainable_variables, initial):
        variable.assign(value)
    history = model.fit(data, epochs=2, steps_per_epoch=2, verbose=0, callbacks=callbacks).history
    results[kind + ("-table" if table_steps else "")] = {"replicas": strategy.num_replicas_in_sync, "global_batch": batch, "history": history,
                     "weights": [v.numpy().tolist() for v in model.trainable_variables]}
def max_diff(one, two):
    return max(float(np.max(np.abs(np.array(a) - np.array(b))))
               for a, b in zip(results[one]["weights"], results[two]["weights"]))
print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "weights"} for k, v in results.items()}
                 | {"max_weight_diff": max_diff("cpu", "mirrored"),
                    "max_weight_diff_table": max_diff("cpu-table", "mirrored-table")}))
"""


def test_mirrored_two_replicas_match_one_device():
    # ~25 s: a fresh TensorFlow process training two tiny models.
    proc = run_python(MIRRORED_VS_ONE_DEVICE, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, two = out["cpu"], out["mirrored"]
    assert one["replicas"] == 1 and two["replicas"] == 2
    assert one["global_batch"] == two["global_batch"] == 8
    for name in ("loss", "retrieval_loss", "graph_loss"):
        assert two["history"][name] == pytest.approx(one["history"][name], rel=1e-4, abs=1e-6), name
    assert one["history"]["graph_loss"][0] > 0
    assert out["max_weight_diff"] < 1e-4
    # Neighbours' embeddings from the refreshed table: the same on both, and not the exact graph term.
    one, two = out["cpu-table"], out["mirrored-table"]
    for name in ("loss", "retrieval_loss", "graph_loss"):
        assert two["history"][name] == pytest.approx(one["history"][name], rel=1e-4, abs=1e-6), name
    assert one["history"]["graph_loss"][0] > 0
    assert one["history"]["graph_loss"] != pytest.approx(out["cpu"]["history"]["graph_loss"], rel=1e-4)
    assert out["max_weight_diff_table"] < 1e-4


def test_absent_devices_are_clear_errors(monkeypatch):
    from trainer.strategy import make_strategy

    with pytest.raises(ClicklensError, match="no TPU found"):
        make_strategy(trainer_config(["training.strategy=tpu", "training.tpu=no-such-tpu"]).training)
    with pytest.raises(ClicklensError, match="no GPU found"):
        make_strategy(trainer_config(["training.strategy=mirrored"]).training)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ClicklensError, match="TF_CONFIG is not set"):
        make_strategy(trainer_config(["training.strategy=multiworker"]).training)
    auto = make_strategy(trainer_config(["training.strategy=auto", "training.tpu=no-such-tpu"]).training)
    assert auto.num_replicas_in_sync == 1
