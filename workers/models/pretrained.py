"""Transfer learning: start a run from a trained backbone with a new classifier.

The spec's ``finetune.from_checkpoint`` names the source: another run's checkpoint (or run
directory), ``torchvision:NAME`` (torchvision's published ImageNet weights for its model NAME, as
torchvision keeps them in the torch hub cache), or a local ``.pth`` state dict. Published weights
are never downloaded here, since nodes may have no network: a missing file is an error naming its
URL and where to put it. Bare state dicts load with ``weights_only=True`` and must match the model
the spec builds key for key and shape for shape, all but the classification head.

When a run starts fresh (no checkpoint of its own to resume), every layer but the final
classification layer is copied from the source; that layer keeps the fresh initialisation
``build_model`` gave it (seeded by ``train.seed``, so the same on every rank), sized for the new
dataset's classes: N(0, 0.01) weights and zero biases in the paper AlexNet, the model's own
initialisation of its last layer in the others. The convolutional layers can be frozen or trained
at a fraction of the lr: the parameter groups carry an ``lr_mult`` that the training loop applies
to its schedule. A resumed run restores its own weights and optimizer, so these groups must be
built the same way on every start, which they are: they depend on the spec only.
"""

from __future__ import annotations

import difflib
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from alexray_core.spec import (
    JobSpec,
    SpecError,
    is_state_dict_file,
    torchvision_model_name,
    torchvision_source,
)
from workers.models import checkpoint_format as ckpt
from workers.models.architectures import build_model_on_meta, classifier_head, model_kwargs
from workers.models.loading import checkpoint_dir, describe, read_info

FIELD = "finetune.from_checkpoint"


def check_source(info: dict, spec: JobSpec, where: str) -> None:
    """Refuse a source whose layers cannot fit the model the spec builds, naming the fields to set."""
    m = spec.model
    source_groups = (info.get("kwargs") or {}).get("groups")
    wanted_groups = model_kwargs(spec).get("groups")
    if info["name"] != m.name or float(info["width"]) != m.width or (
            source_groups is not None and wanted_groups is not None and source_groups != wanted_groups):
        fix = f"model.name: {info['name']}, model.width: {info['width']}"
        if source_groups is not None:
            fix += f", model.groups: {str(source_groups).lower()}"
        raise SpecError(f"{FIELD}: {where} holds {describe(info)} but the spec builds {m.name} "
                        f"(width {m.width}{f', groups {wanted_groups}' if wanted_groups is not None else ''}); "
                        f"set {fix} in the spec")


# ---- bare state dicts: torchvision's published weights, .pth files -----------------------------------

@dataclass
class WeightsFile:
    """A state dict file to start from, found on this machine."""

    path: Path
    source: str  # as the spec gives it
    url: str | None = None  # where torchvision publishes it, for torchvision:NAME


def _file_name(url: str) -> str:
    return os.path.basename(urlparse(url).path)


@functools.lru_cache(maxsize=1)
def _torchvision_files() -> dict[str, tuple[str, str]]:
    """File name -> (torchvision model, URL) of every weights file torchvision publishes for its
    classifiers: a .pth file named like one of them says which model.name it needs."""
    import torchvision

    files = {}
    for name in torchvision.models.list_models(module=torchvision.models):
        for weights in torchvision.models.get_model_weights(name):
            files[_file_name(weights.url)] = (name, weights.url)
    return files


def torchvision_weights(name: str) -> tuple[Path, str]:
    """Where torchvision keeps the default ImageNet weights of its model ``name``, and their URL."""
    import torchvision

    try:
        url = torchvision.models.get_model_weights(name).DEFAULT.url
    except ValueError:
        known = torchvision.models.list_models(module=torchvision.models)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"torchvision:{close[0]}" if close else "torchvision:alexnet"
        raise SpecError(f"{FIELD}: torchvision:{name}: torchvision has no classifier {name!r}; name one "
                        f"of torchvision.models.list_models(module=torchvision.models), e.g. {hint}") from None
    return Path(torch.hub.get_dir()) / "checkpoints" / _file_name(url), url


def weights_file(spec: JobSpec) -> WeightsFile | None:
    """The state dict file ``finetune.from_checkpoint`` names, checked to be there; None for an
    alexray checkpoint."""
    source = spec.finetune.from_checkpoint
    name = torchvision_source(source)
    if name is not None:
        path, url = torchvision_weights(name)
        if not path.is_file():
            raise ckpt.CheckpointError(f"{FIELD}: {source}: {path} is not there and nothing is downloaded here; "
                                       f"download {url} to {path} on every node (the torch hub cache, "
                                       "$TORCH_HOME/hub/checkpoints), or pass the file's path")
        return WeightsFile(path, source, url)
    if not is_state_dict_file(source):
        return None
    path = Path(source).expanduser()
    if not path.is_file():
        known = _torchvision_files().get(path.name)
        fix = f"download {known[1]} to it" if known else "pass the path of a .pth state dict"
        raise ckpt.CheckpointError(f"{FIELD}: {path} does not exist or is not a file; {fix}")
    return WeightsFile(path, source)


def _mismatch(tensors: dict, model: nn.Module) -> str | None:
    """The first key (in the model's order) where ``tensors`` differ from ``model``'s layers, all but
    its classification head; None when every layer fits."""
    head, _ = classifier_head(model)
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(f"{head}.")}
    for key, shape in expected.items():
        if key not in tensors:
            if key.endswith(".num_batches_tracked"):  # a counter, absent from files saved before it existed
                continue
            return f"it has no {key}"
        if tensors[key].shape != shape:
            return f"{key} is {list(tensors[key].shape)} there, {list(shape)} in the model"
    extra = next((k for k in tensors if k not in expected and not k.startswith(f"{head}.")), None)
    return f"{extra} is not a layer of the model" if extra else None


def _fix(found: WeightsFile, spec: JobSpec) -> str:
    m = spec.model
    known = _torchvision_files().get(found.path.name)
    if known is None:
        return (f"pass weights saved from the spec's model ({m.name}, width {m.width}), or set model.name to the "
                "model they were saved from")
    name, url = known
    if torchvision_model_name(name) != m.name:
        return f"they are torchvision's {name} weights: set model.name: {torchvision_model_name(name)}"
    if m.width != 1.0:
        return "torchvision's weights are for the full-width model: set model.width: 1.0"
    return f"the file differs from torchvision's {name} weights: download {url} again"


def load_weights_file(found: WeightsFile, model: nn.Module, spec: JobSpec) -> dict:
    """The file's tensors, loaded without running any pickled code and checked to fit ``model``."""
    try:
        tensors = torch.load(found.path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a foreign or damaged file: say so, never unpickle it
        raise ckpt.CheckpointError(f"{FIELD}: {found.path} does not load as a state dict with weights_only=True "
                                   f"({type(e).__name__}: {str(e).strip().splitlines()[0][:160]}); save the "
                                   "weights alone with torch.save(model.state_dict(), PATH)") from None
    if not isinstance(tensors, dict) or not tensors or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise ckpt.CheckpointError(f"{FIELD}: {found.path} holds no state dict of tensors; save the weights alone "
                                   "with torch.save(model.state_dict(), PATH)")
    problem = _mismatch(tensors, model)
    if problem:
        raise ckpt.CheckpointError(f"{FIELD}: {found.path} does not fit the spec's {spec.model.name} ({problem}); "
                                   f"{_fix(found, spec)}")
    return tensors


def check_weights_source(spec: JobSpec) -> str | None:
    """Refuse a ``torchvision:NAME`` or ``.pth`` source that is missing or does not fit the spec's model,
    before any worker starts; returns the file's path, or None for an alexray checkpoint."""
    found = weights_file(spec)
    if found is None:
        return None
    model = build_model_on_meta(spec.model.name, spec.model.num_classes or 1000, spec.model.width, **model_kwargs(spec))
    load_weights_file(found, model, spec)
    return str(found.path)


# ---- starting a run ---------------------------------------------------------------------------------

def load_backbone(model: nn.Module, spec: JobSpec) -> str:
    """Copy every layer but the classifier's last from ``finetune.from_checkpoint``; returns its address."""
    head, _ = classifier_head(model)
    found = weights_file(spec)
    if found is not None:
        tensors = load_weights_file(found, model, spec)
        model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(f"{head}.")}, strict=False)
        return str(found.path)
    with checkpoint_dir(spec.finetune.from_checkpoint) as (directory, where):
        info = read_info(directory, where)
        check_source(info, spec, where)
        tensors = ckpt.load_tensors(directory, ckpt.MODEL)
    backbone = {k: v for k, v in tensors.items() if not k.startswith(f"{head}.")}
    try:
        result = model.load_state_dict(backbone, strict=False)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])[:240]
        raise ckpt.CheckpointError(f"{FIELD}: {where}/{ckpt.MODEL} does not fit {describe(info)} "
                                   f"({detail}); use the checkpoint its weights were saved with") from None
    missing = [k for k in result.missing_keys if not k.startswith(f"{head}.")]
    if missing or result.unexpected_keys:
        odd = (missing or result.unexpected_keys)[0]
        raise ckpt.CheckpointError(f"{FIELD}: {where}/{ckpt.MODEL} does not fit {describe(info)} "
                                   f"({'missing' if missing else 'unexpected'} {odd}); use the checkpoint its "
                                   "weights were saved with")
    return where


def backbone_parameter_names(model: nn.Module) -> set[str]:
    """The convolutional layers: ``features`` in the AlexNets (and VGG, MobileNet...), else everything
    but the final classification layer."""
    features = getattr(model, "features", None)
    if isinstance(features, nn.Module):
        return {f"features.{name}" for name, _ in features.named_parameters()}
    head, _ = classifier_head(model)
    return {name for name, _ in model.named_parameters() if not name.startswith(f"{head}.")}


def param_groups(model: nn.Module, spec: JobSpec) -> list[dict]:
    """Optimizer parameter groups: the backbone frozen or at ``backbone_lr_mult``, the rest at 1."""
    f = spec.finetune
    if not f.from_checkpoint or (not f.freeze_features and f.backbone_lr_mult == 1.0):
        return [{"params": list(model.parameters()), "lr_mult": 1.0}]
    backbone = backbone_parameter_names(model)
    body = [p for name, p in model.named_parameters() if name in backbone]
    rest = [p for name, p in model.named_parameters() if name not in backbone]
    if f.freeze_features:
        for p in body:
            p.requires_grad_(False)
        return [{"params": rest, "lr_mult": 1.0}]
    return [{"params": body, "lr_mult": f.backbone_lr_mult}, {"params": rest, "lr_mult": 1.0}]
