"""Where a run's wall time went: every second of every worker slot in exactly one category.

A run of up to N workers (``scaling.num_workers``, the maximum of an elastic range) has N *slots*;
its account covers each slot from the run's submit to its end, so the categories sum to N times
the wall time. Definitions (also in the README, "Goodput"):

- ``productive``: training steps, from the batch in hand to the next wait for data, the first time
  the run takes that step;
- ``data_wait``: waiting for the next batch (not the first of a start: that is start-up);
- ``checkpoint_stall``: the part of a checkpoint the training loop waits for (the snapshot, a
  full write queue, a publish, the last write at the end); writes going on behind the steps are not;
- ``evaluation``: the end-of-epoch validation and keeping the best model;
- ``startup``: from the submit to each slot's first batch (scheduling, cluster and worker-group
  start, building the model, the first batch), and the shut-down after a slot's last record;
- ``lost_work``: work a failure threw away: steps taken again after a restart (up to the furthest
  step an earlier start reached), and the part of a failed start after its last record, up to the
  moment the failure was noticed;
- ``recovery``: from a failure (or the restart of an elastic resize) to the first batch after it;
- ``preemption``: the same, when the failure was a preempted node;
- ``waiting_for_resources``: slots an elastic run holds no worker in (below its maximum, or a slot
  whose worker joins later).

Each worker keeps a ``Ledger`` (``workers.training.ledger``) of its own seconds and writes it to the run
directory as it goes; Ray Train's controller writes each failure it handles. ``account`` puts them
together with the run's submit and end times, filling the gaps between the workers' records.
This module imports nothing beyond the standard library.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

CATEGORIES = ("productive", "data_wait", "checkpoint_stall", "evaluation", "startup", "lost_work", "recovery",
              "preemption", "waiting_for_resources")
PRODUCTIVE, DATA_WAIT, CHECKPOINT_STALL, EVALUATION, STARTUP, LOST_WORK, RECOVERY, PREEMPTION, WAITING = CATEGORIES

PREFIX = "goodput/"  # in the run directory
SESSION = PREFIX + "session.json"  # {submitted, slots}: written by the driver as the run starts


def ledger_name(attempt: int, rank: int) -> str:
    return f"{PREFIX}ledger-a{attempt:04d}-r{rank:04d}.json"


def failure_name(when: float) -> str:
    return f"{PREFIX}failure-{int(when * 1e6):016d}.json"


@dataclass
class LedgerRecord:
    """What a worker wrote of its ledger: ``seconds`` cover [started, started + their sum]."""

    attempt: int
    rank: int
    world: int
    started: float  # unix time the worker began its ledger
    step: int  # the furthest global step this worker had taken when it wrote
    seconds: dict = field(default_factory=dict)

    @property
    def updated(self) -> float:
        return self.started + sum(self.seconds.values())

    @classmethod
    def from_dict(cls, data: dict) -> LedgerRecord:
        return cls(int(data["attempt"]), int(data["rank"]), int(data["world"]), float(data["started"]),
                   int(data["step"]), {c: float(data["seconds"].get(c, 0.0)) for c in CATEGORIES})


@dataclass
class Failure:
    """A failure Ray Train's controller handled: when it noticed it, and whether a preemption."""

    time: float
    preemption: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> Failure:
        return cls(float(data["time"]), bool(data.get("preemption")))


def gap(totals: dict, begin: float, end: float, failures: list[Failure]) -> None:
    """Charge [begin, end] between a worker's last record and the next start of its slot: up to the
    failure noticed in it, lost work; after it, recovery or preemption (recovery without one: an
    elastic resize restarted the group)."""
    if end <= begin:
        return
    failure = next((f for f in failures if begin <= f.time <= end), None)
    if failure is None:  # noticed before the record was written (a rank that outlived the failure)
        failure = next((f for f in reversed(failures) if f.time < begin), None)
        totals[PREEMPTION if failure and failure.preemption else RECOVERY] += end - begin
        return
    totals[LOST_WORK] += failure.time - begin
    totals[PREEMPTION if failure.preemption else RECOVERY] += end - failure.time


def account(submitted: float, ended: float, slots: int, ledgers: list[LedgerRecord],
            failures: list[Failure]) -> dict:
    """Seconds per category, summed over ``slots``: they add up to ``slots * (ended - submitted)``.

    Records outside [submitted, ended] (an earlier session of a resumed run) are left out."""
    totals = dict.fromkeys(CATEGORIES, 0.0)
    failures = sorted(failures, key=lambda f: f.time)
    ledgers = [l for l in ledgers if submitted <= l.started < ended and l.rank < slots]
    if not ledgers:
        totals[STARTUP] = slots * max(0.0, ended - submitted)
        return totals
    first_attempt, last_attempt = min(l.attempt for l in ledgers), max(l.attempt for l in ledgers)
    group_start = min(l.started for l in ledgers)
    by_slot = defaultdict(list)
    for record in ledgers:
        by_slot[record.rank].append(record)
    for slot in range(slots):
        records = sorted(by_slot[slot], key=lambda l: l.started)
        cursor, previous = submitted, None
        for record in records:
            start = max(record.started, cursor)
            if previous is None:  # before the slot's first worker: start-up (then waiting, for a slot that joined later)
                first_start = start if record.attempt == first_attempt else min(max(group_start, cursor), start)
                totals[STARTUP] += first_start - cursor
                totals[WAITING] += start - first_start
            else:
                # attempts in between that ran without this slot (an elastic run shrunk): it waited
                between = [l.started for l in ledgers if previous.attempt < l.attempt < record.attempt]
                shrunk = min(max(min(between), cursor), start) if between else start
                gap(totals, cursor, shrunk, failures)
                totals[WAITING] += start - shrunk
            span = min(record.updated, ended) - start
            scale = span / max(1e-12, sum(record.seconds.values()))  # clipped at the run's end: rare
            for category, seconds in record.seconds.items():
                totals[category] += seconds * min(1.0, scale)
            cursor, previous = start + max(0.0, span), record
        if previous is None:
            totals[WAITING] += ended - cursor  # no worker ever ran in this slot
        elif previous.attempt == last_attempt:
            totals[STARTUP] += ended - cursor  # the shut-down after the last record
        else:  # the group restarted without this slot: the failure's share, then waiting for a worker
            failure = next((f for f in failures if cursor <= f.time <= ended), None)
            if failure is not None:
                totals[LOST_WORK] += failure.time - cursor
                cursor = failure.time
            totals[WAITING] += ended - cursor
    return totals


def high_water(ledgers: list[LedgerRecord], before_attempt: int) -> int:
    """The furthest global step an earlier start reached: steps up to it are taken again."""
    return max((l.step for l in ledgers if l.attempt < before_attempt), default=0)


def summarise(seconds: dict, slots: int, wall: float) -> dict:
    """The ``goodput`` block of ``summary.json`` and ``alexray status``."""
    total = sum(seconds.values())
    return {"wall_seconds": round(wall, 3), "slots": slots, "seconds": {c: round(seconds[c], 3) for c in CATEGORIES},
            "fractions": {c: round(seconds[c] / total, 4) if total else 0.0 for c in CATEGORIES},
            "goodput": round(seconds[PRODUCTIVE] / total, 4) if total else 0.0}


def account_of(storage, ended: float, submitted: float | None = None, stale_after: float | None = None) -> dict | None:
    """The ``goodput`` block of the run whose directory is ``storage``, from its submit (``submitted``,
    else its session record) to ``ended``; None when neither is known. ``stale_after``: when no
    ledger was written for that long, the account ends at the newest one (a run that stopped)."""
    session, ledgers, failures = read_records(storage)
    if submitted is None:
        if session is None:
            return None
        submitted = float(session["submitted"])
    slots = int((session or {}).get("slots", 1))
    newest = max((record.updated for record in ledgers), default=ended)
    if stale_after is not None and ended - newest > stale_after:
        ended = newest
    return summarise(account(submitted, ended, slots, ledgers, failures), slots, ended - submitted)


def process_start_time() -> float:
    """Unix time this process started (Linux), else now: a run's submit, however long imports took."""
    import os
    import time

    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def read_records(storage) -> tuple[dict | None, list[LedgerRecord], list[Failure]]:
    """(session, ledgers, failures) from a run directory's storage (``alexray_core.storage.local``-like)."""
    import json

    session, ledgers, failures = None, [], []
    for obj in storage.list(PREFIX):
        name = obj.name
        try:
            data = json.loads(storage.read_optional(name) or b"null")
        except ValueError:
            continue  # being replaced: the next look sees it
        if not isinstance(data, dict):
            continue
        try:
            if name == SESSION:
                session = data
            elif name.startswith(PREFIX + "ledger-"):
                ledgers.append(LedgerRecord.from_dict(data))
            elif name.startswith(PREFIX + "failure-"):
                failures.append(Failure.from_dict(data))
        except (KeyError, TypeError, ValueError):
            continue
    return session, ledgers, failures
