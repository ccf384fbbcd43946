"""Prometheus metrics of one training worker, served on ``/metrics`` at a port the OS picks.

Every series is labelled ``run``, ``rank`` and ``node`` (the node's IP), nothing else that could
grow: no sample keys, paths or step numbers in labels. Per step the loop pays a few lock-protected
additions (``observe_step``, ``trained``): no I/O, no Ray call. Values are read only when Prometheus
scrapes, on the HTTP server's thread. GPU memory is read at scrape time too.

How Prometheus finds the endpoint: ``alexray_core.discovery``. ``ALEXRAY_METRICS=0`` turns it off.
"""

from __future__ import annotations

import atexit
import logging
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from alexray_core import discovery
from alexray_core.spec import planned_steps
from workers.training.ledger import LedgerCollector

log = logging.getLogger("alexray.metrics")
disable_created_metrics()  # no *_created series: every name stays a documented one

LABELS = ("run", "rank", "node")
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CHECKPOINT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class NullMetrics:
    """Metrics off: the same calls, doing nothing."""

    address = None

    def observe_step(self, seconds: float, waited: float) -> None:
        pass

    def trained(self, images: int, loss: float | None, lr: float, epoch: int, step: int, skipped: int = 0) -> None:
        pass

    def evaluated(self, results: dict) -> None:
        pass

    def checkpoint_written(self, seconds: float, nbytes: int) -> None:
        pass

    def close(self) -> None:
        pass


class WorkerMetrics(NullMetrics):
    def __init__(self, run: str, rank: int, node: str, *, restarts: int = 0, planned_steps: int = 0,
                 checkpoint_interval_steps: int = 0, device=None, flops_per_sample: float = 0.0,
                 peak_flops: float | None = None, ledger=None):
        self.registry = registry = CollectorRegistry()
        self.rank = rank
        values = {"run": run, "rank": str(rank), "node": node}

        def make(kind, name, doc, **kwargs):
            return kind(name, doc, LABELS, registry=registry, **kwargs).labels(**values)

        self._images = make(Counter, "alexray_train_images", "Images trained on by this worker")
        self._step_seconds = make(Histogram, "alexray_train_step_duration_seconds",
                                  "Wall time of one training step, waiting for its batch included",
                                  buckets=STEP_BUCKETS)
        self._wait = make(Counter, "alexray_train_data_wait_seconds",
                          "Time spent waiting for the next batch from the data loader")
        self._loss = make(Gauge, "alexray_train_loss",
                          "Training loss of the last logged step (this worker's batch; every train.log_every steps)")
        self._lr = make(Gauge, "alexray_train_learning_rate", "Learning rate of the last step")
        self._epoch = make(Gauge, "alexray_train_epoch", "Epoch in progress (from 0)")
        self._step = make(Gauge, "alexray_train_step", "Training steps completed in the run (global step)")
        make(Gauge, "alexray_train_steps_planned", "Steps the run will take in total").set(planned_steps)
        # Labelled children are created at the first evaluation: no accuracy of 0 before there is one.
        self._values = values
        self._top1 = Gauge("alexray_eval_top1_ratio", "Validation top-1 accuracy of the last evaluation", LABELS,
                           registry=registry)
        self._top5 = Gauge("alexray_eval_top5_ratio", "Validation top-5 accuracy of the last evaluation", LABELS,
                           registry=registry)
        self._ckpt_seconds = make(Histogram, "alexray_checkpoint_save_duration_seconds",
                                  "Time to write this worker's part of a checkpoint (on a background thread)",
                                  buckets=CHECKPOINT_BUCKETS)
        self._ckpt_bytes = make(Counter, "alexray_checkpoint_written_bytes", "Checkpoint bytes written by this worker")
        self._ckpt_last = make(Gauge, "alexray_checkpoint_last_success_timestamp_seconds",
                               "Unix time this worker last finished writing a checkpoint (0: none yet)")
        make(Gauge, "alexray_checkpoint_interval_steps",
             "Steps between checkpoints (checkpoint.every_steps, or the epoch length if shorter)"
             ).set(checkpoint_interval_steps)
        make(Gauge, "alexray_worker_start_time_seconds", "Unix time this worker process started training"
             ).set(time.time())
        corrupt = Counter("alexray_data_corrupt_samples_skipped", "Corrupt samples skipped (eval: counted by rank 0)",
                          LABELS + ("phase",), registry=registry)
        self._corrupt_train = corrupt.labels(**values, phase="train")
        self._corrupt_eval = corrupt.labels(**values, phase="eval")
        make(Counter, "alexray_worker_restarts", "Restarts of the worker group before this start").inc(restarts)
        # FLOP/s and MFU are these times the images' rate (cluster/prometheus/rules/recording.yml)
        make(Gauge, "alexray_model_flops_per_sample",
             "Training FLOPs of one sample, forward and backward (torch.utils.flop_counter, at the run's image size)"
             ).set(flops_per_sample)
        if peak_flops:  # absent, not 0, where unknown: no MFU on the CPU or an unknown GPU
            make(Gauge, "alexray_device_peak_flops",
                 "Dense peak FLOP/s of this worker's device at the run's precision (train.peak_tflops or the GPU table)"
                 ).set(peak_flops)
        if ledger is not None:  # alexray_run_seconds_total{category}: read from the ledger at scrape time
            registry.register(LedgerCollector(ledger, values))
        if device is not None and getattr(device, "type", None) == "cuda":
            import torch

            make(Gauge, "alexray_gpu_memory_used_bytes", "GPU memory held by tensors (torch.cuda.memory_allocated)"
                 ).set_function(lambda: torch.cuda.memory_allocated(device))
            make(Gauge, "alexray_gpu_memory_reserved_bytes", "GPU memory reserved by PyTorch's caching allocator"
                 ).set_function(lambda: torch.cuda.memory_reserved(device))
        self._endpoint: discovery.MetricsEndpoint | None = None

    def serve(self, host: str) -> str:
        """Start the HTTP endpoint on ``host`` and a free port; returns ``host:port``."""
        self._endpoint = discovery.MetricsEndpoint(self.registry, host)
        self.address = self._endpoint.address
        return self.address

    def observe_step(self, seconds: float, waited: float) -> None:
        """One step's wall time, the wait for its batch included, and that wait, as the goodput
        ledger timed and charged them (``Ledger.timed`` calls this): one clock for both."""
        # Step first: a scrape never sees more waiting than stepping, so the data-wait ratio stays
        # within [0, 1].
        self._step_seconds.observe(seconds)
        self._wait.inc(waited)

    def trained(self, images: int, loss: float | None, lr: float, epoch: int, step: int, skipped: int = 0) -> None:
        """One step's figures; ``loss`` None: not read this step (the loop reads it every train.log_every)."""
        self._images.inc(images)
        if loss is not None:
            self._loss.set(loss)
        self._lr.set(lr)
        self._epoch.set(epoch)
        self._step.set(step)
        if skipped:
            self._corrupt_train.inc(skipped)

    def evaluated(self, results: dict) -> None:
        self._top1.labels(**self._values).set(results.get("val_top1", 0.0))
        self._top5.labels(**self._values).set(results.get("val_top5", 0.0))
        if self.rank == 0 and results.get("val_skipped"):  # already summed over the ranks
            self._corrupt_eval.inc(results["val_skipped"])

    def checkpoint_written(self, seconds: float, nbytes: int) -> None:
        self._ckpt_seconds.observe(seconds)
        self._ckpt_bytes.inc(nbytes)
        self._ckpt_last.set(time.time())

    def close(self) -> None:
        if self._endpoint is not None:
            self._endpoint.close()


def _ray_node_ip() -> str:
    """The address Ray knows this node by (``ray start --node-ip-address``); ray.util's guess is the
    machine's outward address, which is not the node's on a cluster bound to another interface."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node["NodeManagerAddress"]
    return ray.util.get_node_ip_address()


def worker_metrics(spec, rank: int, world_size: int, restarts: int, steps_per_epoch: int, device=None,
                   on_ray: bool = True, ledger=None, flops_per_sample: float = 0.0,
                   peak_flops: float | None = None) -> NullMetrics:
    """The metrics of this worker, served and registered for discovery; NullMetrics when turned off
    or when the endpoint cannot start (training never fails for monitoring)."""
    if not discovery.metrics_enabled():
        return NullMetrics()
    every = spec.checkpoint.every_steps
    interval = min(every, steps_per_epoch) if every else steps_per_epoch
    run = spec.run.name or "unnamed"
    metrics = None
    try:
        if on_ray:
            node = _ray_node_ip()
        else:
            node = "127.0.0.1"
        metrics = WorkerMetrics(run, rank, node, restarts=restarts, planned_steps=planned_steps(spec, steps_per_epoch),
                                checkpoint_interval_steps=interval, device=device,
                                flops_per_sample=flops_per_sample, peak_flops=peak_flops, ledger=ledger)
        address = metrics.serve(node)
        labels = {"run": run, "rank": str(rank), "node": node, "instance": f"{run}/{rank}"}
        if on_ray:
            discovery.register_ray_target(run, rank, world_size, address, labels)
        else:
            atexit.register(metrics._endpoint.announce(run, labels).remove)
    except Exception as e:  # noqa: BLE001 - monitoring must never stop training
        log.warning("metrics: endpoint not started (%s: %s); training continues without it", type(e).__name__, e)
        if metrics is not None:
            metrics.close()
        return NullMetrics()
    return metrics
