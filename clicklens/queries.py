"""Query normalisation: the one definition, in Python and in the TensorFlow graph.

A query is compared, counted, split into train / eval and tokenized in its
canonical form: Unicode NFKC_Casefold, then every run of whitespace replaced by
one space, with none at either end.

NFKC_Casefold (what ICU's `nfkc_cf` and tensorflow-text's `case_fold_utf8`
compute) maps full-width Latin and digits, which Chinese input methods often
produce, to ASCII, folds case in every script that has case (Latin, Greek,
Cyrillic, ...), leaves CJK ideographs alone and drops default-ignorable code
points (zero-width spaces and joiners, bidi marks, variation selectors).

`normalize_query` (Python: the pipeline, the demo generator, tools) and
`normalize_queries` (graph ops: the trainer's tokenizer and every exported
query signature) give the same bytes for every code point Python's Unicode
database knows; `tests/test_parity.py` checks that with hypothesis.
"""

from __future__ import annotations

import re
import unicodedata

# The most bytes of a query that is normalised at all: the model's tokenizer reads only this prefix, and the
# pipeline refuses a longer query before normalising it.  NFKC puts each run of combining marks in canonical
# order by insertion, in time that grows with the square of the run: 1 MiB of alternating marks (within a log
# line's or a request's size limit) took ICU 90 s and Python 200 s, 8 KiB takes milliseconds.  Nothing useful
# is cut: the pipeline keeps queries of at most 512 characters (`log_schema.MAX_QUERY_CHARS`), and the model
# reads at most `model.max_query_tokens` tokens.
MAX_QUERY_INPUT_BYTES = 8192

# Default_Ignorable_Code_Point (Unicode DerivedCoreProperties.txt).  Python's
# unicodedata does not expose the property; ICU's case folding removes them.
_DEFAULT_IGNORABLE = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
    (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164),
    (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
)
_DROP_IGNORABLE = {c: None for low, high in _DEFAULT_IGNORABLE for c in range(low, high + 1)}

# The characters Python's str.split() treats as whitespace, as code point ranges.
WHITESPACE = (
    (0x09, 0x0D), (0x1C, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
    (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000),
)


def _whitespace_class(escape) -> str:
    """A regex character class of WHITESPACE, each code point written by `escape`."""
    return "[" + "".join(escape(lo) if lo == hi else f"{escape(lo)}-{escape(hi)}" for lo, hi in WHITESPACE) + "]+"


_PY_WHITESPACE = re.compile(_whitespace_class(lambda c: f"\\U{c:08x}"))
_RE2_WHITESPACE = _whitespace_class(lambda c: f"\\x{{{c:x}}}")


def normalize_query(text: str) -> str:
    """The canonical form of a query (see the module docstring)."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return _PY_WHITESPACE.sub(" ", folded.translate(_DROP_IGNORABLE)).strip(" ")


def normalize_queries(queries):
    """tf.string [...] -> tf.string [...]: normalize_query as graph ops (servable by stock TF Serving)."""
    # Imported here so that parsing logs in Beam does not pay for TensorFlow.
    import tensorflow as tf
    import tensorflow_text as text

    folded = text.case_fold_utf8(text.normalize_utf8(queries, "NFKC"))
    return tf.strings.strip(tf.strings.regex_replace(folded, _RE2_WHITESPACE, " "))
