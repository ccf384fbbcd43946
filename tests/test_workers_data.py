"""The training data path: epoch plans, exactly-once, equal steps, resume, corrupt data, S3 reads."""

from __future__ import annotations

import io
import json
import re
import socket
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

from alexray_core.errors import AlexrayError
from alexray_core.storage import StorageError
from alexray_core.storage.s3reader import ResumableS3Reader
from tests.shardtools import read_tar_samples, run_alexray
from tests.support import datasets as ds
from tests.support.waiting import wait_until
from workers.data.loader import (
    EvalStream,
    SplitInfo,
    eval_batches,
    eval_segments,
    load_manifest,
    split_info,
    train_batches,
)
from workers.data.sampling import plan_epoch, rank_slices
from workers.data.transforms import eval_image

UNEVEN = [37, 5, 61, 1, 23, 40, 12, 0, 29]  # deliberately uneven shards (one empty)


def _positions(plan, world, rank):
    """(stream, position) pairs a rank consumes, per step, straight from the plan."""
    out = []
    for step in range(plan.steps):
        out.append([(sl.stream, step * plan.chunk + p) for sl in rank_slices(plan, world, rank)
                    for p in range(sl.lo, sl.hi)])
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4, 6])
def test_every_rank_same_steps_and_every_sample_once(world):
    plan = plan_epoch(UNEVEN, global_batch=48, num_streams=8, seed=3, epoch=2)
    per_rank = [_positions(plan, world, r) for r in range(world)]
    assert all(len(steps) == plan.steps for steps in per_rank)
    assert all(len(batch) == 48 // world for steps in per_rank for batch in steps)
    consumed = Counter(p for steps in per_rank for batch in steps for p in batch)
    assert max(consumed.values()) == 1 and len(consumed) == plan.used == plan.steps * 48
    assert plan.used + plan.dropped == sum(UNEVEN)
    # the global batch of each step is the same whatever the world size: resumable on any size
    global_batches = [sorted(p for r in range(world) for p in per_rank[r][s]) for s in range(plan.steps)]
    reference = [sorted(b) for b in _positions(plan, 1, 0)]
    assert global_batches == reference


def test_streams_cover_shards_and_order_changes_per_epoch():
    a = plan_epoch(UNEVEN, 48, 8, seed=3, epoch=0)
    b = plan_epoch(UNEVEN, 48, 8, seed=3, epoch=1)
    assert a.streams != b.streams and a == plan_epoch(UNEVEN, 48, 8, seed=3, epoch=0)
    covered = Counter((seg.shard, i) for stream in a.streams for seg in stream for i in range(seg.start, seg.stop))
    assert max(covered.values()) == 1 and len(covered) == a.stream_length * 8
    with pytest.raises(ValueError, match="streams"):
        plan_epoch(UNEVEN, 50, 8, 0, 0)
    with pytest.raises(AlexrayError, match="global_batch_size"):
        plan_epoch([3, 4], 64, 8, 0, 0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wdata")
    src = Path(ds.make_imagenet_layout(root / "src", classes=4, train_per_class=25, val_per_class=5, seed=8,
                                       size=(160, 120)).root)
    dest = root / "shards"
    run_alexray("shard", src, dest, "--shard-size", "13", check=True)
    return dest


def _keys_by_step(split, plan, world, rank, start=0, workers=2):
    return [b.keys for b in train_batches(split, plan, world, rank, start, seed=5, image_size=32,
                                          shuffle_block=16, num_workers=workers)]


def test_loader_exactly_once_equal_steps_and_exact_resume(shards):
    manifest = load_manifest(str(shards))
    split = split_info(str(shards), manifest, "train")
    plan = plan_epoch(list(split.sizes), 16, 4, seed=5, epoch=1)
    one = _keys_by_step(split, plan, 1, 0)
    two = [_keys_by_step(split, plan, 2, r) for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == plan.steps
    assert [two[0][s] + two[1][s] for s in range(plan.steps)] == one  # same global batches on 1 or 2 ranks
    keys = [k for batch in one for k in batch]
    assert len(keys) == len(set(keys)) == plan.used
    assert _keys_by_step(split, plan, 2, 1, start=3) == two[1][3:]  # mid-epoch resume, exact
    # Any number of decoding threads (num_workers; 0 means one) gives the same batches: one thread for
    # all four of the rank's streams, or one per stream, as the two above
    assert len(rank_slices(plan, 1, 0)) == 4
    for workers in (1, 4):
        assert _keys_by_step(split, plan, 1, 0, workers=workers) == one, workers
    assert _keys_by_step(split, plan, 2, 1, start=3, workers=1) == two[1][3:]
    batch = next(iter(train_batches(split, plan, 2, 0, 0, 5, 32, 16, 1, lighting_std=0.1)))
    assert batch.images.dtype.is_floating_point is False and batch.images.shape[1:] == (3, 32, 32)
    assert batch.alphas.shape == (8, 3) and batch.alphas.abs().sum() > 0


def test_eval_counts_every_sample_once(shards):
    manifest = load_manifest(str(shards))
    split = split_info(str(shards), manifest, "val")
    counts = [sum(len(b["labels"]) for b in eval_batches(split, 3, r, 32, 36, 4, 2)) for r in range(3)]
    assert sum(counts) == split.samples == 20
    crops = next(iter(eval_batches(split, 1, 0, 32, 36, 4, 0, ten_crop=True)))
    assert crops["images"].shape == (4, 10, 3, 32, 32)


def test_truncated_shard_is_skipped_and_counted(shards, tmp_path):
    # (a missing shard fails the run instead: tests/test_faults_data.py)
    manifest = load_manifest(str(shards))
    split = split_info(str(shards), manifest, "train")
    broken = tmp_path / "broken"
    broken.mkdir()
    for url in split.urls:
        (broken / Path(url).name).write_bytes(Path(url).read_bytes())
    first = broken / Path(split.urls[0]).name
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])  # truncated mid-sample
    damaged = SplitInfo(tuple(str(broken / Path(u).name) for u in split.urls), split.sizes, split.num_classes)
    plan = plan_epoch(list(split.sizes), 16, 4, seed=5, epoch=0)
    batches = list(train_batches(damaged, plan, 2, 0, 0, 5, 32, 16, 2)) + \
        list(train_batches(damaged, plan, 2, 1, 0, 5, 32, 16, 2))
    assert len(batches) == 2 * plan.steps  # no crash, same steps on both ranks
    lost = sum(b.skipped for b in batches)
    kept = sum(len(b.keys) for b in batches)
    assert 0 < lost < 13 and kept + lost == plan.used


class _CuttingProxy:
    """A TCP proxy to the S3 server that cuts the first response after ``cut_after`` bytes."""

    def __init__(self, target_port: int, cut_after: int):
        self.target, self.cut_after, self.cuts = target_port, cut_after, 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client):
        upstream = socket.create_connection(("127.0.0.1", self.target))
        cut = self.cuts == 0 and self.cut_after > 0
        if cut:
            self.cuts += 1

        def forward(src, dst, limit):
            sent = 0
            try:
                while data := src.recv(65536):
                    if limit and sent + len(data) > limit:
                        dst.sendall(data[: limit - sent])
                        break
                    dst.sendall(data)
                    sent += len(data)
            except OSError:
                pass
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=forward, args=(client, upstream, 0), daemon=True).start()
        forward(upstream, client, self.cut_after if cut else 0)

    def close(self):
        self.server.close()


def test_s3_reader_resumes_a_dropped_connection_with_a_ranged_get(s3_server, s3_bucket, s3_env):
    payload = bytes(range(256)) * 4096  # 1 MiB
    s3_server.client().put_object(Bucket=s3_bucket, Key="blob", Body=payload)
    proxy = _CuttingProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]), cut_after=300_000)
    try:
        import boto3

        client = boto3.session.Session().client(
            "s3", endpoint_url=f"http://127.0.0.1:{proxy.port}", region_name="us-east-1",
            aws_access_key_id=s3_server.access_key, aws_secret_access_key=s3_server.secret_key)
        reader = ResumableS3Reader(s3_bucket, "blob", client=client, base_delay=0.05)
        data = io.BufferedReader(reader, buffer_size=65536).read()
    finally:
        proxy.close()
    assert proxy.cuts == 1
    assert reader.reconnects >= 1
    assert data == payload


def test_loader_reads_shards_from_s3(shards, s3_server, s3_bucket, s3_env):
    client = s3_server.client()
    for path in shards.iterdir():
        client.upload_file(str(path), s3_bucket, f"ds/{path.name}")
    url = f"s3://{s3_bucket}/ds"
    manifest = load_manifest(url)
    assert manifest == json.loads((shards / "manifest.json").read_text())
    remote, local = split_info(url, manifest, "train"), split_info(str(shards), manifest, "train")
    plan = plan_epoch(list(local.sizes), 16, 4, seed=5, epoch=0)
    assert _keys_by_step(remote, plan, 2, 0) == _keys_by_step(local, plan, 2, 0)


# ---- evaluation: decoded on threads -------------------------------------------------------------

def _rows(batch) -> list[tuple[int, bytes]]:
    """(label, pixels) of each sample of an evaluation batch."""
    return [(int(label), image.numpy().tobytes()) for label, image in zip(batch["labels"], batch["images"])]


def _decoding_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("eval-decode")]


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_eval_threads_decode_the_whole_split_once_in_the_same_batches(shards, threads):
    split = split_info(str(shards), load_manifest(str(shards)), "train")  # 8 shards: several per rank
    assert len(split.urls) == 8
    expected = sorted((int(parts["cls"]), eval_image(parts["jpg"], 32, 36).transpose(2, 0, 1).tobytes())
                      for url in split.urls for parts in read_tar_samples(Path(url).read_bytes()).values())
    got, skipped = [], 0
    for rank in range(2):
        batches = list(eval_batches(split, 2, rank, 32, 36, 4, threads))
        assert all(b["images"].dtype == torch.uint8 and b["images"].shape[1:] == (3, 32, 32) for b in batches)
        got += [row for b in batches for row in _rows(b)]
        skipped += sum(b["skipped"] for b in batches)
        # thread k reads segments[k::threads] into its own batches, whatever order they arrive in
        segments, stream = eval_segments(split.sizes, 2, rank), EvalStream(split, 32, 36, 4)
        parts = [segments[k::threads] for k in range(min(threads, len(segments)))] or [segments]
        inline = [_rows(b) for part in parts for b in stream.batches(part)]
        assert sorted(_rows(b) for b in batches) == sorted(inline)
    assert skipped == 0 and len(got) == split.samples == 100
    assert sorted(got) == expected  # every sample once, with its label and the same pixels
    wait_until(lambda: not _decoding_threads(), 10, "the decoding threads to end", poll=0.05)


def test_an_unreadable_shard_fails_the_evaluation_in_one_line_and_ends_the_threads(shards, tmp_path):
    split = split_info(str(shards), load_manifest(str(shards)), "train")
    copied = tmp_path / "copied"
    copied.mkdir()
    for url in split.urls:
        (copied / Path(url).name).write_bytes(Path(url).read_bytes())
    moved = SplitInfo(tuple(str(copied / Path(u).name) for u in split.urls), split.sizes, split.num_classes)
    (copied / "train-000005.tar").unlink()  # after the split was read: the dataset changed during the run
    with pytest.raises(StorageError) as raised:  # in the consumer, the thread's own exception
        list(eval_batches(moved, 1, 0, 32, 36, 4, 3))
    assert re.fullmatch(r"\S+/train-000005\.tar no longer exists: .*run again \(.*\)", str(raised.value))
    wait_until(lambda: not _decoding_threads(), 10, "the decoding threads to end", poll=0.05)


def test_closing_the_evaluation_early_ends_its_threads(shards):
    split = split_info(str(shards), load_manifest(str(shards)), "train")
    batches = eval_batches(split, 1, 0, 32, 36, 4, 3)
    first = next(batches)
    assert len(first["labels"]) == 4
    assert len(_decoding_threads()) == 3  # 25 batches, 6 queued at most: none of the threads is done
    batches.close()
    wait_until(lambda: not _decoding_threads(), 10, "the decoding threads to end", poll=0.05)
