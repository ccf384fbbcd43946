"""Does data loading starve the accelerator? AlexNet training images/s on synthetic tensors, with the
CPU decode path and with the device decode path, in one run on one device.

Single process, no Ray (GPU machines used for benchmarking may have none). On CUDA: bf16 autocast
and channels_last, as in training. For each batch size and with and without ``torch.compile`` it
prints images/s, the ratio to synthetic tensors (near 1.0: the loader keeps up), peak GPU memory and
model FLOP utilisation (training FLOPs per sample and the device's dense bf16 peak as training
counts them, ``workers.models.flops``; on the CPU, FLOP/s only). It also times
each loader alone (decode rate) and checks that the device path gives the CPU path's samples.

    python bench/gpu.py --make-data /tmp/bench --images 8192             # build shards, then measure
    python bench/gpu.py --data /path/to/shards --threads 16 --json out.json
    python bench/gpu.py --quick --make-data /tmp/bench-quick            # CPU smoke run

``--make-data DIR`` renders ImageNet-sized photographs (the test suite's generator, from the two
scikit-learn sample photos; without scikit-learn pass ``--photos DIR`` holding china.jpg and
flower.jpg) and shards them as ``alexray shard --resize-short-side 256`` does, without Ray.
Without OpenCV the CPU decode path cannot run: it is reported as skipped and the device path,
whose OpenCV fallback is then unavailable, counts any JPEG its decoder refuses as corrupt.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

try:
    import cv2  # noqa: F401
    HAVE_OPENCV = True
except ImportError:  # not installed, or built for another numpy
    HAVE_OPENCV = False
if not HAVE_OPENCV:
    # The loader modules import OpenCV for the CPU path; this stand-in decodes nothing.
    cv2 = types.ModuleType("cv2")
    cv2.error = type("error", (Exception,), {})
    cv2.setNumThreads = lambda n: None
    cv2.imdecode = lambda buf, flags: None
    for i, name in enumerate(("IMREAD_COLOR_RGB", "IMREAD_REDUCED_COLOR_2", "IMREAD_REDUCED_COLOR_4",
                              "IMREAD_REDUCED_COLOR_8", "INTER_AREA", "INTER_LINEAR", "COLOR_BGR2RGB")):
        setattr(cv2, name, i)
    sys.modules["cv2"] = cv2

from workers.data.transforms import to_model_input  # noqa: E402
from workers.models.architectures import build_model  # noqa: E402
from workers.models.flops import device_peak_flops, training_flops_per_sample  # noqa: E402

QUICK = {"batch": [8], "steps": 2, "warmup": 1, "compile": ["off"], "images": 64}


# ---- data -------------------------------------------------------------------------------------------

def _use_photos(photos: str | None) -> None:
    """Without scikit-learn, the photo generator reads its two source photographs from ``photos``."""
    if photos is None:
        return
    from PIL import Image

    from tests.support import datasets

    images = tuple(Image.open(Path(photos) / name).convert("RGB") for name in ("china.jpg", "flower.jpg"))
    datasets._source_photos = lambda: images


def _render(task) -> int:
    root, classes, items, photos = task
    _use_photos(photos)
    from tests.support.datasets import render_photo

    for ci, i in items:
        rng = np.random.default_rng([7, ci, i])
        w, h = (500, 375) if rng.random() > 0.2 else (375, 500)  # ImageNet-like sizes, some portrait
        w, h = int(w * rng.uniform(0.9, 1.1)), int(h * rng.uniform(0.9, 1.1))
        path = Path(root) / "train" / f"n{90000000 + ci:08d}" / f"n{90000000 + ci:08d}_{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        render_photo((w, h), seed=[7, ci, i], class_index=ci, num_classes=classes).save(
            path, "JPEG", quality=int(rng.integers(85, 93)))
    return len(items)


def make_data(root: Path, images: int, photos: str | None, classes: int = 10) -> Path:
    """``root/shards``: ``images`` photographs sharded at 256 px short side; reused when present."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from data_prep.pipeline import ShardConfig, shard_dataset

    shards = root / "shards"
    manifest = shards / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text())["splits"]["train"]["samples"] == images:
        return shards
    if photos is None and importlib.util.find_spec("sklearn") is None:
        raise SystemExit("--make-data needs scikit-learn's sample photos: install scikit-learn or pass --photos DIR "
                         "holding china.jpg and flower.jpg")
    started, workers = time.perf_counter(), len(os.sched_getaffinity(0))
    items = [(i % classes, i // classes) for i in range(images)]
    tasks = [(str(root / "src"), classes, items[k::workers * 4], photos) for k in range(workers * 4)]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
        assert sum(pool.map(_render, tasks)) == images
    shard_dataset(root / "src", str(shards), ShardConfig(splits=["train"], shard_size=1000, resize_short_side=256,
                                                         quality=90, workers=workers, progress=False, overwrite=True))
    print(f"made {images} images in {shards} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return shards


def loader(path: str, batch: int, size: int, threads: int, decode: str, device: torch.device):
    """Endless training batches (epoch after epoch) as (images, labels, alphas); ``decode="headers"``:
    the device path's CPU side alone (tar reading, header parsing, the draws), images None."""
    from workers.data.gpu_decode import HeaderLoader, gpu_train_batches
    from workers.data.loader import load_manifest, split_info, train_batches
    from workers.data.sampling import plan_epoch, rank_slices

    split = split_info(path, load_manifest(path), "train")
    streams = 8 if batch % 8 == 0 else 1
    for epoch in itertools.count():
        plan = plan_epoch(list(split.sizes), batch, streams, seed=0, epoch=epoch)
        args = (split, plan, 1, 0, 0, 0, size, 256, threads, 0.1)
        if decode == "headers":
            for host in HeaderLoader(split, plan, rank_slices(plan, 1, 0), 0, 0, size, 256, threads, 0.1):
                yield None, host.labels, host.alphas
            continue
        batches = train_batches(*args) if decode == "cpu" else gpu_train_batches(*args, device=device)
        for b in batches:
            yield b.images, b.labels, b.alphas


# ---- measurements ---------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_rate(batches, device, steps: int, warmup: int) -> float:
    """Images/s of a loader alone."""
    seen, started = 0, time.perf_counter()
    for i, (_, labels, _) in enumerate(batches):
        if i == warmup:
            _sync(device)
            seen, started = 0, time.perf_counter()
        seen += len(labels)
        if i + 1 == warmup + steps:
            break
    _sync(device)
    return seen / (time.perf_counter() - started)


def train_rate(batches, model, optimizer, device, steps: int, warmup: int) -> float:
    on_gpu = device.type == "cuda"
    seen, started = 0, time.perf_counter()
    for i, (images, labels, alphas) in enumerate(batches):
        if i == warmup:
            _sync(device)
            seen, started = 0, time.perf_counter()
        x = to_model_input(images.to(device, non_blocking=True), alphas.to(device, non_blocking=True), on_gpu)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            loss = F.cross_entropy(model(x), labels.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(labels)
        if i + 1 == warmup + steps:
            break
    _sync(device)
    return seen / (time.perf_counter() - started)


def parity(path: str, batch: int, size: int, threads: int, device: torch.device, steps: int = 2) -> dict:
    """The device path against the CPU path on the same batches: samples and draws, pixel difference."""
    cpu = itertools.islice(loader(path, batch, size, threads, "cpu", device), steps)
    gpu = itertools.islice(loader(path, batch, size, threads, "gpu", device), steps)
    same, diffs = True, []
    for (a, la, aa), (b, lb, ab) in zip(cpu, gpu):
        same = same and torch.equal(la, lb.cpu()) and torch.equal(aa, ab.cpu())
        diffs.append((a.int() - b.cpu().int()).abs().float().flatten(1).mean(1))
    d = torch.cat(diffs)
    return {"labels_and_draws_equal": same, "mean_abs_diff": round(d.mean().item(), 3),
            "worst_image_mean_abs_diff": round(d.max().item(), 3), "images": len(d)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="a directory (or s3:// URL) written by 'alexray shard'")
    p.add_argument("--make-data", metavar="DIR", help="build shards of generated photographs in DIR and use them")
    p.add_argument("--images", type=int, default=8192, help="photographs --make-data renders (default 8192)")
    p.add_argument("--photos", help="folder with china.jpg and flower.jpg, when scikit-learn is not installed")
    p.add_argument("--model", default="alexnet")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, nargs="+", default=[256, 512])
    p.add_argument("--compile", nargs="+", choices=("off", "on"), default=["off", "on"])
    p.add_argument("--paths", nargs="+", choices=("synthetic", "cpu", "gpu"), default=["synthetic", "cpu", "gpu"])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU path decoding threads")
    p.add_argument("--header-threads", type=int, default=4, help="device path threads reading and parsing headers")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--decode-only", action="store_true", help="time the loaders alone, no model")
    p.add_argument("--train-only", action="store_true", help="skip the loaders-alone timings and the parity check")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, when not in the table")
    p.add_argument("--quick", action="store_true", help="a CPU smoke run: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.warmup, args.compile = QUICK["batch"], QUICK["steps"], QUICK["warmup"], QUICK["compile"]
        args.images = min(args.images, QUICK["images"])
    if not args.data and not args.make_data and args.paths != ["synthetic"]:
        p.error("--data or --make-data is required unless --paths synthetic")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.make_data:
        args.data = str(make_data(Path(args.make_data), args.images, args.photos))
    paths = [path for path in args.paths if path != "cpu" or HAVE_OPENCV]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    torch.backends.cudnn.benchmark = on_gpu
    flops = training_flops_per_sample(build_model(args.model, args.classes, args.width), args.image_size)
    peak = device_peak_flops(device, bf16=True, override_tflops=args.peak_tflops or 0.0)
    results = {"device": torch.cuda.get_device_name(device) if on_gpu else "cpu", "cpus": len(os.sched_getaffinity(0)),
               "torch": torch.__version__, "model": args.model, "width": args.width, "image_size": args.image_size,
               "opencv": HAVE_OPENCV, "cpu_threads": args.threads, "header_threads": args.header_threads,
               "train_flops_per_sample": flops, "peak_flops": peak, "decode": {}, "runs": []}
    if not HAVE_OPENCV:
        results["skipped"] = "cpu path: OpenCV is not installed"
    loaders = {path: (lambda b, path=path: loader(args.data, b, args.image_size,
                                                  args.threads if path == "cpu" else args.header_threads, path, device))
               for path in ("cpu", "gpu", "headers")}
    checks = [] if args.train_only else [p for p in paths if p != "synthetic"] + (["headers"] if "gpu" in paths else [])
    if "cpu" in checks and "gpu" in checks:
        results["parity"] = parity(args.data, args.batch[0], args.image_size, args.threads, device)
    for path in checks:
        rate = decode_rate(loaders[path](args.batch[0]), device, args.steps, args.warmup)
        results["decode"][path] = {"batch": args.batch[0], "img_s": round(rate, 1)}
        print(f"loader alone, {path}: {rate:,.0f} img/s", flush=True)
        _save(results, args.json)
    if args.decode_only:
        return _finish(results, args.json)

    for batch, compiled in itertools.product(args.batch, args.compile):
        torch.manual_seed(0)
        torch._dynamo.reset()
        model = build_model(args.model, args.classes, args.width).to(
            device, memory_format=torch.channels_last if on_gpu else torch.preserve_format)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        step_model = torch.compile(model) if compiled == "on" else model
        images = torch.randint(0, 256, (batch, 3, args.image_size, args.image_size), dtype=torch.uint8)
        labels, alphas = torch.randint(0, args.classes, (batch,)), torch.zeros(batch, 3)
        if on_gpu:
            images, labels, alphas = images.pin_memory(), labels.pin_memory(), alphas.pin_memory()
        sources = {"synthetic": lambda b: itertools.repeat((images, labels, alphas)), **loaders}
        synthetic = None
        for path in paths:
            if on_gpu:
                torch.cuda.reset_peak_memory_stats(device)
            rate = train_rate(sources[path](batch), step_model, optimizer, device, args.steps, args.warmup)
            synthetic = rate if path == "synthetic" else synthetic
            run = {"batch": batch, "compile": compiled == "on", "path": path, "img_s": round(rate, 1),
                   "over_synthetic": round(rate / synthetic, 3) if synthetic else None,
                   "max_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if on_gpu else None,
                   "tflop_s": float(f"{rate * flops / 1e12:.3g}"), "mfu": round(rate * flops / peak, 3) if peak else None}
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
            _save(results, args.json)  # a run cut short by a time limit keeps what it measured
    return _finish(results, args.json)


def _save(results: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=1))


def _finish(results: dict, path: str | None) -> int:
    print(json.dumps(results, indent=1))
    _save(results, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
