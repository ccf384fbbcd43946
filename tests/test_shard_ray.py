"""`alexray shard --ray`: shards written as Ray tasks on a real local cluster equal a local run.

Different machines, each with its own temp dir and no shared disk, are in tests/test_multinode.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.shardtools import run_alexray
from tests.support import datasets as ds

pytestmark = pytest.mark.heavy("a Ray cluster")


def test_ray_tasks_write_the_same_shards_as_a_local_run(tmp_path, ray_cluster):
    address, env = ray_cluster
    src = Path(ds.make_imagenet_layout(tmp_path / "src", classes=3, train_per_class=10, val_per_class=3).root)
    run_alexray("shard", src, tmp_path / "local", "--shard-size", "6", "--seed", "11", check=True)
    # one node: its local disk is the file system every node shares
    proc = run_alexray("shard", src, tmp_path / "ray", "--shard-size", "6", "--seed", "11", "--ray", address,
                       "--shared-fs", env=env, timeout=300, check=True)
    assert "wrote 7 shards" in proc.stdout
    assert json.loads((tmp_path / "ray" / "manifest.json").read_text()) == \
        json.loads((tmp_path / "local" / "manifest.json").read_text())
