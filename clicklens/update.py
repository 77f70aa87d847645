"""`clicklens update --as-of DATE`: one turn of the daily loop.

    pipeline over the window ending DATE (pipeline.as_of; pipeline.window_days, half_life_days),
             keeping the last run's vocabulary ids (pipeline.base_vocab)
      -> train, warm-started from the last finished run (training.warm_start: latest)
      -> export --gate (published only if not worse than the served version)
      -> a running `clicklens serve` (or tensorflow_model_server) polling W/export hot-loads it

Each stage is the verb a user runs by hand, run through the command line's
verb table (so this core module imports no stage, and the Beam worker image,
which has no trainer, can run `--stages pipeline`).  Options the command line
does not know go to Beam, as for `clicklens pipeline`, so
`clicklens update --as-of yesterday --stages pipeline --runner DataflowRunner ...`
runs the day's pipeline on Dataflow (cloudbuild_daily.yaml runs the three
stages as separate steps: Dataflow, Vertex AI, the Cloud Build machine).

The pipeline's base vocabulary is the vocab.txt of the run the warm start
will start from: the finished run in W/model/checkpoints or $AIP_CHECKPOINT_DIR
(training_runs.checkpoint_dir; train moves it to
W/model/previous/ when the new run starts, trainer/warm_start.py) or the one
already in W/model/previous/.  `--from-scratch` learns a fresh vocabulary and
trains from random weights; `--no-gate` publishes whatever comes out.

Each stage's wall time and the gate's decision go to W/updates/DATE.json and
one summary line.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import time
from typing import Dict, List, Sequence

from clicklens.config import parse_day
from clicklens.errors import ClicklensError
from clicklens import cli, training_runs
from clicklens.workdir import Workdir, join

logger = logging.getLogger(__name__)

STAGES = ("pipeline", "train", "export")


def resolve_day(text: str, today: datetime.date = None) -> str:
    """YYYY-MM-DD, or `today` / `yesterday` (UTC, when the command runs) -> YYYY-MM-DD; ClicklensError otherwise."""
    today = today or datetime.datetime.now(datetime.timezone.utc).date()
    if text in ("today", "yesterday"):
        return (today - datetime.timedelta(days=int(text == "yesterday"))).isoformat()
    try:
        return parse_day(text).isoformat()
    except ValueError as err:
        raise ClicklensError(f"update --as-of: {err} (or today / yesterday)") from None


def parse_stages(text: str) -> List[str]:
    """`pipeline,train,export` (any of them, in that order) -> the list; ClicklensError naming a bad one."""
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ClicklensError(f"update --stages: expected some of {','.join(STAGES)}, got {text!r}")
    return [s for s in STAGES if s in stages]


def base_vocab_for_warm_start(workdir: Workdir) -> str:
    """The vocab.txt of the run `training.warm_start: latest` will start from, or "" when there is none."""
    import tensorflow as tf

    checkpoints = training_runs.checkpoint_dir(workdir)
    if training_runs.is_finished(checkpoints) and tf.io.gfile.exists(join(checkpoints, training_runs.RUN_VOCAB)):
        return join(checkpoints, training_runs.RUN_VOCAB)
    previous = join(training_runs.previous_run_dir(checkpoints), training_runs.RUN_VOCAB)
    return previous if tf.io.gfile.exists(previous) else ""


def daily_config(config, as_of: str, base_vocab: str, warm: bool):
    """The run config of one update: the window ends `as_of`; vocabulary and weights continue the last run
    (explicit pipeline.base_vocab or a training.warm_start path in the config win)."""
    pipeline = dataclasses.replace(config.pipeline, as_of=as_of, base_vocab=config.pipeline.base_vocab or base_vocab)
    chosen = config.training.warm_start
    warm_start = chosen if chosen not in ("none", "latest") else ("latest" if warm else "none")
    return dataclasses.replace(config, pipeline=pipeline,
                               training=dataclasses.replace(config.training, warm_start=warm_start))


def update_report_path(workdir: Workdir, as_of: str) -> str:
    """W/updates/<as_of>.json: what one update did and how long each stage took."""
    return join(workdir.root, "updates", f"{as_of}.json")


def update(config, workdir: Workdir, as_of: str, stages: Sequence[str] = STAGES, from_scratch: bool = False,
           gate: bool = True, beam_args: Sequence[str] = ()) -> Dict[str, object]:
    """Runs the update's stages for the day `as_of`; returns (and writes) the update report."""
    import tensorflow as tf

    as_of = resolve_day(as_of)
    base_vocab = "" if from_scratch else base_vocab_for_warm_start(workdir)
    config = daily_config(config, as_of, base_vocab, warm=not from_scratch)
    logger.info("update %s: stages %s; window %s days, half-life %s days; %s", as_of, ",".join(stages),
                config.pipeline.window_days or "all", config.pipeline.half_life_days or "none",
                "from scratch" if from_scratch else f"warm start (training.warm_start={config.training.warm_start}), "
                f"base vocabulary {config.pipeline.base_vocab or 'none'}")
    seconds: Dict[str, float] = {}
    started = time.time()
    for stage in stages:
        logger.info("== update: %s", stage)
        stage_started = time.time()
        if stage == "pipeline":
            code = cli.run_verb("pipeline", config, workdir, list(beam_args))
        elif stage == "train":
            if from_scratch:
                _archive_finished_run(workdir)
            code = cli.run_verb("train", config, workdir)
        else:
            code = cli.run_verb("export", config, workdir, ["--gate"] if gate else [])
        if code:
            raise ClicklensError(f"update stopped: clicklens {stage} exited {code}")
        seconds[stage] = round(time.time() - stage_started, 2)
        logger.info("== update: %s done in %.1f s", stage, seconds[stage])
    seconds["total"] = round(time.time() - started, 2)

    report = {"as_of": as_of, "stages": list(stages), "from_scratch": from_scratch,
              "base_vocab": config.pipeline.base_vocab, "warm_start": config.training.warm_start,
              "gate": gate, "seconds": seconds}
    if "train" in stages:  # the training steps alone, without start-up and the evaluation `train` ends with
        report["fit_seconds"] = training_runs.read_finished(training_runs.checkpoint_dir(workdir)).get("fit_seconds")
    if "export" in stages:
        with tf.io.gfile.GFile(join(workdir.export, "report.json")) as f:
            export_report = json.load(f)
        report["published_version"] = export_report["version"]
        report["gate_report"] = export_report.get("gate")
    tf.io.gfile.makedirs(join(workdir.root, "updates"))
    with tf.io.gfile.GFile(update_report_path(workdir, as_of), "w") as f:
        json.dump(report, f, indent=2)
    published = report.get("published_version")
    logger.info("update %s: %s in %.0f s (%s)", as_of,
                "no export" if "export" not in stages else f"published version {published}" if published is not None
                else "candidate rejected by the gate", seconds["total"],
                ", ".join(f"{s} {seconds[s]:.0f} s" for s in stages))
    return report


def _archive_finished_run(workdir: Workdir) -> None:
    """--from-scratch: a finished run in the checkpoint folder moves aside, so `train` starts a new one."""
    checkpoints = training_runs.checkpoint_dir(workdir)
    if training_runs.is_finished(checkpoints):
        training_runs.archive_finished_run(checkpoints)


def run(config, workdir: Workdir, args) -> int:
    """The `clicklens update` verb."""
    update(config, workdir, args.as_of, parse_stages(args.stages), from_scratch=args.from_scratch,
           gate=not args.no_gate, beam_args=getattr(args, "extra_args", None) or [])
    return 0
