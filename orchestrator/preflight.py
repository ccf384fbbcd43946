"""Checks run before a job is submitted, so that bad input fails here in one line, not minutes
later on the cluster: the dataset, the run storage, a reused run name, the checkpoint a fine-tuning
run starts from, and whether the cluster can ever hold the requested workers.

Each check raises ``JobError`` (exit code 2) whose message starts with the spec field to fix.
Storage is checked with this machine's credentials: nodes use their own chain, so a pass here
does not prove the nodes can reach it, but a refusal here is almost always a refusal there too.
The cluster's resources come from the dashboard's state API (``/api/v0/nodes``) over the same
authenticated HTTP connection as the Jobs API; no Ray driver connection is made.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from alexray_core import runs
from alexray_core.runs import COMPLETE, MODEL_FILES, STATE, checkpoint_candidates
from alexray_core.spec import (
    JobSpec,
    SpecError,
    check_same_job,
    is_state_dict_file,
    torchvision_source,
)
from alexray_core.storage import StorageError, open_storage
from alexray_core.storage.api import is_s3_url
from data_prep.errors import ShardError
from data_prep.manifest import check_dataset as check

from .rayclient import JobError, client_address, get_json

NODES_ENDPOINT = "/api/v0/nodes?detail=1&limit=10000"


def check_dataset(spec: JobSpec) -> dict:
    """The manifest at ``data.path`` is there and readable, has the splits and the class count asked for."""
    try:
        return check(spec.data.path, spec.data.train_split, spec.data.val_split, spec.model.num_classes)
    except (ShardError, StorageError) as e:
        raise JobError(str(e)) from None


def check_run_storage(spec: JobSpec) -> None:
    """``run.storage`` accepts a write (a probe object is written and deleted)."""
    try:
        open_storage(spec.run.storage).check_writable()
    except (ShardError, StorageError) as e:
        raise JobError(f"run.storage: {e}") from None


def check_run_name(spec: JobSpec) -> dict | None:
    """A run that already exists under ``run.name`` must be the same job; returns its spec, if any."""
    run_dir = runs.run_dir(spec.run.storage, spec.run.name)
    try:
        storage = open_storage(run_dir)
        if not storage.exists(runs.SPEC):
            return None
        existing = json.loads(storage.read_bytes(runs.SPEC))
    except (ShardError, StorageError) as e:
        raise JobError(f"run.storage: {e}") from None
    except ValueError:
        raise JobError(f"run.name: {run_dir}/spec.json is unreadable; pick a new run.name") from None
    try:
        check_same_job(existing, spec)
    except SpecError as e:
        raise JobError(str(e)) from None
    return existing


def cluster_resources(client) -> list[dict]:
    """The alive nodes' total resources, from the dashboard: ``[{"node_ip", "CPU", "GPU"}, ...]``."""
    body, answer = get_json(client, NODES_ENDPOINT)
    try:
        nodes = body["data"]["result"]["result"]
    except (KeyError, TypeError):
        raise JobError(f"cannot read the cluster's nodes from {client_address(client)}{NODES_ENDPOINT} "
                       f"({answer}); is it a Ray >= 2.9 dashboard?", exit_code=1) from None
    out = []
    for node in nodes:
        if node.get("state") != "ALIVE":
            continue
        total = node.get("resources_total") or {}
        out.append({"node_ip": node.get("node_ip"), "CPU": float(total.get("CPU", 0)),
                    "GPU": float(total.get("GPU", 0))})
    return out


def check_cluster(spec: JobSpec, client) -> dict:
    """Enough CPUs (and GPUs) on the alive nodes for the minimum number of workers, each on one node.

    Total capacity counts, not what is free now: a job waits for busy resources, but never gets
    ones the cluster does not have. An autoscaling cluster may grow: skip this check for it.
    """
    address = client_address(client)
    nodes = cluster_resources(client)
    lo, _ = spec.worker_range()
    cpus = spec.scaling.cpus_per_worker
    gpu = spec.scaling.use_gpu
    total_cpu = sum(n["CPU"] for n in nodes)
    total_gpu = sum(n["GPU"] for n in nodes)
    if gpu and total_gpu < 1:
        raise JobError(f"scaling.use_gpu: the cluster at {address} has no GPUs; set scaling.use_gpu=false "
                       "or add GPU nodes")
    # A worker takes cpus_per_worker CPUs (and one GPU) on a single node.
    slots = 0
    for n in nodes:
        fit = int(n["CPU"] // cpus + 1e-9) if cpus > 0 else 0
        if gpu:
            fit = min(fit, int(n["GPU"]))
        slots += fit
    if slots < lo:
        need = f"{lo * cpus:g} CPUs ({cpus:g} per worker, on one node each)"
        if gpu:
            need += f" and {lo} GPUs"
        have = f"{total_cpu:g} CPUs" + (f" and {total_gpu:g} GPUs" if gpu else "")
        raise JobError(f"scaling.num_workers: {lo} workers need {need} but the cluster at {address} has "
                       f"{have} on {len(nodes)} node(s), room for {slots} worker(s); lower scaling.num_workers "
                       "or scaling.cpus_per_worker, or add nodes")
    return {"nodes": len(nodes), "CPU": total_cpu, "GPU": total_gpu, "worker_slots": slots}


def _complete_problem(storage, prefix: str, where: str) -> str | None:
    """Why the checkpoint at ``prefix`` is not complete, or None. Sizes are checked for the weights
    (the workers check their CRC-32 before loading), size and CRC-32 for the small training state."""
    if not storage.exists(f"{prefix}{COMPLETE}"):
        return f"{where} is not a complete checkpoint (no {COMPLETE}): it was being written when its run stopped"
    try:
        files = json.loads(storage.read_bytes(f"{prefix}{COMPLETE}"))["files"]
        listed = {name: (int(files[name]["bytes"]), str(files[name]["crc32"])) for name in MODEL_FILES}
    except (ValueError, KeyError, TypeError):
        return (f"{where}/{COMPLETE} is unreadable or does not list {' and '.join(MODEL_FILES)}: "
                "not an alexray checkpoint")
    for name, (size, crc) in listed.items():
        info = storage.info(f"{prefix}{name}")
        if info is None or info.size != size or (
                name == STATE and f"{zlib.crc32(storage.read_bytes(prefix + name)):08x}" != crc):
            return f"{where}/{name} is missing, truncated or damaged (it differs from {COMPLETE})"
    return None


def _check_weights_file(source: str, field: str) -> str:
    """A ``.pth`` state dict is a readable file here. Its layers are checked on the workers: that
    needs torch, which submitting does not."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise JobError(f"{field}: {path} does not exist or is not a file; pass the path of a .pth state dict")
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as e:
        raise JobError(f"{field}: {path} is not readable here ({e.strerror}); fix its permissions") from None
    return str(path)


def check_finetune_source(spec: JobSpec) -> str | None:
    """``finetune.from_checkpoint`` is a complete checkpoint of the model the spec builds, or a run
    directory holding one, readable from here as the run storage is; returns its address.

    Nothing of it is downloaded but its completeness record and training state. ``torchvision:NAME`` was
    matched to ``model.name`` when the spec was validated; its file is looked up in each node's torch
    hub cache by the workers, as only torchvision knows its name. A ``.pth`` file must be readable here.
    """
    source = spec.finetune.from_checkpoint
    if not source:
        return None
    field = "finetune.from_checkpoint"
    if torchvision_source(source) is not None:
        return source
    if is_state_dict_file(source):
        return _check_weights_file(source, field)
    base = source.rstrip("/")
    if not is_s3_url(base) and Path(base).is_file():  # a file of a checkpoint names its directory
        base = str(Path(base).parent)
    try:
        storage = open_storage(base)
        storage.check_reachable()
        candidates = checkpoint_candidates(storage)
        if not candidates:
            raise JobError(f"{field}: {base} holds no checkpoint (no best/, no checkpoint_e*_s* directory); pass a "
                           "checkpoint directory or the run directory of 'alexray train'")
        problems = []
        for prefix in candidates:
            where = f"{base}/{prefix}".rstrip("/")
            problem = _complete_problem(storage, prefix, where)
            if problem is None:
                break
            problems.append(problem)
        else:
            raise JobError(f"{field}: no complete checkpoint in {base} ({problems[-1]}); "
                           "use an earlier checkpoint of that run")
        try:
            model = json.loads(storage.read_bytes(f"{prefix}{STATE}")).get("model") or {}
        except (ValueError, AttributeError):
            model = {}
    except (ShardError, StorageError) as e:
        raise JobError(f"{field}: {e}") from None
    if not {"name", "width"} <= set(model):
        raise JobError(f"{field}: {where}/{STATE} does not describe its model: it was not written by "
                       "'alexray train'; pass a training checkpoint")
    if model["name"] != spec.model.name or float(model["width"]) != spec.model.width:
        raise JobError(f"{field}: {where} holds {model['name']} (width {model['width']}) but the spec builds "
                       f"{spec.model.name} (width {spec.model.width}); set model.name: {model['name']}, "
                       f"model.width: {model['width']} in the spec")
    return where


def preflight(spec: JobSpec, client, *, check_resources: bool = True) -> dict:
    """Run every check; returns what was found: ``{"classes", "train_samples", "finetune_source", "cluster"}``."""
    manifest = check_dataset(spec)
    check_run_storage(spec)
    check_run_name(spec)
    source = check_finetune_source(spec)
    cluster = check_cluster(spec, client) if check_resources else None
    train = (manifest.get("splits") or {}).get(spec.data.train_split) or {}
    return {"classes": manifest.get("num_classes"), "train_samples": train.get("samples"),
            "finetune_source": source, "cluster": cluster}

