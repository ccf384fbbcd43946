"""Trained models at work: open a checkpoint as a model, evaluate it on a split, classify new images.

A checkpoint is named by its directory or by its run directory, local or ``s3://``, and opened
by ``workers.models.loading``, which checks its files before loading and never runs pickled code.

Evaluation counts every sample of the split exactly once, in this process or split over Ray tasks
(``eval_segments`` gives each task a contiguous share), and keeps the full confusion matrix, so
the report's numbers are exact counts, not averages of averages.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from alexray_core.errors import AlexrayError
from alexray_core.storage import absolute_location, open_storage
from alexray_core.storage.api import is_s3_url
from workers.data.loader import SplitInfo, eval_batches, load_manifest, split_info
from workers.data.transforms import CorruptSample, eval_image
from workers.models.architectures import class_probabilities
from workers.models.evaluation import count_predictions, eval_mode
from workers.models.loading import LoadedModel, build_from_info, describe

log = logging.getLogger("alexray.inference")



# ---- evaluation -----------------------------------------------------------------------------------

@dataclass
class EvalOptions:
    split: str = "val"  # the split of the dataset to evaluate on
    ten_crop: bool = False  # average the predictions of the paper's 10 crops (corners, centre, flips)
    batch_size: int = 64  # images per forward pass
    num_workers: int = 2  # decoding threads per evaluating process (0: decode on the calling thread)
    worst: int = 10  # classes listed in the report's confusion summary


def check_classes(loaded: LoadedModel, split: SplitInfo, data: str) -> None:
    """Refuse a dataset whose labels would not mean what the model's outputs mean."""
    if split.num_classes != loaded.num_classes:
        raise AlexrayError(f"--data: {data} has {split.num_classes} classes but the checkpoint classifies "
                           f"{loaded.num_classes}; fine-tune it on this dataset first: alexray finetune SPEC.yaml "
                           f"--from {loaded.source}")
    names = list(loaded.info.get("classes") or [])
    if names and list(split.class_names) != names:
        differ = next(i for i, (a, b) in enumerate(zip(names, split.class_names)) if a != b)
        raise AlexrayError(f"--data: {data}'s classes differ from the checkpoint's (class {differ} is "
                           f"{split.class_names[differ]!r} there, {names[differ]!r} in the checkpoint); "
                           "fine-tune on this dataset first with 'alexray finetune'")


def evaluate_part(model: torch.nn.Module, info: dict, split: SplitInfo, parts: int, index: int,
                  options: EvalOptions, progress: Callable[[int], None] | None = None) -> dict:
    """Confusion counts over part ``index`` of ``parts`` of the split (every sample in exactly one part)."""
    size = int(info.get("image_size") or 224)
    resize = int(info.get("eval_resize") or size)
    batches = eval_batches(split, parts, index, size, resize, options.batch_size, options.num_workers,
                           options.ten_crop)
    with eval_mode(model):  # a Ray task's rebuilt model is in train mode
        counts = count_predictions(model, batches, int(info["num_classes"]), progress=progress)
    return {"confusion": counts.confusion, "top5_hits": counts.top5_hits, "skipped": counts.skipped}


def _ray_part(weights: dict, info: dict, split: SplitInfo, parts: int, index: int, options: EvalOptions) -> dict:
    """One Ray task's share: the model is rebuilt from the broadcast weights, never from a file."""
    model = build_from_info(info, "the checkpoint")
    model.load_state_dict(weights)
    return evaluate_part(model, info, split, parts, index, options)


def _check_reachable(address: str) -> None:
    """Fail in seconds: ray.init retries an address where nothing listens for minutes."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not port.isdigit():
        return  # "auto" and the like: Ray finds the cluster itself
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as e:
        raise AlexrayError(f"--address: nothing answers at {address} ({e.strerror or e}); start the cluster "
                           "(ray start --head) or give the head's host:6379") from None


def _evaluate_on_ray(loaded: LoadedModel, split: SplitInfo, options: EvalOptions, address: str,
                     workers: int | None, progress: Callable[[int], None]) -> tuple[dict, int]:
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        _check_reachable(address)
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            reason = str(e).splitlines()[0][:200]
            raise AlexrayError(f"--address: cannot reach a Ray cluster at {address} ({reason}); "
                               "check the address (host:6379 of the head, or auto)") from None
    try:
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        parts = max(1, min(workers, split.samples))
        weights = ray.put(loaded.model.state_dict())
        task = ray.remote(num_cpus=1)(_ray_part)
        pending = [task.remote(weights, loaded.info, split, parts, i, options) for i in range(parts)]
        total = None
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            part = ray.get(done[0])
            progress(int(part["confusion"].sum()) + part["skipped"])
            total = part if total is None else {k: total[k] + part[k] for k in total}
        return total, parts
    finally:
        if started_here:
            ray.shutdown()


def _report(loaded: LoadedModel, data: str, split: SplitInfo, options: EvalOptions, counts: dict, parts: int,
            seconds: float) -> dict:
    confusion, top5_hits = counts["confusion"], counts["top5_hits"]
    names = loaded.classes
    samples = int(confusion.sum())
    correct1, correct5 = int(np.trace(confusion)), int(top5_hits.sum())
    per_class = []
    for c in range(len(names)):
        n = int(confusion[c].sum())
        wrong = [(int(confusion[c, p]), p) for p in np.flatnonzero(confusion[c]) if p != c]
        per_class.append({"index": c, "name": names[c], "samples": n, "correct_top1": int(confusion[c, c]),
                          "correct_top5": int(top5_hits[c]), "top1": confusion[c, c] / n if n else None,
                          "confused_with": [{"index": int(p), "name": names[p], "count": k}
                                            for k, p in sorted(wrong, key=lambda t: (-t[0], t[1]))[:3]]})
    ranked = sorted((c for c in per_class if c["samples"]), key=lambda c: (c["top1"], -c["samples"], c["index"]))
    return {"checkpoint": loaded.source, "model": describe(loaded.info), "data": data, "split": options.split,
            "ten_crop": options.ten_crop, "image_size": loaded.image_size, "eval_resize": loaded.eval_resize,
            "split_samples": split.samples, "samples": samples, "skipped": int(counts["skipped"]),
            "correct_top1": correct1, "correct_top5": correct5, "top1": correct1 / samples if samples else 0.0,
            "top5": correct5 / samples if samples else 0.0, "parts": parts, "seconds": round(seconds, 3),
            "images_per_s": round(samples / seconds, 1) if seconds > 0 else None,
            "worst_classes": ranked[:options.worst], "per_class": per_class}


def evaluate(loaded: LoadedModel, data: str, options: EvalOptions, address: str | None = None,
             workers: int | None = None, show_progress: bool = True) -> dict:
    """Exact top-1/top-5 and per-class counts of the model on ``data``'s split, as a report dict."""
    from tqdm import tqdm

    data = data.rstrip("/") if is_s3_url(data) else absolute_location(data)
    split = split_info(data, load_manifest(data), options.split)
    check_classes(loaded, split, data)
    started = time.perf_counter()
    with tqdm(total=split.samples, desc="evaluate", unit="img", disable=not show_progress, dynamic_ncols=True,
              mininterval=0.5) as bar:
        if address:
            counts, parts = _evaluate_on_ray(loaded, split, options, address, workers, bar.update)
        else:
            counts, parts = evaluate_part(loaded.model, loaded.info, split, 1, 0, options, bar.update), 1
    return _report(loaded, data, split, options, counts, parts, time.perf_counter() - started)


# ---- prediction -----------------------------------------------------------------------------------

@dataclass
class Prediction:
    input: str  # the file or s3:// key as named (a directory expands to its files)
    top: list[dict] = field(default_factory=list)  # up to 5 of {index, name, probability}, best first
    error: str | None = None  # why the input could not be classified


def _s3_inputs(url: str) -> list[tuple[str, Callable[[], bytes]]]:
    from alexray_core.storage.api import split_s3_url

    bucket, key = split_s3_url(url)
    root = open_storage(f"s3://{bucket}")
    if key and not url.endswith("/") and root.exists(key):
        return [(url, lambda: root.read_bytes(key))]
    prefix = f"{key}/" if key else ""
    found = [obj.name for obj in root.list(prefix) if not obj.name.endswith("/")]
    if not found:
        raise FileNotFoundError(f"{url} does not exist (no such key, and no keys under it)")
    return [(f"s3://{bucket}/{name}", lambda name=name: root.read_bytes(name)) for name in found]


def expand_inputs(inputs: list[str]) -> list[tuple[str, Callable[[], bytes] | None, str | None]]:
    """(name, reader, error) per image: directories expand to their files (hidden ones skipped), sorted."""
    out: list[tuple[str, Callable[[], bytes] | None, str | None]] = []
    for item in inputs:
        try:
            if is_s3_url(item):
                out.extend((name, reader, None) for name, reader in _s3_inputs(item))
                continue
            path = Path(item).expanduser()
            if path.is_dir():
                files = sorted(p for p in path.rglob("*") if p.is_file()
                               and not any(part.startswith(".") for part in p.relative_to(path).parts))
                if not files:
                    out.append((item, None, f"{item} is an empty directory"))
                out.extend((str(p), p.read_bytes, None) for p in files)
            elif path.exists():
                out.append((item, path.read_bytes, None))
            else:
                out.append((item, None, f"{item} does not exist"))
        except Exception as e:  # noqa: BLE001 - one bad input must not stop the others
            out.append((item, None, str(e).splitlines()[0] if str(e) else type(e).__name__))
    return out


def image_crops(data: bytes, size: int, resize: int, ten_crop: bool = False) -> np.ndarray:
    """An image file's bytes as evaluation crops (HWC uint8, or a (10, H, W, C) stack): the file
    becomes the sample sharding would store, cropped by evaluation's own ``eval_image``, so a
    file is classified as its sample is evaluated. Undecodable samples raise ``CorruptSample``, files
    that are no image ``RejectedImage``."""
    from data_prep.images import sample_jpeg

    return eval_image(sample_jpeg(data), size, resize, ten_crop)


@torch.no_grad()
def predict(loaded: LoadedModel, inputs: list[str], ten_crop: bool = False, batch_size: int = 32,
            top_k: int = 5, show_progress: bool = True) -> list[Prediction]:
    """Top-k classes with probabilities for every image; unreadable inputs get an error instead."""
    from tqdm import tqdm

    from data_prep.images import RejectedImage

    items = expand_inputs(inputs)
    results = [Prediction(name, error=error) for name, _, error in items]
    k = min(top_k, loaded.num_classes)
    names = loaded.classes
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        images = torch.from_numpy(np.stack([crops for _, crops in pending]))
        images = images.permute(0, 1, 4, 2, 3) if ten_crop else images.permute(0, 3, 1, 2)
        probs = class_probabilities(loaded.model, images.contiguous())
        values, indices = probs.topk(k, dim=1)
        for (slot, _), vs, ix in zip(pending, values.tolist(), indices.tolist()):
            results[slot].top = [{"index": i, "name": names[i], "probability": round(v, 6)} for v, i in zip(vs, ix)]
        pending.clear()

    with tqdm(total=len(items), desc="predict", unit="img", disable=not show_progress, dynamic_ncols=True,
              mininterval=0.5) as bar:
        for slot, (name, reader, error) in enumerate(items):
            if error is None:
                try:
                    pending.append((slot, image_crops(reader(), loaded.image_size, loaded.eval_resize, ten_crop)))
                except (RejectedImage, CorruptSample) as e:
                    results[slot].error = f"{name}: {e}"
                except Exception as e:  # noqa: BLE001 - unreadable file or object: report it, go on
                    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                    results[slot].error = f"{name}: cannot read it ({reason})"
                if len(pending) == batch_size:
                    flush()
            bar.update(1)
        flush()
    return results
