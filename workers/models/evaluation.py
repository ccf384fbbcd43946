"""Top-1/top-5 counts of a model over evaluation batches: the one loop behind training's val
metrics and ``alexray evaluate``.

The counts are exact (a confusion matrix and per-class top-5 hits, not averages), so shares of a
split evaluated on different ranks or Ray tasks add up to the whole split's numbers.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from workers.data.gpu_decode import gpu_eval_batches
from workers.data.loader import SplitInfo, eval_batches
from workers.models.architectures import class_probabilities


@dataclass
class EvalCounts:
    confusion: np.ndarray  # [true class, top-1 class]: samples
    top5_hits: np.ndarray  # per true class: samples whose class is among the 5 most probable
    skipped: int  # samples that could not be decoded

    @property
    def samples(self) -> int:
        return int(self.confusion.sum())

    @property
    def correct_top1(self) -> int:
        return int(np.trace(self.confusion))

    @property
    def correct_top5(self) -> int:
        return int(self.top5_hits.sum())


def evaluation_batches(split: SplitInfo, world_size: int, rank: int, image_size: int, resize: int, batch_size: int,
                       num_workers: int, ten_crop: bool = False, on_device: bool = False,
                       device: torch.device = torch.device("cpu")) -> Iterable[dict]:
    """The rank's share of ``split`` as ``count_predictions`` takes it: decoded by ``eval_batches``'
    threads, or with ``on_device`` (``data.decode`` resolved by ``gpu_decode.decode_on_device``)
    by ``gpu_eval_batches`` on ``device``. The same dicts either way: uint8 images, host labels."""
    if on_device:
        return gpu_eval_batches(split, world_size, rank, image_size, resize, batch_size, ten_crop, device)
    return eval_batches(split, world_size, rank, image_size, resize, batch_size, num_workers, ten_crop)


@contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode (dropout off, batch norm on its running statistics) for the block,
    then back in the mode it was in: ``count_predictions`` needs it and leaves the mode alone."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def count_predictions(model: torch.nn.Module, batches: Iterable[dict], num_classes: int,
                      device: torch.device = torch.device("cpu"), channels_last: bool = False,
                      use_bf16: bool = False, progress: Callable[[int], None] | None = None) -> EvalCounts:
    """Counts over ``batches`` (``evaluation_batches``' dicts, images on the host or on ``device``);
    the caller puts the model in eval mode (``eval_mode``).

    ``progress(n)`` is called after each batch with the samples it held, skipped ones included.
    """
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    top5_hits = np.zeros(num_classes, dtype=np.int64)
    skipped = 0
    for batch in batches:
        skipped += batch["skipped"]
        labels = batch["labels"]
        if len(labels):
            images = batch["images"].to(device, non_blocking=True)
            probs = class_probabilities(model, images, channels_last, use_bf16)
            top = probs.topk(min(5, num_classes), dim=1).indices.cpu()
            truth = labels.numpy()
            np.add.at(confusion, (truth, top[:, 0].numpy()), 1)
            np.add.at(top5_hits, truth[(top == labels[:, None]).any(1).numpy()], 1)
        if progress is not None:
            progress(len(labels) + batch["skipped"])
    return EvalCounts(confusion, top5_hits, skipped)
