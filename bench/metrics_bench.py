"""Metrics benchmark (issue: metrics and dashboards).

Training throughput with the Prometheus endpoint on, scraped by a real Prometheus at alexray's
configured rate (every 5 s) and at five times it (every second), against ``ALEXRAY_METRICS=0``:
the same spec, one process, runs interleaved, medians compared. Each run also records the CPU
seconds of the training process and of Prometheus, which shares the same cores here: that is
where a difference between on and off comes from, and what a cluster would not pay on the
training nodes.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, record
from bench.train_bench import STEPS, _digits_shards, _spec

PAIRS = 7
# alexray's configured scrape rate (cluster/prometheus/prometheus.yml, job alexray) is the bar;
# five times it shows what a faster scrape costs on these two cores.
RATES = (("5s", ">= 0.98"), ("1s", "-"))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _train(spec: Path, name: str, metrics_on: bool, targets: Path) -> tuple[float, float]:
    """(wall seconds of the run, CPU seconds of the training process)."""
    env = {**os.environ, "ALEXRAY_METRICS": "1" if metrics_on else "0", "ALEXRAY_PROMETHEUS_TARGETS_DIR": str(targets)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "workers", "train", str(spec), "--set", f"run.name={name}"],
                   check=True, capture_output=True, cwd=ROOT, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return json.loads((spec.parent / "runs" / name / "summary.json").read_text())["wall_seconds"], cpu


def _per_step_microseconds(steps: int = 100_000) -> dict:
    """What the loop pays per step: the goodput ledger (on with metrics on or off), and the metrics
    calls (``observe_step`` with the ledger's readings, plus ``trained``) on top of it."""
    from workers.training.ledger import Ledger
    from workers.training.metrics import WorkerMetrics

    def loop(wrap) -> float:
        started = time.perf_counter()
        for step in wrap(range(steps)):
            pass
        return time.perf_counter() - started

    bare = loop(lambda batches: batches)
    ledger = loop(lambda batches: Ledger().timed(batches, 0))
    metrics = WorkerMetrics("bench", 0, "127.0.0.1", ledger=Ledger())
    started = time.perf_counter()
    for step in Ledger().timed(range(steps), 0, metrics.observe_step):
        metrics.trained(128, 2.3, 0.01, 0, step)
    both = time.perf_counter() - started
    return {"ledger": round((ledger - bare) / steps * 1e6, 2), "metrics": round((both - ledger) / steps * 1e6, 2)}


def _scrape_milliseconds(repeat: int = 200) -> float:
    """Rendering one scrape of a worker's series, the goodput counter included."""
    from prometheus_client import generate_latest

    from workers.training.ledger import Ledger
    from workers.training.metrics import WorkerMetrics

    metrics = WorkerMetrics("bench", 0, "127.0.0.1", ledger=Ledger(), flops_per_sample=1e9)
    started = time.perf_counter()
    for _ in range(repeat):
        generate_latest(metrics.registry)
    return (time.perf_counter() - started) / repeat * 1000


def run(results: list) -> None:
    from orchestrator.prometheus import Prometheus, start_prometheus

    data = _digits_shards()
    for rate, goal in RATES:
        with tempfile.TemporaryDirectory(prefix="alexray-bench-metrics-") as tmp:
            tmp = Path(tmp)
            targets = tmp / "targets"
            spec = _spec(tmp, data, "metrics", 0)
            print(f"metrics benchmark: narrow AlexNet (width 0.25) on digits at 64 px, batch 128, {STEPS} steps, "
                  f"Prometheus scraping and evaluating its rules every {rate}")
            with start_prometheus(tmp / "prometheus", targets_dir=targets, ray_sd_file=None, scrape_interval=rate,
                                  evaluation_interval=rate) as prom:
                runs: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
                for attempt in range(PAIRS):
                    for on in (True, False) if attempt % 2 == 0 else (False, True):
                        prom_before = _cpu_seconds(prom.process.pid)
                        wall, cpu = _train(spec, f"r{attempt}-{'on' if on else 'off'}", on, targets)
                        runs[on].append((wall, cpu, _cpu_seconds(prom.process.pid) - prom_before))
                scraped = Prometheus(prom.url).query('count(count_over_time(alexray_train_images_total[1h])) by (run)')
            if len(scraped) != PAIRS:  # the "on" runs must really have been scraped, the "off" runs never
                raise AssertionError(f"Prometheus scraped {len(scraped)} runs, expected the {PAIRS} with metrics on")

            def median(on: bool, i: int) -> float:
                return round(statistics.median(r[i] for r in runs[on]), 3)

            pair_ratios = sorted(round(off[0] / on[0], 3) for on, off in zip(runs[True], runs[False]))
            with record(results, f"training throughput with metrics on (scraped every {rate}) vs off", goal) as r:
                r.update(metrics_on_s=median(True, 0), metrics_off_s=median(False, 0),
                         ratio=round(median(False, 0) / median(True, 0), 3),
                         median_pair_ratio=statistics.median(pair_ratios), pair_ratios=pair_ratios,
                         training_cpu_s_on=median(True, 1), training_cpu_s_off=median(False, 1),
                         prometheus_cpu_s_on=median(True, 2), prometheus_cpu_s_off=median(False, 2),
                         runs_scraped=len(scraped), on_runs=[[round(x, 2) for x in t] for t in runs[True]],
                         off_runs=[[round(x, 2) for x in t] for t in runs[False]])
    with record(results, "goodput ledger and metrics calls per training step, microseconds (information)", "-") as r:
        r.update(**_per_step_microseconds())
    with record(results, "rendering one scrape of a worker, milliseconds (information)", "-") as r:
        r.update(milliseconds=round(_scrape_milliseconds(), 3))
