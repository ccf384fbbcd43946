"""Training data path throughput against same-run baselines (issue: workers benchmarks).

- our loader (uint8, draft decoding, streaming shards) vs torchvision ImageFolder + DataLoader with
  its standard transforms on the original JPEGs: same images, same worker processes, 224 px;
- vs a stock WebDataset pipeline with PIL decoding and the same transforms, on the same shards;
- our loader reading the shards from SeaweedFS vs local disk.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from pathlib import Path

import torchvision.transforms as T
import webdataset as wds
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from bench.common import WORK, bench_dataset, record
from data_prep.pipeline import ShardConfig, shard_dataset
from workers.data.loader import load_manifest, split_info, train_batches
from workers.data.sampling import plan_epoch

BATCH, WORKERS, SIZE = 64, 2, 224
STANDARD = T.Compose([T.RandomResizedCrop(SIZE), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


def _rate(batches, limit: int) -> float:
    """Batches per second over ``limit`` batches, after one warm-up batch (worker start-up)."""
    iterator = iter(batches)
    next(iterator)
    started = time.perf_counter()
    count = sum(1 for _ in itertools.islice(iterator, limit))
    return count / (time.perf_counter() - started)


def _ours(dataset: str, limit: int, epoch: int = 0) -> float:
    split = split_info(dataset, load_manifest(dataset), "train")
    plan = plan_epoch(list(split.sizes), BATCH, 8, seed=0, epoch=epoch)
    return _rate(train_batches(split, plan, 1, 0, 0, 0, SIZE, 1000, WORKERS), min(limit, plan.steps - 1))


def _imagefolder(src: Path, limit: int) -> float:
    loader = DataLoader(ImageFolder(str(src / "train"), transform=STANDARD), batch_size=BATCH, shuffle=True,
                        num_workers=WORKERS, drop_last=True)
    return _rate(loader, limit)


def _stock_wds(dataset: Path, limit: int) -> float:
    urls = sorted(str(p) for p in dataset.glob("train-*.tar"))
    pipeline = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_worker).shuffle(1000)
                .decode("pil").to_tuple("jpg", "cls").map_tuple(STANDARD, int).batched(BATCH, partial=False))
    return _rate(DataLoader(pipeline, batch_size=None, num_workers=WORKERS), limit)


def _sharded(src: Path, name: str, **options) -> Path:
    dest = WORK / name
    if not (dest / "manifest.json").exists():
        shutil.rmtree(dest, ignore_errors=True)
        shard_dataset(src, str(dest), ShardConfig(progress=False, shard_size=250, **options))
    return dest


def run(results: list) -> None:
    src = bench_dataset(per_class=400)
    resized = _sharded(src, "shards-256", resize_short_side=256, quality=90)
    original = _sharded(src, "shards-original")
    limit = 40
    print(f"loader benchmarks: batches of {BATCH} at {SIZE} px, {WORKERS} workers each (our decoding threads, "
          f"the baselines' DataLoader processes), {limit} batches")

    with record(results, "loader: ours (256 px shards) vs ImageFolder (original JPEGs)", ">= 2.5") as r:
        base = _imagefolder(src, limit)
        ours = _ours(str(resized), limit)
        r.update(imagefolder_batch_s=round(base, 2), ours_batch_s=round(ours, 2), ratio=round(ours / base, 2))
    with record(results, "loader: ours vs ImageFolder, both on original JPEGs (information)", "-") as r:
        ours_orig = _ours(str(original), limit)
        r.update(imagefolder_batch_s=round(base, 2), ours_batch_s=round(ours_orig, 2), ratio=round(ours_orig / base, 2))
    with record(results, "loader: ours vs stock WebDataset + PIL, same 256 px shards", ">= 1.3") as r:
        stock = _stock_wds(resized, limit)
        r.update(webdataset_batch_s=round(stock, 2), ours_batch_s=round(ours, 2), ratio=round(ours / stock, 2))

    from tests.support.s3server import S3Server

    with tempfile.TemporaryDirectory(prefix="alexray-bench-s3-") as tmp, \
            S3Server(Path(tmp), volume_size_limit_mb=1024) as server:
        server.create_bucket("bench")
        client = server.client()
        for path in resized.iterdir():
            client.upload_file(str(path), "bench", f"shards/{path.name}")
        saved = dict(os.environ)
        os.environ.update(server.env())
        try:
            with record(results, "loader: shards from SeaweedFS vs local disk", ">= 0.9") as r:
                local = _ours(str(resized), limit, epoch=1)
                remote = _ours("s3://bench/shards", limit, epoch=1)
                r.update(local_batch_s=round(local, 2), s3_batch_s=round(remote, 2), ratio=round(remote / local, 3))
        finally:
            os.environ.clear()
            os.environ.update(saved)
