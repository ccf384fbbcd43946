"""The training loop, run by every Ray Train worker (or by one process without Ray).

Reads top to bottom: ``set_up`` builds the run's parts and resumes from the newest usable
checkpoint; then each epoch is ``train_one_epoch`` (the rank's steps, with checkpoints every N
steps) and ``end_epoch`` (evaluate, best model, history), followed by a checkpoint. ``Session``
hides whether Ray is there: the loop is the same in a Ray Train worker and under
``python -m workers train``.

Every rank must make the same collective calls in the same order, or the run hangs in gloo or
NCCL: set-up's resume and attempt agreements, then per step the skipped-samples agreement, DDP's
gradient all-reduce, the checkpoint-written agreement (while one is in flight) and the progress
window's sums, then per epoch the val counts and the skipped total.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import workers
from alexray_core import goodput
from alexray_core.spec import JobSpec, check_resumed_identity, spec_from_dict
from alexray_core.spec import run_identity as identity
from data_prep.manifest import check_num_classes
from workers.data.gpu_decode import decode_on_device, gpu_train_batches
from workers.data.loader import (
    SplitInfo,
    load_manifest,
    split_info,
    too_many_skipped,
    train_batches,
)
from workers.data.sampling import EpochPlan, plan_epoch
from workers.data.transforms import to_model_input
from workers.models import checkpoint_format as ckpt
from workers.models.architectures import build_model, model_kwargs
from workers.models.evaluation import count_predictions, eval_mode, evaluation_batches
from workers.models.flops import device_peak_flops, mfu, training_flops_per_sample
from workers.models.pretrained import load_backbone, param_groups
from workers.training.checkpoints import CheckpointManager
from workers.training.debug_hooks import DebugHooks
from workers.training.ledger import Ledger, close_account, open_account
from workers.training.metrics import NullMetrics, worker_metrics
from workers.training.run_store import RunStore

log = logging.getLogger("alexray.train")
IMPORTED = time.time()  # this module and everything it needs (torch, OpenCV, WebDataset, ...) are loaded


# ---- sessions: Ray Train worker or a plain process ------------------------------------------------

class Session:
    rank = 0
    world_size = 1
    device = torch.device("cpu")

    checkpoint_prefix = ""  # where this session's checkpoints lie in the run directory

    def latest_checkpoint(self) -> str | None:
        """The name of the newest checkpoint a resume may start from (older ones lie beside it), or None."""
        raise NotImplementedError

    def save_checkpoint(self, directory: str, name: str, metrics: dict, async_upload: bool) -> None:
        raise NotImplementedError

    def preemption_notice(self):
        """Something true when a node of this run announced it is going away (same on every rank)."""
        return None


class RaySession(Session):
    def __init__(self):
        import ray.train
        import ray.train.torch

        self.train = ray.train
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def latest_checkpoint(self):
        checkpoint = self.train.get_checkpoint()  # the newest Ray registered
        return Path(checkpoint.path).name if checkpoint else None

    def save_checkpoint(self, directory, name, metrics, async_upload):
        from ray.train import CheckpointUploadMode

        mode = CheckpointUploadMode.ASYNC if async_upload else CheckpointUploadMode.SYNC
        self.train.report(metrics, checkpoint=self.train.Checkpoint.from_directory(directory),
                          checkpoint_dir_name=name, checkpoint_upload_mode=mode,
                          delete_local_checkpoint_after_upload=True)

    def preemption_notice(self):
        # A barrier: every rank asks at the same step and gets the same answer.
        return self.train.get_preemption_info()


class LocalSession(Session):
    """One process, no Ray: checkpoints go to ``{run_dir}/checkpoints/{name}`` (local or s3:// run dirs)."""

    checkpoint_prefix = "checkpoints/"

    def __init__(self, run_dir: str, keep: int):
        self.store, self.keep = RunStore(run_dir), keep
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def latest_checkpoint(self):
        names = self.store.checkpoint_names(self.checkpoint_prefix)
        return names[0] if names else None

    def save_checkpoint(self, directory, name, metrics, async_upload):
        self.store.publish_checkpoint(directory, self.checkpoint_prefix + name, self.keep)  # keeps the newest, as Ray


# ---- pieces of the loop ---------------------------------------------------------------------------

class LRSchedule:
    """Learning rate per step: step (/10 every N epochs), cosine, or /10 on a val top-1 plateau."""

    def __init__(self, spec: JobSpec, base_lr: float, steps_per_epoch: int):
        self.t, self.base_lr, self.steps_per_epoch = spec.train, base_lr, max(1, steps_per_epoch)
        self.factor, self.best, self.bad_epochs = 1.0, -1.0, 0

    def lr(self, epoch: int, step_in_epoch: int) -> float:
        t = self.t
        position = epoch + step_in_epoch / self.steps_per_epoch
        if t.schedule == "step":
            lr = self.base_lr * 0.1 ** (epoch // t.step_epochs)
        elif t.schedule == "cosine":
            span = max(1e-9, t.epochs - t.warmup_epochs)
            lr = self.base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, position - t.warmup_epochs) / span)))
        else:
            lr = self.base_lr * self.factor
        if t.warmup_epochs and position < t.warmup_epochs:
            lr *= 0.1 + 0.9 * position / t.warmup_epochs
        return lr

    def end_epoch(self, top1: float | None) -> None:
        if self.t.schedule != "plateau" or top1 is None:
            return
        if top1 > self.best + 1e-4:
            self.best, self.bad_epochs = top1, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.t.plateau_patience and self.factor > 1e-3:  # the paper divided 3 times
            self.factor, self.bad_epochs = self.factor / 10, 0

    def state_dict(self) -> dict:
        return {"factor": self.factor, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.factor, self.best, self.bad_epochs = state["factor"], state["best"], state["bad_epochs"]


def _configure_determinism(spec: JobSpec) -> None:
    if spec.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def _all_reduce(values: list[float], device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


# ---- set-up and resume ----------------------------------------------------------------------------

@dataclass
class Run:
    """One start of a run: the parts ``set_up`` builds, which the epochs share and update."""

    spec: JobSpec
    session: Session
    store: RunStore
    train_split: SplitInfo
    val_split: SplitInfo | None
    model: torch.nn.Module  # the weights: checkpoints, evaluation, the summary
    train_model: torch.nn.Module  # what the steps run: the model, wrapped in DDP and/or compiled
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    state: ckpt.TrainState
    meter: NullMetrics  # or a WorkerMetrics serving Prometheus
    attempt: int  # starts of the worker group before this one
    use_bf16: bool
    channels_last: bool
    device_decode: bool  # data.decode resolved: batches decoded by gpu_decode on the device
    ledger: Ledger  # where this worker's wall time goes (alexray_core.goodput)
    flops_per_sample: float  # model FLOPs of one training sample (3x its forward pass: workers.models.flops)
    peak_flops: float | None  # one device's dense peak FLOP/s at the run's precision; None: unknown (no MFU)
    preempted: bool = False  # a node announced it is going: its checkpoint is taken, no more checks

    @property
    def rank(self) -> int:
        return self.session.rank

    @property
    def world(self) -> int:
        return self.session.world_size

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """``values`` summed over the ranks; every rank must call it at the same point."""
        return _all_reduce(values, self.session.device)


def _load_splits(spec: JobSpec) -> tuple[SplitInfo, SplitInfo | None]:
    d = spec.data
    manifest = load_manifest(d.path)
    check_num_classes(manifest, spec.model.num_classes, d.path)
    train_split = split_info(d.path, manifest, d.train_split, d.verify_shards)
    val_split = split_info(d.path, manifest, d.val_split, d.verify_shards) if d.val_split else None
    return train_split, val_split


def _build(spec: JobSpec, session: Session, train_split: SplitInfo, channels_last: bool):
    """A fresh model, its optimizer and schedule, and the state of a run at its first step."""
    t, d = spec.train, spec.data
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = build_model(spec.model.name, train_split.num_classes, spec.model.width, **model_kwargs(spec))
    model.to(session.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    base_lr = t.lr * (t.global_batch_size / t.base_batch_size if t.lr_scaling == "linear" else 1.0)
    optimizer = torch.optim.SGD(param_groups(model, spec), lr=base_lr, momentum=t.momentum,
                                weight_decay=t.weight_decay)
    steps_per_epoch = plan_epoch(list(train_split.sizes), t.global_batch_size, d.streams, t.seed, 0).steps
    schedule = LRSchedule(spec, base_lr, steps_per_epoch)
    state = ckpt.TrainState(identity=identity(spec), world_size=session.world_size,
                            model={"name": spec.model.name, "num_classes": train_split.num_classes,
                                   "width": spec.model.width, "kwargs": model_kwargs(spec),
                                   "classes": list(train_split.class_names), "image_size": d.image_size,
                                   "eval_resize": d.eval_resize})
    return model, optimizer, schedule, state, steps_per_epoch


def _resume(spec: JobSpec, session: Session, store: RunStore, model, optimizer,
            schedule: LRSchedule) -> ckpt.TrainState | None:
    """Load the newest checkpoint every rank can use (skipping damaged ones, clearing killed
    workers' scratch) and seed this rank's RNG; returns the resumed state, or None for a fresh start."""
    t, rank, world = spec.train, session.rank, session.world_size
    restored = store.resume_point(session.latest_checkpoint(), session.checkpoint_prefix, rank, world,
                                  lambda values: _all_reduce(values, session.device))
    if restored is None:
        if spec.finetune.from_checkpoint:  # a fresh fine-tuning run; a resumed one has its own weights
            load_backbone(model, spec)
        torch.manual_seed(t.seed * 1000 + rank)  # dropout differs per rank, reproducibly
        return None
    with restored as directory:
        state = ckpt.load_state(directory)
        check_resumed_identity(state.identity, spec)
        model.load_state_dict(ckpt.load_tensors(directory, ckpt.MODEL, session.device))
        optimizer.load_state_dict(ckpt.load_tensors(directory, ckpt.OPTIMIZER, session.device))
        schedule.load_state_dict(state.schedule)
        rng = ckpt.load_rng(directory, rank)
        if rng is not None and state.world_size == world:
            ckpt.set_rng_state(rng)
        else:
            torch.manual_seed(t.seed * 1000 + rank + state.global_step)
    state.world_size = world
    if rank == 0:
        log.warning("resumed from step %d (epoch %d, step %d of it)", state.global_step, state.epoch,
                    state.step_in_epoch)
    return state


def _wrap(model: torch.nn.Module, spec: JobSpec, session: Session) -> torch.nn.Module:
    """The model as the steps run it: in DDP across ranks (with bf16 gradients if asked), compiled if asked."""
    train_model = model
    if session.world_size > 1:
        on_gpu = session.device.type == "cuda"
        train_model = DistributedDataParallel(model, device_ids=[session.device.index] if on_gpu else None)
        if spec.train.grad_compression == "bf16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            train_model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    if spec.train.compile:
        train_model = torch.compile(train_model)
    return train_model


def set_up(spec: JobSpec, run_dir: str, session: Session, ledger: Ledger, submitted: float | None = None) -> Run:
    """Build the model, optimizer and schedule, resume from the run's checkpoints, record this start.

    ``ledger`` was started when the worker was; ``submitted``: when the run was submitted."""
    t = spec.train
    _configure_determinism(spec)
    store = RunStore(run_dir)
    on_gpu = session.device.type == "cuda"
    use_bf16 = t.precision == "bf16" or (t.precision == "auto" and on_gpu)
    channels_last = t.channels_last == "on" or (t.channels_last == "auto" and on_gpu)
    device_decode = decode_on_device(spec.data.decode, session.device)  # before any work: gpu may be refused
    train_split, val_split = _load_splits(spec)
    model, optimizer, schedule, state, steps_per_epoch = _build(spec, session, train_split, channels_last)
    flops = training_flops_per_sample(model, spec.data.image_size)
    peak = device_peak_flops(session.device, use_bf16, t.peak_tflops)
    resumed = _resume(spec, session, store, model, optimizer, schedule)
    state = resumed or state
    ledger.mark_start_phases(built=time.time())
    attempt = store.begin_attempt(session.rank, resumed_from=resumed.global_step if resumed else None)
    attempt = int(_all_reduce([attempt], session.device)[0])  # rank 0 counted the starts; every rank labels with it
    ledger.begin(store, attempt, session.rank, session.world_size, spec.worker_range()[1], submitted)
    ledger.step = state.global_step
    meter = worker_metrics(spec, session.rank, session.world_size, attempt, steps_per_epoch, session.device,
                           on_ray=isinstance(session, RaySession), ledger=ledger, flops_per_sample=flops,
                           peak_flops=peak)
    train_model = _wrap(model, spec, session)
    model.train()
    return Run(spec=spec, session=session, store=store, train_split=train_split, val_split=val_split, model=model,
               train_model=train_model, optimizer=optimizer, schedule=schedule, state=state, meter=meter,
               attempt=attempt, use_bf16=use_bf16, channels_last=channels_last, device_decode=device_decode,
               ledger=ledger, flops_per_sample=flops, peak_flops=peak)


# ---- an epoch -------------------------------------------------------------------------------------

@dataclass
class EpochOutcome:
    plan: EpochPlan
    skipped: int  # samples this rank could not read or decode
    finished: bool  # train.max_steps reached: the run ends after this epoch


class _ProgressWindow:
    """Images and losses since the last progress line, summed over the ranks when it is written.

    The losses stay on the device until the line is due: reading one (``loss.item()``) waits for
    the step to finish, which on a GPU would keep the host from queueing the next step's work.
    They are summed in float64, the sum a host loop over ``item()`` makes, so the line is the same.
    """

    def __init__(self):
        self.start, self.images, self.loss_count = time.perf_counter(), 0, 0
        self.sum_on_device: torch.Tensor | None = None
        self.last_on_device: torch.Tensor | None = None
        self.loss_sum, self.last_loss = 0.0, None  # as read by read_losses

    def add(self, images: int, loss: torch.Tensor | None) -> None:
        self.images += images
        if loss is not None:
            loss = loss.detach().double()
            self.sum_on_device = loss if self.sum_on_device is None else self.sum_on_device + loss
            self.last_on_device = loss
            self.loss_count += 1

    def read_losses(self) -> float | None:
        """Bring the window's losses to the host (one sync); the last step's, or None when none was had."""
        if self.sum_on_device is not None:
            total, self.last_loss = torch.stack([self.sum_on_device, self.last_on_device]).tolist()
            self.loss_sum += total
            self.sum_on_device = self.last_on_device = None
        return self.last_loss

    def report(self, run: Run, epoch: int, plan: EpochPlan, lr: float) -> None:
        state = run.state
        elapsed = time.perf_counter() - self.start
        self.read_losses()
        images_total, loss_total, loss_n = run.all_reduce_sum([self.images, self.loss_sum, self.loss_count])
        images_per_s = images_total / max(1e-9, elapsed)
        state.metrics = {"epoch": epoch, "step": state.global_step, "step_in_epoch": state.step_in_epoch,
                         "steps_per_epoch": plan.steps, "loss": loss_total / max(1, loss_n), "lr": lr,
                         "images_per_s": images_per_s, "flops_per_s": images_per_s * run.flops_per_sample,
                         "mfu": mfu(images_per_s, run.flops_per_sample, run.peak_flops and run.peak_flops * run.world),
                         "attempt": run.attempt}
        if run.rank == 0:
            run.store.write_progress(state.metrics)


def _agree_to_step(run: Run, batch, epoch: int, skipped: int, rank_samples: int) -> bool:
    """Whether any rank has samples for this step; fails every rank together when one skipped too many.

    One small all-reduce per step: a rank that skipped alone would leave the others waiting in
    DDP's all-reduce."""
    rank, world, d = run.rank, run.world, run.spec.data
    over_limit = skipped > d.max_skipped_fraction * rank_samples
    found = [len(batch.labels)] + [skipped if r == rank and over_limit else 0 for r in range(world)]
    # With several ranks this reads the sums back to the host every step: the one device->host sync
    # a step keeps, since every rank must know before stepping whether any rank has samples.
    found = run.all_reduce_sum(found) if world > 1 else found
    over = [r for r in range(world) if found[1 + r]]
    if over:
        who = f"rank {over[0]} reads" if len(over) == 1 else f"ranks {', '.join(map(str, over))} read"
        raise too_many_skipped(f"at step {batch.step} of epoch {epoch}, {int(sum(found[1:]))} of the "
                               f"{rank_samples * len(over)} samples {who} in the epoch",
                               d.max_skipped_fraction, d.path)
    return bool(found[0])


# Inception v3's auxiliary loss weight in TF-slim, and PyTorch's fine-tuning tutorial's for both
# models; GoogLeNet's paper weighted its two auxiliary classifiers by 0.3.
AUX_LOSS_WEIGHT = 0.4


def training_loss(outputs, labels: torch.Tensor, criterion) -> torch.Tensor:
    """The loss a step minimises: ``criterion`` of the logits, plus AUX_LOSS_WEIGHT times that of each
    auxiliary classifier for the models that have them (in training, GoogLeNet and Inception v3
    return a namedtuple, main logits first; in evaluation the main logits alone)."""
    main, *aux = (outputs,) if isinstance(outputs, torch.Tensor) else [o for o in outputs if o is not None]
    if not len(labels):  # an empty batch still joins DDP's gradient all-reduce, with zeros rather than NaN
        return sum(o.sum() for o in (main, *aux)) * 0.0
    loss = criterion(main, labels)
    for logits in aux:
        loss = loss + AUX_LOSS_WEIGHT * criterion(logits, labels)
    return loss


def _step(run: Run, batch, any_samples: bool, checkpoints: CheckpointManager) -> torch.Tensor | None:
    """Forward, backward and the optimizer step; the loss, or None when this rank had no sample."""
    device, lighting = run.session.device, run.spec.data.lighting_std > 0
    labels = batch.labels.to(device, non_blocking=True)
    loss = None
    if any_samples:  # with no sample on any rank, no step: weight decay and momentum would still move
        images = batch.images.to(device, non_blocking=True)
        x = to_model_input(images, batch.alphas if lighting else None, run.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
            loss = training_loss(run.train_model(x), labels, F.cross_entropy)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    # Outside both `if any_samples`: every rank calls this at every step, samples or not, so its
    # collectives (the written-agreement all-reduce, Ray's report barrier) come in the same order on
    # every rank, after the gradient all-reduce that backward makes; and before this step's
    # _checkpoint_if_due, so a checkpoint every rank has written is published before the next is
    # taken. Before or after optimizer.step publishes the same: the snapshot was taken at `save`.
    checkpoints.maybe_publish()
    if any_samples:
        run.optimizer.step()
    return loss if len(labels) else None


def _checkpoint_if_due(run: Run, epoch: int, at_end: bool, checkpoints: CheckpointManager,
                       hooks: DebugHooks) -> None:
    """Every ``checkpoint.every_steps``, and at once when a node of the run is being preempted."""
    state, spec = run.state, run.spec
    every = spec.checkpoint.every_steps
    if every and state.global_step % every == 0 and not at_end:
        hooks.flush_samples(epoch)
        checkpoints.save(state.metrics)
    check = spec.failure.preemption_check_steps
    if check and state.global_step % check == 0 and not at_end and not run.preempted:
        run.preempted = bool(run.session.preemption_notice())
        if run.preempted:  # a spot reclaim or a drain: keep this step's work before the node goes
            if run.rank == 0:
                log.warning("a node of this run is being preempted: checkpointing at step %d now", state.global_step)
            hooks.flush_samples(epoch)
            checkpoints.save(state.metrics, now=True)


def _train_batches(run: Run, plan: EpochPlan, start_step: int):
    """The rank's batches of the epoch from ``start_step``, decoded where ``data.decode`` says: the
    same samples, keys, labels and draws either way, uint8 images that ``_step`` normalises."""
    t, d = run.spec.train, run.spec.data
    args = (run.train_split, plan, run.world, run.rank, start_step, t.seed, d.image_size, d.shuffle_block,
            d.num_workers, d.lighting_std, d.min_crop_area)
    if run.device_decode:
        return gpu_train_batches(*args, device=run.session.device)
    return train_batches(*args)


def train_one_epoch(run: Run, epoch: int, checkpoints: CheckpointManager, hooks: DebugHooks) -> EpochOutcome:
    """This rank's steps of ``epoch``, from where the run stands in it, until its end or ``max_steps``."""
    t, d, state = run.spec.train, run.spec.data, run.state
    plan = plan_epoch(list(run.train_split.sizes), t.global_batch_size, d.streams, t.seed, epoch)
    start_step = state.step_in_epoch if epoch == state.epoch else 0
    state.epoch, state.step_in_epoch = epoch, start_step
    window, skipped, finished = _ProgressWindow(), 0, False
    rank_samples = plan.steps * (t.global_batch_size // run.world)
    run.ledger.wait_for_data()
    # one timer: the ledger's readings of each wait and step also feed the Prometheus series
    batches = run.ledger.timed(_train_batches(run, plan, start_step), state.global_step, run.meter.observe_step)
    with contextlib.closing(batches) as batches:
        for batch in batches:
            skipped += batch.skipped
            any_samples = _agree_to_step(run, batch, epoch, skipped, rank_samples)
            lr = run.schedule.lr(epoch, batch.step)
            for group in run.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_mult", 1.0)  # fine-tuning's slower backbone
            loss = _step(run, batch, any_samples, checkpoints)
            state.step_in_epoch, state.global_step = batch.step + 1, state.global_step + 1
            state.samples_seen += t.global_batch_size
            window.add(len(batch.labels), loss)
            at_end = state.step_in_epoch == plan.steps or state.global_step == t.max_steps
            due = state.global_step % t.log_every == 0 or at_end
            # The loss gauge moves at the progress lines' cadence: between them it keeps its value.
            run.meter.trained(len(batch.labels), window.read_losses() if due else None, lr, epoch,
                              state.global_step, batch.skipped)
            hooks.after_step(batch.step, batch.keys)
            if due:
                window.report(run, epoch, plan, lr)
                window = _ProgressWindow()
                run.ledger.persist()
            _checkpoint_if_due(run, epoch, at_end, checkpoints, hooks)
            if state.global_step == t.max_steps:
                finished = True
                break
    hooks.flush_samples(epoch)
    return EpochOutcome(plan, skipped, finished)


def validate(run: Run) -> dict:
    """Exact top-1/top-5 over the val split: every sample counted once, on exactly one rank."""
    spec, session, d = run.spec, run.session, run.spec.data
    split = run.val_split
    batches = evaluation_batches(split, run.world, run.rank, d.image_size, d.eval_resize,
                                 batch_size=max(1, spec.train.global_batch_size // run.world),
                                 num_workers=d.num_workers, ten_crop=d.ten_crop, on_device=run.device_decode,
                                 device=session.device)
    with eval_mode(run.model):
        counts = count_predictions(run.model, batches, run.train_split.num_classes, session.device,
                                   run.channels_last, run.use_bf16)
    c1, c5, n, s = run.all_reduce_sum([counts.correct_top1, counts.correct_top5, counts.samples, counts.skipped])
    if s > d.max_skipped_fraction * split.samples:  # every rank sees the same sums: all stop together
        raise too_many_skipped(f"{int(s)} of the {split.samples} samples of the val split",
                               d.max_skipped_fraction, d.path)
    return {"val_top1": c1 / n if n else 0.0, "val_top5": c5 / n if n else 0.0, "val_samples": int(n),
            "val_skipped": int(s)}


def end_epoch(run: Run, epoch: int, outcome: EpochOutcome) -> dict:
    """After a complete epoch: evaluate, step the schedule, keep the best model, record the
    epoch's history; the metrics for the checkpoint that follows (the last step's if incomplete)."""
    state, plan = run.state, outcome.plan
    metrics = dict(state.metrics)
    if state.step_in_epoch != plan.steps:  # stopped by train.max_steps
        return metrics
    if run.val_split is not None:
        metrics.update(validate(run))
        run.meter.evaluated(metrics)
        run.schedule.end_epoch(metrics["val_top1"])
        if metrics["val_top1"] > state.best_top1:
            state.best_top1 = metrics["val_top1"]
            if run.rank == 0:
                run.store.write_best(run.model.state_dict(), state, metrics)
    skipped_total, = run.all_reduce_sum([outcome.skipped])
    metrics.update({"epoch_samples_used": plan.used, "epoch_samples_dropped": plan.dropped,
                    "corrupt_skipped": int(skipped_total)})
    state.history.append({k: metrics.get(k) for k in ("epoch", "loss", "val_top1", "val_top5", "images_per_s",
                                                       "epoch_samples_used", "epoch_samples_dropped",
                                                       "corrupt_skipped")})
    state.epoch, state.step_in_epoch = epoch + 1, 0
    if run.rank == 0:
        log.warning("epoch %d: loss %.4f, val top-1 %s, %d samples used, %d dropped", epoch,
                    metrics.get("loss", float("nan")), metrics.get("val_top1"), plan.used, plan.dropped)
    return metrics


# ---- the loop -----------------------------------------------------------------------------------

def train_loop(spec: JobSpec, run_dir: str, session: Session, submitted: float | None = None,
               ledger: Ledger | None = None) -> dict:
    """Train this rank's share of the run to its end; rank 0 returns the run's summary, the others {}."""
    ledger = ledger or Ledger()
    run = set_up(spec, run_dir, session, ledger, submitted)
    hooks = DebugHooks(spec.debug, run.store, run.rank, run.world, run.attempt)
    with CheckpointManager(session, run.store, run.state, run.model, run.optimizer, run.schedule,
                           attempt=run.attempt, all_reduce_sum=run.all_reduce_sum, async_upload=spec.checkpoint.async_upload,
                           on_written=run.meter.checkpoint_written,
                           before_complete=hooks.before_checkpoint_complete, ledger=ledger) as checkpoints:
        for epoch in range(run.state.epoch, spec.train.epochs):
            if spec.train.max_steps and run.state.global_step >= spec.train.max_steps:
                break  # resumed at (or past) max_steps: its checkpoint holds the finished run
            outcome = train_one_epoch(run, epoch, checkpoints, hooks)
            ledger.enter(goodput.EVALUATION)
            checkpoints.save(end_epoch(run, epoch, outcome))
            if outcome.finished:
                break
        checkpoints.finish()
    ledger.persist(force=True)
    run.meter.close()
    return run.store.write_summary(spec, run.state, run.model.state_dict(), run.attempt) if run.rank == 0 else {}


def train_func(config: dict) -> None:
    """Entry point of each Ray Train worker."""
    logging.basicConfig(level=logging.WARNING, format="alexray: %(message)s")
    ledger = Ledger()  # from the worker's first moment: building the model and resuming are start-up
    ledger.mark_start_phases(process=goodput.process_start_time(), importing=workers.IMPORT_STARTED, imported=IMPORTED)
    spec = spec_from_dict(config["spec"])
    train_loop(spec, config["run_dir"], RaySession(), config.get("submitted"), ledger)


def run_local(spec: JobSpec, run_dir: str, submitted: float | None = None) -> dict:
    """The same loop in this process, without Ray (debugging, GPU benchmarks on a machine without Ray)."""
    submitted = submitted or time.time()
    open_account(run_dir, submitted, slots=1)
    summary = train_loop(spec, run_dir, LocalSession(run_dir, spec.checkpoint.keep), submitted)
    return close_account(run_dir, submitted, summary)
