"""The test support code itself: the SeaweedFS S3 server, the fixtures, the dataset factories."""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import boto3
import numpy as np
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from tests import conftest
from tests.support import datasets as ds
from tests.support.s3server import S3Server


def _error_code(excinfo) -> str:
    return excinfo.value.response["Error"]["Code"]


# --------------------------------------------------------------------------------------------------
# S3 server


def test_put_get_list_and_multipart(s3_server, s3_bucket):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="a/one.txt", Body=b"hello")
    assert client.get_object(Bucket=s3_bucket, Key="a/one.txt")["Body"].read() == b"hello"
    assert client.head_object(Bucket=s3_bucket, Key="a/one.txt")["ContentLength"] == 5
    with pytest.raises(ClientError) as excinfo:
        client.get_object(Bucket=s3_bucket, Key="a/missing.txt")
    assert _error_code(excinfo) in ("NoSuchKey", "404")

    # managed multipart upload and ranged download, as the sharder will use them
    from boto3.s3.transfer import TransferConfig

    payload = np.random.default_rng(0).integers(0, 256, size=11 << 20, dtype=np.uint8).tobytes()
    config = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    client.upload_fileobj(io.BytesIO(payload), s3_bucket, "big/blob.bin", Config=config)
    out = io.BytesIO()
    client.download_fileobj(s3_bucket, "big/blob.bin", out, Config=config)
    assert hashlib.sha256(out.getvalue()).digest() == hashlib.sha256(payload).digest()
    part = client.get_object(Bucket=s3_bucket, Key="big/blob.bin", Range="bytes=100-199")["Body"].read()
    assert part == payload[100:200]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["a/one.txt", "big/blob.bin"]
    assert s3_server.endpoint_url == f"http://127.0.0.1:{s3_server.port}" and s3_server.port < 55000


def test_buckets_are_fresh_per_test(s3_server, s3_bucket):
    assert re.fullmatch(r"test-[0-9a-f]{20}", s3_bucket)
    assert s3_server.client().list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0


def test_env_points_the_default_chain_and_subprocesses_at_the_server(s3_server, s3_bucket, s3_env):
    assert s3_env["AWS_ENDPOINT_URL"] == s3_server.endpoint_url
    assert {k: os.environ[k] for k in s3_env} == s3_env  # applied to this process too
    client = boto3.session.Session().client("s3")  # endpoint, keys and region all from the environment
    client.put_object(Bucket=s3_bucket, Key="from-env", Body=b"1")
    code = ("import boto3, sys; c = boto3.client('s3'); "
            "sys.stdout.write(c.get_object(Bucket=sys.argv[1], Key='from-env')['Body'].read().decode())")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.run([sys.executable, "-c", code, s3_bucket], env={**clean, **s3_env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "1"


def test_wrong_credentials_are_refused(s3_server, s3_bucket):
    s3_server.client().put_object(Bucket=s3_bucket, Key="secret", Body=b"x")
    no_retry = {"retries": {"max_attempts": 1}}
    with pytest.raises(ClientError) as excinfo:
        s3_server.client(access_key="someone-else", secret_key="whatever", **no_retry).list_buckets()
    assert _error_code(excinfo) == "InvalidAccessKeyId"
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError) as excinfo:
        s3_server.client(secret_key="wrong-secret", **no_retry).get_object(Bucket=s3_bucket, Key="secret")
    assert _error_code(excinfo) == "SignatureDoesNotMatch"
    with pytest.raises(ClientError) as excinfo:
        s3_server.client(access_key="someone-else", **no_retry).put_object(Bucket=s3_bucket, Key="x", Body=b"")
    assert _error_code(excinfo) == "InvalidAccessKeyId"
    anonymous = boto3.session.Session().client(
        "s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
        config=Config(signature_version=UNSIGNED, s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
    with pytest.raises(ClientError) as excinfo:
        anonymous.get_object(Bucket=s3_bucket, Key="secret")
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_restart_keeps_objects_and_addresses(s3_server, s3_bucket, pytestconfig):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="survivor", Body=b"still here")
    endpoint, pids = s3_server.endpoint_url, s3_server.pids
    started = time.monotonic()
    s3_server.stop()
    assert not s3_server.running and not any(Path(f"/proc/{pid}").exists() for pid in pids.values())
    down = s3_server.client(retries={"max_attempts": 1}, connect_timeout=1)
    with pytest.raises(EndpointConnectionError):
        down.list_buckets()

    # a test that finds the server down (an earlier one stopped it) gets it back before it runs
    class FakeItem:
        fixturenames = ["s3_bucket"]
        config = pytestconfig

    conftest.pytest_runtest_setup(FakeItem())
    assert s3_server.running and time.monotonic() - started < 30
    assert s3_server.endpoint_url == endpoint and set(s3_server.pids.values()).isdisjoint(pids.values())
    assert client.get_object(Bucket=s3_bucket, Key="survivor")["Body"].read() == b"still here"  # old client
    client.put_object(Bucket=s3_bucket, Key="after", Body=b"new")
    assert client.get_object(Bucket=s3_bucket, Key="after")["Body"].read() == b"new"


@pytest.mark.heavy("SeaweedFS")
def test_server_lifecycle_leaves_no_process_behind(tmp_path):
    server = S3Server(tmp_path / "own", access_key="k-own", secret_key="s-own")
    with server:
        pids = server.pids
        assert set(pids) == {"master", "server"} and server.pid == pids["server"]
        bucket = server.create_bucket()
        server.client().put_object(Bucket=bucket, Key="k", Body=b"v")
        assert server.env()["AWS_ACCESS_KEY_ID"] == "k-own"
        with pytest.raises(ClientError) as excinfo:  # the default test identity is not known here
            server.client(access_key="alexray-test", secret_key="alexray-test-secret",
                          retries={"max_attempts": 1}).list_buckets()
        assert _error_code(excinfo) == "InvalidAccessKeyId"
        assert server.ports is not None and len(set(server.ports.values())) == 8
        assert all(p < 55000 for p in server.ports.values())
        assert "Start Seaweed S3 API Server" in server.log_tail(400)
    assert not server.running and server.pids == {}
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists()
    for kind in ("master", "volume", "filer", "s3"):  # weed's own unix sockets are cleaned up too
        assert not Path(f"/tmp/seaweedfs-{kind}-grpc-{server.ports[kind + '_grpc']}.sock").exists()
    assert server.log_path.is_file() and (server.workdir / "data").is_dir()


@pytest.mark.heavy("SeaweedFS")
def test_restart_is_stop_then_start_on_the_same_ports(tmp_path, monkeypatch):
    server = S3Server(tmp_path / "never-started")
    calls = []
    monkeypatch.setattr(server, "stop", lambda grace=None: calls.append("stop"))
    monkeypatch.setattr(server, "start", lambda: calls.append("start") or server)
    monkeypatch.setattr(time, "sleep", lambda seconds: calls.append(f"sleep {seconds}"))
    assert server.restart(downtime=2) is server
    assert calls == ["stop", "sleep 2", "start"]


def test_failed_s3_test_report_carries_the_server_log(s3_server, pytestconfig):
    """Drive the reporting hook with a failed report of a test that used the server."""

    class FakeItem:
        fixturenames = ["s3_bucket", "s3_server"]
        config = pytestconfig

    class FakeReport:
        failed = True
        sections: list = []

    class FakeOutcome:
        def get_result(self):
            return report

    report = FakeReport()
    hook = conftest.pytest_runtest_makereport(FakeItem(), None)
    next(hook)
    with pytest.raises(StopIteration):
        hook.send(FakeOutcome())
    assert len(report.sections) == 1
    title, text = report.sections[0]
    assert "SeaweedFS log" in title and text == s3_server.log_tail(80) and text

    FakeItem.fixturenames = ["tmp_path"]  # tests that did not use S3 get nothing
    report = FakeReport()
    report.sections = []
    hook = conftest.pytest_runtest_makereport(FakeItem(), None)
    next(hook)
    with pytest.raises(StopIteration):
        hook.send(FakeOutcome())
    assert report.sections == []


# --------------------------------------------------------------------------------------------------
# Datasets


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_imagenet_layout_matches_its_info_and_naming(tmp_path):
    info = ds.make_imagenet_layout(tmp_path / "d", classes=4, train_per_class=5, val_per_class=3, seed=1)
    assert info.classes == ["n01440764", "n01443537", "n01484850", "n01491361"]
    assert info.counts == {"train": 20, "val": 12} and info.num_classes == 4
    on_disk = {split: sorted(p.relative_to(info.root).as_posix() for p in (info.root / split).rglob("*.JPEG"))
               for split in ("train", "val")}
    assert on_disk == {split: [rel for rel, _ in info.splits[split]] for split in ("train", "val")}
    for rel, cls in info.train:
        assert re.fullmatch(rf"train/{cls}/{cls}_\d+\.JPEG", rel)
    numbers = []
    for rel, cls in info.val:
        m = re.fullmatch(rf"val/{cls}/ILSVRC2012_val_(\d{{8}})\.JPEG", rel)
        assert m
        numbers.append(int(m.group(1)))
    assert sorted(numbers) == list(range(1, 13))
    assert not (info.root / "LOC_synset_mapping.txt").exists()
    # a split with no images is not created
    only_train = ds.make_imagenet_layout(tmp_path / "t", classes=2, train_per_class=2, val_per_class=0)
    assert not (only_train.root / "val").exists() and only_train.counts == {"train": 4}
    # more classes than the ten real synsets get synthetic, still sorted, wnids
    many = ds.make_imagenet_layout(tmp_path / "m", classes=12, train_per_class=1, val_per_class=0,
                                   size=(40, 30), synset_mapping=True)
    assert many.classes == sorted(many.classes) and all(re.fullmatch(r"n\d{8}", c) for c in many.classes)
    lines = (many.root / "LOC_synset_mapping.txt").read_text().splitlines()
    assert lines[0] == "n01440764 tench, Tinca tinca" and len(lines) == 12
    assert [line.split(" ", 1)[0] for line in lines] == many.classes


def test_named_classes_and_plain_names(tmp_path):
    info = ds.make_imagenet_layout(tmp_path / "a", classes=["zebra", "cat", "dog"], train_per_class=2,
                                   val_per_class=1, size=(64, 48))
    assert info.classes == ["cat", "dog", "zebra"] and info.class_to_idx["zebra"] == 2
    assert sorted(os.listdir(info.root / "train")) == ["cat", "dog", "zebra"]
    plain = ds.make_imagenet_layout(tmp_path / "b", classes=2, wnids=False, train_per_class=1, val_per_class=0,
                                    size=(64, 48))
    assert plain.classes == ["class_000", "class_001"]
    with pytest.raises(ValueError):
        ds.make_imagenet_layout(tmp_path / "c", classes=["a", "a"])


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kwargs = dict(classes=3, train_per_class=4, val_per_class=2, size=(160, 120), extras=True)
    a = ds.make_imagenet_layout(tmp_path / "a", seed=7, **kwargs)
    b = ds.make_imagenet_layout(tmp_path / "b", seed=7, **kwargs)
    c = ds.make_imagenet_layout(tmp_path / "c", seed=8, **kwargs)
    assert _tree(a.root) == _tree(b.root)
    assert a.splits == b.splits and a.extras == b.extras
    assert _tree(a.root) != _tree(c.root)
    # an image depends on (seed, split, class, index) only: more images leave the first ones alone
    more = ds.make_imagenet_layout(tmp_path / "more", seed=7, classes=3, train_per_class=6, val_per_class=2,
                                   size=(160, 120))
    first = ds.make_imagenet_layout(tmp_path / "few", seed=7, classes=3, train_per_class=1, val_per_class=2,
                                    size=(160, 120))
    pixels = lambda info: {np.asarray(Image.open(p)).tobytes() for p in info.paths("train")}  # noqa: E731
    assert pixels(first) <= pixels(more)


def test_images_are_real_looking_jpegs_and_classes_are_learnable(tmp_path):
    info = ds.make_imagenet_layout(tmp_path / "d", classes=4, train_per_class=20, val_per_class=5, seed=0)
    sizes, stds, features = set(), [], []
    for split in ("train", "val"):
        for rel, cls in info.splits[split]:
            path = info.root / rel
            sizes.add(path.stat().st_size)
            with Image.open(path) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
                w, h = image.size
                assert 0.85 * 375 <= min(w, h) <= 1.15 * 375 and 0.85 * 500 <= max(w, h) <= 1.15 * 500
                arr = np.asarray(image, dtype=np.float32)
            stds.append(float(arr.std()))
            # no flat areas: the noise makes neighbouring pixels differ
            assert float(np.abs(np.diff(arr, axis=1)).mean()) > 2.0
            small = np.asarray(Image.fromarray(arr.astype(np.uint8)).resize((4, 4), Image.Resampling.BOX),
                               dtype=np.float32).ravel()
            features.append((split, small, info.class_to_idx[cls]))
    assert min(stds) > 25
    assert len(sizes) > 0.9 * 100  # file sizes vary like real photos'
    assert 15_000 < np.median(sorted(sizes)) < 200_000
    # a nearest-centroid classifier on 4x4 thumbnails tells the classes apart
    train = [(f, y) for s, f, y in features if s == "train"]
    centroids = np.stack([np.mean([f for f, y in train if y == k], axis=0) for k in range(4)])
    val = [(f, y) for s, f, y in features if s == "val"]
    correct = sum(int(np.argmin(((centroids - f) ** 2).sum(axis=1)) == y) for f, y in val)
    assert correct / len(val) >= 0.75


def test_exact_sizes_when_jitter_is_off(tmp_path):
    info = ds.make_imagenet_layout(tmp_path / "d", classes=2, train_per_class=3, val_per_class=1, size=(96, 64),
                                   portrait_fraction=0, size_jitter=0)
    assert {Image.open(p).size for split in ("train", "val") for p in info.paths(split)} == {(96, 64)}


def test_kaggle_val_layout(tmp_path):
    info = ds.make_kaggle_val_layout(tmp_path / "k", classes=3, train_per_class=2, val_per_class=3, seed=2)
    root = info.root
    assert sorted(os.listdir(root)) == ["LOC_synset_mapping.txt", "LOC_val_solution.csv", "train", "val"]
    flat = sorted(os.listdir(root / "val"))
    assert len(flat) == 9 and all(re.fullmatch(r"ILSVRC2012_val_\d{8}\.JPEG", n) for n in flat)
    lines = (root / "LOC_val_solution.csv").read_text().splitlines()
    assert lines[0] == "ImageId,PredictionString"
    labels = {}
    for line in lines[1:]:
        image_id, prediction = line.split(",", 1)
        tokens = prediction.split()
        assert len(tokens) % 5 == 0 and set(tokens[::5]) == {tokens[0]}
        labels[image_id] = tokens[0]
        x1, y1, x2, y2 = map(int, tokens[1:5])
        assert x1 < x2 and y1 < y2
    assert labels == {Path(rel).stem: cls for rel, cls in info.val}
    assert sorted(f"{k}.JPEG" for k in labels) == flat
    mapping = dict(line.split(" ", 1) for line in (root / "LOC_synset_mapping.txt").read_text().splitlines())
    assert list(mapping) == info.classes and mapping["n01443537"] == "goldfish, Carassius auratus"


def test_extras_are_listed_and_behave_as_labelled(tmp_path):
    info = ds.make_imagenet_layout(tmp_path / "d", classes=3, train_per_class=2, val_per_class=1, size=(80, 60),
                                   extras=True)
    kinds = {e.kind for e in info.extras}
    assert kinds == set(ds.VALID_EXTRA_KINDS) | set(ds.BROKEN_EXTRA_KINDS)
    assert info.counts == {"train": 6 + len(ds.VALID_EXTRA_KINDS), "val": 3}
    listed = {rel for rel, _ in info.train}
    for extra in info.extras:
        assert extra.path.endswith(".JPEG") and extra.path.startswith(f"train/{extra.class_name}/")
        assert (extra.path in listed) == extra.valid
        try:
            with Image.open(info.root / extra.path) as image:
                image = ImageOps.exif_transpose(image).convert("RGB")
                assert image.size[0] > 0
            decoded = True
        except (OSError, UnidentifiedImageError):
            decoded = False
        assert decoded == extra.valid, extra
    chosen = ds.make_imagenet_layout(tmp_path / "e", classes=2, train_per_class=0, val_per_class=0,
                                     extras=["bomb", "cmyk"])
    assert [(e.kind, e.valid) for e in chosen.extras] == [("bomb", False), ("cmyk", True)]
    with pytest.raises(ValueError):
        ds.make_imagenet_layout(tmp_path / "f", extras=["nonsense"])


# --------------------------------------------------------------------------------------------------
# Awkward files


def _open_bytes(path: Path) -> Image.Image:
    return Image.open(io.BytesIO(path.read_bytes()))


def test_cmyk_grayscale_and_png_named_jpeg(tmp_path):
    cmyk = ds.write_cmyk_jpeg(tmp_path / "a" / "cmyk.JPEG")
    assert cmyk == tmp_path / "a" / "cmyk.JPEG"
    image = _open_bytes(cmyk)
    assert image.format == "JPEG" and image.mode == "CMYK"
    image.load()
    gray = _open_bytes(ds.write_grayscale_jpeg(tmp_path / "gray.JPEG"))
    assert gray.format == "JPEG" and gray.mode == "L" and np.asarray(gray).std() > 10
    png = ds.write_png_named_jpeg(tmp_path / "png.JPEG")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _open_bytes(png).format == "PNG" and _open_bytes(png).mode == "RGB"
    rgba = _open_bytes(ds.write_png_named_jpeg(tmp_path / "rgba.JPEG", mode="RGBA"))
    assert rgba.format == "PNG" and rgba.mode == "RGBA"
    alpha = np.asarray(rgba)[..., 3]
    assert alpha.min() < 128 and alpha.max() == 255


def test_exif_rotated_jpeg(tmp_path):
    path = ds.write_exif_rotated_jpeg(tmp_path / "rot.JPEG", orientation=6)
    with Image.open(path) as image:
        assert image.format == "JPEG"
        assert image.getexif()[0x0112] == 6
        w, h = image.size
        assert w != h
        assert ImageOps.exif_transpose(image).size == (h, w)
    with Image.open(ds.write_exif_rotated_jpeg(tmp_path / "r3.JPEG", orientation=3)) as image:
        assert image.getexif()[0x0112] == 3 and ImageOps.exif_transpose(image).size == image.size


def test_truncated_jpeg_fails_on_full_decode(tmp_path):
    path = ds.write_truncated_jpeg(tmp_path / "t.JPEG")
    full = ds._jpeg_bytes(ds.render_photo((160, 120), seed=[0, 15], noise=12.0), 90)
    assert path.read_bytes() == full[:len(path.read_bytes())]
    assert 0.55 < path.stat().st_size / len(full) < 0.65
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    image = _open_bytes(path)
    assert image.format == "JPEG" and image.size == (160, 120)  # the header is fine
    with pytest.raises(OSError, match="truncated"):
        image.load()


def test_corrupt_jpeg_parses_but_fails_to_decode(tmp_path):
    path = ds.write_corrupt_jpeg(tmp_path / "c.JPEG")
    data = path.read_bytes()
    assert data[:2] == b"\xff\xd8" and not data.endswith(b"\xff\xd9")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    image = _open_bytes(path)
    assert image.format == "JPEG" and image.size == (160, 120)
    with pytest.raises(OSError):
        image.load()


def test_zero_byte_and_text_files_are_not_images(tmp_path):
    zero = ds.write_zero_byte(tmp_path / "z.JPEG")
    assert zero.stat().st_size == 0
    text = ds.write_text_file(tmp_path / "notes.JPEG")
    assert text.read_text().strip()
    for path in (zero, text):
        with pytest.raises(UnidentifiedImageError):
            Image.open(path)


def test_decompression_bomb_is_small_valid_and_refused(tmp_path):
    path = ds.write_decompression_bomb(tmp_path / "bomb.png")
    data = path.read_bytes()
    assert len(data) < 100_000
    width, height = struct.unpack(">II", data[16:24])
    assert width * height > 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    # a well-formed PNG: chunk CRCs hold and the pixel data is complete (checked in bounded memory)
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, payload = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + payload)
        chunks.append((kind, payload))
        pos += 12 + length
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    inflater, total, pending = zlib.decompressobj(), 0, chunks[1][1]
    while pending:
        total += len(inflater.decompress(pending, 1 << 20))
        pending = inflater.unconsumed_tail
    total += len(inflater.flush())
    assert inflater.eof and total == height * (1 + (width + 7) // 8)


# --------------------------------------------------------------------------------------------------
# Digits and the make_dataset fixture


def test_digits_imagefolder(tmp_path):
    info = ds.write_digits_dataset(tmp_path / "a", train_per_class=12, val_per_class=4, size=32, seed=3)
    assert info.classes == [str(d) for d in range(10)]
    assert info.counts == {"train": 120, "val": 40}
    assert sorted(os.listdir(info.root / "train")) == info.classes
    index = lambda rel: int(re.search(r"digit_(\d+)\.JPEG$", rel).group(1))  # noqa: E731
    assert not {index(r) for r, _ in info.train} & {index(r) for r, _ in info.val}
    for rel, cls in info.train[:10] + info.val[:10]:
        assert rel.split("/")[1] == cls
        with Image.open(info.root / rel) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 32)
            arr = np.asarray(image)
            assert arr.min() < 80 and arr.max() > 200  # dark ink on a light background
    again = ds.write_digits_dataset(tmp_path / "b", 12, 4, size=32, seed=3)
    assert _tree(info.root) == _tree(again.root)
    with pytest.raises(ValueError):
        ds.write_digits_dataset(tmp_path / "c", train_per_class=170, val_per_class=10)


def test_make_dataset_fixture(make_dataset, tmp_path):
    a = make_dataset(classes=2, train_per_class=2, val_per_class=1, size=(64, 48))
    b = make_dataset("kaggle", classes=2, train_per_class=1, val_per_class=1, size=(64, 48))
    c = make_dataset("digits", train_per_class=2, val_per_class=1)
    assert len({a.root, b.root, c.root}) == 3 and all(tmp_path in info.root.parents for info in (a, b, c))
    assert a.layout == "imagenet" and b.layout == "kaggle" and c.layout == "imagefolder"
    assert (b.root / "LOC_val_solution.csv").is_file() and c.counts == {"train": 20, "val": 10}
    d = make_dataset(root=tmp_path / "chosen", classes=1, train_per_class=1, val_per_class=0, size=(32, 24))
    assert d.root == tmp_path / "chosen"
