"""Streaming, resumable reads of S3 objects, pinned to one version of the object.

The one reader of S3 objects: ``S3Storage.iter_chunks`` reads through it, and the training loader
registers ``open_s3`` as WebDataset's ``s3://`` opener (``workers.data.s3open``: WebDataset has no
``s3`` scheme of its own, and the usual ``pipe:aws s3 cp`` leaks processes and breaks pipes).

It streams one GET; when the connection drops part-way it issues a ranged GET starting at the byte
where the stream broke, with exponential backoff, so a multi-hundred-MB shard survives a flaky
network or a restarting server without being read again from the start. Every ranged GET carries
``If-Match`` with the ETag of the first response: if the object was replaced in between, S3
answers 412 and the read fails naming the object, instead of splicing the rest of the new version
onto the start of the old one.

Errors that waiting cannot fix (refused or expired credentials, a deleted or replaced object, a
deleted bucket) and outages that outlast the retries are raised at once as one-line
``StorageError``s naming the object: the loader fails the run on them rather than train on less data.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Callable
from urllib.parse import urlparse

from alexray_core.storage.api import (
    StorageError,
    backoff_delay,
    describe_s3_error,
    is_transient,
    make_s3_client,
    s3_attempts,
    s3_endpoint,
)

log = logging.getLogger("alexray.storage")

_client = None
RUN_AGAIN = "run again (training resumes from its last checkpoint)"
_REFUSED_CODES = {"AccessDenied", "AllAccessDisabled", "ExpiredToken", "InvalidAccessKeyId", "InvalidToken",
                  "SignatureDoesNotMatch", "TokenRefreshRequired", "AccountProblem"}
_CHANGED_CODES = {"PreconditionFailed", "412"}  # an If-Match that no longer holds


def _shared_client():
    # One client per process: boto3 clients are thread-safe but expensive to create (reset_client
    # drops it once the environment that configures it changed).
    global _client
    if _client is None:
        _client = make_s3_client()
    return _client


def reset_client() -> None:
    """Forget the cached client (after the environment that configures it changed)."""
    global _client
    _client = None


def _is_dropped_connection(exc: BaseException) -> bool:
    if is_transient(exc):
        return True
    name = type(exc).__name__
    return name in ("IncompleteRead", "IncompleteReadError", "ProtocolError", "ReadTimeoutError",
                    "ResponseStreamingError") or isinstance(
        exc, (ConnectionError, TimeoutError))


def _is_changed(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(exc.response.get("Error", {}).get("Code", "")) in _CHANGED_CODES or status == 412


def changed_error(url: str, then: str = RUN_AGAIN) -> StorageError:
    """``url`` was replaced between two ranged reads of it."""
    return StorageError(f"{url} changed while it was being read (another version replaced it between two ranged "
                        f"reads, and the two must not be mixed): make sure nothing rewrites it while it is in use, "
                        f"then {then}")


def read_error(exc: BaseException, url: str, attempts: int | None = None) -> StorageError:
    """One line saying why ``url`` cannot be read and what to do; ``attempts``: a transient error
    that was still there after that many tries."""
    from botocore import exceptions as bx

    if isinstance(exc, bx.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return StorageError(f"bucket {urlparse(url).netloc!r} of {url} no longer exists (NoSuchBucket): "
                                f"restore the bucket and its dataset, then {RUN_AGAIN}")
        if code in ("NoSuchKey", "NotFound", "404") or status == 404:
            return StorageError(f"{url} no longer exists ({code or status}): the dataset changed during the run; "
                                f"restore it (alexray shard verify checks a dataset), then {RUN_AGAIN}")
        if code in _REFUSED_CODES or status == 403:
            return StorageError(f"S3 refused to read {url} ({code or status}): the credentials expired, were "
                                "revoked or may not read this bucket; renew them (AWS_ACCESS_KEY_ID/"
                                f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the node's role), then {RUN_AGAIN}")
    if attempts is not None:
        return StorageError(f"cannot read {url}: {s3_endpoint() or 'S3'} still failed after {attempts} attempts "
                            f"({type(exc).__name__}); check that it is up and reachable, then {RUN_AGAIN}")
    return describe_s3_error(exc, url)


class ResumableS3Reader(io.RawIOBase):
    """A read-only, forward-only file over one version of one S3 object that reconnects where it
    left off.

    ``attempts``: tries per read before a transient failure is given up on (``s3_attempts()``).
    ``describe(exc, url, attempts)`` turns a failure into the ``StorageError`` raised (``read_error``:
    the training loader's wording), ``then`` ends the message of an object that changed mid-read.
    """

    def __init__(self, bucket: str, key: str, client=None, attempts: int | None = None, base_delay: float = 0.5,
                 describe: Callable[[BaseException, str, int | None], StorageError] = read_error,
                 then: str = RUN_AGAIN):
        super().__init__()
        self.bucket, self.key = bucket, key
        self.url = f"s3://{bucket}/{key}"
        self.client = client or _shared_client()
        self.attempts, self.base_delay = attempts or s3_attempts(), base_delay
        self.describe, self.then = describe, then
        self.position = 0
        self.size: int | None = None
        self.etag: str | None = None  # the version being read: every ranged GET must match it
        self.body = None
        self.reconnects = 0  # how many ranged GETs resumed a broken stream

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        kwargs = {"Bucket": self.bucket, "Key": self.key}
        if self.position:
            kwargs["Range"] = f"bytes={self.position}-"
            if self.etag:
                kwargs["IfMatch"] = self.etag
            self.reconnects += 1
        response = self.client.get_object(**kwargs)
        if not self.position:  # nothing read yet: pin whichever version this GET returns
            self.size, self.etag = response["ContentLength"], response.get("ETag")
        self.body = response["Body"]

    def _drop(self) -> None:
        if self.body is not None:
            try:
                self.body.close()
            except Exception:  # noqa: BLE001 - the connection is already broken
                pass
        self.body = None

    def _read_once(self, size: int) -> bytes:
        if self.body is None:
            self._open()
        data = self.body.read(size)
        if not data and self.size is not None and self.position < self.size:
            raise ConnectionError(f"stream ended at byte {self.position} of {self.size}")
        return data

    def readinto(self, buffer) -> int:
        if self.size is not None and self.position >= self.size:
            return 0
        for attempt in range(1, self.attempts + 1):
            try:
                data = self._read_once(len(buffer))
                buffer[:len(data)] = data
                self.position += len(data)
                return len(data)
            except Exception as exc:  # noqa: BLE001 - classified below
                self._drop()
                if self.position and _is_changed(exc):
                    raise changed_error(self.url, self.then) from None
                dropped = _is_dropped_connection(exc)
                if not dropped or attempt == self.attempts:
                    if dropped or type(exc).__module__.startswith("botocore"):
                        raise self.describe(exc, self.url, self.attempts if dropped else None) from exc
                    raise
                delay = backoff_delay(attempt, self.base_delay)
                log.warning("reading %s broke at byte %d of %s (%s); resuming in %.1f s (attempt %d of %d)",
                            self.url, self.position, self.size, exc, delay, attempt, self.attempts)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._drop()
        super().close()


def open_s3(url: str, mode: str = "rb", bufsize: int = 1 << 20, **_) -> io.BufferedReader:
    """``s3://bucket/key`` as a buffered, read-only file (WebDataset's ``gopen`` signature)."""
    if "r" not in mode:
        raise ValueError(f"s3 URLs are read-only here, got mode {mode!r} for {url}")
    parsed = urlparse(url)
    return io.BufferedReader(ResumableS3Reader(parsed.netloc, parsed.path.lstrip("/")), buffer_size=bufsize)


def read_bytes(url: str) -> bytes:
    """The whole object at ``url`` (``s3://`` or a local path)."""
    if url.startswith("s3://"):
        with open_s3(url) as f:
            return f.read()
    with open(url.removeprefix("file://"), "rb") as f:
        return f.read()
