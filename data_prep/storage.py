"""Where shards live: a local directory or an S3 prefix, behind one small interface.

Both backends make a finished object visible atomically: locally a temp file is renamed into
place, on S3 a single PUT or a completed multipart upload (an interrupted multipart upload is
invisible and is aborted on the next run). Nothing ever shows a half-written shard.

S3 access goes through boto3's standard credential chain and honours ``AWS_ENDPOINT_URL``.
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
        probe = f"_write_probe_{os.getpid()}_{random.getrandbits(32):08x}"
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
                        bx.ConnectTimeoutError, bx.ResponseStreamingError, ConnectionError)):
        return True
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
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            log.warning("%s failed (%s); retrying in %.1f s (attempt %d of %d)", what, exc, delay, attempt, attempts)
            time.sleep(delay)
    raise AssertionError("unreachable")


class S3Storage(Storage):
    def __init__(self, url: str, client=None):
        self.url = url.rstrip("/")
        self.bucket, self.prefix = split_s3_url(url)
        self._client = client

    @property
    def client(self):
        # Created lazily so a Storage can be pickled into worker processes.
        if self._client is None:
            self._client = make_s3_client()
        return self._client

    def __getstate__(self):
        return {"url": self.url, "bucket": self.bucket, "prefix": self.prefix, "_client": None}

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return retry_transient(fn, what=what)
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001
            if type(exc).__module__.startswith(("botocore", "boto3", "s3transfer")):
                raise describe_s3_error(_unwrap_upload_error(exc), self.url) from exc
            raise

    def info(self, name: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        def head():
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self._key(name))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise

        response = self._call(f"head {name}", head)
        return None if response is None else ObjectInfo(name, response["ContentLength"])

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        def list_all():
            found = []
            base = self._key("")
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                for obj in page.get("Contents", []):
                    found.append(ObjectInfo(obj["Key"][len(base):], obj["Size"]))
            return sorted(found, key=lambda o: o.name)

        return self._call("list", list_all)

    def read_bytes(self, name: str) -> bytes:
        return self._call(
            f"get {name}", lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        )

    def iter_chunks(self, name: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        body = self._call(f"get {name}", lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"])
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def write_bytes(self, name: str, data: bytes) -> None:
        self._call(f"put {name}", lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data))

    def put_file(self, name: str, local_path: Path) -> None:
        # upload_file switches to multipart for large files and aborts the upload on failure,
        # so an incomplete shard never becomes visible under its name.
        self._call(f"upload {name}", lambda: self.client.upload_file(str(local_path), self.bucket, self._key(name)))
        Path(local_path).unlink(missing_ok=True)

    def delete(self, name: str) -> None:
        self._call(f"delete {name}", lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(name)))

    def clean_partial(self) -> int:
        """Abort multipart uploads left under the prefix by a killed run."""
        from botocore.exceptions import ClientError

        try:
            uploads = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self._key("")).get("Uploads", [])
        except ClientError:
            return 0  # not every S3 implementation lists uploads; leftovers are invisible anyway
        for upload in uploads:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            except ClientError:
                pass
        return len(uploads)

    def check_reachable(self) -> None:
        """Fail fast, with the reason, if the bucket is missing, credentials are refused or S3 is down."""
        probe_client = make_s3_client(max_attempts=2)
        try:
            probe_client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # noqa: BLE001
            from botocore.exceptions import ClientError

            if isinstance(exc, ClientError):
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in ("404", "NoSuchBucket", "NotFound"):
                    raise StorageError(
                        f"bucket {self.bucket!r} does not exist: create it (aws s3 mb s3://{self.bucket}) or fix the URL {self.url}"
                    ) from None
            raise describe_s3_error(exc, self.url) from None

    def check_writable(self) -> None:
        self.check_reachable()
        super().check_writable()


def open_storage(url: str | Path) -> Storage:
    """``s3://bucket/prefix`` -> S3Storage, anything else -> LocalStorage."""
    url = str(url)
    if is_s3_url(url):
        return S3Storage(url)
    if "://" in url and not url.startswith("file://"):
        raise StorageError(f"unsupported storage URL {url!r}: use s3://BUCKET/PREFIX or a local path")
    return LocalStorage(url.removeprefix("file://"))
