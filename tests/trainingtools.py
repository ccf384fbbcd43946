"""Helpers for the training tests: a sharded digits dataset, specs, sample logs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import yaml

from tests.shardtools import run_alexray
from tests.support import datasets as ds


def sharded_digits(root: Path, train_per_class: int = 60, val_per_class: int = 15, shard_size: int = 50) -> Path:
    ds.write_digits_dataset(root / "digits", train_per_class=train_per_class, val_per_class=val_per_class)
    dest = root / "shards"
    run_alexray("shard", root / "digits", dest, "--shard-size", shard_size, check=True)
    return dest


def write_spec(path: Path, dataset: str, storage: str, **sections) -> Path:
    """A small, fast spec for CPU tests; ``sections`` override fields, e.g. train={"epochs": 2}."""
    spec = {
        "run": {"storage": storage},
        "data": {"path": dataset, "image_size": 64, "eval_resize": 64, "streams": 8, "shuffle_block": 64,
                 "num_workers": 1, "lighting_std": 0.0, "min_crop_area": 0.6},
        "model": {"name": "alexnet", "width": 0.25, "init": "kaiming", "dropout": 0.0},
        "train": {"epochs": 2, "global_batch_size": 32, "lr": 0.005, "schedule": "cosine", "log_every": 1},
        "checkpoint": {"every_steps": 6, "keep": 2},
        "scaling": {"num_workers": 2},
    }
    for section, values in sections.items():
        spec.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(spec))
    return path


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def sample_log(run_dir: Path) -> dict[int, Counter]:
    """epoch -> how many times each sample key was trained on, from the debug sample log.

    A step redone after a restart rewrites the same log file, so counts above 1 mean a sample was
    really used twice in the epoch.
    """
    per_epoch: dict[int, Counter] = {}
    for path in sorted((run_dir / "samples").glob("*.json")):
        epoch = int(path.name[1:5])
        for entry in read_json(path):
            per_epoch.setdefault(epoch, Counter()).update(entry["keys"])
    return per_epoch
