"""Polling with a deadline, for tests that watch a run from outside."""

from __future__ import annotations

import subprocess
import time
from typing import Callable


def _stdout_tail(proc: subprocess.Popen) -> str:
    return (proc.stdout.read() if proc.stdout else "")[-4000:]


def stderr_tail(proc: subprocess.Popen) -> str:
    """The tail of an ended ``proc``'s stderr (a pipe): ``wait_until``'s ``output`` for such a process."""
    return proc.communicate()[1][-4000:]


def wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None,
               output: Callable[[subprocess.Popen], str] | None = None, poll: float = 0.5):
    """Call ``predicate`` until it returns something true, and return that.

    Fails after ``timeout`` seconds, or as soon as ``proc`` (the process being watched) has ended,
    showing ``output(proc)`` (default: the tail of its stdout).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{(output or _stdout_tail)(proc)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)
