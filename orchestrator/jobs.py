"""Submit, follow and control alexray training runs through Ray's Jobs API.

The Jobs API is served by the Ray dashboard over HTTP (``http://HEAD:8265``), so a laptop needs no
Ray driver connection, no torch and no open GCS port to run a job on a cluster.

**Addresses, tokens, security**: ``orchestrator.rayclient``.

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

Every function raises ``JobError`` with a one-line message naming the problem
and the fix; ``exit_code`` is 2 for bad input or environment, 1 for a job that ran and failed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from alexray_core import goodput, runs
from alexray_core.spec import (
    SpecError,
    load_spec,
    new_run_name,
    spec_from_dict,
    torchvision_source,
)
from alexray_core.storage import StorageError, absolute_location, open_storage
from data_prep.errors import ShardError

from .preflight import preflight
from .rayclient import (
    JobError,
    check_secure,
    client,
    client_address,
    client_of,
    guard_of,
    is_loopback,
    resolve_address,
)

SPEC_FILE = "job-spec.yaml"
RUN_KEY = "alexray_run"
STORAGE_KEY = "alexray_storage"
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
PYTHON_ENV = "ALEXRAY_CLUSTER_PYTHON"  # the interpreter that runs the entrypoint on the cluster
# --- jobs ---------------------------------------------------------------------------------------

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
    address = client_address(job_client)
    with guard_of(job_client):
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

    submitted = time.time()
    try:
        spec = load_spec(spec_path, list(overrides))
    except SpecError as e:
        raise JobError(str(e)) from None
    address = resolve_address(address)
    check_secure(address, insecure)
    spec.data.path = absolute_location(spec.data.path)
    spec.run.storage = absolute_location(spec.run.storage)
    if spec.finetune.from_checkpoint and torchvision_source(spec.finetune.from_checkpoint) is None:
        spec.finetune.from_checkpoint = absolute_location(spec.finetune.from_checkpoint)
    if spec.run.name is None:
        spec.run.name = new_run_name(spec.model.name)
    job_client = client(address, insecure)
    preflight(spec, job_client, check_resources=check_resources)

    data = spec.to_dict()
    spec_from_dict(data)  # what the cluster will read back must still be a valid spec
    interpreter = python or os.environ.get(PYTHON_ENV) or (sys.executable if is_loopback(address) else "python")
    # the run's account (goodput) starts at this submit, not when the cluster gets to the job
    entrypoint = f"{shlex.quote(interpreter)} -u -m orchestrator.cli train {SPEC_FILE} --submitted-at {submitted:.3f}"
    metadata = {RUN_KEY: spec.run.name, STORAGE_KEY: spec.run.storage}
    # Ray logs every package upload at INFO; the job id printed by the caller says enough.
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="alexray-job-") as tmp:
        (Path(tmp) / SPEC_FILE).write_text(
            f"# run {spec.run.name}: the validated spec, as submitted from {socket.gethostname()}\n"
            + yaml.safe_dump(data, sort_keys=False))
        with guard_of(job_client):
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
    address = resolve_address(address)
    check_secure(address, insecure)
    job_client = client(address, insecure)
    with guard_of(job_client):
        jobs = [_job_dict(j) for j in job_client.list_jobs()]
    jobs = sorted((j for j in jobs if j["run_name"] == run_name), key=lambda j: j["start_time"] or 0)
    active = [j for j in jobs if j["status"] in ("PENDING", "RUNNING")]
    if active:
        raise JobError(f"run {run_name!r} is still {active[-1]['status']} as job {active[-1]['job_id']}; "
                       f"stop it first with 'alexray stop {active[-1]['job_id']}'")
    storage = storage or (jobs[-1]["storage"] if jobs else None)
    if not storage:
        raise JobError(f"no job of run {run_name!r} on the cluster at {address} says where the run lives; "
                       "pass --storage (the spec's run.storage)")
    storage = absolute_location(storage)
    run_dir = runs.run_dir(storage, run_name)
    try:
        store = open_storage(run_dir)
        if not store.exists(runs.SPEC):
            raise JobError(f"no run {run_name!r} in {storage} ({run_dir}/{runs.SPEC} is missing); check the name "
                           "with 'alexray list' or pass --storage")
        spec = json.loads(store.read_bytes(runs.SPEC))
    except (ShardError, StorageError) as e:
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
        step = runs.checkpoint_step(progress["newest_checkpoint"])
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
    job_client = client_of(address, insecure)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with guard_of(job_client):
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
    run_dir = runs.run_dir(storage, run_name)
    out: dict = {"run_dir": run_dir, "epoch": None, "step": None, "steps_per_epoch": None, "loss": None,
                 "images_per_s": None, "progress_time": None, "top1": None, "top5": None, "best_top1": None,
                 "flops_per_s": None, "mfu": None, "restarts": None, "newest_checkpoint": None, "goodput": None,
                 "summary": None}
    try:
        files = runs.RunFiles(run_dir, open_storage(run_dir))
        progress = files.progress()
        for key in ("epoch", "step", "steps_per_epoch", "loss", "images_per_s", "flops_per_s", "mfu"):
            out[key] = progress.get(key)
        out["progress_time"] = progress.get("time")
        attempts = files.attempts()
        out["restarts"] = max(0, attempts - 1) if attempts else None
        newest = files.registered_checkpoint()  # what a restart or 'alexray resume' continues from
        if newest:
            out["newest_checkpoint"] = f"{run_dir}/{newest}"
        out["best_top1"] = files.best_metrics().get("val_top1")
        summary = files.summary()
        if summary:
            summary = {k: v for k, v in summary.items() if k not in ("history", "model")}
            out["summary"] = summary
            out.update(top1=summary.get("top1"), top5=summary.get("top5"), restarts=summary.get("restarts"),
                       best_top1=summary.get("best_top1", out["best_top1"]),
                       epoch=summary.get("epochs"), step=summary.get("steps"))
            for key in ("images_per_s", "flops_per_s", "mfu"):
                if summary.get(key) is not None:
                    out[key] = summary[key]
        out["goodput"] = (summary or {}).get("goodput") or live_goodput(files.storage)
    except (ShardError, StorageError, OSError) as e:
        out["progress_error"] = f"cannot read {run_dir}: {e}"
    return out


STALE_AFTER_S = 120  # workers write their ledgers every few seconds while they train


def live_goodput(storage) -> dict | None:
    """The account of a run still going (or one that stopped without a summary), up to now."""
    return goodput.account_of(storage, time.time(), stale_after=STALE_AFTER_S)


def status(address=None, job_id: str | None = None, *, insecure: bool = False) -> dict:
    """A job's state and its run's progress; ``job_id`` may also be a run name, None: the newest run."""
    job = _find_job(client_of(address, insecure), job_id)
    if job["run_name"] and job["storage"]:
        job.update(run_progress(job["storage"], job["run_name"]))
    return job


def list_jobs(address=None, *, insecure: bool = False, all_jobs: bool = False) -> list[dict]:
    """The cluster's alexray jobs (every job with ``all_jobs``), oldest first, as plain dicts."""
    job_client = client_of(address, insecure)
    with guard_of(job_client):
        jobs = [_job_dict(j) for j in job_client.list_jobs()]
    jobs.sort(key=lambda j: j["start_time"] or 0)
    return jobs if all_jobs else [j for j in jobs if j["run_name"]]


def logs(address, job_id: str, follow: bool = False, *, insecure: bool = False, out: IO[str] | None = None) -> str:
    """The job's driver output so far; with ``follow``, stream it to ``out`` (stdout) until the job ends."""
    job_client = client_of(address, insecure)
    job_id = _find_job(job_client, job_id)["job_id"]
    if not follow:
        with guard_of(job_client):
            return job_client.get_job_logs(job_id)
    out = sys.stdout if out is None else out
    chunks: list[str] = []

    async def tail() -> None:
        async for chunk in job_client.tail_job_logs(job_id):
            chunks.append(chunk)
            out.write(chunk)
            out.flush()

    try:
        with guard_of(job_client):
            asyncio.run(tail())
    except RuntimeError as e:
        if "closed unexpectedly" not in str(e) and "WebSocket" not in str(e):
            raise
        # The stream broke (a dashboard restart): finish by polling the full log.
        seen = sum(len(c) for c in chunks)
        while True:
            with guard_of(job_client):
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
    job_client = client_of(address, insecure)
    job = _find_job(job_client, job_id)
    with guard_of(job_client):
        requested = bool(job_client.stop_job(job["job_id"]))
    final = wait_for(job_client, job["job_id"], timeout=timeout) if wait and requested else None
    if final is None:
        with guard_of(job_client):
            final = str(getattr(job_client.get_job_status(job["job_id"]), "value", ""))
    return {"job_id": job["job_id"], "run_name": job["run_name"], "stop_requested": requested, "status": final}
