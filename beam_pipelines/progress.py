"""Progress lines a person can read while the pipeline runs.

    pipeline: SelectPairs: 12,345 selected pairs

`LogProgress` is a pass-through: it counts the elements of each bundle and
logs one line when the bundle finishes.  A local run processes a stage in one
bundle, so it prints one line per stage; a distributed runner prints one line
per bundle (the counts add up to the stage's total).
"""


import logging

import apache_beam as beam

logger = logging.getLogger("beam_pipelines.progress")


class _CountPerBundleFn(beam.DoFn):
    """Yields every element unchanged; logs how many a bundle held when it finishes."""

    def __init__(self, stage: str, what: str):
        self._stage = stage
        self._what = what
        self._count = 0

    def start_bundle(self):
        self._count = 0

    def process(self, element):
        self._count += 1
        yield element

    def finish_bundle(self):
        logger.info("pipeline: %s: %s %s", self._stage, f"{self._count:,}", self._what)


class LogProgress(beam.PTransform):
    """PCollection -> the same PCollection, logging "pipeline: <stage>: <count> <what>" per bundle."""

    def __init__(self, stage: str, what: str):
        super().__init__()
        self._stage = stage
        self._what = what

    def expand(self, pcoll):
        # Keep the element type, so downstream coders are exactly those without the progress step.
        return pcoll | "CountPerBundle" >> beam.ParDo(
            _CountPerBundleFn(self._stage, self._what)).with_output_types(pcoll.element_type)
