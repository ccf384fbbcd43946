"""``DEST/_lease.json``: one ``alexray shard`` run writes a DEST at a time.

Two runs into the same DEST would remove each other's progress records, partial files and
uploads, and race on the manifest. So a run takes the lease before it changes anything and gives
it back at the end; a second run meanwhile is refused, naming the holder. The holder renews the
lease every ``RENEW_SECONDS``. A lease is stale, and taken over, when it has not been renewed for
``STALE_SECONDS`` (a run that died on another machine) or at once when its process is gone from
this machine (a run killed here, so that "run the same command again" resumes without waiting).

Taking, renewing and giving back are atomic steps of the storage (a link on disk, conditional PUTs
on S3), so of two runs starting together exactly one gets the lease. Ray tasks check before each
shard that DEST still holds their run's lease: a run that lost it stops writing, and a DEST that
is not the same directory on every node (a local DEST without a shared file system) is caught
before a shard lands on one node's disk.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass, replace

from alexray_core.processes import alive, start_ticks
from alexray_core.storage import StorageError
from alexray_core.storage.api import Storage

from .errors import ShardError

log = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"
RENEW_SECONDS = 30.0
STALE_SECONDS = 300.0


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: the run's token, its machine and process, and when it last renewed."""

    token: str
    host: str
    boot_id: str
    pid: int
    pid_start: str
    started: float
    renewed: float

    @classmethod
    def of_this_process(cls) -> "Holder":
        now = time.time()
        return cls(secrets.token_hex(16), socket.gethostname(), _boot_id(), os.getpid(), start_ticks(os.getpid()),
                   now, now)

    @classmethod
    def parse(cls, data: bytes) -> "Holder | None":
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode()

    def on_this_machine(self) -> bool:
        return self.host == socket.gethostname() and self.boot_id == _boot_id()

    def is_stale(self, now: float) -> bool:
        if now - self.renewed > STALE_SECONDS:
            return True
        return self.on_this_machine() and not alive(self.pid, self.pid_start)

    def describe(self, now: float) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host}, started {since}, renewed {max(0.0, now - self.renewed):.0f} s ago"


class Lease:
    """This run's hold on DEST; ``acquire`` it, ``check`` it before publishing, ``release`` it."""

    def __init__(self, storage: Storage, holder: Holder):
        self.storage, self.holder = storage, holder
        self.lost: str | None = None  # why the lease is no longer ours, once it is not
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def token(self) -> str:
        return self.holder.token

    @classmethod
    def acquire(cls, storage: Storage) -> "Lease":
        """Take the lease on ``storage`` or raise ShardError naming the run that holds it."""
        where = storage.join(LEASE_NAME)
        for _ in range(5):
            mine = Holder.of_this_process()
            if storage.create_exclusive(LEASE_NAME, mine.to_bytes()):
                return cls(storage, mine)._start()
            current = storage.read_optional(LEASE_NAME)
            if current is None:
                continue  # given back meanwhile: try again
            holder, now = Holder.parse(current), time.time()
            if holder is not None and not holder.is_stale(now):
                raise ShardError(
                    f"DEST {storage.url} is being written by another 'alexray shard' run ({holder.describe(now)}): "
                    f"wait for it to finish or stop it; a dead run's lease is taken over once it is "
                    f"{STALE_SECONDS:.0f} s old, or delete {where} if you are sure that run is gone")
            log.warning("taking over the lease of an interrupted run on %s (%s)", storage.url,
                        holder.describe(now) if holder else "unreadable")
            if storage.take_over(LEASE_NAME, current, mine.to_bytes()):
                return cls(storage, mine)._start()
        raise ShardError(f"could not take the lease on DEST {storage.url}: other runs are starting at the same time; "
                         "run one at a time")

    def _start(self) -> "Lease":
        self._thread = threading.Thread(target=self._renew_loop, name="lease", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            renewed = replace(self.holder, renewed=time.time())
            try:
                if self.storage.swap(LEASE_NAME, self.holder.to_bytes(), renewed.to_bytes()):
                    self.holder = renewed
                    continue
            except StorageError as e:  # storage briefly unreachable: the lease holds for STALE_SECONDS
                log.warning("could not renew the lease on %s: %s", self.storage.url, e)
                continue
            self.lost = describe_loss(self.storage, self.token)
            return

    def check(self) -> None:
        """Raise ShardError if another run has taken DEST over: this run must stop writing."""
        if self.lost:
            raise ShardError(self.lost, 1)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost:
            return
        try:
            self.storage.delete_if(LEASE_NAME, self.holder.to_bytes())
        except StorageError as e:  # it goes stale on its own
            log.warning("could not give back the lease on %s: %s", self.storage.url, e)


def describe_loss(storage: Storage, token: str) -> str | None:
    """None while DEST holds the lease with ``token``, else what went wrong, as a one-line error."""
    current = storage.read_optional(LEASE_NAME)
    if current is None:
        return (f"{storage.join(LEASE_NAME)} of this run is not there (host {socket.gethostname()}): a DEST given with "
                "--shared-fs must be the same directory on every node, or the lease was deleted; use an s3:// DEST "
                "or a file system every node mounts at the same path, then run the same command again")
    holder = Holder.parse(current)
    if holder is None or holder.token != token:
        who = holder.describe(time.time()) if holder else "unreadable lease"
        return (f"DEST {storage.url} was taken over by another 'alexray shard' run ({who}): this run stopped "
                "writing; run one at a time")
    return None


def check_holder(storage: Storage, token: str) -> None:
    """For a task about to write a shard: raise ShardError unless DEST still holds this run's lease."""
    problem = describe_loss(storage, token)
    if problem:
        raise ShardError(problem, 1)
