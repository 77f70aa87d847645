"""Work that can wait, on a thread of lower CPU priority.

Once `clicklens reindex` has published a version, what is left (writing the corpus rows, checking the
catalog's files) is bookkeeping, while a model server on the same machine is loading what was just
published: on a small machine the two compete for the same cores, and the server's load is what makes the
new images searchable.  Run at a lower priority, the bookkeeping takes the cores the load leaves free.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

# Niceness steps above the caller's: a thread at +10 gets about a tenth of a core that a thread at +0 also
# wants (Linux's CFS weights 1024 and 110), so it still moves when the machine is busy.
LOWER_BY = 10


def _lower_this_thread() -> None:
    # On Linux a thread has its own niceness, set through its thread id; elsewhere setpriority would apply to
    # the whole process, so it is left alone.
    if not sys.platform.startswith("linux"):
        return
    thread_id = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread_id, min(19, os.getpriority(os.PRIO_PROCESS, thread_id) + LOWER_BY))
    except OSError:  # not allowed here: run as is
        pass


def run_at_lower_priority(function, *args, **kwargs):
    """function(*args, **kwargs) on a new thread LOWER_BY niceness steps below the caller's priority (Linux; a
    plain thread elsewhere); waits for it and returns its result, or raises what it raised."""
    with ThreadPoolExecutor(1, thread_name_prefix="lower-priority", initializer=_lower_this_thread) as pool:
        return pool.submit(function, *args, **kwargs).result()
