"""Goodput: a run's wall time in categories that add up (alexray_core.goodput, workers.training.ledger)."""

from __future__ import annotations

import json
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from alexray_core import goodput as g
from alexray_core.goodput import Failure, LedgerRecord, account
from alexray_core.storage import LocalStorage
from tests.support.clocks import FakeClock
from tests.trainingtools import sharded_digits, write_spec
from workers.training.ledger import Ledger, LedgerCollector


def record(attempt, rank, started, step, world=2, **seconds) -> LedgerRecord:
    return LedgerRecord(attempt, rank, world, started, step, {c: seconds.get(c, 0.0) for c in g.CATEGORIES})


def test_a_failed_start_splits_into_lost_work_recovery_and_redone_steps():
    """Two slots, submitted at 100, one failure noticed at 140, the group back at 150, end at 200."""
    ledgers = [
        record(0, 0, 105, 30, startup=5, productive=25),  # last record at 135: 5 s unrecorded before 140
        record(0, 1, 106, 30, startup=4, productive=20),  # last record at 130
        record(1, 0, 150, 60, recovery=3, lost_work=7, productive=30, checkpoint_stall=2),  # to 192
        record(1, 1, 151, 60, recovery=2, lost_work=7, productive=30, data_wait=1),  # to 191
    ]
    seconds = account(100, 200, 2, ledgers, [Failure(140)])
    assert sum(seconds.values()) == pytest.approx(2 * 100)
    assert seconds["startup"] == pytest.approx(5 + 6 + 5 + 4 + 8 + 9)  # before each start, and the shut-down
    assert seconds["lost_work"] == pytest.approx((140 - 135) + (140 - 130) + 7 + 7)
    assert seconds["recovery"] == pytest.approx((150 - 140) + 3 + (151 - 140) + 2)
    assert seconds["productive"] == pytest.approx(25 + 20 + 30 + 30)
    assert seconds["preemption"] == seconds["waiting_for_resources"] == 0


def test_a_preemption_and_an_elastic_slot_without_a_worker():
    ledgers = [record(0, 0, 10, 5, world=1, startup=2, productive=8),  # slot 0 to 20; slot 1 never runs
               record(1, 0, 30, 9, world=1, preemption=1, productive=9)]  # to 40
    seconds = account(0, 50, 2, ledgers, [Failure(25, preemption=True)])
    assert sum(seconds.values()) == pytest.approx(100)
    assert seconds["waiting_for_resources"] == pytest.approx(50)
    assert seconds["lost_work"] == pytest.approx(5)  # 20 -> 25
    assert seconds["preemption"] == pytest.approx(5 + 1)
    assert seconds["recovery"] == 0


def test_records_of_an_earlier_session_are_left_out_and_a_slot_that_left_waits():
    ledgers = [record(0, 0, 5, 10, productive=10),  # an earlier session of a resumed run
               record(3, 0, 101, 20, world=2, startup=1, productive=9),  # to 111
               record(3, 1, 101, 20, world=2, startup=1, productive=4),  # to 106, then the group shrank
               record(4, 0, 120, 30, world=1, recovery=1, productive=9)]  # to 130
    seconds = account(100, 140, 2, ledgers, [Failure(115)])
    assert sum(seconds.values()) == pytest.approx(80)
    assert seconds["productive"] == pytest.approx(9 + 4 + 9)
    assert seconds["waiting_for_resources"] == pytest.approx(140 - 115)  # slot 1 after the failure
    assert seconds["lost_work"] == pytest.approx((115 - 111) + (115 - 106))


def test_a_slot_the_group_ran_without_waits_until_it_is_back():
    """Elastic: two workers, a node lost (failure at 30), one worker from 35, two again from 60."""
    ledgers = [record(0, 0, 2, 9, startup=1, productive=20), record(0, 1, 2, 9, startup=1, productive=18),  # to 23 / 21
               record(1, 0, 35, 20, world=1, recovery=2, productive=20),  # to 57
               record(2, 0, 60, 40, recovery=1, productive=29), record(2, 1, 60, 40, recovery=1, productive=29)]  # to 90
    seconds = account(0, 100, 2, ledgers, [Failure(30)])
    assert sum(seconds.values()) == pytest.approx(200)
    assert seconds["waiting_for_resources"] == pytest.approx(60 - 35)  # slot 1 while the group ran without it
    assert seconds["lost_work"] == pytest.approx((30 - 23) + (30 - 21))
    assert seconds["recovery"] == pytest.approx((35 - 30) + 2 + (35 - 30) + (60 - 57) + 1 + 1)


def test_the_ledger_charges_waits_steps_and_redone_steps():
    ledger, clock = Ledger(), FakeClock()
    ledger._clock, ledger._since, ledger._started_clock = clock, 0.0, 0.0
    ledger.high_water = 2  # an earlier start reached step 2: steps 1 and 2 are taken again

    def batches():
        for wait in (3.0, 1.0, 1.0):
            clock.now += wait
            yield wait

    for _ in ledger.timed(batches(), step=0):
        clock.now += 10.0
        with ledger.charging(g.CHECKPOINT_STALL):
            clock.now += 0.5
    seconds = ledger.totals()
    assert seconds["startup"] == 3.0  # the first batch of a start
    assert seconds["data_wait"] == 2.0
    assert seconds["lost_work"] == 20.0 and seconds["productive"] == 10.0
    assert seconds["checkpoint_stall"] == 1.5
    assert sum(seconds.values()) == clock.now
    assert ledger.step == 3


def test_the_counter_is_labelled_by_category_and_never_goes_back(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.write_bytes(g.ledger_name(0, 0), json.dumps(record(0, 0, time.time() - 30, 12).__dict__).encode())
    storage.write_bytes(g.failure_name(time.time() - 10), json.dumps({"time": time.time() - 10}).encode())

    class Store:
        def __init__(self):
            self.storage = storage

        def write_json(self, name, data):
            storage.write_bytes(name, json.dumps(data).encode())

    ledger = Ledger()
    ledger.begin(Store(), attempt=1, rank=0, world=1, slots=2, submitted=None)
    assert ledger.high_water == 12 and ledger._category == g.RECOVERY
    assert ledger.opening["recovery"] > 0 and ledger.opening["lost_work"] > 0
    registry = CollectorRegistry()
    registry.register(LedgerCollector(ledger, {"run": "r", "rank": "0", "node": "n"}))
    values = []
    for _ in range(3):
        text = generate_latest(registry).decode()
        lines = [line for line in text.splitlines() if line.startswith("alexray_run_seconds_total{")]
        assert len(lines) == len(g.CATEGORIES)
        values.append({line.split('category="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1]) for line in lines})
        ledger.enter(g.PRODUCTIVE if len(values) % 2 else g.DATA_WAIT)
    assert all(values[i + 1][c] >= values[i][c] for i in range(2) for c in g.CATEGORIES)
    assert values[-1]["waiting_for_resources"] > 0  # rank 0 of a group one short of its slots
    ledger.persist(force=True)
    written = LedgerRecord.from_dict(json.loads(storage.read_bytes(g.ledger_name(1, 0))))
    assert written.attempt == 1 and sum(written.seconds.values()) == pytest.approx(ledger.elapsed(), abs=0.05)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return sharded_digits(tmp_path_factory.mktemp("digits-goodput"))


class CheckpointTimeline:
    """The debug delays of a run on a fake clock, counted in the loop's steps rather than in this
    machine's seconds (``workers.training.debug_hooks`` sleeps through ``time.sleep``).

    ``step_delay``, on the loop's thread in each step, moves the clock by its seconds: the steps' time.
    ``checkpoint_delay``, on the writer's thread at the end of each write, is the rest of the write: a
    write started at step s ends ``behind`` steps later while the loop goes on (the steps' time covers
    it: the loop's step s + ``behind`` goes on only once it has ended), or, if the loop waits for it
    first, while it waits, moving the clock by the delay. ``behind=None``: no write ends before the
    loop waits for it. ``waits`` lists the delays the loop waited out.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, behind: int | None):
        from types import SimpleNamespace

        from workers.models.checkpoint_format import BackgroundWriter
        from workers.training import debug_hooks

        self.clock, self.behind, self.step, self.waits = FakeClock(), behind, 0, []
        self.started: dict = {}  # writer thread -> the step its write started at
        self.ended: set = set()  # writer threads past their delay
        self.waited_for: set = set()  # writer threads the loop is waiting for
        self._loop = threading.current_thread()  # the run trains on this thread
        self._changed = threading.Condition()
        start, publish_oldest = BackgroundWriter.start, BackgroundWriter._publish_oldest

        def started(writer, *args, **kwargs):
            step = self.step
            start(writer, *args, **kwargs)
            with self._changed:
                self.started[writer._writes[-1].thread] = step
                self._changed.notify_all()

        def waited(writer):  # the loop joins the oldest write's thread
            thread = writer._writes[0].thread
            with self._changed:
                self.waited_for.add(thread)
                self._changed.notify_all()
            try:
                publish_oldest(writer)
            finally:
                with self._changed:
                    self.waited_for.discard(thread)

        monkeypatch.setattr(BackgroundWriter, "start", started)
        monkeypatch.setattr(BackgroundWriter, "_publish_oldest", waited)
        monkeypatch.setattr(debug_hooks, "time", SimpleNamespace(sleep=self.sleep))

    def _due(self, thread) -> bool:
        return self.behind is not None and thread in self.started and self.step >= self.started[thread] + self.behind

    def sleep(self, seconds: float) -> None:
        me = threading.current_thread()
        with self._changed:
            if me is self._loop:  # step_delay
                self.clock.sleep(seconds)
                self.step += 1
                self._changed.notify_all()
                ended = self._changed.wait_for(lambda: all(t in self.ended for t in self.started if self._due(t)), 60)
                assert ended, f"a write due by step {self.step} did not end"
                return
            # checkpoint_delay, on the writer's thread
            assert self._changed.wait_for(lambda: self._due(me) or me in self.waited_for, 60), "nothing ended a write"
            if not self._due(me):
                self.clock.sleep(seconds)
                self.waits.append(seconds)
            self.ended.add(me)
            self._changed.notify_all()


def _train(tmp_path, digits, name: str, behind: int | None, **sections) -> tuple[dict, dict, CheckpointTimeline]:
    """Train in this process, the debug delays and the ledger on a ``CheckpointTimeline``: the ledger's
    seconds, the run's summary and the timeline."""
    from alexray_core.spec import load_spec
    from workers.training.driver import prepare_run
    from workers.training.loop import LocalSession, train_loop

    spec = load_spec(write_spec(tmp_path / f"{name}.yaml", str(digits), str(tmp_path / "runs"), run={"name": name},
                                scaling={"num_workers": 1}, **sections))
    run_dir = prepare_run(spec)
    with pytest.MonkeyPatch.context() as patch:
        timeline = CheckpointTimeline(patch, behind)
        ledger = Ledger()
        ledger._clock, ledger._since, ledger._started_clock = timeline.clock, 0.0, 0.0
        summary = train_loop(spec, run_dir, LocalSession(run_dir, spec.checkpoint.keep), ledger=ledger)
    seconds = ledger.totals()
    assert sum(seconds.values()) == pytest.approx(timeline.clock()), seconds  # the categories add up
    return seconds, summary, timeline


def test_checkpoint_stall_counts_only_the_waits_of_the_loop(digits, tmp_path, monkeypatch):
    """Writes that end behind the steps cost no stall; a write the loop must wait for does."""
    monkeypatch.setenv("ALEXRAY_METRICS", "0")
    step, delay = 1.0, 3.0
    # a checkpoint every 2 steps, each written by the end of the next step: only the last (at
    # max_steps, waited for at the end) holds the loop. Had the steps that the three before it were
    # written behind been counted as stall, it would be 3 s more.
    seconds, summary, timeline = _train(tmp_path, digits, "behind", 1,
                                        train={"max_steps": 8, "epochs": 1, "log_every": 4},
                                        checkpoint={"every_steps": 2, "keep": 2},
                                        debug={"checkpoint_delay": delay, "step_delay": step})
    assert summary["steps"] == 8 and len(timeline.started) == 4 and timeline.waits == [delay]
    assert seconds == {**dict.fromkeys(g.CATEGORIES, 0.0), "productive": 8 * step, "checkpoint_stall": delay}
    # every step, with writes that outlast any number of steps: writes go one at a time, two in
    # flight at most, so the loop waits out each of the 7, and nothing else is charged to the stall.
    step, delay = 0.1, 0.5
    seconds, summary, timeline = _train(tmp_path, digits, "waited", None,
                                        train={"max_steps": 7, "epochs": 1, "log_every": 3},
                                        checkpoint={"every_steps": 1, "keep": 2},
                                        debug={"checkpoint_delay": delay, "step_delay": step})
    assert summary["steps"] == 7 and len(timeline.started) == 7 and timeline.waits == [delay] * 7
    expected = {**dict.fromkeys(g.CATEGORIES, 0.0), "productive": 7 * step, "checkpoint_stall": 7 * delay}
    assert seconds == pytest.approx(expected)


def test_status_accounts_a_running_run_from_its_records(tmp_path):
    from orchestrator.jobs import run_progress

    storage = LocalStorage(tmp_path / "runs" / "live")
    now = time.time()
    storage.write_bytes(g.SESSION, json.dumps({"submitted": now - 20, "slots": 1}).encode())
    storage.write_bytes(g.ledger_name(0, 0), json.dumps(record(0, 0, now - 18, 40, world=1, startup=3,
                                                               productive=12).__dict__).encode())
    found = run_progress(str(tmp_path / "runs"), "live")["goodput"]
    assert found["slots"] == 1 and found["wall_seconds"] == pytest.approx(20, abs=1)
    assert found["seconds"]["productive"] == pytest.approx(12)
    assert sum(found["seconds"].values()) == pytest.approx(found["wall_seconds"], abs=0.01)
    assert run_progress(str(tmp_path / "runs"), "absent")["goodput"] is None


def test_checkpoints_waiting_for_their_upload_hold_the_loop_at_a_bound(tmp_path):
    """Ray takes one report per 2 s: saved faster, copies would pile up on the local disk. The loop
    waits instead, at most MAX_PENDING_UPLOADS copies, and the wait is checkpoint stall."""
    import shutil
    import threading

    import torch

    from workers.models.checkpoint_format import TrainState
    from workers.training.checkpoints import CheckpointManager
    from workers.training.run_store import RunStore

    store = RunStore(str(tmp_path / "run"))
    reported: list[str] = []

    class AsyncUploads:  # what Ray's asynchronous upload does with a report: the folder stays until uploaded
        rank, world_size = 0, 1

        def save_checkpoint(self, directory, name, metrics, async_upload):
            reported.append(directory)

    class Schedule:
        def state_dict(self):
            return {}

    counts, done = [], threading.Event()

    def upload() -> None:  # one folder every 50 ms, oldest first, as Ray's upload thread does
        while not done.is_set() or reported:
            counts.append(store.scratch_count("ckpt"))
            if reported:
                shutil.rmtree(reported.pop(0), ignore_errors=True)
            done.wait(0.05)

    model = torch.nn.Linear(4, 2)
    ledger = Ledger()
    uploader = threading.Thread(target=upload)
    uploader.start()
    try:
        with CheckpointManager(AsyncUploads(), store, TrainState(), model, torch.optim.SGD(model.parameters(), 0.1),
                               Schedule(), attempt=0, all_reduce_sum=lambda v: v, async_upload=True,
                               ledger=ledger) as checkpoints:
            for step in range(1, 13):
                checkpoints.state.global_step = step
                checkpoints.save({"step": step})
                checkpoints.maybe_publish()
                counts.append(store.scratch_count("ckpt"))
            checkpoints.finish()
    finally:
        done.set()
        uploader.join()
    assert len(reported) == 0 and store.scratch_count("ckpt") == 0
    assert max(counts) <= CheckpointManager.MAX_PENDING_UPLOADS + 1, counts  # 12 saved, never 12 on disk
    assert ledger.totals()["checkpoint_stall"] > 0.05 * (12 - CheckpointManager.MAX_PENDING_UPLOADS - 2)
