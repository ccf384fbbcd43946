"""The run directory ``{storage}/{run_name}/`` beside Ray's checkpoints: what people and tools read.

- ``spec.json``: the spec the run was started with;
- ``attempts/NNNN.json``: one per start of the worker group (restarts = count - 1);
- ``progress.json``: the latest metrics (epoch, step, loss, images/s), for ``alexray status``;
- ``best/``: the model with the best val top-1 so far (complete.json written last);
- ``samples/``: with ``debug.sample_log``, the sample keys each rank trained on, per step and attempt;
- ``summary.json``: written at the end (epochs, steps, samples, top-1/5, images/s, wall time,
  restarts, final weights sha256).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from data_prep.storage import open_storage

from . import checkpoint as ckpt


class RunStore:
    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.storage = open_storage(run_dir)

    def _write_json(self, name: str, data) -> None:
        self.storage.write_bytes(name, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())

    def read_json(self, name: str):
        if not self.storage.exists(name):
            return None
        return json.loads(self.storage.read_bytes(name))

    def begin_attempt(self, rank: int, resumed_from: int | None) -> int:
        """Record a start of the worker group; returns how many starts came before (rank 0 only)."""
        if rank != 0:
            return 0
        previous = len(self.storage.list("attempts/"))
        self._write_json(f"attempts/{previous:04d}.json", {"started": time.time(), "resumed_from_step": resumed_from})
        return previous

    def first_start(self) -> float:
        first = self.read_json("attempts/0000.json")
        return first["started"] if first else time.time()

    def write_progress(self, metrics: dict) -> None:
        self._write_json("progress.json", {**metrics, "time": time.time()})

    def flush_sample_log(self, rank: int, world: int, epoch: int, entries: list[dict], attempt: int = 0) -> None:
        """Steps redone after a restart are logged again under the new attempt: for each step, the
        highest attempt that logged it is the one whose work the run kept."""
        if entries:
            first = entries[0]["step"]
            self._write_json(f"samples/e{epoch:04d}-s{first:06d}-a{attempt:04d}-w{world}-r{rank}.json", entries)

    def write_best(self, model_state: dict, state: ckpt.TrainState, metrics: dict) -> None:
        self.storage.delete(f"best/{ckpt.COMPLETE}")  # the old best stops counting before it is replaced
        with tempfile.TemporaryDirectory(prefix="alexray-best-") as tmp:
            ckpt.save(tmp, 0, state, model_state, {})
            for name in ("model.pt", "optimizer.pt", "state.json", "rng-rank0.pt", ckpt.COMPLETE):
                self.storage.put_file(f"best/{name}", Path(tmp) / name)  # complete.json goes last
            self._write_json("best/metrics.json", metrics)

    def write_summary(self, spec, state: ckpt.TrainState, weights: dict, attempt: int) -> dict:
        from .train import summary_of

        summary = summary_of(spec, state, weights, attempt, time.time() - self.first_start())
        self._write_json("summary.json", summary)
        return summary
