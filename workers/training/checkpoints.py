"""The training loop's checkpoint protocol: snapshot, write on a thread, publish when every rank has written.

A checkpoint is taken in three moves, so training never waits for a disk or an upload:

1. ``save``: the state is snapshotted (a memory copy) and each rank's part is written to the run's
   local scratch by ``BackgroundWriter``'s thread while the steps go on;
2. ``maybe_publish``, at the same point of every step on every rank: the ranks sum ``written``
   (one small all-reduce, only while a checkpoint is in flight), and once all have written it is
   published (Ray's report, a barrier, or the move into ``{run_dir}/checkpoints/``);
3. ``finish`` at the end of the run waits for the last one and publishes it.

A run that fails mid-write leaves through ``close`` (or the ``with`` block), which waits for the
thread without publishing: a half-taken checkpoint never becomes the one a restart resumes from.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable

import torch

from alexray_core.goodput import CHECKPOINT_STALL
from workers.models import checkpoint_format as ckpt
from workers.training.run_store import RunStore

log = logging.getLogger("alexray.checkpoint")


class CheckpointManager:
    """``session``: where checkpoints are published (``Session.save_checkpoint``); ``all_reduce_sum(values)``
    sums ``values`` over the ranks; ``state`` is the run's ``TrainState``, updated in place by the
    loop and recorded (with the schedule's state) at each ``save``; ``before_complete``: called on
    the writer thread before each part's completeness record (``DebugHooks.before_checkpoint_complete``)."""

    MAX_PENDING_UPLOADS = 4  # checkpoint copies of one worker waiting on the local disk for Ray's upload

    def __init__(self, session, store: RunStore, state: ckpt.TrainState, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, schedule, *, attempt: int,
                 all_reduce_sum: Callable[[list[float]], list[float]], async_upload: bool,
                 on_written: Callable[[float, int], None] | None = None,
                 before_complete: Callable[[], None] | None = None, ledger=None):
        self.session, self.store, self.state = session, store, state
        # the time the loop spends in these calls is the checkpoint's stall (workers.training.ledger)
        self.stall = (lambda: ledger.charging(CHECKPOINT_STALL)) if ledger is not None else contextlib.nullcontext
        self.ledger = ledger
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.attempt, self.all_reduce_sum, self.async_upload = attempt, all_reduce_sum, async_upload
        self.writer = ckpt.BackgroundWriter(on_written=on_written, before_complete=before_complete)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def save(self, metrics: dict, now: bool = False) -> None:
        """Snapshot now and write on the thread; published by a later ``maybe_publish`` or ``finish``.

        ``now``: write, upload and publish before returning (a node is about to go)."""
        with self.stall():
            self._wait_for_uploads()  # before this checkpoint's own scratch folder counts
        state, rank = self.state, self.session.rank
        state.schedule = self.schedule.state_dict()
        state.metrics = metrics
        directory = self.store.scratch_dir("ckpt")  # the run's scratch: a killed worker's is cleared at the next start
        name = self.store.checkpoint_name(state.epoch, state.global_step, self.attempt)
        report = {**metrics, "epoch": state.epoch, "global_step": state.global_step}
        upload_async = self.async_upload and not now
        with self.stall():
            self.writer.start(directory, rank, state, self.model.state_dict() if rank == 0 else None,
                              self.optimizer.state_dict() if rank == 0 else None,
                              lambda: self.session.save_checkpoint(directory, name, report, upload_async))
            if now:
                self.writer.finish()
            if self.ledger is not None:
                self.ledger.persist(force=True)

    def _wait_for_uploads(self) -> None:
        """Hold the loop while more than MAX_PENDING_UPLOADS of its checkpoints wait for their upload.

        Ray takes one report per poll of its controller (every 2 s): checkpoints saved faster than
        that would pile up, each a full copy on the local disk, without bound. Waiting here keeps at
        most this many copies; the time shows as checkpoint stall."""
        started = last_said = time.monotonic()
        while self.store.scratch_count("ckpt") > self.MAX_PENDING_UPLOADS:
            if time.monotonic() - last_said > 60:
                last_said = time.monotonic()
                log.warning("checkpoint: %d checkpoints of this worker still wait for their upload after %.0f s; "
                            "training waits for them (save less often: checkpoint.every_steps)",
                            self.store.scratch_count("ckpt"), last_said - started)
            time.sleep(0.1)

    def maybe_publish(self) -> None:
        """Publish the checkpoint in flight if every rank has written it. Every rank must call this
        at the same point of the same steps: the ranks agree on the step, since Ray's report is a
        barrier. Training never waits for a write in progress."""
        if self.writer.busy:
            with self.stall():
                if self.all_reduce_sum([float(self.writer.written)])[0] == self.session.world_size:
                    self.writer.finish()

    def finish(self) -> None:
        """Wait for the checkpoint in flight and publish it (the run's last)."""
        with self.stall():
            self.writer.finish()

    def close(self) -> None:
        """Wait for a write in progress without publishing it: never leave the thread writing at exit."""
        self.writer.abandon()
