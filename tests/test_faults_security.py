"""Security faults: a spec field that becomes a path, refused before anything starts, a fine-tuning
source that is not there, the dashboard's Host check, token auth on the cluster 'alexray train' starts for itself, the
per-user Prometheus targets directory and its token file, and Ctrl-C at each stage of a start.

Processes are found in /proc by what they carry (a marker in their environment, a path in their
command line), the way alexray_core.localcluster finds its own.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from alexray_core import discovery
from alexray_core.localcluster import command_line, processes_using
from alexray_core.spec import load_spec
from orchestrator.monitor import start_dashboard
from orchestrator.prometheus import PrometheusError, free_port, start_prometheus
from orchestrator.rayclient import JobError
from tests.support.waiting import wait_until
from tests.trainingtools import sharded_digits, write_spec

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_API"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _state(pid: int) -> str | None:
    """The process's state letter from /proc (R, S, T stopped, Z zombie, ...); None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z")


def _pids(predicate) -> list[int]:
    """Live processes (not this one) for which ``predicate(pid, cmdline, environ)`` holds."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid() or not _alive(int(entry.name)):
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if predicate(int(entry.name), command_line(int(entry.name)), environ):
            found.append(int(entry.name))
    return found


def _with_env(name: str, value: str):
    needle = f"{name}={value}".encode()
    return lambda pid, cmdline, environ: needle in environ


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- 1. spec fields that become path components --------------------------------------------------

def test_alexray_train_refuses_a_path_in_model_name_before_starting_anything(tmp_path):
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(ROOT / "examples" / "digits.yaml"),
                           "--set", "model.name=../../../tmp/x"], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("alexray train: error: model.name: '../../../tmp/x' must be letters"), lines[0]
    assert not (tmp_path / "runs").exists()


# --- 2. the fine-tuning source ----------------------------------------------------------------------

def _write_checkpoint(directory: Path, name: str = "alexnet", width: float = 0.25, complete: bool = True) -> Path:
    """A checkpoint's files as 'alexray train' lays them out (the weights are opaque bytes here)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.pt").write_bytes(os.urandom(4096))
    (directory / "state.json").write_text(json.dumps({"model": {"name": name, "width": width, "num_classes": 10}}))
    if complete:
        data = {n: (directory / n).read_bytes() for n in ("model.pt", "state.json")}
        files = {n: {"bytes": len(b), "crc32": f"{zlib.crc32(b):08x}"} for n, b in data.items()}
        (directory / "complete.json").write_text(json.dumps({"format_version": 1, "files": files}))
    return directory


def check_finetune_source(spec):
    from orchestrator.preflight import check_finetune_source

    return check_finetune_source(spec)


def _finetune_spec(source: str, *overrides: str):
    return load_spec(None, ["data.path=/data/shards", "model.width=0.25",
                            f"finetune.from_checkpoint={json.dumps(source)}", *overrides])


def test_preflight_checks_the_finetune_source_locally(tmp_path):
    def refused(source: str, *overrides: str) -> str:
        with pytest.raises(JobError) as e:
            check_finetune_source(_finetune_spec(source, *overrides))
        message = str(e.value)
        assert message.startswith("finetune.from_checkpoint: ") and "\n" not in message and e.value.exit_code == 2
        return message

    assert "does not exist" in refused(str(tmp_path / "nothing"))
    (tmp_path / "empty-run").mkdir()
    assert "holds no checkpoint" in refused(str(tmp_path / "empty-run"))
    torn = _write_checkpoint(tmp_path / "torn", complete=False)
    assert "not a complete checkpoint (no complete.json)" in refused(str(torn))
    truncated = _write_checkpoint(tmp_path / "truncated")
    (truncated / "model.pt").write_bytes(b"short")
    assert "model.pt is missing, truncated or damaged" in refused(str(truncated))
    other = _write_checkpoint(tmp_path / "other", name="resnet18", width=1.0)
    assert "set model.name: resnet18, model.width: 1.0" in refused(str(other))

    good = _write_checkpoint(tmp_path / "good")
    assert check_finetune_source(_finetune_spec(str(good))) == str(good)
    assert check_finetune_source(_finetune_spec(str(good / "model.pt"))) == str(good)
    run = tmp_path / "run"  # a run directory: best/ first, else the newest complete checkpoint
    _write_checkpoint(run / "checkpoint_e0000_s000000006")
    _write_checkpoint(run / "checkpoint_e0001_s000000012", complete=False)
    assert check_finetune_source(_finetune_spec(str(run))) == f"{run}/checkpoint_e0000_s000000006"
    _write_checkpoint(run / "best")
    assert check_finetune_source(_finetune_spec(str(run))) == f"{run}/best"
    assert check_finetune_source(load_spec(None, ["data.path=/data/shards"])) is None


def test_preflight_reads_an_s3_finetune_source_with_the_submitters_credentials(tmp_path, s3_bucket, s3_env):
    from alexray_core.storage import open_storage

    local = _write_checkpoint(tmp_path / "ckpt")
    store = open_storage(f"s3://{s3_bucket}/runs/r1/best")
    for path in local.iterdir():
        store.write_bytes(path.name, path.read_bytes())
    assert check_finetune_source(_finetune_spec(f"s3://{s3_bucket}/runs/r1")) == f"s3://{s3_bucket}/runs/r1/best"
    with pytest.raises(JobError, match=r"^finetune.from_checkpoint: s3://\S+/runs/nothing holds no checkpoint"):
        check_finetune_source(_finetune_spec(f"s3://{s3_bucket}/runs/nothing"))
    store.delete("complete.json")
    with pytest.raises(JobError, match=r"^finetune.from_checkpoint: no complete checkpoint in s3://\S+/best \(.*"
                                       r"not a complete checkpoint \(no complete.json\)"):
        check_finetune_source(_finetune_spec(f"s3://{s3_bucket}/runs/r1/best"))
    with pytest.raises(JobError, match=r"^finetune.from_checkpoint: .*no-such-bucket-x"):
        check_finetune_source(_finetune_spec("s3://no-such-bucket-x/runs/r1"))


# --- 3. the dashboard answers only its own names ----------------------------------------------------

def _get(port: int, path: str, host: str | None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_host=True)
        if host is not None:
            connection.putheader("Host", host)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_the_dashboard_refuses_other_host_names_against_dns_rebinding():
    # Nothing listens at this Prometheus: a refused request must not even try to reach it.
    server = start_dashboard(f"http://127.0.0.1:{free_port()}", port=0)
    port = server.server.server_address[1]
    try:
        for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example", None, "a:b:c"):
            for path in ("/", "/api/runs", "/api/figures?run=x"):
                status, body = _get(port, path, host)
                assert status == 421, (host, path, status)
                assert f"open http://127.0.0.1:{port}/" in json.loads(body)["error"]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", "127.0.0.2"):
            status, body = _get(port, "/", host)
            assert status == 200 and b"<html" in body.lower(), host
    finally:
        server.stop()


# --- 4. the cluster 'alexray train' starts for itself has token auth ---------------------------------

@pytest.mark.heavy("a Ray cluster ('alexray train' starts its own)")
def test_alexray_train_starts_its_own_cluster_with_a_private_token(tmp_path):
    data = sharded_digits(tmp_path, train_per_class=10, val_per_class=2)  # never trained on: only started
    spec = write_spec(tmp_path / "spec.yaml", str(data), str(tmp_path / "runs"), scaling={"num_workers": 1},
                      debug={"step_delay": 2.0}, data={"val_split": None})
    home = tmp_path / "home"
    home.mkdir()
    marker = secrets.token_hex(8)
    # A shell left with RAY_AUTH_MODE=disabled for another cluster must not open this one.
    env = _env(HOME=str(home), RAY_AUTH_MODE="disabled", ALEXRAY_TEST_RUN=marker,
               **{discovery.TARGETS_ENV: str(tmp_path / "targets")})
    log = open(tmp_path / "train.log", "w")
    train = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", str(spec)], cwd=ROOT, env=env,
                             stdout=log, stderr=subprocess.STDOUT)
    ours = _with_env("ALEXRAY_TEST_RUN", marker)
    try:
        def raylet():  # started once the GCS is up; its command line names the GCS's port
            return [p for p in _pids(ours) if "raylet" in command_line(p) and "--gcs-address=" in command_line(p)]

        pid = wait_until(raylet, 180, "the job's raylet", train,
                         output=lambda _: (tmp_path / "train.log").read_text()[-3000:], poll=0.2)[0]
        port = re.search(r"--gcs-address=127\.0\.0\.1:(\d+)", command_line(pid)).group(1)
        probe = (f"import ray\ntry:\n    ray.init(address='127.0.0.1:{port}', logging_level='ERROR')\n"
                 "except Exception as e:\n    print('REFUSED', type(e).__name__, e, repr(e.__cause__))\n"
                 "else:\n    print('CONNECTED')\n")
        done = subprocess.run([sys.executable, "-c", probe], env=_env(HOME=str(tmp_path / "probe-home"),
                              RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"), capture_output=True, text=True, timeout=120)
        said = done.stdout + done.stderr
        assert "REFUSED" in done.stdout and "Authentication" in said, said[-3000:]  # no token, no way in
        environ = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                       if b"=" in item)
        assert environ[b"RAY_AUTH_MODE"] == b"token"
        token_file = Path(environ[b"RAY_AUTH_TOKEN_PATH"].decode())
        assert token_file.stat().st_mode & 0o777 == 0o600 and token_file.parent.stat().st_mode & 0o777 == 0o700
        assert not (home / ".ray" / "auth_token").exists()  # no token shared with other clusters
        assert train.poll() is None

        train.send_signal(signal.SIGINT)
        train.wait(120)
        assert not token_file.parent.exists()  # the token went with its cluster
        wait_until(lambda: not _pids(ours), 60, "the job's processes to exit")
    finally:
        if train.poll() is None:
            train.kill()
        _kill(_pids(ours))
        log.close()


# --- 5. the Prometheus targets directory and the demo's token file -----------------------------------

def test_the_default_targets_directory_is_per_user_and_private(monkeypatch):
    monkeypatch.delenv(discovery.TARGETS_ENV, raising=False)
    directory = discovery.targets_dir()
    assert directory == Path(f"/tmp/alexray-{os.getuid()}/prometheus-targets")
    assert discovery.ensure_targets_dir() == directory
    for level in (directory, directory.parent):
        st = level.lstat()
        assert st.st_uid == os.getuid() and st.st_mode & 0o777 == 0o700, (level, oct(st.st_mode))


@pytest.mark.heavy("Prometheus")
@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_targets_directory_of_another_user_is_refused(tmp_path, monkeypatch):
    default = tmp_path / "alexray-u" / "prometheus-targets"
    monkeypatch.setattr(discovery, "DEFAULT_TARGETS_DIR", str(default))
    monkeypatch.delenv(discovery.TARGETS_ENV, raising=False)
    default.parent.mkdir(mode=0o777)
    os.chmod(default.parent, 0o777)
    assert discovery.ensure_targets_dir() == default  # ours but open to all: made private
    assert default.parent.stat().st_mode & 0o777 == 0o700

    os.chown(default.parent, NOBODY, NOBODY)  # planted by someone else before we came
    with pytest.raises(discovery.TargetsDirError,
                       match=rf"^{re.escape(str(default.parent))} belongs to \S+ \(uid {NOBODY}\), not to you"):
        discovery.ensure_targets_dir()
    os.chown(default.parent, 0, 0)
    default.rmdir()
    default.parent.rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    default.parent.symlink_to(elsewhere)  # a link planted where the directory would be
    with pytest.raises(discovery.TargetsDirError, match="is not a directory but a link"):
        discovery.ensure_targets_dir()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, NOBODY, NOBODY)
    with pytest.raises(PrometheusError, match=f"^{re.escape(str(foreign))} belongs to"):
        start_prometheus(tmp_path / "prom", targets_dir=foreign)
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "dashboard", "--start-prometheus", "--port", "0",
                           "--prometheus-dir", str(tmp_path / "prom")], cwd=ROOT,
                          env=_env(**{discovery.TARGETS_ENV: str(foreign)}), capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith(f"alexray dashboard: error: {foreign} belongs to") and discovery.TARGETS_ENV in lines[0]
    assert not _pids(lambda pid, cmdline, environ: str(tmp_path / "prom") in cmdline)


def test_a_token_file_is_rewritten_private_whatever_its_old_mode(tmp_path):
    from alexray_core.localcluster import write_token_file

    path = tmp_path / "ray" / "auth_token"
    path.parent.mkdir()
    path.write_text("old-token")
    os.chmod(path, 0o644)
    write_token_file(path, "new-token")
    assert path.read_text() == "new-token" and path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["auth_token"]  # no temporary file left


# --- 6. Ctrl-C at each stage of a start leaves nothing running --------------------------------------

def _interrupt(proc: subprocess.Popen, log: Path) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"no exit within 120 s of Ctrl-C:\n{log.read_text()[-3000:]}") from None
    return log.read_text()


def _prometheus_held_at_start(tmp_path: Path) -> dict:
    """An environment whose ``prometheus`` stops itself before it becomes the real one, so that the
    Ctrl-C lands while its start is still waited for, however fast the real one would be ready."""
    bin_dir = tmp_path / "held-bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "prometheus"
    wrapper.write_text(f'#!/bin/sh\nkill -STOP $$\nexec {shutil.which("prometheus")} "$@"\n')
    wrapper.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def _stopped(pid: int) -> bool:
    return _state(pid) == "T"


@pytest.mark.heavy("Prometheus")
def test_ctrl_c_while_the_dashboards_prometheus_starts(tmp_path):
    workdir = tmp_path / "prom"
    log = tmp_path / "dashboard.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "dashboard", "--start-prometheus",
                                 "--port", "0", "--prometheus-dir", str(workdir)], cwd=ROOT,
                                env=_env(**{discovery.TARGETS_ENV: str(tmp_path / "targets")},
                                         **_prometheus_held_at_start(tmp_path)), stdout=out,
                                stderr=subprocess.STDOUT)
    ours = lambda pid, cmdline, environ: f"--storage.tsdb.path={workdir}/data" in cmdline  # noqa: E731
    try:
        wait_until(lambda: [p for p in _pids(ours) if _stopped(p)], 60, "Prometheus to be started", proc,
                   output=lambda _: log.read_text(), poll=0.05)
        output = _interrupt(proc, log)
        assert "Prometheus:" not in output, output  # still in the start, as intended
        assert proc.returncode == 130 and "Traceback" not in output, output
        assert not _pids(ours) and not processes_using(str(workdir)), output
    finally:
        _kill(_pids(ours))
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory):
    return tmp_path_factory.mktemp("demo-interrupted") / "demo"


def _start_demo(base: Path, log: Path, **env) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "orchestrator.demo", "--dir", str(base), "--set",
                                 "train.epochs=1"], cwd=ROOT, env=_env(**env), stdout=out, stderr=subprocess.STDOUT)


def _of_the_demo(base: Path):
    """The demo's cluster, job and Prometheus processes: they carry its targets directory in their
    environment (Prometheus: its data directory in its command line)."""
    needle = f"{discovery.TARGETS_ENV}={base / 'prometheus-targets'}".encode()
    return lambda pid, cmdline, environ: needle in environ or str(base / "prometheus") in cmdline


def _demo_leftovers(base: Path, temp_dirs: list[str]) -> list[str]:
    pids = set(_pids(_of_the_demo(base)))
    for temp_dir in temp_dirs:  # Ray's workers rename themselves, but keep their logs open
        pids.update(processes_using(temp_dir))
    return [f"{pid} {command_line(pid)[:100]}" for pid in sorted(pids)]


@pytest.mark.heavy("the demo's Ray cluster")
def test_ctrl_c_while_the_demo_starts_its_cluster(demo_base):
    log = demo_base.parent / "cluster-start.log"
    proc = _start_demo(demo_base, log)
    ours = _of_the_demo(demo_base)
    temp_dirs: list[str] = []
    try:
        def starting():
            # 'ray start' still running, and the GCS it started already up: both must go
            ray_start = [p for p in _pids(ours) if " start --head" in command_line(p)]
            gcs = [p for p in _pids(ours) if "gcs_server" in command_line(p)]
            if ray_start and gcs:
                temp_dirs.append(re.search(r"--temp-dir=(\S+)", command_line(ray_start[0])).group(1))
                return True
            return False

        wait_until(starting, 300, "the demo's 'ray start' to have started the GCS", proc,
                   output=lambda _: log.read_text()[-3000:], poll=0.05)
        output = _interrupt(proc, log)
        assert "cluster up" not in output, output  # the interrupt came during the start
        assert proc.returncode == 130 and "Traceback" not in output, output[-3000:]
        assert not _demo_leftovers(demo_base, temp_dirs), output[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill(_pids(ours))


@pytest.mark.heavy("the demo's Ray cluster and Prometheus")
def test_ctrl_c_while_the_demo_starts_prometheus(demo_base):
    log = demo_base.parent / "prometheus-start.log"
    proc = _start_demo(demo_base, log, **_prometheus_held_at_start(demo_base.parent))
    ours = _of_the_demo(demo_base)
    data_dir = demo_base / "prometheus" / "data"
    prometheus_of = lambda pid, cmdline, environ: f"--storage.tsdb.path={data_dir}" in cmdline  # noqa: E731
    try:
        wait_until(lambda: [p for p in _pids(prometheus_of) if _stopped(p)], 300,
                   "the demo's Prometheus to be started", proc, output=lambda _: log.read_text()[-3000:], poll=0.05)
        output = _interrupt(proc, log)
        temp_dirs = re.findall(r"Ray's files in (\S+)\)", output)
        assert temp_dirs and "dashboard: http" not in output, output[-3000:]  # interrupted during the start
        assert proc.returncode == 130 and "Traceback" not in output, output[-3000:]
        assert not _demo_leftovers(demo_base, temp_dirs), output[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill(_pids(ours))
