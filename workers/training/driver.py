"""Start a training run with Ray Train's TorchTrainer: the driver side of ``alexray train``.

Ray resumes a run from ``{storage_path}/{name}/checkpoint_manager_snapshot.json`` when a trainer
is built with the same name and storage: so run names are generated unique (a new run never
picks up an old run's checkpoints), and reusing a name on purpose resumes that run, provided the
spec still describes the same job.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from urllib.parse import urlparse

from alexray_core import runs
from alexray_core.discovery import TargetPublisher
from alexray_core.errors import EXIT_FAILED, AlexrayError
from alexray_core.goodput import process_start_time
from alexray_core.localcluster import LOOPBACK_ONLY, use_private_token
from alexray_core.spec import JobSpec, check_same_job, new_run_name
from alexray_core.storage import absolute_location
from alexray_core.storage.api import s3_endpoint, s3_region
from data_prep.manifest import check_dataset
from workers.training.ledger import close_account, mark_session, open_account
from workers.training.run_store import RunStore

log = logging.getLogger("alexray.launch")


def run_dir_of(spec: JobSpec) -> str:
    return runs.run_dir(spec.run.storage, spec.run.name)


def ray_storage(storage: str):
    """(storage_path, storage_filesystem) for Ray's RunConfig, on the same S3 endpoint as boto3 for s3://."""
    if not storage.startswith("s3://"):
        return absolute_location(storage), None
    import pyarrow.fs

    endpoint = s3_endpoint()
    kwargs = {"region": s3_region()}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
    return storage[len("s3://"):].rstrip("/"), pyarrow.fs.S3FileSystem(**kwargs)


def prepare_run(spec: JobSpec) -> str:
    """Check that the model takes the image size, name the run (if unnamed), check a named one is the
    same job, record its spec; returns run_dir. Nothing is written for a spec refused here."""
    from workers.models.input_size import check_image_size

    check_image_size(spec)
    spec.data.path = absolute_location(spec.data.path)
    check_dataset(spec.data.path, spec.data.train_split, spec.data.val_split, spec.model.num_classes)
    if spec.run.name is None:
        spec.run.name = new_run_name(spec.model.name)
    run_dir = run_dir_of(spec)
    store = RunStore(run_dir)
    existing = store.spec()
    if existing is not None:
        check_same_job(existing, spec)
    else:
        store.write_json(runs.SPEC, spec.to_dict())
    return run_dir


def launch(spec: JobSpec, address: str | None = None, submitted: float | None = None) -> dict:
    """Run the job on a Ray cluster (a local one is started when ``address`` is None) and wait for it.

    ``submitted``: when the run was submitted (its account starts there), else this process's start."""
    submitted = submitted or process_start_time()
    run_dir = prepare_run(spec)  # a refused spec starts no cluster
    if not address and "ray" not in sys.modules:  # Ray reads the switch when it is imported
        for name, value in LOOPBACK_ONLY.items():
            os.environ.setdefault(name, value)
    import ray

    token_dir = None
    connected_here = not ray.is_initialized()
    if connected_here:
        if address:
            try:
                ray.init(address=address, logging_level="ERROR")
            except ConnectionError as e:
                raise AlexrayError(f"--address {address}: no Ray cluster answers there ({_last_line(e)}); start one "
                                   "with 'ray start --head' or pass the address it printed") from None
        else:  # a new cluster for this job, reachable from this machine only, with a token of its own
            token_dir = use_private_token()
            try:
                ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                         logging_level="ERROR")
            except BaseException:
                shutil.rmtree(token_dir, ignore_errors=True)
                raise
    try:
        _fit(spec, run_dir, submitted)
    finally:
        if connected_here:  # disconnect (and stop the cluster if it is this job's) before the account closes
            ray.shutdown()
        if token_dir is not None:  # the cluster was this job's: drop its token
            shutil.rmtree(token_dir, ignore_errors=True)
    return close_account(run_dir, submitted)  # the run's time ends here: only printing the summary is left


class RunFailed(AlexrayError):
    """The run started and failed: a worker's own error, or Ray's once its restarts were spent."""

    exit_code = EXIT_FAILED


def _fit(spec: JobSpec, run_dir: str, submitted: float) -> None:
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )
    from ray.train.torch import TorchConfig

    from workers.training.failure_policy import FailFastTrainer, user_errors
    from workers.training.loop import train_func

    lo, hi = spec.worker_range()
    resources = {"CPU": spec.scaling.cpus_per_worker}
    if spec.scaling.use_gpu:
        resources["GPU"] = 1
    storage_path, filesystem = ray_storage(spec.run.storage)
    trainer = FailFastTrainer(
        train_func,
        train_loop_config={"spec": spec.to_dict(), "run_dir": run_dir, "submitted": submitted},
        run_dir=run_dir,
        torch_config=TorchConfig(backend="nccl" if spec.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=lo if lo == hi else (lo, hi), use_gpu=spec.scaling.use_gpu,
                                     resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=spec.scaling.resize_interval_s),
        run_config=RunConfig(name=spec.run.name, storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=spec.failure.max_failures,
                                                          max_preemption_failures=spec.failure.max_preemptions),
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep)),
    )
    log.warning("run %s: %s", spec.run.name, run_dir)
    open_account(run_dir, submitted, hi)
    with TargetPublisher(spec.run.name):  # Prometheus finds the workers through this driver (see discovery)
        try:
            trainer.fit()
            mark_session(run_dir, fit_returned=time.time())
        except TrainingFailedError as e:
            for rank, error in user_errors(e).items():  # what the user must fix, as the worker said it
                raise RunFailed(f"training failed on rank {rank}: {error}") from None
            raise RunFailed(f"training failed: {_last_line(e)}") from None


def _last_line(error: BaseException) -> str:
    """The line of a Ray error that says what went wrong (its text is pages of traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "Error:" in line or "error:" in line]
    return (errors or lines or [type(error).__name__])[-1]
