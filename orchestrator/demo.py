"""``make demo``: the main job on the embedded defaults (local disk, local processes).

Builds a small real dataset (scikit-learn's handwritten digits as JPEGs), shards it with
``alexray shard`` and prints where the shards are. A second run reuses what the first made.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.demo")
    parser.add_argument("--dir", default=".demo", help="where the demo keeps its data (default .demo)")
    args = parser.parse_args(argv)
    from data_prep.cli import main as shard_main
    from data_prep.demo_data import write_digits_dataset

    base = Path(args.dir).resolve()
    images, shards = base / "digits", base / "shards"
    started = time.monotonic()
    if not images.is_dir():
        print(f"[demo] writing the handwritten-digits dataset to {images}")
        partial = images.with_name(images.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_digits_dataset(partial)
        partial.rename(images)  # only a complete dataset ever sits under the final name
    print(f"[demo] sharding {images} -> {shards}")
    code = shard_main([str(images), str(shards), "--shard-size", "256"])
    if code:
        return code
    code = shard_main(["verify", str(shards), "--no-progress"])
    print(f"[demo] done in {time.monotonic() - started:.1f} s; shards and manifest.json are in {shards}")
    return code


if __name__ == "__main__":
    sys.exit(main())
