"""A worker's ledger: its wall time in ``alexray_core.goodput``'s categories, as it goes.

The loop says which category it enters (``enter``, ``charging``, ``timed``); the time since the
last change goes to the category it leaves, so the ledger's seconds always add up to the worker's
wall time. Per step that is two clock reads under an uncontended lock, which also time the step
and its data wait for Prometheus (``timed``'s ``on_step``); the counter Prometheus scrapes is
computed from the ledger at scrape time, on the endpoint's thread.

The ledger is written to ``goodput/ledger-aATTEMPT-rRANK.json`` in the run directory at the
progress lines (at most every ``PERSIST_EVERY_S``), at each checkpoint and at the end: what a
killed worker did after its last record is charged as lost work when the run's account is made.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from typing import Callable

from prometheus_client.core import CounterMetricFamily

from alexray_core import goodput as g
from alexray_core import runs

PERSIST_EVERY_S = 5.0
# A start's milestones, in order (unix times in the ledger's record): the worker process began
# (Ray spawned it), our imports began and ended (Ray unpickles the train function), the train
# function was entered, the model was built and resumed, the first batch arrived, the first step
# ended. With the run's submit and the driver's call of fit (``goodput.SESSION``) they split
# start-up into Ray's share and ours (``bench/startup.py``).
START_PHASES = ("process", "importing", "imported", "started", "built", "first_batch", "first_step")


class Ledger:
    def __init__(self):
        self.started = time.time()
        self._clock = time.perf_counter
        self._since = self._clock()
        self._started_clock = self._since
        self._category = g.STARTUP  # until the first batch of this start
        self.seconds = dict.fromkeys(g.CATEGORIES, 0.0)
        self._lock = threading.Lock()
        self.opening = dict.fromkeys(g.CATEGORIES, 0.0)  # the gap before this start, for the live counter
        self.high_water = 0  # steps up to here were taken by an earlier start: lost work when taken again
        self.waiting_slots = 0  # slots of an elastic run without a worker (counted by rank 0)
        self.store = self.name = None
        self.attempt = self.rank = 0
        self.world = 1
        self.step = 0
        self._persisted = 0.0
        self.phases: dict[str, float] = {"started": self.started}  # unix times of milestones (START_PHASES)

    # ---- where this start stands in the run -----------------------------------------------------

    def begin(self, store, attempt: int, rank: int, world: int, slots: int, submitted: float | None) -> None:
        """Name this start in the run: what came before it sets its first category (start-up,
        recovery or preemption), the steps to count as lost work, and the gap before it."""
        self.store, self.attempt, self.rank, self.world = store, attempt, rank, world
        self.name = g.ledger_name(attempt, rank)
        self.waiting_slots = max(0, slots - world) if rank == 0 else 0
        _, records, failures = g.read_records(store.storage)
        earlier = [r for r in records if r.attempt < attempt]
        self.high_water = g.high_water(earlier, attempt)
        mine = [r for r in earlier if r.rank == rank]
        if attempt == 0 or not earlier:
            if submitted:
                self.opening[g.STARTUP] = max(0.0, self.started - submitted)
            return
        failures.sort(key=lambda f: f.time)
        latest = next((f for f in reversed(failures) if f.time <= self.started), None)
        with self._lock:
            self._category = g.PREEMPTION if latest and latest.preemption else g.RECOVERY
        if mine:
            previous = max(mine, key=lambda r: r.attempt)
            g.gap(self.opening, previous.updated, self.started, failures)

    def mark_start_phases(self, **times: float) -> None:
        """Record milestones of this start (``START_PHASES``); the first reading of each is kept."""
        for name, at in times.items():
            assert name in START_PHASES, name
            self.phases.setdefault(name, at)

    # ---- the loop's calls ---------------------------------------------------------------------------

    def enter(self, category: str) -> float:
        """Charge the time since the last change to the category left; returns the clock reading."""
        with self._lock:
            now = self._clock()
            self.seconds[self._category] += now - self._since
            self._category, self._since = category, now
        return now

    @contextmanager
    def charging(self, category: str):
        """The block's time to ``category``, then back to what the loop was doing."""
        previous = self._category
        self.enter(category)
        try:
            yield
        finally:
            self.enter(previous)

    def wait_for_data(self) -> None:
        """An epoch begins: what follows waits for data, unless this start has had no batch yet."""
        if self._category not in (g.STARTUP, g.RECOVERY, g.PREEMPTION):
            self.enter(g.DATA_WAIT)

    def timed(self, batches, step: int, on_step: Callable[[float, float], None] | None = None):
        """Yield the batches, charging the wait for each to data wait (the first one to this
        start's first category) and the step that follows to productive or lost work; ``step`` is
        the global step the first batch will be.

        ``on_step(seconds, waited)``, after each step: its wall time, the wait for its batch
        included, and that wait, from the clock readings the ledger charged (the Prometheus step
        and data-wait series: ``WorkerMetrics.observe_step``). The wait for the end of the data is
        charged here but reported to no step."""
        iterator = iter(batches)
        first = self._category in (g.STARTUP, g.RECOVERY, g.PREEMPTION)
        begin = self._clock() if first else self.enter(g.DATA_WAIT)
        try:
            while True:
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                step += 1
                self.step = step
                got = self.enter(g.LOST_WORK if step <= self.high_water else g.PRODUCTIVE)
                if first:
                    self.mark_start_phases(first_batch=time.time())
                yield batch
                end = self.enter(g.DATA_WAIT)
                if first:
                    self.mark_start_phases(first_step=time.time())
                    first = False
                if on_step is not None:
                    on_step(end - begin, got - begin)
                begin = end
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    # ---- reading it -------------------------------------------------------------------------------

    def totals(self) -> dict:
        """Seconds per category from this worker's start to now."""
        with self._lock:
            seconds = dict(self.seconds)
            seconds[self._category] += self._clock() - self._since
        return seconds

    def elapsed(self) -> float:
        return self._clock() - self._started_clock

    def record(self) -> dict:
        return {"attempt": self.attempt, "rank": self.rank, "world": self.world, "started": self.started,
                "step": self.step, "seconds": self.totals(), "phases": dict(self.phases)}

    def persist(self, force: bool = False) -> None:
        """Write the ledger to the run directory: at most every PERSIST_EVERY_S unless ``force``."""
        if self.store is None:
            return
        now = self._clock()
        if force or now - self._persisted >= PERSIST_EVERY_S:
            self._persisted = now
            self.store.write_json(self.name, self.record())


class LedgerCollector:
    """``alexray_run_seconds_total{category}``: the ledger, the gap before this start, and (rank 0)
    the slots of an elastic run without a worker."""

    def __init__(self, ledger: Ledger, labels: dict):
        self.ledger, self.names, self.values = ledger, list(labels), list(labels.values())

    def describe(self):
        yield CounterMetricFamily("alexray_run_seconds", "", labels=self.names + ["category"])

    def collect(self):
        ledger = self.ledger
        seconds = ledger.totals()
        for category, value in ledger.opening.items():
            seconds[category] += value
        seconds[g.WAITING] += ledger.waiting_slots * ledger.elapsed()
        family = CounterMetricFamily(
            "alexray_run_seconds", "Wall time of this worker's slot by category (alexray_core.goodput; "
            "summed over a run's workers: slots x wall time)", labels=self.names + ["category"])
        for category in g.CATEGORIES:
            family.add_metric(self.values + [category], seconds[category])
        yield family


# ---- the run's account, kept by the driver --------------------------------------------------------

def open_account(run_dir: str, submitted: float, slots: int) -> None:
    """Record when the run was submitted and its slots: ``alexray status`` accounts a live run from it.
    Called just before the driver hands the run to Ray Train (``fit_called``: a start-up milestone)."""
    from alexray_core.storage import open_storage

    session = {"submitted": submitted, "slots": slots, "fit_called": time.time()}
    open_storage(run_dir).write_bytes(g.SESSION, json.dumps(session).encode())


def mark_session(run_dir: str, **times: float) -> None:
    """Add the driver's milestones (``fit_returned``: Ray Train handed the run back) to the session record."""
    from alexray_core.storage import open_storage

    storage = open_storage(run_dir)
    session = json.loads(storage.read_optional(g.SESSION) or b"{}")
    storage.write_bytes(g.SESSION, json.dumps({**session, **times}).encode())


def close_account(run_dir: str, submitted: float, summary: dict | None = None) -> dict:
    """The run's account from its submit to now, added to ``summary.json`` as ``goodput``."""
    from workers.training.run_store import RunStore

    store = RunStore(run_dir)
    summary = dict(summary or store.summary() or {})
    if summary:
        summary["goodput"] = g.account_of(store.storage, time.time(), submitted)
        store.write_json(runs.SUMMARY, summary)
    return summary
