"""`alexray shard` end to end on local disk: format, robustness, resume, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds

from tests.shardtools import error_line, read_tar_samples, run_alexray, shard_contents, start_alexray
from tests.support import datasets as ds
from tests.support.waiting import stderr_tail, wait_until


def _images_on_disk(root: Path, split: str) -> set[str]:
    return {p.relative_to(root).as_posix() for p in (root / split).rglob("*") if p.is_file()}


def _manifest(dest: Path) -> dict:
    return json.loads((dest / "manifest.json").read_text())


def _local_contents(dest: Path) -> dict:
    return shard_contents(_manifest(dest), lambda name: (dest / name).read_bytes())


@pytest.fixture
def src(tmp_path):
    info = ds.make_imagenet_layout(tmp_path / "src", classes=4, train_per_class=12, val_per_class=3, seed=3)
    return Path(info.root)


def test_shards_hold_every_image_once_and_read_back_with_stock_tools(src, tmp_path):
    dest = tmp_path / "shards"
    proc = run_alexray("shard", src, dest, "--shard-size", "10", "--workers", "2", check=True)
    assert "manifest:" in proc.stdout
    manifest = _manifest(dest)
    assert manifest["format"] == "alexray-shards" and manifest["format_version"] == 1
    assert manifest["num_classes"] == 4
    assert [c["index"] for c in manifest["classes"]] == [0, 1, 2, 3]
    assert [c["id"] for c in manifest["classes"]] == sorted(c["id"] for c in manifest["classes"])
    contents = _local_contents(dest)
    for split, expected_count in (("train", 48), ("val", 12)):
        rows = contents[split]
        sources = Counter(r["meta"]["source"] for r in rows)
        assert set(sources) == _images_on_disk(src, split)  # every valid image...
        assert max(sources.values()) == 1  # ...in exactly one shard
        assert len(rows) == expected_count == manifest["splits"][split]["samples"]
        for r in rows:
            assert r["format"] == "JPEG" and r["mode"] == "RGB"
            assert r["cls"] == r["meta"]["class_index"]
            assert manifest["classes"][r["cls"]]["id"] == r["meta"]["class_id"] == Path(r["meta"]["source"]).parent.name
            assert list(r["size"]) == [r["meta"]["width"], r["meta"]["height"]]
    # equal-sized shards except the last; no shard holds a single class
    sizes = [s["samples"] for s in manifest["splits"]["train"]["shards"]]
    assert sizes == [10, 10, 10, 10, 8]
    for shard in manifest["splits"]["train"]["shards"][:-1]:
        assert len({r["cls"] for r in contents["train"] if r["shard"] == shard["name"]}) > 1
    # original bytes are kept for clean JPEGs
    row = contents["train"][0]
    shard = read_tar_samples((dest / row["shard"]).read_bytes())
    assert shard[row["key"]]["jpg"] == (src / row["meta"]["source"]).read_bytes()
    # stock tools read the shards
    listing = subprocess.run(["tar", "-tf", str(dest / "train-000000.tar")], capture_output=True, text=True, check=True)
    assert len(listing.stdout.split()) == 30
    urls = [str(dest / s["name"]) for s in manifest["splits"]["train"]["shards"]]
    decoded = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls", "__key__"))
    assert len(decoded) == 48 and {k for _, _, k in decoded} == {r["key"] for r in contents["train"]}
    assert all(img.mode == "RGB" and cls in range(4) for img, cls, _ in decoded)
    assert run_alexray("shard", "verify", dest).returncode == 0
    assert not (dest / "_progress").exists()


def test_same_seed_gives_identical_shards_and_other_seed_differs(src, tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        run_alexray("shard", src, tmp_path / name, "--shard-size", "16", "--seed", seed, check=True)
    a, b, c = (_manifest(tmp_path / n) for n in "abc")
    assert a == b
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    assert [s["sha256"] for s in a["splits"]["train"]["shards"]] != [s["sha256"] for s in c["splits"]["train"]["shards"]]


def test_awkward_inputs_are_converted_or_rejected_with_reasons(src, tmp_path):
    cls_dir = src / "train" / sorted(os.listdir(src / "train"))[0]
    kept = {
        "cmyk": ds.write_cmyk_jpeg(cls_dir / "cmyk.JPEG"),
        "gray": ds.write_grayscale_jpeg(cls_dir / "gray.JPEG"),
        "png": ds.write_png_named_jpeg(cls_dir / "png_named.JPEG"),
        "rot": ds.write_exif_rotated_jpeg(cls_dir / "rotated.JPEG", orientation=6),
    }
    ds.write_truncated_jpeg(cls_dir / "truncated.JPEG")
    ds.write_zero_byte(cls_dir / "zero.JPEG")
    ds.write_text_file(cls_dir / "notes.JPEG")
    ds.write_decompression_bomb(cls_dir / "bomb.png")
    # things that must never crash the scan
    (cls_dir / ".hidden.JPEG").write_bytes(b"hidden")
    (src / "train" / "n99999999").mkdir()  # empty class folder
    os.symlink(cls_dir / "cmyk.JPEG", cls_dir / "link_to_cmyk.JPEG")
    os.symlink(cls_dir / "does-not-exist.JPEG", cls_dir / "broken_link.JPEG")
    os.symlink(src / "val", cls_dir / "linked_dir")
    rotated_size = ds_image_size(kept["rot"])

    dest = tmp_path / "shards"
    proc = run_alexray("shard", src, dest, "--shard-size", "7", "--max-reject-fraction", "0.5", check=True)
    manifest = _manifest(dest)
    reasons = {r["path"].split("/")[-1]: r["reason"] for r in manifest["splits"]["train"]["rejected"]}
    assert set(reasons) == {"truncated.JPEG", "zero.JPEG", "notes.JPEG", "bomb.png", "broken_link.JPEG"}, reasons
    assert "truncated" in reasons["truncated.JPEG"]
    assert "empty" in reasons["zero.JPEG"]
    assert "not an image" in reasons["notes.JPEG"]
    assert "decompression bomb" in reasons["bomb.png"]
    assert "broken symlink" in reasons["broken_link.JPEG"]
    assert manifest["num_classes"] == 5  # the empty class folder still has a class index
    rows = {r["meta"]["source"].split("/")[-1]: r for r in _local_contents(dest)["train"]}
    for name in ("cmyk.JPEG", "gray.JPEG", "png_named.JPEG", "rotated.JPEG", "link_to_cmyk.JPEG"):
        assert rows[name]["format"] == "JPEG" and rows[name]["mode"] == "RGB", name
    # EXIF orientation 6 is applied: the stored image is upright, width and height swapped
    assert rows["rotated.JPEG"]["size"] == (rotated_size[1], rotated_size[0])
    assert not any(".hidden" in name for name in rows)
    assert "rejected" in proc.stdout


@pytest.mark.parametrize("check", ["header", "decode"])
def test_undecodable_scan_data_is_rejected(src, tmp_path, check):
    cls_dir = next((src / "train").iterdir())
    ds.write_corrupt_jpeg(cls_dir / "corrupt.JPEG")
    dest = tmp_path / "shards"
    run_alexray("shard", src, dest, "--check", check, "--max-reject-fraction", "0.1", check=True)
    rejected = _manifest(dest)["splits"]["train"]["rejected"]
    assert [r["path"].split("/")[-1] for r in rejected] == ["corrupt.JPEG"]
    assert "corrupt image" in rejected[0]["reason"]


def ds_image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def test_rejects_over_the_limit_fail_before_writing(src, tmp_path):
    cls_dir = next((src / "train").iterdir())
    ds.write_truncated_jpeg(cls_dir / "truncated.JPEG")
    dest = tmp_path / "shards"
    proc = run_alexray("shard", src, dest)  # 1 of 61 rejected > default 0.001
    assert proc.returncode == 1
    line = error_line(proc)
    assert "--max-reject-fraction" in line and "truncated.JPEG" in line
    assert not list(dest.glob("*.tar")) and not (dest / "manifest.json").exists()


def test_resize_reencodes_to_the_short_side(src, tmp_path):
    small = src / "train" / next(iter(sorted(os.listdir(src / "train")))) / "small.JPEG"
    ds.write_grayscale_jpeg(small)
    small_size = ds_image_size(small)
    dest = tmp_path / "shards"
    run_alexray("shard", src, dest, "--resize-short-side", "64", "--quality", "80", check=True)
    manifest = _manifest(dest)
    assert manifest["options"]["resize_short_side"] == 64 and manifest["options"]["quality"] == 80
    for row in _local_contents(dest)["train"]:
        if row["meta"]["source"].endswith("small.JPEG") and min(small_size) <= 64:
            assert row["size"] == small_size
        else:
            assert min(row["size"]) == 64, row


def test_max_shard_bytes_caps_shard_size(src, tmp_path):
    dest = tmp_path / "shards"
    one = max((src / "train").rglob("*.JPEG"), key=lambda p: p.stat().st_size).stat().st_size
    run_alexray("shard", src, dest, "--max-shard-bytes", str(one * 6), check=True)
    shards = _manifest(dest)["splits"]["train"]["shards"]
    assert len(shards) > 1
    assert all(s["bytes"] <= one * 6 * 1.1 for s in shards)


def test_file_names_that_are_not_utf8_are_sharded(src, tmp_path):
    folder = src / "train" / sorted(os.listdir(src / "train"))[0]
    first = sorted(folder.iterdir())[0]
    odd = os.fsdecode(b"caf\xe9.JPEG")  # Latin-1 bytes: not UTF-8
    (folder / odd).write_bytes(first.read_bytes())
    dest = tmp_path / "shards"
    run_alexray("shard", src, dest, check=True)
    sources = {row["meta"]["source"] for row in _local_contents(dest)["train"]}
    assert f"train/{folder.name}/{odd}" in sources
    assert run_alexray("shard", "verify", dest).returncode == 0


def test_kaggle_val_layout_and_synset_names(tmp_path):
    info = ds.make_kaggle_val_layout(tmp_path / "src", classes=3, train_per_class=4, val_per_class=2,
                                     synset_mapping=True)
    root = Path(info.root)
    dest = tmp_path / "shards"
    run_alexray("shard", root, dest, check=True)
    manifest = _manifest(dest)
    mapping = dict(line.split(" ", 1) for line in (root / "LOC_synset_mapping.txt").read_text().splitlines())
    assert [c["name"] for c in manifest["classes"]] == [mapping[c["id"]] for c in manifest["classes"]]
    rows = _local_contents(dest)["val"]
    assert len(rows) == 6
    labels = {}
    for line in (root / "LOC_val_solution.csv").read_text().splitlines()[1:]:
        image_id, prediction = line.split(",", 1)
        labels[image_id] = prediction.split()[0]
    for row in rows:
        assert row["meta"]["class_id"] == labels[Path(row["meta"]["source"]).name.split(".")[0]]


def test_thousand_wordnet_ids_get_imagenet_names(tmp_path):
    from PIL import Image

    src = tmp_path / "src"
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    for i in range(1000):
        folder = src / "val" / f"n{10000000 + i:08d}"
        folder.mkdir(parents=True)
        image.save(folder / f"v{i}.JPEG")
    run_alexray("shard", src, tmp_path / "shards", "--shard-size", "500", check=True)
    names = [c["name"] for c in _manifest(tmp_path / "shards")["classes"]]
    assert names[:3] == ["tench", "goldfish", "great white shark"] and len(names) == 1000


@pytest.mark.parametrize("how", ["sigkill", "sigint"])
def test_interrupted_run_resumes_to_the_identical_result(tmp_path, how):
    info = ds.make_imagenet_layout(tmp_path / "src", classes=4, train_per_class=60, val_per_class=0, seed=9)
    src = Path(info.root)
    reference = tmp_path / "reference"
    run_alexray("shard", src, reference, "--shard-size", "4", "--resize-short-side", "200", check=True)

    dest = tmp_path / "shards"
    proc = start_alexray("shard", src, dest, "--shard-size", "4", "--resize-short-side", "200", "--workers", "1")
    wait_until(lambda: len(list((dest / "_progress").glob("*.json"))) >= 3, 120, "three finished shards", proc,
               stderr_tail, poll=0.05)
    os.killpg(proc.pid, signal.SIGKILL if how == "sigkill" else signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    if how == "sigint":
        assert proc.returncode == 130 and "run the same command again" in stderr
    assert not (dest / "manifest.json").exists()
    finished = {p.name for p in dest.glob("*.tar")}
    assert 3 <= len(finished) < 60  # stopped part-way, and only finished shards are visible under a shard name
    done_records = {p.name[:-len(".json")] for p in (dest / "_progress").glob("*.json")}
    assert done_records <= finished

    proc = run_alexray("shard", src, dest, "--shard-size", "4", "--resize-short-side", "200", check=True)
    assert "found complete and kept" in proc.stdout
    assert (dest / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    assert not list(dest.glob(".*partial*")) and not (dest / "_progress").exists()
    assert run_alexray("shard", "verify", dest).returncode == 0


def test_verify_reports_corrupt_and_missing_shards(src, tmp_path):
    dest = tmp_path / "shards"
    run_alexray("shard", src, dest, "--shard-size", "10", check=True)
    data = bytearray((dest / "train-000001.tar").read_bytes())
    data[2000] ^= 0xFF
    (dest / "train-000001.tar").write_bytes(bytes(data))
    (dest / "train-000002.tar").unlink()
    proc = run_alexray("shard", "verify", dest)
    assert proc.returncode == 1
    assert "train-000001.tar: sha256 differs" in proc.stdout
    assert "train-000002.tar: missing" in proc.stdout
    assert "train-000000.tar" not in proc.stdout


def test_usage_errors_exit_2_before_writing(src, tmp_path):
    dest = tmp_path / "shards"
    cases = {
        "does not exist": (tmp_path / "nowhere", dest),
        "holds no files": (_empty_dataset(tmp_path), dest),
        "is a file": (src, _a_file(tmp_path) / "sub"),
    }
    for expected, (s, d) in cases.items():
        proc = run_alexray("shard", s, d)
        assert proc.returncode == 2, proc.stderr
        assert expected in error_line(proc)
    assert not dest.exists()


def test_dest_holding_another_dataset_needs_overwrite(src, tmp_path):
    dest = tmp_path / "shards"
    run_alexray("shard", src, dest, "--shard-size", "10", check=True)
    again = run_alexray("shard", src, dest, "--shard-size", "10", check=True)
    assert "nothing to do" in again.stdout
    proc = run_alexray("shard", src, dest, "--shard-size", "30")
    assert proc.returncode == 2 and "--overwrite" in error_line(proc)
    assert _manifest(dest)["options"]["shard_size"] == 10  # untouched
    run_alexray("shard", src, dest, "--shard-size", "30", "--overwrite", check=True)
    assert _manifest(dest)["options"]["shard_size"] == 30
    assert sorted(p.name for p in dest.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    proc = run_alexray("shard", src, foreign)
    assert proc.returncode == 2 and "not empty" in error_line(proc)


def _empty_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "empty"
    (root / "train" / "a").mkdir(parents=True)
    return root


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("x")
    return path
