"""WebDataset's ``s3://`` scheme: the resumable reader of ``alexray_core.storage.s3reader``.

Here, not in ``alexray_core``, because registering needs webdataset and the core must not.
"""

from __future__ import annotations

from webdataset.gopen import gopen_schemes

from alexray_core.storage.s3reader import open_s3


def use_s3_reader() -> None:
    """Make ``webdataset.WebDataset("s3://...")`` and ``gopen("s3://...")`` read with the pinned,
    resumable reader (idempotent; called wherever shards are opened)."""
    gopen_schemes["s3"] = open_s3
