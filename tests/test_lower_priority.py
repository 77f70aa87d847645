"""trainer/lower_priority.py: bookkeeping after publishing runs below the caller's CPU priority."""

import os
import sys
import threading

import pytest

from trainer.lower_priority import LOWER_BY, run_at_lower_priority


def niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own niceness is Linux's")
def test_the_work_runs_on_a_thread_of_lower_priority_and_the_caller_keeps_its_own():
    before = niceness()
    thread_id, thread_niceness = run_at_lower_priority(lambda: (threading.get_native_id(), niceness()))
    assert thread_id != threading.get_native_id()
    assert thread_niceness == min(19, before + LOWER_BY)
    assert niceness() == before


def test_results_and_errors_come_back_to_the_caller():
    assert run_at_lower_priority(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]
    with pytest.raises(ValueError, match="no such thing"):
        run_at_lower_priority(int, "no such thing")
