"""Pure functions of data_prep: planning, keys, sizes, options, error wording."""

import io
import json
import random
import struct
import zlib
from collections import Counter

import pytest
from PIL import Image

from alexray_core.storage.api import describe_s3_error, is_transient, split_s3_url
from data_prep import images
from data_prep.errors import ShardError
from data_prep.images import (
    CONVERT,
    KEEP,
    RESIZE,
    ImageOptions,
    Probe,
    probe_image,
    resized_size,
)
from data_prep.shards import (
    PlannedSample,
    estimate_bytes,
    plan_split,
    sample_json,
    samples_per_shard,
)
from data_prep.sources import FileTable, assign_keys


def _samples(n, classes=4, size=50_000):
    return [PlannedSample(f"k{i}", f"train/c{i % classes}/{i:05d}.jpg", i % classes, f"c{i % classes}",
                          KEEP, 500, 375, size) for i in range(n)]


def test_plan_is_deterministic_equal_sized_and_mixes_classes():
    samples = _samples(1050)
    plans = plan_split("train", samples, seed=7, shard_size=100)
    again = plan_split("train", list(reversed(samples)), seed=7, shard_size=100)
    assert [p.samples for p in plans] == [p.samples for p in again]
    assert [len(p.samples) for p in plans] == [100] * 10 + [50]
    assert [p.name for p in plans][:2] == ["train-000000.tar", "train-000001.tar"]
    # every sample exactly once
    assert Counter(s.key for p in plans for s in p.samples) == Counter(s.key for s in samples)
    # no shard is a single class: the shuffle spreads classes over shards
    assert all(len({s.class_index for s in p.samples}) == 4 for p in plans)
    other = plan_split("train", samples, seed=8, shard_size=100)
    assert [p.samples for p in plans] != [p.samples for p in other]


def test_max_shard_bytes_lowers_samples_per_shard():
    assert samples_per_shard(100 * 100_000, 100, 1000, None) == 1000
    n = samples_per_shard(100 * 100_000, 100, 1000, 1_000_000)
    assert 5 <= n <= 10
    assert n * (100_000 + 2304) <= 1_000_000
    assert samples_per_shard(100 * 100_000, 100, 1000, 1024) == 1


def _table(relpaths, sizes=None):
    """A FileTable of ``relpaths`` (one directory per distinct folder, in the order given)."""
    table, dirs = FileTable(), {}
    for i, rel in enumerate(relpaths):
        folder, _, name = rel.rpartition("/")
        if folder not in dirs:
            dirs[folder] = table.add_dir(folder)
        table.add(dirs[folder], name, i % 3, sizes[i] if sizes else 1000 + i)
    return table


def test_keys_are_unique_dotless_and_stable():
    relpaths = sorted(["train/a/x.1.JPEG", "train/b/x.1.JPEG", "train/c/x.1.png", "train/a/we ird+name.jpg"])
    keys = assign_keys(relpaths)
    assert len(set(keys)) == 4
    assert all("." not in k and " " not in k for k in keys)
    table = _table(relpaths)
    table.find_key_clashes()
    assert [table.key(i) for i in range(len(table))] == keys


def test_packed_keys_match_assign_keys_on_clashing_names():
    # Shared stems, names that look like suffixed keys (x_1, x_1_1) before and after the clashes
    # they could collide with, and unique names the clash detection must leave alone.
    rng = random.Random(5)
    stems = ["x", "x_1", "x_1_1", "x_2", "y", "y_01", "sample", "", "a.b", "n01_7"] + [f"u{i}" for i in range(300)]
    relpaths = sorted({f"train/{rng.choice('abcdef')}/{rng.choice(stems)}.{rng.choice(['JPEG', 'png'])}"
                       for _ in range(400)})
    table = _table(relpaths)
    table.find_key_clashes()
    keys = [table.key(i) for i in range(len(table))]
    assert keys == assign_keys(relpaths)
    assert len(set(keys)) == len(keys)
    assert 0 < len(table.key_clashes) < len(keys)


def test_file_table_sorts_itself_by_path_only_when_needed():
    walked = ["t/a/z.jpg", "t/a/sub/b.jpg", "t/a-b/c.jpg", "t/ab/d.jpg", "t/caf\u00e9/e.jpg"]  # os.walk order
    table = _table(walked)
    ordered = table.in_path_order()
    assert [ordered.relpath(i) for i in range(len(ordered))] == sorted(walked)
    assert [ordered.sizes[i] for i in range(len(ordered))] == [1000 + walked.index(r) for r in sorted(walked)]
    assert ordered.in_path_order() is ordered


@pytest.mark.parametrize("max_shard_bytes", [None, 200_000])
def test_packed_split_plan_is_plan_split(max_shard_bytes):
    from data_prep.images import REJECT
    from data_prep.planning import SplitPlan, SplitProbes
    from data_prep.shards import planned_sample

    rng = random.Random(3)
    relpaths = sorted(f"train/c{i % 3}/{i:05d}.jpg" for i in range(1000))
    sizes = [rng.randint(5_000, 90_000) for _ in relpaths]
    table = _table(relpaths, sizes)
    table.find_key_clashes()
    options = ImageOptions(resize_short_side=64)
    actions = [rng.choice([KEEP, CONVERT, RESIZE, REJECT]) for _ in relpaths]
    found = [Probe(a, reason="bad" if a == REJECT else "", width=rng.randint(64, 900), height=rng.randint(64, 900))
             for a in actions]
    probes = SplitProbes(len(table))
    for start in range(0, len(found), 256):  # in chunks, as the probe tasks return them
        probes.record(start, found[start:start + 256])
    assert [i for i, _ in probes.rejects] == [i for i, a in enumerate(actions) if a == REJECT]
    classes = ["c0", "c1", "c2"]
    packed = SplitPlan("train", table, probes, classes, options, 7, 100, max_shard_bytes)
    plain = plan_split("train", [planned_sample(table.key(i), relpaths[i], i % 3, classes[i % 3], sizes[i], found[i],
                                                options) for i in range(len(relpaths)) if actions[i] != REJECT],
                       7, 100, max_shard_bytes)
    assert [packed.shard(i) for i in range(len(packed))] == plain
    assert [packed.samples_in(i) for i in range(len(packed))] == [len(p.samples) for p in plain]
    assert (packed.per_shard < 100) == (max_shard_bytes is not None)


def test_process_executor_takes_tasks_as_workers_free_up():
    from data_prep.executor import ProcessExecutor, Progress
    from data_prep.pipeline import probe_chunk

    drawn = []

    def tasks():
        for i in range(40):
            drawn.append(i)
            yield {"src_root": "/", "relpaths": [], "options": ImageOptions()}

    executor = ProcessExecutor(2)
    try:
        results = executor.run(probe_chunk, tasks(), Progress("test", 0, enabled=False))
        first, _ = next(results)
        assert len(drawn) <= executor.window < 40
        assert sorted([first] + [i for i, _ in results]) == list(range(40))
    finally:
        executor.close()


def test_resized_size_never_enlarges():
    assert resized_size(500, 375, 256) == (341, 256)
    assert resized_size(375, 500, 256) == (256, 341)
    assert resized_size(200, 100, 256) == (200, 100)
    assert resized_size(500, 375, None) == (500, 375)


def test_estimate_bytes_scales_with_pixels():
    options = ImageOptions(resize_short_side=256)
    assert estimate_bytes(80_000, Probe(KEEP, width=500, height=375), options) == 80_000
    est = estimate_bytes(80_000, Probe(RESIZE, width=1000, height=750), options)
    assert 80_000 * 0.1 < est < 80_000 * 0.2


@pytest.mark.parametrize("kwargs, field", [({"quality": 0}, "quality"), ({"check": "full"}, "check"),
                                           ({"resize_short_side": 2}, "resize_short_side"),
                                           ({"max_pixels": 0}, "max_pixels")])
def test_image_options_name_the_bad_field(kwargs, field):
    with pytest.raises(ShardError, match=field):
        ImageOptions(**kwargs)


def test_s3_urls():
    assert split_s3_url("s3://bucket/a/b/") == ("bucket", "a/b")
    assert split_s3_url("s3://bucket") == ("bucket", "")


def test_s3_errors_name_the_problem_and_the_fix():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code, status):
        return ClientError({"Error": {"Code": code, "Message": "x"},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    assert "does not exist" in str(describe_s3_error(client_error("NoSuchBucket", 404), "s3://b/p"))
    assert "refused the credentials" in str(describe_s3_error(client_error("InvalidAccessKeyId", 403), "s3://b/p"))
    assert "AWS_ENDPOINT_URL" in str(describe_s3_error(EndpointConnectionError(endpoint_url="http://x"), "s3://b/p"))
    assert is_transient(client_error("SlowDown", 503))
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert not is_transient(client_error("AccessDenied", 403))


def test_split_names_that_cannot_name_shards_are_refused():
    from data_prep.pipeline import ShardConfig, _ours

    assert ShardConfig(splits=["val-2", "test.v2", "train_a"], workers=1).splits == ["val-2", "test.v2", "train_a"]
    for bad in ("a/b", "my split", ".hidden", "-x"):
        with pytest.raises(ShardError, match="splits"):
            ShardConfig(splits=[bad], workers=1)
    for name in ("val-2-000003.tar", "test.v2-000000.tar", "_lease.json", "_uploads/ab.json", "_progress/x.json"):
        assert _ours(name), name
    for name in ("notes.txt", "backup.tar", "val-2-00003.tar", ".x-000000.tar"):
        assert not _ours(name), name


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_probe_reads_the_whole_file_when_what_decides_lies_past_the_head(tmp_path):
    # A clean JPEG whose headers (a 70 KB ICC profile) run past the head the probe reads first.
    big_header = tmp_path / "icc.JPEG"
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(out, "JPEG", icc_profile=random.Random(0).randbytes(70_000))
    big_header.write_bytes(out.getvalue())
    # A PNG whose EXIF (orientation 6: displayed turned, width and height swapped) follows its pixels.
    late_exif = tmp_path / "late.png"
    out = io.BytesIO()
    Image.frombytes("RGB", (240, 180), random.Random(1).randbytes(240 * 180 * 3)).save(out, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    payload = exif.tobytes().removeprefix(b"Exif\0\0")
    png = out.getvalue()
    end = png.rindex(b"IEND") - 4
    late_exif.write_bytes(png[:end] + _png_chunk(b"eXIf", payload) + png[end:])
    assert min(big_header.stat().st_size, late_exif.stat().st_size) > images._HEAD_BYTES

    assert probe_image(str(big_header), ImageOptions()) == Probe(KEEP, width=64, height=48)
    assert probe_image(str(late_exif), ImageOptions()) == Probe(CONVERT, width=180, height=240)


def test_sample_json_is_what_json_dumps_writes():
    rng = random.Random(2)
    alphabet = 'aZ09_/. "\\\n\t\x00\x1f\x7f\u00e9\u2028\U0001f600\udcff'
    for _ in range(2000):
        class_id = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        source = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        sample = PlannedSample("k", source, rng.randint(0, 20_000), class_id, KEEP, 1, 1, 1)
        width, height = rng.randint(1, 99_999), rng.randint(1, 99_999)
        meta = {"class_id": class_id, "class_index": sample.class_index, "source": source, "width": width,
                "height": height}
        assert sample_json(sample, width, height) == json.dumps(meta, sort_keys=True).encode()
