"""Dead letters: the record every stage writes for an input it cannot use.

A dead letter is `{"source": ..., "reason": ..., "raw": ...}` (plus `detail`,
and `image_id` for images), written one JSON object per line to
`W/examples/dead_letter-*.jsonl`.  Each stage sends its dead letters to the
output tagged DEAD_LETTER, and counts them in METRICS_NAMESPACE.  The record
itself (`dead_letter`, `dead_letter_json`) is defined in the core,
clicklens/dead_letters.py, which `clicklens reindex` writes too.

Sources: "log" (a log line; raw is the line), "log_file" (a corrupt .gz shard
skipped under pipeline.skip_corrupt_files; raw is its path, plus `file` and
`lines_read`, parse.py), "session" (a robot session dropped by the click cap;
raw is its id, plus its counts, sessions.py) and "image" (a catalog image,
images.py, or an image the join cannot find, neighbors.py).
"""


from clicklens.dead_letters import dead_letter, dead_letter_json  # noqa: F401  (the record format lives in the core)

# The output tag of every stage's dead letters.
DEAD_LETTER = "dead_letter"

# The namespace of the pipeline's Beam counters.
METRICS_NAMESPACE = "clicklens"
