"""The `clicklens` command line: one verb per stage, shared options for all.

    clicklens VERB [--config configs/demo.yaml] [--workdir DIR] [--set section.key=value ...]

Each verb names the function that carries it out as "package.module:function";
the module is imported only when the verb runs, so `clicklens --help` does not
pay for TensorFlow and this core package never imports a stage.  A verb's
function takes `(config, workdir, args)` and returns an exit code (or None for 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
from typing import Callable, List, Optional, Sequence

from clicklens import servables
from clicklens.config import DEFAULT_CONFIG, describe_config, load_config
from clicklens.errors import ClicklensError
from clicklens.workdir import Workdir, check_workdir

DEFAULT_WORKDIR = "work"
# Libraries whose INFO lines (Beam's runner and BatchElements statistics, TensorFlow's
# checkpoint sharding timings) would bury the progress lines; `--verbose` shows them.
CHATTY_LIBRARIES = ("apache_beam", "tensorflow", "absl", "h5py", "PIL")


@dataclasses.dataclass(frozen=True)
class Verb:
    """A command-line verb and the function that carries it out."""

    name: str
    target: str  # "package.module:function"
    help: str
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None
    passes_unknown_args: bool = False
    writes_workdir: bool = True  # False: the verb only reads it (a read-only copy will do)


def _query_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="?", help="query text (any language)")
    parser.add_argument("--image", help="query by this image file instead of text")
    parser.add_argument("--server", default=None, help="gRPC address (default: serving.host:serving.grpc_port)")
    parser.add_argument("--model", default=servables.RETRIEVAL_SCANN, help="model name on the server")
    parser.add_argument("--version", type=int, default=None, help="model version (default: latest)")
    parser.add_argument("--explain", action="store_true",
                        help="show each result's catalog attributes, and ✓ where <workdir>/raw/ground_truth.jsonl "
                             "calls it relevant")


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-wait", action="store_true", help="stop the server at the end instead of waiting for Ctrl-C")


def _positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _reindex_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rehash", action="store_true",
                        help="read and hash every catalog file, also those whose path, size and modification time "
                             "are those recorded with the kept embeddings")
    parser.add_argument("--watch", action="store_true",
                        help="stay up: reindex whenever the catalog file changes, keeping TensorFlow, the encoders "
                             "and the kept embeddings loaded between passes (until SIGTERM or Ctrl-C)")
    parser.add_argument("--poll-seconds", type=_positive_float, default=1.0,
                        help="with --watch: how often the catalog file is checked (default 1)")


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gate", action="store_true",
                        help="publish only if the candidate's eval metric (export.gate_metric) is not worse than "
                             "the served version's beyond export.gate_tolerance; the decision goes to the report")


def _update_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--as-of", default="yesterday", metavar="YYYY-MM-DD",
                        help="the last day of logs the pipeline reads (pipeline.as_of); also today or yesterday "
                             "(UTC, the default: the last whole day)")
    parser.add_argument("--stages", default="pipeline,train,export",
                        help="which stages to run (default all: pipeline,train,export); the cloud build runs each "
                             "as its own step")
    parser.add_argument("--from-scratch", action="store_true",
                        help="train from random weights (and a fresh vocabulary) instead of the last finished run")
    parser.add_argument("--no-gate", action="store_true", help="publish the new model without comparing it with "
                                                               "the served one")


def _tool_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default=None, help="output file (default: under <workdir>/tools/)")


VERBS: List[Verb] = [
    Verb("generate-demo-data", "clicklens.demo_data.generate:run",
         "write a generated image catalog, query logs and ground truth under <workdir>/raw"),
    Verb("pipeline", "beam_pipelines.pipeline:run",
         "run the Beam pipeline: logs -> <workdir>/examples (other options go to Beam)",
         passes_unknown_args=True),
    Verb("pretrain", "trainer.pretrain:run", "self-supervised pretraining of the image tower on every catalog image "
         "-> <workdir>/pretrain (model.image_init: pretrained starts `train` from it)"),
    Verb("train", "trainer.task:run", "train the two-tower model -> <workdir>/model"),
    Verb("evaluate", "trainer.evaluate:run", "evaluate the trained model -> <workdir>/model/metrics.json"),
    Verb("export", "trainer.export:run", "export SavedModels for TF Serving -> <workdir>/export",
         add_arguments=_export_arguments),
    Verb("reindex", "trainer.reindex:run",
         "the catalog changed: embed only new or changed images with the newest exported image_encoder and write "
         "the next version of both retrieval models -> <workdir>/export",
         add_arguments=_reindex_arguments),
    Verb("update", "clicklens.update:run",
         "the daily loop: pipeline over the window ending --as-of, warm-started train, gated export "
         "-> <workdir>/export (a running server hot-loads it; other options go to Beam)",
         add_arguments=_update_arguments, passes_unknown_args=True),
    Verb("serve", "serving.server:run", "serve <workdir>/export over TF Serving's gRPC and REST APIs",
         passes_unknown_args=True,  # tensorflow_model_server's flags (serving/model_server_flags.py)
         writes_workdir=False),
    Verb("query", "serving.client:run", "send a query to a running server and print the top-k images",
         add_arguments=_query_arguments, writes_workdir=False),
    Verb("cluster-queries", "serving.tools:cluster_queries", "k-means clusters of logged queries",
         add_arguments=_tool_arguments),
    Verb("label-images", "serving.tools:label_images", "zero-shot image labels from nearest queries",
         add_arguments=_tool_arguments),
    Verb("plot-embeddings", "serving.tools:plot_embeddings", "2-D plot of query and image embeddings",
         add_arguments=_tool_arguments),
    Verb("demo", "clicklens.demo:run", "all stages on generated data, then serve and query",
         add_arguments=_demo_arguments),
    Verb("config", "clicklens.cli:show_config",
         "print the effective config (after --set): every key with its value, type, bounds and meaning",
         writes_workdir=False),
]


def verb_named(name: str) -> Verb:
    """The Verb called `name`."""
    for verb in VERBS:
        if verb.name == name:
            return verb
    raise ClicklensError(f"no verb {name!r} (known: {', '.join(v.name for v in VERBS)})")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every verb (also used by tests of cloudbuild.yaml)."""
    parser = argparse.ArgumentParser(prog="clicklens", description="Learn image search from click logs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, library INFO lines included")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb in VERBS:
        sub = subparsers.add_parser(verb.name, help=verb.help, description=verb.help)
        sub.add_argument("--config", default=DEFAULT_CONFIG, help=f"run config YAML (default {DEFAULT_CONFIG})")
        sub.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"work directory, local or gs:// (default {DEFAULT_WORKDIR})")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override one config value (repeatable; `clicklens config` lists every key)")
        if verb.add_arguments:
            verb.add_arguments(sub)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parses a command line; unknown options are kept (as `extra_args`) only for verbs that pass them on."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(list(argv))
    if unknown and not verb_named(args.verb).passes_unknown_args:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.extra_args = unknown
    return args


def resolve(verb: Verb) -> Callable:
    """Imports a verb's function.

    The container images install only the stage they run plus this core
    package; asking one for another stage's verb is a clear error.
    """
    module_name, function_name = verb.target.split(":")
    package = module_name.split(".")[0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != package:
            raise
        raise ClicklensError(f"clicklens {verb.name} needs the `{package}` package, which this installation does "
                             f"not include (each container image installs only its own stage)") from None
    return getattr(module, function_name)


def run_verb(name: str, config, workdir: Workdir, argv: Sequence[str] = ()) -> int:
    """Runs verb `name` in this process with an already loaded config (the demo chains verbs this way)."""
    args = parse_args([name, "--workdir", workdir.root, *argv])
    return int(resolve(verb_named(name))(config, workdir, args) or 0)


def show_config(config, workdir: Workdir, args) -> int:
    """The `config` verb."""
    print(f"# {args.config}" + "".join(f" --set {o}" for o in args.overrides))
    print(describe_config(config), end="")
    return 0


def setup_logging(verbose: bool = False) -> None:
    """Progress output for long work: timestamped lines on stderr, without the libraries' INFO chatter."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `clicklens` console script."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.verbose)
    try:
        config = load_config(args.config, args.overrides)
        verb = verb_named(args.verb)
        check_workdir(args.workdir, verb.writes_workdir)
        code = resolve(verb)(config, Workdir(args.workdir), args)
    except ClicklensError as err:
        print(f"clicklens: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clicklens: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
