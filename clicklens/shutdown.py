"""How the long-running verbs (`serve`, `reindex --watch`) learn that they should stop."""

from __future__ import annotations

import signal
import threading


def stop_on_signals() -> threading.Event:
    """An Event set by SIGTERM or Ctrl-C (SIGINT), replacing their handlers; call from the main thread.

    Wait on it with a timeout (`event.wait(1.0)` in a loop): Python runs signal handlers between bytecodes
    of the main thread, so a wait without one could keep the handler from running."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    return stop
