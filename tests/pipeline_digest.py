"""A digest of everything `clicklens pipeline` writes, independent of how Beam shards and orders it.

Beam assigns records to shards at random (WriteToTFRecord / WriteToText start each
bundle's round robin at a random shard), so two runs of the same pipeline on the same
inputs write the same records in different files and orders.  The canonical content of
an output is therefore the sorted list of its records (TFRecords: the serialized
tf.train.Example bytes, which the pipeline writes with deterministic serialization;
text outputs: their lines, with the work dir's path, which dead letters name, replaced by
"<W>"); whole files (vocab.txt, report.json) are taken as they are.

    python -m tests.pipeline_digest W/examples     # prints the digests as a Python dict
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import os
import sys
from typing import Dict, Iterable, List

# Sharded outputs (prefix -> suffix) and whole files of a pipeline run.
SHARDED = {"train": ".tfrecord.gz", "eval": ".tfrecord.gz", "corpus": ".tfrecord.gz",
           "dead_letter": ".jsonl", "logged_images": ".txt"}
WHOLE_FILES = ("vocab.txt", "report.json")


def tfrecords(path: str) -> Iterable[bytes]:
    """The records of one gzip TFRecord file, read with the stdlib (TFRecord framing: length, crc, data, crc)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    offset = 0
    while offset < len(data):
        length = int.from_bytes(data[offset:offset + 8], "little")
        offset += 12
        yield data[offset:offset + length]
        offset += length + 4


def _digest(records: List[bytes]) -> str:
    h = hashlib.sha256()
    for record in sorted(records):
        h.update(len(record).to_bytes(8, "little"))
        h.update(record)
    return h.hexdigest()


def output_records(examples_dir: str) -> Dict[str, List[bytes]]:
    """{output name: its records} for every output of the run in `examples_dir`."""
    out = {}
    workdir = os.path.dirname(os.path.normpath(examples_dir)).encode("utf-8")
    for prefix, suffix in SHARDED.items():
        files = sorted(glob.glob(os.path.join(examples_dir, f"{prefix}-*-of-*{suffix}")))
        if suffix == ".tfrecord.gz":
            out[prefix] = [r for path in files for r in tfrecords(path)]
        else:
            out[prefix] = [line.replace(workdir, b"<W>") for path in files
                           for line in open(path, "rb").read().splitlines()]
    for name in WHOLE_FILES:
        with open(os.path.join(examples_dir, name), "rb") as f:
            out[name] = [f.read()]
    return out


def output_digests(examples_dir: str) -> Dict[str, str]:
    """{output name: sha256 of its canonical content} (see the module docstring)."""
    return {name: _digest(records) for name, records in output_records(examples_dir).items()}


if __name__ == "__main__":
    print(repr(output_digests(sys.argv[1])))
