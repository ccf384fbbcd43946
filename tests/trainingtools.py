"""Helpers for the training tests: a sharded digits dataset, specs, sample logs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import yaml

from alexray_core.localcluster import LocalCluster, cluster_pids, command_line
from tests.shardtools import run_alexray
from tests.support import datasets as ds


def sharded_digits(root: Path, train_per_class: int = 60, val_per_class: int = 15, shard_size: int = 50) -> Path:
    ds.write_digits_dataset(root / "digits", train_per_class=train_per_class, val_per_class=val_per_class)
    dest = root / "shards"
    run_alexray("shard", root / "digits", dest, "--shard-size", shard_size, check=True)
    return dest


def ray_train_pids(cluster: LocalCluster, *actors: str) -> list[int]:
    """The cluster's processes running these Ray Train actors (default: the training workers)."""
    actors = actors or ("RayTrainWorker",)
    return [p for p in cluster_pids(cluster) if any(a in command_line(p) for a in actors)]


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

    A step redone after a restart is logged again under the new attempt (and world size, which may
    differ in an elastic run); only the highest attempt's record of a step counts, as only its
    work survived. Counts above 1 mean a sample was really used twice in the epoch.
    """
    kept: dict[tuple[int, int], tuple[int, list[list[str]]]] = {}  # (epoch, step) -> (attempt, keys per rank)
    for path in sorted((run_dir / "samples").glob("*.json")):
        epoch, attempt = int(path.name[1:5]), int(path.name.split("-a")[1][:4])
        for entry in read_json(path):
            key = (epoch, entry["step"])
            if key not in kept or kept[key][0] < attempt:
                kept[key] = (attempt, [])
            if kept[key][0] == attempt:
                kept[key][1].append(entry["keys"])
    per_epoch: dict[int, Counter] = {}
    for (epoch, _), (_, parts) in kept.items():
        for keys in parts:
            per_epoch.setdefault(epoch, Counter()).update(keys)
    return per_epoch


def steps_by_world_size(run_dir: Path) -> dict[int, set[int]]:
    """world size -> the (global-batch) steps trained at that size, from the sample log file names."""
    out: dict[int, set[int]] = {}
    for path in (run_dir / "samples").glob("*.json"):
        world = int(path.name.split("-w")[1].split("-")[0])
        out.setdefault(world, set()).update(entry["step"] for entry in read_json(path))
    return out
