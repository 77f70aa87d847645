"""The error types every clicklens stage raises for problems the user can fix."""

import json


class ClicklensError(Exception):
    """A user-facing error: the CLI prints its message (no traceback) and exits 2."""


class BadRecord(ValueError):
    """An input record (log line, catalog line) that cannot be used.

    `reason` is a short snake_case code: the dead-letter reason and the name of
    the Beam counter; `detail` says what exactly was wrong.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def parse_json_line(line: str):
    """json.loads of one JSON-lines record; BadRecord `bad_json` when it is not JSON, `not_utf8` when a JSON
    escape decodes to a lone surrogate ("\\ud800" is valid JSON but no Unicode text: the first stage to write
    it as UTF-8 would fail, and with it the whole pipeline)."""
    try:
        data = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as err:
        raise BadRecord("bad_json", str(err)[:200]) from None
    if "\\u" in line:  # only an escape makes a surrogate: lines of raw UTF-8 pay nothing more
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as err:
            raise BadRecord("not_utf8", f"a JSON escape of a lone surrogate ({err.object[err.start:err.end]!r})") \
                from None
    return data
