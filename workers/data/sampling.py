"""Which sample goes to which rank at which step: pure functions of (manifest, seed, epoch, sizes).

The order of an epoch does not depend on the number of ranks, so a run can resume, or change
size, at any step without repeating or skipping a sample (the scheme of mosaicml/streaming):

1. Shards are shuffled with ``(seed, epoch)`` and their samples laid end to end.
2. That sequence is cut into ``num_streams`` equal *streams* (``streams`` is fixed by the spec,
   not by the cluster). The ``N mod num_streams`` samples left over are dropped.
3. Each stream is shuffled in blocks of ``shuffle_block`` samples with ``(seed, epoch, stream,
   block)``: a bounded, seeded shuffle buffer that needs no state to resume.
4. Step ``s`` of the epoch consumes positions ``[s*c, (s+1)*c)`` of every stream, where
   ``c = global_batch / num_streams``; the global batch is laid out stream-major, and rank ``r``
   of ``W`` takes positions ``[r*b, (r+1)*b)`` of it (``b = global_batch / W``). So a rank reads
   only its own streams (two ranks share a stream only when ``W`` does not divide
   ``num_streams``), every rank runs the same number of steps, and the data position is just
   ``(epoch, step)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from alexray_core.errors import AlexrayError


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` of shard ``shard`` (an index into the split's shard list)."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    num_streams: int
    stream_length: int  # samples per stream (before the per-step remainder is dropped)
    chunk: int  # samples each stream gives to every step
    steps: int  # steps every rank runs this epoch
    used: int  # samples consumed this epoch: steps * global_batch
    dropped: int  # samples of the split not used this epoch
    streams: tuple[tuple[Segment, ...], ...]  # per stream, the shard segments it reads, in order


@dataclass(frozen=True)
class RankSlice:
    """Rank's share of every step from one stream: chunk positions ``[lo, hi)``."""

    stream: int
    lo: int
    hi: int


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_shards))
    random.Random(f"alexray-shards:{seed}:{epoch}").shuffle(order)
    return order


def plan_epoch(shard_sizes: list[int], global_batch: int, num_streams: int, seed: int, epoch: int) -> EpochPlan:
    if global_batch % num_streams:
        raise ValueError(f"data.streams ({num_streams}) must divide the global batch ({global_batch})")
    total = sum(shard_sizes)
    length = total // num_streams
    chunk = global_batch // num_streams
    steps = length // chunk
    if steps == 0:
        raise AlexrayError(f"the split has {total} samples, fewer than one global batch of {global_batch} "
                            f"over {num_streams} streams: lower train.global_batch_size or data.streams")
    streams = []
    sequence = iter(_segments_in_order(shard_sizes, seed, epoch))
    pending: Segment | None = None
    for _ in range(num_streams):
        need, segments = length, []
        while need:
            seg = pending or next(sequence)
            take = min(need, seg.stop - seg.start)
            segments.append(Segment(seg.shard, seg.start, seg.start + take))
            pending = Segment(seg.shard, seg.start + take, seg.stop) if take < seg.stop - seg.start else None
            need -= take
        streams.append(tuple(segments))
    used = steps * global_batch
    return EpochPlan(epoch, num_streams, length, chunk, steps, used, total - used, tuple(streams))


def _segments_in_order(shard_sizes: list[int], seed: int, epoch: int):
    for shard in shard_order(len(shard_sizes), seed, epoch):
        if shard_sizes[shard]:
            yield Segment(shard, 0, shard_sizes[shard])


def rank_slices(plan: EpochPlan, world_size: int, rank: int) -> list[RankSlice]:
    """The parts of each step's global batch that ``rank`` trains on, stream by stream."""
    global_batch = plan.chunk * plan.num_streams
    if global_batch % world_size:
        raise ValueError(f"the global batch ({global_batch}) must be divisible by the number of workers ({world_size})")
    per_rank = global_batch // world_size
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    slices = []
    for stream in range(plan.num_streams):
        s_lo, s_hi = stream * plan.chunk, (stream + 1) * plan.chunk
        a, b = max(lo, s_lo), min(hi, s_hi)
        if a < b:
            slices.append(RankSlice(stream, a - s_lo, b - s_lo))
    return slices


@lru_cache(maxsize=64)
def block_permutation(seed: int, epoch: int, stream: int, block: int, size: int) -> tuple[int, ...]:
    order = list(range(size))
    random.Random(f"alexray-block:{seed}:{epoch}:{stream}:{block}").shuffle(order)
    return tuple(order)


def shuffled_position(position: int, stream_length: int, shuffle_block: int, seed: int, epoch: int,
                      stream: int) -> int:
    """The stream position (in read order) of the sample shown at ``position`` (in training order)."""
    block, offset = divmod(position, shuffle_block)
    start = block * shuffle_block
    size = min(shuffle_block, stream_length - start)
    return start + block_permutation(seed, epoch, stream, block, size)[offset]
