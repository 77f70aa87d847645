"""The error types every clicklens stage raises for problems the user can fix."""


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
