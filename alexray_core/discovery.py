"""How Prometheus finds every alexray metrics endpoint without anyone editing its configuration.

Every training worker (and ``alexray shard --metrics-port``) serves ``/metrics`` on a port the OS
picks, on its node's address. Prometheus reads the endpoints from **file_sd** files in one
directory, the *targets directory* (``ALEXRAY_PROMETHEUS_TARGETS_DIR``, default
``/tmp/alexray-UID/prometheus-targets``), which Prometheus watches and re-reads by itself.
The default is per user and created 0700: whoever can write there chooses what Prometheus scrapes,
and whoever can read it learns every worker's address. A directory owned by another user (root
aside) is refused with a one-line error.

- On a Ray cluster each worker registers ``{address, run, rank, node}`` in the cluster's GCS
  key-value store (namespace ``alexray_metrics``, key ``RUN/RANK``): the store every node can
  reach, the same mechanism Ray uses for its own dashboard and autoscaler metrics addresses. The
  job's driver runs a ``TargetPublisher`` thread that mirrors its run's keys into
  ``TARGETS_DIR/RUN.json`` once a second, and removes the file and the keys when the run ends. So
  Prometheus runs where the driver runs: the head node for jobs sent with ``alexray submit``.
- A process without Ray (``python -m workers train``, ``alexray shard``) writes its own
  ``TARGETS_DIR/local-NAME-PID.json``; files of processes that died are pruned.

Each target carries the labels ``run``, ``rank``, ``node`` and ``instance=RUN/RANK``: a restarted
worker comes back on a new port but as the same series, so counters and rates continue across
restarts. This module imports neither torch nor, until a function needs it, Ray.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
import stat
import threading
import time
from pathlib import Path

from alexray_core.errors import AlexrayError
from alexray_core.processes import alive

log = logging.getLogger("alexray.metrics")

TARGETS_ENV = "ALEXRAY_PROMETHEUS_TARGETS_DIR"
DEFAULT_TARGETS_DIR = f"/tmp/alexray-{os.getuid()}/prometheus-targets"
ENABLE_ENV = "ALEXRAY_METRICS"  # "0" turns every alexray metrics endpoint off
KV_NAMESPACE = "alexray_metrics"
_LOCAL = re.compile(r"^local-.*-(\d+)\.json$")


class TargetsDirError(AlexrayError):
    """The targets directory is not safe to use; the message names it and the fix, on one line."""


def targets_dir() -> Path:
    return Path(os.environ.get(TARGETS_ENV, "").strip() or DEFAULT_TARGETS_DIR)


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _check_owned(directory: Path, private: bool) -> None:
    """Refuse a directory another user (root aside) owns; a ``private`` one must be a real
    directory of this user, and is made 0700 if it is wider."""
    try:
        st = directory.lstat() if private else directory.stat()
    except OSError as e:
        raise TargetsDirError(f"cannot use {directory} for Prometheus targets ({e.strerror}); set {TARGETS_ENV} "
                              "to a directory of your own") from None
    uid = os.getuid()
    if private and (stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode)):
        raise TargetsDirError(f"{directory} is not a directory but a link or a file; remove it or set {TARGETS_ENV} "
                              "to a directory of your own")
    if st.st_uid not in (uid, 0) or (private and st.st_uid != uid):
        raise TargetsDirError(f"{directory} belongs to {_owner(st.st_uid)}, not to you: whoever owns it chooses what "
                              f"Prometheus scrapes; remove it or set {TARGETS_ENV} to a directory of your own")
    if private and st.st_mode & 0o077:
        os.chmod(directory, 0o700)


def ensure_targets_dir(directory: str | Path | None = None) -> Path:
    """The targets directory, created 0700 when missing, checked to belong to this user.

    The default's per-user parent (``/tmp/alexray-UID``) sits in a directory everyone can write, so
    it must be a real directory of this user, not a link another user planted.
    """
    directory = Path(directory or targets_dir())
    chain = [directory.parent, directory] if str(directory) == DEFAULT_TARGETS_DIR else [directory]
    for level in chain:
        try:
            level.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise TargetsDirError(f"cannot create {level} for Prometheus targets ({e.strerror}); set {TARGETS_ENV} "
                                  "to a writable directory of your own") from None
        _check_owned(level, private=len(chain) == 2)
    return directory


def metrics_enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def safe_name(name: str) -> str:
    """A file-name-safe form of a run name (run names are already restricted; shard runs are not)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:120] or "run"


def target_entry(address: str, labels: dict) -> dict:
    return {"targets": [address], "labels": {k: str(v) for k, v in labels.items()}}


def write_targets(path: Path, entries: list[dict]) -> None:
    """Atomically: Prometheus re-reads the file on change and must never see half of it."""
    ensure_targets_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
    os.replace(tmp, path)


def prune_dead_local_targets(directory: Path | None = None) -> list[Path]:
    """Remove ``local-*-PID.json`` files whose process is gone (killed before it could clean up)."""
    directory = directory or targets_dir()
    removed = []
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        match = _LOCAL.match(path.name)
        if match and not alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class LocalTarget:
    """A target file for one process without Ray; removed by ``remove()`` or at exit."""

    def __init__(self, name: str, address: str, labels: dict):
        self.path = targets_dir() / f"local-{safe_name(name)}-{os.getpid()}.json"
        try:
            prune_dead_local_targets(self.path.parent)
            write_targets(self.path, [target_entry(address, labels)])
        except TargetsDirError as e:
            log.warning("metrics: %s", e)
        except OSError as e:
            log.warning("metrics: cannot write %s (%s); set %s to a writable directory", self.path, e, TARGETS_ENV)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class MetricsEndpoint:
    """A metrics registry served on ``host:port`` (0: a free port), optionally announced to
    Prometheus as a local target; ``close()`` undoes both."""

    def __init__(self, registry, host: str, port: int = 0):
        from prometheus_client import start_http_server

        self._server, _ = start_http_server(port, addr=host, registry=registry)
        port = self._server.server_port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.target: LocalTarget | None = None

    def announce(self, name: str, labels: dict) -> LocalTarget:
        """Write this endpoint's target file (processes without Ray)."""
        self.target = LocalTarget(name, self.address, labels)
        return self.target

    def close(self) -> None:
        if self.target is not None:
            self.target.remove()
            self.target = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# --- Ray: workers register in the GCS, the driver writes the file ----------------------------

def register_ray_target(run: str, rank: int, world_size: int, address: str, labels: dict) -> None:
    """Called by each training worker; overwrites the entry of the worker it replaces."""
    from ray.experimental.internal_kv import _internal_kv_put

    value = {"address": address, "labels": labels, "world_size": world_size, "started": time.time()}
    _internal_kv_put(f"{run}/{rank}", json.dumps(value), overwrite=True, namespace=KV_NAMESPACE)


def ray_targets(run: str) -> list[dict]:
    """file_sd entries for a run's registered workers, newest worker group only."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    found = []
    for key in _internal_kv_list(f"{run}/", namespace=KV_NAMESPACE):
        raw = _internal_kv_get(key, namespace=KV_NAMESPACE)
        if raw:
            found.append(json.loads(raw))
    if not found:
        return []
    # An elastic restart with fewer workers leaves the higher ranks' entries behind: drop them.
    world = max(found, key=lambda v: v["started"])["world_size"]
    entries = [target_entry(v["address"], v["labels"]) for v in found if int(v["labels"]["rank"]) < world]
    return sorted(entries, key=lambda e: int(e["labels"]["rank"]))


def forget_ray_targets(run: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(f"{run}/", del_by_prefix=True, namespace=KV_NAMESPACE)


class TargetPublisher:
    """Driver side: keep ``TARGETS_DIR/RUN.json`` equal to the run's registered workers.

    Use as a context manager around the trainer's ``fit()``. Failures to reach the store or to
    write the file are logged once and never stop the job.
    """

    def __init__(self, run: str, interval: float = 1.0):
        self.run, self.interval = run, interval
        self.path = targets_dir() / f"{safe_name(run)}.json"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="alexray-metrics-targets", daemon=True)
        self._last: str | None = None
        self._warned = False

    def __enter__(self) -> "TargetPublisher":
        if metrics_enabled():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def publish_once(self) -> None:
        entries = ray_targets(self.run)
        text = json.dumps(entries, sort_keys=True)
        if text != self._last:
            write_targets(self.path, entries)
            self._last = text

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.publish_once()
            except Exception as e:  # noqa: BLE001 - monitoring must never fail the job
                if not self._warned:
                    log.warning("metrics: cannot publish Prometheus targets to %s (%s); set %s to a writable "
                                "directory", self.path, e, TARGETS_ENV)
                    self._warned = True
            self._stop.wait(self.interval)

    def close(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(timeout=10)
        if self._thread.ident is not None:
            self.path.unlink(missing_ok=True)
            try:
                forget_ray_targets(self.run)
            except Exception:  # noqa: BLE001 - the cluster may already be going away
                pass
