"""Dead letters: the record every stage writes for an input it cannot use.

A dead letter is `{"source": ..., "reason": ..., "raw": ...}` (plus `detail`,
and `image_id` for images), written one JSON object per line to
`W/examples/dead_letter-*.jsonl`.  Each stage sends its dead letters to the
output tagged DEAD_LETTER, and counts them in METRICS_NAMESPACE.  The record
itself (`dead_letter`, `dead_letter_json`) is defined in the core,
clicklens/dead_letters.py, which `clicklens reindex` writes too.
"""


from clicklens.dead_letters import dead_letter, dead_letter_json  # noqa: F401  (the record format lives in the core)

# The output tag of every stage's dead letters.
DEAD_LETTER = "dead_letter"

# The namespace of the pipeline's Beam counters.
METRICS_NAMESPACE = "clicklens"
