"""Every torchvision classifier through ``alexray train --no-ray``: two steps at each data.image_size.

Each model and size is one run of the real command on the tests' digits dataset (tests/trainingtools.py),
two images a step, and its outcome is one of: trained (exit 0, two steps in the run's summary, the
last step's loss), refused (exit 2 with the one error line the command prints, no traceback), or
FAILED (anything else: the tail of its stderr). The largest models (over --max-params parameters or
--max-gflop for the two steps) are skipped with their size, unless the check refuses them, which
costs nothing: on two CPU cores each takes up to two minutes and 14 GB of memory (ViT-H/14 and
RegNetY-128GF at 224 px); --max-params 0 --max-gflop 0 runs every model.

    .venv/bin/python bench/models_sweep.py [--sizes 64,224] [--models resnet18,googlenet]

Exit status 1 when a run FAILED.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, WORK  # noqa: E402

STEPS, BATCH = 2, 2


def _digits_shards() -> Path:
    from tests.trainingtools import sharded_digits

    root = WORK / "models-sweep"
    if not (root / "shards" / "manifest.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        sharded_digits(root)
    return root / "shards"


def _spec(work: Path, data: Path) -> Path:
    from tests.trainingtools import write_spec

    return write_spec(work / "spec.yaml", str(data), str(work / "runs"), model={"name": "resnet18", "width": 1.0},
                      data={"streams": BATCH, "num_workers": 1},
                      train={"epochs": 1, "max_steps": STEPS, "global_batch_size": BATCH, "log_every": 1},
                      checkpoint={"every_steps": 0, "keep": 1}, scaling={"num_workers": 1})


def _cost(name: str, size: int) -> tuple[int, float | None]:
    """Parameters, and the two steps' GFLOP (None when the check refuses the size), from a meta build."""
    from alexray_core.spec import SpecError
    from workers.models.architectures import build_model_on_meta
    from workers.models.flops import training_flops_per_sample
    from workers.models.input_size import image_size_problem

    try:
        model = build_model_on_meta(name, 10)
    except SpecError:  # not a model name: the command says so
        return 0, None
    params = sum(p.numel() for p in model.parameters())
    if image_size_problem(model, size):
        return params, None
    return params, STEPS * BATCH * training_flops_per_sample(model, size) / 1e9


def _outcome(proc: subprocess.CompletedProcess, run_dir: Path) -> tuple[str, str]:
    from alexray_core import runs

    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    if proc.returncode == 0:
        summary = json.loads((run_dir / runs.SUMMARY).read_text())
        progress = json.loads((run_dir / runs.PROGRESS).read_text())
        if summary["steps"] == STEPS:
            return "trained", f"loss {progress['loss']:.3f}"
        return "FAILED", f"exit 0 after {summary['steps']} steps"
    if proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr:
        return "refused", errors[0]
    tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-6:]
    return "FAILED", f"exit {proc.returncode}: " + " | ".join(tail)


def run_one(name: str, size: int, spec: Path, timeout: float) -> tuple[str, str]:
    run_dir = spec.parent / "runs" / f"{name}-{size}"
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "orchestrator.cli", "train", str(spec), "--no-ray",
               "--set", f"model.name={name}", "--set", f"data.image_size={size}",
               "--set", f"data.eval_resize={size}", "--set", f"run.name={name}-{size}"]
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        return _outcome(proc, run_dir)
    except subprocess.TimeoutExpired:
        return "FAILED", f"no end in {timeout:.0f} s"
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)  # the checkpoints of the large models fill a disk


def main(argv: list[str] | None = None) -> int:
    import torchvision

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64,224", help="data.image_size values (default: 64,224)")
    p.add_argument("--models", default=None, help="comma-separated names (default: every torchvision classifier)")
    p.add_argument("--max-params", type=float, default=200e6, help="skip larger models (0: no limit)")
    p.add_argument("--max-gflop", type=float, default=1500, help="skip runs of more FLOPs (0: no limit)")
    p.add_argument("--timeout", type=float, default=900, help="seconds a run may take before it counts as FAILED")
    args = p.parse_args(argv)
    names = args.models.split(",") if args.models else torchvision.models.list_models(module=torchvision.models)
    work = WORK / "models-sweep"
    spec = _spec(work, _digits_shards())
    rows = []
    print(f"{'model':<22} {'size':>4} {'params':>8} {'GFLOP':>6} {'s':>5}  outcome", flush=True)
    for size in (int(s) for s in args.sizes.split(",")):
        for name in names:
            params, gflop = _cost(name, size)
            started = time.perf_counter()
            refused = gflop is None  # the command refuses it at once: always run
            if not refused and ((args.max_params and params > args.max_params) or
                                (args.max_gflop and gflop > args.max_gflop)):
                outcome, detail = "skipped", "over --max-params or --max-gflop"
            else:
                outcome, detail = run_one(name, size, spec, args.timeout)
            seconds = time.perf_counter() - started
            rows.append((name, size, outcome))
            cost = f"{gflop:6.0f}" if gflop is not None else f"{'-':>6}"
            print(f"{name:<22} {size:>4} {params / 1e6:7.1f}M {cost} {seconds:5.0f}  {outcome}: {detail}", flush=True)
    for size in sorted({size for _, size, _ in rows}):
        counts = {o: sum(1 for _, s, x in rows if s == size and x == o) for o in ("trained", "refused", "skipped", "FAILED")}
        print(f"data.image_size {size}: " + ", ".join(f"{n} {o}" for o, n in counts.items()))
    return 1 if any(o == "FAILED" for _, _, o in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
