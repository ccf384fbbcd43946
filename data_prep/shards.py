"""Plan shards from probed files and write one shard.

A plan is a pure function of (the probed files, the seed, the sizes): every process or Ray node
computes the same plan, any shard can be written by anyone, and a rerun writes byte-identical
shards. Tar members carry fixed metadata (mtime, owner, mode) for the same reason.

Each sample is three members: ``{key}.jpg`` (RGB JPEG), ``{key}.cls`` (class index, ASCII) and
``{key}.json`` (class id, source path, width, height).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import tempfile
from dataclasses import asdict, dataclass, field
from json.encoder import encode_basestring_ascii as _json_str
from pathlib import Path
from typing import Callable

from alexray_core.storage.api import Storage

from .images import (
    CONVERT,
    KEEP,
    RESIZE,
    ImageOptions,
    Probe,
    RejectedImage,
    prepare_image,
    read_file,
    resized_size,
)
from .lease import check_holder
from .sources import Reject

PROGRESS_DIR = "_progress"
TAR_OVERHEAD_PER_SAMPLE = 3 * 512 + 3 * 256  # three headers plus, on average, half a block of padding each


@dataclass(frozen=True)
class PlannedSample:
    key: str
    relpath: str
    class_index: int
    class_id: str
    action: str
    width: int
    height: int
    est_bytes: int

    def probe(self) -> Probe:
        return Probe(self.action, width=self.width, height=self.height)


@dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    samples: tuple[PlannedSample, ...]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)


@dataclass
class ShardResult:
    """What a finished shard holds; stored beside it in ``_progress/`` until the manifest is written."""

    name: str
    split: str
    index: int
    samples: int
    bytes: int
    sha256: str
    fingerprint: str
    rejects: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ShardResult":
        return cls(**data)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def progress_name(shard: str) -> str:
    return f"{PROGRESS_DIR}/{shard}.json"


def estimate_bytes(size: int, probe: Probe, options: ImageOptions) -> int:
    """Stored size of a sample's image: exact when kept, scaled by the pixel ratio when re-encoded."""
    if probe.action == KEEP:
        return size
    width, height = resized_size(probe.width, probe.height, options.resize_short_side)
    return max(1, int(size * (width * height) / max(1, probe.width * probe.height)))


def samples_per_shard(est_bytes: int, count: int, shard_size: int, max_shard_bytes: int | None) -> int:
    """``shard_size``, lowered so the estimated shard size stays under ``max_shard_bytes``, for
    ``count`` samples whose images are estimated at ``est_bytes`` in all."""
    if not max_shard_bytes or not count:
        return shard_size
    mean = est_bytes / count + TAR_OVERHEAD_PER_SAMPLE
    return max(1, min(shard_size, math.floor(max_shard_bytes / (mean * 1.05))))


def shuffle_order(split: str, items, seed: int) -> None:
    """Shuffle a split's samples, given in path order, in place (a list or an ``array``: only the
    length and the seed decide the permutation). It mixes classes so no shard holds only one."""
    random.Random(f"alexray-shard:{seed}:{split}").shuffle(items)


def plan_split(split: str, samples: list[PlannedSample], seed: int, shard_size: int,
               max_shard_bytes: int | None = None) -> list[ShardPlan]:
    """Shuffle a split's samples with the seed and cut them into equal shards (the last may be short).

    The plan in its plainest form; ``data_prep.planning.SplitPlan`` computes the same plan from
    packed arrays, one shard at a time.
    """
    ordered = sorted(samples, key=lambda s: s.relpath)
    shuffle_order(split, ordered, seed)
    per_shard = samples_per_shard(sum(s.est_bytes for s in ordered), len(ordered), shard_size, max_shard_bytes)
    return [ShardPlan(split, i, tuple(ordered[start:start + per_shard]))
            for i, start in enumerate(range(0, len(ordered), per_shard))]


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, raw):
        self.raw, self.digest, self.count = raw, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        self.raw.write(data)
        self.count += len(data)
        return len(data)

    def tell(self) -> int:
        return self.count


_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar's default record size: archives are padded to a multiple of it
_ZEROS = bytes(_BLOCK)


# The fixed fields of every header (mode 0444, uid/gid 0, mtime 0, regular file, ustar magic); the
# checksum is computed with its own field as eight spaces.
_MODE_IDS = b"0000444\0" + b"0000000\0" * 2
_MTIME = b"00000000000\0"
_TYPE_TO_MAGIC = b"0" + bytes(100) + b"ustar\x0000" + bytes(80)  # typeflag, linkname, magic, owner names, devices
_FIXED_SUM = sum(_MODE_IDS) + sum(_MTIME) + 8 * ord(" ") + sum(_TYPE_TO_MAGIC)
_SMALL = 4096  # members up to this size are joined with their neighbours into one write


def _tar_header(name: str, size: int) -> bytes:
    """A POSIX ustar header with fixed metadata (mtime 0, root, read-only): the same inputs give
    byte-identical shards. Written by hand, from pieces fixed in advance: tarfile's generic header
    code costs more than copying a typical JPEG."""
    encoded = name.encode("utf-8")
    prefix = b""
    if len(encoded) > 100:  # ustar splits long paths at a slash into prefix (155) + name (100)
        cut = encoded.rfind(b"/", 0, 156)
        if cut <= 0 or len(encoded) - cut - 1 > 100:
            raise ValueError(f"tar member name too long for ustar: {name!r}")
        prefix, encoded = encoded[:cut], encoded[cut + 1:]
    size_field = b"%011o\0" % size
    checksum = _FIXED_SUM + sum(encoded) + sum(size_field) + sum(prefix)
    return b"".join((encoded.ljust(100, b"\0"), _MODE_IDS, size_field, _MTIME, b"%06o\0 " % checksum,
                     _TYPE_TO_MAGIC, prefix.ljust(155, b"\0"), bytes(12)))


class TarShardWriter:
    """Append regular files to a tar stream; ``close`` writes the end-of-archive blocks.

    Headers, padding and small members are gathered and handed to the sink in one write, before
    the next large member or at ``close``: a shard sample is then two writes instead of nine.
    """

    def __init__(self, sink):
        self.sink, self.offset = sink, 0
        self.pending: list[bytes] = []

    def add(self, name: str, data: bytes) -> None:
        padding = -len(data) % _BLOCK
        self.pending.append(_tar_header(name, len(data)))
        if len(data) <= _SMALL:
            self.pending.append(data)
        else:
            self.sink.write(b"".join(self.pending))
            self.sink.write(data)
            self.pending.clear()
        if padding:
            self.pending.append(_ZEROS[:padding])
        self.offset += _BLOCK + len(data) + padding

    def close(self) -> None:
        end = self.offset + 2 * _BLOCK
        self.pending.append(bytes(2 * _BLOCK + (-end % _RECORD)))
        self.sink.write(b"".join(self.pending))
        self.pending.clear()


def write_shard(plan: ShardPlan, src_root: str, storage: Storage, options: ImageOptions, fingerprint: str,
                staging_dir: str | None = None, on_sample: Callable[[int], None] | None = None,
                lease_token: str | None = None) -> ShardResult:
    """Build one shard and publish it: one task of a Ray cluster, where nothing else can upload it.

    With ``lease_token``, DEST must still hold that run's lease, before the shard is built (on a
    node that does not see a local DEST nothing is created there) and again before it is published.
    """
    check = None if lease_token is None else (lambda: check_holder(storage, lease_token))
    if check is not None:
        check()
    result, path = build_shard(plan, src_root, storage, options, fingerprint, staging_dir, on_sample)
    publish_shard(storage, result, path, check)
    return result


def publish_shard(storage: Storage, result: ShardResult, path: Path, check: Callable[[], None] | None = None) -> None:
    """Move a built shard to its final name atomically, then record it in ``_progress/``.

    ``check`` raises if this run may no longer write DEST (its lease was taken over).
    """
    try:
        if check is not None:
            check()
        storage.put_file(result.name, path)
        # The record is written after the shard is in place: a record always means a finished shard.
        storage.write_bytes(progress_name(result.name), json.dumps(result.to_json(), sort_keys=True).encode())
    finally:
        path.unlink(missing_ok=True)


def build_shard(plan: ShardPlan, src_root: str, storage: Storage, options: ImageOptions, fingerprint: str,
                staging_dir: str | None = None,
                on_sample: Callable[[int], None] | None = None) -> tuple[ShardResult, Path]:
    """Write one shard to a temporary file; returns what it holds and where the file is.

    ``on_sample(nbytes)`` is called after each sample, for progress reporting. A sample whose
    bytes fail to decode (only possible for files accepted on their structure) is left out and
    listed in the result's rejects. The file is built beside its final place when the storage is
    local, else in ``staging_dir``, else in this machine's temp directory.
    """
    staging = storage.staging_dir() or staging_dir
    fd, tmp_name = tempfile.mkstemp(prefix=f".{plan.name}.partial-", dir=staging)
    tmp = Path(tmp_name)
    rejects: list[dict] = []
    written = 0
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as raw:
            # mkstemp's 0600 would keep a local shard from every other user of a shared file system
            os.fchmod(raw.fileno(), 0o666 & ~current_umask())
            sink = _HashingWriter(raw)
            tar = TarShardWriter(sink)
            for sample in plan.samples:
                nbytes = 0
                try:
                    data = read_file(os.path.join(src_root, sample.relpath))
                    nbytes = len(data)
                    jpeg, width, height = prepare_image(data, sample.probe(), options)
                except (RejectedImage, OSError) as e:
                    reason = str(e) if isinstance(e, RejectedImage) else f"unreadable: {e.strerror or e}"
                    rejects.append(Reject(sample.relpath, reason).to_json())
                else:
                    tar.add(f"{sample.key}.jpg", jpeg)
                    tar.add(f"{sample.key}.cls", str(sample.class_index).encode())
                    tar.add(f"{sample.key}.json", sample_json(sample, width, height))
                    written += 1
                if on_sample is not None:
                    on_sample(nbytes)
            # No fsync here: publishing fsyncs a local shard before renaming it into place, on the
            # publisher's thread, so this worker goes on to its next shard; a staged upload needs none.
            tar.close()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ShardResult(plan.name, plan.split, plan.index, written, sink.count, sink.digest.hexdigest(),
                       fingerprint, rejects), tmp


def sample_json(sample: PlannedSample, width: int, height: int) -> bytes:
    """A sample's ``.json`` member: exactly ``json.dumps(meta, sort_keys=True)``, formatted directly
    because json.dumps builds an encoder per call, which cost more than the rest of the member."""
    return (_SAMPLE_JSON % (_json_str(sample.class_id), sample.class_index, height, _json_str(sample.relpath),
                            width)).encode()


_SAMPLE_JSON = '{"class_id": %s, "class_index": %d, "height": %d, "source": %s, "width": %d}'  # keys sorted


def current_umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def planned_sample(key: str, relpath: str, class_index: int, class_id: str, size: int, probe: Probe,
                   options: ImageOptions) -> PlannedSample:
    assert probe.action in (KEEP, CONVERT, RESIZE), probe.action
    return PlannedSample(key, relpath, class_index, class_id, probe.action, probe.width, probe.height,
                         estimate_bytes(size, probe, options))
