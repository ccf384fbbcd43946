"""Job submission through Ray's Jobs API, against a real local Ray cluster with token auth on.

The cluster is started once for the module with its dashboard on loopback, an isolated HOME that
holds the cluster's token (``~/.ray/auth_token``) and ``RAY_AUTH_MODE=token``, and the test S3
server's credentials in its environment. Teardown stops exactly this cluster's processes
(``alexray_core.localcluster``), so other Ray clusters on the same machine survive.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from orchestrator import jobs, rayclient
from orchestrator.rayclient import JobError
from alexray_core.localcluster import cluster_pids, command_line, free_port, start_local_cluster, stop_local_cluster
from tests.support.waiting import wait_until
from tests.trainingtools import ray_train_pids, sharded_digits, write_spec



@pytest.fixture(scope="module")
def jobs_cluster(tmp_path_factory, s3_server):
    """A one-node Ray cluster (4 CPUs) with the dashboard on 127.0.0.1 and token auth on.

    Yields ``{"address", "token", "home", "cluster"}``; the token is in the cluster's
    ``~/.ray/auth_token``. Teardown stops this cluster's processes only.
    """
    home = tmp_path_factory.mktemp("jobs-ray-home")
    env = {**os.environ, **s3_server.env(), "HOME": str(home), "RAY_DEDUP_LOGS": "0"}
    cluster = start_local_cluster(num_cpus=4, env=env, token_file=home / ".ray" / "auth_token")
    try:
        yield {"address": cluster.dashboard_url, "token": cluster.token, "home": str(home), "cluster": cluster}
    finally:
        left = stop_local_cluster(cluster)
        assert not left, f"Ray processes left behind: {left}"


@pytest.fixture
def token_env(jobs_cluster, monkeypatch, tmp_path):
    """This process talks to the cluster with its token; HOME is empty so no other token is found."""
    home = tmp_path / "client-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", jobs_cluster["token"])
    return jobs_cluster


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return sharded_digits(tmp_path_factory.mktemp("digits-jobs"))


@pytest.fixture
def no_address_env(monkeypatch):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)


def _small_spec(tmp_path: Path, digits: Path, storage: str, name: str = "spec.yaml", **sections) -> Path:
    sections.setdefault("train", {}).setdefault("max_steps", 4)
    sections.setdefault("data", {}).setdefault("val_split", None)
    sections.setdefault("scaling", {}).setdefault("num_workers", 2)
    return write_spec(tmp_path / name, str(digits), storage, **sections)


_wait = wait_until


# --- no cluster needed --------------------------------------------------------------------------

def test_resolve_address(monkeypatch, no_address_env):
    assert rayclient.resolve_address(None) == "http://127.0.0.1:8265"
    assert rayclient.resolve_address("auto") == "http://127.0.0.1:8265"
    assert rayclient.resolve_address("10.0.0.5:8266") == "http://10.0.0.5:8266"
    assert rayclient.resolve_address("head") == "http://head:8265"
    assert rayclient.resolve_address("https://ray.example.com/") == "https://ray.example.com"
    assert rayclient.resolve_address("https://ray.example.com/ray/") == "https://ray.example.com/ray"
    assert rayclient.resolve_address("[::1]:8265") == "http://[::1]:8265"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9000")
    assert rayclient.resolve_address(None) == "http://127.0.0.1:9000"
    assert rayclient.resolve_address("http://127.0.0.1:1234") == "http://127.0.0.1:1234"  # the argument wins
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:9001")
    assert rayclient.resolve_address(None) == "http://127.0.0.1:9001"
    for bad, words in (("ray://head:10001", "Ray Client"), ("head:6379", "GCS"), ("ftp://head:21", "scheme"),
                       ("http://head:notaport", "not a valid address"),
                       ("https://user:pw@head", "carries credentials")):
        with pytest.raises(JobError, match=words):
            rayclient.resolve_address(bad)


def test_plain_http_to_another_host_is_refused_before_any_connection(monkeypatch, tmp_path, no_address_env):
    attempts = []

    def no_connect(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", no_connect)
    monkeypatch.setattr(socket, "create_connection", no_connect)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-sent-anywhere")
    spec = write_spec(tmp_path / "spec.yaml", str(tmp_path / "data"), str(tmp_path / "runs"))
    for address in ("http://203.0.113.5:8265", "198.51.100.7:8265", "http://ray-head.example.com:8265"):
        for call in (lambda: jobs.client(address), lambda: jobs.submit(spec, [], address),
                     lambda: jobs.status(address, "some-job"), lambda: jobs.list_jobs(address),
                     lambda: jobs.stop(address, "some-job"), lambda: jobs.logs(address, "some-job")):
            with pytest.raises(JobError) as e:
                call()
            message = str(e.value)
            assert "CVE-2023-48022" in message and "SSH tunnel" in message and "https://" in message, message
            assert e.value.exit_code == 2 and "\n" not in message
    assert attempts == []
    for fine in ("https://203.0.113.5:8265", "http://127.0.0.1:8265", "http://127.8.9.10:8265",
                 "http://localhost:8265", "http://[::1]:8265"):
        rayclient.check_secure(fine)  # no error, and still nothing sent
    rayclient.check_secure("http://203.0.113.5:8265", insecure=True)
    assert attempts == []


def test_token_sources_follow_rays_order(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert rayclient.auth_token() == (None, "no token")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert rayclient.auth_token()[0] == "from-home"
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert rayclient.auth_token()[0] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert rayclient.auth_token() == ("from-env", "RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(JobError, match="RAY_AUTH_TOKEN_PATH"):
        rayclient.auth_token()


def test_unreachable_cluster_gives_a_clear_error(no_address_env):
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for call in (lambda: jobs.client(address), lambda: jobs.list_jobs(address), lambda: jobs.status(address)):
        with pytest.raises(JobError) as e:
            call()
        assert str(e.value) == (f"cannot reach the Ray cluster at {address}: start one with 'ray start --head' "
                                "or pass --address")


def test_bad_spec_is_refused_naming_the_field(tmp_path, no_address_env):
    spec = write_spec(tmp_path / "spec.yaml", str(tmp_path / "data"), str(tmp_path / "runs"))
    with pytest.raises(JobError, match=r"^train.global_batch_size: 33 is not divisible") as e:
        jobs.submit(spec, ["train.global_batch_size=33", "data.streams=1"], "http://203.0.113.5:8265")
    assert e.value.exit_code == 2
    with pytest.raises(JobError, match=r"^run.secret_key: specs must not carry secrets"):
        jobs.submit(spec, ["run.secret_key=abc"])


def test_importing_the_orchestrator_needs_no_torch():
    code = "import orchestrator.jobs, orchestrator.preflight, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "False"


# --- against the cluster ------------------------------------------------------------------------

def test_newest_checkpoint_is_the_one_ray_registered(tmp_path):
    """A complete directory whose async report Ray never took (the job stopped first) is not what a
    resume continues from, so status does not show it."""
    run_dir = tmp_path / "run-a"
    for name in ("checkpoint_e0000_s000000003", "checkpoint_e0000_s000000006"):
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / "complete.json").write_text("{}")
    assert jobs.run_progress(str(tmp_path), "run-a")["newest_checkpoint"] is None

    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    snapshot.write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_e0000_s000000003"}}))
    assert jobs.run_progress(str(tmp_path), "run-a")["newest_checkpoint"] == f"{run_dir}/checkpoint_e0000_s000000003"

    (run_dir / "checkpoint_e0000_s000000003" / "complete.json").unlink()
    assert jobs.run_progress(str(tmp_path), "run-a")["newest_checkpoint"] is None


def test_the_local_cluster_listens_on_loopback_only(jobs_cluster):
    """Ray's Jobs API and core servers run code for whoever reaches them: nothing of the cluster
    (GCS, raylet, agents, dashboard) may listen beyond 127.0.0.1."""
    from tests.support.sockets import listening_addresses

    listening = listening_addresses(cluster_pids(jobs_cluster["cluster"]))
    everything = {address for addresses in listening.values() for address in addresses}
    assert len(everything) >= 5, listening  # the GCS, raylet, agents and dashboard were found
    exposed = {f"{command_line(pid)[:60]}: {ip}:{port}" for pid, addresses in listening.items()
               for ip, port in addresses if not ip.is_loopback}
    assert not exposed, sorted(exposed)


def test_token_auth_is_on_and_wrong_or_missing_tokens_are_refused(token_env, monkeypatch):
    address = token_env["address"]
    assert requests.get(f"{address}/api/authentication_mode", timeout=5).json()["authentication_mode"] == "token"
    assert requests.get(f"{address}/api/jobs/", timeout=5).status_code == 401
    assert isinstance(jobs.list_jobs(address), list)  # the right token from RAY_AUTH_TOKEN

    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong-" + secrets.token_hex(8))
    with pytest.raises(JobError) as e:
        jobs.client(address)
    assert str(e.value).startswith(f"the Ray cluster at {address} refused the token from RAY_AUTH_TOKEN; set "
                                   "RAY_AUTH_TOKEN to the cluster's token"), str(e.value)

    monkeypatch.delenv("RAY_AUTH_TOKEN")  # and HOME holds no token
    with pytest.raises(JobError, match="requires a token and none was sent; set RAY_AUTH_TOKEN"):
        jobs.list_jobs(address)

    token_file = Path(os.environ["HOME"]) / ".ray" / "auth_token"
    token_file.parent.mkdir()
    token_file.write_text(token_env["token"] + "\n")
    assert isinstance(jobs.list_jobs(address), list)  # ~/.ray/auth_token, as Ray reads it


def test_submit_status_logs_until_succeeded(token_env, digits, tmp_path, s3_bucket, s3_env):
    address = token_env["address"]
    spec = _small_spec(tmp_path, digits, f"s3://{s3_bucket}/runs")
    job_id, run_name = jobs.submit(spec, ["train.seed=3"], address)
    assert run_name.startswith("alexnet-")

    early = jobs.status(address, job_id)
    assert early["job_id"] == job_id and early["run_name"] == run_name
    assert early["status"] in ("PENDING", "RUNNING", "SUCCEEDED")
    assert early["run_dir"] == f"s3://{s3_bucket}/runs/{run_name}"

    assert jobs.wait_for(address, job_id, timeout=150) == "SUCCEEDED", jobs.logs(address, job_id)[-3000:]
    text = jobs.logs(address, job_id)  # 'alexray train' ends by printing the run's summary
    assert '"steps": 4' in text and f'"run_name": "{run_name}"' in text

    final = jobs.status(address, run_name)  # a run name finds its newest job
    assert final["job_id"] == job_id and final["status"] == "SUCCEEDED" and final["driver_exit_code"] == 0
    assert final["step"] == 4 and final["epoch"] == 0 and final["restarts"] == 0
    assert final["images_per_s"] > 0 and final["loss"] > 0
    assert final["newest_checkpoint"] == f"s3://{s3_bucket}/runs/{run_name}/checkpoint_e0000_s000000004"
    assert final["summary"]["samples"] == 4 * 32 and "progress_error" not in final
    assert jobs.status(address)["job_id"] == job_id  # no id: the newest alexray job

    listed = {j["job_id"]: j for j in jobs.list_jobs(address)}
    assert listed[job_id]["run_name"] == run_name
    # What the cluster was given: this interpreter, the spec in a working_dir, no secrets anywhere.
    info = jobs.client(address).get_job_info(job_id)
    # the submit's own time goes with the job: the run's account (goodput) starts there
    assert re.fullmatch(rf"{re.escape(sys.executable)} -u -m orchestrator.cli train job-spec.yaml "
                        rf"--submitted-at (\d+\.\d+)", info.entrypoint), info.entrypoint
    submitted = float(info.entrypoint.rsplit(" ", 1)[1])
    assert 0 < final["goodput"]["wall_seconds"] and submitted + final["goodput"]["wall_seconds"] <= time.time()
    assert final["goodput"]["slots"] == 2 and final["goodput"]["seconds"]["productive"] > 0
    assert "env_vars" not in info.runtime_env and info.runtime_env["working_dir"].startswith("gcs://")
    assert info.metadata == {"alexray_run": run_name, "alexray_storage": f"s3://{s3_bucket}/runs"}
    assert token_env["token"] not in json.dumps(info.model_dump() if hasattr(info, "model_dump") else info.dict())
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in text

    followed = []

    class Sink:
        def write(self, chunk):
            followed.append(chunk)

        def flush(self):
            pass

    assert jobs.logs(address, job_id, follow=True, out=Sink()) == "".join(followed)
    assert '"steps": 4' in "".join(followed)


def test_stop_a_running_job(token_env, digits, tmp_path):
    address = token_env["address"]
    spec = _small_spec(tmp_path, digits, str(tmp_path / "runs"), run={"name": "to-stop"},
                       train={"max_steps": 500}, debug={"step_delay": 1.0})
    job_id, run_name = jobs.submit(spec, [], address)
    assert run_name == "to-stop"
    status = _wait(lambda: (s := jobs.status(address, job_id))["step"] is not None and s, 150, "the first step")
    assert status["status"] == "RUNNING" and status["restarts"] == 0
    assert len(ray_train_pids(token_env["cluster"])) == 2

    result = jobs.stop(address, job_id, timeout=60)
    assert result == {"job_id": job_id, "run_name": "to-stop", "stop_requested": True, "status": "STOPPED"}
    after = jobs.status(address, "to-stop")
    assert after["status"] == "STOPPED" and after["summary"] is None and after["step"] < 500

    def workers_gone():
        return not ray_train_pids(token_env["cluster"])

    _wait(workers_gone, 60, "the stopped job's training workers to exit")
    assert jobs.stop(address, job_id)["stop_requested"] is False  # already stopped


def test_preflight_refuses_bad_jobs_before_submitting(token_env, digits, tmp_path):
    address = token_env["address"]
    before = len(jobs.list_jobs(address, all_jobs=True))
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    cases = [
        (dict(dataset=empty), [], r"^data.path: no manifest.json in .*empty; shard a dataset there"),
        (dict(dataset=tmp_path / "nowhere"), [], r"^data.path: .*nowhere does not exist"),
        ({}, ["scaling.num_workers=8"],
         r"^scaling.num_workers: 8 workers need 8 CPUs .* has 4 CPUs on 1 node\(s\), room for 4 worker"),
        ({}, ["scaling.cpus_per_worker=3"], r"^scaling.num_workers: 2 workers need 6 CPUs .* room for 1 worker"),
        ({}, ["scaling.use_gpu=true"], r"^scaling.use_gpu: the cluster at .* has no GPUs"),
        ({}, ["model.num_classes=5"], r"^model.num_classes: 5 does not match the 10 classes"),
        ({}, ["data.val_split=test"], r"^data.val_split: the dataset at .* has no samples in split 'test'"),
        (dict(storage=a_file / "runs"), [], r"^run.storage: "),
        ({}, [f"finetune.from_checkpoint={tmp_path / 'no-checkpoint'}"],
         r"^finetune.from_checkpoint: .*no-checkpoint does not exist"),
        ({}, [f"finetune.from_checkpoint={empty}"], r"^finetune.from_checkpoint: .*empty holds no checkpoint"),
    ]
    for where, overrides, pattern in cases:
        spec = _small_spec(tmp_path, where.get("dataset", digits), str(where.get("storage", tmp_path / "runs")))
        with pytest.raises(JobError, match=pattern) as e:
            jobs.submit(spec, overrides, address)
        assert e.value.exit_code == 2 and "\n" not in str(e.value)
    assert len(jobs.list_jobs(address, all_jobs=True)) == before  # nothing was submitted


def test_the_address_given_is_the_one_contacted(token_env, monkeypatch):
    # Ray's client would otherwise replace it with RAY_API_SERVER_ADDRESS or RAY_ADDRESS.
    elsewhere = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", elsewhere)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", elsewhere)
    assert isinstance(jobs.list_jobs(token_env["address"]), list)
    assert os.environ["RAY_ADDRESS"] == os.environ["RAY_API_SERVER_ADDRESS"] == elsewhere  # put back
    with pytest.raises(JobError, match="cannot reach"):
        jobs.list_jobs(None)  # no argument: the environment decides


def test_wait_reports_a_failed_job(token_env, digits, tmp_path):
    spec = _small_spec(tmp_path, digits, str(tmp_path / "runs"))
    expected = (r"^job \S+ \(run alexnet-\S+\) FAILED: Job entrypoint command failed with exit code 127: "
                r"\S+ .*no-such-python: not found; see 'alexray logs raysubmit_\w+'$")
    with pytest.raises(JobError, match=expected) as e:
        jobs.submit(spec, [], token_env["address"], wait=True, python=str(tmp_path / "no-such-python"),
                    timeout=60)
    assert e.value.exit_code == 1


def test_unknown_job_is_a_clear_error(token_env):
    with pytest.raises(JobError, match=r"no job or run 'nope' on the cluster at .*: list them with 'alexray list'"):
        jobs.status(token_env["address"], "nope")


def test_the_alexray_job_commands(token_env, digits, tmp_path):
    from tests.shardtools import error_line, run_alexray

    address = token_env["address"]
    spec = _small_spec(tmp_path, digits, str(tmp_path / "runs"))
    proc = run_alexray("submit", spec, "--address", address, "--wait", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id, run_name = (line.split()[1] for line in proc.stdout.split("\n")[:2])
    status = json.loads(run_alexray("status", run_name, "--address", address, check=True).stdout)
    assert status["job_id"] == job_id and status["status"] == "SUCCEEDED" and status["step"] == 4
    assert f"{job_id}\tSUCCEEDED\t{run_name}" in run_alexray("list", "--address", address, check=True).stdout
    assert '"steps": 4' in run_alexray("logs", job_id, "--address", address, check=True).stdout
    # refused before anything is contacted or submitted: plain http to another host, a bad spec
    proc = run_alexray("submit", spec, "--address", "http://203.0.113.5:8265")
    assert proc.returncode == 2 and "--insecure" in error_line(proc)
    proc = run_alexray("submit", spec, "--address", address, "--set", "train.lr=-1")
    assert proc.returncode == 2 and "train.lr" in error_line(proc)


def test_resume_continues_a_stopped_run_from_its_checkpoint(token_env, digits, tmp_path):
    from tests.shardtools import error_line, run_alexray

    address = token_env["address"]
    storage = tmp_path / "runs"
    spec = _small_spec(tmp_path, digits, str(storage), train={"max_steps": 300}, checkpoint={"every_steps": 3},
                       debug={"step_delay": 0.5})
    job_id, run_name = jobs.submit(spec, [], address)
    _wait(lambda: (s := jobs.status(address, job_id))["newest_checkpoint"] and s["step"] >= 5, 180,
          "a checkpoint of the running job")
    assert jobs.stop(address, job_id, timeout=60)["status"] == "STOPPED"
    # Ray ends the job's actors just after its driver: until then the controller may still register one
    _wait(lambda: not ray_train_pids(token_env["cluster"], "RayTrainWorker", "TrainController"), 60,
          "the stopped job's controller and workers to exit")
    checkpoint = jobs.status(address, run_name)["newest_checkpoint"]
    checkpoint_step = int(checkpoint.rsplit("_s", 1)[1])
    assert checkpoint_step >= 3

    # The same name with a different job is refused, by submit and by resume, before anything runs.
    before = len(jobs.list_jobs(address))
    with pytest.raises(JobError, match=r"^run.name: a run named .* different job \(train.seed 0 -> 5\)"):
        jobs.submit(spec, [f"run.name={run_name}", "train.seed=5"], address)
    proc = run_alexray("resume", run_name, "--address", address, "--set", "model.width=0.5")
    assert proc.returncode == 2 and "model.width 0.25 -> 0.5" in error_line(proc)
    assert len(jobs.list_jobs(address)) == before

    proc = run_alexray("resume", run_name, "--address", address, "--set", "train.max_steps=24",
                       "--set", "debug.step_delay=0", "--wait", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[1] == f"run {run_name}" and lines[2] == f"resumes from {checkpoint} (step {checkpoint_step})"
    assert f"run {run_name} succeeded: epoch 1, step 24" in proc.stdout

    run_dir = storage / run_name
    attempts = sorted((run_dir / "attempts").glob("*.json"))
    assert [json.loads(a.read_text())["resumed_from_step"] for a in attempts] == [None, checkpoint_step]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["samples"] == 24 * 32  # every step counted once, none redone
    final = jobs.status(address, run_name)
    assert final["status"] == "SUCCEEDED" and final["restarts"] == 1

    with pytest.raises(JobError, match=r"already finished \(24 steps.*--set train.epochs=N$"):
        jobs.resume(address, run_name)
    with pytest.raises(JobError, match=r"^no job of run 'never-ran' .* pass --storage"):
        jobs.resume(address, "never-ran")
    with pytest.raises(JobError, match=r"^no run 'never-ran' in .*spec.json is missing"):
        jobs.resume(address, "never-ran", storage=str(storage))


def test_stock_ray_job_submit_with_the_documented_entrypoint(token_env, digits, tmp_path):
    """README: ray job submit --working-dir . -- python -m orchestrator.cli train SPEC.yaml"""
    address = token_env["address"]
    repo = Path(__file__).resolve().parent.parent
    spec = _small_spec(tmp_path, digits, str(tmp_path / "runs"), run={"name": "stock-cli"})
    ray = str(Path(sys.executable).with_name("ray"))
    proc = subprocess.run([ray, "job", "submit", "--address", address, "--working-dir", str(repo), "--",
                           sys.executable, "-m", "orchestrator.cli", "train", str(spec)],
                          env={**os.environ, "RAY_AUTH_MODE": "token", "PYTHONUNBUFFERED": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "succeeded" in proc.stdout and '"run_name": "stock-cli"' in proc.stdout
    summary = json.loads((tmp_path / "runs" / "stock-cli" / "summary.json").read_text())
    assert summary["steps"] == 4


def test_preflight_checks_s3_with_the_submitters_credentials(token_env, digits, tmp_path, s3_bucket, monkeypatch):
    address = token_env["address"]
    before = len(jobs.list_jobs(address, all_jobs=True))
    cases = [
        (dict(dataset="s3://no-such-bucket-here/digits"), r"^data.path: .*no-such-bucket-here"),
        (dict(dataset=f"s3://{s3_bucket}/nothing-here"), r"^data.path: no manifest.json in s3://"),
        (dict(storage="s3://no-such-bucket-here/runs"), r"^run.storage: .*no-such-bucket-here"),
    ]
    for where, pattern in cases:
        spec = _small_spec(tmp_path, where.get("dataset", digits), where.get("storage", f"s3://{s3_bucket}/runs"))
        with pytest.raises(JobError, match=pattern) as e:
            jobs.submit(spec, [], address)
        assert e.value.exit_code == 2 and "\n" not in str(e.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + secrets.token_hex(8))
    spec = _small_spec(tmp_path, digits, f"s3://{s3_bucket}/runs")
    with pytest.raises(JobError, match=r"^run.storage: .*(credentials|signature|denied)") as e:
        jobs.submit(spec, [], address)
    assert "wrong-" not in str(e.value)
    assert len(jobs.list_jobs(address, all_jobs=True)) == before


def test_submit_python_names_the_clusters_interpreter(token_env, digits, tmp_path, monkeypatch):
    """Through a tunnel a remote head looks local: --python (or ALEXRAY_CLUSTER_PYTHON) names its interpreter."""
    from tests.shardtools import error_line, run_alexray

    address = token_env["address"]
    spec = _small_spec(tmp_path, digits, str(tmp_path / "runs"))
    proc = run_alexray("submit", spec, "--address", address, "--python", tmp_path / "cluster-python", "--wait",
                       timeout=120)
    assert proc.returncode == 1 and "cluster-python: not found" in error_line(proc), proc.stderr[-2000:]
    monkeypatch.setenv("ALEXRAY_CLUSTER_PYTHON", str(tmp_path / "env-python"))
    job_id, _ = jobs.submit(spec, [], address)
    assert jobs.client(address).get_job_info(job_id).entrypoint.startswith(f"{tmp_path / 'env-python'} -u -m")
    assert jobs.wait_for(address, job_id, timeout=60) == "FAILED"
