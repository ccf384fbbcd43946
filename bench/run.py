"""``make bench``: every benchmark, each a ratio against a baseline measured in the same run."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import importlib  # noqa: E402

from bench.common import WORK  # noqa: E402

# Imported only when run, in this order: the sharding suite must not pay for torch being loaded in
# its worker processes' parent (the training suites import it).
# "module:function" runs that function instead of the module's ``run``.
SUITES = {"shard": "bench.shard_bench", "shard-100k": "bench.shard_bench:run_100k", "tar": "bench.tar_bench",
          "loader": "bench.loader_bench", "train": "bench.train_bench", "export": "bench.export_bench",
          "metrics": "bench.metrics_bench", "demo": "bench.demo_bench"}


def main(argv: list[str]) -> int:
    chosen = argv or list(SUITES)
    unknown = [name for name in chosen if name not in SUITES]
    if unknown:
        print(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(SUITES)}", file=sys.stderr)
        return 2
    WORK.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    started = time.time()
    for name in chosen:
        module, _, function = SUITES[name].partition(":")
        getattr(importlib.import_module(module), function or "run")(results)
    out = WORK / "results.json"
    out.write_text(json.dumps({"machine": platform.platform(), "cpus": __import__("os").cpu_count(),
                               "started": started, "results": results}, indent=1))
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
