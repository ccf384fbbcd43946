"""``spec.debug``: aids for tests and diagnosis, called by the training loop at fixed points.

- after each step: record the step's sample keys (``sample_log``), then sleep ``step_delay``
  (tests that kill a run mid-epoch need the epoch to last);
- at each checkpoint and at the end of each epoch: write the recorded keys to the run directory;
- before each rank's part of a checkpoint is marked complete, on the writer thread: sleep
  ``checkpoint_delay`` (the window crash tests kill it in; ``CheckpointManager``'s ``before_complete``).

None of them changes what is trained: the same weights come out with or without them.
"""

from __future__ import annotations

import time

from alexray_core.spec import DebugSpec
from workers.training.run_store import RunStore


class DebugHooks:
    def __init__(self, debug: DebugSpec, store: RunStore, rank: int, world_size: int, attempt: int):
        self.debug, self.store = debug, store
        self.rank, self.world_size, self.attempt = rank, world_size, attempt
        self.samples: list[dict] = []  # this rank's steps since the last flush

    def before_checkpoint_complete(self) -> None:
        """Called on the checkpoint writer's thread with a part's files written and its record not yet."""
        if self.debug.checkpoint_delay:
            time.sleep(self.debug.checkpoint_delay)

    def after_step(self, step: int, keys: list[str]) -> None:
        if self.debug.sample_log:
            self.samples.append({"step": step, "keys": keys})
        if self.debug.step_delay:
            time.sleep(self.debug.step_delay)

    def flush_samples(self, epoch: int) -> None:
        """Write the keys recorded since the last flush (nothing without ``sample_log``)."""
        self.store.flush_sample_log(self.rank, self.world_size, epoch, self.samples, self.attempt)
        self.samples = []
