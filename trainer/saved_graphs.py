"""A retrieval model's next version written from the graph of the last one: new variables, no trace.

    graphs = SavedGraphs()                       # a `clicklens reindex --watch` keeps one (reindex.WarmState)
    (tmp, final), reused = graphs.stage(module, base_path, version, sample_image)
    export.publish_staged({module.name: (tmp, final)})

A retrieval model's graph does not depend on the corpus it holds: the corpus tensors (brute force's
candidates, ScaNN's state, the image ids) are variables of unknown length, and what the trace reads as Python
values (k, the number of brute-force blocks, ScaNN's search depth) is the module's `graph_key()`.  Yet
tf.saved_model.save traces and serializes the signatures again on every call: 0.2-0.4 s a model, most of a
reindex pass's writing.  So `stage` keeps the files of the last version it traced and saved for each model
(saved_model.pb, the warmup requests in assets.extra/), and writes a model whose key and encoders are those
of that version as those files plus a checkpoint of the module's variables (tf.train.Checkpoint, the format
and keys tf.saved_model.save writes: the keys and dtypes are checked against the kept version's, and a
mismatch falls back to a full save) and a fingerprint.  The version is a complete SavedModel; a server
loads it as any other.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from typing import Dict, NamedTuple, Optional, Tuple

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf
from tensorflow.python.saved_model import fingerprinting_utils  # what tf.saved_model.save calls for fingerprint.pb

from clicklens import servables as S
from clicklens.workdir import join
from trainer import export

logger = logging.getLogger(__name__)

VARIABLES = join("variables", "variables")  # the checkpoint prefix inside a SavedModel folder
EXTRA = "assets.extra"


class GraphMismatch(Exception):
    """The module's checkpoint does not have the keys the kept graph restores."""


class SavedGraph(NamedTuple):
    """The files of a saved model version that do not depend on its variables' values."""

    key: Tuple  # the module's graph_key()
    encoders: object  # the encoders it was traced with (compared by identity)
    saved_model: bytes  # saved_model.pb
    extra: Dict[str, bytes]  # assets.extra/ files by name (the warmup requests)
    checkpoint_dtypes: Dict[str, tf.DType]  # what its graph restores: checkpoint key -> dtype


def checkpoint_dtypes(prefix: str) -> Dict[str, tf.DType]:
    """{key: dtype} of a checkpoint (read from its index file)."""
    return tf.train.load_checkpoint(prefix).get_variable_to_dtype_map()


def capture(folder: str, module) -> SavedGraph:
    """The graph files of the SavedModel in `folder`, saved from `module`."""
    with tf.io.gfile.GFile(join(folder, S.SAVED_MODEL_PB), "rb") as f:
        saved_model = f.read()
    extra = {}
    if tf.io.gfile.isdir(join(folder, EXTRA)):
        for name in tf.io.gfile.listdir(join(folder, EXTRA)):
            with tf.io.gfile.GFile(join(folder, EXTRA, name), "rb") as f:
                extra[name] = f.read()
    return SavedGraph(module.graph_key(), module.encoders, saved_model, extra,
                      checkpoint_dtypes(join(folder, VARIABLES)))


def write_with_graph(graph: SavedGraph, module, folder: str) -> None:
    """Writes `module` into the empty `folder` as a SavedModel with `graph`'s files; GraphMismatch when its
    checkpoint is not what that graph restores."""
    tf.io.gfile.makedirs(join(folder, EXTRA))
    with tf.io.gfile.GFile(join(folder, S.SAVED_MODEL_PB), "wb") as f:
        f.write(graph.saved_model)
    for name, content in graph.extra.items():
        with tf.io.gfile.GFile(join(folder, EXTRA, name), "wb") as f:
            f.write(content)
    tf.train.Checkpoint(root=module).write(join(folder, VARIABLES))
    written = checkpoint_dtypes(join(folder, VARIABLES))
    if written != graph.checkpoint_dtypes:
        differ = sorted(set(written.items()) ^ set(graph.checkpoint_dtypes.items()))
        raise GraphMismatch(f"{len(differ)} checkpoint keys differ from the kept graph's, e.g. {differ[0]}")
    fingerprinting_utils.write_fingerprint(folder)


class SavedGraphs:
    """The graph of the last version of each model this object staged, and the staging that reuses it."""

    def __init__(self):
        self._graphs: Dict[str, SavedGraph] = {}

    def clear(self) -> None:
        """Forgets every kept graph (e.g. the encoders changed)."""
        self._graphs.clear()

    def reusable(self, module) -> Optional[SavedGraph]:
        """The kept graph of the model `module` is a version of, if `module` would save that graph."""
        graph = self._graphs.get(module.name)
        if graph is not None and graph.encoders is module.encoders and graph.key == module.graph_key():
            return graph
        return None

    def stage(self, module, base_path: str, version: int, sample_image) -> Tuple[Tuple[str, str], bool]:
        """((temporary folder, final folder), whether the kept graph was reused) of version `version` of the
        model `module` is (a trainer.export_signatures.Retrieval named after its model), written under a
        temporary name: from the kept graph when the module's key and encoders are its, else traced and saved
        (and its graph kept)."""
        name = module.name
        graph = self.reusable(module)
        tmp, final = S.start_version(base_path, version)
        if graph is not None:
            try:
                write_with_graph(graph, module, tmp)
                return (tmp, final), True
            except GraphMismatch as err:
                logger.warning("%s: not reusing the graph of the last version: %s; tracing it again", name, err)
                tf.io.gfile.rmtree(tmp)
        servable = export.Servable(module, module.signatures(), export.save_options(name))
        tmp, final = export.stage_version(servable, base_path, version,
                                          export.warmup_logs(name, servable, sample_image))
        self._graphs[name] = capture(tmp, module)
        return (tmp, final), False

    def prepare(self, module, sample_image) -> None:
        """Traces and saves `module` into a scratch folder and keeps its graph, so that the next `stage` of a
        module with its key writes variables only (a watch with nothing to do prepares the next pass)."""
        if self.reusable(module) is not None:
            return
        scratch = tempfile.mkdtemp(prefix="clicklens-graph-")
        try:
            self.stage(module, scratch, 1, sample_image)
        except Exception as err:  # noqa: BLE001  (an optimization: the next version is then saved in full)
            logger.warning("%s: could not prepare its graph (%s); its next version is traced and saved", module.name,
                           str(err).splitlines()[0] if str(err) else type(err).__name__)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
