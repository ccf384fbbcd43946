"""``make demo`` end to end: dataset, shards, a local token-auth Ray cluster, a job through the Jobs
API, live progress, val top-1 above 90%, checkpoints, and no Ray process left behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from alexray_core.localcluster import processes_using

pytestmark = pytest.mark.heavy("the demo: a Ray cluster and Prometheus")

ROOT = Path(__file__).resolve().parent.parent


def _run_demo(base: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_API"))}
    return subprocess.run([sys.executable, "-m", "orchestrator.demo", "--dir", str(base), *extra], cwd=ROOT,
                          env={**env, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=600)


def _prometheus_samples(workdir: Path, metric: str) -> dict[str, float]:
    """The highest value per rank of ``metric`` in the demo's Prometheus data, read with promtool."""
    out = subprocess.run(["promtool", "tsdb", "dump", "--match", f'{{__name__="{metric}"}}', str(workdir / "data")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    values = {}
    for line in out.stdout.splitlines():  # {__name__="...", rank="0", ...} value timestamp
        labels, value = line.rsplit("}", 1)
        rank = re.search(r'rank="(\d+)"', labels)
        number = float(value.split()[0])
        if rank and number == number:  # NaN: the staleness marker written when the worker went away
            values[rank.group(1)] = max(number, values.get(rank.group(1), 0.0))
    return values


def _field(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in the demo's output:\n{text[-3000:]}"
    return match.group(1)


def _shard_files(shards: Path) -> dict[str, tuple[int, int]]:
    """``{shard: (inode, mtime in ns)}``: a shard written again, even with the same bytes, changes."""
    return {str(p.relative_to(shards)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards.rglob("*.tar")}


def test_the_demo_trains_digits_above_90_percent_and_cleans_up(tmp_path):
    base = tmp_path / "demo"
    first = _run_demo(base)
    out = first.stdout
    assert first.returncode == 0, (out + first.stderr)[-4000:]
    assert "writing the handwritten-digits dataset" in out
    assert float(_field(r"final val top-1: ([\d.]+)%", out)) > 90.0
    assert re.search(r"epoch \d+, step \d+, \d+ img/s, [\d.]+ [MGT]?FLOP/s, loss [\d.]+", out), out  # live progress
    # the account of the workers' time: the submit to the end, two workers, mostly training
    goodput = float(_field(r"where the workers' time went: goodput (\d+)% of 2 worker\(s\)", out))
    assert 20 <= goodput <= 100 and "startup" in out
    checkpoint = Path(_field(r"newest checkpoint: (\S+)", out))
    assert checkpoint.parent.parent == base / "runs" and (checkpoint / "complete.json").is_file()
    assert (checkpoint.parent / "best" / "complete.json").is_file()
    assert (base / "ray" / "auth_token").stat().st_mode & 0o077 == 0  # the token is private
    assert "dashboard and Jobs API at http://127.0.0.1:" in out
    temp_dir = _field(r"Ray's files in (\S+)\)", out)
    assert not Path(temp_dir).exists() and not processes_using(temp_dir)
    # Prometheus ran beside the job, scraped the workers, and is gone too.
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/ \(Prometheus http://127\.0\.0\.1:\d+", out), out[-3000:]
    assert any((base / "prometheus" / "data").rglob("*")) and not processes_using(str(base / "prometheus"))
    samples = _prometheus_samples(base / "prometheus", "alexray_train_images_total")
    assert sorted(samples) == ["0", "1"] and min(samples.values()) > 500, samples  # each rank's images, scraped live

    manifest = base / "shards" / "manifest.json"
    written = manifest.stat().st_mtime_ns
    shards = _shard_files(base / "shards")
    token = base / "ray" / "auth_token"
    os.chmod(token, 0o644)  # left readable by an older version, or by hand: the new token must not be
    # what a second run changes is before training: two steps without evaluation show it
    second = _run_demo(base, "--set", "train.max_steps=2", "--set", "data.val_split=null")
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert token.stat().st_mode & 0o777 == 0o600
    assert "reusing the handwritten-digits dataset" in second.stdout
    assert manifest.stat().st_mtime_ns == written  # the shards were found up to date, not rewritten
    assert "already holds this dataset" in second.stdout and shards and _shard_files(base / "shards") == shards
    assert len(list((base / "runs").iterdir())) == 2  # a new run each time, never the old one resumed
