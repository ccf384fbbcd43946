"""`alexray shard` faults: shared buckets, runs that collide, awkward split names, file modes,
connections that drop mid-read, and a local DEST handed to a Ray cluster."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from alexray_core.storage import open_storage
from data_prep.errors import ShardError
from tests.shardtools import error_line, run_alexray, start_alexray
from tests.support import datasets as ds
from tests.support.durability import record_fsync_and_replace, renamed_to
from tests.support.waiting import stderr_tail, wait_until


@pytest.fixture
def src(tmp_path):
    return Path(ds.make_imagenet_layout(tmp_path / "src", classes=3, train_per_class=10, val_per_class=4, seed=5).root)


@contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _uploads(client, bucket: str) -> set[tuple[str, str]]:
    found = set()
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        found.update((u["Key"], u["UploadId"]) for u in page.get("Uploads", []))
    return found


def _start_upload(client, bucket: str, key: str) -> str:
    """Begin a multipart upload with one part sent, as a program busy uploading a large file has."""
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"x" * (5 << 20))
    return upload_id


def test_a_bare_bucket_dest_leaves_other_programs_uploads_alone(src, s3_server, s3_bucket, s3_env):
    client = s3_server.client()
    theirs = _start_upload(client, s3_bucket, "backups/disk.img")
    run_alexray("shard", src, f"s3://{s3_bucket}", "--shard-size", "8", env=s3_env, check=True)
    assert ("backups/disk.img", theirs) in _uploads(client, s3_bucket)
    parts = client.list_parts(Bucket=s3_bucket, Key="backups/disk.img", UploadId=theirs)["Parts"]
    client.complete_multipart_upload(Bucket=s3_bucket, Key="backups/disk.img", UploadId=theirs,
                                     MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": parts[0]["ETag"]}]})
    assert client.head_object(Bucket=s3_bucket, Key="backups/disk.img")["ContentLength"] == 5 << 20


def test_uploads_a_killed_run_began_are_aborted_and_only_those(s3_server, s3_bucket, s3_env):
    client = s3_server.client()
    killed = open_storage(f"s3://{s3_bucket}/shards", record_uploads=True)
    # what upload_file does for a large shard, up to the moment the run is killed
    ours = killed.client.create_multipart_upload(Bucket=s3_bucket, Key="shards/train-000003.tar")["UploadId"]
    records = [o.name for o in killed.list("_uploads/")]
    assert len(records) == 1
    theirs = _start_upload(client, s3_bucket, "shards/notes-draft.bin")  # another program, same prefix

    assert open_storage(f"s3://{s3_bucket}/shards", record_uploads=True).clean_partial() == 1
    left = _uploads(client, s3_bucket)
    assert ("shards/train-000003.tar", ours) not in left
    assert ("shards/notes-draft.bin", theirs) in left
    assert killed.list("_uploads/") == []
    client.abort_multipart_upload(Bucket=s3_bucket, Key="shards/notes-draft.bin", UploadId=theirs)


def test_a_completed_multipart_upload_leaves_no_record(tmp_path, s3_server, s3_bucket, s3_env):
    storage = open_storage(f"s3://{s3_bucket}/shards", record_uploads=True)
    big = tmp_path / "train-000000.tar"
    big.write_bytes(os.urandom(9 << 20))  # over boto3's 8 MiB multipart threshold
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    storage.put_file("train-000000.tar", big)
    assert storage.sha256("train-000000.tar") == digest
    assert storage.list("_uploads/") == [] and not _uploads(s3_server.client(), s3_bucket)


def _writer_end(fifo: Path) -> int | None:
    """The writing end of ``fifo`` once a reader has it open, else None."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None  # ENXIO: nobody reads it yet


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.heavy("SeaweedFS"))])
def test_a_second_run_into_the_same_dest_is_refused(where, tmp_path, request):
    src = Path(ds.make_imagenet_layout(tmp_path / "src", classes=2, train_per_class=10, val_per_class=0, seed=4).root)
    # An input that is a named pipe holds the first run in its probe, DEST taken, until the pipe closes.
    fifo = next((src / "train").iterdir()) / "zz_pipe.JPEG"
    os.mkfifo(fifo)
    env = {}
    if where == "s3":
        env = request.getfixturevalue("s3_env")
        dest = f"s3://{request.getfixturevalue('s3_bucket')}/shards"
    else:
        dest = str(tmp_path / "shards")
    storage = open_storage(dest)
    args = ["--shard-size", "4", "--workers", "1", "--max-reject-fraction", "0.1"]
    first = start_alexray("shard", src, dest, *args, env=env)
    writer = wait_until(lambda: _writer_end(fifo), 120, "the first run to read its inputs", first,
                        output=stderr_tail)
    try:
        written = {o.name: o.size for o in storage.list()}
        second = run_alexray("shard", src, dest, *args, env=env, timeout=60)
        assert second.returncode == 2, second.stderr[-3000:]
        line = error_line(second)
        assert "another 'alexray shard' run" in line and f"pid {first.pid}" in line, line
        assert {o.name: o.size for o in storage.list()} == written  # the refused run touched nothing
    finally:
        os.close(writer)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert run_alexray("shard", "verify", dest, env=env).returncode == 0
    assert not storage.exists("_lease.json")


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.heavy("SeaweedFS"))])
def test_the_lease_is_taken_once_and_taken_over_only_when_stale(where, tmp_path, request):
    from data_prep.lease import LEASE_NAME, STALE_SECONDS, Holder, Lease

    dest = f"s3://{request.getfixturevalue('s3_bucket')}/d" if where == "s3" else str(tmp_path / "d")
    storage = open_storage(dest)
    storage.check_writable()
    # Eight runs start at once: exactly one gets DEST.
    outcomes = []

    def take():
        try:
            outcomes.append(Lease.acquire(storage))
        except ShardError as e:
            outcomes.append(e)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    leases = [o for o in outcomes if isinstance(o, Lease)]
    assert len(leases) == 1, outcomes
    assert all("another 'alexray shard' run" in str(o) for o in outcomes if not isinstance(o, Lease))
    leases[0].release()
    assert not storage.exists(LEASE_NAME)

    now = time.time()
    elsewhere = Holder("t" * 32, "another-machine", "boot", 4242, "", now - 60, now - 5)
    storage.write_bytes(LEASE_NAME, elsewhere.to_bytes())
    with pytest.raises(ShardError, match="pid 4242 on another-machine"):
        Lease.acquire(storage)  # live on a machine this one cannot look into
    storage.write_bytes(LEASE_NAME, replace(elsewhere, renewed=now - STALE_SECONDS - 1).to_bytes())
    lease = Lease.acquire(storage)  # stale: that run is gone
    assert Holder.parse(storage.read_bytes(LEASE_NAME)).token == lease.token
    lease.release()


def _as_if_killed(dest: Path, keep: int) -> None:
    """Leave ``dest`` as a run killed after its first ``keep`` shards leaves it: those shards and
    their progress records, no manifest."""
    manifest = json.loads((dest / "manifest.json").read_text())
    (dest / "manifest.json").unlink()
    (dest / "_progress").mkdir()
    shards = [(split, s) for split, part in sorted(manifest["splits"].items()) for s in part["shards"]]
    for split, shard in shards[:keep]:
        record = {**shard, "split": split, "index": int(shard["name"][-10:-4]), "fingerprint": manifest["fingerprint"],
                  "rejects": []}
        (dest / "_progress" / f"{shard['name']}.json").write_text(json.dumps(record))
    for _, shard in shards[keep:]:
        (dest / shard["name"]).unlink()


def test_split_names_with_dash_and_dot_resume_and_overwrite(tmp_path):
    root = Path(ds.make_imagenet_layout(tmp_path / "src", classes=3, train_per_class=12, val_per_class=8, seed=6).root)
    (root / "train").rename(root / "test.v2")
    (root / "val").rename(root / "val-2")
    splits = ["--splits", "val-2,test.v2"]
    args = [*splits, "--shard-size", "4"]
    run_alexray("shard", root, tmp_path / "reference", *args, check=True)

    dest = tmp_path / "shards"
    run_alexray("shard", root, dest, *args, check=True)
    _as_if_killed(dest, keep=5)  # from both splits
    again = run_alexray("shard", root, dest, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(5 found complete and kept)" in again.stdout
    assert (dest / "manifest.json").read_bytes() == (tmp_path / "reference" / "manifest.json").read_bytes()

    run_alexray("shard", root, dest, *splits, "--shard-size", "8", "--overwrite", check=True)
    manifest = json.loads((dest / "manifest.json").read_text())
    listed = {s["name"] for part in manifest["splits"].values() for s in part["shards"]}
    assert {p.name for p in dest.glob("*.tar")} == listed == {
        "val-2-000000.tar", "val-2-000001.tar", "val-2-000002.tar", "test.v2-000000.tar", "test.v2-000001.tar",
        "test.v2-000002.tar", "test.v2-000003.tar", "test.v2-000004.tar"}


def test_local_shards_are_readable_by_other_users(src, tmp_path):
    dest = tmp_path / "shards"
    with _umask(0o022):
        run_alexray("shard", src, dest, "--shard-size", "8", check=True)
    modes = {p.name: p.stat().st_mode & 0o777 for p in dest.iterdir()}
    assert len(modes) == 7 and set(modes.values()) == {0o644}, modes


def test_local_shards_reach_the_disk_before_their_name_and_record_appear(src, tmp_path, monkeypatch):
    from data_prep.pipeline import ShardConfig, shard_dataset

    events = record_fsync_and_replace(monkeypatch)  # appended from the publishing threads
    dest = tmp_path / "shards"
    shard_dataset(src, str(dest), ShardConfig(shard_size=8, workers=1, progress=False))
    shards = sorted(p.name for p in dest.glob("*.tar"))
    assert len(shards) == 6
    for name in shards:
        named = renamed_to(events, dest / name)
        staged = events[named][1]  # the partial file renamed to this name
        assert ("fsync", staged) in events[:named], (name, events)
        assert renamed_to(events, dest / "_progress" / f"{name}.json") > named, name  # a record means a shard in place


def test_a_local_dest_with_ray_needs_a_shared_file_system(src, tmp_path):
    dest = tmp_path / "shards"
    proc = run_alexray("shard", src, dest, "--ray", "127.0.0.1:9", timeout=60)
    assert proc.returncode == 2
    line = error_line(proc)
    assert "s3://" in line and "--shared-fs" in line, line
    assert not dest.exists()


def test_reading_an_object_survives_a_dropped_connection(s3_server, s3_bucket, s3_env, caplog):
    data = os.urandom(1 << 20) * 48  # far more than socket buffers hold
    s3_server.client().put_object(Bucket=s3_bucket, Key="big/object.bin", Body=data)
    storage = open_storage(f"s3://{s3_bucket}/big")
    chunks = storage.iter_chunks("object.bin", chunk_size=1 << 20)
    got = [next(chunks)]
    restart = threading.Thread(target=s3_server.start)
    with caplog.at_level(logging.WARNING, logger="alexray.storage"):
        s3_server.stop()  # the connection is cut mid-object
        restart.start()
        try:
            got.extend(chunks)
        finally:
            restart.join()
    assert hashlib.sha256(b"".join(got)).hexdigest() == hashlib.sha256(data).hexdigest()
    assert any("resuming" in r.getMessage() for r in caplog.records)
