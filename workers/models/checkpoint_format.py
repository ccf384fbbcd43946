"""Checkpoint directories: what a training state is made of, and when one counts as complete.

Layout of one checkpoint directory (every rank's part, merged as Ray's storage holds it), its file
names from ``alexray_core.runs``:
- ``MODEL``, ``OPTIMIZER`` (rank 0): state dicts, loaded with ``weights_only=True``;
- ``STATE`` (rank 0): epoch, step, data position, schedule, metrics, the spec's identity;
- ``rng_file(r)`` (every rank): that rank's torch / numpy / python RNG states;
- ``rank_record(r)`` (every rank but 0, written last of its part): size and CRC-32 of its file;
- ``COMPLETE`` (rank 0, written **last**): sizes and CRC-32s of rank 0's files and the world
  size, so every other rank's record must be there too. A directory without them, or whose files
  disagree with them, is refused: a crash while writing never leaves a checkpoint that resume
  would pick up. Every file is fsynced before the record that covers it is written.
"""
from __future__ import annotations

import copy
import json
import os
import random
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from alexray_core.errors import AlexrayError
from alexray_core.runs import COMPLETE, MODEL, OPTIMIZER, STATE, rank_record, rng_file

FORMAT_VERSION = 2  # 2: every rank's files recorded (1: rank 0's only)


class CheckpointError(AlexrayError):
    """A checkpoint that cannot be used; the message says why and what to do."""


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue at the exact sample."""

    epoch: int = 0  # epoch in progress
    step_in_epoch: int = 0  # steps of that epoch already taken: the data position
    global_step: int = 0
    samples_seen: int = 0
    best_top1: float = -1.0
    schedule: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # per finished epoch: loss, top-1, top-5, images/s
    identity: dict = field(default_factory=dict)  # spec fields that must not change on resume
    world_size: int = 1
    model: dict = field(default_factory=dict)  # name, num_classes, width...: enough to rebuild it


def _crc32(path: Path) -> str:
    """CRC-32 of a file: catches truncation and corruption at a quarter of sha256's CPU cost, which
    matters because checkpoints are written while training runs."""
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # Plain lists and numbers only: weights_only loading refuses numpy objects.
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(directory: Path) -> None:
    """Make the directory's entries (new names, renames) durable, not only the files' bytes."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_record(directory: Path, record: str, names: tuple[str, ...], **extra) -> None:
    """Write a completeness record of ``names`` (already fsynced) last, atomically and durably."""
    files = {name: {"bytes": (directory / name).stat().st_size, "crc32": _crc32(directory / name)} for name in names}
    tmp = directory / f".{record}.tmp"
    _write_text(tmp, json.dumps({"format_version": FORMAT_VERSION, "files": files, **extra}, indent=1,
                                sort_keys=True))
    os.replace(tmp, directory / record)
    _fsync_dir(directory)


def save(directory: str | Path, rank: int, state: TrainState | None, model_state: dict | None,
         optimizer_state: dict | None, rng: dict | None = None, world_size: int | None = None, *,
         before_complete: Callable[[], None] | None = None) -> None:
    """Write this rank's part of a checkpoint, each file fsynced, then its completeness record last.

    ``rng`` is the RNG state to record (default: this thread's, now); ``world_size``: the ranks
    whose parts rank 0's record requires (default: ``state.world_size``); ``before_complete``:
    called with every file of the part written and its record not yet (``spec.debug``'s window
    for crash tests, ``workers.training.debug_hooks``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng_name = rng_file(rank)
    _torch_save(rng if rng is not None else rng_state(), directory / rng_name)
    if rank != 0:
        if before_complete is not None:
            before_complete()
        write_record(directory, rank_record(rank), (rng_name,))
        return
    assert state is not None and model_state is not None and optimizer_state is not None
    # Straight to the files (an in-memory buffer would cost another copy of every tensor), then
    # checksummed from the page cache.
    _torch_save(model_state, directory / MODEL)
    _torch_save(optimizer_state, directory / OPTIMIZER)
    _write_text(directory / STATE, json.dumps(asdict(state), indent=1, sort_keys=True))
    if before_complete is not None:
        before_complete()  # everything written but the record
    write_record(directory, COMPLETE, (MODEL, OPTIMIZER, STATE, rng_name),
                 world_size=int(world_size if world_size is not None else state.world_size))


def _read_record(directory: Path, record: str, where: str, names: tuple[str, ...] | None = None) -> tuple[dict, dict]:
    """(the record, name -> (bytes, crc32) of ``names`` or of every file it lists)."""
    try:
        data = json.loads((directory / record).read_text())
        files = data["files"]
        return data, {name: (int(files[name]["bytes"]), str(files[name]["crc32"])) for name in (names or files)}
    except (ValueError, KeyError, TypeError):
        listing = f"list {' and '.join(names)}" if names else "list its files"
        raise CheckpointError(f"{where}/{record} is unreadable or does not {listing}: not an alexray checkpoint; "
                              "pass a directory written by 'alexray train'") from None


def check_complete(directory: str | Path, names: tuple[str, ...] | None = None, where: str | None = None) -> None:
    """Refuse a checkpoint without its completeness records or whose files differ from them.

    ``names``: check only these files, which must be listed in ``COMPLETE`` (default: every
    file of every rank); ``where``: the checkpoint's address in messages (default: the directory).
    """
    directory = Path(directory)
    where = where or str(directory)
    if not (directory / COMPLETE).is_file():
        raise CheckpointError(f"{where} is not a complete checkpoint (no {COMPLETE}): it was being written when its "
                              "run stopped, or it is not an alexray checkpoint; use an earlier checkpoint of the run")
    manifest, expected = _read_record(directory, COMPLETE, where, names)
    covered: dict[str, str] = {}
    if names is None:
        for rank in range(1, int(manifest.get("world_size", 1))):
            record = rank_record(rank)
            if not (directory / record).is_file():
                raise CheckpointError(f"{where} is not a complete checkpoint (no {record}): rank {rank} had not "
                                      "finished its part when its run stopped; use an earlier checkpoint of the run")
            listed = _read_record(directory, record, where)[1]
            expected.update(listed)
            covered.update(dict.fromkeys(listed, record))
    for name, (size, crc) in expected.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != size or _crc32(path) != crc:
            raise CheckpointError(f"{where}/{name} is missing, truncated or damaged (it differs from "
                                  f"{covered.get(name, COMPLETE)}); use an earlier checkpoint of the run")


def load_state(directory: str | Path) -> TrainState:
    check_complete(directory)
    data = json.loads((Path(directory) / STATE).read_text())
    return TrainState(**data)


def load_tensors(directory: str | Path, name: str, map_location="cpu") -> dict:
    """Load ``MODEL`` / ``OPTIMIZER`` without executing any pickled code."""
    path = Path(directory) / name
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist: not an alexray checkpoint") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say so, never unpickle it
        raise CheckpointError(f"{path} is not a loadable checkpoint file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None


def load_rng(directory: str | Path, rank: int) -> dict | None:
    path = Path(directory) / rng_file(rank)
    if not path.is_file():
        return None  # this rank did not exist when the checkpoint was taken (the run changed size)
    return torch.load(path, weights_only=True)


def snapshot(obj, reuse=None):
    """A CPU copy of a (nested) state dict, safe to serialise while training changes the original.

    ``reuse``: an earlier snapshot of the same state, no longer needed; its tensors of the same
    shape, dtype and strides are overwritten instead of allocated again. Fresh memory costs a page
    fault per 4 KiB, which made the copy 4x slower than the copy itself, on the training thread.
    """
    if isinstance(obj, torch.Tensor):
        source = obj.detach()
        if (isinstance(reuse, torch.Tensor) and reuse.device.type == "cpu" and reuse.dtype == source.dtype
                and reuse.shape == source.shape and reuse.stride() == source.stride()):
            return reuse.copy_(source)
        return source.to("cpu", copy=True)
    if isinstance(obj, dict):
        reuse = reuse if isinstance(reuse, dict) else {}
        return {k: snapshot(v, reuse.get(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        reuse = reuse if isinstance(reuse, type(obj)) and len(reuse) == len(obj) else [None] * len(obj)
        return type(obj)(snapshot(v, r) for v, r in zip(obj, reuse))
    return copy.deepcopy(obj)


@dataclass
class _Write:
    """One checkpoint started and not yet published: its thread, its snapshot, what to call once written."""

    tensors: tuple
    publish: object
    thread: threading.Thread | None = None
    error: BaseException | None = None


class BackgroundWriter:
    """Write checkpoints on a thread, so training goes on while one is serialised and written.

    ``start`` takes a snapshot (a memory copy) and returns at once, even while the previous
    checkpoint is still being written: the new one is written after it. ``finish`` waits for the
    files and then calls each ``publish`` given to ``start``, in order, on the caller's thread (Ray's
    report must come from the training thread, on every rank at the same step). The training loop
    calls ``finish`` at the first step at which every rank's files are ``written``.
    ``on_written(seconds, bytes)`` is called on the writer thread after each successful write;
    ``before_complete()`` on it too, before each part's completeness record (see ``save``).

    At most two checkpoints are in flight (two snapshots in memory): a third ``start`` first waits
    for the oldest and publishes it, as every ``start`` did before writes were queued.
    """

    MAX_IN_FLIGHT = 2

    def __init__(self, on_written=None, before_complete: Callable[[], None] | None = None):
        self._writes: list[_Write] = []
        self._spare: tuple = (None, None)  # a published snapshot's tensors, overwritten by the next one
        self._on_written = on_written
        self._before_complete = before_complete  # passed to each ``save``

    def start(self, directory: str, rank: int, state: TrainState, model_state: dict | None,
              optimizer_state: dict | None, publish) -> None:
        while len(self._writes) >= self.MAX_IN_FLIGHT:
            self._publish_oldest()
        spare, self._spare = self._spare, (None, None)
        tensors = (snapshot(model_state, spare[0]) if model_state is not None else None,
                   snapshot(optimizer_state, spare[1]) if optimizer_state is not None else None)
        args = (directory, rank, copy.deepcopy(state) if rank == 0 else None, *tensors, rng_state())
        previous = self._writes[-1].thread if self._writes else None
        write = _Write(tensors, publish)
        write.thread = threading.Thread(target=self._run, args=(write, previous, args), name="checkpoint-writer",
                                        daemon=True)
        self._writes.append(write)
        write.thread.start()

    def _run(self, write: _Write, previous: threading.Thread | None, args: tuple) -> None:
        try:
            try:  # lowest CPU priority for this thread only: the write fills idle time, never steals a step
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except (AttributeError, OSError):
                pass
            if previous is not None:
                previous.join()  # one write at a time: two would compete for the same idle time and disk
            started = time.perf_counter()
            save(*args, before_complete=self._before_complete)
            if self._on_written is not None:
                try:  # a monitoring hook never fails a checkpoint
                    self._on_written(time.perf_counter() - started,
                                     sum(p.stat().st_size for p in Path(args[0]).iterdir() if p.is_file()))
                except Exception:  # noqa: BLE001
                    pass
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread by finish()
            write.error = e

    def _publish_oldest(self) -> None:
        write = self._writes.pop(0)
        write.thread.join()
        if write.error is not None:
            raise write.error
        write.publish()
        self._spare = write.tensors  # written and published: nothing reads these tensors any more

    @property
    def busy(self) -> bool:
        """A checkpoint was started and not yet published."""
        return bool(self._writes)

    @property
    def written(self) -> bool:
        """Every started checkpoint's files are written (finish() will not wait)."""
        return bool(self._writes) and not any(w.thread.is_alive() for w in self._writes)

    def abandon(self) -> None:
        """Wait for the writes in progress without publishing them (the run is failing): a thread
        still writing when the interpreter exits aborts the process instead of letting the error show."""
        while self._writes:
            self._writes.pop(0).thread.join()

    def finish(self) -> None:
        """Wait for every started checkpoint's files and publish each, oldest first."""
        while self._writes:
            self._publish_oldest()
