"""Training on a real local Ray cluster: DDP learning, SIGKILLed workers, S3 outages, S3 storage."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.shardtools import start_alexray
from tests.support.runs import finish, progress_step
from tests.support.waiting import Output, stderr_tail, wait_until
from tests.trainingtools import read_json, sample_log, sharded_digits, write_spec
from workers.training.ledger import START_PHASES
from workers.training.run_store import RunStore

pytestmark = pytest.mark.heavy("a Ray cluster ('alexray train' starts its own)")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return sharded_digits(tmp_path_factory.mktemp("digits-ray"))


def _finish_printed(proc: subprocess.Popen, timeout: float = 420) -> float:
    """Wait for the command as ``finish`` does; returns when it printed the run's summary, the end of
    the run (what follows is the process's own teardown: Ray's client and the interpreter)."""
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
    reader.start()
    printed = None
    for line in proc.stdout:
        if printed is None and line.startswith("{"):
            printed = time.time()
    proc.wait(timeout)
    reader.join(timeout)
    assert proc.returncode == 0 and printed is not None, "".join(errors)[-4000:]
    return printed


def _registered(run_dir: Path) -> str | None:
    """The newest checkpoint Ray has registered: the one a restart resumes from."""
    try:
        return read_json(run_dir / "checkpoint_manager_snapshot.json")["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None


def _checkpoint_being_written(scratch: Path, step: int) -> tuple[int, Path] | None:
    """(pid, folder) of the worker writing rank 0's part of the checkpoint of ``step``: its files in
    the worker's scratch folder (``ckpt-HOST-pPID-*``), but not yet complete.json, written last."""
    for folder in scratch.glob("ckpt-*"):
        try:
            written = read_json(folder / "state.json")["global_step"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            continue  # another rank's part, or state.json not written yet
        if written == step and not (folder / "complete.json").exists():
            return int(re.fullmatch(r"ckpt-.+-p(\d+)-[^-]+", folder.name)[1]), folder
    return None


def _train_workers() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def test_two_workers_learn_digits_with_checkpoints_on_s3(digits, tmp_path, ray_cluster, s3_server, s3_bucket, s3_env):
    _, env = ray_cluster
    spec = write_spec(tmp_path / "spec.yaml", str(digits), f"s3://{s3_bucket}/runs",
                      train={"epochs": 4, "log_every": 6, "grad_compression": "bf16"}, run={"name": "learn"})
    stdout = finish(start_alexray("train", spec, env={**env, **s3_env}))
    summary = json.loads(stdout[stdout.index("{"):])
    assert summary["epochs"] == 4 and summary["steps"] == 4 * 18 and summary["restarts"] == 0
    assert summary["top1"] > 0.4, summary  # chance is 0.1
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/learn/").get("Contents", [])]
    checkpoints = {k.split("/")[2] for k in keys if k.split("/")[2].startswith("checkpoint_e")}
    assert len(checkpoints) == 2  # checkpoint.keep
    assert "runs/learn/best/complete.json" in keys and "runs/learn/summary.json" in keys
    remote = json.loads(client.get_object(Bucket=s3_bucket, Key="runs/learn/summary.json")["Body"].read())
    assert remote["final_weights_sha256"] == summary["final_weights_sha256"]
    history = remote["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert all(h["epoch_samples_used"] == 18 * 32 and h["epoch_samples_dropped"] == 600 - 18 * 32 for h in history)


def test_sigkilled_workers_resume_exactly(digits, tmp_path, ray_cluster):
    """Kill a worker mid-epoch, then another during a checkpoint write: the run finishes with every
    sample used once per epoch and, in deterministic mode, bitwise the weights of an uninterrupted run."""
    _, env = ray_cluster
    common = {"train": {"deterministic": True, "log_every": 1}, "debug": {"sample_log": True}}
    reference = write_spec(tmp_path / "reference.yaml", str(digits), str(tmp_path / "runs"),
                           run={"name": "reference"}, **common)
    finish(start_alexray("train", reference, env=env))
    expected = read_json(tmp_path / "runs" / "reference" / "summary.json")

    faulty = write_spec(tmp_path / "faulty.yaml", str(digits), str(tmp_path / "runs"), run={"name": "faulty"},
                        failure={"max_failures": 3}, train=common["train"],
                        debug={"sample_log": True, "step_delay": 0.15, "checkpoint_delay": 2.0})
    run_dir = tmp_path / "runs" / "faulty"
    started = time.time()
    proc = start_alexray("train", faulty, env=env)
    # 1) mid-epoch, between the checkpoints of steps 6 and 12, once Ray has taken the first one (its
    # controller collects reports every 2 s; the step-12 one takes checkpoint_delay longer than that)
    wait_until(lambda: progress_step(run_dir) >= 9 and _registered(run_dir) == "checkpoint_e0000_s000000006", 240,
               "step 9 with the step-6 checkpoint registered", proc, stderr_tail, poll=0.05)
    reached = progress_step(run_dir)  # the kill comes at this step or after
    os.kill(_train_workers()[0], signal.SIGKILL)
    # 2) rank 0's worker, while it writes the epoch-end checkpoint (step 18): its files are in its
    # scratch folder and it sleeps checkpoint_delay before complete.json
    wait_until(lambda: len(list((run_dir / "attempts").glob("*.json"))) == 2 and progress_step(run_dir) >= 1, 240,
               "the restart", proc, stderr_tail, poll=0.05)
    writer, folder = wait_until(lambda: _checkpoint_being_written(RunStore(str(run_dir)).scratch_root, 18), 240,
                                "the step-18 checkpoint being written", proc, stderr_tail, poll=0.05)
    os.kill(writer, signal.SIGKILL)
    assert (folder / "state.json").exists() and not (folder / "complete.json").exists()  # killed mid-write
    wall = _finish_printed(proc) - started

    summary = read_json(run_dir / "summary.json")
    assert summary["steps"] == expected["steps"] == 36
    assert summary["final_weights_sha256"] == expected["final_weights_sha256"]
    assert summary["restarts"] == 2
    resumed = [read_json(p)["resumed_from_step"] for p in sorted((run_dir / "attempts").glob("*.json"))]
    assert resumed[:2] == [None, 6]
    # the last registered checkpoint (12, or 6 if Ray had not registered 12 yet), never the
    # half-written one of step 18, whose folder the restart removed as a killed worker's scratch
    assert resumed[2] in (6, 12), resumed
    assert not folder.exists()
    # Goodput: two slots' time, all of it accounted for; each redone step took at least step_delay
    # on both ranks, the first time or the second
    goodput = summary["goodput"]
    seconds, slots = goodput["seconds"], goodput["slots"]
    assert slots == 2 and abs(sum(seconds.values()) / slots - wall) <= 0.02 * wall, (wall, goodput)
    redone = (reached - 6) + (18 - resumed[2])
    assert seconds["lost_work"] >= slots * redone * 0.15, (redone, goodput)
    assert seconds["recovery"] > 0 and seconds["productive"] > 0 and seconds["startup"] > 0, goodput
    assert len(list((run_dir / "goodput").glob("failure-*.json"))) == 2
    for epoch, counts in sample_log(run_dir).items():
        assert len(counts) == 18 * 32 and max(counts.values()) == 1, epoch
    assert sample_log(run_dir) == sample_log(tmp_path / "runs" / "reference")


def test_s3_server_restart_mid_epoch(digits, tmp_path, ray_cluster, s3_server, s3_bucket, s3_env):
    _, env = ray_cluster
    client = s3_server.client()
    for path in digits.iterdir():
        client.upload_file(str(path), s3_bucket, f"digits/{path.name}")
    spec = write_spec(tmp_path / "spec.yaml", f"s3://{s3_bucket}/digits", str(tmp_path / "runs"),
                      run={"name": "outage"}, train={"epochs": 1}, data={"shuffle_block": 16},
                      debug={"step_delay": 0.2})
    proc = start_alexray("train", spec, env={**env, **s3_env})
    output = Output(proc)
    wait_until(lambda: progress_step(tmp_path / "runs" / "outage") >= 3, 240, "step 3", proc,
               lambda _: output.tail(), poll=0.05)
    s3_server.stop()
    # a worker's read of the next shard meets the outage (Ray forwards the worker's log line)
    output.wait_for_line(("retrying in", "resuming in"), 120, "a worker's retry while the server is down")
    restart = threading.Thread(target=s3_server.start)
    restart.start()
    output.finish()
    restart.join()
    summary = read_json(tmp_path / "runs" / "outage" / "summary.json")
    assert summary["steps"] == 18
    assert summary["history"][0]["corrupt_skipped"] == 0  # reads resumed, nothing was lost


def test_train_starts_its_own_local_cluster_when_none_is_given(digits, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    spec = write_spec(tmp_path / "spec.yaml", str(digits), str(tmp_path / "runs"), run={"name": "local"},
                      train={"max_steps": 4}, data={"val_split": None})
    stdout = finish(start_alexray("train", spec, env={**env, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}))
    assert json.loads(stdout[stdout.index("{"):])["steps"] == 4
    # start-up's milestones, in the order they happen: the driver's, then each worker's
    session = read_json(tmp_path / "runs" / "local" / "goodput" / "session.json")
    phases = read_json(tmp_path / "runs" / "local" / "goodput" / "ledger-a0000-r0000.json")["phases"]
    assert sorted(phases) == sorted(START_PHASES), phases
    times = [session["submitted"], session["fit_called"], *(phases[name] for name in START_PHASES),
             session["fit_returned"]]
    assert times == sorted(times), (session, phases)
    assert _train_workers() == []  # the cluster went away with the command
