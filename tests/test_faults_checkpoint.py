"""Checkpoint faults: damaged newest checkpoints, durability, scratch left by killed workers, and
checkpoints of runs without Ray on S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.shardtools import ROOT, error_line, start_alexray
from tests.support.durability import record_fsync_and_replace, renamed_to
from tests.support.waiting import stderr_tail, wait_until
from tests.trainingtools import read_json, sample_log, sharded_digits, write_spec
from workers.models import checkpoint_format as ckpt

OPTIMIZER = {"state": {}, "param_groups": []}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return sharded_digits(tmp_path_factory.mktemp("digits-faults"))


def _name(epoch: int, step: int) -> str:
    return f"checkpoint_e{epoch:04d}_s{step:09d}"


def _write_checkpoint(directory: Path, step: int, world: int = 2) -> None:
    """Every rank's part of a checkpoint, merged in one directory as Ray's storage holds it."""
    state = ckpt.TrainState(global_step=step, world_size=world)
    for rank in range(world):
        ckpt.save(directory, rank, state if rank == 0 else None, {"w": torch.full((64,), float(step))} if rank == 0
                  else None, OPTIMIZER if rank == 0 else None)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _same_on_every_rank(world: int):
    """What the all-reduce over ``world`` ranks gives when every rank sees what this one sees."""
    return lambda values: [world * v for v in values]


# ---- every rank's files count, damaged newest checkpoints are skipped ---------------------------

def test_every_ranks_files_are_covered_by_the_completeness_record(tmp_path):
    for case in ("truncated", "missing"):
        directory = tmp_path / case
        _write_checkpoint(directory, 6)
        ckpt.check_complete(directory)
        if case == "truncated":
            _truncate(directory / "rng-rank1.pt")
        else:
            (directory / "rng-rank1.pt").unlink()
        with pytest.raises(ckpt.CheckpointError, match="rng-rank1.pt"):
            ckpt.check_complete(directory)
    # a rank that never finished its part: the checkpoint is not complete
    unfinished = tmp_path / "unfinished"
    ckpt.save(unfinished, 0, ckpt.TrainState(world_size=2), {"w": torch.ones(3)}, OPTIMIZER)
    with pytest.raises(ckpt.CheckpointError, match="rank 1"):
        ckpt.check_complete(unfinished)
    # what inference reads (model and state) needs rank 0's files only
    ckpt.check_complete(unfinished, ("state.json", "model.pt"))


def test_resume_falls_back_past_damaged_checkpoints_and_says_why(tmp_path):
    from workers.training.run_store import RunStore

    run_dir = tmp_path / "run"
    for epoch, step in ((0, 6), (0, 12), (1, 18), (1, 24)):
        _write_checkpoint(run_dir / _name(epoch, step), step)
    _truncate(run_dir / _name(0, 12) / "model.pt")
    (run_dir / _name(1, 18) / "rng-rank1.pt").unlink()
    registered = _name(1, 18)  # step 24 is complete but Ray never registered it: not a resume point

    store = RunStore(str(run_dir))
    resume = store.resume_point(registered, "", rank=1, world=2, all_reduce_sum=_same_on_every_rank(2))
    with resume as directory:
        assert Path(directory).name == _name(0, 6)
        assert ckpt.load_state(directory).global_step == 6
        assert ckpt.load_rng(directory, 1) is not None
    assert resume.name == _name(0, 6)
    assert [name for name, _ in resume.skipped] == [_name(1, 18), _name(0, 12)]
    assert "rng-rank1.pt" in resume.skipped[0][1] and "model.pt" in resume.skipped[1][1]
    # steps after the resume point are checkpointed under names that cannot collide with the skipped
    # ones Ray still lists (Ray deletes an evicted checkpoint by its path)
    assert store.checkpoint_name(0, 12, attempt=1) not in (_name(0, 12), _name(1, 18))
    assert store.checkpoint_name(0, 12, attempt=1) > _name(0, 12)  # and sort newer
    assert store.checkpoint_name(2, 30, attempt=1) == _name(2, 30)
    record = store.attempt_record()
    assert record["resumed_from_checkpoint"] == _name(0, 6)
    assert [s["checkpoint"] for s in record["skipped_checkpoints"]] == [_name(1, 18), _name(0, 12)]

    # a checkpoint another rank cannot use is skipped by every rank
    calls = []

    def other_rank_rejects_the_first(values):
        calls.append(values)
        summed = [2 * v for v in values]
        if len(calls) == 2:  # the first candidate's verdict: the other rank says no
            summed[0] -= 1
        return summed

    _write_checkpoint(run_dir / _name(1, 30), 30)
    resume = RunStore(str(run_dir)).resume_point(_name(1, 30), "", 0, 2, other_rank_rejects_the_first)
    with resume as directory:
        assert Path(directory).name == _name(1, 24)  # older than the one registered now: a candidate
    assert resume.skipped[0][0] == _name(1, 30) and "another rank" in resume.skipped[0][1]

    # nothing usable: the run fails, naming every checkpoint tried
    _truncate(run_dir / _name(0, 6) / "optimizer.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"no usable checkpoint.*checkpoint_e0000_s000000006"):
        RunStore(str(run_dir)).resume_point(registered, "", 0, 2, _same_on_every_rank(2))


def test_checkpoint_files_are_fsynced_before_the_completeness_record(tmp_path, monkeypatch):
    events = record_fsync_and_replace(monkeypatch)
    directory = tmp_path / "c"
    _write_checkpoint(directory, 6)
    for record in (ckpt.COMPLETE, "complete-rank1.json"):
        written = renamed_to(events, directory / record)
        files = read_json(directory / record)["files"]
        for name in files:
            assert ("fsync", os.path.realpath(directory / name)) in events[:written], (record, name, events)
        # the record's own bytes reach the disk before it is renamed into place
        assert any(e[0] == "fsync" and record in os.path.basename(e[1]) for e in events[:written]), record
    assert ("fsync", os.path.realpath(directory)) in events  # and the directory entries

    # a run without Ray publishing to local storage: the copies are durable before the record
    from workers.training.run_store import RunStore

    events.clear()
    store = RunStore(str(tmp_path / "run"))
    scratch = store.scratch_dir("ckpt")
    _write_checkpoint(Path(scratch), 6, world=1)
    store.publish_checkpoint(scratch, "checkpoints/" + _name(0, 6), keep=2)
    target = tmp_path / "run" / "checkpoints" / _name(0, 6)
    ckpt.check_complete(target)
    complete = os.path.realpath(target / ckpt.COMPLETE)
    published = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == complete]
    assert published, events
    for name in ("model.pt", "optimizer.pt", "state.json", "rng-rank0.pt"):
        assert ("fsync", os.path.realpath(target / name)) in events[:published[-1]], name
    assert not Path(scratch).exists()


# ---- under Ray: a damaged newest checkpoint no longer fails every restart -----------------------

@pytest.mark.heavy("a Ray cluster")
def test_ray_run_resumes_past_damaged_newest_checkpoints(digits, tmp_path, ray_cluster):
    """The newest checkpoint's rng-rank1.pt and the one before's model.pt are cut in half; training
    the same run further resumes from the one before them, says which were skipped and why, and
    uses every sample exactly once."""
    _, env = ray_cluster
    common = {"debug": {"sample_log": True}, "checkpoint": {"every_steps": 6, "keep": 3},
              "data": {"val_split": None}, "run": {"name": "damaged"}, "failure": {"max_failures": 1}}
    spec = write_spec(tmp_path / "spec.yaml", str(digits), str(tmp_path / "runs"), **common)
    run_dir = tmp_path / "runs" / "damaged"

    def train(max_steps: int) -> subprocess.Popen:
        proc = start_alexray("train", spec, "--set", f"train.max_steps={max_steps}", env=env)
        proc.communicate(timeout=600)
        return proc

    first = train(18)
    assert first.returncode == 0
    registered = read_json(run_dir / "checkpoint_manager_snapshot.json")["latest_checkpoint_result"]
    newest, before = _name(1, 18), _name(0, 12)
    assert registered["checkpoint_dir_name"] == newest
    _truncate(run_dir / newest / "rng-rank1.pt")
    _truncate(run_dir / before / "model.pt")

    proc = start_alexray("train", spec, "--set", "train.max_steps=24", env=env)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    assert f"skipping {newest}" in stderr and f"skipping {before}" in stderr, stderr[-4000:]
    attempt = read_json(run_dir / "attempts" / "0001.json")
    assert attempt["resumed_from_step"] == 6 and attempt["resumed_from_checkpoint"] == _name(0, 6)
    skipped = {s["checkpoint"]: s["reason"] for s in attempt["skipped_checkpoints"]}
    assert "rng-rank1.pt" in skipped[newest] and "model.pt" in skipped[before], skipped
    summary = read_json(run_dir / "summary.json")
    assert summary["steps"] == 24 and summary["restarts"] == 1
    log = sample_log(run_dir)
    assert len(log[0]) == 18 * 32 and max(log[0].values()) == 1  # nothing repeated, nothing skipped
    assert len(log[1]) == 6 * 32 and max(log[1].values()) == 1
    # Ray evicted the damaged ones by path; the new checkpoints of steps 12 and 18 survived that
    kept = sorted(p.name for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    assert len(kept) == 3 and newest not in kept and before not in kept, kept
    for name in kept:
        ckpt.check_complete(run_dir / name)


# ---- scratch directories of killed workers ---------------------------------------------------------

def _scratch_files(tmp: Path) -> list[Path]:
    return sorted(tmp.rglob("model.pt"))


@pytest.mark.heavy("three training runs")
def test_killed_run_leaves_no_checkpoint_scratch_behind(digits, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
    spec = write_spec(tmp_path / "spec.yaml", str(digits), str(tmp_path / "runs"), run={"name": "killed"},
                      scaling={"num_workers": 1}, data={"val_split": None}, train={"max_steps": 12},
                      debug={"checkpoint_delay": 60.0})
    proc = subprocess.Popen([sys.executable, "-m", "workers", "train", str(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:  # killed while a checkpoint is half written, as a worker can be
        wait_until(lambda: _scratch_files(tmp), 240, "a checkpoint being written", proc, stderr_tail, poll=0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert _scratch_files(tmp)
    # the next start of the same run clears what the killed one left
    done = subprocess.run([sys.executable, "-m", "workers", "train", str(spec), "--set", "debug.checkpoint_delay=0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_json(tmp_path / "runs" / "killed" / "summary.json")["steps"] == 12
    assert _scratch_files(tmp) == []
    assert not list(tmp.glob("alexray-ckpt-*"))

    # a resume may not change what decides the data order or the weights' shapes
    proc = subprocess.run([sys.executable, "-m", "workers", "train", str(spec), "--set", "data.shuffle_block=32"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "data.shuffle_block 64 -> 32" in error_line(proc)


def test_scratch_of_live_processes_is_kept_and_of_dead_ones_cleared(tmp_path, monkeypatch):
    from workers.training.run_store import RunStore

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    store = RunStore(str(tmp_path / "runs" / "r"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = Path(store.scratch_dir("ckpt"))
    theirs = Path(store.scratch_dir("ckpt", pid=dead.pid))
    (theirs / "model.pt").write_bytes(b"half")
    other_run = Path(RunStore(str(tmp_path / "runs" / "other")).scratch_dir("ckpt", pid=dead.pid))
    assert mine.parent == theirs.parent and str(tmp_path) in str(mine) and mine.parent != other_run.parent
    store.clean_scratch()
    assert mine.is_dir() and not theirs.exists() and other_run.exists()


# ---- runs without Ray on S3 ------------------------------------------------------------------------

def test_no_ray_run_keeps_checkpoints_on_s3_and_resumes_from_them(digits, tmp_path, s3_server, s3_bucket, s3_env):
    work = tmp_path / "cwd"
    work.mkdir()
    env = {**os.environ, **s3_env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}  # run from another folder
    spec = write_spec(tmp_path / "spec.yaml", str(digits), f"s3://{s3_bucket}/runs", run={"name": "nr"},
                      scaling={"num_workers": 1}, data={"val_split": None}, debug={"sample_log": True})

    def train(*args):
        return subprocess.run([sys.executable, "-m", "workers", "train", str(spec), *args], cwd=work, env=env,
                              capture_output=True, text=True, timeout=300)

    first = train("--set", "train.max_steps=18")
    assert first.returncode == 0, first.stderr[-3000:]
    assert list(work.iterdir()) == []  # nothing written beside the command (no ./s3:/...)
    client = s3_server.client()

    def keys(prefix):
        return [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix).get("Contents", [])]

    base = "runs/nr/checkpoints/"
    names = sorted({k[len(base):].split("/")[0] for k in keys(base)})
    assert names == [_name(0, 12), _name(1, 18)]  # checkpoint.keep
    assert f"{base}{_name(1, 18)}/{ckpt.COMPLETE}" in keys(base)
    for name in names:  # folder markers, as pyarrow writes them for Ray's checkpoints
        client.put_object(Bucket=s3_bucket, Key=f"{base}{name}/", Body=b"")
    # the newest is damaged: the next start goes back to the one before, saying so
    key = f"{base}{_name(1, 18)}/model.pt"
    data = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    client.put_object(Bucket=s3_bucket, Key=key, Body=data[: len(data) // 2])
    second = train("--set", "train.max_steps=24")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"skipping {_name(1, 18)}" in second.stderr and "model.pt" in second.stderr
    attempt = json.loads(client.get_object(Bucket=s3_bucket, Key="runs/nr/attempts/0001.json")["Body"].read())
    assert attempt["resumed_from_step"] == 12
    summary = json.loads(client.get_object(Bucket=s3_bucket, Key="runs/nr/summary.json")["Body"].read())
    assert summary["steps"] == 24 and summary["restarts"] == 1
    assert list(work.iterdir()) == []
