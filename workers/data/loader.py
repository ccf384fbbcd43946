"""Stream shards (local or ``s3://``) into uint8 batches, in the order ``sampling`` prescribes.

Training: ``train_batches`` decodes with threads straight into each step's batch tensor (see
``ThreadedTrainLoader``). Evaluation: ``eval_batches`` decodes the rank's contiguous share of the
split with threads too, each reading its own shard segments into whole batches. Shards are read
with our boto3 opener registered in WebDataset's ``gopen`` (so ``s3://`` URLs stream and resume)
and a minimal tar reader.

Two kinds of fault, told apart: a shard that cannot be read at all (refused credentials, a
deleted object, bucket or file, a sha256 that does not match the manifest) raises a one-line
``StorageError`` naming it, since every later read would fail the same way and the run would
train on less and less; corrupt *content* (a truncated or garbled tar, an undecodable image, a
class that is missing, not an integer or out of range) costs only those samples, which are
dropped from their batch and counted (the training loop bounds how many).
"""

from __future__ import annotations

import logging
import posixpath
import queue
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from webdataset.gopen import gopen

from alexray_core.errors import EXIT_FAILED
from alexray_core.spec import SpecError
from alexray_core.storage import StorageError
from alexray_core.storage import s3reader as s3io
from alexray_core.storage.hashing import Sha256Reader
from data_prep.errors import ShardError
from data_prep.manifest import MANIFEST_NAME, parse_manifest
from workers.data.s3open import use_s3_reader
from workers.data.sampling import (
    EpochPlan,
    RankSlice,
    Segment,
    rank_slices,
    shuffled_position,
)
from workers.data.transforms import (
    CorruptSample,
    eval_image,
    lighting_alphas,
    train_image,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitInfo:
    """A split of a sharded dataset, as its manifest describes it."""

    urls: tuple[str, ...]
    sizes: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...] = field(default=(), compare=False)
    digests: tuple[str, ...] = field(default=(), compare=False)  # sha256 per shard, to verify; () skips it

    @property
    def samples(self) -> int:
        return sum(self.sizes)


def load_manifest(dataset: str) -> dict:
    use_s3_reader()
    url = posixpath.join(dataset.rstrip("/"), MANIFEST_NAME) if dataset.startswith("s3://") else \
        f"{dataset.rstrip('/')}/{MANIFEST_NAME}"
    try:
        data = s3io.read_bytes(url)
    except FileNotFoundError:
        raise SpecError(f"data.path: no {MANIFEST_NAME} at {dataset}; shard the dataset first with 'alexray shard'") from None
    return parse_manifest(data, url)  # its format and version checked


def split_info(dataset: str, manifest: dict, split: str, verify: bool = False) -> SplitInfo:
    """The split's shards; with ``verify`` each is checked against its manifest sha256 as it is read."""
    if split not in manifest["splits"]:
        raise SpecError(f"data: split {split!r} is not in {dataset} (it has {', '.join(manifest['splits'])})")
    shards = manifest["splits"][split]["shards"]
    base = dataset.rstrip("/")
    digests: tuple[str, ...] = ()
    if verify:
        missing = next((s["name"] for s in shards if not s.get("sha256")), None)
        if missing:
            raise SpecError(f"data.verify_shards: the manifest of {dataset} has no sha256 for {missing}; "
                            "re-shard with 'alexray shard' or set data.verify_shards: false")
        digests = tuple(s["sha256"] for s in shards)
    return SplitInfo(tuple(f"{base}/{s['name']}" for s in shards), tuple(s["samples"] for s in shards),
                     len(manifest["classes"]), tuple(c["name"] for c in manifest["classes"]), digests)


class CorruptShard(Exception):
    """A shard's bytes are not a readable tar stream from some point on (truncated or garbled)."""


_IMAGE_KEYS = ("jpg", "jpeg", "png")


def sample_parts(sample: dict | None, num_classes: int) -> tuple[bytes, int]:
    """A sample's image bytes and class index; CorruptSample when either is missing or invalid."""
    if sample is None:
        raise CorruptSample("lost with the rest of a corrupt shard")
    image = next((sample[k] for k in _IMAGE_KEYS if k in sample), None)
    if image is None:
        raise CorruptSample(f"no image (members: {', '.join(k for k in sample if not k.startswith('__'))})")
    if "cls" not in sample:
        raise CorruptSample("no .cls member")
    try:
        label = int(sample["cls"])
    except ValueError:
        raise CorruptSample(f"class {sample['cls'][:20]!r} is not an integer") from None
    if not 0 <= label < num_classes:  # cross_entropy would fail the step, or score a class that is not there
        raise CorruptSample(f"class {label} is outside [0, {num_classes})")
    return image, label


def too_many_skipped(what: str, fraction: float, dataset: str) -> ShardError:
    """The end of a run that would otherwise go on training (or scoring) on a shrinking dataset."""
    return ShardError(f"data.max_skipped_fraction: {what} were corrupt or unreadable, more than {fraction:g}; the "
                      f"workers' log names each ('skipped sample'): repair or re-shard {dataset}, or raise "
                      "data.max_skipped_fraction", exit_code=EXIT_FAILED)


def log_skipped(sample: dict | None, reason: Exception) -> None:
    """Name a corrupt sample in the log as it is dropped (``'skipped sample'``: what the errors point to)."""
    if sample is not None:  # a lost sample was reported with its shard
        log.warning("skipped sample %s of %s: %s", sample.get("__key__"), sample.get("__url__"), reason)


def _octal(field: bytes) -> int:
    return int(field.rstrip(b"\0 ").decode("ascii") or "0", 8)


def _check_header(header: bytes) -> None:
    try:
        stored = _octal(header[148:156])
    except ValueError:
        raise CorruptShard("tar header without a checksum") from None
    rest = header[:148] + header[156:]
    unsigned = sum(rest) + 8 * 32  # the checksum field counts as spaces
    if stored != unsigned and stored != unsigned - 256 * sum(b > 127 for b in rest):  # old writers: signed bytes
        raise CorruptShard("tar header checksum mismatch")


def iter_tar(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in a tar stream; CorruptShard where the stream stops
    being a tar (cut short, garbled header).

    Reads ustar headers directly: Python's tarfile spends more time on a header than the loader
    spends on the member. Handles the long-name extensions other tar writers emit (pax ``path``
    records, GNU ``././@LongLink``, the POSIX ustar prefix) so shards made by other tools work too.
    """
    long_name: str | None = None
    while True:
        header = stream.read(512)
        if header == b"\0" * 512 or not header:
            return
        if len(header) < 512:
            raise CorruptShard(f"tar header cut short at {len(header)} of 512 bytes")
        _check_header(header)
        try:
            size = _octal(header[124:136])
        except ValueError:
            raise CorruptShard("tar header with a bad size field") from None
        kind = header[156:157]
        data = stream.read(size)
        if len(data) < size:
            raise CorruptShard(f"tar member cut short: {len(data)} of {size} bytes")
        stream.read(-size % 512)
        try:
            if kind in (b"x", b"L"):  # long name of the next member
                if kind == b"L":
                    long_name = data.rstrip(b"\0").decode("utf-8")
                else:
                    long_name = _pax_path(data) or long_name
                continue
            if kind not in (b"0", b"\0"):
                long_name = None
                continue  # directories, links, global headers
            name = long_name or header[:100].rstrip(b"\0").decode("utf-8")
            prefix = header[345:500].rstrip(b"\0")
            if prefix and not long_name and header[257:263] == b"ustar\0":  # POSIX only: GNU keeps times there
                name = f"{prefix.decode('utf-8')}/{name}"
        except UnicodeDecodeError:
            raise CorruptShard("tar member name is not UTF-8") from None
        long_name = None
        yield name, data


def _pax_path(data: bytes) -> str | None:
    """The ``path`` of a pax extended header. Records are ``LEN KEY=VALUE\n`` with LEN counting the
    whole record, so a value may hold newlines: split by length, not by line."""
    path, i = None, 0
    while i < len(data) and data[i:i + 1] != b"\0":
        length_text, space, _ = data[i:i + 20].partition(b" ")
        if not space or not length_text.isdigit() or int(length_text) <= len(length_text) + 1:
            raise CorruptShard("tar pax header with a bad record length")
        record = data[i + len(length_text) + 1:i + int(length_text)]
        key, _, value = record.rstrip(b"\n").partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        i += int(length_text)
    return path


def _sample_key(name: str) -> tuple[str, str]:
    """(key, extension) as webdataset splits a member name: the key keeps its folder, so samples
    from different folders with the same file name stay apart; the extension starts at the first
    dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _group_samples(stream, url: str) -> Iterator[dict]:
    """Samples of one shard in file order: {'__key__', '__url__', 'jpg', 'cls', ...}."""
    current: dict | None = None
    try:
        for name, data in iter_tar(stream):
            key, ext = _sample_key(name)
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            current[ext] = data
    except CorruptShard:
        if current is not None:  # the members read before the break are whole
            yield current
        raise
    if current is not None:
        yield current


def _unreadable(url: str, error: OSError) -> StorageError:
    """A shard that cannot be opened or read: one line naming it and the fix."""
    if isinstance(error, FileNotFoundError):
        return StorageError(f"{url} no longer exists: the dataset changed during the run; restore it "
                            f"(alexray shard verify checks a dataset), then {s3io.RUN_AGAIN}")
    if isinstance(error, PermissionError):
        return StorageError(f"cannot read {url}: permission denied; make it readable, then {s3io.RUN_AGAIN}")
    return StorageError(f"cannot read {url}: {error.strerror or error}; check the disk or mount, then "
                        f"{s3io.RUN_AGAIN}")


def _segment_samples(url: str, seg: Segment, digest: str | None) -> Iterator[dict]:
    """Samples ``[seg.start, seg.stop)`` of a shard. With ``digest`` the whole shard is read and
    hashed before any sample is handed out, so no sample of a changed shard is ever trained on
    (this holds one segment, at most a shard, in memory)."""
    use_s3_reader()
    with gopen(url, "rb") as raw:
        if digest is None:
            for index, sample in enumerate(_group_samples(raw, url)):
                if index >= seg.start:
                    yield sample
                if index + 1 >= seg.stop:
                    return
            return
        stream, kept, corrupt = Sha256Reader(raw), [], None
        try:
            for index, sample in enumerate(_group_samples(stream, url)):
                if seg.start <= index < seg.stop:
                    kept.append(sample)
        except CorruptShard as e:
            corrupt = e
        found = stream.finish()
    if found != digest:
        raise StorageError(f"{url} does not match the sha256 in its manifest ({found[:12]}..., expected "
                           f"{digest[:12]}...): it changed or was damaged after sharding; restore it (alexray "
                           f"shard verify checks a dataset), then {s3io.RUN_AGAIN}")
    yield from kept
    if corrupt is not None:
        raise corrupt


def read_segments(urls: tuple[str, ...], segments: tuple[Segment, ...],
                  digests: tuple[str, ...] = ()) -> Iterator[dict | None]:
    """Every sample of the segments, in order; ``None`` stands for a sample lost to corrupt content.

    Raises ``StorageError`` for a shard that cannot be read (see the module's docstring).
    """
    for seg in segments:
        url, wanted, produced = urls[seg.shard], seg.stop - seg.start, 0
        if wanted <= 0:
            continue
        try:
            for sample in _segment_samples(url, seg, digests[seg.shard] if digests else None):
                yield sample
                produced += 1
        except CorruptShard as e:
            log.warning("shard %s is corrupt after sample %d (%s): its %d remaining samples are skipped",
                        url, seg.start + produced, e, wanted - produced)
        except OSError as e:  # local files; S3 errors arrive as StorageError already
            raise _unreadable(url, e) from e
        else:
            if produced < wanted:
                log.warning("shard %s ends %d samples short of its manifest: they are skipped", url,
                            wanted - produced)
        for _ in range(wanted - produced):
            yield None


class _StreamCursor:
    """Reads one stream in read order and serves it in training (block-shuffled) order.

    Only one block is held in memory; requested positions must not go back to an earlier block.
    """

    def __init__(self, split: SplitInfo, plan: EpochPlan, stream: int, shuffle_block: int, seed: int, start: int):
        self.plan, self.stream, self.block, self.seed = plan, stream, shuffle_block, seed
        self.next_start = start - start % shuffle_block
        self.reader = read_segments(split.urls, self._segments_from(self.next_start), split.digests)
        self.loaded_start: int | None = None
        self.buffer: list[dict | None] = []

    def _segments_from(self, position: int) -> tuple[Segment, ...]:
        out, skip = [], position
        for seg in self.plan.streams[self.stream]:
            n = seg.stop - seg.start
            if skip >= n:
                skip -= n
                continue
            out.append(Segment(seg.shard, seg.start + skip, seg.stop))
            skip = 0
        return tuple(out)

    def get(self, position: int) -> dict | None:
        """The sample shown at training-order ``position``."""
        block_start = position - position % self.block
        assert self.loaded_start is None or block_start >= self.loaded_start, "positions went backwards"
        while self.loaded_start != block_start:
            size = min(self.block, self.plan.stream_length - self.next_start)
            self.buffer = [next(self.reader) for _ in range(size)]
            self.loaded_start, self.next_start = self.next_start, self.next_start + size
        read_pos = shuffled_position(position, self.plan.stream_length, self.block, self.seed, self.plan.epoch,
                                     self.stream)
        return self.buffer[read_pos - block_start]


@dataclass
class Batch:
    step: int
    images: torch.Tensor  # uint8 N,3,H,W
    labels: torch.Tensor
    alphas: torch.Tensor  # PCA lighting draws, N,3
    keys: list[str]
    skipped: int  # samples of this step that could not be read or decoded


class _StepBuffer:
    """One step's batch, filled in place by the decoding threads."""

    def __init__(self, step: int, size: int, image_size: int, parts: int):
        self.step = step
        self.images = torch.empty((size, 3, image_size, image_size), dtype=torch.uint8)
        self.labels = np.zeros(size, dtype=np.int64)
        self.alphas = np.zeros((size, 3), dtype=np.float32)
        self.keys: list[str | None] = [None] * size
        self.remaining, self.skipped = parts, 0

    def batch(self) -> Batch:
        valid = [i for i, key in enumerate(self.keys) if key is not None]
        if len(valid) == len(self.keys):
            return Batch(self.step, self.images, torch.from_numpy(self.labels), torch.from_numpy(self.alphas),
                         list(self.keys), self.skipped)
        index = torch.tensor(valid, dtype=torch.long)  # rare: some samples were corrupt
        return Batch(self.step, self.images.index_select(0, index), torch.from_numpy(self.labels[valid]),
                     torch.from_numpy(self.alphas[valid]), [self.keys[i] for i in valid], self.skipped)


class ThreadedTrainLoader:
    """The rank's batches of one epoch, decoded by threads straight into each batch tensor.

    Threads, not processes: OpenCV decodes and resizes with the GIL released, so threads scale
    over the cores, and a batch never crosses a process boundary (which costs shared-memory
    segments and page faults on every chunk). Thread ``k`` owns streams ``k, k+T, ...``, so each
    stream is read by exactly one thread. Up to ``prefetch`` steps are decoded ahead.
    """

    def __init__(self, split: SplitInfo, plan: EpochPlan, slices: list[RankSlice], start_step: int, seed: int,
                 image_size: int, shuffle_block: int, threads: int, lighting_std: float = 0.0,
                 min_crop_area: float = 0.08, prefetch: int = 2):
        self.split, self.plan, self.slices, self.start_step, self.seed = split, plan, slices, start_step, seed
        self.image_size, self.shuffle_block, self.lighting_std = image_size, shuffle_block, lighting_std
        self.min_crop_area, self.prefetch = min_crop_area, max(1, prefetch)
        self.offsets = np.cumsum([0] + [sl.hi - sl.lo for sl in slices]).tolist()
        self.threads = max(1, min(threads, len(slices)))
        self.cond = threading.Condition()
        self.buffers: dict[int, _StepBuffer] = {}
        self.next_step = start_step
        self.closed = False
        self.error: BaseException | None = None

    def _new_buffer(self, step: int) -> _StepBuffer:
        """The empty buffer of ``step`` that every thread fills its rows of (subclasses fill other kinds)."""
        return _StepBuffer(step, self.offsets[-1], self.image_size, len(self.slices))

    def _claim(self, step: int) -> _StepBuffer | None:
        with self.cond:
            self.cond.wait_for(lambda: self.closed or step < self.next_step + self.prefetch)
            if self.closed:
                return None
            if step not in self.buffers:
                self.buffers[step] = self._new_buffer(step)
            return self.buffers[step]

    def _work(self, owned: list[int]) -> None:
        try:
            chunk = self.plan.chunk
            cursors = {i: _StreamCursor(self.split, self.plan, self.slices[i].stream, self.shuffle_block, self.seed,
                                        self.start_step * chunk + self.slices[i].lo) for i in owned}
            for step in range(self.start_step, self.plan.steps):
                buffer = self._claim(step)
                if buffer is None:
                    return
                for i in owned:
                    skipped = self._fill(buffer, cursors[i], step, self.slices[i], self.offsets[i])
                    with self.cond:
                        buffer.skipped += skipped
                        buffer.remaining -= 1
                        self.cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def _fill(self, buffer: _StepBuffer, cursor: _StreamCursor, step: int, sl: RankSlice, offset: int) -> int:
        skipped = 0
        for j, position in enumerate(range(step * self.plan.chunk + sl.lo, step * self.plan.chunk + sl.hi)):
            sample = cursor.get(position)
            rng = np.random.default_rng((self.seed, self.plan.epoch, sl.stream, position))
            try:
                data, label = sample_parts(sample, self.split.num_classes)
                image = train_image(data, self.image_size, rng, self.min_crop_area)
            except (CorruptSample, ValueError) as e:
                log_skipped(sample, e)
                skipped += 1
                continue
            row = offset + j
            buffer.images[row].copy_(torch.from_numpy(image).permute(2, 0, 1))
            buffer.labels[row] = label
            buffer.alphas[row] = lighting_alphas(rng, self.lighting_std)
            buffer.keys[row] = sample["__key__"]
        return skipped

    def __iter__(self) -> Iterator[Batch]:
        workers = [threading.Thread(target=self._work, args=(list(range(k, len(self.slices), self.threads)),),
                                    name=f"decode-{k}", daemon=True) for k in range(self.threads)]
        for worker in workers:
            worker.start()
        try:
            for step in range(self.start_step, self.plan.steps):
                with self.cond:
                    self.cond.wait_for(lambda: self.error is not None or (
                        step in self.buffers and self.buffers[step].remaining == 0))
                    if self.error is not None:
                        raise self.error
                    buffer = self.buffers.pop(step)
                    self.next_step = step + 1
                    self.cond.notify_all()
                yield buffer.batch()
        finally:
            with self.cond:
                self.closed = True
                self.cond.notify_all()
            _join(workers)


def train_batches(split: SplitInfo, plan: EpochPlan, world_size: int, rank: int, start_step: int, seed: int,
                  image_size: int, shuffle_block: int, num_workers: int, lighting_std: float = 0.0,
                  min_crop_area: float = 0.08, prefetch: int = 2) -> Iterator[Batch]:
    """The rank's batches of one epoch from ``start_step``; same count on every rank.

    ``num_workers`` decoding threads (at least one).
    """
    slices = rank_slices(plan, world_size, rank)
    return iter(ThreadedTrainLoader(split, plan, slices, start_step, seed, image_size, shuffle_block, num_workers,
                                    lighting_std, min_crop_area, prefetch))


# ---- evaluation ----------------------------------------------------------------------------------

def eval_segments(sizes: tuple[int, ...], world_size: int, rank: int) -> tuple[Segment, ...]:
    """Rank's contiguous share of the split in manifest order: every sample on exactly one rank."""
    total = sum(sizes)
    lo, hi = total * rank // world_size, total * (rank + 1) // world_size
    out, offset = [], 0
    for shard, n in enumerate(sizes):
        a, b = max(lo, offset), min(hi, offset + n)
        if a < b:
            out.append(Segment(shard, a - offset, b - offset))
        offset += n
    return tuple(out)


class EvalStream:
    """Evaluation batches of a split's segments in read order: ``batch_size`` decoded samples each
    (the last one fewer), each with the count of samples dropped as corrupt since the one before."""

    def __init__(self, split: SplitInfo, image_size: int, resize: int, batch_size: int, ten_crop: bool = False):
        self.split = split
        self.image_size, self.resize, self.batch_size, self.ten_crop = image_size, resize, batch_size, ten_crop

    def batches(self, segments: tuple[Segment, ...]) -> Iterator[dict]:
        images, labels, skipped = [], [], 0
        for sample in read_segments(self.split.urls, segments, self.split.digests):
            try:
                data, label = sample_parts(sample, self.split.num_classes)
                images.append(eval_image(data, self.image_size, self.resize, self.ten_crop))
                labels.append(label)
            except (CorruptSample, ValueError) as e:
                log_skipped(sample, e)
                skipped += 1
            if len(images) == self.batch_size:
                yield self._batch(images, labels, skipped)
                images, labels, skipped = [], [], 0
        if images or skipped:
            yield self._batch(images, labels, skipped)

    def _batch(self, images, labels, skipped) -> dict:
        if images:
            array = torch.from_numpy(np.stack(images))
            array = array.permute(0, 1, 4, 2, 3) if self.ten_crop else array.permute(0, 3, 1, 2)
        else:
            shape = (0, 10, 3) if self.ten_crop else (0, 3)
            array = torch.zeros(shape + (self.image_size, self.image_size), dtype=torch.uint8)
        return {"images": array.contiguous(), "labels": torch.tensor(labels, dtype=torch.long), "skipped": skipped}


_DONE = object()  # a decoding thread's last item: its segments are all decoded
_PUT_WAIT_S = 0.1  # how soon a thread waiting on a full queue notices that the consumer has stopped
_JOIN_WAIT_S = 30.0  # how long an ending iteration waits for its decoding threads


def _join(threads: list[threading.Thread]) -> None:
    """Wait for stopped decoding threads to finish the sample in hand. A process that exits while
    one is inside OpenCV aborts in C++ (``terminate called without an active exception``) instead of
    returning its exit code; the bound keeps a read stuck on storage from holding the exit forever."""
    deadline = time.monotonic() + _JOIN_WAIT_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def _offer(out: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` once there is room; False, without putting it, once the consumer has stopped."""
    while not stop.is_set():
        try:
            out.put(item, timeout=_PUT_WAIT_S)
            return True
        except queue.Full:
            pass
    return False


def _decode_into(stream: EvalStream, segments: tuple[Segment, ...], out: queue.Queue,
                 stop: threading.Event) -> None:
    """A decoding thread: its segments' batches, then ``_DONE``, or the exception that ended it."""
    try:
        with closing(stream.batches(segments)) as batches:  # closes the shard being read when stopped early
            for batch in batches:
                if not _offer(out, batch, stop):
                    return
        _offer(out, _DONE, stop)
    except BaseException as e:  # noqa: BLE001 - the consumer raises it, as if it had decoded the batch itself
        _offer(out, e, stop)


def _threaded_batches(stream: EvalStream, segments: tuple[Segment, ...], threads: int,
                      prefetch: int = 2) -> Iterator[dict]:
    """``stream``'s batches decoded by ``threads`` threads, thread ``k`` reading ``segments[k::threads]``,
    each up to ``prefetch`` batches ahead of the consumer; in the order they are ready."""
    out: queue.Queue = queue.Queue(maxsize=prefetch * threads)
    stop = threading.Event()
    workers = [threading.Thread(target=_decode_into, args=(stream, segments[k::threads], out, stop),
                                name=f"eval-decode-{k}", daemon=True) for k in range(threads)]
    for worker in workers:
        worker.start()
    try:
        running = threads
        while running:
            item = out.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, BaseException):
                raise item  # the thread's own exception: its one-line message, its traceback
            else:
                yield item
    finally:
        stop.set()  # the consumer is done, failed or stopped early: the threads end at their next put
        _join(workers)


def eval_batches(split: SplitInfo, world_size: int, rank: int, image_size: int, resize: int, batch_size: int,
                 num_workers: int, ten_crop: bool = False) -> Iterator[dict]:
    """The rank's share of the split (``eval_segments``) as batch dicts: ``images`` (uint8, [B,3,H,W],
    or [B,10,3,H,W] with ``ten_crop``), ``labels`` and ``skipped``; every sample of the share in one.

    ``num_workers`` decoding threads in this process (0: decoded in the caller's thread). Threads,
    as for training: OpenCV decodes with the GIL released, and nothing is started per evaluation
    but the threads themselves, which matters on small splits evaluated every epoch.
    """
    segments = eval_segments(split.sizes, world_size, rank)
    stream = EvalStream(split, image_size, resize, batch_size, ten_crop)
    threads = min(num_workers, len(segments))
    if threads <= 0:
        return stream.batches(segments)
    return _threaded_batches(stream, segments, threads)
