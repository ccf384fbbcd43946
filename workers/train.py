"""The training loop, run by every Ray Train worker (or by one process without Ray).

Reads top to bottom: set up, resume if a checkpoint exists, then for each epoch train on the
rank's batches, checkpoint every N steps, evaluate, checkpoint. ``Session`` hides whether Ray is
there: the loop is the same in a Ray Train worker and under ``python -m workers train``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt
from alexray_core.spec import JobSpec, spec_from_dict
from alexray_core.spec import check_resumed_identity
from alexray_core.spec import run_identity as identity
from .data import eval_batches, load_manifest, split_info, too_many_skipped, train_batches
from .finetune import load_backbone, param_groups
from .metrics import worker_metrics
from .models import build_model, class_probabilities
from .runstore import RunStore
from .sampling import plan_epoch
from .transforms import to_model_input

log = logging.getLogger("alexray.train")


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


def model_kwargs(spec: JobSpec) -> dict:
    m = spec.model
    if m.name == "alexnet":
        return {"groups": m.groups, "dropout": m.dropout, "init": m.init}
    if m.name == "alexnet_tv":
        return {"dropout": m.dropout}
    return {}


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


@torch.no_grad()
def evaluate(model, spec: JobSpec, split, session: Session, use_bf16: bool, channels_last: bool) -> dict:
    """Exact top-1/top-5 over the split: every sample counted once, on exactly one rank."""
    model.eval()
    correct1 = correct5 = total = skipped = 0
    for batch in eval_batches(split, session.world_size, session.rank, spec.data.image_size, spec.data.eval_resize,
                              batch_size=max(1, spec.train.global_batch_size // session.world_size),
                              num_workers=spec.data.num_workers, ten_crop=spec.data.ten_crop):
        skipped += batch["skipped"]
        labels = batch["labels"].to(session.device)
        if not len(labels):
            continue
        images = batch["images"].to(session.device, non_blocking=True)
        probs = class_probabilities(model, images, channels_last, use_bf16)
        top5 = probs.topk(min(5, probs.shape[1]), dim=1).indices
        correct1 += (top5[:, 0] == labels).sum().item()
        correct5 += (top5 == labels[:, None]).any(1).sum().item()
        total += len(labels)
    c1, c5, n, s = _all_reduce([correct1, correct5, total, skipped], session.device)
    if s > spec.data.max_skipped_fraction * split.samples:  # every rank sees the same sums: all stop together
        raise too_many_skipped(f"{int(s)} of the {split.samples} samples of the val split",
                               spec.data.max_skipped_fraction, spec.data.path)
    model.train()
    return {"val_top1": c1 / n if n else 0.0, "val_top5": c5 / n if n else 0.0, "val_samples": int(n),
            "val_skipped": int(s)}


# ---- the loop -----------------------------------------------------------------------------------

def train_loop(spec: JobSpec, run_dir: str, session: Session) -> dict:
    t, d = spec.train, spec.data
    _configure_determinism(spec)
    rank, world = session.rank, session.world_size
    store = RunStore(run_dir)
    on_gpu = session.device.type == "cuda"
    use_bf16 = t.precision == "bf16" or (t.precision == "auto" and on_gpu)
    channels_last = t.channels_last == "on" or (t.channels_last == "auto" and on_gpu)

    manifest = load_manifest(d.path)
    train_split = split_info(d.path, manifest, d.train_split, d.verify_shards)
    val_split = split_info(d.path, manifest, d.val_split, d.verify_shards) if d.val_split else None
    num_classes = spec.model.num_classes or train_split.num_classes
    if num_classes != train_split.num_classes:
        raise ValueError(f"model.num_classes: {num_classes} but the dataset has {train_split.num_classes} classes")

    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = build_model(spec.model.name, num_classes, spec.model.width, **model_kwargs(spec))
    model.to(session.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    base_lr = t.lr * (t.global_batch_size / t.base_batch_size if t.lr_scaling == "linear" else 1.0)
    optimizer = torch.optim.SGD(param_groups(model, spec), lr=base_lr, momentum=t.momentum,
                                weight_decay=t.weight_decay)
    steps_per_epoch = plan_epoch(list(train_split.sizes), t.global_batch_size, d.streams, t.seed, 0).steps
    schedule = LRSchedule(spec, base_lr, steps_per_epoch)
    state = ckpt.TrainState(identity=identity(spec), world_size=world,
                            model={"name": spec.model.name, "num_classes": num_classes, "width": spec.model.width,
                                   "kwargs": model_kwargs(spec), "classes": list(train_split.class_names),
                                   "image_size": d.image_size, "eval_resize": d.eval_resize})

    # the newest checkpoint every rank can use, skipping damaged ones (and clearing killed workers' scratch)
    restored = store.resume_point(session.latest_checkpoint(), session.checkpoint_prefix, rank, world,
                                  lambda values: _all_reduce(values, session.device))
    if restored is not None:
        with restored as directory:
            state = ckpt.load_state(directory)
            check_resumed_identity(state.identity, spec)
            model.load_state_dict(ckpt.load_tensors(directory, "model.pt", session.device))
            optimizer.load_state_dict(ckpt.load_tensors(directory, "optimizer.pt", session.device))
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
    else:
        if spec.finetune.from_checkpoint:  # a fresh fine-tuning run; a resumed one has its own weights
            load_backbone(model, spec)
        torch.manual_seed(t.seed * 1000 + rank)  # dropout differs per rank, reproducibly
    attempt = store.begin_attempt(rank, resumed_from=state.global_step if restored else None)
    attempt = int(_all_reduce([attempt], session.device)[0])  # rank 0 counted the starts; every rank labels with it
    meter = worker_metrics(spec, rank, world, attempt, steps_per_epoch, session.device,
                           on_ray=isinstance(session, RaySession))

    train_model = model
    if world > 1:
        train_model = DistributedDataParallel(model, device_ids=[session.device.index] if on_gpu else None)
        if t.grad_compression == "bf16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            train_model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    if t.compile:
        train_model = torch.compile(train_model)
    model.train()

    writer = ckpt.BackgroundWriter(on_written=meter.checkpoint_written)

    def save_checkpoint(metrics: dict, now: bool = False) -> None:
        """Snapshot now, write on a thread, report to Ray at the next step (writer.finish).

        ``now``: write, upload and report before returning (a node is about to go)."""
        state.schedule = schedule.state_dict()
        state.metrics = metrics
        directory = store.scratch_dir("ckpt")  # the run's own scratch: a killed worker's is cleared at the next start
        name = store.checkpoint_name(state.epoch, state.global_step, attempt)
        report = {**metrics, "epoch": state.epoch, "global_step": state.global_step}
        writer.start(directory, rank, state, model.state_dict() if rank == 0 else None,
                     optimizer.state_dict() if rank == 0 else None,
                     lambda: session.save_checkpoint(directory, name, report, spec.checkpoint.async_upload and not now),
                     spec.debug.checkpoint_delay)
        if now:
            writer.finish()

    try:
        finished, preempted = False, False
        for epoch in range(state.epoch, t.epochs):
            plan = plan_epoch(list(train_split.sizes), t.global_batch_size, d.streams, t.seed, epoch)
            start_step = state.step_in_epoch if epoch == state.epoch else 0
            state.epoch, state.step_in_epoch = epoch, start_step
            window_start, window_images, loss_sum, loss_count, skipped = time.perf_counter(), 0, 0.0, 0, 0
            sample_log: list[dict] = []
            rank_samples, loss_value = plan.steps * (t.global_batch_size // world), math.nan
            for batch in meter.timed(train_batches(train_split, plan, world, rank, start_step, t.seed, d.image_size,
                                                   d.shuffle_block, d.num_workers, d.lighting_std, d.min_crop_area)):
                # Ranks decide together whether to step and whether to stop (one small all-reduce per
                # step): a rank that skipped alone would leave the others waiting in DDP's all-reduce.
                skipped += batch.skipped
                over_limit = skipped > d.max_skipped_fraction * rank_samples
                found = [len(batch.labels)] + [skipped if r == rank and over_limit else 0 for r in range(world)]
                found = _all_reduce(found, session.device) if world > 1 else found
                over = [r for r in range(world) if found[1 + r]]
                if over:
                    who = f"rank {over[0]} reads" if len(over) == 1 else f"ranks {', '.join(map(str, over))} read"
                    raise too_many_skipped(f"at step {batch.step} of epoch {epoch}, {int(sum(found[1:]))} of the "
                                           f"{rank_samples * len(over)} samples {who} in the epoch",
                                           d.max_skipped_fraction, d.path)
                lr = schedule.lr(epoch, batch.step)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_mult", 1.0)  # fine-tuning's slower backbone
                labels = batch.labels.to(session.device, non_blocking=True)
                if found[0]:  # with no sample on any rank, no step: weight decay and momentum would still move
                    images = batch.images.to(session.device, non_blocking=True)
                    x = to_model_input(images, batch.alphas if d.lighting_std > 0 else None, channels_last)
                    with torch.autocast(session.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        logits = train_model(x)
                        # an empty batch here still joins DDP's gradient all-reduce, with zeros rather than NaN
                        loss = F.cross_entropy(logits, labels) if len(labels) else logits.sum() * 0.0
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                # Publish the last checkpoint once every rank has written it; ranks agree on the step,
                # since Ray's report is a barrier. Training never waits for a write in progress.
                if writer.busy and _all_reduce([float(writer.written)], session.device)[0] == world:
                    writer.finish()
                if found[0]:
                    optimizer.step()

                state.step_in_epoch, state.global_step = batch.step + 1, state.global_step + 1
                state.samples_seen += t.global_batch_size
                window_images += len(labels)
                if len(labels):
                    loss_value = loss.item()
                    loss_sum, loss_count = loss_sum + loss_value, loss_count + 1
                meter.trained(len(labels), loss_value, lr, epoch, state.global_step, batch.skipped)
                if spec.debug.sample_log:
                    sample_log.append({"step": batch.step, "keys": batch.keys})
                if spec.debug.step_delay:
                    time.sleep(spec.debug.step_delay)

                at_end = state.step_in_epoch == plan.steps or state.global_step == t.max_steps
                if state.global_step % t.log_every == 0 or at_end:
                    elapsed = time.perf_counter() - window_start
                    images_total, loss_total, loss_n = _all_reduce([window_images, loss_sum, loss_count], session.device)
                    metrics = {"epoch": epoch, "step": state.global_step, "step_in_epoch": state.step_in_epoch,
                               "steps_per_epoch": plan.steps, "loss": loss_total / max(1, loss_n), "lr": lr,
                               "images_per_s": images_total / max(1e-9, elapsed), "attempt": attempt}
                    state.metrics = metrics
                    if rank == 0:
                        store.write_progress(metrics)
                    window_start, window_images, loss_sum, loss_count = time.perf_counter(), 0, 0.0, 0
                every = spec.checkpoint.every_steps
                if every and state.global_step % every == 0 and not at_end:
                    store.flush_sample_log(rank, world, epoch, sample_log, attempt)
                    sample_log = []
                    save_checkpoint(state.metrics)
                check = spec.failure.preemption_check_steps
                if check and state.global_step % check == 0 and not at_end and not preempted:
                    preempted = bool(session.preemption_notice())
                    if preempted:  # a spot reclaim or a drain: keep this step's work before the node goes
                        if rank == 0:
                            log.warning("a node of this run is being preempted: checkpointing at step %d now",
                                        state.global_step)
                        store.flush_sample_log(rank, world, epoch, sample_log, attempt)
                        sample_log = []
                        save_checkpoint(state.metrics, now=True)
                if state.global_step == t.max_steps:
                    finished = True
                    break
            store.flush_sample_log(rank, world, epoch, sample_log, attempt)
            epoch_done = state.step_in_epoch == plan.steps
            metrics = dict(state.metrics)
            if epoch_done and val_split is not None:
                metrics.update(evaluate(model, spec, val_split, session, use_bf16, channels_last))
                meter.evaluated(metrics)
                schedule.end_epoch(metrics["val_top1"])
                if metrics["val_top1"] > state.best_top1:
                    state.best_top1 = metrics["val_top1"]
                    if rank == 0:
                        store.write_best(model.state_dict(), state, metrics)
            if epoch_done:
                skipped_total, = _all_reduce([skipped], session.device)
                metrics.update({"epoch_samples_used": plan.used, "epoch_samples_dropped": plan.dropped,
                                "corrupt_skipped": int(skipped_total)})
                state.history.append({k: metrics.get(k) for k in ("epoch", "loss", "val_top1", "val_top5",
                                                                   "images_per_s", "epoch_samples_used",
                                                                   "epoch_samples_dropped", "corrupt_skipped")})
                state.epoch, state.step_in_epoch = epoch + 1, 0
                if rank == 0:
                    log.warning("epoch %d: loss %.4f, val top-1 %s, %d samples used, %d dropped", epoch,
                                metrics.get("loss", float("nan")), metrics.get("val_top1"), plan.used, plan.dropped)
            save_checkpoint(metrics)
            if finished:
                break

        writer.finish()
    finally:
        writer.abandon()  # a run failing mid-write: never leave the thread writing at exit
    meter.close()
    summary = None
    if rank == 0:
        weights = model.state_dict()
        summary = store.write_summary(spec, state, weights, attempt)
    return summary or {}


def train_func(config: dict) -> None:
    """Entry point of each Ray Train worker."""
    logging.basicConfig(level=logging.WARNING, format="alexray: %(message)s")
    spec = spec_from_dict(config["spec"])
    train_loop(spec, config["run_dir"], RaySession())


def run_local(spec: JobSpec, run_dir: str) -> dict:
    """The same loop in this process, without Ray (debugging, GPU benchmarks on a machine without Ray)."""
    return train_loop(spec, run_dir, LocalSession(run_dir, spec.checkpoint.keep))


def weights_sha256(state_dict: dict) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def summary_of(spec: JobSpec, state: ckpt.TrainState, weights: dict, attempt: int, wall_seconds: float) -> dict:
    last = state.history[-1] if state.history else {}
    return {"run_name": spec.run.name, "epochs": state.epoch, "steps": state.global_step,
            "samples": state.samples_seen, "top1": last.get("val_top1"), "top5": last.get("val_top5"),
            "best_top1": state.best_top1 if state.best_top1 >= 0 else None,
            "images_per_s": state.metrics.get("images_per_s"), "wall_seconds": wall_seconds,
            "restarts": attempt, "final_weights_sha256": weights_sha256(weights), "history": state.history,
            "model": state.model}

