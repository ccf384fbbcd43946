"""Polling with a deadline, for tests that watch a run from outside."""

from __future__ import annotations

import subprocess
import threading
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


class Output:
    """A running process's stdout and stderr pipes, read on threads as the lines come, so that a
    test can wait for a line while the process runs (``communicate`` reads only at the end)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self._lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._readers = [threading.Thread(target=self._read, args=(getattr(proc, name), lines), daemon=True)
                         for name, lines in self._lines.items() if getattr(proc, name) is not None]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)  # list.append is atomic: the test's thread reads a consistent prefix

    def stdout(self) -> str:
        return "".join(self._lines["stdout"])

    def stderr(self) -> str:
        return "".join(self._lines["stderr"])

    def wait_for_line(self, needles: tuple[str, ...], timeout: float, what: str) -> str:
        """The first line, of either stream, that holds one of ``needles``; fails as ``wait_until`` does."""
        def found():
            return next((line for lines in self._lines.values() for line in list(lines)
                         if any(n in line for n in needles)), None)
        return wait_until(found, timeout, what, self.proc, output=lambda _: self.tail(), poll=0.1)

    def tail(self) -> str:
        return (self.stderr() or self.stdout())[-4000:]

    def finish(self, timeout: float = 420) -> tuple[str, str]:
        """Wait for the process and its pipes to end; its stdout and stderr. Fails, showing the tail of
        the output, when it exits non-zero or has not ended after ``timeout`` seconds (it is killed then)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"did not finish in {timeout} s:\n{self.tail()}") from None
        for reader in self._readers:
            reader.join(30)
        assert self.proc.returncode == 0, self.tail()
        return self.stdout(), self.stderr()
