"""`alexray shard --ray`: shards written as Ray tasks on a real local cluster equal a local run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.shardtools import run_alexray
from tests.support import datasets as ds

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A one-node Ray cluster on loopback, with HOME isolated so no token or state leaks in or out."""
    home = tmp_path / "home"
    home.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    port = _free_port()
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=false", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_tasks_write_the_same_shards_as_a_local_run(tmp_path, ray_head):
    address, env = ray_head
    src = Path(ds.make_imagenet_layout(tmp_path / "src", classes=3, train_per_class=10, val_per_class=3).root)
    run_alexray("shard", src, tmp_path / "local", "--shard-size", "6", "--seed", "11", check=True)
    proc = run_alexray("shard", src, tmp_path / "ray", "--shard-size", "6", "--seed", "11", "--ray", address,
                       env=env, timeout=300, check=True)
    assert "wrote 7 shards" in proc.stdout
    assert json.loads((tmp_path / "ray" / "manifest.json").read_text()) == \
        json.loads((tmp_path / "local" / "manifest.json").read_text())
