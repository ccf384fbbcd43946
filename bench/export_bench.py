"""Export benchmarks: file size and CPU latency of float against int8, in the same run.

- the paper's AlexNet at full size (width 1.0, 1000 classes, 224 px; weights as initialised: size
  and latency do not depend on what was learnt), TorchScript and ONNX;
- the narrow AlexNet trained on the handwritten digits (64 px): the top-1 change of int8 on the
  val split, the accuracy cost of quantising a trained model.

Latency is the median of batch-1 forward passes on one thread (``alexray export --threads 1``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT, WORK, record


def _full_size_checkpoint() -> Path:
    import torch

    from workers.models import checkpoint_format as ckpt
    from workers.models.architectures import build_model

    directory = WORK / "export" / "alexnet-1000"
    if not (directory / ckpt.COMPLETE).exists():
        torch.manual_seed(0)
        model = build_model("alexnet", 1000, 1.0, init="kaiming")
        info = {"name": "alexnet", "num_classes": 1000, "width": 1.0,
                "kwargs": {"groups": True, "dropout": 0.5, "init": "kaiming"},
                "classes": [f"class {i}" for i in range(1000)], "image_size": 224, "eval_resize": 256}
        ckpt.save(directory, 0, ckpt.TrainState(model=info), model.state_dict(), {})
    return directory


def _digits_run() -> tuple[Path, Path]:
    """A narrow AlexNet trained on the digits (examples/digits.yaml's recipe); trained once."""
    from bench.train_bench import _digits_shards
    from tests.trainingtools import write_spec

    data = _digits_shards()
    runs = WORK / "export" / "runs"
    if not (runs / "digits" / "summary.json").exists():
        spec = write_spec(WORK / "export" / "digits.yaml", str(data), str(runs), run={"name": "digits"},
                          data={"num_workers": 0}, scaling={"num_workers": 1},
                          train={"epochs": 10, "global_batch_size": 64, "log_every": 20, "warmup_epochs": 0.3},
                          checkpoint={"every_steps": 0})
        subprocess.run([sys.executable, "-m", "workers", "train", str(spec)], check=True, capture_output=True,
                       cwd=ROOT)
    return runs / "digits", data


def _pair(loaded, fmt: str, tmp: Path, data: str | None, samples: int) -> dict:
    from workers.tools.export import ExportOptions, export

    options = ExportOptions(format=fmt, quantize="int8", output=str(tmp / f"model-{fmt}-int8"), data=data,
                            val_samples=samples, threads=1, latency_runs=30)
    return export(loaded, options, show_progress=False)


def run(results: list) -> None:
    from workers.models.loading import load_checkpoint

    with tempfile.TemporaryDirectory(prefix="alexray-bench-export-") as tmp:
        tmp = Path(tmp)
        full = load_checkpoint(str(_full_size_checkpoint()))
        print("export benchmarks: the paper's AlexNet (60,965,224 parameters, 1000 classes, 224 px), one thread")
        for fmt in ("torchscript", "onnx"):
            report = _pair(full, fmt, tmp, None, 16)
            with record(results, f"{fmt} int8 vs float, full-size AlexNet: file size", ">= 3.5x smaller") as r:
                r.update(float_mb=round(report["float"]["bytes"] / 1e6, 1),
                         int8_mb=round(report["exported"]["bytes"] / 1e6, 1),
                         ratio=report["size_ratio_float_to_int8"])
            with record(results, f"{fmt} int8 vs float, full-size AlexNet: CPU latency per image", "information") as r:
                r.update(float_ms=round(report["float"]["latency_ms_per_image"], 2),
                         int8_ms=round(report["exported"]["latency_ms_per_image"], 2),
                         speedup=report["latency_ratio_float_to_int8"],
                         top1_agreement=report["exported"]["top1_agreement_with_pytorch"])

        run_dir, data = _digits_run()
        digits = load_checkpoint(str(run_dir))
        summary = json.loads((run_dir / "summary.json").read_text())
        print(f"export benchmarks: narrow AlexNet trained on digits (val top-1 {summary['top1']:.3f}, 64 px)")
        for fmt in ("torchscript", "onnx"):
            report = _pair(digits, fmt, tmp, str(data), 1000)
            with record(results, f"{fmt} int8 vs float, digits model: top-1 change on the val split",
                        ">= -0.01") as r:
                r.update(samples=int(report["compared_on"].split()[0]), float_top1=round(report["float"]["top1"], 4),
                         int8_top1=round(report["exported"]["top1"], 4), change=report["top1_change"],
                         float_mb=round(report["float"]["bytes"] / 1e6, 2),
                         int8_mb=round(report["exported"]["bytes"] / 1e6, 2),
                         float_ms=round(report["float"]["latency_ms_per_image"], 3),
                         int8_ms=round(report["exported"]["latency_ms_per_image"], 3))
