"""Errors that reach the user as one line and an exit code."""

from __future__ import annotations

EXIT_FAILED = 1  # the work ran but its result is not acceptable (too many rejects, verify mismatch)
EXIT_USAGE = 2  # bad input or environment, found before any output was written
EXIT_INTERRUPTED = 130


class ShardError(Exception):
    """A problem the user can fix; the message names the problem and the fix, on one line."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class StorageError(ShardError):
    """Storage refused or could not be reached; the message says which and what to do."""
