"""Plan shards from probed files and write one shard.

A plan is a pure function of (the probed files, the seed, the sizes): every process or Ray node
computes the same plan, any shard can be written by anyone, and a rerun writes byte-identical
shards. Tar members carry fixed metadata (mtime, owner, mode) for the same reason.

Each sample is three members: ``{key}.jpg`` (RGB JPEG), ``{key}.cls`` (class index, ASCII) and
``{key}.json`` (class id, source path, width, height).
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from dataclasses import asdict, dataclass, field
from json.encoder import encode_basestring_ascii as _json_str
from pathlib import Path
from typing import Callable, Iterator

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
# _HashingWriter and _tar_header: tests and benchmarks import them from here
from .tar_writer import TarShardWriter, UnreadableFile, _HashingWriter, _tar_header  # noqa: F401

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

    def rows(self) -> Iterator[tuple]:
        """(key, relpath, class_index, class_id, action, width, height, size) of each sample, what
        ``build_shard`` reads of a plan (``data_prep.planning.PackedShard`` yields the same); size
        is only a hint of the file's size (exact for a kept file, as listed)."""
        for s in self.samples:
            yield s.key, s.relpath, s.class_index, s.class_id, s.action, s.width, s.height, s.est_bytes


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

    ``plan``: a ``ShardPlan`` or anything with its ``name``, ``split``, ``index`` and ``rows()``.
    ``on_sample(nbytes)`` is called after each sample, for progress reporting. A sample whose
    bytes fail to decode (only possible for files accepted on their structure) is left out and
    listed in the result's rejects. The file is built beside its final place when the storage is
    local, else in ``staging_dir``, else in this machine's temp directory.
    """
    staging = storage.staging_dir() or staging_dir
    fd, tmp_name = tempfile.mkstemp(prefix=f".{plan.name}.partial-", dir=staging)
    tmp = Path(tmp_name)
    try:
        # Unbuffered: the tar writer hands over large blocks, which a buffer would only copy.
        with os.fdopen(fd, "wb", buffering=0) as raw:
            # mkstemp's 0600 would keep a local shard from every other user of a shared file system
            os.fchmod(raw.fileno(), 0o666 & ~current_umask())
            sink = _HashingWriter(raw)
            tar = TarShardWriter(sink)
            written, rejects = _add_samples(tar, plan, os.path.join(src_root, ""), options, on_sample)
            # No fsync here: publishing fsyncs a local shard before renaming it into place, on the
            # publisher's thread, so this worker goes on to its next shard; a staged upload needs none.
            tar.close()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ShardResult(plan.name, plan.split, plan.index, written, sink.count, sink.digest.hexdigest(),
                       fingerprint, rejects), tmp


def _add_samples(tar: TarShardWriter, plan, src_prefix: str, options: ImageOptions,
                 on_sample: Callable[[int], None] | None) -> tuple[int, list[dict]]:
    """Add every sample of ``plan``; returns how many were written and the rejects. A file that
    cannot be read or decoded is a reject; a failure to write the shard raises."""
    rejects: list[dict] = []
    written = 0
    by_class: dict[int, tuple[bytes, str]] = {}  # class index -> its .cls member, the start of its .json
    for key, relpath, class_index, class_id, action, width, height, size in plan.rows():
        cls, meta_head = by_class.get(class_index) or by_class.setdefault(class_index, (
            b"%d" % class_index, _SAMPLE_JSON_HEAD % (_json_str(class_id), class_index)))
        nbytes, reason = 0, None
        if action == KEEP:  # the original bytes, read straight into the shard
            meta = (meta_head + _SAMPLE_JSON_TAIL % (height, _json_str(relpath), width)).encode()
            try:
                nbytes = tar.add_sample(key, src_prefix + relpath, size, cls, meta)
            except UnreadableFile as e:
                reason = f"unreadable: {e.error.strerror or e.error}"
        else:
            try:
                data = read_file(src_prefix + relpath)
                nbytes = len(data)
                jpeg, width, height = prepare_image(data, Probe(action, width=width, height=height), options)
            except (RejectedImage, OSError) as e:
                reason = str(e) if isinstance(e, RejectedImage) else f"unreadable: {e.strerror or e}"
            else:
                tar.add(f"{key}.jpg", jpeg)
                meta = _meta_json(class_id, class_index, relpath, width, height)
                tar.add_pair(f"{key}.cls", cls, f"{key}.json", meta)
        if reason is None:
            written += 1
        else:
            rejects.append(Reject(relpath, reason).to_json())
        if on_sample is not None:
            on_sample(nbytes)
    return written, rejects


def sample_json(sample: PlannedSample, width: int, height: int) -> bytes:
    """A sample's ``.json`` member: exactly ``json.dumps(meta, sort_keys=True)``, formatted directly
    because json.dumps builds an encoder per call, which cost more than the rest of the member."""
    return _meta_json(sample.class_id, sample.class_index, sample.relpath, width, height)


def _meta_json(class_id: str, class_index: int, relpath: str, width: int, height: int) -> bytes:
    return (_SAMPLE_JSON % (_json_str(class_id), class_index, height, _json_str(relpath), width)).encode()


_SAMPLE_JSON = '{"class_id": %s, "class_index": %d, "height": %d, "source": %s, "width": %d}'  # keys sorted
# The same, cut where the part that is the same for a whole class ends.
_SAMPLE_JSON_HEAD, _SAMPLE_JSON_TAIL = _SAMPLE_JSON[:_SAMPLE_JSON.index("%d, \"source\"")], \
    _SAMPLE_JSON[_SAMPLE_JSON.index("%d, \"source\""):]


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
