"""A local Prometheus (Debian's ``prometheus`` binary) with alexray's configuration, and a small
client for its HTTP API. No torch, no Ray.

``start_prometheus(workdir)`` renders ``cluster/prometheus/prometheus.yml`` with absolute paths
(the targets directory, Ray's service-discovery file, the rule files), optionally faster scrape and
evaluation intervals, starts Prometheus on 127.0.0.1 and a free port, waits until it is ready and
returns a handle with ``url`` and ``stop()``. Errors are ``PrometheusError`` with one line naming
the problem and the fix.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from alexray_core import discovery
from alexray_core.errors import AlexrayError
from alexray_core.localcluster import free_port, interrupts_deferred

DEFAULT_URL = "http://127.0.0.1:9090"
URL_ENV = "ALEXRAY_PROMETHEUS_URL"
RAY_SD_FILE = "/tmp/ray/prom_metrics_service_discovery.json"


class PrometheusError(AlexrayError):
    """A problem the user can fix; the message names it and the fix, on one line."""


def resolve_url(url: str | None = None) -> str:
    url = (url or os.environ.get(URL_ENV, "").strip() or DEFAULT_URL).rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PrometheusError(f"--prometheus: {url!r} is not an http(s)://HOST:PORT address of Prometheus")
    return url


class Prometheus:
    """Queries over Prometheus's HTTP API (``/api/v1/...``); results as plain lists and dicts."""

    def __init__(self, url: str | None = None, timeout: float = 5.0):
        self.url, self.timeout = resolve_url(url), timeout

    def _get(self, path: str, params: dict | list) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        request = f"{self.url}{path}?{query}"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as e:
            try:
                body = json.loads(e.read())
            except ValueError:
                raise PrometheusError(f"{self.url} answered HTTP {e.code} to {path}: is it Prometheus? "
                                      "pass its address with --prometheus") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise PrometheusError(f"cannot reach Prometheus at {self.url} ({reason}): start one with "
                                  "'alexray dashboard --start-prometheus' or pass --prometheus URL") from None
        if body.get("status") != "success":
            raise PrometheusError(f"Prometheus refused the query ({body.get('errorType')}: {body.get('error')})")
        return body["data"]

    def check(self) -> None:
        """Raise PrometheusError unless Prometheus answers."""
        self._get("/api/v1/query", {"query": "1"})

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self._get("/api/v1/query", params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self._get("/api/v1/query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                                 "step": f"{max(step, 0.001):g}"})["result"]

    def series(self, match: str, start: float | None = None) -> list[dict]:
        params = {"match[]": match}
        if start is not None:
            params["start"] = f"{start:.3f}"
        return self._get("/api/v1/series", params)

    def label_values(self, label: str, match: str | None = None) -> list[str]:
        return self._get(f"/api/v1/label/{label}/values", {"match[]": match} if match else {})

    def alerts(self) -> list[dict]:
        return self._get("/api/v1/alerts", {})["alerts"]

    def targets(self) -> dict:
        return self._get("/api/v1/targets", {})

    def scalar_by(self, expr: str, label: str) -> dict[str, float]:
        """``{label value: number}`` of an instant vector (NaN dropped)."""
        out = {}
        for item in self.query(expr):
            value = float(item["value"][1])
            if not math.isnan(value):
                out[item["metric"].get(label, "")] = value
        return out


# --- a local Prometheus ------------------------------------------------------------------------

def _config_dir() -> Path:
    # Package data of ``cluster`` (pyproject.toml), so found in a checkout and in an installed wheel
    # alike. Wheels install as plain files: a real folder, whose rule files Prometheus reads by path.
    return Path(resources.files("cluster") / "prometheus")


def render_config(targets_dir: str | Path | None = None, ray_sd_file: str | None = RAY_SD_FILE,
                  scrape_interval: str | None = None, evaluation_interval: str | None = None) -> dict:
    """cluster/prometheus/prometheus.yml with absolute paths and, optionally, other intervals."""
    config_dir = _config_dir()
    config = yaml.safe_load((config_dir / "prometheus.yml").read_text())
    targets = str(Path(targets_dir or discovery.targets_dir()).resolve())
    config["rule_files"] = [str((config_dir / f).resolve()) for f in config.get("rule_files", [])]
    if scrape_interval:
        config["global"]["scrape_interval"] = scrape_interval
    if evaluation_interval:
        config["global"]["evaluation_interval"] = evaluation_interval
    jobs = []
    for job in config["scrape_configs"]:
        if job["job_name"] == "alexray":
            job["file_sd_configs"] = [{"files": [f"{targets}/*.json"], "refresh_interval": "5s"}]
            if scrape_interval:
                job["scrape_interval"] = scrape_interval
        elif job["job_name"] == "ray":
            if not ray_sd_file:
                continue
            job["file_sd_configs"][0]["files"] = [ray_sd_file]
        jobs.append(job)
    config["scrape_configs"] = jobs
    return config


@dataclass
class LocalPrometheus:
    url: str
    process: subprocess.Popen
    workdir: Path
    config_path: Path
    log_path: Path

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(ProcessLookupError):
                # A stopped process (Ctrl-Z, a debugger) acts on the TERM only once it runs again.
                self.process.send_signal(signal.SIGCONT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> "LocalPrometheus":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if not found:
        raise PrometheusError("prometheus is not installed: run 'sudo apt-get install prometheus' (Debian/Ubuntu) "
                              "or 'make system-deps', or pass --prometheus URL of a running one")
    return found


def start_prometheus(workdir: str | Path, port: int | None = None, targets_dir: str | Path | None = None,
                     ray_sd_file: str | None = RAY_SD_FILE, scrape_interval: str | None = None,
                     evaluation_interval: str | None = None, retention: str = "2d",
                     timeout: float = 60.0) -> LocalPrometheus:
    """Start Prometheus with alexray's scrape config and rules; its data lives in ``workdir``."""
    binary = prometheus_binary()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        targets = discovery.ensure_targets_dir(targets_dir)
    except discovery.TargetsDirError as e:
        raise PrometheusError(str(e)) from None
    discovery.prune_dead_local_targets(targets)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(render_config(targets, ray_sd_file, scrape_interval, evaluation_interval),
                                          sort_keys=False))
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "prometheus.log"
    handle = None
    try:
        with interrupts_deferred(), open(log_path, "ab") as log_file:  # no Ctrl-C between start and handle
            process = subprocess.Popen(
                [binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--storage.tsdb.retention.time={retention}", f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            handle = LocalPrometheus(url, process, workdir, config_path, log_path)
        _wait_until_ready(handle, time.monotonic() + timeout, timeout)
    except BaseException:
        # Ctrl-C or a failure while it starts: it runs in a session of its own (so that the
        # terminal's Ctrl-C does not reach it) and would outlive this process unless stopped here.
        if handle is not None:
            with interrupts_deferred():
                handle.stop()
        raise
    return handle


def _wait_until_ready(handle: LocalPrometheus, deadline: float, timeout: float) -> None:
    while True:
        if handle.process.poll() is not None:
            last = (handle.log_tail(5).splitlines() or ["no output"])[-1]
            raise PrometheusError(f"prometheus exited at start ({last[:300]}); see {handle.log_path}")
        try:
            with urllib.request.urlopen(f"{handle.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise PrometheusError(f"prometheus did not become ready within {timeout:.0f} s; see {handle.log_path}")
        time.sleep(0.2)
