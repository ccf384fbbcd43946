"""What reaches the disk before what: a record of the ``os.fsync`` and ``os.replace`` calls a test makes."""

from __future__ import annotations

import os


def record_fsync_and_replace(monkeypatch) -> list[tuple[str, ...]]:
    """Watch ``os.fsync`` and ``os.replace`` for the rest of the test (both still do their work).

    Returns the list they append to, from any thread, in the order the calls happen:
    ``("fsync", path)`` and ``("replace", source, target)``, each path resolved (``os.path.realpath``).
    """
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(source, target, **kwargs):
        events.append(("replace", os.path.realpath(source), os.path.realpath(target)))
        return real_replace(source, target, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def renamed_to(events: list[tuple[str, ...]], path) -> int:
    """The index in ``events`` of the first ``os.replace`` onto ``path``."""
    target = os.path.realpath(path)
    return next(i for i, event in enumerate(events) if event[0] == "replace" and event[2] == target)
