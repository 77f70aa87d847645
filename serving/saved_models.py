"""What a SavedModel directory holds, read from its proto, and how to load it.

The server reads `saved_model.pb` before loading a version, so it can load the
ScaNN op library only for models whose graph uses ScaNN ops (op names in the
`Scann>` namespace): `retrieval_bruteforce` must load, and be served, by a
process that never imported scann, exactly as a stock tensorflow_model_server
would.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Set

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from clicklens.servables import INDEX_ATTRIBUTE, SAVED_MODEL_PB, SEARCHER_HANDLE_FUNCTION
from clicklens.workdir import join

logger = logging.getLogger(__name__)

SCANN_NAMESPACE = "Scann>"
SERVING_TAG = "serve"


def read_saved_model(path: str) -> saved_model_pb2.SavedModel:
    """The SavedModel proto of the model directory `path`."""
    proto = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(join(path, SAVED_MODEL_PB), "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def serving_meta_graph(proto: saved_model_pb2.SavedModel) -> meta_graph_pb2.MetaGraphDef:
    """The meta graph tagged `serve` (tf.saved_model.save writes exactly one)."""
    for meta_graph in proto.meta_graphs:
        if SERVING_TAG in meta_graph.meta_info_def.tags:
            return meta_graph
    raise ValueError("SavedModel has no meta graph tagged 'serve'")


def op_types(path: str) -> Set[str]:
    """Every op type in a SavedModel's graph, including its function library."""
    graph = serving_meta_graph(read_saved_model(path)).graph_def
    ops = {node.op for node in graph.node}
    for function in graph.library.function:
        ops.update(node.op for node in function.node_def)
    return ops


def needs_scann(path: str) -> bool:
    """True when the model's graph uses ops from ScaNN's op library."""
    return any(op.startswith(SCANN_NAMESPACE) for op in op_types(path))


def signature_defs(path: str) -> Dict[str, meta_graph_pb2.SignatureDef]:
    """The servable signatures (TF's internal `__saved_model_init_op` left out)."""
    meta_graph = serving_meta_graph(read_saved_model(path))
    return {k: v for k, v in meta_graph.signature_def.items() if not k.startswith("__")}


def ensure_scann_ops() -> None:
    """Registers ScaNN's TensorFlow ops in this process (idempotent)."""
    from scann.scann_ops.py import scann_ops  # noqa: F401  (loading the module registers the ops)


def ensure_text_ops() -> None:
    """Registers tensorflow-text's ops: TF Serving links them in since 2.2."""
    import tensorflow_text  # noqa: F401


def load(path: str):
    """Loads a SavedModel for serving, registering ScaNN ops only if its graph needs them."""
    ensure_text_ops()
    if needs_scann(path):
        logger.info("%s uses ScaNN ops: loading the scann op library", path)
        ensure_scann_ops()
    return tf.saved_model.load(path, tags=[SERVING_TAG])


def searcher_handles(model) -> List[tf.Tensor]:
    """The resource handles of the ScaNN searchers a loaded model holds (none for other models, or for a
    retrieval_scann exported before the handle was saved with it); the searchers are built if not yet."""
    index = getattr(model, INDEX_ATTRIBUTE, None)
    handle = getattr(index, SEARCHER_HANDLE_FUNCTION, None)
    return [handle()] if callable(handle) else []


def destroy_resources(handles: List[tf.Tensor]) -> None:
    """Frees resources by handle: a retired version's ScaNN searcher outlives the Python objects of its model
    (it sits in TensorFlow's resource manager under its shared name) until destroyed here."""
    for handle in handles:
        tf.raw_ops.DestroyResourceOp(resource=handle, ignore_lookup_error=True)
