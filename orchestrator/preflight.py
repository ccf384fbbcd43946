"""Checks run before a job is submitted, so that bad input fails here in one line, not minutes
later on the cluster: the dataset, the run storage, a reused run name, and whether the cluster can
ever hold the requested workers.

Each check raises ``JobError`` (exit code 2) whose message starts with the spec field to fix.
Storage is checked with this machine's credentials: nodes use their own chain, so a pass here
does not prove the nodes can reach it, but a refusal here is almost always a refusal there too.
The cluster's resources come from the dashboard's state API (``/api/v0/nodes``) over the same
authenticated HTTP connection as the Jobs API; no Ray driver connection is made.
"""

from __future__ import annotations

from workers.config import JobSpec

from .jobs import JobError, guard

NODES_ENDPOINT = "/api/v0/nodes?detail=1&limit=10000"


def check_dataset(spec: JobSpec) -> dict:
    """The manifest at ``data.path`` is there and readable, has the splits and the class count asked for."""
    from data_prep.errors import ShardError
    from data_prep.manifest import MANIFEST_NAME, parse_manifest
    from data_prep.storage import open_storage

    path = spec.data.path
    try:
        storage = open_storage(path)
        storage.check_reachable()
        if not storage.exists(MANIFEST_NAME):
            raise JobError(f"data.path: no {MANIFEST_NAME} in {path}; shard a dataset there with "
                           f"'alexray shard SRC {path}' or fix the path")
        manifest = parse_manifest(storage.read_bytes(MANIFEST_NAME), f"{path}/{MANIFEST_NAME}")
    except ShardError as e:
        raise JobError(f"data.path: {e}") from None
    splits = manifest.get("splits") or {}
    for field, split in (("data.train_split", spec.data.train_split), ("data.val_split", spec.data.val_split)):
        if split is None:
            continue
        if split not in splits or not splits[split].get("samples"):
            have = ", ".join(sorted(s for s in splits if splits[s].get("samples"))) or "none"
            raise JobError(f"{field}: the dataset at {path} has no samples in split {split!r} (splits: {have}); "
                           f"set {field} to one of them" + (" or null" if field == "data.val_split" else ""))
    classes = manifest.get("num_classes", len(manifest.get("classes") or []))
    wanted = spec.model.num_classes
    if wanted is not None and wanted != classes:
        raise JobError(f"model.num_classes: {wanted} does not match the {classes} classes of the dataset at {path}; "
                       f"set it to {classes} or leave it unset")
    return manifest


def check_run_storage(spec: JobSpec) -> None:
    """``run.storage`` accepts a write (a probe object is written and deleted)."""
    from data_prep.errors import ShardError
    from data_prep.storage import open_storage

    try:
        open_storage(spec.run.storage).check_writable()
    except ShardError as e:
        raise JobError(f"run.storage: {e}") from None


def check_run_name(spec: JobSpec) -> dict | None:
    """A run that already exists under ``run.name`` must be the same job; returns its spec, if any."""
    import json

    from data_prep.errors import ShardError
    from data_prep.storage import open_storage
    from workers.config import SpecError, check_same_job

    run_dir = f"{spec.run.storage.rstrip('/')}/{spec.run.name}"
    try:
        storage = open_storage(run_dir)
        if not storage.exists("spec.json"):
            return None
        existing = json.loads(storage.read_bytes("spec.json"))
    except ShardError as e:
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
    address = getattr(client, "alexray_address", "the cluster")
    with guard(address, f"the token from {getattr(client, 'alexray_token_source', 'this machine')}"):
        response = client._do_request("GET", NODES_ENDPOINT)
    try:
        body = response.json()
        nodes = body["data"]["result"]["result"]
    except (ValueError, KeyError, TypeError):
        raise JobError(f"cannot read the cluster's nodes from {address}{NODES_ENDPOINT} "
                       f"(HTTP {response.status_code}: {response.text[:200]!r}); is it a Ray >= 2.9 dashboard?",
                       exit_code=1) from None
    out = []
    for node in nodes:
        if node.get("state") != "ALIVE":
            continue
        total = node.get("resources_total") or {}
        out.append({"node_ip": node.get("node_ip"), "CPU": float(total.get("CPU", 0)),
                    "GPU": float(total.get("GPU", 0))})
    return out


def check_cluster(spec: JobSpec, client, address: str | None = None) -> dict:
    """Enough CPUs (and GPUs) on the alive nodes for the minimum number of workers, each on one node.

    Total capacity counts, not what is free now: a job waits for busy resources, but never gets
    ones the cluster does not have. An autoscaling cluster may grow: skip this check for it.
    """
    address = getattr(client, "alexray_address", None) or address or "the cluster"
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


def preflight(spec: JobSpec, address: str, client, *, check_resources: bool = True) -> dict:
    """Run every check; returns what was found: ``{"classes", "train_samples", "cluster"}``."""
    manifest = check_dataset(spec)
    check_run_storage(spec)
    check_run_name(spec)
    cluster = check_cluster(spec, client, address) if check_resources else None
    train = (manifest.get("splits") or {}).get(spec.data.train_split) or {}
    return {"classes": manifest.get("num_classes"), "train_samples": train.get("samples"), "cluster": cluster}

