"""`alexray shard` against a real S3 server (SeaweedFS): output, errors, interruptions, outages."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds

from tests.shardtools import error_line, run_alexray, shard_contents, start_alexray
from tests.support import datasets as ds
from tests.support.waiting import Output, stderr_tail, wait_until


@pytest.fixture
def src(tmp_path):
    return Path(ds.make_imagenet_layout(tmp_path / "src", classes=3, train_per_class=10, val_per_class=4, seed=5).root)


def _s3_manifest(client, bucket, prefix="shards") -> dict:
    return json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read())


def _keys(client, bucket, prefix="shards") -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


def test_shards_on_s3_read_back_with_stock_webdataset(src, tmp_path, s3_server, s3_bucket, s3_env):
    client = s3_server.client()
    url = f"s3://{s3_bucket}/shards"
    run_alexray("shard", src, url, "--shard-size", "8", env=s3_env, check=True)
    manifest = _s3_manifest(client, s3_bucket)
    assert manifest["totals"]["samples"] == 42 and manifest["totals"]["rejected"] == 0
    assert not [k for k in _keys(client, s3_bucket) if "_progress" in k]
    read = lambda name: client.get_object(Bucket=s3_bucket, Key=f"shards/{name}")["Body"].read()  # noqa: E731
    contents = shard_contents(manifest, read)
    for split in ("train", "val"):
        sources = Counter(r["meta"]["source"] for r in contents[split])
        on_disk = {p.relative_to(src).as_posix() for p in (src / split).rglob("*") if p.is_file()}
        assert set(sources) == on_disk and max(sources.values()) == 1
    # the same bytes as a local run with the same seed
    local = tmp_path / "local"
    run_alexray("shard", src, local, "--shard-size", "8", check=True)
    assert json.loads((local / "manifest.json").read_text()) == manifest
    # stock WebDataset, over presigned HTTP URLs (WebDataset has no s3:// opener of its own)
    urls = [client.generate_presigned_url("get_object", Params={"Bucket": s3_bucket, "Key": f"shards/{s['name']}"})
            for s in manifest["splits"]["train"]["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls"))
    assert len(samples) == 30 and all(img.mode == "RGB" for img, _ in samples)
    assert run_alexray("shard", "verify", url, env=s3_env).returncode == 0


def test_missing_bucket_wrong_credentials_unreachable_endpoint(src, s3_server, s3_bucket, s3_env):
    cases = {
        "does not exist": (f"s3://no-such-bucket-{os.getpid()}/x", {}),
        "refused the credentials": (f"s3://{s3_bucket}/x", {"AWS_SECRET_ACCESS_KEY": "wrong-secret"}),
        "cannot reach S3": (f"s3://{s3_bucket}/x", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}),
    }
    for expected, (url, override) in cases.items():
        proc = run_alexray("shard", src, url, env={**s3_env, **override})
        assert proc.returncode == 2, proc.stderr
        line = error_line(proc)
        assert expected in line, line
        # refused at the first check, not waited out as an outage is (each wait logs 'retrying in')
        assert "retrying" not in proc.stderr, proc.stderr[-2000:]
    assert _keys(s3_server.client(), s3_bucket, "x") == []


def test_s3_dest_holding_another_dataset_needs_overwrite(src, s3_server, s3_bucket, s3_env):
    url = f"s3://{s3_bucket}/shards"
    run_alexray("shard", src, url, "--shard-size", "8", env=s3_env, check=True)
    proc = run_alexray("shard", src, url, "--shard-size", "5", env=s3_env)
    assert proc.returncode == 2 and "--overwrite" in error_line(proc)
    run_alexray("shard", src, url, "--shard-size", "5", "--overwrite", env=s3_env, check=True)
    client = s3_server.client()
    assert _s3_manifest(client, s3_bucket)["options"]["shard_size"] == 5
    train = [k for k in _keys(client, s3_bucket) if "/train-" in k]
    assert len(train) == 6  # 30 samples / 5; the old shards are gone


def test_killed_s3_run_resumes_to_the_identical_result(tmp_path, s3_server, s3_bucket, s3_env):
    src = Path(ds.make_imagenet_layout(tmp_path / "src", classes=3, train_per_class=40, val_per_class=0, seed=2).root)
    client = s3_server.client()
    args = ["--shard-size", "3", "--resize-short-side", "180", "--workers", "1"]
    run_alexray("shard", src, f"s3://{s3_bucket}/reference", *args, env=s3_env, check=True)

    url = f"s3://{s3_bucket}/shards"
    proc = start_alexray("shard", src, url, *args, env=s3_env)
    wait_until(lambda: len([k for k in _keys(client, s3_bucket) if "_progress/" in k]) >= 3, 120,
               "three finished shards", proc, stderr_tail, poll=0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    keys = _keys(client, s3_bucket)
    assert "shards/manifest.json" not in keys
    assert 3 <= len([k for k in keys if k.endswith(".tar")]) < 40

    proc = run_alexray("shard", src, url, *args, env=s3_env, check=True)
    assert "found complete and kept" in proc.stdout
    assert _s3_manifest(client, s3_bucket) == _s3_manifest(client, s3_bucket, "reference")
    assert run_alexray("shard", "verify", url, env=s3_env).returncode == 0


def test_s3_outage_mid_run_is_ridden_out(tmp_path, s3_server, s3_bucket, s3_env):
    src = Path(ds.make_imagenet_layout(tmp_path / "src", classes=2, train_per_class=40, val_per_class=0, seed=4).root)
    client = s3_server.client()
    url = f"s3://{s3_bucket}/shards"
    proc = start_alexray("shard", src, url, "--shard-size", "2", "--resize-short-side", "160", "--workers", "1",
                         env=s3_env)
    output = Output(proc)
    wait_until(lambda: [k for k in _keys(client, s3_bucket) if k.endswith(".tar")], 120, "a first shard", proc,
               lambda _: output.tail(), poll=0.1)
    s3_server.stop()
    output.wait_for_line(("retrying in",), 120, "a retry while the server is down")
    restart = threading.Thread(target=s3_server.start)
    restart.start()
    output.finish(timeout=240)
    restart.join()
    manifest = _s3_manifest(s3_server.client(), s3_bucket)
    assert manifest["totals"]["samples"] == 80
    assert run_alexray("shard", "verify", url, env=s3_env).returncode == 0
