"""Shards on S3: ``S3Storage``, the ``Storage`` of an ``s3://bucket/prefix``.

A finished object becomes visible at once (a single PUT or a completed multipart upload).
Multipart uploads that a killed run leaves behind are invisible but cost storage: with
``record_uploads`` each one is recorded under ``_uploads/`` before its first part is sent, and the
next run aborts exactly those, never another program's uploads in the same bucket.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from alexray_core.storage.api import (
    ObjectInfo,
    Storage,
    StorageError,
    _unwrap_upload_error,
    describe_s3_error,
    make_s3_client,
    retry_transient,
    s3_endpoint,
    split_s3_url,
)
from alexray_core.storage.s3reader import ResumableS3Reader

T = TypeVar("T")
log = logging.getLogger("alexray.storage")

UPLOADS_DIR = "_uploads"  # records of multipart uploads begun and not yet completed or aborted
_PRECONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


class S3Storage(Storage):
    """Objects under ``s3://bucket/prefix``.

    ``record_uploads``: keep a record under ``_uploads/`` of every multipart upload this storage
    begins until it is completed or aborted, so ``clean_partial`` can abort the ones a killed run
    left behind, and only those.
    """

    def __init__(self, url: str, client=None, record_uploads: bool = False):
        self.url = url.rstrip("/")
        self.bucket, self.prefix = split_s3_url(url)
        self.record_uploads = record_uploads
        self._client = client
        self._init_local_state()

    def _init_local_state(self) -> None:
        self._lock = threading.Lock()
        self._begun: dict[str, list[str]] = {}  # key -> upload ids begun by this process, not yet settled

    @property
    def client(self):
        # Created lazily so a Storage can be pickled into worker processes.
        with self._lock:
            if self._client is None:
                client = make_s3_client()
                if self.record_uploads:
                    client.meta.events.register("after-call.s3.CreateMultipartUpload", self._record_upload)
                self._client = client
            return self._client

    def __getstate__(self):
        return {"url": self.url, "bucket": self.bucket, "prefix": self.prefix, "record_uploads": self.record_uploads,
                "_client": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_local_state()

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return retry_transient(fn, what=what)
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001
            if type(exc).__module__.startswith(("botocore", "boto3", "s3transfer", "urllib3")):
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

    def _get_versioned(self, name: str) -> tuple[bytes, str] | None:
        """(bytes, ETag) of an object, or None when it does not exist."""
        from botocore.exceptions import ClientError

        def get():
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            return response["Body"].read(), response["ETag"]

        return self._call(f"get {name}", get)

    def read_optional(self, name: str) -> bytes | None:
        found = self._get_versioned(name)
        return None if found is None else found[0]

    def iter_chunks(self, name: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Stream an object. A connection that drops mid-read is picked up again with a ranged GET
        from the byte where it broke, pinned by If-Match to the same version of the object."""
        with self.reader(name) as reader:
            while chunk := reader.read(chunk_size):
                yield chunk

    def reader(self, name: str) -> ResumableS3Reader:
        """A resumable, version-pinned raw file over one object, failing in this storage's words."""
        return ResumableS3Reader(self.bucket, self._key(name), client=self.client, then="read it again",
                                 describe=lambda exc, _url, _attempts: describe_s3_error(exc, self.url))

    def write_bytes(self, name: str, data: bytes) -> None:
        self._call(f"put {name}", lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data))

    def _conditional_put(self, name: str, data: bytes, **condition) -> bool | None:
        """PUT with If-None-Match/If-Match; False when the condition does not hold, None when the
        server does not implement conditional writes."""
        from botocore.exceptions import ClientError

        def put():
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data, **condition)
                return True
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in _PRECONDITION_CODES:
                    return False
                if code == "NotImplemented" or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 501:
                    return None
                raise

        done = self._call(f"put {name}", put)
        if done is None:
            log.warning("%s does not implement conditional writes: two runs starting at the same moment "
                        "may both take %s", s3_endpoint() or "S3", self.join(name))
        return done

    def create_exclusive(self, name: str, data: bytes) -> bool:
        done = self._conditional_put(name, data, IfNoneMatch="*")
        if done is None:  # check, then write: not atomic, but a later run still sees the first one's lease
            if self.read_optional(name) is not None:
                return False
            self.write_bytes(name, data)
            return True
        return done

    def take_over(self, name: str, expected: bytes, data: bytes) -> bool:
        found = self._get_versioned(name)
        if found is None or found[0] != expected:
            return False
        done = self._conditional_put(name, data, IfMatch=found[1])
        if done is None:
            self.write_bytes(name, data)
            return True
        return done

    def swap(self, name: str, expected: bytes, data: bytes) -> bool:
        return self.take_over(name, expected, data)  # a PUT replaces atomically: never absent

    # -- uploads -----------------------------------------------------------------------------------

    def _record_name(self, upload_id: str) -> str:
        return f"{UPLOADS_DIR}/{hashlib.sha256(upload_id.encode()).hexdigest()[:40]}.json"

    def _record_upload(self, http_response=None, parsed=None, **_) -> None:
        """botocore hook after CreateMultipartUpload: note the upload before any part is sent."""
        if http_response is None or http_response.status_code >= 300 or not parsed or "UploadId" not in parsed:
            return
        key, upload_id = parsed["Key"], parsed["UploadId"]
        record = json.dumps({"key": key, "upload_id": upload_id, "started": time.time()}).encode()
        retry_transient(lambda: self._client.put_object(Bucket=self.bucket, Key=self._key(self._record_name(upload_id)),
                                                        Body=record), what=f"record upload of {key}")
        with self._lock:
            self._begun.setdefault(key, []).append(upload_id)

    def _abort_recorded(self, key: str, upload_id: str) -> bool:
        """Abort one recorded upload and drop its record; False if S3 could not be reached."""
        from botocore.exceptions import ClientError

        try:
            retry_transient(lambda: self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id),
                            what=f"abort upload of {key}", attempts=3)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) not in ("NoSuchUpload", "404"):
                log.warning("could not abort the upload %s of %s: %s", upload_id, key, exc)
                return False
        except Exception as exc:  # noqa: BLE001 - unreachable: the record stays for the next run
            log.warning("could not abort the upload %s of %s: %s", upload_id, key, exc)
            return False
        self.delete(self._record_name(upload_id))
        return True

    def put_file(self, name: str, local_path: Path) -> None:
        # upload_file switches to multipart for large files and aborts the upload on failure,
        # so an incomplete shard never becomes visible under its name.
        key = self._key(name)
        completed = False
        try:
            self._call(f"upload {name}", lambda: self.client.upload_file(str(local_path), self.bucket, key))
            completed = True
        finally:
            with self._lock:
                begun = self._begun.pop(key, [])
            for i, upload_id in enumerate(begun):
                if completed and i == len(begun) - 1:
                    self.delete(self._record_name(upload_id))  # the upload that completed
                else:
                    self._abort_recorded(key, upload_id)  # a failed attempt; upload_file may not have aborted it
        Path(local_path).unlink(missing_ok=True)

    def delete(self, name: str) -> None:
        self._call(f"delete {name}", lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(name)))

    def clean_partial(self) -> int:
        """Abort the multipart uploads an earlier, killed run recorded under ``_uploads/``.

        Only recorded ones: the bucket may be shared, and listing the bucket's uploads would also
        find other programs' (all of them, for a DEST that is a bare bucket).
        """
        aborted = 0
        base = self._key("")
        for o in self.list(UPLOADS_DIR + "/"):
            try:
                record = json.loads(self.read_bytes(o.name))
                key, upload_id = record["key"], record["upload_id"]
            except (ValueError, KeyError, TypeError):
                self.delete(o.name)  # unreadable: it names nothing we could abort
                continue
            if not key.startswith(base) or o.name != self._record_name(upload_id):
                log.warning("ignoring %s: it records an upload outside %s", self.join(o.name), self.url)
                continue
            aborted += self._abort_recorded(key, upload_id)
        return aborted

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
