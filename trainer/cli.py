"""The `clicklens` command line: one verb per stage, shared options for all.

    clicklens VERB [--config configs/demo.yaml] [--workdir DIR] [--set section.key=value ...]

Each verb names the module and function that carries it out; the module is
imported only when the verb runs, so `clicklens --help` does not pay for
TensorFlow.  A verb's function takes `(config, workdir, args)` and returns an
exit code (or None for 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import logging
import sys
from typing import Callable, List, Optional, Sequence

from trainer.config import DEFAULT_CONFIG, load_config
from trainer.errors import ClicklensError
from trainer.workdir import Workdir

DEFAULT_WORKDIR = "work"


@dataclasses.dataclass(frozen=True)
class Verb:
    """A command-line verb and the function that carries it out."""

    name: str
    target: str  # "package.module:function"
    help: str
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None
    passes_unknown_args: bool = False


def _query_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="?", help="query text (any language)")
    parser.add_argument("--image", help="query by this image file instead of text")
    parser.add_argument("--server", default=None, help="gRPC address (default: serving.host:serving.grpc_port)")
    parser.add_argument("--model", default="retrieval_scann", help="model name on the server")
    parser.add_argument("--version", type=int, default=None, help="model version (default: latest)")


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-wait", action="store_true", help="stop the server at the end instead of waiting for Ctrl-C")


def _tool_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default=None, help="output file (default: under <workdir>/tools/)")


VERBS: List[Verb] = [
    Verb("generate-demo-data", "beam_pipelines.demo_data.generate:run",
         "write a generated image catalog, query logs and ground truth under <workdir>/raw"),
    Verb("pipeline", "beam_pipelines.pipeline:run",
         "run the Beam pipeline: logs -> <workdir>/examples (other options go to Beam)",
         passes_unknown_args=True),
    Verb("train", "trainer.task:run", "train the two-tower model -> <workdir>/model"),
    Verb("evaluate", "trainer.evaluate:run", "evaluate the trained model -> <workdir>/model/metrics.json"),
    Verb("export", "trainer.export:run", "export SavedModels for TF Serving -> <workdir>/export"),
    Verb("serve", "serving.server:run", "serve <workdir>/export over TF Serving's gRPC and REST APIs"),
    Verb("query", "serving.client:run", "send a query to a running server and print the top-k images",
         add_arguments=_query_arguments),
    Verb("cluster-queries", "serving.tools:cluster_queries", "k-means clusters of logged queries",
         add_arguments=_tool_arguments),
    Verb("label-images", "serving.tools:label_images", "zero-shot image labels from nearest queries",
         add_arguments=_tool_arguments),
    Verb("plot-embeddings", "serving.tools:plot_embeddings", "2-D plot of query and image embeddings",
         add_arguments=_tool_arguments),
    Verb("demo", "trainer.demo:run", "all stages on generated data, then serve and query",
         add_arguments=_demo_arguments),
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every verb (also used by tests of cloudbuild.yaml)."""
    parser = argparse.ArgumentParser(prog="clicklens", description="Learn image search from click logs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb in VERBS:
        sub = subparsers.add_parser(verb.name, help=verb.help, description=verb.help)
        sub.add_argument("--config", default=DEFAULT_CONFIG, help=f"run config YAML (default {DEFAULT_CONFIG})")
        sub.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"work directory, local or gs:// (default {DEFAULT_WORKDIR})")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override one config value (repeatable)")
        if verb.add_arguments:
            verb.add_arguments(sub)
        sub.set_defaults(_verb=verb)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parses a command line; unknown options are kept only for verbs that pass them on."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(list(argv))
    if unknown and not args._verb.passes_unknown_args:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.extra_args = unknown
    return args


def resolve(verb: Verb) -> Callable:
    """Imports a verb's function; raises ClicklensError if its stage is not built yet."""
    module_name, function_name = verb.target.split(":")
    try:
        available = importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:
        available = False
    if not available:
        raise ClicklensError(f"clicklens {verb.name}: not available yet ({module_name} is not built in this version)")
    function = getattr(importlib.import_module(module_name), function_name, None)
    if function is None:
        raise ClicklensError(f"clicklens {verb.name}: not available yet ({verb.target} is missing)")
    return function


def setup_logging(verbose: bool = False) -> None:
    """Progress output for long work: timestamped lines on stderr."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `clicklens` console script."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.verbose)
    try:
        config = load_config(args.config, args.overrides)
        function = resolve(args._verb)
        code = function(config, Workdir(args.workdir), args)
    except ClicklensError as err:
        print(f"clicklens: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clicklens: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
