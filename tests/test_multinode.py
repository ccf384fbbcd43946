"""Several real Ray nodes on this machine: DDP across nodes, node loss, elastic resizing,
preemption, and sharding from every node, with the data and the runs on SeaweedFS.

``ray.cluster_utils.Cluster`` starts a head (1 CPU) and two worker nodes (2 CPUs each) as
separate raylets on this machine's address (a driver given 127.0.0.1 resolves it to that address,
and the Cluster utility binds its GCS to the node address only). Training workers take 2 CPUs each, so each lands on its own worker
node. Removing a node kills its raylet and, with it, the training worker on it, as a lost machine
would. The training driver is ``alexray train --address`` in a subprocess, as on a real cluster.
Each node has a temp dir of its own, and the sharding driver one that no node can see, as
separate machines have.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

from alexray_core.localcluster import LocalCluster, MARKER, command_line, stop_local_cluster
from tests.shardtools import error_line, run_alexray
from tests.support import datasets as ds
from tests.support.runs import finish
from tests.support.waiting import wait_until
from tests.trainingtools import sample_log, steps_by_world_size, write_spec

pytestmark = pytest.mark.heavy("a three-node Ray cluster")

ROOT = Path(__file__).resolve().parent.parent
TRAIN_PER_CLASS, BATCH = 48, 32  # 480 samples: 15 steps of 32 per epoch


class Nodes:
    """The cluster and its current worker nodes."""

    def __init__(self, cluster, marker: str, temp_dir: str):
        self.cluster, self.marker, self.temp_dir = cluster, marker, temp_dir
        self.workers: list = []

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self):
        node = self.cluster.add_node(num_cpus=2, env_vars=own_tmp(os.path.dirname(self.temp_dir)))
        self.workers.append(node)
        return node

    def lose(self, node) -> None:
        """The machine is gone: its raylet and everything on it die at once."""
        self.workers.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)

    def ensure(self, count: int = 2) -> None:
        while len(self.workers) < count:
            self.add()

    def node_of_training_workers(self) -> list[str]:
        """For each live training worker, the node id of the raylet that started it."""
        raylets = {n.all_processes["raylet"][0].process.pid: n.unique_id for n in self.workers}
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and "RayTrainWorker" in command_line(int(entry.name)):
                try:
                    parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError):
                    continue
                if parent in raylets:
                    out.append(raylets[parent])
        return out


def own_tmp(root: str) -> dict:
    """A node's environment with a temp dir of its own (``TMPDIR`` of its raylet and so of the workers
    it starts): separate machines share no /tmp."""
    return {"TMPDIR": tempfile.mkdtemp(prefix="node-tmp-", dir=root)}


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, s3_server):
    import secrets

    from ray.cluster_utils import Cluster

    marker = secrets.token_hex(8)
    # Short (socket paths have a length limit) and the cluster's own: `Cluster` writes the head's
    # address to `ray_current_cluster` under Ray's default temp root, which a fresh machine lacks,
    # so that root is pointed here and created, and nodes started without a temp_dir use it too.
    root = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    temp_dir = os.path.join(root, "ray")
    os.mkdir(temp_dir)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", root)
        # Every process of the cluster inherits this environment: an isolated HOME (no token from
        # elsewhere), the S3 server's credentials (nodes use their own chain), and a marker that
        # finds them all at teardown.
        env.setenv("HOME", str(tmp_path_factory.mktemp("multinode-home")))
        for name, value in {**s3_server.env(), MARKER: marker, "RAY_USAGE_STATS_ENABLED": "0",
                            "RAY_DEDUP_LOGS": "0",
                            # Ray's own default, not the suite's faster poll (tests/conftest.py): a
                            # controller that polls sooner than the drain notice reaches it takes a
                            # drained node's loss for a plain failure, not a preemption
                            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}.items():
            env.setenv(name, value)
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
            env.delenv(name, raising=False)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "temp_dir": temp_dir, "include_dashboard": False, "env_vars": own_tmp(root)})
        state = Nodes(cluster, marker, temp_dir)
        try:
            state.ensure(2)
            yield state
        finally:
            cluster.shutdown()
            left = stop_local_cluster(LocalCluster(cluster.address, None, temp_dir, marker, None))
            shutil.rmtree(root, ignore_errors=True)
            assert not left, f"Ray processes left behind: {left}"


@pytest.fixture(scope="module")
def digits_images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multinode-digits") / "digits"
    ds.write_digits_dataset(root, train_per_class=TRAIN_PER_CLASS, val_per_class=10)
    return root


def shard_from_elsewhere(nodes, *args, driver_tmp: str | None = None) -> subprocess.CompletedProcess:
    """``alexray shard ...`` run by a driver whose temp dir no node can see, as on a machine of its own:
    its ``TMPDIR`` is a tmpfs mounted in a private mount namespace (the rest, Ray's sockets, SRC
    and the network, is shared). Where namespaces are not allowed it runs as a plain process."""
    driver_tmp = driver_tmp or tempfile.mkdtemp(prefix="driver-tmp-", dir=os.path.dirname(nodes.temp_dir))
    command = [sys.executable, "-m", "orchestrator.cli", "shard", *map(str, args)]
    isolate = _private_tmp_prefix()
    if isolate:
        command = [*isolate, "sh", "-c", 'mount -t tmpfs alexray-driver-tmp "$TMPDIR" && exec "$@"', "sh", *command]
    else:
        warnings.warn("mount namespaces are not allowed here: the sharding driver shares the nodes' temp dirs")
    return subprocess.run(command, cwd=ROOT, env={**os.environ, "TMPDIR": driver_tmp, "PYTHONUNBUFFERED": "1"},
                          capture_output=True, text=True, timeout=300)


def _private_tmp_prefix() -> list[str]:
    """An ``unshare`` command line that gives the command a private mount namespace, or [] if none works."""
    for prefix in (["unshare", "--mount", "--propagation", "private"],
                   ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            pass
    return []


@pytest.fixture(scope="module")
def s3_sharding(nodes, digits_images, s3_server) -> tuple[str, subprocess.CompletedProcess]:
    """The digits sharded onto SeaweedFS by Ray tasks on every node, from a driver elsewhere."""
    s3_server.create_bucket("multinode")
    dest = "s3://multinode/digits"
    proc = shard_from_elsewhere(nodes, digits_images, dest, "--shard-size", 40, "--ray", nodes.address, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dest, proc


@pytest.fixture(scope="module")
def s3_digits(s3_sharding) -> str:
    return s3_sharding[0]


def _manifest_checksums(manifest: dict) -> dict:
    return {split: [(s["name"], s["samples"], s["sha256"]) for s in part["shards"]]
            for split, part in manifest["splits"].items()}


def test_sharding_on_every_node_matches_a_single_machine(nodes, s3_sharding, digits_images, tmp_path, s3_server):
    run_alexray("shard", digits_images, tmp_path / "local", "--shard-size", 40, "--no-progress", check=True)
    local = json.loads((tmp_path / "local" / "manifest.json").read_text())
    remote = json.loads(s3_server.client().get_object(Bucket="multinode", Key="digits/manifest.json")["Body"].read())
    assert _manifest_checksums(remote) == _manifest_checksums(local)
    assert remote["splits"] == local["splits"]
    assert sum(len(part["shards"]) for part in local["splits"].values()) == 15
    # Ray's SPREAD placement: the probe and shard tasks ran on all three nodes, each staging in its own temp dir.
    stderr = s3_sharding[1].stderr
    assert re.search(r"\d+ Ray tasks ran on 3 node\(s\)", stderr), stderr[-2000:]
    if not _private_tmp_prefix():
        return
    # A local DEST that only the driver's machine sees, passed off as shared: the tasks find no lease
    # there and stop with the reason, and no node writes a shard to a disk of its own.
    driver_tmp = tempfile.mkdtemp(prefix="driver-tmp-", dir=os.path.dirname(nodes.temp_dir))
    proc = shard_from_elsewhere(nodes, digits_images, os.path.join(driver_tmp, "dest"), "--shard-size", 40,
                                "--ray", nodes.address, "--shared-fs", "--no-progress", driver_tmp=driver_tmp)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "--shared-fs" in error_line(proc)
    assert os.listdir(driver_tmp) == []


def _spec(tmp_path: Path, dataset: str, name: str, **sections) -> Path:
    sections.setdefault("run", {})["name"] = name
    sections.setdefault("scaling", {}).update(cpus_per_worker=2)
    sections.setdefault("debug", {}).setdefault("sample_log", True)
    sections.setdefault("data", {}).update(val_split=None)
    sections.setdefault("train", {}).update(global_batch_size=BATCH, log_every=1)
    return write_spec(tmp_path / f"{name}.yaml", dataset, "s3://multinode/runs", **sections)


def _start_training(nodes, spec: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", str(spec), "--address", nodes.address],
                            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _run_files(s3_server, name: str, tmp_path: Path) -> Path:
    """A local copy of the run directory on S3 (progress, attempts, samples, summary)."""
    client = s3_server.client()
    local = tmp_path / "run-copy" / name
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="multinode", Prefix=f"runs/{name}/"):
        for obj in page.get("Contents", []):
            relative = obj["Key"][len(f"runs/{name}/"):]
            if not relative or relative.endswith("/") or relative.startswith(("checkpoint_", "best/")):
                continue
            target = local / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(client.get_object(Bucket="multinode", Key=obj["Key"])["Body"].read())
    return local


def _progress(s3_server, name: str) -> dict:
    try:
        body = s3_server.client().get_object(Bucket="multinode", Key=f"runs/{name}/progress.json")["Body"].read()
        return json.loads(body)
    except Exception:  # noqa: BLE001 - not written yet
        return {}


def _registered_checkpoint(s3_server, name: str) -> str | None:
    """The checkpoint Ray has taken the report of: the one a restart resumes from."""
    try:
        body = s3_server.client().get_object(Bucket="multinode",
                                             Key=f"runs/{name}/checkpoint_manager_snapshot.json")["Body"].read()
    except Exception:  # noqa: BLE001 - no checkpoint reported yet
        return None
    return (json.loads(body).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")


def _checkpoints(s3_server, name: str) -> list[str]:
    listing = s3_server.client().list_objects_v2(Bucket="multinode", Prefix=f"runs/{name}/checkpoint_")
    return sorted({o["Key"].split("/")[2] for o in listing.get("Contents", []) if o["Key"].endswith("complete.json")})


def _assert_exactly_once(run: Path, epochs: int) -> None:
    used = sample_log(run)
    assert sorted(used) == list(range(epochs))
    for epoch, counts in used.items():
        assert len(counts) == 15 * BATCH and set(counts.values()) == {1}, f"epoch {epoch}: a sample twice or missing"


def test_ddp_across_nodes_then_a_lost_node_is_replaced(nodes, s3_digits, tmp_path, s3_server):
    nodes.ensure(2)
    spec = _spec(tmp_path, s3_digits, "node-loss", train={"epochs": 2}, checkpoint={"every_steps": 4},
                 debug={"step_delay": 0.4})
    proc = _start_training(nodes, spec)
    wait_until(lambda: _progress(s3_server, "node-loss").get("step", 0) >= 2, 240, "the first steps", proc, poll=0.3)
    placed = nodes.node_of_training_workers()
    assert len(placed) == 2 and len(set(placed)) == 2, placed  # one DDP worker on each worker node
    # mid-epoch, once Ray has taken a checkpoint's report (the one a restart resumes from)
    wait_until(lambda: (_progress(s3_server, "node-loss").get("step", 0) >= 7
                        and _registered_checkpoint(s3_server, "node-loss")), 120, "step 7 with a checkpoint registered",
               proc, poll=0.3)

    nodes.lose(nodes.workers[1])
    nodes.add()  # a replacement machine joins; the run needs two workers
    out = finish(proc)

    run = _run_files(s3_server, "node-loss", tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["restarts"] >= 1, out[-3000:]
    resumed = [json.loads(p.read_text())["resumed_from_step"] for p in sorted((run / "attempts").glob("*.json"))]
    assert resumed[0] is None and resumed[1] >= 4  # from a checkpoint, not from step 0
    seconds = summary["goodput"]["seconds"]
    assert seconds["recovery"] > 0 and seconds["lost_work"] > 0, summary["goodput"]
    _assert_exactly_once(run, epochs=2)


def test_elastic_run_shrinks_on_node_loss_and_grows_back(nodes, s3_digits, tmp_path, s3_server):
    nodes.ensure(2)
    spec = _spec(tmp_path, s3_digits, "elastic", train={"epochs": 3},
                 scaling={"num_workers": [1, 2], "resize_interval_s": 3}, checkpoint={"every_steps": 3},
                 debug={"step_delay": 0.6})
    # Ray marks a killed node dead after about 15 s of failed health checks; a restart before that
    # still counts its CPUs, asks for two workers and waits out the placement group's start timeout
    # (60 s by default) before it takes the one node left. The timeout covers only that wait.
    proc = _start_training(nodes, spec, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="10")
    wait_until(lambda: len(nodes.node_of_training_workers()) == 2
               and _progress(s3_server, "elastic").get("step", 0) >= 4, 240, "two workers training", proc, poll=0.3)
    nodes.lose(nodes.workers[1])
    # It goes on alone: one worker, the same global batch, on the remaining node. The node comes
    # back with most of the run still to go, so the grow is seen before the run ends even when
    # the new node is slow to register on a loaded machine.
    wait_until(lambda: len(nodes.node_of_training_workers()) == 1 and
               _progress(s3_server, "elastic").get("attempt", 0) >= 1 and
               _progress(s3_server, "elastic").get("step", 0) >= 6, 240, "training with one worker", proc, poll=0.3)
    nodes.add()
    wait_until(lambda: len(nodes.node_of_training_workers()) == 2
               and _progress(s3_server, "elastic").get("attempt", 0) >= 2, 240, "the run to grow back to two workers",
               proc, poll=0.3)
    finish(proc)

    run = _run_files(s3_server, "elastic", tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 45 and summary["samples"] == 45 * BATCH
    by_world = steps_by_world_size(run)
    assert by_world.get(1) and by_world.get(2), by_world  # trained at both sizes
    goodput = summary["goodput"]  # the slot without a worker while the run was one node short
    assert goodput["slots"] == 2 and goodput["seconds"]["waiting_for_resources"] > 0, goodput
    _assert_exactly_once(run, epochs=3)


def test_a_preempted_node_gets_a_checkpoint_before_it_goes(nodes, s3_digits, tmp_path, s3_server):
    nodes.ensure(2)
    spec = _spec(tmp_path, s3_digits, "preempted", train={"epochs": 1}, checkpoint={"every_steps": 0},
                 failure={"preemption_check_steps": 1}, debug={"step_delay": 0.5})
    proc = _start_training(nodes, spec)
    wait_until(lambda: _progress(s3_server, "preempted").get("step", 0) >= 3, 240, "the first steps", proc, poll=0.3)
    assert _checkpoints(s3_server, "preempted") == []  # every_steps 0: no checkpoint before the epoch ends
    going = nodes.workers[1]
    ray = str(Path(sys.executable).with_name("ray"))
    drained = subprocess.run([ray, "drain-node", "--address", nodes.address, "--node-id", going.node_id,
                              "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot instance reclaimed",
                              "--deadline-remaining-seconds", "30"], capture_output=True, text=True, timeout=60)
    assert drained.returncode == 0, drained.stdout + drained.stderr
    # The node goes once Ray holds the checkpoint (a real one goes at its deadline, 30 s here).
    saved = wait_until(lambda: _registered_checkpoint(s3_server, "preempted"), 60,
                       "Ray to register a checkpoint after the preemption notice", proc, poll=0.3)
    assert _checkpoints(s3_server, "preempted") == [saved]
    step = int(saved.rsplit("_s", 1)[1])
    nodes.lose(going)
    nodes.add()
    out = finish(proc)
    assert "being preempted: checkpointing at step" in out
    run = _run_files(s3_server, "preempted", tmp_path)
    resumed = [json.loads(p.read_text())["resumed_from_step"] for p in sorted((run / "attempts").glob("*.json"))]
    assert resumed[:2] == [None, step] and 3 <= step < 15
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 15
    assert summary["goodput"]["seconds"]["preemption"] > 0, summary["goodput"]  # Ray said: a preemption
    _assert_exactly_once(run, epochs=1)
