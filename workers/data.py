"""Stream shards (local or ``s3://``) into uint8 batches, in the order ``sampling`` prescribes.

``TrainStream`` is an IterableDataset whose items are *chunks*: the samples one stream gives one
rank at one step. DataLoader workers own disjoint sets of streams, so each shard is read once per
epoch per rank that needs it. ``assemble_batches`` joins the chunks of a step, in stream order,
into the rank's batch. A sample that fails to decode is dropped from its chunk and counted; a
shard that cannot be read costs its samples, counted the same way, never a crash.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import tar_file_iterator

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


def _group_samples(url: str) -> Iterator[dict]:
    """Samples of one shard in file order: {'__key__', 'jpg', 'cls'}; raises on a broken stream."""
    s3io.register()
    with gopen(url, "rb") as stream:
        current: dict | None = None
        for member in tar_file_iterator(stream):
            key, _, ext = posixpath.basename(member["fname"]).partition(".")
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[ext] = member["data"]
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


class TrainStream(IterableDataset):
    """Chunks of decoded uint8 samples for one rank, from ``start_step`` to the epoch's end."""

    def __init__(self, split: SplitInfo, plan: EpochPlan, slices: list[RankSlice], start_step: int, seed: int,
                 image_size: int, shuffle_block: int, lighting_std: float = 0.0, min_crop_area: float = 0.08):
        self.split, self.plan, self.slices = split, plan, slices
        self.start_step, self.seed = start_step, seed
        self.image_size, self.shuffle_block, self.lighting_std = image_size, shuffle_block, lighting_std
        self.min_crop_area = min_crop_area

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.slices[worker::workers]
        chunk = self.plan.chunk
        cursors = {sl.stream: _StreamCursor(self.split, self.plan, sl.stream, self.shuffle_block, self.seed,
                                            self.start_step * chunk + sl.lo) for sl in mine}
        for step in range(self.start_step, self.plan.steps):
            for sl in mine:
                yield self._chunk(cursors[sl.stream], step, sl)

    def _chunk(self, cursor: _StreamCursor, step: int, sl: RankSlice) -> dict:
        images, labels, keys, alphas, skipped = [], [], [], [], 0
        for position in range(step * self.plan.chunk + sl.lo, step * self.plan.chunk + sl.hi):
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
            images.append(image)
            labels.append(label)
            keys.append(sample["__key__"])
            alphas.append(lighting_alphas(rng, self.lighting_std))
        return {"step": step, "stream": sl.stream, "keys": keys, "skipped": skipped,
                "images": _stack(images, self.image_size), "labels": torch.tensor(labels, dtype=torch.long),
                "alphas": torch.from_numpy(np.stack(alphas)) if alphas else torch.zeros((0, 3))}


def _stack(images: list[np.ndarray], size: int) -> torch.Tensor:
    if not images:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


@dataclass
class Batch:
    step: int
    images: torch.Tensor  # uint8 N,3,H,W
    labels: torch.Tensor
    alphas: torch.Tensor
    keys: list[str]
    skipped: int


def assemble_batches(chunks, slices: list[RankSlice], start_step: int, steps: int) -> Iterator[Batch]:
    """Join the chunks of each step, in stream order, as they arrive from the DataLoader workers."""
    order = [sl.stream for sl in slices]
    pending: dict[int, dict[int, dict]] = {}
    step = start_step
    for chunk in chunks:
        pending.setdefault(chunk["step"], {})[chunk["stream"]] = chunk
        while step < steps and len(pending.get(step, {})) == len(order):
            parts = [pending[step][s] for s in order]
            del pending[step]
            yield Batch(step, torch.cat([p["images"] for p in parts]), torch.cat([p["labels"] for p in parts]),
                        torch.cat([p["alphas"] for p in parts]), [k for p in parts for k in p["keys"]],
                        sum(p["skipped"] for p in parts))
            step += 1
    assert step == steps, f"loader ended at step {step} of {steps}"


def train_batches(split: SplitInfo, plan: EpochPlan, world_size: int, rank: int, start_step: int, seed: int,
                  image_size: int, shuffle_block: int, num_workers: int, lighting_std: float = 0.0,
                  min_crop_area: float = 0.08, prefetch: int = 2) -> Iterator[Batch]:
    """The rank's batches of one epoch from ``start_step``; same count on every rank."""
    slices = rank_slices(plan, world_size, rank)
    dataset = TrainStream(split, plan, slices, start_step, seed, image_size, shuffle_block, lighting_std,
                          min_crop_area)
    workers = min(num_workers, len(slices))
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False,
                        prefetch_factor=prefetch if workers else None, multiprocessing_context=_mp() if workers else None,
                        worker_init_fn=_WorkerEnv() if workers else None)
    return assemble_batches(loader, slices, start_step, plan.steps)


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
