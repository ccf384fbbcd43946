"""Pass 1 of ``alexray shard``: probe every listed file, in chunks handed to the executor.

Listing SRC is a walk in one process; probing is spread over the workers. With local worker
processes the two overlap: each full chunk of a split's files is queued for probing as soon as it
is listed, and a thread of this process hands the queued chunks to the workers and keeps what they
find, while the walk goes on (and while DEST is checked). A split whose final table is not the one
that was listed (a tree that had to be sorted after the walk) is probed again from its start.
"""

from __future__ import annotations

import os
import queue
import threading

from .executor import ProcessExecutor, Progress
from .images import ImageOptions, probe_file
from .planning import ProbeBatch, SplitProbes
from .sources import FileTable, SourceDataset

PROBE_CHUNK = 1024  # files per probe task
_STOP_WAIT_S = 30.0  # how long a cancelled prober waits for the tasks its workers hold


def probe_chunk(src_root: str, relpaths: list[str], options: ImageOptions, on_sample=None,
                sizes=None) -> ProbeBatch:
    """Probe a list of files (``sizes``: theirs when listed, if known); a task for the executor."""
    probes = ProbeBatch()
    add = probes.add
    prefix = os.path.join(src_root, "")
    for rel, size in zip(relpaths, sizes if sizes is not None else [None] * len(relpaths)):
        add(*probe_file(prefix + rel, options, size))
        if on_sample is not None:
            on_sample(0)
    return probes


class Prober:
    """The probe tasks of a sharding: queued with ``listed`` as SRC is walked (local workers
    only), the rest by ``finish``, which returns every split's probes."""

    def __init__(self, executor, options: ImageOptions, progress: bool):
        self.executor, self.options = executor, options
        self.bar = Progress("checking", 0, progress)
        self.chunks: list[tuple[str, int, FileTable]] = []  # by task number: (split, first file, table)
        self.queued: dict[str, tuple[FileTable, int]] = {}  # split -> (its table, files queued)
        self.results: dict[int, ProbeBatch] = {}
        self.error: BaseException | None = None
        self.src_root = ""
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = False
        self._thread = None
        if isinstance(executor, ProcessExecutor):
            self._thread = threading.Thread(target=self._run, name="probe", daemon=True)
            self._thread.start()

    def listed(self, root: str, split: str, table: FileTable) -> None:
        """``scan_source``'s hook: ``table`` has grown; queue its full chunks not queued yet."""
        if self._thread is None:
            return
        self.src_root = root
        known, start = self.queued.get(split, (table, 0))
        if known is not table:
            start = 0
        while len(table) - start >= PROBE_CHUNK:
            self._queue(split, table, start)
            start += PROBE_CHUNK
        self.queued[split] = (table, start)

    def finish(self, dataset: SourceDataset) -> dict[str, SplitProbes]:
        """Probe what is left of ``dataset`` and wait for every result."""
        self.src_root = str(dataset.root)
        for split in sorted(dataset.splits):
            table = dataset.splits[split]
            known, start = self.queued.get(split, (table, 0))
            for first in range(start if known is table else 0, len(table), PROBE_CHUNK):
                self._queue(split, table, first)
        self.bar.set_total(sum(len(table) for table in dataset.splits.values()))
        if self._thread is None:
            self._tasks.put(None)
            self._run()
        self.stop()
        if self.error is not None:
            raise self.error
        probes = {split: SplitProbes(len(table)) for split, table in dataset.splits.items()}
        for i, batch in self.results.items():
            split, start, table = self.chunks[i]
            if dataset.splits[split] is table:  # not a table that was replaced after the walk
                probes[split].record_batch(start, batch)
        return probes

    def stop(self, cancel: bool = False) -> None:
        """No more tasks: let the thread hand out what is queued (with ``cancel``, only wait for
        the tasks the workers hold), and end. Called before the executor is closed: a pool shut
        down with a task still in its queue's pipe can wait forever for the pipe to drain."""
        if self._thread is not None:
            self._cancelled = self._cancelled or cancel
            self._tasks.put(None)
            self._thread.join(timeout=_STOP_WAIT_S if cancel else None)
            self._thread = None
        self.bar.close()

    def _queue(self, split: str, table: FileTable, start: int) -> None:
        end = min(start + PROBE_CHUNK, len(table))
        self.chunks.append((split, start, table))
        self._tasks.put({"src_root": self.src_root, "options": self.options,
                         "relpaths": table.relpaths_in(start, end), "sizes": table.sizes[start:end]})

    def _queued_tasks(self):
        while (task := self._tasks.get()) is not None and not self._cancelled:
            yield task

    def _run(self) -> None:
        try:
            for i, batch in self.executor.run(probe_chunk, self._queued_tasks(), self.bar):
                self.results[i] = batch
        except BaseException as e:  # noqa: BLE001 - raised where the results are awaited
            self.error = e
