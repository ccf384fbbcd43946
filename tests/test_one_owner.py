"""Facts with one owner: a checkpoint's file names, process liveness, absolute local paths, the
manifest's checks and the rule that keeps a JPEG as it is are each spelt in one place, which every
other module calls."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from alexray_core import processes, runs
from alexray_core.storage import absolute_location

ROOT = Path(__file__).resolve().parent.parent


def _source_files() -> dict[Path, str]:
    """Every .py file of the project outside tests/ (and outside hidden and build folders)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "build") or any(part.startswith(".") for part in rel.parts):
            continue
        found[rel] = path.read_text()
    return found


def _literal(name: str) -> str:
    """What a file name looks like in code: a template's part before its first field."""
    return name.partition("{")[0]


def test_every_checkpoint_file_name_is_spelt_once_outside_tests():
    assert _literal(runs.RNG_FILE) == "rng-rank" and _literal(runs.MODEL) == runs.MODEL  # the check itself
    sources = _source_files()
    assert Path("alexray_core/runs.py") in sources and Path("workers/models/checkpoint_format.py") in sources
    counts = {}
    for name in runs.CHECKPOINT_FILES:
        where = [f"{rel}:{n}" for rel, text in sources.items()
                 for n, line in enumerate(text.splitlines(), 1) if _literal(name) in line]
        counts[name] = where
    wrong = {name: where for name, where in counts.items() if len(where) != 1}
    assert not wrong, f"checkpoint file names spelt other than once (use alexray_core.runs' constants): {wrong}"
    assert all(where[0].startswith("alexray_core/runs.py:") for where in counts.values())


def test_rank_file_names_and_records():
    assert runs.rank_record(0) == runs.COMPLETE
    assert runs.is_rank_record(runs.rank_record(3)) and runs.is_rank_record(runs.rank_record(12))
    assert not runs.is_rank_record(runs.COMPLETE) and not runs.is_rank_record(runs.rng_file(3))
    assert runs.rng_file(0) != runs.rng_file(1) and runs.rank_record(1) != runs.rank_record(2)


# ---- process liveness -------------------------------------------------------------------------------

def test_a_running_process_is_alive_with_or_without_its_start_time():
    me = os.getpid()
    started = processes.start_ticks(me)
    assert started.isdigit()
    assert processes.alive(me) and processes.alive(me, started)


def test_a_reused_pid_counts_as_dead():
    """A record whose pid is running but whose start time differs names a process that is gone."""
    me = os.getpid()
    other_start = str(int(processes.start_ticks(me)) + 1)
    assert not processes.alive(me, other_start)


def test_an_exited_process_is_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = processes.start_ticks(child.pid)
    child.wait()
    assert not processes.alive(child.pid) and not processes.alive(child.pid, started)


def test_a_lease_whose_pid_was_reused_is_stale():
    from data_prep.lease import Holder

    holder = Holder.of_this_process()
    now = holder.renewed
    assert not holder.is_stale(now)
    reused = replace(holder, pid_start=str(int(holder.pid_start) + 1))
    assert reused.is_stale(now)


# ---- absolute local paths ---------------------------------------------------------------------------

def test_locations_are_made_absolute_in_one_way(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert absolute_location("s3://bucket/runs/") == "s3://bucket/runs/"
    assert absolute_location("runs") == str(tmp_path / "runs")
    assert absolute_location("~/data/") == str(tmp_path / "home" / "data")
    assert absolute_location("file://rel/../x") == str(tmp_path / "x")
    assert runs.run_dir("runs/", "r1") == f"{tmp_path}/runs/r1"
    assert runs.run_dir("s3://bucket/runs/", "r1") == "s3://bucket/runs/r1"


# ---- the manifest -----------------------------------------------------------------------------------

def _dataset(root: Path, **changes) -> Path:
    from data_prep.manifest import MANIFEST_NAME, build_manifest, dumps

    classes = [{"index": i, "id": f"c{i}", "name": f"c{i}"} for i in range(3)]
    shard = {"index": 0, "name": "train-000000.tar", "samples": 4, "bytes": 10, "sha256": "0" * 64}
    manifest = build_manifest("f" * 64, {}, classes, {"train": {"shards": [shard], "rejected": []}})
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST_NAME).write_bytes(dumps({**manifest, **changes}))
    return root


def test_the_workers_read_the_manifest_through_its_format_checks(tmp_path):
    from data_prep.errors import ShardError
    from workers.data.loader import load_manifest

    assert load_manifest(str(_dataset(tmp_path / "ok")))["num_classes"] == 3
    with pytest.raises(ShardError, match="format_version 99"):
        load_manifest(str(_dataset(tmp_path / "newer", format_version=99)))
    with pytest.raises(ShardError, match="not an alexray shard manifest"):
        load_manifest(str(_dataset(tmp_path / "foreign", format="other")))


def test_the_training_loop_checks_the_class_count_as_submitting_does(tmp_path):
    from alexray_core.spec import load_spec
    from data_prep.errors import ShardError
    from data_prep.manifest import check_dataset
    from workers.training.loop import _load_splits

    data = str(_dataset(tmp_path / "d"))
    spec = load_spec({"data": {"path": data, "val_split": None}, "model": {"num_classes": 5}})
    with pytest.raises(ShardError) as submitted:
        check_dataset(data, "train", None, 5)
    with pytest.raises(ShardError) as trained:
        _load_splits(spec)
    assert str(trained.value) == str(submitted.value).removeprefix("data.path: ")
    assert str(trained.value).startswith("model.num_classes: 5 does not match the 3 classes")
    spec.model.num_classes = None
    assert _load_splits(spec)[0].num_classes == 3


# ---- keeping a JPEG as it is ------------------------------------------------------------------------

def _encoded(image: Image.Image, kind: str) -> bytes:
    out = io.BytesIO()
    image.save(out, kind)
    return out.getvalue()


def test_sample_jpeg_follows_the_sharding_decision(tmp_path):
    from data_prep.images import KEEP, ImageOptions, probe_image, sample_jpeg

    rgb = Image.new("RGB", (40, 30), (200, 30, 90))
    clean = _encoded(rgb, "JPEG")
    assert sample_jpeg(clean) == clean  # kept byte for byte
    assert sample_jpeg(clean + b"\0" * 8) == clean + b"\0" * 8  # zero padding after the end marker too
    (tmp_path / "a.jpg").write_bytes(clean)
    assert probe_image(str(tmp_path / "a.jpg"), ImageOptions()).action == KEEP
    for other in (_encoded(rgb.convert("L"), "JPEG"), _encoded(rgb, "PNG")):
        converted = sample_jpeg(other)
        assert converted != other and converted[:2] == b"\xff\xd8"
        assert Image.open(io.BytesIO(converted)).mode == "RGB"
