"""Writes the run directory (its layout: ``alexray_core.runs``) beside Ray's checkpoints.

Checkpoints are written first to this run's scratch directory on the local disk
(``{tmp}/alexray-run-{name}-{hash}/``), one folder per writing process, named after its host and
pid: a killed worker's folder is removed at the run's next start, never another live process's.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import zlib
from pathlib import Path

import torch

from alexray_core import runs
from alexray_core.processes import alive
from alexray_core.storage import LocalStorage, open_storage
from workers.models import checkpoint_format as ckpt

log = logging.getLogger("alexray.runstore")

_SCRATCH_NAME = re.compile(r"[a-z]+-(?P<host>.+)-p(?P<pid>\d+)-[^-]+")


class Resume:
    """The checkpoint a start resumes from: a context manager yielding its local directory.

    ``name``: the checkpoint's directory name; ``skipped``: (name, reason) of each newer one passed over.
    """

    def __init__(self, name: str, directory: Path, downloaded: bool, skipped: list[tuple[str, str]]):
        self.name, self.directory, self.downloaded, self.skipped = name, directory, downloaded, skipped

    def __enter__(self) -> str:
        return str(self.directory)

    def __exit__(self, *exc) -> None:
        if self.downloaded:
            shutil.rmtree(self.directory, ignore_errors=True)


class RunStore(runs.RunFiles):
    def __init__(self, run_dir: str):
        super().__init__(run_dir, open_storage(run_dir))
        self.resumed: Resume | None = None  # what resume_point chose at this start

    def write_json(self, name: str, data) -> None:
        self.storage.write_bytes(name, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())

    # ---- scratch on the local disk ----------------------------------------------------------------

    @property
    def scratch_root(self) -> Path:
        """This run's scratch directory on this machine (the run's name, and a hash of its storage)."""
        name = self.run_dir.rstrip("/").rpartition("/")[2]
        digest = hashlib.sha256(self.run_dir.rstrip("/").encode()).hexdigest()[:8]
        return Path(tempfile.gettempdir()) / f"alexray-run-{name}-{digest}"

    def scratch_dir(self, kind: str, pid: int | None = None) -> str:
        """A new folder for ``kind`` (ckpt, best, resume) owned by process ``pid`` (default: this one)."""
        self.scratch_root.mkdir(parents=True, exist_ok=True)
        prefix = f"{kind}-{socket.gethostname()}-p{pid or os.getpid()}-"
        return tempfile.mkdtemp(prefix=prefix, dir=self.scratch_root)

    def scratch_count(self, kind: str) -> int:
        """This process's scratch folders of ``kind``: for checkpoints, those written and not yet
        uploaded (Ray deletes each once it has uploaded it) plus the one being written."""
        if not self.scratch_root.is_dir():
            return 0
        return sum(1 for _ in self.scratch_root.glob(f"{kind}-{socket.gethostname()}-p{os.getpid()}-*"))

    def clean_scratch(self) -> int:
        """Remove this run's scratch folders whose process on this host is gone; returns how many."""
        removed, host = 0, socket.gethostname()
        if not self.scratch_root.is_dir():
            return 0
        for entry in self.scratch_root.iterdir():
            match = _SCRATCH_NAME.fullmatch(entry.name)
            if match and match["host"] == host and not alive(int(match["pid"])):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed

    # ---- checkpoints --------------------------------------------------------------------------------

    def checkpoint_names(self, prefix: str = "") -> list[str]:
        """Checkpoint directories under ``prefix`` (Ray's: the run directory itself), newest first."""
        return runs.checkpoint_dirs(self.storage, prefix)

    def checkpoint_name(self, epoch: int, step: int, attempt: int) -> str:
        """The directory name of a new checkpoint; never that of one skipped at this start."""
        name = runs.checkpoint_name(epoch, step)
        avoid = {skipped for skipped, _ in self.resumed.skipped} if self.resumed else set()
        while name in avoid:
            name = runs.checkpoint_name(epoch, step, attempt)
            attempt += 1
        return name

    def _open(self, path: str, where: str) -> tuple[Path, bool]:
        """A local directory holding the checkpoint at ``path``: itself, or a download of it."""
        if isinstance(self.storage, LocalStorage):
            return self.storage.root / path, False
        directory = Path(self.scratch_dir("resume"))
        try:
            if self.storage.exists(f"{path}/{ckpt.COMPLETE}"):  # else nothing worth downloading
                for obj in self.storage.list(f"{path}/"):
                    name = obj.name[len(path) + 1:]
                    if not name or "/" in name:  # a folder marker (pyarrow writes them for Ray), or not ours
                        continue
                    with open(directory / name, "wb") as f:
                        for chunk in self.storage.iter_chunks(obj.name):
                            f.write(chunk)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return directory, True

    def resume_point(self, newest: str | None, prefix: str, rank: int, world: int, all_reduce_sum) -> Resume | None:
        """At each start: clear this run's scratch left by killed processes, then choose the
        checkpoint to resume from; None for a fresh start.

        ``newest``: the newest checkpoint (the one Ray registered; older ones lie beside it, newer
        ones were never registered). The first of it and the older ones, newest first, that every
        rank finds complete (every rank's files, against their records) is chosen; the others are
        skipped with their reason. ``all_reduce_sum(values)`` sums ``values`` over the ranks (every rank calls
        it the same number of times). No usable checkpoint fails the start: training from scratch
        under the name of a run that has checkpoints would throw its work away.
        """
        self.clean_scratch()
        self.resumed = None
        if newest is None:
            return None
        newer = runs.checkpoint_order(newest)
        candidates = [newest] + [n for n in self.checkpoint_names(prefix) if runs.checkpoint_order(n) < newer]
        crc = zlib.crc32("\n".join(candidates).encode())
        mine = [float(len(candidates)), crc >> 16, (crc >> 16) ** 2, crc & 0xFFFF, (crc & 0xFFFF) ** 2]
        if all_reduce_sum(mine) != [world * v for v in mine]:  # sums equal to world x each value: all ranks alike
            raise ckpt.CheckpointError(f"{self.run_dir}: the ranks see different checkpoints; the run's storage "
                                       "must be one shared by every node (run.storage)")
        skipped: list[tuple[str, str]] = []
        for name in candidates:
            where = self.storage.join(prefix + name)
            reason = None
            try:
                directory, downloaded = self._open(prefix + name, where)
                try:
                    ckpt.check_complete(directory, where=where)
                except ckpt.CheckpointError as e:
                    reason = str(e)
            except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is skipped like a damaged one
                directory, downloaded, reason = None, False, f"{where} cannot be read: {e}"
            votes, rank0_ok = all_reduce_sum([float(reason is None), float(reason is None and rank == 0)])
            if votes == world:
                self.resumed = Resume(name, directory, downloaded, skipped)
                if skipped and rank == 0:
                    log.warning("resuming from %s, the newest checkpoint every rank can use", name)
                return self.resumed
            if downloaded:
                shutil.rmtree(directory, ignore_errors=True)
            if reason is None:
                reason = f"{where} is unusable on another rank (that rank's log says why)"
            if rank == 0 or rank0_ok:  # rank 0 reports every skip; other ranks what rank 0 did not see
                log.warning("skipping %s: %s", name, reason)
            skipped.append((name, reason))
        tried = "; ".join(f"{name}: {reason}" for name, reason in skipped)
        raise ckpt.CheckpointError(f"no usable checkpoint in {self.run_dir} ({tried}); restore a checkpoint of "
                                   "the run from a copy, or train under a new run.name")

    def publish_checkpoint(self, local_dir: str, target: str, keep: int) -> None:
        """Move a checkpoint from scratch to ``target`` in the run directory, every rank's record
        after its files and rank 0's last, then drop the oldest beyond ``keep`` (for runs
        without Ray; Ray does both for runs on Ray)."""
        local = Path(local_dir)
        names = sorted(p.name for p in local.iterdir() if p.is_file() and not p.name.startswith("."))
        records = [n for n in names if runs.is_rank_record(n)] + [runs.COMPLETE]
        self._delete_checkpoint(target)  # a checkpoint of the same name stops counting before it is replaced
        for name in [n for n in names if n not in records] + records:
            self._put_durably(f"{target}/{name}", local / name)
        shutil.rmtree(local, ignore_errors=True)
        prefix = target.rpartition("/")[0] + "/" if "/" in target else ""
        for old in self.checkpoint_names(prefix)[keep:]:
            self._delete_checkpoint(prefix + old)

    def _put_durably(self, name: str, source: Path) -> None:
        """Upload, or on local storage place and fsync, so the record written after it is never ahead."""
        if not isinstance(self.storage, LocalStorage):
            self.storage.put_file(name, source)
            return
        path = self.storage.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(source, path)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
            shutil.copyfile(source, tmp)
            os.replace(tmp, path)
        with open(path, "rb") as f:  # a no-op for a renamed file already synced; the copy's bytes otherwise
            os.fsync(f.fileno())
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _delete_checkpoint(self, path: str) -> None:
        self.storage.delete(f"{path}/{ckpt.COMPLETE}")  # first: a half-deleted checkpoint never counts
        for obj in self.storage.list(f"{path}/"):
            self.storage.delete(obj.name)
        if isinstance(self.storage, LocalStorage):
            shutil.rmtree(self.storage.root / path, ignore_errors=True)

    # ---- records ---------------------------------------------------------------------------------

    def attempt_record(self) -> dict:
        """What this start resumed from and what it skipped, for ``attempts/NNNN.json``."""
        if self.resumed is None:
            return {}
        skipped = [{"checkpoint": name, "reason": reason} for name, reason in self.resumed.skipped]
        return {"resumed_from_checkpoint": self.resumed.name, "skipped_checkpoints": skipped}

    def begin_attempt(self, rank: int, resumed_from: int | None) -> int:
        """Record a start of the worker group; returns how many starts came before (rank 0 only)."""
        if rank != 0:
            return 0
        previous = len(self.storage.list(runs.ATTEMPTS))
        self.write_json(f"{runs.ATTEMPTS}{previous:04d}.json", {"started": time.time(), "resumed_from_step": resumed_from,
                                                            **self.attempt_record()})
        return previous

    def first_start(self) -> float:
        first = self.read_json(f"{runs.ATTEMPTS}0000.json")
        return first["started"] if first else time.time()

    def write_progress(self, metrics: dict) -> None:
        self.write_json(runs.PROGRESS, {**metrics, "time": time.time()})

    def flush_sample_log(self, rank: int, world: int, epoch: int, entries: list[dict], attempt: int = 0) -> None:
        """Steps redone after a restart are logged again under the new attempt: for each step, the
        highest attempt that logged it is the one whose work the run kept."""
        if entries:
            first = entries[0]["step"]
            self.write_json(f"samples/e{epoch:04d}-s{first:06d}-a{attempt:04d}-w{world}-r{rank}.json", entries)

    def write_best(self, model_state: dict, state: ckpt.TrainState, metrics: dict) -> None:
        self.storage.delete(runs.BEST + runs.COMPLETE)  # the old best stops counting before it is replaced
        tmp = self.scratch_dir("best")
        try:
            ckpt.save(tmp, 0, state, model_state, {}, world_size=1)  # rank 0's files only
            for name in (runs.MODEL, runs.OPTIMIZER, runs.STATE, runs.rng_file(0), runs.COMPLETE):
                self._put_durably(runs.BEST + name, Path(tmp) / name)  # the completeness record goes last
            self.write_json(runs.BEST_METRICS, metrics)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def write_summary(self, spec, state: ckpt.TrainState, weights: dict, attempt: int) -> dict:
        summary = summary_of(spec, state, weights, attempt, time.time() - self.first_start())
        self.write_json(runs.SUMMARY, summary)
        return summary


def weights_sha256(state_dict: dict) -> str:
    """A digest of the weights' names and exact bytes: equal digests, bitwise-identical weights."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor  # numpy has no bfloat16
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


def summary_of(spec, state: ckpt.TrainState, weights: dict, attempt: int, wall_seconds: float) -> dict:
    """``summary.json``: what the run did and what it reached, for people and for tests."""
    last = state.history[-1] if state.history else {}
    return {"run_name": spec.run.name, "epochs": state.epoch, "steps": state.global_step,
            "samples": state.samples_seen, "top1": last.get("val_top1"), "top5": last.get("val_top5"),
            "best_top1": state.best_top1 if state.best_top1 >= 0 else None,
            "images_per_s": state.metrics.get("images_per_s"), "flops_per_s": state.metrics.get("flops_per_s"),
            "mfu": state.metrics.get("mfu"), "wall_seconds": wall_seconds,
            "restarts": attempt, "final_weights_sha256": weights_sha256(weights), "history": state.history,
            "model": state.model}
