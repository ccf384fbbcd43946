"""Training without Ray (`python -m workers train`): resume, checkpoints, spec and storage errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.shardtools import ROOT, error_line, run_alexray
from tests.support.pickles import code_running_pickle
from tests.trainingtools import read_json, sample_log, sharded_digits, write_spec
from workers.models import checkpoint_format as ckpt


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return sharded_digits(tmp_path_factory.mktemp("digits"))


def run_workers(*args, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "workers", "train", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.heavy("three training runs")
def test_resuming_by_run_name_continues_mid_epoch_bitwise(digits, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", str(digits), str(tmp_path / "runs"),
                      train={"deterministic": True}, debug={"sample_log": True}, scaling={"num_workers": 1})
    run_workers(spec, "--set", "run.name=straight")
    straight = read_json(tmp_path / "runs" / "straight" / "summary.json")
    assert straight["epochs"] == 2 and straight["steps"] == 2 * 18

    run_workers(spec, "--set", "run.name=split", "--set", "train.max_steps=9")  # stops mid-epoch 0
    first = read_json(tmp_path / "runs" / "split" / "summary.json")
    assert first["steps"] == 9 and first["epochs"] == 0
    run_workers(spec, "--set", "run.name=split", "--set", "train.max_steps=9")  # resumed at its end: ends there
    again = read_json(tmp_path / "runs" / "split" / "summary.json")
    assert again["steps"] == 9 and again["restarts"] == 1
    run_workers(spec, "--set", "run.name=split")  # same name: resumes at step 9 of epoch 0
    resumed = read_json(tmp_path / "runs" / "split" / "summary.json")
    assert resumed["steps"] == straight["steps"] and resumed["restarts"] == 2
    assert resumed["final_weights_sha256"] == straight["final_weights_sha256"]
    for run in ("straight", "split"):
        log = sample_log(tmp_path / "runs" / run)
        for epoch in (0, 1):
            assert len(log[epoch]) == 18 * 32 and max(log[epoch].values()) == 1
    # the same name for another job is refused before anything runs
    proc = subprocess.run([sys.executable, "-m", "workers", "train", str(spec), "--set", "run.name=split",
                           "--set", "train.seed=5"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "run.name: a run named 'split' already exists" in error_line(proc)
    assert "(train.seed 0 -> 5)" in error_line(proc)
    # a new run never picks up an old one's checkpoints
    run_workers(spec, "--set", "train.max_steps=3")
    fresh = [p for p in (tmp_path / "runs").iterdir() if p.name not in ("straight", "split")]
    assert len(fresh) == 1 and read_json(fresh[0] / "summary.json")["steps"] == 3


def test_spec_errors_are_one_line_with_the_field(digits, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", str(digits), str(tmp_path / "runs"))
    cases = {
        ("--set", "train.lr=0"): "train.lr",
        ("--set", "train.bogus=1"): "train.bogus: unknown key",
        ("--set", "train.global_batch_size=30"): "data.streams",
        ("--set", "scaling.num_workers=3"): "train.global_batch_size",
        ("--set", "data.path=" + str(tmp_path / "nothing")): "data.path",
        ("--set", "model.name=alexnetx"): "model.name",
    }
    for args, field in cases.items():
        proc = run_alexray("train", spec, *args, "--no-ray")
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert field in error_line(proc), (args, proc.stderr)


def test_wrong_s3_credentials_are_refused_before_training(tmp_path, s3_bucket, s3_env):
    spec = write_spec(tmp_path / "spec.yaml", f"s3://{s3_bucket}/shards", str(tmp_path / "runs"))
    proc = run_alexray("train", spec, env={**s3_env, "AWS_SECRET_ACCESS_KEY": "wrong"}, timeout=120)
    assert proc.returncode == 2
    assert "refused the credentials" in error_line(proc)
    assert not (tmp_path / "runs").exists()


def test_incomplete_damaged_and_foreign_checkpoints_are_refused(tmp_path):
    good = tmp_path / "good"
    ckpt.save(good, 0, ckpt.TrainState(), {"w": torch.ones(3)}, {"state": {}, "param_groups": []})
    assert ckpt.load_state(good).global_step == 0
    partial = tmp_path / "partial"
    ckpt.save(partial, 0, ckpt.TrainState(), {"w": torch.ones(3)}, {"state": {}, "param_groups": []})
    (partial / ckpt.COMPLETE).unlink()  # as if the writer died before the marker
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.load_state(partial)
    damaged = tmp_path / "damaged"
    ckpt.save(damaged, 0, ckpt.TrainState(), {"w": torch.ones(3)}, {"state": {}, "param_groups": []})
    data = (damaged / "model.pt").read_bytes()
    (damaged / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="differs"):
        ckpt.load_state(damaged)
    # a pickle that would run code is never executed
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "model.pt").write_bytes(code_running_pickle(marker))
    with pytest.raises(ckpt.CheckpointError, match="not a loadable checkpoint"):
        ckpt.load_tensors(evil, "model.pt")
    assert not marker.exists()


def _schedule(**train):
    from alexray_core.spec import load_spec
    from workers.training.loop import LRSchedule

    spec = load_spec({"data": {"path": "x"}, "train": {"epochs": 10, **train}})
    return LRSchedule(spec, base_lr=0.1, steps_per_epoch=100)


def test_step_cosine_and_warmup_schedules():
    step = _schedule(schedule="step", step_epochs=3)
    assert [round(step.lr(e, 0), 6) for e in (0, 2, 3, 6, 9)] == [0.1, 0.1, 0.01, 0.001, 0.0001]
    cosine = _schedule(schedule="cosine", warmup_epochs=1)
    assert cosine.lr(0, 0) == pytest.approx(0.01)  # warm-up starts at lr/10
    assert cosine.lr(0, 50) == pytest.approx(0.055)
    assert cosine.lr(1, 0) == pytest.approx(0.1)
    assert cosine.lr(5, 50) == pytest.approx(0.05)  # halfway through the cosine
    assert cosine.lr(9, 99) < 0.001


def test_plateau_divides_by_ten_and_resumes_its_state():
    plateau = _schedule(schedule="plateau", plateau_patience=2)
    for top1 in (0.3, 0.4, 0.4, 0.4):
        plateau.end_epoch(top1)
    assert plateau.lr(4, 0) == pytest.approx(0.01)
    restored = _schedule(schedule="plateau", plateau_patience=2)
    restored.load_state_dict(plateau.state_dict())
    assert restored.lr(4, 0) == plateau.lr(4, 0)
    for _ in range(20):
        plateau.end_epoch(0.1)
    assert plateau.lr(30, 0) == pytest.approx(0.0001)  # divided three times at most, as in the paper


@pytest.mark.heavy("bench/gpu.py's quick run")
def test_gpu_benchmark_script_runs_on_cpu(tmp_path):
    """bench/gpu.py's quick run: shards made from generated photographs, both decode paths, the report."""
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--quick", "--make-data", str(tmp_path / "data"),
                    "--images", "48", "--width", "0.25", "--classes", "10", "--image-size", "64", "--threads", "2",
                    "--header-threads", "1", "--json", str(out)], check=True, capture_output=True, timeout=300)
    result = read_json(out)
    runs = {r["path"]: r for r in result["runs"]}
    assert result["device"] == "cpu" and set(runs) == {"synthetic", "cpu", "gpu"}
    assert all(r["img_s"] > 0 and r["tflop_s"] > 0 and r["mfu"] is None and not r["compile"] for r in runs.values())
    assert runs["synthetic"]["over_synthetic"] == 1.0 and result["train_flops_per_sample"] > 0
    assert set(result["decode"]) == {"cpu", "gpu", "headers"}
    assert result["parity"]["labels_and_draws_equal"] and result["parity"]["images"] == 16
