"""What the probe found for each file of a split, and the split's shard plan, kept packed.

At a million files one Python object per file (a probe, a planned sample) costs more memory
than the rest of the command; here a file costs 9 bytes of probe results and 4 bytes of plan.
Probes come back from workers packed (``ProbeBatch``) and shards go out to them packed
(``PackedShard``): building, sending and reading one object per file cost more than probing or
copying a small file.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from operator import itemgetter
from typing import Iterator

from .images import CONVERT, KEEP, REJECT, RESIZE, ImageOptions, Probe
from .shards import (
    ShardPlan,
    estimate_bytes,
    planned_sample,
    samples_per_shard,
    shard_name,
    shuffle_order,
)
from .sources import FileTable, stem_keys

ACTIONS = (KEEP, CONVERT, RESIZE, REJECT)
_CODE = {action: code for code, action in enumerate(ACTIONS)}
_REJECT = _CODE[REJECT]


class ProbeBatch:
    """The probes of consecutive files, packed: what a probe task sends back."""

    def __init__(self):
        self.action = bytearray()
        self.width = array("I")
        self.height = array("I")
        self.rejects: list[tuple[int, str]] = []  # (position in the batch, reason)

    def add(self, action: str, reason: str, width: int, height: int) -> None:
        if action == REJECT:
            self.rejects.append((len(self.action), reason))
        self.action.append(_CODE[action])
        self.width.append(width)
        self.height.append(height)


class SplitProbes:
    """The probe of every file of one split: action, width and height by file index."""

    def __init__(self, count: int):
        self.action = bytearray(count)
        self.width = array("I", bytes(4 * count))
        self.height = array("I", bytes(4 * count))
        self.rejects: list[tuple[int, str]] = []  # (file index, reason)

    def record(self, start: int, probes: list[Probe]) -> None:
        """Store the probes of files ``start``, ``start + 1``, ..."""
        for i, probe in enumerate(probes, start):
            self.action[i] = _CODE[probe.action]
            self.width[i], self.height[i] = probe.width, probe.height
            if probe.action == REJECT:
                self.rejects.append((i, probe.reason))

    def record_batch(self, start: int, batch: ProbeBatch) -> None:
        """Store a ``ProbeBatch`` of files ``start``, ``start + 1``, ..."""
        end = start + len(batch.action)
        self.action[start:end] = batch.action
        self.width[start:end] = batch.width
        self.height[start:end] = batch.height
        self.rejects.extend((start + i, reason) for i, reason in batch.rejects)

    def accepted(self, i: int) -> bool:
        return self.action[i] != _REJECT

    def probe(self, i: int) -> Probe:
        return Probe(ACTIONS[self.action[i]], width=self.width[i], height=self.height[i])


class SplitPlan:
    """A split's accepted files in shard order; the same plan as ``shards.plan_split`` (which
    documents it), with each shard's ``ShardPlan`` built on demand."""

    def __init__(self, split: str, table: FileTable, probes: SplitProbes, class_ids: list[str],
                 options: ImageOptions, seed: int, shard_size: int, max_shard_bytes: int | None):
        self.split, self.table, self.probes = split, table, probes
        self.class_ids, self.options = class_ids, options
        # The table is in path order, so its accepted files are already sorted as plan_split sorts.
        self.order = array("I", (i for i in range(len(table)) if probes.accepted(i)))
        shuffle_order(split, self.order, seed)
        est_bytes = sum(self._estimate(i) for i in self.order) if max_shard_bytes else 0
        self.per_shard = samples_per_shard(est_bytes, len(self.order), shard_size, max_shard_bytes)

    def __len__(self) -> int:
        return -(-len(self.order) // self.per_shard)

    def name(self, index: int) -> str:
        return shard_name(self.split, index)

    def names(self) -> list[str]:
        return [self.name(i) for i in range(len(self))]

    def samples_in(self, index: int) -> int:
        return min(self.per_shard, len(self.order) - index * self.per_shard)

    def shard(self, index: int) -> ShardPlan:
        start = index * self.per_shard
        return ShardPlan(self.split, index, tuple(self._sample(i) for i in self.order[start:start + self.per_shard]))

    def packed(self, index: int) -> "PackedShard":
        """``shard(index)`` as columns, for a worker."""
        table, probes = self.table, self.probes
        files = self.order[index * self.per_shard:(index + 1) * self.per_shard]
        pick = itemgetter(*files) if len(files) > 1 else lambda column: (column[files[0]],)  # gathered in C
        clashes = table.key_clashes
        keys = {n: clashes[i] for n, i in enumerate(files) if i in clashes} if clashes else {}
        return PackedShard(self.split, index, table.joined_relpaths(files), array("I", pick(table.class_index)),
                           self.class_ids, bytes(pick(probes.action)), array("I", pick(probes.width)),
                           array("I", pick(probes.height)), array("Q", pick(table.sizes)), keys)

    def _estimate(self, i: int) -> int:
        return estimate_bytes(self.table.sizes[i], self.probes.probe(i), self.options)

    def _sample(self, i: int):
        table = self.table
        class_index = table.class_index[i]
        return planned_sample(table.key(i), table.relpath(i), class_index, self.class_ids[class_index],
                              table.sizes[i], self.probes.probe(i), self.options)


@dataclass(frozen=True)
class PackedShard:
    """One shard's samples as columns (``SplitPlan.shard``'s ``ShardPlan``, with the keys that are
    their file's stem left to the worker): a few bytes per sample to build, send and read."""

    split: str
    index: int
    relpaths: str  # "\0"-separated: file names hold no NUL
    class_index: array
    class_ids: list[str]  # the class table, by index
    actions: bytes  # ACTIONS codes
    width: array
    height: array
    sizes: array  # the files' sizes when listed
    keys: dict[int, str]  # by position: the keys that are not their file's stem (key clashes)

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    def rows(self) -> Iterator[tuple]:
        """What ``ShardPlan.rows`` yields for the same shard."""
        class_ids = self.class_ids
        relpaths = self.relpaths.split("\0") if self.actions else []
        keys = stem_keys([relpath.rpartition("/")[2] for relpath in relpaths])
        for n, key in self.keys.items():
            keys[n] = key
        for key, relpath, class_index, code, width, height, size in zip(
                keys, relpaths, self.class_index, self.actions, self.width, self.height, self.sizes):
            yield key, relpath, class_index, class_ids[class_index], ACTIONS[code], width, height, size
