"""A run directory ``{run.storage}/{run.name}/``: where it is, what its files and checkpoints are called.

Workers write it (``workers.training.run_store.RunStore``, a ``RunFiles`` that also writes); the
orchestrator reads it (``alexray status``, ``resume``, preflight) without torch. Both take every
name from here, the names of a checkpoint's files included (``MODEL``...; what they hold and
how they are written: ``workers.models.checkpoint_format``). What the run's files hold:

- ``spec.json``: the spec the run was started with;
- ``attempts/NNNN.json``: one per start of the worker group (restarts = count - 1);
- ``progress.json``: the latest metrics (epoch, step, loss, images/s);
- ``best/``: the model with the best val top-1 so far, ``best/metrics.json`` its metrics;
- ``checkpoint_e{epoch}_s{step}[_a{attempt}]/``: checkpoints (Ray's, in the run directory itself;
  under ``checkpoints/`` for runs without Ray), each complete once its ``COMPLETE`` record is there;
- ``goodput/``: the workers' ledgers, the failures and the session the run's time is accounted
  from (``alexray_core.goodput``);
- ``summary.json``: written at the end.

A storage here is any object with ``exists``, ``list`` and ``read_bytes`` (``alexray_core.storage.local``).
"""

from __future__ import annotations

import json
import re

from alexray_core.storage import absolute_location

SPEC = "spec.json"
PROGRESS = "progress.json"
SUMMARY = "summary.json"
ATTEMPTS = "attempts/"
BEST = "best/"
BEST_METRICS = "best/metrics.json"
LOCAL_CHECKPOINTS = "checkpoints/"  # where a run without Ray keeps its checkpoints
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray's record of the checkpoints it registered

# The files of a checkpoint directory. Every file name is spelt here only: the rest of the code
# (and its messages and docstrings) names them through these constants.
MODEL = "model.pt"  # rank 0: the model's state dict
OPTIMIZER = "optimizer.pt"  # rank 0: the optimizer's state dict
STATE = "state.json"  # rank 0: the training state (``TrainState``), the model's description among it
COMPLETE = "complete.json"  # rank 0's completeness record, written last
RNG_FILE = "rng-rank{rank}.pt"  # every rank: its RNG states
RANK_RECORD = "complete-rank{rank}.json"  # every rank but 0: the completeness record of its part
CHECKPOINT_FILES = (MODEL, OPTIMIZER, STATE, COMPLETE, RNG_FILE, RANK_RECORD)
MODEL_FILES = (STATE, MODEL)  # what opening a checkpoint as a model reads

# ``_aNNNN``: a step taken again by attempt NNNN after the checkpoint of that step was found
# damaged (Ray deletes an evicted checkpoint by path, so names never repeat)
CHECKPOINT_NAME = re.compile(r"checkpoint_e(\d+)_s(\d+)(?:_a(\d+))?")


def rng_file(rank: int) -> str:
    return RNG_FILE.format(rank=rank)


def rank_record(rank: int) -> str:
    """The completeness record of a rank's part of a checkpoint (rank 0's is ``COMPLETE``)."""
    return COMPLETE if rank == 0 else RANK_RECORD.format(rank=rank)


def is_rank_record(name: str) -> bool:
    """A record of a rank other than 0."""
    head, _, tail = RANK_RECORD.partition("{rank}")
    return name.startswith(head) and name.endswith(tail) and name[len(head):-len(tail)].isdigit()


def run_dir(storage: str, name: str) -> str:
    """``{storage}/{name}``; a local storage is made absolute (workers run elsewhere)."""
    return f"{absolute_location(storage.rstrip('/'))}/{name}"


def checkpoint_name(epoch: int, step: int, attempt: int | None = None) -> str:
    name = f"checkpoint_e{epoch:04d}_s{step:09d}"
    return name if attempt is None else f"{name}_a{attempt:04d}"


def checkpoint_order(name: str) -> tuple[int, int, int] | None:
    """(epoch, step, attempt) of a checkpoint directory name or path (larger is newer), else None."""
    match = CHECKPOINT_NAME.fullmatch(name.rstrip("/").rpartition("/")[2])
    return (int(match[1]), int(match[2]), int(match[3] or -1)) if match else None


def checkpoint_step(name: str) -> int:
    order = checkpoint_order(name)
    assert order is not None, name
    return order[1]


def checkpoint_dirs(storage, prefix: str = "") -> list[str]:
    """Checkpoint directory names directly under ``prefix``, newest first."""
    names = {obj.name[len(prefix):].partition("/")[0] for obj in storage.list(f"{prefix}checkpoint_")}
    return sorted((n for n in names if checkpoint_order(n)), key=checkpoint_order, reverse=True)


def checkpoint_candidates(storage) -> list[str]:
    """Prefixes under ``storage`` that may hold a model, in the order to try them: the storage
    itself when it is a checkpoint, else the run's ``best/``, then its checkpoints newest first
    (Ray's and those of runs without Ray)."""
    if any(storage.exists(name) for name in (COMPLETE, *MODEL_FILES)):
        return [""]
    found = [BEST] if storage.exists(BEST + COMPLETE) else []
    dirs = [(prefix, name) for prefix in ("", LOCAL_CHECKPOINTS) for name in checkpoint_dirs(storage, prefix)]
    dirs.sort(key=lambda d: checkpoint_order(d[1]), reverse=True)
    return found + [f"{prefix}{name}/" for prefix, name in dirs]


class RunFiles:
    """Reads the files of one run directory through ``storage``."""

    def __init__(self, run_dir: str, storage):
        self.run_dir, self.storage = run_dir, storage

    def read_json(self, name: str):
        """The parsed file, or None when it is missing (or being replaced: the next look sees it)."""
        if not self.storage.exists(name):
            return None
        try:
            return json.loads(self.storage.read_bytes(name))
        except ValueError:
            return None

    def spec(self) -> dict | None:
        return self.read_json(SPEC)

    def progress(self) -> dict:
        return self.read_json(PROGRESS) or {}

    def summary(self) -> dict | None:
        return self.read_json(SUMMARY)

    def best_metrics(self) -> dict:
        return self.read_json(BEST_METRICS) or {}

    def attempts(self) -> int:
        """How many times the worker group started."""
        return sum(1 for obj in self.storage.list(ATTEMPTS) if obj.name.endswith(".json"))

    def registered_checkpoint(self) -> str | None:
        """The newest complete checkpoint Ray registered: the one a restart or a resume continues from.

        A complete directory whose (asynchronous) report Ray had not taken when the job stopped is
        not one: a job stopped before its first registration resumes from step 0."""
        snapshot = self.read_json(RAY_SNAPSHOT) or {}
        newest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        return newest if newest and self.storage.exists(f"{newest}/{COMPLETE}") else None
