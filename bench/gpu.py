"""Does data loading starve the accelerator? AlexNet images/s on synthetic tensors vs the real loader.

Single process, no Ray (GPU machines used for benchmarking may have none). On CUDA: bf16 autocast
and channels_last, as in training. Run on a GPU machine:

    python bench/gpu.py --data /path/to/shards --steps 100 --batch 256
    python bench/gpu.py --synthetic-only          # no dataset at hand

The ratio real/synthetic near 1.0 means the loader keeps up; well below 1.0 means the GPU waits for
data (add decoding threads with --threads, or pre-resize the shards).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from workers.models import build_model  # noqa: E402
from workers.transforms import to_model_input  # noqa: E402


def _step(model, optimizer, images, labels, device, bf16, channels_last):
    x = to_model_input(images.to(device, non_blocking=True), None, channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(x), labels.to(device, non_blocking=True))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _timed(batches, model, optimizer, device, bf16, channels_last, steps, warmup) -> float:
    seen, started = 0, None
    for i, (images, labels) in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started, seen = time.perf_counter(), 0
        _step(model, optimizer, images, labels, device, bf16, channels_last)
        seen += len(labels)
        if i + 1 == warmup + steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="a directory (or s3:// URL) written by 'alexray shard'")
    p.add_argument("--synthetic-only", action="store_true")
    p.add_argument("--model", default="alexnet")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=8, help="decoding threads of the real loader")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    torch.backends.cudnn.benchmark = on_gpu
    model = build_model(args.model, args.classes, args.width).to(
        device, memory_format=torch.channels_last if on_gpu else torch.preserve_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    images = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8)
    labels = torch.randint(0, args.classes, (args.batch,))
    if on_gpu:
        images, labels = images.pin_memory(), labels.pin_memory()

    def synthetic():
        while True:
            yield images, labels

    results = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "batch": args.batch,
               "image_size": args.image_size, "model": args.model, "width": args.width}
    results["synthetic_img_s"] = _timed(synthetic(), model, optimizer, device, on_gpu, on_gpu, args.steps, args.warmup)
    if not args.synthetic_only:
        if not args.data:
            p.error("--data is required unless --synthetic-only")
        from workers.data import load_manifest, split_info, train_batches
        from workers.sampling import plan_epoch

        split = split_info(args.data, load_manifest(args.data), "train")
        plan = plan_epoch(list(split.sizes), args.batch, 8 if args.batch % 8 == 0 else 1, seed=0, epoch=0)
        steps = min(args.steps, plan.steps - args.warmup)
        batches = ((b.images, b.labels) for b in train_batches(split, plan, 1, 0, 0, 0, args.image_size, 1000,
                                                               args.threads))
        results["loader_threads"] = args.threads
        results["real_img_s"] = _timed(batches, model, optimizer, device, on_gpu, on_gpu, steps, args.warmup)
        results["real_over_synthetic"] = results["real_img_s"] / results["synthetic_img_s"]
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
