"""Errors of sharding (storage errors: ``alexray_core.storage.StorageError``; see ``alexray_core.errors`` for the base and the exit codes)."""

from __future__ import annotations

from alexray_core.errors import AlexrayError


class ShardError(AlexrayError):
    """A sharding or data problem the user can fix."""

