"""Whether a run's model takes its ``data.image_size``, found before any worker starts.

torchvision builds every classifier whatever the input size will be, and some fail only at their
first forward pass: ViT and MaxViT are built for 224 px inputs, the auxiliary classifier that
Inception v3 runs in training needs 299 px or more, and below some size the others' pooling and
strided convolutions shrink the feature maps under a kernel. The check is the FLOP count's own
forward pass of a training step (``workers.models.flops``) on the model built on the meta device:
shapes only, a fraction of a second for any torchvision classifier. A refusal says what the model
needs, found by more such passes: a binary search for the smallest size it takes, about ten of them.
"""

from __future__ import annotations

from torch import nn

from alexray_core.spec import JobSpec, SpecError
from workers.models.architectures import build_model_on_meta, model_kwargs
from workers.models.flops import forward_flops_per_sample, training_flops_per_sample

__all__ = ["check_image_size", "image_size_problem"]

LARGEST = 1024  # a refused model's smallest size is searched for up to here (or twice its size)
BUILT_FOR = 224  # the input size torchvision builds its fixed-size classifiers (ViT, MaxViT) for


def check_image_size(spec: JobSpec) -> None:
    """Refuse a model that cannot train on ``data.image_size`` px crops, in one line that names
    ``model.name``, ``data.image_size`` and what the model needs."""
    name, size = spec.model.name, spec.data.image_size
    model = build_model_on_meta(name, spec.model.num_classes or 1000, spec.model.width, **model_kwargs(spec))
    problem = image_size_problem(model, size)
    if problem:
        raise SpecError(f"model.name: {name} {problem}")


def image_size_problem(model: nn.Module, size: int) -> str | None:
    """What ``model`` (built on the meta device) needs that ``size`` px inputs do not give, as the
    end of a sentence that starts with its name; None when a training step takes them."""
    error = _failure(model, size)
    if error is None or _meta_cannot_tell(error):
        return None
    reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    largest = max(LARGEST, 2 * size)
    if _failure(model, largest) is None:
        least = _smallest(model, size, largest)
        if getattr(model, "aux_logits", False) and _failure(model, least - 1, training=False) is None:
            why = "its auxiliary classifier, which runs in training, takes no smaller input"
        else:
            why = "smaller inputs shrink its feature maps below a kernel or pooling window"
        return f"needs data.image_size at least {least} (got {size}): {why} ({reason})"
    if size != BUILT_FOR and _failure(model, BUILT_FOR) is None:
        return f"needs data.image_size {BUILT_FOR} (got {size}): torchvision builds it for {BUILT_FOR} px inputs ({reason})"
    return f"cannot take data.image_size {size} ({reason})"


def _failure(model: nn.Module, size: int, training: bool = True) -> Exception | None:
    """What the FLOP count's forward pass raises on ``size`` px inputs, or None."""
    try:
        (training_flops_per_sample if training else forward_flops_per_sample)(model, size)
    except Exception as e:  # noqa: BLE001 - whatever the model raises at this size is the answer
        return e
    return None


def _meta_cannot_tell(error: Exception) -> bool:
    # An op without a meta kernel, or one that reads values (.item()): the meta pass cannot decide,
    # and the workers' FLOP count runs on real tensors instead (flops._count_anywhere).
    return isinstance(error, (NotImplementedError, RuntimeError)) and "meta" in str(error).lower()


def _smallest(model: nn.Module, failing: int, fitting: int) -> int:
    """The smallest size in (failing, fitting] that the model takes, for a model that needs a minimum
    (its pooling and kernels): one that takes a size takes every larger one."""
    while fitting - failing > 1:
        middle = (failing + fitting) // 2
        if _failure(model, middle) is None:
            fitting = middle
        else:
            failing = middle
    return fitting
