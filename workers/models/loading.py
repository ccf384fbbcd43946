"""Open a checkpoint as a model: find its files, check them, rebuild the network and load the weights.

A checkpoint is named by its directory (Ray's ``checkpoint_e..._s...`` or a run's ``best/``) or by
its run directory (``best/`` if there is one, else the newest complete checkpoint), local or
``s3://``. Only the weights and the training state (``alexray_core.runs.MODEL_FILES``) are read,
each checked against the checkpoint's completeness record (sizes and CRC-32s) first; the weights
load with ``weights_only=True``, so a file that is not a checkpoint is refused and no pickled code
ever runs. The state's ``model`` entry (name, width, classes, image size) rebuilds the network.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from alexray_core import runs
from alexray_core.errors import AlexrayError
from alexray_core.storage import absolute_location, open_storage
from alexray_core.storage.api import is_s3_url
from workers.models import checkpoint_format as ckpt
from workers.models.architectures import build_model

log = logging.getLogger("alexray.inference")

@dataclass
class LoadedModel:
    """A checkpoint's network in eval mode, with what its training state says about it."""

    model: torch.nn.Module
    info: dict  # the training state's "model": name, num_classes, width, kwargs, classes, image_size, eval_resize
    source: str  # the checkpoint directory actually read (a run directory resolved to best/ or newest)

    @property
    def num_classes(self) -> int:
        return int(self.info["num_classes"])

    @property
    def classes(self) -> list[str]:
        names = list(self.info.get("classes") or [])
        return names if len(names) == self.num_classes else [str(i) for i in range(self.num_classes)]

    @property
    def image_size(self) -> int:
        return int(self.info.get("image_size") or 224)

    @property
    def eval_resize(self) -> int:
        return int(self.info.get("eval_resize") or self.image_size)


def describe(info: dict) -> str:
    return f"{info.get('name')} (width {info.get('width')}, {info.get('num_classes')} classes)"


def _local_candidates(path: Path) -> list[Path]:
    if not path.exists():
        raise ckpt.CheckpointError(f"{path} does not exist: pass a checkpoint directory or a run directory")
    if path.is_file():
        if (path.parent / runs.COMPLETE).is_file() and path.name in (*runs.MODEL_FILES, runs.OPTIMIZER, runs.COMPLETE):
            return [path.parent]
        raise ckpt.CheckpointError(f"{path} is a file, not a checkpoint: pass the directory holding {runs.MODEL}, "
                                   f"{runs.STATE} and {runs.COMPLETE}, or the run directory")
    return [path / prefix for prefix in _candidates(str(path))]


def _candidates(location: str) -> list[str]:
    found = runs.checkpoint_candidates(open_storage(location))
    if not found:
        raise ckpt.CheckpointError(f"{location} holds no checkpoint (no best/, no checkpoint_e*_s* directory): "
                                   "pass a checkpoint directory or the run directory of 'alexray train'")
    return found


@contextlib.contextmanager
def checkpoint_dir(location: str, names: tuple[str, ...] = runs.MODEL_FILES) -> Iterator[tuple[Path, str]]:
    """A local directory holding the checkpoint's ``names``, verified, and the checkpoint's address.

    For a run directory the candidates are tried best first, then newest first: a checkpoint that
    was being written when the run stopped is skipped with a warning.
    """
    location = str(location)
    errors: list[str] = []
    if is_s3_url(location):
        base = location.rstrip("/")
        for prefix in _candidates(base):
            where = f"{base}/{prefix}".rstrip("/")
            with tempfile.TemporaryDirectory(prefix="alexray-ckpt-") as tmp:
                storage = open_storage(where)
                for name in (runs.COMPLETE, *names):
                    if storage.exists(name):
                        (Path(tmp) / name).write_bytes(storage.read_bytes(name))
                try:
                    ckpt.check_complete(Path(tmp), names, where)
                except ckpt.CheckpointError as e:
                    errors.append(str(e))
                    continue
                _skipped(errors)
                yield Path(tmp), where
                return
    else:
        path = Path(absolute_location(location))
        for candidate in _local_candidates(path):
            try:
                ckpt.check_complete(candidate, names, str(candidate))
            except ckpt.CheckpointError as e:
                errors.append(str(e))
                continue
            _skipped(errors)
            yield candidate, str(candidate)
            return
    if len(errors) == 1:
        raise ckpt.CheckpointError(errors[0])
    _skipped(errors[:-1])
    raise ckpt.CheckpointError(f"no usable checkpoint in {location}; the last one tried: {errors[-1]}")


def _skipped(errors: list[str]) -> None:
    for error in errors:
        log.warning("skipping %s", error)


def read_info(directory: Path, where: str) -> dict:
    """The training state's description of the model; refuses checkpoints that do not have one."""
    try:
        state = json.loads((directory / runs.STATE).read_text())
    except (OSError, ValueError):
        raise ckpt.CheckpointError(f"{where}/{runs.STATE} is not readable JSON: not an alexray checkpoint") from None
    info = state.get("model") if isinstance(state, dict) else None
    if not isinstance(info, dict) or not {"name", "num_classes", "width"} <= set(info):
        raise ckpt.CheckpointError(f"{where}/{runs.STATE} does not describe its model (name, num_classes, width): "
                                   "it was not written by 'alexray train'; pass a training checkpoint")
    return info


def checkpoint_info(location: str) -> tuple[dict, str]:
    """The model description of a checkpoint and its resolved address, reading only its training state."""
    with checkpoint_dir(location, (runs.STATE,)) as (directory, where):
        return read_info(directory, where), where


def build_from_info(info: dict, where: str) -> torch.nn.Module:
    try:
        return build_model(info["name"], int(info["num_classes"]), float(info["width"]), **(info.get("kwargs") or {}))
    except (AlexrayError, ValueError, TypeError) as e:
        raise ckpt.CheckpointError(f"{where}: cannot rebuild {describe(info)}: {e}") from None


def load_weights(model: torch.nn.Module, directory: Path, where: str, info: dict) -> dict:
    """The checkpoint's weights (weights_only), checked to fit ``model``; returns them."""
    tensors = ckpt.load_tensors(directory, runs.MODEL)
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ckpt.CheckpointError(f"{where}/{runs.MODEL} holds no state dict of tensors: not an alexray checkpoint")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])[:240]
        raise ckpt.CheckpointError(f"{where}/{runs.MODEL} does not fit the {describe(info)} its {runs.STATE} describes "
                                   f"({detail}): the weights come from another model; use the checkpoint they were "
                                   "saved with") from None
    return tensors


def load_checkpoint(location: str) -> LoadedModel:
    """The checkpoint's network with its weights, in eval mode on the CPU."""
    with checkpoint_dir(location) as (directory, where):
        info = read_info(directory, where)
        model = build_from_info(info, where)
        load_weights(model, directory, where, info)
    model.eval()
    return LoadedModel(model, info, where)


def run_data_path(location: str) -> str | None:
    """The dataset the checkpoint's run trained on (in its run's spec), when that can be found."""
    location = str(location).rstrip("/")
    location = absolute_location(location)
    candidates = [location]
    for _ in range(2):  # {run}/checkpoint_x, {run}/best and {run}/checkpoints/checkpoint_x
        parent = location.rpartition("/")[0]
        if not parent or parent == location or parent.endswith(":/"):
            break
        candidates.append(parent)
        location = parent
    for candidate in candidates:
        try:
            storage = open_storage(candidate)
            if storage.exists(runs.SPEC):
                path = json.loads(storage.read_bytes(runs.SPEC)).get("data", {}).get("path")
                return path or None
        except Exception:  # noqa: BLE001 - only a convenience: the caller asks for --data instead
            return None
    return None


