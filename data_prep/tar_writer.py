"""The tar stream of a shard: POSIX ustar members with fixed metadata, gathered in one buffer.

Fixed metadata (mtime 0, root, mode 0444) makes the same inputs give byte-identical shards. A
shard of small files is written a few large blocks at a time: headers, members and padding are
assembled in place in one reused buffer, and a file is read straight into it. Per member, only
what cannot be avoided is done in Python; the rest is one ``struct`` call.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct

_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar's default record size: archives are padded to a multiple of it
_BUFFER = 1 << 20  # what a writer gathers before handing it to its sink

# The fixed fields of every header (mode 0444, uid/gid 0, mtime 0, regular file, ustar magic); the
# checksum is computed with its own field as eight spaces.
_MODE_IDS = b"0000444\0" + b"0000000\0" * 2
_MTIME = b"00000000000\0"
_TYPE_TO_MAGIC = b"0" + bytes(100) + b"ustar\x0000" + bytes(80)  # typeflag, linkname, magic, owner names, devices
_FIXED_SUM = sum(_MODE_IDS) + sum(_MTIME) + 8 * ord(" ") + sum(_TYPE_TO_MAGIC)
# name, mode/uid/gid, size, mtime, checksum, typeflag to devices, prefix, padding; struct fills
# every field it is given short with NULs, and the padding too.
_HEADER = struct.Struct("100s24s12s12s8s189s155s12x")
_JPG_SUM, _CLS_SUM, _JSON_SUM = sum(b".jpg"), sum(b".cls"), sum(b".json")
_SMALL_SIZES = [(b"%011o\0" % n, sum(b"%011o\0" % n)) for n in range(_BLOCK + 1)]  # size field, its sum
_ZEROS = [bytes(n) for n in range(_BLOCK)]  # padding, by length
# Two members of one block of data each, header and zero-padded data: a sample's class and metadata.
_PAIR = struct.Struct(2 * (_HEADER.format + f"{_BLOCK}s"))


def _header_fields(name: str, size: int) -> tuple:
    """The fields of ``_HEADER`` for member ``name`` of ``size`` bytes. Written by hand, from
    pieces fixed in advance: tarfile's generic header code costs more than copying a typical JPEG."""
    encoded = name.encode("utf-8")
    size_field = b"%011o\0" % size
    if len(encoded) <= 100:
        checksum = _FIXED_SUM + sum(encoded) + sum(size_field)
        return encoded, _MODE_IDS, size_field, _MTIME, b"%06o\0 " % checksum, _TYPE_TO_MAGIC, b""
    # ustar splits long paths at a slash into prefix (155) + name (100)
    cut = encoded.rfind(b"/", 0, 156)
    if cut <= 0 or len(encoded) - cut - 1 > 100:
        raise ValueError(f"tar member name too long for ustar: {name!r}")
    prefix, encoded = encoded[:cut], encoded[cut + 1:]
    checksum = _FIXED_SUM + sum(encoded) + sum(size_field) + sum(prefix)
    return encoded, _MODE_IDS, size_field, _MTIME, b"%06o\0 " % checksum, _TYPE_TO_MAGIC, prefix


def _tar_header(name: str, size: int) -> bytes:
    """A POSIX ustar header with fixed metadata (mtime 0, root, read-only)."""
    return _HEADER.pack(*_header_fields(name, size))


class UnreadableFile(Exception):
    """The file to add could not be read; ``error`` says why. Nothing was added."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, raw):
        self.raw, self.digest, self.count = raw, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        written = self.raw.write(data)
        if written is not None and written < len(data):  # an unbuffered raw file may take part of it
            view = memoryview(data)
            while written < len(data):
                written += self.raw.write(view[written:])
        self.count += len(data)
        return len(data)

    def tell(self) -> int:
        return self.count


class TarShardWriter:
    """Append regular files to a tar stream; ``close`` writes the end-of-archive blocks.

    Members are gathered in one buffer handed to the sink whenever it fills; the sink must copy
    what it is given (files and BytesIO do), as the buffer is reused.
    """

    def __init__(self, sink):
        self.sink, self.offset = sink, 0
        self._buffer = bytearray(_BUFFER)
        self._view = memoryview(self._buffer)
        self._used = 0

    def add(self, name: str, data) -> None:
        size = len(data)
        if self._used + 2 * _BLOCK + size > len(self._buffer):
            self.flush()
        self._header(name, size)
        if 2 * _BLOCK + size <= len(self._buffer):
            self._buffer[self._used:self._used + size] = data
            self._used += size
        else:  # larger than the buffer: after its header, straight to the sink
            self.flush()
            self.sink.write(data)
        self._pad(size)

    def add_pair(self, name_a: str, a: bytes, name_b: str, b: bytes) -> None:
        """``add(name_a, a)`` then ``add(name_b, b)``, in one step when each holds 1 to 512 bytes."""
        if not (0 < len(a) <= _BLOCK and 0 < len(b) <= _BLOCK):
            self.add(name_a, a)
            self.add(name_b, b)
            return
        if self._used + 4 * _BLOCK > len(self._buffer):
            self.flush()
        _PAIR.pack_into(self._buffer, self._used, *_header_fields(name_a, len(a)), a,
                        *_header_fields(name_b, len(b)), b)
        self._used += 4 * _BLOCK
        self.offset += 4 * _BLOCK

    def add_file(self, name: str, path: str, listed_size: int = 0) -> int:
        """Add the file at ``path``, read to its end, as member ``name``; returns its size.
        ``listed_size``, the size the file had when listed, makes room for it in the buffer
        first, so it is read there whole. Raises UnreadableFile, having added nothing, when the
        file cannot be read; a failure of the sink raises as it is."""
        if self._used + 2 * _BLOCK + listed_size + 1 > len(self._buffer):
            self.flush()
        size, data = self._read_in(path, listed_size)
        if data is not None:
            self.add(name, data)
            return size
        self._header(name, size)
        self._used += size
        self._pad(size)
        return size

    def add_sample(self, key: str, path: str, listed_size: int, cls: bytes, meta: bytes) -> int:
        """``add_file(f"{key}.jpg", path, listed_size)`` then ``add_pair(f"{key}.cls", cls,
        f"{key}.json", meta)``: a shard sample, in one step when its names are plain and its class
        and metadata fit a block each (the cost per member, not per byte, bounds a shard of small
        files)."""
        encoded = key.encode("utf-8")
        n_cls, n_meta = len(cls), len(meta)
        if len(encoded) > 100 - len(".json") or not (0 < n_cls <= _BLOCK and 0 < n_meta <= _BLOCK):
            size = self.add_file(f"{key}.jpg", path, listed_size)
            self.add_pair(f"{key}.cls", cls, f"{key}.json", meta)
            return size
        if self._used + 6 * _BLOCK + listed_size + 1 > _BUFFER:
            self.flush()
        size, data = self._read_in(path, listed_size)
        if data is not None:
            self.add(f"{key}.jpg", data)
            self.add_pair(f"{key}.cls", cls, f"{key}.json", meta)
            return size
        buffer, at = self._buffer, self._used
        key_sum = _FIXED_SUM + sum(encoded)
        size_field = b"%011o\0" % size
        _HEADER.pack_into(buffer, at, encoded + b".jpg", _MODE_IDS, size_field, _MTIME,
                          b"%06o\0 " % (key_sum + _JPG_SUM + sum(size_field)), _TYPE_TO_MAGIC, b"")
        end = at + _BLOCK + size
        padding = -size % _BLOCK
        buffer[end:end + padding] = _ZEROS[padding]
        end += padding
        self.offset += end - at + 4 * _BLOCK
        if end + 4 * _BLOCK > _BUFFER:
            self._used = end
            self.flush()
            end = 0
        (cls_size, cls_sum), (meta_size, meta_sum) = _SMALL_SIZES[n_cls], _SMALL_SIZES[n_meta]
        _PAIR.pack_into(buffer, end,
                        encoded + b".cls", _MODE_IDS, cls_size, _MTIME,
                        b"%06o\0 " % (key_sum + _CLS_SUM + cls_sum), _TYPE_TO_MAGIC, b"", cls,
                        encoded + b".json", _MODE_IDS, meta_size, _MTIME,
                        b"%06o\0 " % (key_sum + _JSON_SUM + meta_sum), _TYPE_TO_MAGIC, b"", meta)
        self._used = end + 4 * _BLOCK
        return size

    def _read_in(self, path: str, listed_size: int) -> tuple[int, bytes | None]:
        """Read the file at ``path`` into the buffer one header past what it holds: (its size,
        None), or (its size, its bytes) when it did not fit there."""
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                room = self._view[self._used + _BLOCK:]
                size = os.readv(fd, (room,))
                # A regular file reads short only at its end: a first read of exactly the listed
                # size, short of the room, is the whole file. Anything else reads on to a read
                # that returns nothing.
                if size != listed_size:
                    size = _read_on(fd, room, size)
                    if size is None:  # larger than the room: as bytes, added like any data
                        data = bytes(room) + _read_to_end(fd)
                        return len(data), data
            finally:
                os.close(fd)
        except OSError as e:
            raise UnreadableFile(e) from None
        return size, None

    def _header(self, name: str, size: int) -> None:
        _HEADER.pack_into(self._buffer, self._used, *_header_fields(name, size))
        self._used += _BLOCK

    def _pad(self, size: int) -> None:
        """Zero-fill the member of ``size`` bytes just added to its last block."""
        padding = -size % _BLOCK
        self._buffer[self._used:self._used + padding] = _ZEROS[padding]
        self._used += padding
        self.offset += _BLOCK + size + padding

    def flush(self) -> None:
        if self._used:
            self.sink.write(self._view[:self._used])
            self._used = 0

    def close(self) -> None:
        end = self.offset + 2 * _BLOCK
        trailer = 2 * _BLOCK + (-end % _RECORD)
        if self._used + trailer > len(self._buffer):
            self.flush()
        self._buffer[self._used:self._used + trailer] = bytes(trailer)
        self._used += trailer
        self.flush()


def _read_on(fd: int, room: memoryview, size: int) -> int | None:
    """Read on into ``room`` after its first ``size`` bytes until the file ends; the total, or
    None when the file fills ``room`` without ending."""
    while size < len(room):
        got = os.readv(fd, (room[size:],))
        if not got:
            return size
        size += got
    return None


def _read_to_end(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, _BUFFER):
        parts.append(chunk)
    return b"".join(parts)
