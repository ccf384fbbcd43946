"""Transfer learning: start a run from another run's backbone with a new classifier.

The spec's ``finetune`` section names the source checkpoint. When a run starts fresh (no checkpoint
of its own to resume), every layer but the final classification layer is copied from the source;
that layer keeps the fresh initialisation ``build_model`` gave it (seeded by ``train.seed``, so the
same on every rank), sized for the new dataset's classes: N(0, 0.01) weights and zero biases in the
paper AlexNet, the model's own initialisation of its last layer in the others. The convolutional
layers can be frozen or trained at a fraction of the lr: the parameter groups carry an ``lr_mult``
that the training loop applies to its schedule. A resumed run restores its own weights and
optimizer, so these groups must be built the same way on every start, which they are: they depend
on the spec only.
"""

from __future__ import annotations

from torch import nn

from . import checkpoint as ckpt
from alexray_core.spec import JobSpec, SpecError
from .inference import checkpoint_dir, describe, read_info
from .models import classifier_head, model_kwargs


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
        raise SpecError(f"finetune.from_checkpoint: {where} holds {describe(info)} but the spec builds {m.name} "
                        f"(width {m.width}{f', groups {wanted_groups}' if wanted_groups is not None else ''}); "
                        f"set {fix} in the spec")


def load_backbone(model: nn.Module, spec: JobSpec) -> str:
    """Copy every layer but the classifier's last from ``finetune.from_checkpoint``; returns its address."""
    with checkpoint_dir(spec.finetune.from_checkpoint) as (directory, where):
        info = read_info(directory, where)
        check_source(info, spec, where)
        tensors = ckpt.load_tensors(directory, "model.pt")
    head, _ = classifier_head(model)
    backbone = {k: v for k, v in tensors.items() if not k.startswith(f"{head}.")}
    try:
        result = model.load_state_dict(backbone, strict=False)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])[:240]
        raise ckpt.CheckpointError(f"finetune.from_checkpoint: {where}/model.pt does not fit {describe(info)} "
                                   f"({detail}); use the checkpoint its weights were saved with") from None
    missing = [k for k in result.missing_keys if not k.startswith(f"{head}.")]
    if missing or result.unexpected_keys:
        odd = (missing or result.unexpected_keys)[0]
        raise ckpt.CheckpointError(f"finetune.from_checkpoint: {where}/model.pt does not fit {describe(info)} "
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
