"""Submit, follow and control alexray training runs through Ray's Jobs API.

The Jobs API is served by the Ray dashboard over HTTP (``http://HEAD:8265``), so a laptop needs no
Ray driver connection, no torch and no open GCS port to run a job on a cluster.

**Addresses.** ``resolve_address`` takes the argument, then ``RAY_API_SERVER_ADDRESS`` (Ray's own
variable for the Jobs API), then ``RAY_ADDRESS``, then ``http://127.0.0.1:8265``. A bare
``host:port`` becomes ``http://host:port``, a bare host gets the dashboard port 8265, ``auto``
means the local default. ``ray://`` client addresses and GCS ports (6379) are refused with the fix.

**Security.** The Jobs API runs whatever command it is given, on every node's credentials.
Clusters with port 8265 open were taken over in the wild (ShadowRay, CVE-2023-48022), and a Ray
token travels in clear text over plain HTTP. So a plain ``http://`` address whose host is not
loopback (127.0.0.0/8, ``localhost``, ``::1``) is refused before any connection is made, unless
``insecure=True``: use an SSH tunnel (``ssh -L 8265:127.0.0.1:8265 HEAD``) or an https proxy.

**Tokens.** Ray 2.52+ clusters started with ``RAY_AUTH_MODE=token`` (or, since 2.59, any ``ray
start --head`` that finds a token) refuse requests without ``Authorization: Bearer TOKEN``. The
token is read from ``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token`` (Ray's own order) and passed to ``JobSubmissionClient(headers=...)``; Ray's
client keeps a caller's ``Authorization`` header as given. No token is sent when none is found.
Refusals (401: none sent, 403: wrong one) become a ``JobError`` naming ``RAY_AUTH_TOKEN``.

**How a run reaches the cluster.** ``submit`` validates the spec here, makes its local paths
absolute, fixes ``run.name`` (so ``status`` knows the run directory before the job starts) and
runs the preflight checks. The validated spec is written as ``job-spec.yaml`` into a fresh
temporary directory shipped as the job's ``runtime_env`` ``working_dir`` (Ray zips it, uploads it
through the dashboard and unpacks it as the entrypoint's working directory; the spec path on the
laptop means nothing on the cluster, and a file avoids shell quoting and command-length limits).
The entrypoint is ``PYTHON -u -m orchestrator.cli train job-spec.yaml``: ``alexray train`` on the
cluster, which starts Ray Train's TorchTrainer in the job's driver and connects to the cluster
through the ``RAY_ADDRESS`` that Ray's job supervisor sets for every entrypoint (``python -m
workers`` would train without Ray). ``PYTHON`` is this interpreter (``sys.executable``) when the
cluster is on loopback: a local cluster started from a virtualenv runs entrypoints with whatever
``python`` its PATH finds, which need not be the one with alexray installed. For a remote cluster
it is ``python``: the nodes need alexray installed in the interpreter on their PATH. A remote
cluster reached through an SSH tunnel looks local: name its interpreter with ``python=``
(``--python``) or ``ALEXRAY_CLUSTER_PYTHON``. The working directory becomes the current directory of the driver and of every
worker of the job, which is why local paths are made absolute first; local paths must name the
same place on this machine and on the nodes (a shared file system), else use ``s3://``.

Nothing secret goes into the job: specs carrying secrets are refused by ``load_spec``, the
runtime_env holds no ``env_vars``, and the metadata holds only the run name and its storage
(``alexray_run``, ``alexray_storage``). Nodes reach S3 through their own credential chain.

Every function raises ``JobError`` (a ``ValueError``) with a one-line message naming the problem
and the fix; ``exit_code`` is 2 for bad input or environment, 1 for a job that ran and failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import shlex
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Iterator
from urllib.parse import urlsplit

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DASHBOARD_PORT = 8265
SPEC_FILE = "job-spec.yaml"
RUN_KEY = "alexray_run"
STORAGE_KEY = "alexray_storage"
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
PYTHON_ENV = "ALEXRAY_CLUSTER_PYTHON"  # the interpreter that runs the entrypoint on the cluster
TOKEN_HINT = ("set RAY_AUTH_TOKEN to the cluster's token (print it with 'ray get-auth-token' on the head), "
              "or point RAY_AUTH_TOKEN_PATH at a file holding it")


class JobError(ValueError):
    """A problem the user can fix; the message names it and the fix, on one line."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


# --- addresses and security -------------------------------------------------------------------

def resolve_address(address: str | None = None) -> str:
    """The Jobs API (dashboard) URL: the argument, RAY_API_SERVER_ADDRESS, RAY_ADDRESS, the local default."""
    source = "--address"
    if not address:
        for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            if os.environ.get(name, "").strip():
                address, source = os.environ[name].strip(), name
                break
        else:
            return DEFAULT_ADDRESS
    address = address.strip()
    if address in ("auto", "local"):
        return DEFAULT_ADDRESS
    if address.startswith("ray://"):
        raise JobError(f"{source}: {address} is a Ray Client address; the Jobs API is the dashboard's HTTP "
                       f"address: pass e.g. http://HEAD:{DASHBOARD_PORT}")
    bare = "://" not in address
    if bare:
        address = f"http://{address}"
    try:
        parts = urlsplit(address)
        port = parts.port
    except ValueError as e:
        raise JobError(f"{source}: {address!r} is not a valid address ({e}); pass http(s)://HOST:PORT") from None
    if parts.scheme not in ("http", "https"):
        raise JobError(f"{source}: unsupported scheme {parts.scheme!r} in {address}; "
                       f"pass the dashboard address, http(s)://HOST:{DASHBOARD_PORT}")
    if parts.username or parts.password:
        raise JobError(f"{source}: the address carries credentials; remove them and give the cluster's token "
                       "through RAY_AUTH_TOKEN")
    if not parts.hostname:
        raise JobError(f"{source}: {address!r} names no host; pass http(s)://HOST:{DASHBOARD_PORT}")
    if port == 6379:
        raise JobError(f"{source}: {address} looks like the cluster's GCS port (6379); the Jobs API listens on "
                       f"the dashboard port: pass http://{parts.hostname}:{DASHBOARD_PORT}")
    netloc = parts.netloc
    if port is None and bare and not parts.path.strip("/"):
        netloc = f"{netloc}:{DASHBOARD_PORT}"  # a bare host: the dashboard's default port
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


def is_loopback(address: str) -> bool:
    """True when the URL's host is a loopback address or ``localhost`` (no name is looked up)."""
    host = (urlsplit(address).hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_secure(address: str, insecure: bool = False) -> None:
    """Refuse plain HTTP to a host other than this one, before anything is sent."""
    if insecure or urlsplit(address).scheme != "http" or is_loopback(address):
        return
    host = urlsplit(address).hostname
    raise JobError(
        f"refusing plain http:// to {address}: the Ray Jobs API runs arbitrary code and the token would travel "
        f"in clear text (clusters with an open port {DASHBOARD_PORT} were taken over: ShadowRay, CVE-2023-48022); "
        f"use an SSH tunnel (ssh -L {DASHBOARD_PORT}:127.0.0.1:{DASHBOARD_PORT} {host}, then "
        f"--address http://127.0.0.1:{DASHBOARD_PORT}) or https://, or pass --insecure on a trusted network")


def auth_token() -> tuple[str | None, str]:
    """``(token, where it came from)``: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token, or None."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise JobError(f"RAY_AUTH_TOKEN_PATH: cannot read {path} ({e.strerror}); {TOKEN_HINT}") from None
        if not token:
            raise JobError(f"RAY_AUTH_TOKEN_PATH: {path} is empty; {TOKEN_HINT}")
        return token, f"RAY_AUTH_TOKEN_PATH ({path})"
    default = Path.home() / ".ray" / "auth_token"
    try:
        token = default.read_text().strip()
    except OSError:
        return None, "no token"
    return (token, str(default)) if token else (None, "no token")


# --- the client and its errors ----------------------------------------------------------------

_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _without_address_env() -> Iterator[None]:
    # JobSubmissionClient replaces the address it is given with RAY_API_SERVER_ADDRESS or RAY_ADDRESS
    # when either is set; the address checked above must be the one contacted.
    with _ENV_LOCK:
        saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
        try:
            yield
        finally:
            os.environ.update(saved)


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


@contextlib.contextmanager
def guard(address: str, token_source: str = "the token") -> Iterator[None]:
    """Turn the Jobs SDK's connection, TLS and authentication errors into JobErrors."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except JobError:
        raise
    except AuthenticationError as e:
        text = str(e.message if hasattr(e, "message") else e)
        if text.startswith("Authentication required") or "401" in text:
            raise JobError(f"the Ray cluster at {address} requires a token and none was sent; {TOKEN_HINT}") from None
        raise JobError(f"the Ray cluster at {address} refused {token_source}; {TOKEN_HINT}") from None
    except requests.exceptions.SSLError as e:
        raise JobError(f"TLS check failed for {address} ({_one_line(e)[:200]}); fix the certificate "
                       "or pass verify= with the cluster's CA bundle") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError) as e:
        raise JobError(f"cannot reach the Ray cluster at {address}: start one with 'ray start --head' "
                       "or pass --address") from e
    except Exception as e:  # aiohttp's errors while following logs
        name = type(e).__name__
        if name == "WSServerHandshakeError" and getattr(e, "status", None) in (401, 403):
            raise JobError(f"the Ray cluster at {address} refused {token_source}; {TOKEN_HINT}") from None
        if name.startswith("ClientConnector") or name == "ServerDisconnectedError":
            raise JobError(f"cannot reach the Ray cluster at {address}: start one with 'ray start --head' "
                           "or pass --address") from e
        if isinstance(e, RuntimeError) and "Version check returned 404" in str(e):
            raise JobError(f"{address} answers HTTP but is not a Ray dashboard with the Jobs API; "
                           f"pass the dashboard address (port {DASHBOARD_PORT} by default)") from None
        raise


def client(address: str | None = None, insecure: bool = False, verify: bool | str = True):
    """A ``JobSubmissionClient`` for the cluster, sending the Ray token when one is found.

    The address is checked (``check_secure``) before anything is sent; the client's constructor
    then checks the connection and the cluster's Ray version.
    """
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    check_secure(address, insecure)
    token, source = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with guard(address, f"the token from {source}"), _without_address_env():
        job_client = JobSubmissionClient(address, headers=headers, verify=verify)
    job_client.alexray_address = address  # for messages
    job_client.alexray_token_source = source
    return job_client


def _client_of(address, insecure: bool):
    if address is not None and not isinstance(address, str):
        return address  # already a client
    return client(address, insecure)


def _guard_of(job_client):
    return guard(getattr(job_client, "alexray_address", "the cluster"),
                 f"the token from {getattr(job_client, 'alexray_token_source', 'this machine')}")


# --- jobs ---------------------------------------------------------------------------------------

def _absolute(path: str) -> str:
    if path.startswith("s3://"):
        return path
    return os.path.abspath(os.path.expanduser(path.removeprefix("file://")))


def _job_dict(info) -> dict:
    metadata = dict(info.metadata or {})
    status = getattr(info.status, "value", info.status)
    return {
        "job_id": info.submission_id or info.job_id,
        "ray_job_id": info.job_id,
        "status": str(status),
        "message": info.message,
        "run_name": metadata.get(RUN_KEY),
        "storage": metadata.get(STORAGE_KEY),
        "entrypoint": info.entrypoint,
        "start_time": info.start_time / 1000 if info.start_time else None,
        "end_time": info.end_time / 1000 if info.end_time else None,
        "driver_exit_code": getattr(info, "driver_exit_code", None),
    }


def _find_job(job_client, ref: str | None) -> dict:
    """A job by submission id, Ray job id or run name (the newest job of that run); None: the newest run."""
    address = getattr(job_client, "alexray_address", "the cluster")
    with _guard_of(job_client):
        jobs = [_job_dict(j) for j in job_client.list_jobs()]
    jobs.sort(key=lambda j: j["start_time"] or 0)
    ours = [j for j in jobs if j["run_name"]]
    if ref is None:
        if not ours:
            raise JobError(f"no alexray job on the cluster at {address}: submit one first")
        return ours[-1]
    for job in jobs:
        if ref == job["job_id"]:
            return job
    infos = [j for j in jobs if ref == j["ray_job_id"]]
    by_run = [j for j in ours if j["run_name"] == ref]
    if infos or by_run:
        return (infos or by_run)[-1]
    raise JobError(f"no job or run {ref!r} on the cluster at {address}: list them with 'alexray list'")


def submit(spec_path, overrides: list[str] | tuple = (), address: str | None = None, insecure: bool = False,
           wait: bool = False, *, python: str | None = None, check_resources: bool = True,
           timeout: float | None = None) -> tuple[str, str]:
    """Validate, preflight and submit a training run; returns ``(job_id, run_name)``.

    ``spec_path`` is a YAML file (or a mapping), ``overrides`` are ``section.field=value`` strings.
    With ``wait`` it returns once the job has ended and raises ``JobError`` (exit code 1) unless it
    succeeded. ``python`` overrides the interpreter that runs the entrypoint on the cluster.
    """
    import yaml

    from alexray_core.spec import SpecError, load_spec, new_run_name, spec_from_dict

    from .preflight import preflight

    try:
        spec = load_spec(spec_path, list(overrides))
    except SpecError as e:
        raise JobError(str(e)) from None
    address = resolve_address(address)
    check_secure(address, insecure)
    spec.data.path = _absolute(spec.data.path)
    spec.run.storage = _absolute(spec.run.storage)
    if spec.finetune.from_checkpoint:
        spec.finetune.from_checkpoint = _absolute(spec.finetune.from_checkpoint)
    if spec.run.name is None:
        spec.run.name = new_run_name(spec.model.name)
    job_client = client(address, insecure)
    preflight(spec, address, job_client, check_resources=check_resources)

    data = spec.to_dict()
    spec_from_dict(data)  # what the cluster will read back must still be a valid spec
    interpreter = python or os.environ.get(PYTHON_ENV) or (sys.executable if is_loopback(address) else "python")
    entrypoint = f"{shlex.quote(interpreter)} -u -m orchestrator.cli train {SPEC_FILE}"
    metadata = {RUN_KEY: spec.run.name, STORAGE_KEY: spec.run.storage}
    # Ray logs every package upload at INFO; the job id printed by the caller says enough.
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="alexray-job-") as tmp:
        (Path(tmp) / SPEC_FILE).write_text(
            f"# run {spec.run.name}: the validated spec, as submitted from {socket.gethostname()}\n"
            + yaml.safe_dump(data, sort_keys=False))
        with _guard_of(job_client):
            job_id = job_client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": tmp},
                                           metadata=metadata)
    if wait:
        final = wait_for(job_client, job_id, timeout=timeout)
        if final != "SUCCEEDED":
            info = _find_job(job_client, job_id)
            raise JobError(f"job {job_id} (run {spec.run.name}) {final}: {failure_reason(info['message'])}; "
                           f"see 'alexray logs {job_id}'", exit_code=1)
    return job_id, spec.run.name


def resume(address, run_name: str, overrides: list[str] | tuple = (), *, storage: str | None = None,
           insecure: bool = False, wait: bool = False, python: str | None = None,
           check_resources: bool = True, timeout: float | None = None) -> dict:
    """Resubmit the run ``run_name`` so that it continues from its newest checkpoint.

    The run's storage comes from ``storage`` or from the metadata of its newest job on the cluster;
    its spec from ``{storage}/{run_name}/spec.json``. ``overrides`` may change what does not
    define the job (epochs, lr, workers...); the data, batch, seed and model must stay, which the
    preflight checks. Returns ``{"job_id", "run_name", "checkpoint", "step"}``; ``checkpoint`` is
    None when the run had not checkpointed yet (it then starts from step 0).
    """
    from data_prep.errors import ShardError
    from data_prep.storage import open_storage

    address = resolve_address(address)
    check_secure(address, insecure)
    job_client = client(address, insecure)
    with _guard_of(job_client):
        runs = [_job_dict(j) for j in job_client.list_jobs()]
    runs = sorted((j for j in runs if j["run_name"] == run_name), key=lambda j: j["start_time"] or 0)
    active = [j for j in runs if j["status"] in ("PENDING", "RUNNING")]
    if active:
        raise JobError(f"run {run_name!r} is still {active[-1]['status']} as job {active[-1]['job_id']}; "
                       f"stop it first with 'alexray stop {active[-1]['job_id']}'")
    storage = storage or (runs[-1]["storage"] if runs else None)
    if not storage:
        raise JobError(f"no job of run {run_name!r} on the cluster at {address} says where the run lives; "
                       "pass --storage (the spec's run.storage)")
    storage = _absolute(storage)
    run_dir = f"{storage.rstrip('/')}/{run_name}"
    try:
        store = open_storage(run_dir)
        if not store.exists("spec.json"):
            raise JobError(f"no run {run_name!r} in {storage} ({run_dir}/spec.json is missing); check the name "
                           "with 'alexray list' or pass --storage")
        spec = json.loads(store.read_bytes("spec.json"))
    except ShardError as e:
        raise JobError(f"run.storage: {e}") from None
    progress = run_progress(storage, run_name)
    if progress["summary"] is not None and not overrides:
        raise JobError(f"run {run_name!r} already finished ({progress['step']} steps, see {run_dir}/summary.json); "
                       "to train it further, resume with --set train.epochs=N")
    spec["run"] = {**spec.get("run", {}), "name": run_name, "storage": storage}
    job_id, _ = submit(spec, overrides, address, insecure, wait=wait, python=python,
                       check_resources=check_resources, timeout=timeout)
    step = None
    if progress["newest_checkpoint"]:
        step = int(progress["newest_checkpoint"].rsplit("_s", 1)[1])
    return {"job_id": job_id, "run_name": run_name, "checkpoint": progress["newest_checkpoint"], "step": step}


def failure_reason(message: str | None) -> str:
    """One line from Ray's job message, which may carry the last lines of the log."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    if not lines:
        return "no message"
    head = lines[0].split(", last available logs")[0].rstrip(":")
    errors = [line for line in lines[1:] if re.search(r"error|exception|not found|killed", line, re.IGNORECASE)
              and " INFO " not in line]
    return f"{head}: {errors[-1]}" if errors else head


def wait_for(address, job_id: str, timeout: float | None = None, poll: float = 1.0,
             insecure: bool = False) -> str:
    """Wait until the job ends; returns SUCCEEDED, FAILED or STOPPED."""
    job_client = _client_of(address, insecure)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with _guard_of(job_client):
            state = str(getattr(job_client.get_job_status(job_id), "value", "")) or "PENDING"
        if state in TERMINAL:
            return state
        if deadline is not None and time.monotonic() > deadline:
            raise JobError(f"job {job_id} is still {state} after {timeout:g} s; follow it with "
                           f"'alexray logs --follow {job_id}'", exit_code=1)
        time.sleep(poll)


def run_progress(storage: str, run_name: str) -> dict:
    """What the run directory ``{storage}/{run_name}/`` says: progress, restarts, checkpoints, results.

    Missing files give None fields (a run that has not started yet); an unreadable storage gives
    ``progress_error`` rather than an exception, so a job's status shows without storage access.
    """
    from data_prep.errors import ShardError
    from data_prep.storage import open_storage

    run_dir = f"{storage.rstrip('/')}/{run_name}"
    out: dict = {"run_dir": run_dir, "epoch": None, "step": None, "steps_per_epoch": None, "loss": None,
                 "images_per_s": None, "progress_time": None, "top1": None, "top5": None, "best_top1": None,
                 "restarts": None, "newest_checkpoint": None, "summary": None}
    try:
        store = open_storage(run_dir)

        def read(name: str):
            if not store.exists(name):
                return None
            try:
                return json.loads(store.read_bytes(name))
            except ValueError:
                return None  # being replaced; the next look will see it

        progress = read("progress.json") or {}
        for key in ("epoch", "step", "steps_per_epoch", "loss", "images_per_s"):
            out[key] = progress.get(key)
        out["progress_time"] = progress.get("time")
        attempts = [o for o in store.list("attempts/") if o.name.endswith(".json")]
        out["restarts"] = max(0, len(attempts) - 1) if attempts else None
        # Only a checkpoint Ray has registered is one a restart or 'alexray resume' continues from: a
        # complete directory whose (async) report Ray had not taken when the job stopped is not, so it
        # is not shown - a job stopped before its first registration resumes from step 0.
        registered = ((read("checkpoint_manager_snapshot.json") or {}).get("latest_checkpoint_result") or {})
        newest = registered.get("checkpoint_dir_name")
        if newest and store.exists(f"{newest}/complete.json"):
            out["newest_checkpoint"] = f"{run_dir}/{newest}"
        best = read("best/metrics.json") or {}
        out["best_top1"] = best.get("val_top1")
        summary = read("summary.json")
        if summary:
            summary = {k: v for k, v in summary.items() if k not in ("history", "model")}
            out["summary"] = summary
            out.update(top1=summary.get("top1"), top5=summary.get("top5"), restarts=summary.get("restarts"),
                       best_top1=summary.get("best_top1", out["best_top1"]),
                       epoch=summary.get("epochs"), step=summary.get("steps"))
            if summary.get("images_per_s") is not None:
                out["images_per_s"] = summary["images_per_s"]
    except (ShardError, OSError) as e:
        out["progress_error"] = f"cannot read {run_dir}: {e}"
    return out


def status(address=None, job_id: str | None = None, *, insecure: bool = False) -> dict:
    """A job's state and its run's progress; ``job_id`` may also be a run name, None: the newest run."""
    job = _find_job(_client_of(address, insecure), job_id)
    if job["run_name"] and job["storage"]:
        job.update(run_progress(job["storage"], job["run_name"]))
    return job


def list_jobs(address=None, *, insecure: bool = False, all_jobs: bool = False) -> list[dict]:
    """The cluster's alexray jobs (every job with ``all_jobs``), oldest first, as plain dicts."""
    job_client = _client_of(address, insecure)
    with _guard_of(job_client):
        jobs = [_job_dict(j) for j in job_client.list_jobs()]
    jobs.sort(key=lambda j: j["start_time"] or 0)
    return jobs if all_jobs else [j for j in jobs if j["run_name"]]


def logs(address, job_id: str, follow: bool = False, *, insecure: bool = False, out: IO[str] | None = None) -> str:
    """The job's driver output so far; with ``follow``, stream it to ``out`` (stdout) until the job ends."""
    job_client = _client_of(address, insecure)
    job_id = _find_job(job_client, job_id)["job_id"]
    if not follow:
        with _guard_of(job_client):
            return job_client.get_job_logs(job_id)
    out = sys.stdout if out is None else out
    chunks: list[str] = []

    async def tail() -> None:
        async for chunk in job_client.tail_job_logs(job_id):
            chunks.append(chunk)
            out.write(chunk)
            out.flush()

    try:
        with _guard_of(job_client):
            asyncio.run(tail())
    except RuntimeError as e:
        if "closed unexpectedly" not in str(e) and "WebSocket" not in str(e):
            raise
        # The stream broke (a dashboard restart): finish by polling the full log.
        seen = sum(len(c) for c in chunks)
        while True:
            with _guard_of(job_client):
                done = str(getattr(job_client.get_job_status(job_id), "value", "")) in TERMINAL
                text = job_client.get_job_logs(job_id)
            if len(text) > seen:
                out.write(text[seen:])
                out.flush()
                chunks.append(text[seen:])
                seen = len(text)
            if done:
                break
            time.sleep(1.0)
    return "".join(chunks)


def stop(address, job_id: str, *, insecure: bool = False, wait: bool = True, timeout: float = 60) -> dict:
    """Ask the job to stop (SIGTERM, then SIGKILL after Ray's grace period); with ``wait``, until it has."""
    job_client = _client_of(address, insecure)
    job = _find_job(job_client, job_id)
    with _guard_of(job_client):
        requested = bool(job_client.stop_job(job["job_id"]))
    final = wait_for(job_client, job["job_id"], timeout=timeout) if wait and requested else None
    if final is None:
        with _guard_of(job_client):
            final = str(getattr(job_client.get_job_status(job["job_id"]), "value", ""))
    return {"job_id": job["job_id"], "run_name": job["run_name"], "stop_requested": requested, "status": final}
