"""Checkpoint directories: what a training state is made of, and when one counts as complete.

Layout of one checkpoint directory:
- ``model.pt``, ``optimizer.pt`` (rank 0): state dicts, loaded with ``weights_only=True``;
- ``state.json`` (rank 0): epoch, step, data position, schedule, metrics, the spec's identity;
- ``rng-rank{r}.pt`` (every rank): that rank's torch / numpy / python RNG states;
- ``complete.json`` (rank 0, written **last**): sizes and sha256 of rank 0's files. A directory
  without it, or whose files disagree with it, is refused: a crash while writing never leaves a
  checkpoint that resume would pick up.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

COMPLETE = "complete.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why and what to do."""


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue at the exact sample."""

    epoch: int = 0  # epoch in progress
    step_in_epoch: int = 0  # steps of that epoch already taken: the data position
    global_step: int = 0
    samples_seen: int = 0
    best_top1: float = -1.0
    schedule: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # per finished epoch: loss, top-1, top-5, images/s
    identity: dict = field(default_factory=dict)  # spec fields that must not change on resume
    world_size: int = 1
    model: dict = field(default_factory=dict)  # name, num_classes, width...: enough to rebuild it


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # Plain lists and numbers only: weights_only loading refuses numpy objects.
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory: str | Path, rank: int, state: TrainState | None, model_state: dict | None,
         optimizer_state: dict | None, delay_before_complete: float = 0.0) -> None:
    """Write this rank's part of a checkpoint; rank 0 writes ``complete.json`` last."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), directory / f"rng-rank{rank}.pt")
    if rank != 0:
        return
    assert state is not None and model_state is not None and optimizer_state is not None
    torch.save(model_state, directory / "model.pt")
    torch.save(optimizer_state, directory / "optimizer.pt")
    (directory / "state.json").write_text(json.dumps(asdict(state), indent=1, sort_keys=True))
    files = ["model.pt", "optimizer.pt", "state.json", "rng-rank0.pt"]
    manifest = {"format_version": FORMAT_VERSION,
                "files": {name: {"bytes": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
                          for name in files}}
    if delay_before_complete:
        time.sleep(delay_before_complete)  # a window for crash tests: everything written but the marker
    tmp = directory / f".{COMPLETE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, directory / COMPLETE)


def check_complete(directory: str | Path) -> None:
    directory = Path(directory)
    marker = directory / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"{directory} is not a complete checkpoint (no {COMPLETE}): it was being written "
                              "when the run stopped; resume from an earlier checkpoint")
    try:
        manifest = json.loads(marker.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{marker} is unreadable; resume from an earlier checkpoint") from None
    for name, expected in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path} is missing or differs from {COMPLETE}: the checkpoint is damaged; "
                                  "resume from an earlier checkpoint")


def load_state(directory: str | Path) -> TrainState:
    check_complete(directory)
    data = json.loads((Path(directory) / "state.json").read_text())
    return TrainState(**data)


def load_tensors(directory: str | Path, name: str, map_location="cpu") -> dict:
    """Load ``model.pt`` / ``optimizer.pt`` without executing any pickled code."""
    path = Path(directory) / name
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist: not an alexray checkpoint") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say so, never unpickle it
        raise CheckpointError(f"{path} is not a loadable checkpoint file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None


def load_rng(directory: str | Path, rank: int) -> dict | None:
    path = Path(directory) / f"rng-rank{rank}.pt"
    if not path.is_file():
        return None  # this rank did not exist when the checkpoint was taken (the run changed size)
    return torch.load(path, weights_only=True)
