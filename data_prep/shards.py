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
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .images import CONVERT, KEEP, RESIZE, ImageOptions, Probe, RejectedImage, prepare_image, resized_size
from .sources import Reject
from .storage import Storage

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


def samples_per_shard(samples: list[PlannedSample], shard_size: int, max_shard_bytes: int | None) -> int:
    """``shard_size``, lowered so the estimated shard size stays under ``max_shard_bytes``."""
    if not max_shard_bytes or not samples:
        return shard_size
    mean = sum(s.est_bytes for s in samples) / len(samples) + TAR_OVERHEAD_PER_SAMPLE
    return max(1, min(shard_size, math.floor(max_shard_bytes / (mean * 1.05))))


def plan_split(split: str, samples: list[PlannedSample], seed: int, shard_size: int,
               max_shard_bytes: int | None = None) -> list[ShardPlan]:
    """Shuffle a split's samples with the seed and cut them into equal shards (the last may be short).

    The input order must already be deterministic (sorted by path); the shuffle mixes classes so no
    shard holds only one of them.
    """
    ordered = sorted(samples, key=lambda s: s.relpath)
    random.Random(f"alexray-shard:{seed}:{split}").shuffle(ordered)
    per_shard = samples_per_shard(ordered, shard_size, max_shard_bytes)
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


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata: the same inputs give byte-identical shards
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(plan: ShardPlan, src_root: str, storage: Storage, options: ImageOptions, fingerprint: str,
                staging_dir: str | None = None, on_sample: Callable[[int], None] | None = None) -> ShardResult:
    """Write one shard, publish it atomically, then record it in ``_progress/``.

    ``on_sample(nbytes)`` is called after each sample, for progress reporting. A sample whose
    bytes fail to decode (only possible for files accepted on their structure) is left out and
    listed in the result's rejects. The shard is built in ``staging_dir`` (default: beside its
    final place when the storage is local, else the system temp directory).
    """
    staging = storage.staging_dir() or staging_dir
    fd, tmp_name = tempfile.mkstemp(prefix=f".{plan.name}.partial-", dir=staging)
    tmp = Path(tmp_name)
    rejects: list[dict] = []
    written = 0
    try:
        with os.fdopen(fd, "wb") as raw:
            sink = _HashingWriter(raw)
            with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for sample in plan.samples:
                    nbytes = 0
                    try:
                        data = Path(src_root, sample.relpath).read_bytes()
                        nbytes = len(data)
                        jpeg, width, height = prepare_image(data, sample.probe(), options)
                    except (RejectedImage, OSError) as e:
                        reason = str(e) if isinstance(e, RejectedImage) else f"unreadable: {e.strerror or e}"
                        rejects.append(Reject(sample.relpath, reason).to_json())
                    else:
                        meta = {"class_id": sample.class_id, "class_index": sample.class_index,
                                "source": sample.relpath, "width": width, "height": height}
                        _add_member(tar, f"{sample.key}.jpg", jpeg)
                        _add_member(tar, f"{sample.key}.cls", str(sample.class_index).encode())
                        _add_member(tar, f"{sample.key}.json", json.dumps(meta, sort_keys=True).encode())
                        written += 1
                    if on_sample is not None:
                        on_sample(nbytes)
            raw.flush()
            os.fsync(raw.fileno())
        result = ShardResult(plan.name, plan.split, plan.index, written, sink.count,
                             sink.digest.hexdigest(), fingerprint, rejects)
        storage.put_file(plan.name, tmp)
        # The record is written after the shard is in place: a record always means a finished shard.
        storage.write_bytes(progress_name(plan.name), json.dumps(result.to_json(), sort_keys=True).encode())
        return result
    finally:
        tmp.unlink(missing_ok=True)


def planned_sample(key: str, relpath: str, class_index: int, class_id: str, size: int, probe: Probe,
                   options: ImageOptions) -> PlannedSample:
    assert probe.action in (KEEP, CONVERT, RESIZE), probe.action
    return PlannedSample(key, relpath, class_index, class_id, probe.action, probe.width, probe.height,
                         estimate_bytes(size, probe, options))
