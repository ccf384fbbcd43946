"""The one sha256 reader: hash a shard or any object while it is being read, in one pass.

Manifests record each shard's sha256; sharding checks a resumed shard against it, ``alexray shard
verify`` and the training loader (``data.verify_shards``) check whole shards as they parse them.
All of them read through ``Sha256Reader``, so the bytes hashed are exactly the bytes used.
"""

from __future__ import annotations

import hashlib
import io
from typing import BinaryIO, Iterable


class Sha256Reader(io.RawIOBase):
    """A read-only stream over ``source`` that feeds every byte read through sha256.

    ``source`` is a readable binary stream (its ``read`` is passed through) or an iterable of byte
    chunks (such as ``Storage.iter_chunks``; then one ``read`` returns at most one chunk, as a raw
    stream may: wrap it in ``io.BufferedReader`` for whole reads). ``finish`` reads what is left
    and returns the hex digest of everything.
    """

    def __init__(self, source: BinaryIO | Iterable[bytes]):
        super().__init__()
        self._stream = source if hasattr(source, "read") else None
        self._chunks = None if self._stream is not None else iter(source)
        self._pending, self._offset = b"", 0  # the current chunk, and how much of it was read
        self.digest = hashlib.sha256()
        self.count = 0  # bytes read so far

    def readable(self) -> bool:
        return True

    def _next(self, size: int) -> bytes:
        if self._stream is not None:
            return self._stream.read(size)
        if size is None or size < 0:
            data = self._pending[self._offset:] + b"".join(self._chunks)
            self._pending, self._offset = b"", 0
            return data
        while self._offset >= len(self._pending):
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._pending, self._offset = chunk, 0
        if self._offset == 0 and size >= len(self._pending):
            self._offset = len(self._pending)
            return self._pending
        # slices of a memoryview: no copy of the chunk's rest on every small read
        data = bytes(memoryview(self._pending)[self._offset:self._offset + size])
        self._offset += len(data)
        return data

    def read(self, size: int = -1) -> bytes:
        data = self._next(size)
        self.digest.update(data)
        self.count += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def finish(self) -> str:
        """Read the rest (a parser may stop before the end, e.g. at a tar's padding); the hex digest."""
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest()


def sha256_of(source: BinaryIO | Iterable[bytes]) -> str:
    """The hex sha256 of everything in a stream or an iterable of chunks."""
    return Sha256Reader(source).finish()
