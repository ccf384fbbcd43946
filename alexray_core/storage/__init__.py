"""Where shards, checkpoints and run files live: a local directory or an S3 prefix, behind one interface.

``open_storage(url)`` picks the backend: ``alexray_core.storage.local.LocalStorage`` for a path,
``alexray_core.storage.s3.S3Storage`` for ``s3://bucket/prefix``. ``alexray_core.storage.api``
holds the interface, ``StorageError`` and what the backends share; ``alexray_core.storage.s3reader``
the one reader of S3 objects (resumable, pinned to one version), ``alexray_core.storage.hashing`` the
one sha256 reader. Standard library and boto3 only: the submit side imports this without torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from alexray_core.storage.api import (
    WRITE_PROBE,
    ObjectInfo,
    Storage,
    StorageError,
    is_s3_url,
    split_s3_url,
)
from alexray_core.storage.hashing import Sha256Reader, sha256_of
from alexray_core.storage.local import LocalStorage
from alexray_core.storage.s3 import UPLOADS_DIR, S3Storage

__all__ = [
    "WRITE_PROBE", "UPLOADS_DIR", "ObjectInfo", "Storage", "StorageError", "LocalStorage", "S3Storage",
    "is_s3_url", "split_s3_url", "Sha256Reader", "sha256_of",
    "open_storage", "storage_env", "apply_storage_env", "absolute_location",
]


_ENV_PREFIXES = ("AWS_", "ALEXRAY_")


def storage_env() -> dict[str, str]:
    """The environment variables that decide how storage is reached (credentials, endpoint, retries)."""
    return {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}


def apply_storage_env(env: dict[str, str]) -> None:
    """Make this process's storage settings exactly ``env``.

    Worker processes forked from a forkserver inherit the environment of the moment the server
    started, not of the moment the work was handed out; they call this with the parent's settings.
    """
    for key in [k for k in os.environ if k.startswith(_ENV_PREFIXES)]:
        del os.environ[key]
    os.environ.update(env)


def open_storage(url: str | Path, record_uploads: bool = False) -> Storage:
    """``s3://bucket/prefix`` -> S3Storage, anything else -> LocalStorage."""
    url = str(url)
    if is_s3_url(url):
        return S3Storage(url, record_uploads=record_uploads)
    if "://" in url and not url.startswith("file://"):
        raise StorageError(f"unsupported storage URL {url!r}: use s3://BUCKET/PREFIX or a local path")
    return LocalStorage(url.removeprefix("file://"))


def absolute_location(location: str | Path) -> str:
    """``location`` as every process on every node reads it: an ``s3://`` URL as it is, a local path
    (``~``, relative, ``file://``) made absolute, since workers run elsewhere, in other directories."""
    location = str(location)
    if is_s3_url(location):
        return location
    return os.path.abspath(os.path.expanduser(location.removeprefix("file://")))
