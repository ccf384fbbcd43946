"""Run independent tasks on local processes or on a Ray cluster, with a live progress bar.

Tasks are plain module-level functions taking keyword arguments and an ``on_sample(nbytes)``
callback; the same function runs in-process (``workers=1``), in a process pool, or as a Ray task.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import forkserver
from typing import Callable, Iterable, Iterator

from tqdm import tqdm

from alexray_core.storage import StorageError, apply_storage_env, storage_env

from .errors import ShardError

_counters = None  # (images, bytes) shared with the parent, set in each pool process
_COUNT_EVERY = 64  # samples a worker counts before adding them to the shared totals


def _init_worker(images, nbytes, env: dict) -> None:
    global _counters
    _counters = (images, nbytes)
    apply_storage_env(env)
    # Ctrl-C goes to the parent, which stops the pool; workers must not die half-way on their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _add_to_totals(n_images: int, nbytes: int) -> None:
    images, total = _counters
    with images.get_lock():
        images.value += n_images
    with total.get_lock():
        total.value += nbytes


def _run_counted(fn: Callable, kwargs: dict):
    # Counted in batches: two shared locks per sample cost as much as probing a small file, and
    # the progress bar is redrawn only every quarter second anyway.
    seen = [0, 0]

    def on_sample(nbytes: int) -> None:
        seen[0] += 1
        seen[1] += nbytes
        if seen[0] >= _COUNT_EVERY:
            _add_to_totals(*seen)
            seen[:] = [0, 0]

    try:
        return fn(on_sample=on_sample, **kwargs)
    finally:
        if seen[0]:
            _add_to_totals(*seen)


class Progress:
    """A tqdm bar in images with the data rate beside it; ``update`` takes absolute totals."""

    def __init__(self, desc: str, total: int, enabled: bool = True):
        self.bar = tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr,
                        mininterval=0.5, dynamic_ncols=True, smoothing=0.1)
        self.started = time.monotonic()
        self.images = 0
        self.nbytes = 0

    def update(self, images: int, nbytes: int) -> None:
        if images > self.images:
            self.bar.update(images - self.images)
            self.images = images
        self.nbytes = nbytes
        if nbytes:
            elapsed = max(1e-6, time.monotonic() - self.started)
            self.bar.set_postfix_str(f"{nbytes / elapsed / 1e6:.1f} MB/s", refresh=False)

    def set_total(self, total: int) -> None:
        self.bar.total = total
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


class Executor:
    def run(self, fn: Callable, tasks: Iterable[dict], progress: Progress) -> Iterator[tuple[int, object]]:
        """Yield ``(task index, result)`` as tasks finish, updating ``progress`` meanwhile."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class InlineExecutor(Executor):
    """Everything in this process: for one worker, debugging and profiling."""

    def run(self, fn, tasks, progress):
        seen = [0, 0]

        def on_sample(nbytes: int) -> None:
            seen[0] += 1
            seen[1] += nbytes
            if not seen[0] % _COUNT_EVERY:  # the bar, not the sample, is what costs here
                progress.update(seen[0], seen[1])

        for i, kwargs in enumerate(tasks):
            result = fn(on_sample=on_sample, **kwargs)
            progress.update(seen[0], seen[1])
            yield i, result


def _forkserver_context():
    ctx = mp.get_context("forkserver")
    # Workers fork from a server that has already imported the sharding code, instead of each
    # importing it again (a tenth of a second of CPU per worker and run). Only applies to a server
    # started after this call.
    ctx.set_forkserver_preload(["__main__", f"{__package__}.pipeline"])
    return ctx


def prepare_workers(workers: int, ray_address: str | None) -> None:
    """Start local workers' fork server now, so it imports while this process scans SRC."""
    if workers > 1 and not ray_address:
        _forkserver_context()
        forkserver.ensure_running()


class ProcessExecutor(Executor):
    def __init__(self, workers: int):
        ctx = _forkserver_context()
        self.images = ctx.Value("q", 0)
        self.nbytes = ctx.Value("q", 0)
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                        initargs=(self.images, self.nbytes, storage_env()))
        self.window = 2 * workers + 2  # tasks submitted ahead: each worker has its next one queued

    def run(self, fn, tasks, progress):
        with self.images.get_lock():
            self.images.value = 0
        with self.nbytes.get_lock():
            self.nbytes.value = 0
        # Tasks are taken from the iterable only as workers free up: a task can hold a thousand
        # samples, and a million-image run must not hold all of them at once.
        numbered = enumerate(tasks)
        pending = {}
        while True:
            for i, kwargs in itertools.islice(numbered, self.window - len(pending)):
                pending[self.pool.submit(_run_counted, fn, kwargs)] = i
            if not pending:
                break
            done, _ = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            progress.update(self.images.value, self.nbytes.value)
            for future in done:
                yield pending.pop(future), future.result()
        progress.update(self.images.value, self.nbytes.value)

    def close(self) -> None:
        # Terminate rather than wait: after an error or Ctrl-C, a half-written shard is worthless
        # (it is never published) and the next run redoes it.
        for process in list((getattr(self.pool, "_processes", None) or {}).values()):  # None once shut down
            process.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor(Executor):
    """One Ray task per unit of work (one shard, one chunk of files), spread over the cluster."""

    def __init__(self, address: str):
        import ray

        self.ray = ray
        if not ray.is_initialized():
            try:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            except (ConnectionError, ValueError) as e:
                raise ShardError(f"--ray {address}: no Ray cluster answers there ({str(e).splitlines()[0][:200]}); "
                                 "start one with 'ray start --head' or pass the address it printed") from None
        # SPREAD: shard writing is bound by each node's disk and network, so use every node's.
        self._task = ray.remote(num_cpus=1, max_retries=3, scheduling_strategy="SPREAD")(_ray_task)
        self.nodes: dict[str, int] = {}  # node id -> tasks it ran

    def run(self, fn, tasks, progress):
        ray = self.ray
        refs = {self._task.remote(fn, kwargs): i for i, kwargs in enumerate(tasks)}
        images = nbytes = 0
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
            for ref in done:
                try:
                    result, n_images, n_bytes, node = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    if isinstance(e.cause, (ShardError, StorageError)):  # the one-line error, not Ray's traceback around it
                        raise e.cause from None
                    raise
                self.nodes[node] = self.nodes.get(node, 0) + 1
                images, nbytes = images + n_images, nbytes + n_bytes
                progress.update(images, nbytes)
                yield refs.pop(ref), result

    def close(self) -> None:
        if self.nodes:
            print(f"alexray shard: {sum(self.nodes.values())} Ray tasks ran on {len(self.nodes)} node(s)",
                  file=sys.stderr, flush=True)
        self.ray.shutdown()


def _ray_task(fn, kwargs):
    seen = [0, 0]

    def on_sample(nbytes: int) -> None:
        seen[0] += 1
        seen[1] += nbytes

    import ray

    result = fn(on_sample=on_sample, **kwargs)
    return result, seen[0], seen[1], ray.get_runtime_context().get_node_id()


def make_executor(workers: int, ray_address: str | None) -> Executor:
    if ray_address:
        return RayExecutor(ray_address)
    if workers <= 1:
        return InlineExecutor()
    return ProcessExecutor(workers)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
