"""Sharding throughput against same-run baselines (issue: data_prep benchmarks).

- pass-through sharding vs ``tar -cf`` of the same files;
- re-encode sharding per core vs a minimal single-process PIL decode-resize-encode loop,
  and 2 workers vs 1;
- writing to SeaweedFS (S3) vs local disk.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

from bench.common import WORK, bench_dataset, record, timed
from data_prep.pipeline import ShardConfig, shard_dataset


def _shard(src: Path, dest: str, **options) -> None:
    if not dest.startswith("s3://"):
        shutil.rmtree(dest, ignore_errors=True)
    shard_dataset(src, dest, ShardConfig(progress=False, overwrite=True, shard_size=500, **options))


def _image_files(src: Path) -> list[Path]:
    return sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))


def _pil_loop(files: list[Path], short_side: int, quality: int) -> None:
    for path in files:
        image = Image.open(path).convert("RGB")
        scale = short_side / min(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        image.save(io.BytesIO(), format="JPEG", quality=quality)


def run(results: list) -> None:
    src = bench_dataset(per_class=400)
    files = _image_files(src / "train")
    n = len(files)
    out = WORK / "out"
    print(f"shard benchmarks on {n} images of {src}")

    with record(results, "shard pass-through vs tar -cf", ">= 0.5") as r:
        tar_s = timed(lambda: subprocess.run(["tar", "-cf", str(WORK / "baseline.tar"), "-C", str(src), "train"],
                                             check=True))
        ours_s = timed(lambda: _shard(src, str(out / "pass")))
        r.update(tar_img_s=round(n / tar_s), ours_img_s=round(n / ours_s), ratio=round(tar_s / ours_s, 3))

    with record(results, "shard re-encode per core vs PIL loop", ">= 0.8") as r:
        base_s = timed(lambda: _pil_loop(files, 256, 90), repeat=2)
        one_s = timed(lambda: _shard(src, str(out / "re1"), resize_short_side=256, quality=90, workers=1), repeat=2)
        r.update(pil_img_s=round(n / base_s), ours_img_s=round(n / one_s), ratio=round(base_s / one_s, 3))

    with record(results, "shard re-encode 2 workers vs 1", ">= 1.7") as r:
        two_s = timed(lambda: _shard(src, str(out / "re2"), resize_short_side=256, quality=90, workers=2), repeat=2)
        r.update(one_img_s=round(n / one_s), two_img_s=round(n / two_s), ratio=round(one_s / two_s, 3))

    from tests.support.s3server import S3Server

    with tempfile.TemporaryDirectory(prefix="alexray-bench-s3-") as tmp, \
            S3Server(Path(tmp), volume_size_limit_mb=1024) as server:
        server.create_bucket("bench")
        import os

        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        try:
            with record(results, "shard re-encode to SeaweedFS vs local disk", ">= 0.8") as r:
                local_s = timed(lambda: _shard(src, str(out / "local"), resize_short_side=256), repeat=2)
                s3_s = timed(lambda: _shard(src, "s3://bench/shards", resize_short_side=256), repeat=2)
                r.update(local_img_s=round(n / local_s), s3_img_s=round(n / s3_s), ratio=round(local_s / s3_s, 3))
            # Pass-through moves ~60 KB per image as fast as the disk allows: the S3 server's own
            # ingest (on the same 2 cores) is the limit, not the sharding.
            with record(results, "shard pass-through to SeaweedFS vs local disk", "(information)") as r:
                local_s = timed(lambda: _shard(src, str(out / "local")))
                s3_s = timed(lambda: _shard(src, "s3://bench/pass"))
                r.update(local_img_s=round(n / local_s), s3_img_s=round(n / s3_s), ratio=round(local_s / s3_s, 3))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
