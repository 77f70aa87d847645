"""Which images the logs know, and which catalog images they do not ("cold": new uploads).

    LoggedImages: LogRecords -> every distinct image id shown in an impression or
                  used as the query image of a valid record (written to
                  W/examples/logged_images-*.txt, one id per line)
    ColdImages:   good catalog images that are not logged -> COLD ids, and REACHED:
                  those of them with at least one graph neighbour (from the content
                  graph: the click graph cannot know them)
"""


import apache_beam as beam

from beam_pipelines.progress import LogProgress
from clicklens.log_schema import LogRecord

COLD = "cold"
REACHED = "reached"


def image_ids_of(record: LogRecord):
    """The image ids one valid log record mentions: its impressions and its query image."""
    yield from (imp.image_id for imp in record.impressions)
    if record.query_image_id is not None:
        yield record.query_image_id


class DistinctIdsFn(beam.CombineFn):
    """LogRecords -> the set of the image ids they mention (lifted: each worker unites its records' ids first)."""

    def create_accumulator(self):
        return set()

    def add_input(self, ids, record: LogRecord):
        ids.update(image_ids_of(record))
        return ids

    def merge_accumulators(self, accumulators):
        merged = set()
        for ids in accumulators:
            merged |= ids
        return merged

    def extract_output(self, ids):
        return ids


class LoggedImages(beam.PTransform):
    """LogRecords -> distinct image ids (str).

    The records go straight into a set-union combiner, rather than one element per impression into a
    Distinct: the distinct ids of the logs are at most the catalog, a small set next to the impressions.
    """

    def expand(self, records):
        return (
            records
            | "Distinct" >> beam.CombineGlobally(DistinctIdsFn())
            | "EachId" >> beam.FlatMap(sorted)
            | "LogLogged" >> LogProgress("LoggedImages", "logged images")
        )


class ColdImages(beam.PTransform):
    """{"images": (image_id, image), "logged": image ids, "neighbors": (image_id, nbrs)} -> {COLD, REACHED} ids."""

    def expand(self, inputs):
        cold = (
            {"image": inputs["images"] | "ImageKeys" >> beam.MapTuple(lambda image_id, _: (image_id, None)),
             "logged": inputs["logged"] | "LoggedKeys" >> beam.Map(lambda image_id: (image_id, None))}
            | "JoinLogged" >> beam.CoGroupByKey()
            | "NotLogged" >> beam.FlatMapTuple(
                lambda image_id, grouped: [image_id] if list(grouped["image"]) and not list(grouped["logged"]) else [])
        )
        reached = (
            {"cold": cold | "ColdKeys" >> beam.Map(lambda image_id: (image_id, None)),
             "neighbors": inputs["neighbors"]}
            | "JoinNeighbors" >> beam.CoGroupByKey()
            | "WithNeighbors" >> beam.FlatMapTuple(
                lambda image_id, grouped: [image_id] if list(grouped["cold"]) and any(grouped["neighbors"]) else [])
        )
        return {COLD: cold | "LogCold" >> LogProgress("ColdImages", "cold images (in the catalog, never logged)"),
                REACHED: reached | "LogReached" >> LogProgress("ColdImages", "cold images with graph neighbours")}
