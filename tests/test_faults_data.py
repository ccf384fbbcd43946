"""Faults on the training data path.

A shard that cannot be read (refused credentials, a deleted object or bucket, a missing file, a
checksum that does not match) fails the run at once, naming the shard. Corrupt content (bad JPEG
headers, bad or out-of-range classes, missing members, truncated tar members) is skipped and
counted, up to ``data.max_skipped_fraction``; a step with nothing readable on any rank is no
optimizer step. Shards written by other tools read the same as alexray's.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import queue
import re
import shutil
import socket
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from alexray_core.spec import load_spec
from alexray_core.storage import StorageError
from alexray_core.storage import s3reader as s3io
from tests.shardtools import error_line, run_alexray, start_alexray
from tests.support.runs import progress_step
from tests.support.waiting import wait_until
from tests.trainingtools import read_json, sharded_digits, write_spec
from workers.data.loader import (
    SplitInfo,
    eval_batches,
    load_manifest,
    split_info,
    train_batches,
)
from workers.data.sampling import plan_epoch
from workers.data.transforms import CorruptSample, eval_image, train_image
from workers.models.architectures import build_model
from workers.tools.inference import EvalOptions, evaluate_part
from workers.training.driver import prepare_run
from workers.training.loop import Session, run_local

SHUFFLE_BLOCK = 64  # write_spec's data.shuffle_block: the loader calls below must read the same order


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """200 train samples in 4 shards of 50, 50 val samples in one shard, 10 classes."""
    return sharded_digits(tmp_path_factory.mktemp("fault-digits"), train_per_class=20, val_per_class=5)


def _copy(dataset: Path, dest: Path) -> Path:
    shutil.copytree(dataset, dest)
    return dest


def _members(shard: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(shard) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def _write_tar(shard: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _edit(dataset: Path, edits: dict[str, dict[str, bytes | None]]) -> None:
    """Replace (bytes) or drop (None) members of samples: ``{key: {ext: new}}``, in whichever shard."""
    for shard in sorted(dataset.glob("*.tar")):
        members = _members(shard)
        if not any(name.partition(".")[0] in edits for name, _ in members):
            continue
        out = []
        for name, data in members:
            key, _, ext = name.partition(".")
            new = edits.get(key, {}).get(ext, data)
            if new is not None:
                out.append((name, new))
        _write_tar(shard, out)


def _jpeg_of(dataset: Path, key: str) -> bytes:
    for shard in dataset.glob("*.tar"):
        for name, data in _members(shard):
            if name == f"{key}.jpg":
                return data
    raise KeyError(key)


def _with_frame_size(jpeg: bytes, width: int | None = None, height: int | None = None) -> bytes:
    """The JPEG with its start-of-frame header claiming another width or height."""
    i = 2
    while True:
        marker, length = jpeg[i + 1], int.from_bytes(jpeg[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            out = bytearray(jpeg)
            if height is not None:
                out[i + 5:i + 7] = height.to_bytes(2, "big")
            if width is not None:
                out[i + 7:i + 9] = width.to_bytes(2, "big")
            return bytes(out)
        i += 2 + length


def _steps(split: SplitInfo, world: int = 1, rank: int = 0, global_batch: int = 32, seed: int = 0) -> list[list[str]]:
    """The sample keys of each step of epoch 0, as the training loop reads them."""
    plan = plan_epoch(list(split.sizes), global_batch, 8, seed, 0)
    return [b.keys for b in train_batches(split, plan, world, rank, 0, seed, 32, SHUFFLE_BLOCK, 1)]


def _train_split(dataset: Path, verify: bool = False) -> SplitInfo:
    return split_info(str(dataset), load_manifest(str(dataset)), "train", verify)


def _read_epoch(split: SplitInfo, world: int = 1, rank: int = 0):
    plan = plan_epoch(list(split.sizes), 32, 8, 0, 0)
    return plan, list(train_batches(split, plan, world, rank, 0, 0, 32, SHUFFLE_BLOCK, 1))


# ---- unreadable shards fail the run -----------------------------------------------------------------

def test_s3_train_shards_deleted_mid_run_fail_the_run_naming_the_shard(tmp_path, s3_server, s3_bucket, s3_env):
    # Shards of 10 under streams of 25 samples: half the streams open their third shard at their
    # sample 20, in step 5 of 6, well after the shards are gone (blocks of 4 read 2 steps ahead).
    digits = sharded_digits(tmp_path / "digits", train_per_class=20, val_per_class=5, shard_size=10)
    client = s3_server.client()
    for path in digits.iterdir():
        client.upload_file(str(path), s3_bucket, f"ds/{path.name}")
    runs = tmp_path / "runs"
    spec = write_spec(tmp_path / "spec.yaml", f"s3://{s3_bucket}/ds", str(runs), run={"name": "vanish"},
                      scaling={"num_workers": 1}, train={"epochs": 1}, data={"shuffle_block": 4},
                      checkpoint={"every_steps": 0}, debug={"step_delay": 1.0})
    proc = start_alexray("train", spec, "--no-ray", env=s3_env)
    try:
        wait_until(lambda: progress_step(runs / "vanish") >= 2, 180, "step 2", proc=proc,
                   output=lambda p: p.stderr.read()[-4000:], poll=0.1)
        for path in digits.glob("train-*.tar"):
            client.delete_object(Bucket=s3_bucket, Key=f"ds/{path.name}")
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, stderr[-3000:]
    line = error_line(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    assert re.search(rf"s3://{s3_bucket}/ds/train-0000\d\d\.tar no longer exists \(NoSuchKey\)", line), line
    assert "run again" in line
    assert 2 <= progress_step(runs / "vanish") < 6 and not (runs / "vanish" / "summary.json").exists()


def test_refused_credentials_and_missing_s3_objects_or_buckets_fail_naming_the_shard(
        digits, s3_server, s3_bucket, s3_env, monkeypatch):
    client = s3_server.client()
    for path in digits.iterdir():
        client.upload_file(str(path), s3_bucket, f"ds/{path.name}")
    url = f"s3://{s3_bucket}/ds"
    manifest = load_manifest(url)
    train, val = split_info(url, manifest, "train"), split_info(url, manifest, "val")
    try:
        plan, batches = _read_epoch(train)
        assert sum(len(b.keys) for b in batches) == plan.used  # the bucket itself reads

        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "revoked")  # the server knows the key, not this secret
        s3io.reset_client()
        with pytest.raises(StorageError, match=rf"S3 refused to read s3://{s3_bucket}/ds/train-00000\d\.tar "
                                               r"\(SignatureDoesNotMatch\): .*credentials"):
            _read_epoch(train)
        with pytest.raises(StorageError, match=rf"refused to read s3://{s3_bucket}/ds/val-000000\.tar"):
            list(eval_batches(val, 1, 0, 32, 36, 16, num_workers=0))
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env["AWS_SECRET_ACCESS_KEY"])
        s3io.reset_client()

        client.delete_object(Bucket=s3_bucket, Key="ds/train-000002.tar")
        with pytest.raises(StorageError, match=rf"s3://{s3_bucket}/ds/train-000002\.tar no longer exists"):
            _read_epoch(train)

        elsewhere = SplitInfo(tuple(u.replace(s3_bucket, "gone-bucket") for u in val.urls), val.sizes,
                              val.num_classes)
        with pytest.raises(StorageError, match=r"bucket 'gone-bucket' of s3://gone-bucket/ds/val-000000\.tar "
                                               r"no longer exists"):
            list(eval_batches(elsewhere, 1, 0, 32, 36, 16, num_workers=0))
    finally:
        s3io.reset_client()


def test_missing_local_shard_fails_naming_it(digits, tmp_path):
    data = _copy(digits, tmp_path / "data")
    (data / "train-000001.tar").unlink()
    with pytest.raises(StorageError, match=r"train-000001\.tar no longer exists: .*run again"):
        _read_epoch(_train_split(data))
    (data / "val-000000.tar").unlink()
    val = split_info(str(data), load_manifest(str(data)), "val")
    with pytest.raises(StorageError) as raised:  # from a decoding thread, still one line
        list(eval_batches(val, 1, 0, 32, 36, 16, num_workers=1))
    assert re.fullmatch(r"\S+/val-000000\.tar no longer exists: .*run again \(.*\)", str(raised.value))


# ---- corrupt content is skipped and counted ------------------------------------------------------------

def test_a_frame_header_of_zero_height_or_width_is_a_corrupt_sample(digits):
    name, jpeg = _members(digits / "train-000000.tar")[0]
    assert name.endswith(".jpg")
    train_image(jpeg, 32, np.random.default_rng(0))  # the untouched image decodes
    for width, height in ((None, 0), (0, None), (0, 0)):
        bad = _with_frame_size(jpeg, width, height)
        with pytest.raises(CorruptSample):
            train_image(bad, 32, np.random.default_rng(0))
        with pytest.raises(CorruptSample):
            eval_image(bad, 32, 36)


def test_every_kind_of_corrupt_content_is_skipped_and_counted(digits, tmp_path):
    data = _copy(digits, tmp_path / "data")
    clean = _steps(_train_split(data))
    last_shard = {name.partition(".")[0] for name, _ in _members(data / "train-000003.tar")}
    used = [key for step in clean for key in step]
    jpeg = _jpeg_of(data, used[0])
    kinds = {
        "height 0": {"jpg": _with_frame_size(jpeg, height=0)},
        "width 0": {"jpg": _with_frame_size(jpeg, width=0)},
        "not an image": {"jpg": b"<html>403 Forbidden</html>"},
        "class not a number": {"cls": b"seven"},
        "class 99": {"cls": b"99"},
        "class -1": {"cls": b"-1"},
        "no image": {"jpg": None},
        "no class": {"cls": None},
    }
    bad = dict(zip([key for key in used if key not in last_shard][1::17], kinds.values()))  # spread over the epoch
    assert len(bad) == len(kinds)
    _edit(data, bad)
    val_keys = [name.partition(".")[0] for name, _ in _members(data / "val-000000.tar")][::3]
    _edit(data, dict(zip(val_keys[1::2], kinds.values())))
    # a shard cut inside a member: that sample and the rest of its shard are lost
    shard = data / "train-000003.tar"
    names = [name for name, _ in _members(shard)]
    cut_key = names[-9].partition(".")[0]  # three samples from the end
    blob = shard.read_bytes()
    shard.write_bytes(blob[:blob.index(_jpeg_of(data, cut_key)) + 100])
    lost = {name.partition(".")[0] for name in names[names.index(f"{cut_key}.jpg"):]}
    assert len(lost) == 3

    split = _train_split(data)
    plan, batches = _read_epoch(split)
    expected = (set(bad) | lost) & set(used)
    assert len(batches) == plan.steps
    assert sum(b.skipped for b in batches) == len(expected) >= len(kinds)
    kept = [key for b in batches for key in b.keys]
    assert set(kept) == set(used) - expected and len(kept) + len(expected) == plan.used
    labels = torch.cat([b.labels for b in batches])
    assert len(labels) == len(kept) and 0 <= labels.min() and labels.max() < split.num_classes
    assert all(len(b.images) == len(b.labels) == len(b.keys) for b in batches)

    # evaluation: every sample either scored or counted as skipped
    val = split_info(str(data), load_manifest(str(data)), "val")
    evaluated = list(eval_batches(val, 1, 0, 32, 36, 16, num_workers=0))
    labels = torch.cat([b["labels"] for b in evaluated])
    assert sum(b["skipped"] for b in evaluated) == len(kinds) and len(labels) == val.samples - len(kinds)
    assert labels.max() < val.num_classes and labels.min() >= 0
    # alexray evaluate's confusion counts
    model = build_model("alexnet", val.num_classes, 0.25, init="kaiming")
    counts = evaluate_part(model, {"num_classes": val.num_classes, "image_size": 64, "eval_resize": 64}, val, 1, 0,
                           EvalOptions(num_workers=0))
    assert counts["skipped"] == len(kinds) and counts["confusion"].sum() == val.samples - len(kinds)


@pytest.mark.heavy("two training runs")
def test_out_of_range_class_is_skipped_and_the_skipped_ceiling_fails_the_run(digits, tmp_path):
    data = _copy(digits, tmp_path / "data")
    step1 = _steps(_train_split(data))[1]
    _edit(data, {step1[3]: {"cls": b"99"}})  # one label no model output can match
    spec = write_spec(tmp_path / "spec.yaml", str(data), str(tmp_path / "runs"), scaling={"num_workers": 1},
                      train={"epochs": 1}, data={"val_split": None}, checkpoint={"every_steps": 0})
    ok = run_alexray("train", spec, "--no-ray", "--set", "run.name=tolerant", "--set",
                     "data.max_skipped_fraction=0.01")  # 1 of 192 samples is within 1%
    assert ok.returncode == 0, ok.stderr[-3000:]
    summary = read_json(tmp_path / "runs" / "tolerant" / "summary.json")
    assert summary["steps"] == 6 and summary["history"][0]["corrupt_skipped"] == 1

    failed = run_alexray("train", spec, "--no-ray", "--set", "run.name=strict")  # the default: 0.1%
    assert failed.returncode == 1, failed.stderr[-3000:]
    line = error_line(failed)
    assert "data.max_skipped_fraction" in line and "1 of the 192 samples" in line and "step 1 of epoch 0" in line
    assert progress_step(tmp_path / "runs" / "strict") == 1  # stopped at the step that went over, not at the end
    assert not (tmp_path / "runs" / "strict" / "summary.json").exists()


def test_shards_written_by_webdataset_and_tar_read_like_alexray_shards(digits, tmp_path):
    import webdataset as wds

    manifest = load_manifest(str(digits))
    members = _members(digits / "train-000000.tar")
    samples = {}
    for name, blob in members:
        key, _, ext = name.partition(".")
        samples.setdefault(key, {})[ext] = blob
    keys = list(samples)

    def dataset(name: str, shards: list[tuple[str, int]]) -> Path:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        split = {"shards": [{"name": s, "samples": n} for s, n in shards]}
        (root / "manifest.json").write_text(json.dumps({**manifest, "splits": {"train": split}}))
        return root

    reference = dataset("alexray", [("train-000000.tar", len(keys))])
    shutil.copy(digits / "train-000000.tar", reference)

    webdataset = dataset("webdataset", [(f"part-{i:06d}.tar", n) for i, n in enumerate((20, 20, 10))])
    with wds.ShardWriter(str(webdataset / "part-%06d.tar"), maxcount=20, verbose=0) as sink:
        for key in keys:
            sink.write({"__key__": key, "jpg": samples[key]["jpg"], "cls": int(samples[key]["cls"]),
                        "json": samples[key]["json"]})

    files = tmp_path / "files"
    deep = Path("d" * 70) / ("e" * 40)  # paths over 100 characters: long-name records or the ustar prefix
    (files / deep).mkdir(parents=True)
    for key in keys:
        for ext, blob in samples[key].items():
            (files / deep / f"{key}.{ext}").write_bytes(blob)
    listed = [str(deep / f"{key}.{ext}") for key in keys for ext in samples[key]]
    made = {}
    for fmt in ("gnu", "posix", "ustar"):
        made[fmt] = dataset(f"tar-{fmt}", [("train-000000.tar", len(keys))])
        subprocess.run(["tar", f"--format={fmt}", "-cf", str(made[fmt] / "train-000000.tar"), "-C", str(files),
                        *listed], check=True)

    def read(root: Path):
        split = split_info(str(root), load_manifest(str(root)), "train")
        batches = list(eval_batches(split, 1, 0, 32, 36, 64, num_workers=0))
        return batches[0]["images"], batches[0]["labels"], sum(b["skipped"] for b in batches)

    images, labels, skipped = read(reference)
    assert skipped == 0 and len(labels) == len(keys)
    for root in (webdataset, *made.values()):
        other_images, other_labels, other_skipped = read(root)
        assert other_skipped == 0, root.name
        assert torch.equal(other_labels, labels) and torch.equal(other_images, images), root.name


# ---- a step with nothing readable is no optimizer step ---------------------------------------------

def _initial_weights_sha256(spec) -> str:
    from workers.models.architectures import model_kwargs
    from workers.training.run_store import weights_sha256

    torch.manual_seed(spec.train.seed)  # as train_loop does: the same initial weights on every rank
    return weights_sha256(build_model(spec.model.name, 10, spec.model.width, **model_kwargs(spec)).state_dict())


def test_a_step_with_no_readable_sample_is_no_optimizer_step(digits, tmp_path):
    data = _copy(digits, tmp_path / "data")
    split = _train_split(data)
    _edit(data, {key: {"jpg": b"\xff\xd8 broken"} for key in _steps(split)[0]})  # all of step 0
    spec_path = write_spec(tmp_path / "spec.yaml", str(data), str(tmp_path / "runs"), scaling={"num_workers": 1},
                           data={"val_split": None, "max_skipped_fraction": 1.0}, checkpoint={"every_steps": 0},
                           train={"max_steps": 1})
    spec = load_spec(spec_path, ["run.name=empty-step"])
    summary = run_local(spec, prepare_run(spec))
    assert summary["steps"] == 1
    assert summary["final_weights_sha256"] == _initial_weights_sha256(spec)  # weight decay did not move them
    spec = load_spec(spec_path, ["run.name=next-step", "train.max_steps=2"])
    assert run_local(spec, prepare_run(spec))["final_weights_sha256"] != _initial_weights_sha256(spec)


class _Uncheckpointed(Session):
    """A DDP session over gloo without Ray, whose checkpoints are thrown away (not what is tested)."""

    device = torch.device("cpu")

    def __init__(self, rank: int, world: int):
        self.rank, self.world_size = rank, world

    def latest_checkpoint(self):
        return None

    def save_checkpoint(self, directory, name, metrics, async_upload):
        shutil.rmtree(directory, ignore_errors=True)

    def preemption_notice(self):
        return None


def _train_ranks(rank: int, world: int, port: int, runs: list[tuple[dict, str]], results) -> None:
    import torch.distributed as dist

    from alexray_core.spec import spec_from_dict
    from workers.training.loop import train_loop

    session = _Uncheckpointed(rank, world)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for spec, run_dir in runs:
            try:
                summary = train_loop(spec_from_dict(spec), run_dir, session)
                results.put((run_dir, rank, "ok", summary.get("final_weights_sha256")))
            except Exception as e:  # noqa: BLE001 - reported to the test
                results.put((run_dir, rank, type(e).__name__, str(e)))
    finally:
        dist.destroy_process_group()


@pytest.mark.heavy("two DDP processes")
def test_ddp_ranks_agree_to_skip_a_step_that_is_empty_everywhere(digits, tmp_path):
    data = _copy(digits, tmp_path / "data")
    split = _train_split(data)
    rank0, rank1 = _steps(split, world=2, rank=0), _steps(split, world=2, rank=1)
    # step 0: nothing readable on either rank; step 1: nothing on rank 0, all of rank 1's batch
    _edit(data, {key: {"jpg": b"\xff\xd8 broken"} for key in rank0[0] + rank1[0] + rank0[1]})
    base = write_spec(tmp_path / "spec.yaml", str(data), str(tmp_path / "runs"),
                      data={"val_split": None, "max_skipped_fraction": 1.0}, checkpoint={"every_steps": 0})
    specs = {"one": ["train.max_steps=1"], "two": ["train.max_steps=2"],
             "strict": ["train.max_steps=2", "data.max_skipped_fraction=0.0"]}
    runs = []
    for name, overrides in specs.items():
        spec = load_spec(base, [f"run.name={name}", *overrides])
        runs.append((spec.to_dict(), prepare_run(spec)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    procs = [context.Process(target=_train_ranks, args=(r, 2, port, runs, results)) for r in range(2)]
    for proc in procs:
        proc.start()
    got = {}
    try:
        while len(got) < 2 * len(runs):
            run_dir, rank, outcome, detail = results.get(timeout=240)  # a rank stuck in an all-reduce never answers
            got[(Path(run_dir).name, rank)] = (outcome, detail)
    except queue.Empty:
        pytest.fail(f"the ranks hung; results so far: {got}")
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    initial = _initial_weights_sha256(load_spec(base))
    assert got[("one", 0)] == ("ok", initial) and got[("one", 1)][0] == "ok"  # step 0 skipped by both ranks
    assert got[("two", 0)][0] == "ok" and got[("two", 0)][1] != initial  # step 1 trained on rank 1's samples
    progress = read_json(Path(runs[1][1]) / "progress.json")
    assert progress["step"] == 2 and math.isfinite(progress["loss"])
    for rank in range(2):  # both ranks stop at the same step with the same error: no rank left waiting
        outcome, message = got[("strict", rank)]
        assert outcome == "ShardError" and "data.max_skipped_fraction" in message and "step 0 of epoch 0" in message


# ---- integrity: data.verify_shards ------------------------------------------------------------------

def test_verify_shards_fails_on_a_changed_shard_before_using_any_of_its_samples(digits, tmp_path):
    data = _copy(digits, tmp_path / "data")
    _, batches = _read_epoch(_train_split(data, verify=True))  # an intact dataset verifies
    assert sum(b.skipped for b in batches) == 0
    shard = data / "train-000002.tar"
    changed = {name.partition(".")[0] for name, _ in _members(shard)}
    blob = bytearray(shard.read_bytes())
    at = blob.index(b'"class_id"')  # a byte of a .json member: every sample still decodes
    blob[at + 1] ^= 0x20
    shard.write_bytes(bytes(blob))
    _, batches = _read_epoch(_train_split(data))  # unverified, the change goes unnoticed
    assert sum(b.skipped for b in batches) == 0

    plan = plan_epoch(list(_train_split(data).sizes), 32, 8, 0, 0)
    seen = []
    with pytest.raises(StorageError, match=r"train-000002\.tar does not match the sha256 in its manifest"):
        for batch in train_batches(_train_split(data, verify=True), plan, 1, 0, 0, 0, 32, SHUFFLE_BLOCK, 1):
            seen += batch.keys
    assert not changed & set(seen)

    spec_path = write_spec(tmp_path / "spec.yaml", str(data), str(tmp_path / "runs"), scaling={"num_workers": 1},
                           data={"val_split": None}, checkpoint={"every_steps": 0})
    spec = load_spec(spec_path, ["run.name=verified", "data.verify_shards=true"])
    with pytest.raises(StorageError, match=r"train-000002\.tar does not match"):
        run_local(spec, prepare_run(spec))


@pytest.mark.heavy("a Ray cluster")
def test_under_ray_an_unreadable_shard_fails_the_run_without_restarts(digits, tmp_path, ray_cluster):
    """Ray restarts a worker group after any worker error, up to failure.max_failures; a restart
    cannot make a changed shard match its checksum, so the run fails at its first start."""
    _, env = ray_cluster
    data = _copy(digits, tmp_path / "data")
    shard = data / "train-000001.tar"
    blob = bytearray(shard.read_bytes())
    blob[blob.index(b'"class_id"') + 1] ^= 0x20
    shard.write_bytes(bytes(blob))
    runs = tmp_path / "runs"
    spec = write_spec(tmp_path / "spec.yaml", str(data), str(runs), run={"name": "changed"},
                      data={"val_split": None, "verify_shards": True}, checkpoint={"every_steps": 0},
                      failure={"max_failures": 3})
    proc = run_alexray("train", spec, env=env, timeout=600)
    assert proc.returncode == 1, proc.stderr[-4000:]
    line = error_line(proc)
    assert re.search(r"training failed on rank \d: \S+/train-000001\.tar does not match the sha256 in its "
                     r"manifest", line), line
    starts = sorted(p.name for p in (runs / "changed" / "attempts").iterdir())
    assert starts == ["0000.json"], starts  # one start: no restart was spent on it


def test_the_failure_policy_restarts_for_crashes_but_not_for_errors_only_the_user_can_fix():
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import (
        DefaultFailurePolicy,
        FailureDecision,
    )
    from ray.train.v2.api.exceptions import WorkerGroupError

    from workers.training.failure_policy import FailFastPolicy

    unreadable = WorkerGroupError("rank 1 failed", {0: RuntimeError("collective aborted"),
                                                    1: StorageError("s3://b/train-000001.tar no longer exists")})
    crashed = WorkerGroupError("rank 0 failed", {0: RuntimeError("segfault in a decoder")})
    ray_default = DefaultFailurePolicy(FailureConfig(max_failures=3))
    assert ray_default.make_decision(unreadable) == FailureDecision.RETRY  # what Ray alone would do
    ours = FailFastPolicy(DefaultFailurePolicy(FailureConfig(max_failures=3)))
    assert ours.make_decision(unreadable) == FailureDecision.RAISE
    assert [ours.make_decision(crashed) for _ in range(4)] == [FailureDecision.RETRY] * 3 + [FailureDecision.RAISE]
