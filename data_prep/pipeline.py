"""``alexray shard SRC DEST``: scan, probe, plan, write shards, write the manifest last.

Order of work, and why:
1. Check DEST is writable and SRC holds images: every usage error surfaces before any output.
   Then take DEST's lease (``data_prep.lease``): a second run into the same DEST is refused.
2. Probe every file (cheap, parallel): rejects are known before planning, so shards come out
   equal-sized and any worker can write any shard from the plan alone.
3. Resume: a shard whose ``_progress/`` record matches this run's fingerprint, size and sha256 is
   kept; every other shard is (re)written.
4. ``manifest.json`` last, then the progress records are removed and the lease given back.

On a Ray cluster each task builds its shard in the temporary directory of the node it runs on
(machines share no /tmp) and uploads it from there; a local DEST is written directly by every
node, so it must be on a shared file system (``shared_fs``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from alexray_core.errors import EXIT_FAILED
from alexray_core.storage import LocalStorage, open_storage
from alexray_core.storage.api import WRITE_PROBE, Storage
from alexray_core.storage.s3 import UPLOADS_DIR

from .errors import ShardError
from .executor import (
    Progress,
    RayExecutor,
    default_workers,
    make_executor,
    prepare_workers,
)
from .images import ImageOptions
from .lease import LEASE_NAME, Lease
from .manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    build_manifest,
    dumps,
    parse_manifest,
)
from .planning import SplitPlan, SplitProbes
from .probing import Prober, probe_chunk  # noqa: F401 - probe_chunk: tasks name it from here too
from .shards import PROGRESS_DIR, ShardResult, build_shard, publish_shard, write_shard
from .sources import SourceDataset, scan_source

log = logging.getLogger(__name__)
SPLIT_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"  # shard names are {split}-{index:06d}.tar
_SPLIT_RE = re.compile(f"^{SPLIT_NAME}$")
_SHARD_RE = re.compile(f"^{SPLIT_NAME}-\\d{{6}}\\.tar$")


@dataclass
class ShardConfig:
    """Options of ``alexray shard``; the ones in ``output_options`` decide the bytes written."""

    splits: list[str] | None = None  # splits to shard; None: every one of train/val present
    shard_size: int = 1000  # samples per shard
    max_shard_bytes: int | None = None  # lower the samples per shard so shards stay under this size
    resize_short_side: int | None = None  # re-encode with this short side; None keeps original JPEG bytes
    quality: int = 90  # JPEG quality for re-encoded and converted images
    check: str = "header"  # "header" or "decode": how hard to check clean JPEGs
    max_pixels: int = ImageOptions.max_pixels  # decompression-bomb guard
    seed: int = 0  # shuffle seed; the same seed gives the same shards
    workers: int = field(default_factory=default_workers)  # local processes
    overwrite: bool = False  # replace a different dataset already at DEST
    max_reject_fraction: float = 0.001  # exit non-zero when more inputs than this are rejected
    ray_address: str | None = None  # spread the work over this Ray cluster
    shared_fs: bool = False  # with ray_address: a local DEST is one directory every node mounts at the same path
    progress: bool = True  # show progress bars

    def __post_init__(self):
        if self.shard_size < 1:
            raise ShardError(f"shard_size must be at least 1, not {self.shard_size}")
        if self.max_shard_bytes is not None and self.max_shard_bytes < 1024:
            raise ShardError(f"max_shard_bytes must be at least 1024, not {self.max_shard_bytes}")
        if self.workers < 1:
            raise ShardError(f"workers must be at least 1, not {self.workers}")
        if not 0 <= self.max_reject_fraction <= 1:
            raise ShardError(f"max_reject_fraction must be in [0, 1], not {self.max_reject_fraction}")
        for split in self.splits or ():
            if not _SPLIT_RE.match(split):
                raise ShardError(f"splits: {split!r} cannot name shards; use a split folder named with letters, "
                                 "digits, '_', '-' and '.'")
        self.image_options()  # validates the image fields

    def image_options(self) -> ImageOptions:
        return ImageOptions(self.resize_short_side, self.quality, self.check, self.max_pixels)

    def output_options(self) -> dict:
        return {"shard_size": self.shard_size, "max_shard_bytes": self.max_shard_bytes,
                "resize_short_side": self.resize_short_side, "quality": self.quality, "check": self.check,
                "max_pixels": self.max_pixels, "seed": self.seed}


@dataclass
class ShardSummary:
    dest: str
    manifest: dict
    written: int  # shards written by this run
    skipped: int  # shards found complete from an earlier, interrupted run
    seconds: float
    up_to_date: bool = False  # DEST already held this exact dataset


def fingerprint_of(dataset: SourceDataset, config: ShardConfig) -> str:
    """Identifies a sharding: the inputs (paths and sizes), the class table and the output options."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format_version": FORMAT_VERSION, "options": config.output_options(),
                              "classes": dataset.class_ids, "splits": sorted(dataset.splits)},
                             sort_keys=True).encode())
    for split in sorted(dataset.splits):
        table = dataset.splits[split]
        for start in range(0, len(table), 4096):
            end = min(len(table), start + 4096)
            lines = "".join([f"{split}\0{relpath}\0{size}\n"
                             for relpath, size in zip(table.relpaths_in(start, end), table.sizes[start:end])])
            # surrogateescape: a file name that is not UTF-8 is hashed as its bytes, not refused
            digest.update(lines.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _check_existing(storage: Storage, fingerprint: str, config: ShardConfig) -> bool:
    """Refuse to mix datasets at DEST. Returns True when DEST already holds exactly this dataset."""
    objects = storage.list()
    names = {o.name for o in objects}
    if MANIFEST_NAME in names:
        manifest = parse_manifest(storage.read_bytes(MANIFEST_NAME), storage.join(MANIFEST_NAME))
        if manifest.get("fingerprint") == fingerprint and not config.overwrite:
            return True
        if not config.overwrite:
            raise ShardError(f"DEST {storage.url} already holds a different dataset (its manifest.json has other "
                             "inputs or options): pass --overwrite to replace it, or choose another DEST")
    foreign_progress = []
    for o in objects:
        if o.name.startswith(PROGRESS_DIR + "/") and o.name.endswith(".json"):
            try:
                record = json.loads(storage.read_bytes(o.name))
            except json.JSONDecodeError:
                continue  # unreadable record: its shard is simply rewritten
            if record.get("fingerprint") != fingerprint:
                foreign_progress.append(o.name)
    if foreign_progress and not config.overwrite:
        raise ShardError(f"DEST {storage.url} holds an unfinished sharding of a different dataset or with other "
                         "options: rerun that command to finish it, pass --overwrite to replace it, or choose another DEST")
    foreign = [o.name for o in objects if not _ours(o.name)]
    if foreign and not config.overwrite:
        raise ShardError(f"DEST {storage.url} is not empty ({len(foreign)} other files, e.g. {foreign[0]!r}): "
                         "choose an empty DEST or pass --overwrite")
    return False


def _ours(name: str) -> bool:
    # write probes and partial files included: another run checking DEST leaves them for a moment
    return (name in (MANIFEST_NAME, LEASE_NAME) or name.startswith((PROGRESS_DIR + "/", UPLOADS_DIR + "/", WRITE_PROBE))
            or bool(_SHARD_RE.match(name)) or ".partial-" in name)


def _completed_shards(storage: Storage, planned: set[str], fingerprint: str) -> dict[str, ShardResult]:
    """Shards left complete by an earlier run of this same sharding, checked by size and checksum."""
    done = {}
    for o in storage.list(PROGRESS_DIR + "/"):
        try:
            result = ShardResult.from_json(json.loads(storage.read_bytes(o.name)))
        except (json.JSONDecodeError, TypeError):
            continue
        if result.fingerprint != fingerprint or result.name not in planned:
            continue
        info = storage.info(result.name)
        if info is None or info.size != result.bytes or storage.sha256(result.name) != result.sha256:
            log.info("shard %s is incomplete or changed; rewriting it", result.name)
            continue
        done[result.name] = result
    return done


def _remove_stale(storage: Storage, planned: set[str], keep: set[str]) -> None:
    """With --overwrite: drop the old manifest first, then old shards and records not reused."""
    storage.delete(MANIFEST_NAME)
    for o in storage.list():
        if o.name == MANIFEST_NAME:
            continue
        if o.name.startswith(PROGRESS_DIR + "/"):
            if o.name[len(PROGRESS_DIR) + 1:-len(".json")] not in keep:
                storage.delete(o.name)
        elif _SHARD_RE.match(o.name) and o.name not in planned:
            storage.delete(o.name)


def shard_dataset(src: str | Path, dest: str, config: ShardConfig, metrics=None) -> ShardSummary:
    """``metrics``: a ``data_prep.metrics.ShardMetrics`` to count into, or None."""
    storage = open_storage(dest, record_uploads=True)
    if config.ray_address and isinstance(storage, LocalStorage) and not config.shared_fs:
        raise ShardError(f"DEST {storage.url} is a local directory, which Ray tasks on other machines cannot write to: "
                         "use an s3:// DEST, or pass --shared-fs if DEST is on a file system every node mounts at "
                         "the same path")
    prepare_workers(config.workers, config.ray_address)
    # Local workers start probing while SRC is still being listed (``data_prep.probing``); a Ray
    # cluster is reached only once DEST is known to need the work, as before.
    executor = None if config.ray_address else make_executor(config.workers, None)
    prober = None if executor is None else Prober(executor, config.image_options(), config.progress)
    try:
        dataset = scan_source(src, config.splits, on_listed=None if prober is None else prober.listed)
        storage.check_writable()
        lease = Lease.acquire(storage)
        try:
            return _shard_holding_lease(storage, dataset, config, lease, metrics, executor, prober)
        finally:
            _stop_workers(prober, executor)  # no worker of this run writes DEST once its lease is given back
            lease.release()
    finally:
        _stop_workers(prober, executor)


def _stop_workers(prober: Prober | None, executor) -> None:
    if prober is not None:
        prober.stop(cancel=True)  # before the executor closes: see Prober.stop
    if executor is not None:
        executor.close()


@dataclass
class _Sharding:
    """What every step of one sharding reads: DEST (its lease held), SRC's files and the options."""

    storage: Storage
    dataset: SourceDataset
    config: ShardConfig
    lease: Lease
    metrics: object  # a data_prep.metrics.ShardMetrics, or None
    fingerprint: str
    options: ImageOptions


@dataclass
class _Probed:
    """Pass 1's outcome: every file probed."""

    probes: dict[str, SplitProbes]
    rejected: dict[str, list[dict]]  # per split: the inputs refused so far ({"path", "reason"})
    n_inputs: int  # SRC's files, the ones the scan refused included


@dataclass
class _Plan:
    """Every split's shards, and which of them this run writes."""

    plans: list[SplitPlan]
    done: dict[str, ShardResult]  # left complete by an earlier run of this same sharding
    todo: list[tuple[SplitPlan, int]]  # (its split's plan, shard index): the shards to write


def _shard_holding_lease(storage: Storage, dataset: SourceDataset, config: ShardConfig, lease: Lease,
                         metrics, executor, prober: Prober | None) -> ShardSummary:
    """``executor`` and ``prober``: the local ones, already probing; None on Ray."""
    fingerprint = fingerprint_of(dataset, config)
    if _check_existing(storage, fingerprint, config):
        manifest = parse_manifest(storage.read_bytes(MANIFEST_NAME), storage.join(MANIFEST_NAME))
        return ShardSummary(storage.url, manifest, 0, 0, 0.0, up_to_date=True)
    storage.clean_partial()

    job = _Sharding(storage, dataset, config, lease, metrics, fingerprint, config.image_options())
    ray = None if executor is not None else make_executor(config.workers, config.ray_address)
    if ray is not None:
        executor, prober = ray, Prober(ray, job.options, config.progress)
    on_ray = isinstance(executor, RayExecutor)
    # Local workers share this machine's temp dir; Ray tasks use their own node's (staging_dir None).
    staging = tempfile.mkdtemp(prefix="alexray-shard-") if storage.staging_dir() is None and not on_ray else None
    try:
        probed = _probe_files(job, prober)
        plan = _plan_shards(job, probed)
        results, seconds = _write_shards(job, plan, executor, staging)
    finally:
        if ray is not None:
            ray.close()
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    return _write_manifest(job, probed, plan, results, seconds)


def _probe_files(job: _Sharding, prober: Prober) -> _Probed:
    """Pass 1: probe every file; fails when more than --max-reject-fraction of the inputs are refused."""
    dataset, config = job.dataset, job.config
    probes = prober.finish(dataset)
    n_files = sum(len(table) for table in dataset.splits.values())

    rejected: dict[str, list[dict]] = {}
    for split, table in dataset.splits.items():
        rejected[split] = [r.to_json() for r in dataset.rejects.get(split, [])]
        rejected[split] += [{"path": table.relpath(i), "reason": reason} for i, reason in sorted(probes[split].rejects)]
    n_inputs = n_files + sum(len(r) for r in dataset.rejects.values())
    if job.metrics is not None:
        for split, items in rejected.items():
            job.metrics.rejected(split, len(items))
    _check_reject_fraction(rejected, n_inputs, config.max_reject_fraction)
    return _Probed(probes, rejected, n_inputs)


def _plan_shards(job: _Sharding, probed: _Probed) -> _Plan:
    """Every split's shards from the probes; those an earlier run left complete are kept (with
    --overwrite, everything else at DEST is removed)."""
    storage, dataset, config = job.storage, job.dataset, job.config
    plans = [SplitPlan(split, dataset.splits[split], probed.probes[split], dataset.class_ids, job.options,
                       config.seed, config.shard_size, config.max_shard_bytes) for split in sorted(dataset.splits)]
    planned = {name for plan in plans for name in plan.names()}
    if not planned:
        raise ShardError(f"no valid images in SRC {dataset.root}: all {probed.n_inputs} inputs were rejected "
                         f"(first: {_first_reject(probed.rejected)}); point SRC at an image dataset")
    done = _completed_shards(storage, planned, job.fingerprint)
    if config.overwrite:
        _remove_stale(storage, planned, keep=set(done))
    todo = [(plan, i) for plan in plans for i in range(len(plan)) if plan.name(i) not in done]
    if done:
        log.warning("resuming: %d of %d shards already complete at %s", len(done), len(planned), storage.url)
    return _Plan(plans, done, todo)


def _write_shards(job: _Sharding, plan: _Plan, executor, staging: str | None) -> tuple[dict[str, ShardResult], float]:
    """Pass 2: write the shards that are missing; every shard's result (the kept ones included) and
    the seconds it took. Local workers only build them; this process publishes (uploads) them on
    I/O threads, so no worker sits idle waiting for the network."""
    storage, metrics = job.storage, job.metrics
    results = dict(plan.done)
    on_ray = isinstance(executor, RayExecutor)
    # Built as workers take them: only the shards in flight exist as lists of samples.
    ray_only = {"lease_token": job.lease.token} if on_ray else {}
    tasks = ({"plan": split_plan.packed(i), "src_root": str(job.dataset.root), "storage": storage,
              "options": job.options, "fingerprint": job.fingerprint, "staging_dir": staging, **ray_only}
             for split_plan, i in plan.todo)
    bar = Progress("sharding", sum(split_plan.samples_in(i) for split_plan, i in plan.todo), job.config.progress)
    if on_ray:
        for _, result in executor.run(write_shard, tasks, bar):
            results[result.name] = result
            if metrics is not None:
                metrics.shard_written(result)
    else:
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="publish") as uploads:
            published = []
            for _, (result, path) in executor.run(build_shard, tasks, bar):
                published.append(uploads.submit(publish_shard, storage, result, path, job.lease.check))
                results[result.name] = result
                if metrics is not None:
                    metrics.shard_written(result)
            for future in published:
                future.result()
    seconds = bar.elapsed
    bar.close()
    return results, seconds


def _write_manifest(job: _Sharding, probed: _Probed, plan: _Plan, results: dict[str, ShardResult],
                    seconds: float) -> ShardSummary:
    """``manifest.json`` last, the lease checked first; then the progress records go. Rejects found
    while writing count against --max-reject-fraction too, once the manifest records them."""
    storage = job.storage
    splits = {}
    for split_plan in plan.plans:
        shards = [results[name].to_json() for name in split_plan.names()]
        late_rejects = [r for s in shards for r in s["rejects"]]
        splits[split_plan.split] = {"shards": shards, "rejected": probed.rejected[split_plan.split] + late_rejects}
    manifest = build_manifest(job.fingerprint, job.config.output_options(), job.dataset.class_table(), splits)
    job.lease.check()
    storage.write_bytes(MANIFEST_NAME, dumps(manifest))
    for o in storage.list(PROGRESS_DIR + "/"):
        storage.delete(o.name)
    summary = ShardSummary(storage.url, manifest, len(plan.todo), len(plan.done), seconds)
    late = sum(len(s["rejects"]) for p in splits.values() for s in p["shards"])
    if late:
        _check_reject_fraction({s: p["rejected"] for s, p in splits.items()}, probed.n_inputs,
                               job.config.max_reject_fraction)
    return summary


def _first_reject(rejected: dict[str, list[dict]]) -> str:
    for items in rejected.values():
        if items:
            return f"{items[0]['path']}: {items[0]['reason']}"
    return "none"


def _check_reject_fraction(rejected: dict[str, list[dict]], n_inputs: int, limit: float) -> None:
    count = sum(len(r) for r in rejected.values())
    if n_inputs and count / n_inputs > limit:
        raise ShardError(
            f"{count} of {n_inputs} inputs rejected ({count / n_inputs:.2%} > --max-reject-fraction {limit:g}); "
            f"first: {_first_reject(rejected)}. Fix or remove those files, or raise --max-reject-fraction",
            EXIT_FAILED,
        )

