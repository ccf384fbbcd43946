"""Shared pieces of the benchmarks: timing, a dataset of real-looking JPEGs, result records."""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
WORK = Path(os.environ.get("ALEXRAY_BENCH_DIR", ROOT / ".bench"))


def timed(fn, repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls: the least disturbed by the noisy machine."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def bench_dataset(name: str = "imagenet-like", classes: int = 10, per_class: int = 200) -> Path:
    """An ImageNet-layout dataset of 500x375 JPEGs derived from real photographs; built once."""
    from tests.support.datasets import make_imagenet_layout

    root = WORK / f"{name}-{classes}x{per_class}"
    if not (root / ".complete").exists():
        make_imagenet_layout(root, classes=classes, train_per_class=per_class, val_per_class=0,
                             size=(500, 375), seed=1)
        (root / ".complete").touch()
    return root


@contextmanager
def record(results: list, name: str, goal: str):
    entry = {"name": name, "goal": goal}
    yield entry
    results.append(entry)
    print(f"  {name}: {json.dumps({k: v for k, v in entry.items() if k not in ('name', 'goal')})}  (goal {goal})",
          flush=True)
