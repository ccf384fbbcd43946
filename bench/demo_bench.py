"""``bench/run.py demo``: ``make demo`` three times, as a newcomer runs it, and where its time goes.

For each run: the line the demo prints about the workers' time (goodput and its categories). Over
the runs (attempt 0, every rank): start-up split into milestones (``workers.training.ledger``'s
``START_PHASES`` and the driver's call of fit), each phase named with whose work it is, Ray's or
ours; and evaluation's rate against training's on the same shards and workers (images per
second of a worker slot, from the ledgers' seconds and the counts the run saw).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT, WORK, record

RUNS = 3

# (name, from milestone, to milestone, whose): the session's "submitted" and "fit_called", then the
# ledger's phases. Ray's share covers its Jobs driver, controller, placement group, worker
# processes, torch's import and the process group; ours the rest.
PHASES = [
    ("driver: job start, imports, Ray connection", "submitted", "fit_called", "Ray Jobs + ours"),
    ("Ray: controller, placement group, worker processes", "fit_called", "process", "Ray"),
    ("Ray: worker set-up, torch import, process group", "process", "importing", "Ray"),
    ("our imports (OpenCV, WebDataset, our modules)", "importing", "imported", "ours"),
    ("Ray: train function handed to the worker", "imported", "started", "Ray"),
    ("build: manifest, model, FLOPs, optimizer, resume", "started", "built", "ours"),
    ("first batch: metrics, DDP wrap, loader start, decode", "built", "first_batch", "ours"),
    ("first step: forward, backward, first all-reduce", "first_batch", "first_step", "ours"),
    ("shut-down: Ray Train sees the end, stops the workers", "workers_done", "fit_returned", "Ray"),
    ("shut-down: the driver disconnects, closes the account", "fit_returned", "closed", "ours + Ray"),
]


def _demo(base: Path, home: Path) -> str:
    env = {**os.environ, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "orchestrator.demo", "--dir", str(base)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"the demo failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def _run_dir(stdout: str) -> Path:
    found = re.search(r"summary: (\S+)/summary\.json", stdout)
    assert found, stdout[-2000:]
    return Path(found.group(1))


def _milestones(run_dir: Path) -> list[dict]:
    """Per rank of attempt 0: the session's and the ledger's milestones, unix times."""
    session = json.loads((run_dir / "goodput" / "session.json").read_text())
    wall = json.loads((run_dir / "summary.json").read_text())["goodput"]["wall_seconds"]
    driver = {name: session[name] for name in ("submitted", "fit_called", "fit_returned") if name in session}
    out = []
    for path in sorted((run_dir / "goodput").glob("ledger-a0000-r*.json")):
        ledger = json.loads(path.read_text())
        done = ledger["started"] + sum(ledger["seconds"].values())  # its last record: the end of its work
        out.append({**driver, **ledger["phases"], "workers_done": done, "closed": session["submitted"] + wall,
                    "seconds": ledger["seconds"]})
    return out


def _rates(run_dir: Path, ranks: list[dict]) -> tuple[float, float]:
    """Images per slot-second: training (productive seconds) and evaluation (its seconds)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    spec = json.loads((run_dir / "spec.json").read_text())
    manifest = json.loads((Path(spec["data"]["path"]) / "manifest.json").read_text())
    evaluations = sum(1 for epoch in summary["history"] if epoch.get("val_top1") is not None)
    evaluated = manifest["splits"][spec["data"]["val_split"]]["samples"] * evaluations
    seconds = [sum(r["seconds"].get(c, 0.0) for r in ranks) for c in ("productive", "evaluation")]
    return summary["samples"] / seconds[0], evaluated / seconds[1] if seconds[1] else float("nan")


def run(results: list) -> None:
    base = WORK / "demo"
    lines, phases, rates = [], {name: [] for name, *_ in PHASES}, []
    for i in range(RUNS):
        with tempfile.TemporaryDirectory(prefix="alexray-demo-home-") as home:
            stdout = _demo(base, Path(home))  # the dataset and shards are reused after the first run
        line = next(s for s in stdout.splitlines() if "where the workers' time went" in s)
        top1 = next(s for s in stdout.splitlines() if "final val top-1" in s)
        print(f"run {i + 1}: {line.strip()}\n       {top1.strip()}", flush=True)
        lines.append(f"{line.strip()} / {top1.strip()}")
        run_dir = _run_dir(stdout)
        ranks = _milestones(run_dir)
        for name, start, end, _ in PHASES:
            phases[name] += [r[end] - r[start] for r in ranks if start in r and end in r]
        rates.append(_rates(run_dir, ranks))
    with record(results, "demo: start-up by phase (median seconds over runs and ranks)", "(information)") as r:
        r["phases"] = {f"{name} [{whose}]": round(statistics.median(phases[name]), 2) if phases[name] else None
                       for name, _, _, whose in PHASES}
        r["total_s"] = round(sum(v for v in r["phases"].values() if v), 2)
    with record(results, "demo: evaluation vs training images/s per worker slot", "> 1") as r:
        train, evaluation = statistics.median(t for t, _ in rates), statistics.median(e for _, e in rates)
        r.update(train_img_s=round(train, 1), eval_img_s=round(evaluation, 1), ratio=round(evaluation / train, 2))
    with record(results, "demo: the workers' time", "goodput >= 50%, evaluation < 10%, val top-1 > 90%") as r:
        r["lines"] = lines
