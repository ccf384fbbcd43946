"""Training-side benchmarks (issue: workers benchmarks).

- throughput with a checkpoint every 20 steps vs without checkpoints, same run length;
- recovery: seconds from a training worker's SIGKILL to the first completed step after the restart,
  on a real local Ray cluster.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import WORK, record

STEPS = 150


def _digits_shards() -> Path:
    from tests.trainingtools import sharded_digits

    root = WORK / "digits"
    if not (root / "shards" / "manifest.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        sharded_digits(root, train_per_class=150, val_per_class=20, shard_size=100)
    return root / "shards"


def _spec(tmp: Path, data: Path, name: str, every: int, **train) -> Path:
    from tests.trainingtools import write_spec

    return write_spec(tmp / f"{name}.yaml", str(data), str(tmp / "runs"), run={"name": name},
                      data={"val_split": None, "num_workers": 2},
                      train={"epochs": 100, "max_steps": STEPS, "global_batch_size": 128, "log_every": 10, **train},
                      checkpoint={"every_steps": every, "keep": 2}, scaling={"num_workers": 1})


def _train_seconds(spec: Path, attempt: int) -> float:
    """Seconds of the training loop (the run's wall_seconds: start-up excluded), one process, no Ray."""
    name = f"r{attempt}-{spec.stem}"
    done = subprocess.run([sys.executable, "-m", "workers", "train", str(spec), "--set", f"run.name={name}"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode:
        raise RuntimeError(f"training {name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads((spec.parent / "runs" / name / "summary.json").read_text())["wall_seconds"]


def _paired_ratio(baseline: Path, variant: Path, pairs: int = 5) -> tuple[list[float], list[float]]:
    """Seconds of every run of each, interleaved so that drifts in machine load hit both alike;
    each pair is printed as it finishes, so the spread is seen, not only the medians."""
    times: dict[Path, list[float]] = {baseline: [], variant: []}
    for attempt in range(pairs):
        for spec in (baseline, variant) if attempt % 2 == 0 else (variant, baseline):
            times[spec].append(_train_seconds(spec, attempt))
        base, var = times[baseline][-1], times[variant][-1]
        print(f"    pair {attempt + 1}/{pairs}: {baseline.stem} {base:.2f} s, {variant.stem} {var:.2f} s, "
              f"ratio {base / var:.3f}", flush=True)
    return times[baseline], times[variant]


def _recovery_seconds(tmp: Path, data: Path) -> float:
    from tests.shardtools import start_alexray

    home = tmp / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    ray = str(Path(sys.executable).with_name("ray"))
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
                    "--include-dashboard=false", f"--temp-dir={temp_dir}"], env=env, check=True, capture_output=True)
    try:
        spec = _spec(tmp, data, "recover", 10, log_every=1)
        run_dir = tmp / "runs" / "recover"
        proc = start_alexray("train", spec, "--set", "scaling.num_workers=2", "--set", "debug.step_delay=0.05",
                             env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"})

        def progress() -> dict:
            try:
                return json.loads((run_dir / "progress.json").read_text())
            except (OSError, ValueError):
                return {}

        while progress().get("step", -1) < 25:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.02)
        time.sleep(2.5)  # the step-20 checkpoint registered
        pids = subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True).stdout.split()
        killed = time.perf_counter()
        os.kill(int(pids[0]), signal.SIGKILL)
        while len(list((run_dir / "attempts").glob("*.json"))) < 2:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.02)
        while progress().get("attempt") != 1:  # rank 0 writes progress after every step
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.02)
        seconds = time.perf_counter() - killed
        proc.communicate(timeout=600)
        return seconds
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)


def run(results: list) -> None:
    data = _digits_shards()
    with tempfile.TemporaryDirectory(prefix="alexray-bench-train-") as tmp:
        tmp = Path(tmp)
        print(f"training benchmarks: narrow AlexNet (width 0.25) on digits at 64 px, batch 128 (the paper's), {STEPS} steps")
        with record(results, "training with a checkpoint every 20 steps vs none", ">= 0.95") as r:
            nones, everys = _paired_ratio(_spec(tmp, data, "none", 0), _spec(tmp, data, "every20", 20))
            none, every = statistics.median(nones), statistics.median(everys)
            r.update(no_checkpoint_s=round(none, 2), every_20_s=round(every, 2), ratio=round(none / every, 3),
                     pair_ratios=[round(a / b, 3) for a, b in zip(nones, everys)],
                     no_checkpoint_runs_s=[round(t, 2) for t in nones], every_20_runs_s=[round(t, 2) for t in everys])
        with record(results, "recovery: SIGKILL of a worker to the first step after restart (Ray)", "< 30 s") as r:
            r.update(seconds=round(_recovery_seconds(tmp, data), 1))
