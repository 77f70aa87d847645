"""Importing a pipeline stage does not import TensorFlow.

A Beam worker that parses logs, counts clicks or builds the graph should not pay TensorFlow's start-up
(seconds, hundreds of MB) nor need it installed.  The stages that do need TensorFlow import it inside the
function that uses it (a DoFn's setup, a helper), so importing any beam_pipelines module, even
beam_pipelines.pipeline, which imports every stage, must leave TensorFlow unloaded.

The check runs in a fresh interpreter: this test process has long imported TensorFlow.
"""

import ast
import json
import pathlib

import pytest

from tests.conftest import REPO, run_python

PACKAGE = REPO / "beam_pipelines"
# Top-level packages that count as "TensorFlow" (tf_keras and tensorflow_text load it).
TF_PACKAGES = ("tensorflow", "tensorflow_text", "tf_keras", "keras")

# The stages that need TensorFlow at run time, and why; each imports it inside a function, never at the top:
RUN_TIME_TF = {
    # prepares the catalog's pixels in its DoFn's setup with clicklens.images (tf.image decode and resize)
    "beam_pipelines.images": "clicklens.images",
    # decodes PNGs and runs the image encoder SavedModel for the content graph (RunInference)
    "beam_pipelines.content_graph": "tensorflow",
    # counts words with tensorflow-text's BasicTokenizer and learns the WordPiece vocabulary
    "beam_pipelines.vocab": "tensorflow_text",
}
# Not on this list: beam_pipelines.outputs writes tf.train.Example records with clicklens.features'
# ExampleSerializer, which encodes the protocol buffer without TensorFlow.

# Core modules that import TensorFlow when imported (a lazy import of one of them loads TensorFlow).
CORE_TF_AT_IMPORT = ("clicklens.images", "clicklens.models_config")

CHECK = """
import importlib, json, sys
import clicklens
from clicklens import compat

# compat registers an empty `tensorflow.estimator` stand-in (no file) without importing TensorFlow.
def tf_loaded():
    return sorted(m for m in sys.modules if m.split(".")[0] in {packages!r} and m != compat._ESTIMATOR)

loaded = {{"clicklens": sorted({{m.split(".")[0] for m in tf_loaded()}})}}
for name in {modules!r}:
    before = set(tf_loaded())
    importlib.import_module(name)
    loaded[name] = sorted({{m.split(".")[0] for m in set(tf_loaded()) - before}})  # the packages it loaded
loaded["apache_beam imported"] = "apache_beam" in sys.modules
print(json.dumps(loaded))
"""


def stage_modules():
    """Every module of beam_pipelines, the package first (a new stage is checked without editing this test)."""
    return ["beam_pipelines"] + sorted(f"beam_pipelines.{p.stem}" for p in PACKAGE.glob("*.py")
                                       if p.stem != "__init__")


def test_no_pipeline_stage_imports_tensorflow():
    """One interpreter imports every stage in turn and records what each newly loaded; the first stage that
    loads TensorFlow is named (once it is loaded, later stages cannot be told apart: fix and rerun)."""
    modules = stage_modules()
    assert {"beam_pipelines.parse", "beam_pipelines.sessions", "beam_pipelines.click_stats",
            "beam_pipelines.selection", "beam_pipelines.graph", "beam_pipelines.pipeline"} <= set(modules)
    result = run_python(CHECK.format(packages=TF_PACKAGES, modules=modules), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded.pop("apache_beam imported")  # the stages were really imported
    offenders = {name: tf for name, tf in loaded.items() if tf}
    assert offenders == {}, f"importing these loaded TensorFlow: {offenders}"
    assert list(loaded) == ["clicklens"] + modules


def function_imports(path: pathlib.Path):
    """(function name, imported module) of every import inside a function of one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    yield from ((function.name, alias.name) for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    yield function.name, node.module
                    yield from ((function.name, f"{node.module}.{alias.name}") for alias in node.names)


def brings_tf(module: str) -> bool:
    return module.split(".")[0] in TF_PACKAGES or module in CORE_TF_AT_IMPORT


def test_only_the_image_and_vocabulary_stages_import_tensorflow_when_they_run():
    """The lazy imports: a stage outside RUN_TIME_TF that imported TensorFlow inside a function would pass the
    import test above and still load TensorFlow on every worker that runs it."""
    lazy = {}
    for path in sorted(PACKAGE.glob("*.py")):
        for function, module in function_imports(path):
            if brings_tf(module):
                lazy.setdefault(f"beam_pipelines.{path.stem}", set()).add(module.split(".")[0])
    assert set(lazy) == set(RUN_TIME_TF), lazy
    for stage, why in RUN_TIME_TF.items():
        assert why.split(".")[0] in lazy[stage], (stage, lazy[stage])


@pytest.mark.parametrize("module", CORE_TF_AT_IMPORT)
def test_the_core_modules_listed_as_loading_tensorflow_do_import_it_at_the_top(module):
    """Keeps CORE_TF_AT_IMPORT true without a TensorFlow import per module: a module-level `import tensorflow`."""
    tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text(encoding="utf-8"))
    top_level = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    assert "tensorflow" in top_level
