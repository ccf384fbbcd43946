"""The storage interface every backend implements, and what the backends share.

``Storage`` is a flat namespace of named objects under one root (a local directory:
``alexray_core.storage.local.LocalStorage``; an S3 prefix: ``alexray_core.storage.s3.S3Storage``); open one with
``alexray_core.storage.open_storage``. Here too: S3 URLs, the S3 settings read from the environment
(endpoint, region, attempts: each read in one place), the S3 client on boto3's standard credential
chain, how S3 errors read to a user, and which of them are transient: those are retried with
exponential backoff by botocore and, around whole-object operations, by ``retry_transient``.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from alexray_core.errors import AlexrayError
from alexray_core.storage.hashing import sha256_of

T = TypeVar("T")


class StorageError(AlexrayError):
    """Storage refused or could not be reached; the message says which and what to do."""

log = logging.getLogger("alexray.storage")

_TRANSIENT_CODES = {
    "RequestTimeout", "RequestTimeoutException", "Throttling", "ThrottlingException", "SlowDown",
    "InternalError", "ServiceUnavailable", "503", "500", "502", "504",
}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
    "ExpiredToken", "403", "AuthorizationHeaderMalformed",
}


WRITE_PROBE = "_write_probe_"  # names of the objects check_writable writes and deletes
DEFAULT_S3_ATTEMPTS = 8  # tries per object operation (each request inside also has botocore's own retries)


def s3_attempts() -> int:
    """How many times an object operation is tried before a transient failure is given up on."""
    return int(os.environ.get("ALEXRAY_S3_ATTEMPTS", str(DEFAULT_S3_ATTEMPTS)))


def s3_endpoint() -> str | None:
    """The S3 endpoint configured in the environment, or None for AWS itself. The S3-specific
    variable wins, as it does in boto3."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def is_s3_url(url: str) -> bool:
    return url.startswith("s3://")


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; the prefix never ends with a slash."""
    if not is_s3_url(url):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{url!r} names no bucket: use s3://BUCKET/PREFIX")
    return bucket, prefix.strip("/")


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int


class Storage:
    """A flat namespace of named objects under one root (a directory or an S3 prefix)."""

    url: str

    def join(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        return self.info(name) is not None

    def info(self, name: str) -> ObjectInfo | None:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        raise NotImplementedError

    def iter_chunks(self, name: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        raise NotImplementedError

    def write_bytes(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def put_file(self, name: str, local_path: Path) -> None:
        """Publish a finished local file under ``name`` atomically; the local file is consumed."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def read_optional(self, name: str) -> bytes | None:
        """The object's bytes, or None when there is no such object."""
        raise NotImplementedError

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Write ``name`` only if it does not exist; False when it does. Atomic among writers."""
        raise NotImplementedError

    def take_over(self, name: str, expected: bytes, data: bytes) -> bool:
        """Replace ``name`` with ``data`` only if it still holds exactly ``expected``; atomic among
        callers of ``take_over`` and ``create_exclusive`` (the object may be absent for a moment)."""
        raise NotImplementedError

    def swap(self, name: str, expected: bytes, data: bytes) -> bool:
        """Replace ``name`` with ``data`` if it still holds ``expected``, never leaving it absent:
        for the owner of an object to update it while others may only read it."""
        raise NotImplementedError

    def delete_if(self, name: str, expected: bytes) -> bool:
        """Delete ``name`` only if it still holds ``expected``."""
        current = self.read_optional(name)
        if current != expected:
            return False
        self.delete(name)
        return True

    def staging_dir(self) -> Path | None:
        """A directory where a file renamed into place needs no copy, or None (use a temp dir)."""
        return None

    def clean_partial(self) -> int:
        """Remove leftovers of interrupted writes; returns how many were removed."""
        return 0

    def sha256(self, name: str) -> str:
        return sha256_of(self.iter_chunks(name))

    def check_reachable(self) -> None:
        """Raise StorageError, naming the fix, if the storage cannot be read at all."""

    def check_writable(self) -> None:
        """Write and delete a probe object, so a refusal shows up before any real work."""
        probe = f"{WRITE_PROBE}{os.getpid()}_{random.getrandbits(32):08x}"
        self.write_bytes(probe, b"alexray write probe\n")
        self.delete(probe)


def make_s3_client(max_attempts: int | None = None):
    """A boto3 S3 client on the standard credential chain; boto3 itself honours ``s3_endpoint``'s variables."""
    import boto3
    from botocore.config import Config

    retries: dict = {"mode": os.environ.get("AWS_RETRY_MODE", "standard")}
    attempts = max_attempts or int(os.environ.get("AWS_MAX_ATTEMPTS", "6"))
    retries["max_attempts"] = attempts
    config = Config(
        retries=retries,
        connect_timeout=5,
        read_timeout=60,
        s3={"addressing_style": os.environ.get("ALEXRAY_S3_ADDRESSING", "path")},
    )
    return boto3.session.Session().client("s3", region_name=s3_region(), config=config)


def describe_s3_error(exc: BaseException, url: str) -> StorageError:
    """Translate a boto3/botocore exception into a one-line error that names the fix."""
    from botocore import exceptions as bx

    endpoint = s3_endpoint() or "the AWS S3 endpoint"
    bucket = split_s3_url(url)[0] if is_s3_url(url) else url
    if isinstance(exc, bx.NoCredentialsError):
        return StorageError(
            f"no AWS credentials found for {url}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role"
        )
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError, bx.ConnectionClosedError)):
        return StorageError(f"cannot reach S3 at {endpoint}: check AWS_ENDPOINT_URL and that the server is up")
    if isinstance(exc, bx.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket",) or (code == "404" and "bucket" in str(exc).lower()):
            return StorageError(f"bucket {bucket!r} does not exist: create it (aws s3 mb s3://{bucket}) or fix the URL {url}")
        if code in _CREDENTIAL_CODES or status == 403:
            return StorageError(
                f"S3 refused the credentials for {url} ({code or status}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            )
        return StorageError(f"S3 error on {url}: {code or status}: {exc}; check the bucket and your permissions")
    return StorageError(f"S3 error on {url}: {exc}")


def is_transient(exc: BaseException) -> bool:
    from botocore import exceptions as bx

    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ReadTimeoutError,
                        bx.ConnectTimeoutError, bx.ResponseStreamingError, bx.IncompleteReadError,
                        ConnectionError)):
        return True
    from urllib3 import exceptions as ux

    if isinstance(exc, (ux.ProtocolError, ux.ReadTimeoutError, ux.IncompleteRead)):
        return True  # a read cut short below botocore's wrapping
    if isinstance(exc, bx.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code in _TRANSIENT_CODES or status >= 500
    if type(exc).__name__ == "RetriesExceededError":
        return True
    inner = _unwrap_upload_error(exc)
    return inner is not exc and is_transient(inner)


def _unwrap_upload_error(exc: BaseException) -> BaseException:
    """boto3's upload_file hides the real ClientError inside S3UploadFailedError's context."""
    if type(exc).__name__ == "S3UploadFailedError" and exc.__context__ is not None:
        return exc.__context__
    return exc


def backoff_delay(attempt: int, base_delay: float = 0.5, max_delay: float = 8.0) -> float:
    """Seconds to wait before retry number ``attempt`` (1, 2, ...): doubling from ``base_delay`` up
    to ``max_delay``, with jitter so that many readers failing together do not retry together."""
    return min(max_delay, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)


def retry_transient(fn: Callable[[], T], *, what: str, attempts: int | None = None,
                    base_delay: float = 0.5, max_delay: float = 8.0) -> T:
    """Call ``fn``; on a transient error wait (exponential backoff, jitter) and try again.

    botocore already retries single requests; this outer loop rides out longer outages
    (a restarting server) for whole-object operations such as uploading a shard.
    """
    attempts = attempts or s3_attempts()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if attempt == attempts or not is_transient(exc):
                raise
            delay = backoff_delay(attempt, base_delay, max_delay)
            log.warning("%s failed (%s); retrying in %.1f s (attempt %d of %d)", what, exc, delay, attempt, attempts)
            time.sleep(delay)
    raise AssertionError("unreachable")
