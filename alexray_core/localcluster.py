"""A Ray cluster on this machine, bound to 127.0.0.1: started for the demo and the tests, and
stopped without touching any other Ray cluster on the machine.

``ray stop`` stops every Ray process of the user, so it is not used. Instead every process of
the cluster is found by what it cannot hide: a marker variable in its environment (inherited by
everything ``ray start`` spawns) or an open file in the cluster's own temp dir (Ray renames its
workers, which overwrites what /proc shows of their environment, but they keep their logs open).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from alexray_core.errors import AlexrayError

MARKER = "ALEXRAY_LOCAL_CLUSTER"
# Ray's switch for a single-node cluster on loopback (its macOS default). Unset, Ray swaps
# 127.0.0.1 for the machine's address and its GCS, raylet and agents listen on every interface;
# set to 0, the node address stays 127.0.0.1 and every server listens on loopback only. Every
# process that talks to such a cluster (drivers, 'ray' commands) needs it too: the cluster's env has it.
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class ClusterStartError(AlexrayError):
    """The local cluster did not come up; the message says why and what to do."""


@dataclass
class LocalCluster:
    gcs_address: str  # host:port of the head (ray.init / RAY_ADDRESS)
    dashboard_url: str | None  # http://127.0.0.1:port: the dashboard and Jobs API
    temp_dir: str  # Ray's session files and logs
    marker: str  # value of ALEXRAY_LOCAL_CLUSTER in every process of this cluster
    token: str | None  # the auth token, when token auth is on
    env: dict = field(default_factory=dict)  # environment the cluster runs with (HOME, token path...)

    def pids(self) -> list[int]:
        return cluster_pids(self)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (another process may take it before it is bound again)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C (SIGINT) until the block ends, then deliver it: for starting a process and
    keeping its handle in one step, and for cleaning up, which a second Ctrl-C must not cut short."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals only ever reach the main thread
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(signal.SIGINT, None)  # Python's own handler raises KeyboardInterrupt
        elif received and previous == signal.SIG_DFL:
            raise KeyboardInterrupt


def write_token_file(path: str | Path, token: str) -> Path:
    """Write ``token`` to ``path`` readable by this user only (0600), whatever an older file's mode was.

    A new file is written and renamed over the old one, so the token is never in a file others
    can read, not even for a moment, and a link planted at ``path`` is replaced, not followed.
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, token.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def use_private_token(env: dict | None = None) -> Path:
    """Token auth for a cluster that this process starts itself (``ray.init()`` without an address).

    A fresh token goes into a new directory only this user can read, and ``env`` (default: this
    process's environment, which the cluster's processes inherit) gets ``RAY_AUTH_MODE=token`` and
    ``RAY_AUTH_TOKEN_PATH``. Without this, Ray either runs without auth (``RAY_AUTH_MODE=disabled``
    left in the shell for another cluster) or writes a token shared by every cluster of the user to
    ``~/.ray/auth_token``, readable by everyone under the usual umask. Returns the directory, to
    remove once the cluster is stopped.
    """
    target = os.environ if env is None else env
    directory = Path(tempfile.mkdtemp(prefix="alexray-token-"))  # 0700
    path = write_token_file(directory / "auth_token", secrets.token_hex(32))
    target.pop("RAY_AUTH_TOKEN", None)  # it would win over the file
    target.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(path))
    if env is None and "ray._raylet" in sys.modules:
        # Ray caches its configuration and the token when first used; refresh both, as Ray does
        # when it turns token auth on itself.
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    return directory


def _ray_binary() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def start_local_cluster(num_cpus: int, dashboard: bool = True, token_auth: bool = True,
                        env: dict | None = None, token_file: str | Path | None = None,
                        temp_dir: str | None = None, timeout: float = 180.0,
                        loopback_only: bool = True) -> LocalCluster:
    """Start a one-node Ray cluster listening on 127.0.0.1 only.

    ``loopback_only=False`` lets more nodes join ('ray start --address'): Ray then gives the head
    the machine's address and listens on every interface (the dashboard stays on 127.0.0.1).

    With ``token_auth`` a fresh token is written to ``token_file`` (default: in the temp dir,
    mode 0600) and the cluster runs with ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``
    pointing at it; clients send it as a Bearer header. ``env`` is the base environment (default:
    this process's, without any RAY_ADDRESS or token settings that would point elsewhere).
    """
    base = dict(os.environ if env is None else env)
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        base.pop(name, None)
    # Short: Ray's socket paths have a length limit, so not under a deep project directory.
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    marker = secrets.token_hex(8)
    base.update({MARKER: marker, "RAY_USAGE_STATS_ENABLED": "0"})
    if loopback_only:
        base.update(LOOPBACK_ONLY)
    else:
        for name in LOOPBACK_ONLY:
            base.pop(name, None)
    token = None
    if token_auth:
        token = secrets.token_hex(32)
        path = write_token_file(Path(token_file) if token_file else Path(temp_dir) / "auth_token", token)
        base.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(path))
    port = free_port()
    command = [_ray_binary(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
               f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--metrics-export-port={free_port()}"]
    dashboard_url = None
    if dashboard:
        dashboard_port = free_port()
        dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        command += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
    else:
        command.append("--include-dashboard=false")
    cluster = LocalCluster(f"127.0.0.1:{port}", dashboard_url, temp_dir, marker, token, base)
    try:
        try:
            done = subprocess.run(command, env=base, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ClusterStartError(f"'ray start' did not finish within {timeout:.0f} s; see the logs in "
                                    f"{temp_dir}") from None
        if done.returncode:
            lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
            raise ClusterStartError(f"'ray start' failed: {(lines or ['no output'])[-1].strip()}")
        if dashboard_url:
            _wait_for_jobs_api(cluster, time.monotonic() + timeout)
    except BaseException:
        # A failure or Ctrl-C at any point of the start: 'ray start' may have started the GCS, the
        # raylet and the dashboard already, and they outlive it; stop whatever of them is running.
        with interrupts_deferred():
            stop_local_cluster(cluster)
        raise
    return cluster


def _wait_for_jobs_api(cluster: LocalCluster, deadline: float) -> None:
    """The Jobs API comes up a little after 'ray start' returns."""
    import requests

    headers = {"Authorization": f"Bearer {cluster.token}"} if cluster.token else {}
    while True:
        try:
            if requests.get(f"{cluster.dashboard_url}/api/jobs/", headers=headers, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise ClusterStartError(f"Ray's Jobs API at {cluster.dashboard_url} did not come up; "
                                    f"see {cluster.temp_dir}/session_latest/logs/dashboard.log")
        time.sleep(0.5)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True  # gone


def cluster_pids(cluster: LocalCluster) -> list[int]:
    """Live processes of the cluster (Linux /proc)."""
    return _live_pids(f"{MARKER}={cluster.marker}".encode(), cluster.temp_dir)


def processes_using(directory: str) -> list[int]:
    """Live processes whose working directory or an open file is under ``directory`` (Linux /proc)."""
    return _live_pids(None, directory)


def _live_pids(marker: bytes | None, directory: str) -> list[int]:
    """Processes, other than this one, with ``marker`` in their environment or files under ``directory``."""
    directory = directory.rstrip("/")
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid() or _is_zombie(int(entry.name)):
            continue
        try:
            found = marker is not None and marker in (entry / "environ").read_bytes().split(b"\0")
            if not found:
                links = [os.readlink(entry / "cwd")] + [os.readlink(fd) for fd in (entry / "fd").iterdir()]
                found = any(link == directory or link.startswith(directory + "/") for link in links)
        except OSError:
            continue
        if found:
            pids.append(int(entry.name))
    return pids


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def stop_local_cluster(cluster: LocalCluster, remove_temp_dir: bool = True) -> list[str]:
    """Stop exactly this cluster's processes (TERM, then KILL); returns any that survived."""
    for sig, wait in ((signal.SIGTERM, 8.0), (signal.SIGKILL, 5.0)):
        for pid in cluster_pids(cluster):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while cluster_pids(cluster) and time.monotonic() < deadline:
            time.sleep(0.2)
    left = [f"{pid} {command_line(pid)[:120]}" for pid in cluster_pids(cluster)]
    if remove_temp_dir and not left:
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    return left
