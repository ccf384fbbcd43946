"""Errors of sharding and storage (see ``alexray_core.errors`` for the base and the exit codes)."""

from __future__ import annotations

from alexray_core.errors import AlexrayError


class ShardError(AlexrayError):
    """A sharding or data problem the user can fix."""


class StorageError(ShardError):
    """Storage refused or could not be reached; the message says which and what to do."""
