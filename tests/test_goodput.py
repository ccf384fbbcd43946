"""Goodput: a run's wall time in categories that add up (alexray_core.goodput, workers.training.ledger)."""

from __future__ import annotations

import json
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from alexray_core import goodput as g
from alexray_core.goodput import Failure, LedgerRecord, account
from alexray_core.storage import LocalStorage
from tests.trainingtools import read_json, sharded_digits, write_spec
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


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


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


def _stall(tmp_path, digits, name: str, **sections) -> tuple[float, dict]:
    """Train in this process (no start-up of a new interpreter) and return the checkpoint stall."""
    from workers.training.cli import main as train_main

    spec = write_spec(tmp_path / f"{name}.yaml", str(digits), str(tmp_path / "runs"), run={"name": name},
                      scaling={"num_workers": 1}, **sections)
    assert train_main([str(spec), "--no-ray", "--submitted-at", str(time.time())]) == 0
    summary = read_json(tmp_path / "runs" / name / "summary.json")
    return summary["goodput"]["seconds"]["checkpoint_stall"], summary


def test_checkpoint_stall_counts_only_the_waits_of_the_loop(digits, tmp_path, monkeypatch):
    """Writes that finish behind the steps cost no stall; a write queue the loop must wait on does."""
    monkeypatch.setenv("ALEXRAY_METRICS", "0")
    delay = 1.0
    # a checkpoint every 2 steps of >= 0.8 s: each delayed write is done before the next one starts;
    # only the last (at max_steps, waited for at the end) holds the loop. Had the three before it
    # been counted, the stall would be over 4 s.
    behind, summary = _stall(tmp_path, digits, "behind", train={"max_steps": 8, "epochs": 1, "log_every": 4},
                             checkpoint={"every_steps": 2, "keep": 2},
                             debug={"checkpoint_delay": delay, "step_delay": 0.8})
    assert summary["steps"] == 8
    assert 0.8 * delay <= behind < 2 * delay, summary["goodput"]
    # every step, with steps far shorter than a write. Writes go one at a time, so from the first
    # save to the end the run lasts at least the 7 writes: what the loop did not spend on its own
    # work in that time it spent waiting for them.
    delay = 0.5
    waited, summary = _stall(tmp_path, digits, "waited", train={"max_steps": 7, "epochs": 1, "log_every": 3},
                             checkpoint={"every_steps": 1, "keep": 2}, debug={"checkpoint_delay": delay})
    seconds = summary["goodput"]["seconds"]
    own_work = seconds["productive"] + seconds["data_wait"] + seconds["evaluation"]
    assert waited >= 7 * delay - own_work - 0.2 and waited >= 0.8 * delay, summary["goodput"]
    assert sum(seconds.values()) == pytest.approx(summary["goodput"]["wall_seconds"], abs=0.01)
    assert seconds["productive"] > 0 and seconds["startup"] > 0


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
