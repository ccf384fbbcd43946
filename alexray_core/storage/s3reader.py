"""Streaming, resumable reads of S3 objects, registered with WebDataset as the ``s3://`` opener.

WebDataset has no ``s3`` scheme of its own and the usual ``pipe:aws s3 cp`` leaks processes and
breaks pipes. This reader streams one GET; when the connection drops part-way it issues a ranged
GET starting at the byte where the stream broke, with exponential backoff, so a multi-hundred-MB
shard survives a flaky network or a restarting server without being read again from the start.

Errors that waiting cannot fix (refused or expired credentials, a deleted object or bucket) and
outages that outlast the retries are raised at once as one-line ``StorageError``s naming the
object: the loader fails the run on them rather than train on less data.
"""

from __future__ import annotations

import io
import os
import time
from urllib.parse import urlparse

from webdataset.gopen import gopen_schemes

from alexray_core.storage.api import (
    StorageError,
    backoff_delay,
    describe_s3_error,
    is_transient,
    make_s3_client,
)

_client = None
RUN_AGAIN = "run again (training resumes from its last checkpoint)"
_REFUSED_CODES = {"AccessDenied", "AllAccessDisabled", "ExpiredToken", "InvalidAccessKeyId", "InvalidToken",
                  "SignatureDoesNotMatch", "TokenRefreshRequired", "AccountProblem"}


def _shared_client():
    # One client per process: boto3 clients are thread-safe but expensive to create, and each
    # DataLoader worker process builds its own after fork.
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
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "S3"
        return StorageError(f"cannot read {url}: {endpoint} still failed after {attempts} attempts "
                            f"({type(exc).__name__}); check that it is up and reachable, then {RUN_AGAIN}")
    return describe_s3_error(exc, url)


class ResumableS3Reader(io.RawIOBase):
    """A read-only, forward-only file over one S3 object that reconnects where it left off."""

    def __init__(self, bucket: str, key: str, client=None, attempts: int = 8, base_delay: float = 0.5):
        self.bucket, self.key = bucket, key
        self.client = client or _shared_client()
        self.attempts, self.base_delay = attempts, base_delay
        self.position = 0
        self.size: int | None = None
        self.body = None
        self.reconnects = 0  # how many ranged GETs resumed a broken stream

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        kwargs = {"Bucket": self.bucket, "Key": self.key}
        if self.position:
            kwargs["Range"] = f"bytes={self.position}-"
            self.reconnects += 1
        response = self.client.get_object(**kwargs)
        if self.size is None:
            self.size = self.position + response["ContentLength"]
        self.body = response["Body"]

    def _drop(self) -> None:
        if self.body is not None:
            try:
                self.body.close()
            except Exception:  # noqa: BLE001 - the connection is already broken
                pass
        self.body = None

    def readinto(self, buffer) -> int:
        if self.size is not None and self.position >= self.size:
            return 0
        for attempt in range(1, self.attempts + 1):
            try:
                if self.body is None:
                    self._open()
                data = self.body.read(len(buffer))
                if not data and self.size is not None and self.position < self.size:
                    raise ConnectionError(f"stream ended at byte {self.position} of {self.size}")
                buffer[:len(data)] = data
                self.position += len(data)
                return len(data)
            except Exception as exc:  # noqa: BLE001 - classified below
                self._drop()
                dropped = _is_dropped_connection(exc)
                if not dropped or attempt == self.attempts:
                    if dropped or type(exc).__module__.startswith("botocore"):
                        raise read_error(exc, f"s3://{self.bucket}/{self.key}",
                                         self.attempts if dropped else None) from exc
                    raise
                delay = backoff_delay(attempt, self.base_delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._drop()
        super().close()


def open_s3(url: str, mode: str = "rb", bufsize: int = 1 << 20, **_) -> io.BufferedReader:
    """WebDataset opener for ``s3://bucket/key`` (read-only)."""
    if "r" not in mode:
        raise ValueError(f"s3 URLs are read-only here, got mode {mode!r} for {url}")
    parsed = urlparse(url)
    return io.BufferedReader(ResumableS3Reader(parsed.netloc, parsed.path.lstrip("/")), buffer_size=bufsize)


def register() -> None:
    """Make ``webdataset.WebDataset("s3://...")`` and ``gopen("s3://...")`` use boto3."""
    gopen_schemes["s3"] = open_s3


def read_bytes(url: str) -> bytes:
    """The whole object at ``url`` (``s3://`` or a local path)."""
    if url.startswith("s3://"):
        with open_s3(url) as f:
            return f.read()
    with open(url.removeprefix("file://"), "rb") as f:
        return f.read()
