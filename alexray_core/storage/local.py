"""The local backend of storage: a directory, written atomically.

Both backends make a finished object visible atomically: locally a temp file is renamed into
place, on S3 a single PUT or a completed multipart upload (an interrupted multipart upload is
invisible; with ``record_uploads`` its id is kept under ``_uploads/`` so the next run aborts exactly
the uploads it began, never another program's in the same bucket). Nothing ever shows a
half-written shard.

``create_exclusive``, ``take_over``, ``swap`` and ``delete_if`` are the few atomic steps a lease
needs (``data_prep.lease``): a link on local disk, conditional PUTs (If-None-Match, If-Match) on S3.

S3 access (``alexray_core.storage.s3``, helpers in ``alexray_core.storage.api``) goes through boto3's standard credential chain and honours
``AWS_ENDPOINT_URL``.
Transient failures (connection drops, 5xx, throttling) are retried with exponential backoff by
botocore and, around whole-object operations, by ``retry_transient``.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Iterator

from alexray_core.storage.api import ObjectInfo, Storage, StorageError

log = logging.getLogger("alexray.storage")


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
