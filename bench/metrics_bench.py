"""Metrics benchmark (issue: metrics and dashboards).

Training throughput with the Prometheus endpoint on, scraped every second by a real Prometheus
(five times alexray's configured rate, fifteen times Prometheus's default), against
``ALEXRAY_METRICS=0``: the same spec, one process, runs interleaved, medians compared.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT, record
from bench.train_bench import STEPS, _digits_shards, _spec

PAIRS = 7


def _train_seconds(spec: Path, name: str, metrics_on: bool, targets: Path) -> float:
    env = {**os.environ, "ALEXRAY_METRICS": "1" if metrics_on else "0", "ALEXRAY_PROMETHEUS_TARGETS_DIR": str(targets)}
    subprocess.run([sys.executable, "-m", "workers", "train", str(spec), "--set", f"run.name={name}"],
                   check=True, capture_output=True, cwd=ROOT, env=env)
    return json.loads((spec.parent / "runs" / name / "summary.json").read_text())["wall_seconds"]


def _per_step_microseconds(steps: int = 100_000) -> float:
    """What the loop pays per step for metrics: ``timed`` around the batch plus ``trained``."""
    import time

    from workers.metrics import WorkerMetrics

    metrics = WorkerMetrics("bench", 0, "127.0.0.1")
    started = time.perf_counter()
    for step in metrics.timed(range(steps)):
        metrics.trained(128, 2.3, 0.01, 0, step)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    for step in range(steps):  # the bare loop, subtracted
        pass
    return (seconds - (time.perf_counter() - started)) / steps * 1e6


def run(results: list) -> None:
    from orchestrator.prometheus import Prometheus, start_prometheus

    data = _digits_shards()
    with tempfile.TemporaryDirectory(prefix="alexray-bench-metrics-") as tmp:
        tmp = Path(tmp)
        targets = tmp / "targets"
        spec = _spec(tmp, data, "metrics", 0)
        print(f"metrics benchmark: narrow AlexNet (width 0.25) on digits at 64 px, batch 128, {STEPS} steps, "
              "Prometheus scraping every second")
        with start_prometheus(tmp / "prometheus", targets_dir=targets, ray_sd_file=None, scrape_interval="1s",
                              evaluation_interval="1s") as prom:
            times: dict[bool, list[float]] = {True: [], False: []}
            for attempt in range(PAIRS):
                for on in (True, False) if attempt % 2 == 0 else (False, True):
                    times[on].append(_train_seconds(spec, f"r{attempt}-{'on' if on else 'off'}", on, targets))
            scraped = Prometheus(prom.url).query('count(count_over_time(alexray_train_images_total[1h])) by (run)')
        on, off = statistics.median(times[True]), statistics.median(times[False])
        with record(results, "training throughput with metrics on (scraped every 1 s) vs off", ">= 0.98") as r:
            r.update(metrics_on_s=round(on, 2), metrics_off_s=round(off, 2), ratio=round(off / on, 3),
                     runs_scraped=len(scraped), on_runs=[round(t, 2) for t in times[True]],
                     off_runs=[round(t, 2) for t in times[False]])
        with record(results, "metrics calls per training step (information)", "-") as r:
            r.update(microseconds=round(_per_step_microseconds(), 1), step_ms=round(on / STEPS * 1000, 1))
        if len(scraped) != PAIRS:  # the "on" runs must really have been scraped, the "off" runs never
            raise AssertionError(f"Prometheus scraped {len(scraped)} runs, expected the {PAIRS} with metrics on")
