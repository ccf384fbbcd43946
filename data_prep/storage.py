"""Where shards live: a local directory or an S3 prefix, behind one small interface.

Both backends make a finished object visible atomically: locally a temp file is renamed into
place, on S3 a single PUT or a completed multipart upload (an interrupted multipart upload is
invisible; with ``record_uploads`` its id is kept under ``_uploads/`` so the next run aborts exactly
the uploads it began, never another program's in the same bucket). Nothing ever shows a
half-written shard.

``create_exclusive``, ``take_over``, ``swap`` and ``delete_if`` are the few atomic steps a lease
needs (``data_prep.lease``): a link on local disk, conditional PUTs (If-None-Match, If-Match) on S3.

S3 access (``data_prep.s3storage``) goes through boto3's standard credential chain and honours
``AWS_ENDPOINT_URL``.
Transient failures (connection drops, 5xx, throttling) are retried with exponential backoff by
botocore and, around whole-object operations, by ``retry_transient``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from .errors import StorageError

T = TypeVar("T")
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
        digest = hashlib.sha256()
        for chunk in self.iter_chunks(name):
            digest.update(chunk)
        return digest.hexdigest()

    def check_reachable(self) -> None:
        """Raise StorageError, naming the fix, if the storage cannot be read at all."""

    def check_writable(self) -> None:
        """Write and delete a probe object, so a refusal shows up before any real work."""
        probe = f"{WRITE_PROBE}{os.getpid()}_{random.getrandbits(32):08x}"
        self.write_bytes(probe, b"alexray write probe\n")
        self.delete(probe)


class LocalStorage(Storage):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def _path(self, name: str) -> Path:
        return self.root / name

    def info(self, name: str) -> ObjectInfo | None:
        try:
            st = self._path(name).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(name, st.st_size)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        if not self.root.is_dir():
            return []
        found = []
        for dirpath, _, filenames in os.walk(self.root):
            for filename in filenames:
                rel = os.path.relpath(os.path.join(dirpath, filename), self.root).replace(os.sep, "/")
                if rel.startswith(prefix):
                    found.append(ObjectInfo(rel, os.path.getsize(os.path.join(dirpath, filename))))
        return sorted(found, key=lambda o: o.name)

    def read_bytes(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{self.join(name)} does not exist") from None

    def iter_chunks(self, name: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        with open(self._path(name), "rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk

    def write_bytes(self, name: str, data: bytes) -> None:
        path = self._path(name)
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except PermissionError:
            raise StorageError(
                f"cannot write to {self.root}: permission denied; choose a writable DEST or fix its permissions"
            ) from None
        except OSError as e:
            raise StorageError(f"cannot write {path}: {e.strerror}; choose another DEST or free space") from None

    def put_file(self, name: str, local_path: Path) -> None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(local_path, "rb") as f:
            os.fsync(f.fileno())
        if Path(local_path).parent == path.parent:
            os.replace(local_path, path)
        else:
            tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
            shutil.move(str(local_path), tmp)
            os.replace(tmp, path)

    def delete(self, name: str) -> None:
        path = self._path(name)
        path.unlink(missing_ok=True)
        if path.parent != self.root:
            try:
                path.parent.rmdir()  # a folder of records (_progress/) goes once it is empty
            except OSError:
                pass

    def read_optional(self, name: str) -> bytes | None:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            return None

    def _aside(self, path: Path, what: str) -> Path:
        # ".partial-" keeps these names among the ones a run knows as its own (never "foreign")
        return path.with_name(f".{path.name}.partial-{what}-{os.getpid()}-{random.getrandbits(32):08x}")

    def create_exclusive(self, name: str, data: bytes) -> bool:
        path = self._path(name)
        tmp = self._aside(path, "new")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            # link() fails if the name exists, also on NFS: the complete file appears at once or not at all
            os.link(tmp, path)
            return True
        except (FileExistsError, FileNotFoundError):
            return False  # FileNotFoundError: another run's clean-up took our temp file, so it holds DEST
        finally:
            tmp.unlink(missing_ok=True)

    def take_over(self, name: str, expected: bytes, data: bytes) -> bool:
        path = self._path(name)
        aside = self._aside(path, "taken")
        try:
            os.rename(path, aside)  # only one of several racers moves this file
        except FileNotFoundError:
            return False
        try:
            if aside.read_bytes() != expected:  # it changed since it was read: not ours to replace
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                return False
        finally:
            aside.unlink(missing_ok=True)
        return self.create_exclusive(name, data)

    def swap(self, name: str, expected: bytes, data: bytes) -> bool:
        if self.read_optional(name) != expected:
            return False
        self.write_bytes(name, data)
        return True

    def delete_if(self, name: str, expected: bytes) -> bool:
        path = self._path(name)
        aside = self._aside(path, "gone")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        try:
            if aside.read_bytes() != expected:
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                return False
            return True
        finally:
            aside.unlink(missing_ok=True)

    def staging_dir(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    def clean_partial(self) -> int:
        removed = 0
        if self.root.is_dir():
            for path in self.root.rglob(".*.partial-*"):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def check_reachable(self) -> None:
        if not self.root.is_dir():
            raise StorageError(f"{self.root} does not exist or is not a directory: check the path")

    def check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise StorageError(
                f"cannot create {self.root}: permission denied; choose a writable DEST"
            ) from None
        except (FileExistsError, NotADirectoryError):
            raise StorageError(f"{self.root} is a file, not a directory; choose a directory for DEST") from None
        super().check_writable()


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


def make_s3_client(max_attempts: int | None = None):
    """A boto3 S3 client on the standard credential chain; ``AWS_ENDPOINT_URL`` is honoured by boto3."""
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
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.session.Session().client("s3", region_name=region, config=config)


def describe_s3_error(exc: BaseException, url: str) -> StorageError:
    """Translate a boto3/botocore exception into a one-line error that names the fix."""
    from botocore import exceptions as bx

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or "the AWS S3 endpoint"
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
    attempts = attempts or int(os.environ.get("ALEXRAY_S3_ATTEMPTS", "8"))
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


def open_storage(url: str | Path, record_uploads: bool = False) -> Storage:
    """``s3://bucket/prefix`` -> S3Storage, anything else -> LocalStorage."""
    url = str(url)
    if is_s3_url(url):
        from .s3storage import S3Storage

        return S3Storage(url, record_uploads=record_uploads)
    if "://" in url and not url.startswith("file://"):
        raise StorageError(f"unsupported storage URL {url!r}: use s3://BUCKET/PREFIX or a local path")
    return LocalStorage(url.removeprefix("file://"))
