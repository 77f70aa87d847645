"""The error type every clicklens stage raises for a problem the user can fix."""


class ClicklensError(Exception):
    """A user-facing error: the CLI prints its message (no traceback) and exits 2."""
