"""TF Serving's model config file (`ModelServerConfig` in protobuf text format).

`clicklens export` writes `W/export/models.config`; `clicklens serve` and a
stock `tensorflow_model_server --model_config_file=...` both read it.
"""

from __future__ import annotations

import logging
import os
import posixpath
from typing import List, Mapping

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from clicklens.errors import ClicklensError
from clicklens.workdir import write_text_atomically

ModelConfig = model_server_config_pb2.ModelConfig
logger = logging.getLogger(__name__)


def build(base_paths: Mapping[str, str], num_versions: int = 1) -> model_server_config_pb2.ModelServerConfig:
    """A config that serves each named model's latest `num_versions` versions."""
    config = model_server_config_pb2.ModelServerConfig()
    for name, base_path in base_paths.items():
        entry = config.model_config_list.config.add()
        entry.name = name
        entry.base_path = base_path
        entry.model_platform = "tensorflow"
        entry.model_version_policy.latest.num_versions = num_versions
    return config


def write(path: str, config: model_server_config_pb2.ModelServerConfig) -> None:
    """Writes the config as protobuf text (atomically where the filesystem allows)."""
    write_text_atomically(path, text_format.MessageToString(config))


def read(path: str) -> List[ModelConfig]:
    """The model entries of a models.config file; ClicklensError if missing or malformed."""
    if not tf.io.gfile.exists(path):
        raise ClicklensError(f"{path}: model config not found (run `clicklens export` first)")
    with tf.io.gfile.GFile(path, "r") as f:
        text = f.read()
    return parse(text, path)


def parse(text: str, path: str) -> List[ModelConfig]:
    """The model entries of a ModelServerConfig in protobuf text; ClicklensError (TF Serving's words) if malformed."""
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as err:
        # tensorflow_model_server's words, which scripts and its own tests look for.
        raise ClicklensError(f"Invalid protobuf file: '{path}': not a TF Serving ModelServerConfig: {err}") from None
    return entries(config, path)


def entries(config: model_server_config_pb2.ModelServerConfig, source: str) -> List[ModelConfig]:
    """The model entries of a ModelServerConfig message, checked as TF Serving checks them."""
    if config.WhichOneof("config") != "model_config_list":
        raise ClicklensError(f"{source}: only model_config_list configs are supported")
    models = list(config.model_config_list.config)
    names = [m.name for m in models]
    if len(set(names)) != len(names) or not all(names):
        raise ClicklensError(f"{source}: model names must be non-empty and unique, got {names}")
    for m in models:
        if m.model_platform not in ("", "tensorflow"):
            raise ClicklensError(f"{source}: model {m.name}: platform {m.model_platform!r} is not supported")
        if not m.base_path:
            raise ClicklensError(f"{source}: model {m.name}: base_path is empty")
    return models


def single_model(name: str, base_path: str) -> List[ModelConfig]:
    """The one-model config of tensorflow_model_server's --model_name / --model_base_path (latest version)."""
    return list(build({name: base_path}).model_config_list.config)


def served_beside(models: List[ModelConfig], path: str) -> List[ModelConfig]:
    """The entries of the models.config at `path`, each served from the folder beside it when there is one.

    Export writes absolute base paths, as TF Serving needs.  A work directory
    that was copied or moved keeps that file, whose paths still name the
    original: a model whose folder `<config's folder>/<name>` exists is served
    from there (logged when that differs from its base_path).  A model found
    in neither place is warned about at once, instead of serving nothing; one
    found only at its base_path too, as that is another directory's model.
    """
    here = posixpath.dirname(path.rstrip("/")) or "."
    out = []
    for model in models:
        model = ModelConfig.FromString(model.SerializeToString())  # a copy: the caller's list is left as read
        beside = posixpath.join(here, model.name)
        if tf.io.gfile.isdir(beside) and not _same_folder(beside, model.base_path):
            logger.info("model %s: serving %s (the folder beside %s) instead of its base_path %s",
                        model.name, beside, path, model.base_path)
            model.base_path = beside
        elif not tf.io.gfile.isdir(model.base_path):
            logger.warning("model %s: base_path %s does not exist; it serves nothing until a version appears there",
                           model.name, model.base_path)
        elif not tf.io.gfile.isdir(beside):
            # e.g. a copied work directory that lost this model's folder: the original's is served
            logger.warning("model %s: no folder %s beside %s, so its base_path %s (outside this export folder) is "
                           "served; `clicklens export` writes this work directory's own", model.name, beside, path,
                           model.base_path)
        out.append(model)
    return out


def _same_folder(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)
