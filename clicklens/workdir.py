"""Where every stage reads and writes, below one work directory.

The layout is part of the command-line contract (docs/ARCHITECTURE.md):

    W/raw/catalog.jsonl, W/raw/images/, W/raw/logs/*.jsonl.gz (or dated: W/raw/logs/dt=YYYY-MM-DD/*.jsonl.gz),
          W/raw/ground_truth.jsonl (the newest day's), W/raw/ground_truth/dt=YYYY-MM-DD.jsonl (each day's)
    W/examples/train-*.tfrecord.gz, eval-*, corpus-*, vocab.txt, dead_letter-*.jsonl, report.json,
               logged_images-*.txt (every image id the logs showed; catalog images not in it are "cold")
    W/model/checkpoints/ (+ vocab.txt, finished.json), W/model/tensorboard/, W/model/metrics.json,
            W/model/previous/ (the finished run a warm-started run started from)
    W/updates/<day>.json (`clicklens update`)
    W/pretrain/checkpoints/, W/pretrain/tensorboard/, W/pretrain/image_tower/ (the pretrained tower's weights),
              W/pretrain/image_encoder/<version>/, W/pretrain/report.json (`clicklens pretrain`)
    W/export/<model name>/<version>/, W/export/models.config, W/export/report.json
    W/export/corpus_embeddings/<version>/ (the rows retrieval <version> was built over, for `clicklens reindex`),
             W/export/reindex_report.json; reindex's dead letters: W/examples/dead_letter-reindex-<version>.jsonl

Paths are strings joined with "/", so W may be local or gs://.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

from clicklens.errors import ClicklensError


def join(*parts: str) -> str:
    """Joins path parts with "/" (works for local paths and gs:// URLs)."""
    head, *rest = parts
    return "/".join([head.rstrip("/")] + [p.strip("/") for p in rest if p])


def write_text_atomically(path: str, text: str) -> None:
    """Writes `text` to `path` under a temporary name, then renames it into place, so a reader never sees half
    of it (where the filesystem's rename is atomic: local disks, not gs://)."""
    import tensorflow as tf

    staged = path + ".tmp"
    with tf.io.gfile.GFile(staged, "w") as f:
        f.write(text)
    tf.io.gfile.rename(staged, path, overwrite=True)


def check_workdir(root: str, writable: bool) -> None:
    """Raises ClicklensError, in one line, when `root` cannot serve as a work directory.

    An empty path would resolve to "/" (every path is joined below it); a file
    is not a directory; a verb that writes needs a folder it can create files
    in (tried for real: permission bits say nothing on a read-only mount or to
    root).  Remote roots (gs://...) are left to the stage that opens them.
    """
    if not root.strip():
        raise ClicklensError("--workdir is empty: give a directory (created when missing)")
    if "://" in root:
        return
    if os.path.exists(root) and not os.path.isdir(root):
        raise ClicklensError(f"--workdir {root}: not a directory")
    if not writable:
        return
    try:
        os.makedirs(root, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as err:
        raise ClicklensError(f"--workdir {root}: cannot write there ({err.strerror or err})") from None


@dataclasses.dataclass(frozen=True)
class Workdir:
    """The paths of one clicklens work directory."""

    root: str
    # The pipeline writes into a staging folder (examples_folder="examples.next") and moves the
    # finished files into "examples", so a failed run leaves the last good outputs in place.
    examples_folder: str = "examples"

    # Raw inputs (written by generate-demo-data, or supplied by the user).
    @property
    def raw(self) -> str:
        return join(self.root, "raw")

    @property
    def catalog(self) -> str:
        return join(self.raw, "catalog.jsonl")

    @property
    def images(self) -> str:
        return join(self.raw, "images")

    @property
    def logs(self) -> str:
        return join(self.raw, "logs")

    @property
    def logs_glob(self) -> str:
        """Every log file under W/raw/logs, flat or in dt=YYYY-MM-DD partitions (Beam's ** crosses folders)."""
        return join(self.logs, "**.jsonl*")

    @property
    def ground_truth(self) -> str:
        return join(self.raw, "ground_truth.jsonl")

    def daily_ground_truth(self, day: str) -> str:
        """The demo world's ground truth as it stood on `day` (YYYY-MM-DD; tastes drift between days)."""
        return join(self.raw, "ground_truth", f"dt={day}.jsonl")

    @property
    def similar_images(self) -> str:
        """The demo world's image -> similar images truth (same shape and colour), for evaluation only."""
        return join(self.raw, "similar_images.jsonl")

    # Pipeline outputs.
    @property
    def examples(self) -> str:
        return join(self.root, self.examples_folder)

    def split_glob(self, split: str) -> str:
        """Glob of one split's TFRecords: split is train, eval or corpus."""
        return join(self.examples, f"{split}-*.tfrecord.gz")

    @property
    def vocab(self) -> str:
        return join(self.examples, "vocab.txt")

    @property
    def report(self) -> str:
        return join(self.examples, "report.json")

    @property
    def logged_images_glob(self) -> str:
        """Text shards listing, one per line, every image id shown in a valid log record."""
        return join(self.examples, "logged_images-*.txt")

    # Trainer outputs.
    @property
    def model(self) -> str:
        return join(self.root, "model")

    @property
    def checkpoints(self) -> str:
        return join(self.model, "checkpoints")

    @property
    def tensorboard(self) -> str:
        return join(self.model, "tensorboard")

    @property
    def metrics(self) -> str:
        return join(self.model, "metrics.json")

    # Pretraining outputs (trainer/pretrain.py).
    @property
    def pretrain(self) -> str:
        return join(self.root, "pretrain")

    @property
    def pretrained_tower(self) -> str:
        """The pretrained image tower's weights (a save_weights prefix) that model.image_init=pretrained loads."""
        return join(self.pretrain, "image_tower", "weights")

    @property
    def pretrain_report(self) -> str:
        """`clicklens pretrain`'s report, written last: the run finished."""
        return join(self.pretrain, "report.json")

    # Export outputs.
    @property
    def export(self) -> str:
        return join(self.root, "export")

    def export_model(self, name: str) -> str:
        return join(self.export, name)

    @property
    def models_config(self) -> str:
        return join(self.export, "models.config")

    @property
    def corpus_embeddings(self) -> str:
        """Base folder of the corpus embeddings versions (clicklens/corpus_embeddings.py)."""
        return join(self.export, "corpus_embeddings")

    @property
    def reindex_report(self) -> str:
        return join(self.export, "reindex_report.json")

    def reindex_dead_letters(self, version: int) -> str:
        """The dead letters of the `clicklens reindex` run that wrote retrieval `version` (next to the pipeline's)."""
        return join(self.examples, f"dead_letter-reindex-{version}.jsonl")
