"""Property tests: arbitrary bytes and arbitrary JSON as log lines never crash the pipeline,
and every line comes out either as a record or as a dead letter."""

import gzip
import json

import apache_beam as beam
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beam_pipelines import dead_letters, parse

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# Records that are close to valid, so the deeper checks of the schema are exercised too.
record_like = st.fixed_dictionaries(
    {"session_id": st.text(max_size=5) | st.integers(), "time": st.floats() | st.text(max_size=3),
     "impressions": st.lists(st.fixed_dictionaries(
         {"image_id": st.text(max_size=5) | st.none(), "position": st.integers(-2, 30) | st.booleans(),
          "clicked": st.booleans() | st.integers(0, 1)},
         optional={"dwell_ms": st.floats() | st.integers(-5, 5)}), max_size=4)},
    optional={"query": st.text(max_size=20) | st.integers(), "query_image_id": st.text(max_size=5),
              "category": st.text(max_size=5) | st.integers(), "locale": st.text(max_size=3)},
)
json_lines = (json_values | record_like).map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8"))
# A log line is anything without a line break in it.
raw_lines = st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))
any_line = json_lines | raw_lines


@settings(max_examples=400, deadline=None)
@given(any_line)
def test_parse_never_raises_and_accounts_for_every_line(line):
    record, bad = parse.parse_or_dead_letter(line)
    assert (record is None) != (bad is None)
    if bad is not None:
        assert bad["source"] == "log" and bad["reason"] and bad["reason"] != "internal_error"
        assert json.loads(dead_letters.dead_letter_json(bad))["reason"] == bad["reason"]


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(any_line, min_size=1, max_size=40))
def test_pipeline_reads_plus_dead_letters_equal_input_lines(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("logs") / "part-0.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    with BeamTestPipeline(runner=FnApiRunner()) as p:
        parsed = p | parse.ReadLines(str(path)) | parse.ParseLogs()
        total = ((parsed[parse.RECORDS] | "Good" >> beam.Map(lambda _: 1),
                  parsed[dead_letters.DEAD_LETTER] | "Bad" >> beam.Map(lambda _: 1))
                 | beam.Flatten() | beam.CombineGlobally(sum))
        assert_that(total, equal_to([len(lines)]))
