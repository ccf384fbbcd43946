"""The one base of the errors a user can fix: each says, on one line, the problem and the fix.

The CLIs catch ``AlexrayError`` alone, print its message and exit with its ``exit_code``; any other
exception is a bug and shows its traceback.
"""

from __future__ import annotations

EXIT_FAILED = 1  # the work ran but its result is not acceptable (too many rejects, verify mismatch, a failed run)
EXIT_USAGE = 2  # bad input or environment, found before any output was written
EXIT_INTERRUPTED = 130


class AlexrayError(Exception):
    """A problem the user can fix; the message names the problem and the fix, on one line."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
