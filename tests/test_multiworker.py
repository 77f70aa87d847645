"""Several workers for real, on one machine.

Training: two `python -m trainer.task` processes on 127.0.0.1, each with the
TF_CONFIG that Vertex AI (or any cluster) would give it, train a few steps with
MultiWorkerMirroredStrategy on CPU over the demo examples and together leave one
consistent checkpoint.  Pipeline: the Beam pipeline on two DirectRunner
processes writes the same examples as the single-process run.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import DEMO_CONFIG, REPO, SMALL_WORLD, free_ports

STEPS = 4


def _wait_all(processes, timeout: float):
    """Exit codes of all processes; once one fails the others are stopped (they would wait for it forever)."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in processes):
            break
        time.sleep(0.5)
    for p in processes:
        if p.poll() is None:
            p.kill()
    return [p.wait() for p in processes]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_workers_train_and_write_one_checkpoint(demo_examples, tmp_path):
    # ~60 s on 2 cores: two TensorFlow processes start and train in lockstep.
    import tensorflow as tf

    from clicklens.config import load_config
    from trainer.model import restore_model
    from clicklens.workdir import Workdir

    # A workdir of its own (the shared one's model/ belongs to the demo_trained fixture).
    workdir = Workdir(str(tmp_path / "w"))
    shutil.copytree(demo_examples.examples, workdir.examples)

    overrides = SMALL_WORLD + ["training.strategy=multiworker", f"training.steps_per_epoch={STEPS}",
                               "training.epochs=1", "training.checkpoint_every_steps=2"]
    argv = [sys.executable, "-m", "trainer.task", "--config", DEMO_CONFIG, "--workdir", workdir.root]
    argv += [a for o in overrides for a in ("--set", o)]
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
                   TF_CONFIG=json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}))
        env.pop("AIP_CHECKPOINT_DIR", None)
        log = open(tmp_path / f"worker{index}.log", "w")
        processes.append((subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        codes = _wait_all([p for p, _ in processes], timeout=540)
    finally:
        for p, log in processes:
            if p.poll() is None:
                p.kill()
            log.close()
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    assert all("CollectiveAllReduceStrategy with 2 replica(s)" in log for log in logs)  # = MultiWorkerMirroredStrategy

    # One checkpoint, at the last step, in the work dir (no per-worker leftovers beside it).
    latest = tf.train.latest_checkpoint(workdir.checkpoints)
    assert latest is not None
    reader = tf.train.load_checkpoint(latest)
    assert reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == STEPS
    assert all(not name.startswith("workertemp") for name in tf.io.gfile.listdir(workdir.checkpoints))
    # It restores into the model the config describes.
    model = restore_model(load_config(DEMO_CONFIG, SMALL_WORLD), workdir)
    assert model is not None


def _examples(pattern: str):
    """The records of a split as a set of canonical (deterministically re-serialized) tf.train.Examples."""
    import tensorflow as tf

    files = tf.io.gfile.glob(pattern)
    assert files, pattern
    records = set()
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP").as_numpy_iterator():
        example = tf.train.Example.FromString(record)
        records.add(example.SerializeToString(deterministic=True))
    return records


def _dead_letters(pattern: str):
    """Dead-letter records, sorted; object addresses in error details ("<... at 0x7f...>") vary by process."""
    import tensorflow as tf

    lines = []
    for path in tf.io.gfile.glob(pattern):
        with tf.io.gfile.GFile(path, "r") as f:
            lines += [re.sub(r" at 0x[0-9a-f]+>", ">", line) for line in f.read().splitlines()]
    return sorted(lines)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pipeline_on_two_direct_runner_processes_writes_the_same_examples(demo_examples, tmp_path):
    # ~60-120 s on 2 cores: the whole pipeline again, in two worker processes.
    import tensorflow as tf

    from tests.conftest import run_verb
    from clicklens.workdir import Workdir

    single = demo_examples
    multi = Workdir(str(tmp_path / "multi"))
    run_verb("pipeline", multi.root, "--direct_num_workers", "2", "--direct_running_mode", "multi_processing",
             overrides=[f"pipeline.logs={single.logs_glob}", f"pipeline.catalog={single.catalog}"])

    for split in ("train", "eval", "corpus"):
        expected = _examples(single.split_glob(split))
        assert expected, split
        assert _examples(multi.split_glob(split)) == expected, split
    dead_letters = _dead_letters(f"{single.examples}/dead_letter-*")
    assert dead_letters and _dead_letters(f"{multi.examples}/dead_letter-*") == dead_letters
    with tf.io.gfile.GFile(multi.vocab) as a, tf.io.gfile.GFile(single.vocab) as b:
        assert a.read() == b.read()  # token ids are line numbers: same order too
