"""Stream shards (local or ``s3://``) into uint8 batches, in the order ``sampling`` prescribes.

Training: ``train_batches`` decodes with threads straight into each step's batch tensor (see
``ThreadedTrainLoader``). Evaluation: ``eval_batches``, a DataLoader over the rank's contiguous
share of the split. Shards are read with our boto3 opener registered in WebDataset's ``gopen``
(so ``s3://`` URLs stream and resume) and a minimal tar reader. A sample that fails to decode is
dropped from its batch and counted; a shard that cannot be read costs its samples, counted the
same way, never a crash.
"""

from __future__ import annotations

import json
import logging
import posixpath
import threading
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen

from data_prep.storage import apply_storage_env, storage_env

from . import s3io
from .sampling import EpochPlan, RankSlice, Segment, rank_slices, shuffled_position
from .transforms import CorruptSample, eval_image, lighting_alphas, train_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitInfo:
    """A split of a sharded dataset, as its manifest describes it."""

    urls: tuple[str, ...]
    sizes: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...] = field(default=(), compare=False)

    @property
    def samples(self) -> int:
        return sum(self.sizes)


def load_manifest(dataset: str) -> dict:
    s3io.register()
    url = posixpath.join(dataset.rstrip("/"), "manifest.json") if dataset.startswith("s3://") else \
        f"{dataset.rstrip('/')}/manifest.json"
    try:
        return json.loads(s3io.read_bytes(url))
    except FileNotFoundError:
        raise ValueError(f"data.path: no manifest.json at {dataset}; shard the dataset first with 'alexray shard'") from None


def split_info(dataset: str, manifest: dict, split: str) -> SplitInfo:
    if split not in manifest["splits"]:
        raise ValueError(f"data: split {split!r} is not in {dataset} (it has {', '.join(manifest['splits'])})")
    shards = manifest["splits"][split]["shards"]
    base = dataset.rstrip("/")
    return SplitInfo(tuple(f"{base}/{s['name']}" for s in shards), tuple(s["samples"] for s in shards),
                     len(manifest["classes"]), tuple(c["name"] for c in manifest["classes"]))


def _octal(field: bytes) -> int:
    return int(field.rstrip(b"\0 ").decode("ascii") or "0", 8)


def iter_tar(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in a tar stream.

    Reads ustar headers directly: Python's tarfile spends more time on a header than the loader
    spends on the member. Handles the long-name extensions other tar writers emit (pax ``path``
    records, GNU ``././@LongLink``) so shards made by other tools work too.
    """
    long_name: str | None = None
    while True:
        header = stream.read(512)
        if len(header) < 512 or header == b"\0" * 512:
            return
        size = _octal(header[124:136])
        kind = header[156:157]
        data = stream.read(size)
        if len(data) < size:
            raise EOFError(f"tar member truncated: {len(data)} of {size} bytes")
        stream.read(-size % 512)
        if kind in (b"x", b"L"):  # long name of the next member
            if kind == b"L":
                long_name = data.rstrip(b"\0").decode("utf-8")
            else:
                for record in data.decode("utf-8").splitlines():
                    key, _, value = record.partition(" ")[2].partition("=")
                    if key == "path":
                        long_name = value
            continue
        if kind not in (b"0", b"\0"):
            long_name = None
            continue  # directories, links, global headers
        name = long_name or header[:100].rstrip(b"\0").decode("utf-8")
        prefix = header[345:500].rstrip(b"\0")
        if prefix and not long_name and header[257:262] == b"ustar":
            name = f"{prefix.decode('utf-8')}/{name}"
        long_name = None
        yield name, data


def _group_samples(url: str) -> Iterator[dict]:
    """Samples of one shard in file order: {'__key__', 'jpg', 'cls', ...}; raises on a broken stream."""
    s3io.register()
    with gopen(url, "rb") as stream:
        current: dict | None = None
        for name, data in iter_tar(stream):
            key, _, ext = posixpath.basename(name).partition(".")
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[ext] = data
        if current is not None:
            yield current


def read_segments(urls: tuple[str, ...], segments: tuple[Segment, ...]) -> Iterator[dict | None]:
    """Every sample of the segments, in order; ``None`` stands for a sample that could not be read."""
    for seg in segments:
        wanted = seg.stop - seg.start
        produced = 0
        try:
            for index, sample in enumerate(_group_samples(urls[seg.shard])):
                if index < seg.start:
                    continue
                if produced == wanted:
                    break
                yield sample
                produced += 1
        except Exception as e:  # noqa: BLE001 - a broken shard must not kill the worker
            log.warning("shard %s unreadable after sample %d: %s; its remaining samples are skipped",
                        urls[seg.shard], seg.start + produced, e)
        if produced < wanted:
            log.warning("shard %s: %d samples missing", urls[seg.shard], wanted - produced)
        for _ in range(wanted - produced):
            yield None


class _StreamCursor:
    """Reads one stream in read order and serves it in training (block-shuffled) order.

    Only one block is held in memory; requested positions must not go back to an earlier block.
    """

    def __init__(self, split: SplitInfo, plan: EpochPlan, stream: int, shuffle_block: int, seed: int, start: int):
        self.plan, self.stream, self.block, self.seed = plan, stream, shuffle_block, seed
        self.next_start = start - start % shuffle_block
        self.reader = read_segments(split.urls, self._segments_from(self.next_start))
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

    def _claim(self, step: int) -> _StepBuffer | None:
        with self.cond:
            self.cond.wait_for(lambda: self.closed or step < self.next_step + self.prefetch)
            if self.closed:
                return None
            if step not in self.buffers:
                self.buffers[step] = _StepBuffer(step, self.offsets[-1], self.image_size, len(self.slices))
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
                if sample is None or "jpg" not in sample or "cls" not in sample:
                    raise CorruptSample("missing")
                image = train_image(sample["jpg"], self.image_size, rng, self.min_crop_area)
                label = int(sample["cls"])
            except (CorruptSample, ValueError):
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


def train_batches(split: SplitInfo, plan: EpochPlan, world_size: int, rank: int, start_step: int, seed: int,
                  image_size: int, shuffle_block: int, num_workers: int, lighting_std: float = 0.0,
                  min_crop_area: float = 0.08, prefetch: int = 2) -> Iterator[Batch]:
    """The rank's batches of one epoch from ``start_step``; same count on every rank.

    ``num_workers`` decoding threads (at least one).
    """
    slices = rank_slices(plan, world_size, rank)
    return iter(ThreadedTrainLoader(split, plan, slices, start_step, seed, image_size, shuffle_block, num_workers,
                                    lighting_std, min_crop_area, prefetch))


def _mp():
    import multiprocessing as mp

    # forkserver: workers start from a clean process, not a fork of one holding threads (Ray, gloo).
    return mp.get_context("forkserver")


class _WorkerEnv:
    """worker_init_fn: give DataLoader workers this process's storage settings (see apply_storage_env)."""

    def __init__(self):
        self.env = storage_env()

    def __call__(self, worker_id: int) -> None:
        apply_storage_env(self.env)
        s3io.reset_client()


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


class EvalStream(IterableDataset):
    def __init__(self, split: SplitInfo, segments: tuple[Segment, ...], image_size: int, resize: int,
                 batch_size: int, ten_crop: bool = False):
        self.split, self.segments = split, segments
        self.image_size, self.resize, self.batch_size, self.ten_crop = image_size, resize, batch_size, ten_crop

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        images, labels, skipped = [], [], 0
        for sample in read_segments(self.split.urls, self.segments[worker::workers]):
            try:
                if sample is None or "jpg" not in sample:
                    raise CorruptSample("missing")
                images.append(eval_image(sample["jpg"], self.image_size, self.resize, self.ten_crop))
                labels.append(int(sample["cls"]))
            except (CorruptSample, ValueError):
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


def eval_batches(split: SplitInfo, world_size: int, rank: int, image_size: int, resize: int, batch_size: int,
                 num_workers: int, ten_crop: bool = False):
    segments = eval_segments(split.sizes, world_size, rank)
    workers = min(num_workers, len(segments))
    dataset = EvalStream(split, segments, image_size, resize, batch_size, ten_crop)
    return DataLoader(dataset, batch_size=None, num_workers=workers,
                      multiprocessing_context=_mp() if workers else None, worker_init_fn=_WorkerEnv() if workers else None)
