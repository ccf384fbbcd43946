"""The device decode path against the CPU path: same samples, keys, labels, boxes, flips and lighting
draws, pixels within a measured tolerance, corrupt samples handled the same way; ``data.decode``
through the training loop, and the loop's device->host reads.

Everything runs with ``device="cpu"`` (torchvision's libjpeg-turbo decoder stands in for nvJPEG);
on a machine with CUDA the comparisons run on the GPU as well.
"""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from alexray_core.spec import SpecError, load_spec
from tests.shardtools import run_alexray
from tests.support import datasets as ds
from tests.trainingtools import read_json, sample_log, sharded_digits, write_spec
from workers.data import gpu_decode
from workers.data.gpu_decode import (
    DeviceStage,
    HeaderLoader,
    crop_resize,
    decode_jpegs,
    decode_on_device,
    gpu_eval_batches,
    gpu_train_batches,
    jpeg_header,
)
from workers.data.loader import (
    SplitInfo,
    eval_batches,
    load_manifest,
    split_info,
    train_batches,
)
from workers.data.sampling import plan_epoch, rank_slices
from workers.data.transforms import image_size
from workers.models import evaluation
from workers.training import loop as train
from workers.training.driver import prepare_run

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Mean absolute difference from the CPU path, in uint8 levels, for 224 px crops of 256 px shards.
# Measured on the CPU: 0.25 over a batch, 1.3 for the worst image (OpenCV's area/linear filters
# against roi_align's averaged bilinear samples); the bounds leave room for nvJPEG's own IDCT.
BATCH_TOLERANCE, IMAGE_TOLERANCE = 1.0, 4.0


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Photographs of ImageNet-like sizes sharded as for training: re-encoded at 256 px short side."""
    root = tmp_path_factory.mktemp("gpudata")
    ds.make_imagenet_layout(root / "src", classes=3, train_per_class=12, val_per_class=4, seed=4)
    dest = root / "shards"
    run_alexray("shard", root / "src", dest, "--shard-size", "7", "--resize-short-side", "256", "--workers", "1",
                "--no-progress", check=True)
    manifest = load_manifest(str(dest))
    return split_info(str(dest), manifest, "train"), split_info(str(dest), manifest, "val")


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean absolute difference in uint8 levels."""
    return (a.cpu().int() - b.cpu().int()).abs().float().flatten(1).mean(1)


def _assert_same_batches(cpu, gpu):
    assert len(cpu) == len(gpu) > 0
    for a, b in zip(cpu, gpu):
        assert (a.step, a.keys, a.skipped) == (b.step, b.keys, b.skipped)
        assert torch.equal(a.labels, b.labels.cpu()) and torch.equal(a.alphas, b.alphas.cpu())
        assert b.images.dtype == torch.uint8 and b.images.shape == a.images.shape
        diff = _mean_abs(a.images, b.images)
        assert diff.mean() < BATCH_TOLERANCE and diff.max() < IMAGE_TOLERANCE, diff


@pytest.mark.parametrize("device", DEVICES)
def test_train_batches_match_the_cpu_path_on_every_rank_and_after_resume(shards, device):
    train, _ = shards
    plan = plan_epoch(list(train.sizes), 12, 4, seed=5, epoch=1)
    for world, rank, start in ((1, 0, 0), (2, 1, 0), (2, 0, 1)):
        args = (train, plan, world, rank, start, 5, 224, 8, 2)
        cpu = list(train_batches(*args, lighting_std=0.1))
        gpu = list(gpu_train_batches(*args, lighting_std=0.1, device=device))
        assert len(cpu) == plan.steps - start
        _assert_same_batches(cpu, gpu)
        assert all(b.images.device.type == device for b in gpu)


def test_boxes_and_flips_are_the_cpu_paths(shards):
    """OpenCV cropping the boxes and flips the header threads drew gives the CPU path's pixels
    exactly: the same draws, in the same order, from the same generators."""
    train, _ = shards
    plan = plan_epoch(list(train.sizes), 12, 4, seed=2, epoch=0)
    slices = rank_slices(plan, 1, 0)
    hosts = list(HeaderLoader(train, plan, slices, 0, 2, 96, 8, 2, lighting_std=0.1))
    cpu = list(train_batches(train, plan, 1, 0, 0, 2, 96, 8, 2, lighting_std=0.1))
    flips = 0
    for host, batch in zip(hosts, cpu):
        assert host.keys == batch.keys and np.array_equal(host.alphas, batch.alphas.numpy())
        for row, data in enumerate(host.jpegs):
            assert tuple(host.boxes[row]) != (0, 0, 0, 0)
            pixels = gpu_decode.cpu_crop(data, host.boxes[row], 96, bool(host.flips[row]))
            assert np.array_equal(pixels, batch.images[row].permute(1, 2, 0).numpy())
            flips += int(host.flips[row])
    assert 0 < flips < plan.used  # both outcomes of the flip draw occur


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size, resize, ten_crop, tolerance", [(224, 256, False, 0.5), (224, 256, True, 0.5),
                                                                (64, 80, False, 4.0)])
def test_eval_batches_match_the_cpu_path(shards, device, size, resize, ten_crop, tolerance):
    _, val = shards
    cpu = list(eval_batches(val, 1, 0, size, resize, 5, 0, ten_crop=ten_crop))
    gpu = list(gpu_eval_batches(val, 1, 0, size, resize, 5, ten_crop=ten_crop, device=device))
    assert [len(b["labels"]) for b in cpu] == [len(b["labels"]) for b in gpu]
    labels = torch.cat([b["labels"] for b in cpu])
    assert torch.equal(labels, torch.cat([b["labels"].cpu() for b in gpu])) and len(labels) == val.samples
    a, b = torch.cat([x["images"] for x in cpu]), torch.cat([x["images"] for x in gpu])
    assert a.shape == b.shape == ((val.samples, 10, 3, size, size) if ten_crop else (val.samples, 3, size, size))
    assert _mean_abs(a.flatten(0, 1) if ten_crop else a, b.flatten(0, 1) if ten_crop else b).mean() < tolerance
    # eval crops of 256 px images at 224 are copies: the same pixels whichever path cut them
    if size == 224 and device == "cpu":
        assert torch.equal(a, b.cpu())


def test_eval_ranks_cover_the_split_once(shards):
    _, val = shards
    counts = [sum(len(b["labels"]) for b in gpu_eval_batches(val, 3, r, 32, 36, 4, device="cpu")) for r in range(3)]
    assert sum(counts) == val.samples and min(counts) > 0


# ---- awkward samples ------------------------------------------------------------------------------

def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def _awkward_shard(path: Path, seed: int = 0, awkward: bool = True) -> tuple[SplitInfo, dict[str, str]]:
    """A shard of 24 samples mixing clean JPEGs with every kind of awkward member (``awkward=False``:
    clean JPEGs only); returns the kinds by key."""
    photo = lambda k: ds.render_photo((180, 130), seed=[seed, k])  # noqa: E731
    png = io.BytesIO()
    photo(1).save(png, "PNG")
    zero_height = bytearray(_jpeg(photo(7)))
    sof = zero_height.index(b"\xff\xc0")
    zero_height[sof + 5:sof + 7] = b"\0\0"  # a frame of no rows (legal only with a DNL marker)
    work = path.parent / f"{path.stem}-files"
    members = {
        "png": png.getvalue(),
        "cmyk": _jpeg(photo(2).convert("CMYK")),
        "gray": _jpeg(photo(3).convert("L")),
        "progressive": _jpeg(photo(4), progressive=True),
        "truncated": ds.write_truncated_jpeg(work / "t.jpg", seed=seed).read_bytes(),
        "corrupt": ds.write_corrupt_jpeg(work / "c.jpg", seed=seed).read_bytes(),
        "text": b"notes about the dataset, not an image\n",
        "zero_height": bytes(zero_height),
        "badlabel": _jpeg(photo(5)),
        "badclass": _jpeg(photo(8)),
        "nolabel": _jpeg(photo(6)),
        "nojpg": None,
    }
    kinds = {}
    with tarfile.open(path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for i in range(24):
            kind = list(members)[i] if awkward and i < len(members) else "clean"
            key = f"s{i:03d}"
            kinds[key] = kind
            data = _jpeg(photo(100 + i)) if kind == "clean" else members[kind]
            if data is not None:
                add(f"{key}.jpg", data)
            if kind != "nolabel":
                add(f"{key}.cls", {"badlabel": b"x", "badclass": b"3"}.get(kind, str(i % 3).encode()))
    return SplitInfo((str(path),), (24,), 3), kinds


@pytest.mark.parametrize("device", DEVICES)
def test_awkward_samples_are_handled_as_on_the_cpu_path(tmp_path, device):
    split, kinds = _awkward_shard(tmp_path / "awkward-000000.tar")
    plan = plan_epoch([24], 12, 4, seed=1, epoch=0)
    cpu = list(train_batches(split, plan, 1, 0, 0, 1, 64, 8, 2, lighting_std=0.1))
    gpu = list(gpu_train_batches(split, plan, 1, 0, 0, 1, 64, 8, 2, lighting_std=0.1, device=device))
    for a, b in zip(cpu, gpu):
        assert (a.keys, a.skipped) == (b.keys, b.skipped)
        assert torch.equal(a.labels, b.labels.cpu()) and torch.equal(a.alphas, b.alphas.cpu())
        diff = _mean_abs(a.images, b.images)
        for key, d in zip(a.keys, diff):
            if kinds[key] in ("png", "cmyk"):  # decoded by the CPU path on the header threads: identical
                assert d == 0, key
            else:
                assert d < 6.0, (key, kinds[key], d)  # 64 px from 180x130: a 2-3x downscale
    kept = {kinds[k] for b in gpu for k in b.keys}
    assert kept == {"clean", "png", "cmyk", "gray", "progressive"}
    assert sum(b.skipped for b in gpu) == 8  # truncated, corrupt, text, zero height, 2 bad labels, no label, no jpg


def test_a_jpeg_the_device_decoder_refuses_is_decoded_by_opencv(tmp_path, monkeypatch):
    """nvJPEG refuses some encodings that OpenCV reads; the batch call then fails as a whole."""
    split, _ = _awkward_shard(tmp_path / "refused-000000.tar", seed=3, awkward=False)
    with tarfile.open(split.urls[0]) as tar:
        jpegs = {m.name.partition(".")[0]: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")}
    refused = {"s004", "s017"}
    real, calls = gpu_decode.decode_jpeg, []

    def choosy(input, **kwargs):
        batch = input if isinstance(input, list) else [input]
        calls.append(len(batch))
        if any(bytes(t.numpy()) in {jpegs[k] for k in refused} for t in batch):
            raise RuntimeError("Error while decoding JPEG images: unsupported encoding")
        return real(input, **kwargs)

    monkeypatch.setattr(gpu_decode, "decode_jpeg", choosy)
    plan = plan_epoch([24], 24, 4, seed=1, epoch=0)
    (a,) = list(train_batches(split, plan, 1, 0, 0, 1, 64, 8, 2))
    (b,) = list(gpu_train_batches(split, plan, 1, 0, 0, 1, 64, 8, 2, device="cpu"))
    assert calls == [24] + [1] * 24  # the batch failed, then one call per image
    assert (a.keys, a.skipped) == (b.keys, b.skipped) and len(a.keys) == 24
    diff = dict(zip(a.keys, _mean_abs(a.images, b.images).tolist()))
    assert all(diff[k] == 0 for k in refused)  # OpenCV cropped the same box: the CPU path's pixels
    assert all(0 < diff[k] < 6.0 for k in diff.keys() - refused)  # the others were resampled on the device


def test_decode_jpegs_retries_one_by_one_after_a_bad_image(tmp_path):
    good = [_jpeg(ds.render_photo((90, 60), seed=k)) for k in range(2)]
    bad = ds.write_truncated_jpeg(tmp_path / "t.jpg").read_bytes()
    out = decode_jpegs([good[0], bad, good[1]], torch.device("cpu"))
    assert out[1] is None and [tuple(t.shape) for t in (out[0], out[2])] == [(3, 60, 90)] * 2
    assert torch.equal(out[2], decode_jpegs([good[1]], torch.device("cpu"))[0])


def test_jpeg_header_reads_the_frame_without_decoding(tmp_path):
    photo = ds.render_photo((120, 70), seed=1)
    for kwargs, frame in (({}, 0xC0), ({"progressive": True}, 0xC2)):
        header = jpeg_header(_jpeg(photo, **kwargs))
        assert (header.width, header.height, header.components, header.frame) == (120, 70, 3, frame)
        assert header.device_decodable
    cmyk = jpeg_header(_jpeg(photo.convert("CMYK")))
    assert cmyk.components == 4 and not cmyk.device_decodable
    assert jpeg_header(_jpeg(photo.convert("L"))).components == 1
    png = io.BytesIO()
    photo.save(png, "PNG")
    assert jpeg_header(png.getvalue()) is None and jpeg_header(b"") is None
    truncated = ds.write_truncated_jpeg(tmp_path / "t.jpg").read_bytes()
    assert (jpeg_header(truncated).width, jpeg_header(truncated).height) == image_size(truncated)


@pytest.fixture
def decoder_probe(monkeypatch):
    """The device decoder's probe, its answers forgotten before and after the test."""
    gpu_decode.device_decoder_problem.cache_clear()
    yield
    gpu_decode.device_decoder_problem.cache_clear()


def test_decode_choice(decoder_probe, monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert not decode_on_device("auto", cpu) and not decode_on_device("cpu", cuda)
    assert decode_on_device("gpu", cpu)  # a CPU-only worker runs the device path on the CPU
    with pytest.raises(ValueError, match="data.decode: 'nvjpeg' is not one of auto, cpu, gpu"):
        decode_on_device("nvjpeg", cpu)
    # a CUDA device whose decoder works (a stand-in: this machine may have no GPU)
    real = gpu_decode.decode_jpeg
    monkeypatch.setattr(gpu_decode, "decode_jpeg", lambda data, device, **kw: real(data, **kw))
    assert decode_on_device("auto", cuda) and decode_on_device("gpu", cuda)


def test_a_device_without_a_working_decoder_falls_back_or_is_refused(decoder_probe, monkeypatch, caplog):
    """auto decodes on the CPU when the GPU's decoder does not work; gpu is refused at set-up in one
    line naming the problem and the fix, not left to decode every image twice."""
    def no_nvjpeg(data, device=None, **kwargs):
        if torch.device(device).type == "cuda":
            raise RuntimeError("torchvision.io.decode_jpeg: not compiled with nvJPEG support\ndetails")
        return real(data, device=device, **kwargs)

    real = gpu_decode.decode_jpeg
    monkeypatch.setattr(gpu_decode, "decode_jpeg", no_nvjpeg)
    cuda = torch.device("cuda", 0)
    with caplog.at_level("WARNING", logger="workers.data.gpu_decode"):
        assert not decode_on_device("auto", cuda)
    assert "data.decode: auto decodes on the CPU: the JPEG decoder does not work on cuda:0" in caplog.text
    with pytest.raises(SpecError) as refused:
        decode_on_device("gpu", cuda)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("data.decode: gpu, but the JPEG decoder does not work on cuda:0")
    assert "not compiled with nvJPEG support" in message and message.endswith("set data.decode: cpu (or auto, "
                                                                              "which falls back to it)")
    assert decode_on_device("gpu", torch.device("cpu"))  # the CPU's decoder still works


# ---- the crop ---------------------------------------------------------------------------------------

def _image(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(ds.render_photo((w, h), seed=seed))).permute(2, 0, 1).contiguous()


def test_crop_resize_box_semantics():
    image = _image(30, 40, 1)
    whole = np.array([[0, 0, 40, 30]], np.float32)
    # upscaling the whole image: bilinear with the edge repeated, exactly torch's align_corners=False
    up = crop_resize([image], whole, np.zeros(1, int), 64)
    reference = F.interpolate(image[None].float(), size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(up, reference, atol=1e-3)
    # halving averages each 2x2 block: downscaling does not alias
    square = _image(64, 64, 2)
    down = crop_resize([square], np.array([[0, 0, 64, 64]], np.float32), np.zeros(1, int), 32)
    assert torch.allclose(down, F.avg_pool2d(square[None].float(), 2), atol=1e-3)
    # a box at its own size is a copy
    box = crop_resize([image], np.array([[5, 3, 25, 23]], np.float32), np.zeros(1, int), 20)
    assert torch.equal(box[0].round().to(torch.uint8), image[:, 3:23, 5:25])


def test_crop_resize_gives_the_same_crops_whatever_the_canvas_budget():
    images = [_image(h, w, k) for k, (h, w) in enumerate([(50, 70), (64, 48), (30, 30), (80, 60), (41, 77)])]
    rng = np.random.default_rng(0)
    owners = rng.integers(0, len(images), 12)
    boxes = []
    for k in owners:
        h, w = images[k].shape[1:]
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        boxes.append((x0, y0, rng.integers(x0 + 4, w + 1), rng.integers(y0 + 4, h + 1)))
    boxes = np.array(boxes, np.float32)
    one = crop_resize(images, boxes, owners, 24)
    many = crop_resize(images, boxes, owners, 24, max_elements=3 * 81 * 61)  # about one image per canvas
    assert torch.equal(one, many)


# ---- the background stage -----------------------------------------------------------------------------

def test_device_stage_raises_the_workers_error_and_stops_when_left_early():
    closed = threading.Event()

    def source(fail_at):
        try:
            for i in range(100):
                if i == fail_at:
                    raise OSError("shard vanished")
                yield i
        finally:
            closed.set()

    stage = DeviceStage(source(3), lambda i: {"x": torch.full((2,), i)}, torch.device("cpu"))
    with pytest.raises(OSError, match="shard vanished"):
        for _ in stage:
            pass
    closed.clear()
    stage = iter(DeviceStage(source(None), lambda i: {"x": torch.full((2,), i)}, torch.device("cpu")))
    assert [int(next(stage)["x"][0]) for _ in range(3)] == [0, 1, 2]
    stage.close()
    assert closed.wait(10)  # the worker closed its source: no thread left reading shards


# ---- through the training loop ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """120 train samples (3 steps of 32 per epoch), 40 val samples, 10 classes."""
    return sharded_digits(tmp_path_factory.mktemp("decode-digits"), train_per_class=12, val_per_class=4)


def _recording(monkeypatch) -> dict[str, list]:
    """What the training loop was handed by each loader: (path, epoch, step, keys, labels) per training
    batch, (path, labels) per evaluation batch."""
    seen: dict[str, list] = {"train": [], "eval": []}

    def wrap(module, name, kind):
        real = getattr(module, name)

        def recorded(*args, **kwargs):
            for batch in real(*args, **kwargs):
                if kind == "train":
                    assert batch.images.dtype == torch.uint8  # normalised once, by the loop
                    seen["train"].append((name, args[1].epoch, batch.step, list(batch.keys), batch.labels.tolist()))
                else:
                    assert batch["images"].dtype == torch.uint8
                    seen["eval"].append((name, batch["labels"].tolist()))
                yield batch

        monkeypatch.setattr(module, name, recorded)

    wrap(train, "train_batches", "train")
    wrap(train, "gpu_train_batches", "train")
    wrap(evaluation, "eval_batches", "eval")
    wrap(evaluation, "gpu_eval_batches", "eval")
    return seen


def _train(spec_path: Path, *overrides: str) -> tuple[dict, Path]:
    spec = load_spec(spec_path, list(overrides))
    run_dir = prepare_run(spec)
    return train.run_local(spec, run_dir), Path(run_dir)


def _steps_logged(run_dir: Path) -> dict[tuple[int, int], list[str]]:
    """(epoch, step) -> keys, from the sample log; a step logged twice must be logged the same."""
    steps: dict[tuple[int, int], list[str]] = {}
    for path in sorted((run_dir / "samples").glob("*.json")):
        for entry in read_json(path):
            key = (int(path.name[1:5]), entry["step"])
            assert steps.setdefault(key, entry["keys"]) == entry["keys"]
    return steps


@pytest.mark.heavy("five short training runs (about 30 s)")
def test_training_decodes_on_either_path_with_the_same_samples_and_a_resume_may_switch(digits, tmp_path,
                                                                                       monkeypatch):
    """data.decode=gpu (the device path, here on the CPU) trains on the samples, labels and steps of
    data.decode=cpu, evaluates the same labels, and a run started on one path resumes on the other
    with every sample of each epoch used exactly once."""
    monkeypatch.setenv("ALEXRAY_METRICS", "0")
    spec_path = write_spec(tmp_path / "spec.yaml", str(digits), str(tmp_path / "runs"), debug={"sample_log": True},
                           data={"lighting_std": 0.1}, checkpoint={"every_steps": 2}, scaling={"num_workers": 1})
    seen = _recording(monkeypatch)
    runs = {}
    for decode in ("cpu", "gpu"):
        summary, run_dir = _train(spec_path, f"run.name={decode}", f"data.decode={decode}")
        assert summary["steps"] == 2 * 3
        runs[decode] = (dict(seen), _steps_logged(run_dir))
        seen["train"], seen["eval"] = [], []
    (cpu, cpu_log), (gpu, gpu_log) = runs["cpu"], runs["gpu"]
    assert {r[0] for r in cpu["train"]} == {"train_batches"} and {r[0] for r in gpu["train"]} == {"gpu_train_batches"}
    assert [r[1:] for r in cpu["train"]] == [r[1:] for r in gpu["train"]] and len(cpu["train"]) == 6
    assert cpu_log == gpu_log and len(cpu_log) == 6
    assert {r[0] for r in cpu["eval"]} == {"eval_batches"} and {r[0] for r in gpu["eval"]} == {"gpu_eval_batches"}
    labels = lambda records: sorted(label for _, batch in records for label in batch)  # noqa: E731
    assert labels(cpu["eval"]) == labels(gpu["eval"]) and len(labels(cpu["eval"])) == 2 * 40

    # started on the CPU path, stopped mid-epoch 0, resumed on the device path (and back for epoch 1)
    first, _ = _train(spec_path, "run.name=switched", "data.decode=cpu", "train.max_steps=2")
    assert first["steps"] == 2
    resumed, switched = _train(spec_path, "run.name=switched", "data.decode=gpu", "train.max_steps=4")
    assert resumed["steps"] == 4 and resumed["restarts"] == 1
    finished, _ = _train(spec_path, "run.name=switched", "data.decode=cpu")
    assert finished["steps"] == 6 and finished["restarts"] == 2
    assert [r[0] for r in seen["train"]] == ["train_batches"] * 2 + ["gpu_train_batches"] * 2 + ["train_batches"] * 2
    assert _steps_logged(switched) == cpu_log
    log = sample_log(switched)
    assert set(log) == {0, 1} and all(len(log[e]) == 3 * 32 and max(log[e].values()) == 1 for e in log)


@pytest.mark.heavy("a short training run per decode path (about 8 s each)")
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_steps_read_nothing_back_from_the_device_between_progress_lines(digits, tmp_path, monkeypatch, decode):
    """A read of a device tensor (``item``, ``tolist``) waits for the device to finish its queued work:
    with one rank, steps that write no progress line make none (the loss is read with the line)."""
    monkeypatch.setenv("ALEXRAY_METRICS", "0")
    reads, boundaries = [], []
    for name in ("item", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            if threading.current_thread() is threading.main_thread():
                reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    step, epoch = train._step, train.train_one_epoch
    monkeypatch.setattr(train, "_step", lambda *a: (boundaries.append(len(reads)), step(*a))[1])
    monkeypatch.setattr(train, "train_one_epoch", lambda *a: (epoch(*a), boundaries.append(len(reads)))[0])
    spec_path = write_spec(tmp_path / "spec.yaml", str(digits), str(tmp_path / "runs"), scaling={"num_workers": 1},
                           data={"val_split": None, "lighting_std": 0.1}, checkpoint={"every_steps": 0},
                           train={"epochs": 1, "global_batch_size": 16, "log_every": 4})
    summary, run_dir = _train(spec_path, f"data.decode={decode}")
    assert summary["steps"] == 7 and len(boundaries) == 8
    per_step = [b - a for a, b in zip(boundaries, boundaries[1:])]
    assert [n for i, n in enumerate(per_step, 1) if i not in (4, 7)] == [0] * 5, per_step
    assert 1 <= per_step[3] <= 2 and 1 <= per_step[6] <= 2 and "item" not in reads[boundaries[0]:]  # the lines
    assert read_json(run_dir / "progress.json")["step"] == 7
