"""``alexray evaluate | predict | finetune | export``: what is done with a trained checkpoint.

Bad input (a missing or damaged checkpoint, a dataset with other classes, a bad flag) is one line
on stderr naming the problem and the fix, with exit code 2; ``predict`` answers every readable image
and reports each unreadable one on its own line, then exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from alexray_core.errors import EXIT_USAGE, AlexrayError

COMMANDS = ("evaluate", "predict", "finetune", "export")
_EXPORT_EXTRA = ("onnx", "onnxruntime", "onnxscript")  # optional: pip install 'alexray[export]'


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the summary")
    p.add_argument("--report", metavar="PATH", default=None, help="also write the JSON report to PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parser(command: str) -> argparse.ArgumentParser:
    prog = f"alexray {command}"
    if command == "evaluate":
        p = argparse.ArgumentParser(prog=prog, description="Exact top-1/top-5 of a checkpoint on a sharded split, "
                                    "with a confusion summary of the worst classes.")
        p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint directory or run directory (local or s3://)")
        p.add_argument("--data", metavar="DEST", default=None,
                       help="a directory written by 'alexray shard' (local or s3://; default: the run's dataset)")
        p.add_argument("--split", default="val", help="split to evaluate on (default: val)")
        p.add_argument("--ten-crop", action="store_true", help="average the paper's 10 crops (corners, centre, flips)")
        p.add_argument("--batch-size", type=_count(1), default=64, help="images per forward pass (default: 64)")
        p.add_argument("--num-workers", type=_count(0), default=2,
                       help="decoding processes per evaluating process (default: 2)")
        p.add_argument("--address", default=None,
                       help="evaluate on this Ray cluster (host:6379 or auto), split over --workers tasks")
        p.add_argument("--workers", type=_count(1), default=None,
                       help="Ray tasks with --address (default: one per CPU of the cluster)")
        p.add_argument("--worst", type=_count(0), default=10, help="classes in the confusion summary (default: 10)")
        _output_flags(p)
    elif command == "predict":
        p = argparse.ArgumentParser(prog=prog, description="Top-5 classes with probabilities for each image.")
        p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint directory or run directory (local or s3://)")
        p.add_argument("images", metavar="IMAGE", nargs="+",
                       help="image files, directories (every file inside) or s3:// keys and prefixes")
        p.add_argument("--ten-crop", action="store_true", help="average the paper's 10 crops")
        p.add_argument("--top", type=_count(1), default=5, help="classes per image (default: 5)")
        p.add_argument("--json", action="store_true", help="print JSON instead of text")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    elif command == "finetune":
        p = argparse.ArgumentParser(prog=prog, description="Train a new classifier on a trained backbone (a checkpoint "
                                    "or torchvision's ImageNet weights): everything else as in 'alexray train'.")
        p.add_argument("spec", metavar="SPEC.yaml", help="job spec for the new dataset (see examples/ and the README)")
        p.add_argument("--from", dest="source", required=True, metavar="CHECKPOINT",
                       help="checkpoint or run directory (local or s3://) whose backbone starts the run; or "
                       "torchvision:NAME, torchvision's ImageNet weights from the torch hub cache (never downloaded; "
                       "torchvision:alexnet for model.name alexnet_tv); or a .pth state dict of the spec's model")
        p.add_argument("--freeze-features", action="store_true", help="keep the convolutional layers fixed")
        p.add_argument("--backbone-lr-mult", type=float, default=None, metavar="X",
                       help="lr of the convolutional layers as a fraction of the schedule's (e.g. 0.1)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a spec field, e.g. --set train.epochs=2 (repeatable)")
        p.add_argument("--address", default=None,
                       help="Ray cluster to run on (default: RAY_ADDRESS, else a local cluster started for the job)")
        p.add_argument("--no-ray", action="store_true", help="run in this process without Ray (one worker)")
    else:
        from workers.tools.export import FORMATS, QUANTIZATIONS

        p = argparse.ArgumentParser(prog=prog, description="Write a standalone TorchScript/ONNX model file and "
                                    "report its size, CPU latency and top-1 against the float model.")
        p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint directory or run directory (local or s3://)")
        p.add_argument("--format", choices=FORMATS, default="torchscript", help="default: torchscript")
        p.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                       help="int8: dynamic int8 quantisation of the fully connected layers")
        p.add_argument("--output", "-o", metavar="PATH", default=None,
                       help="model file to write (default: CHECKPOINT_NAME-FORMAT[-int8].pt|.onnx here)")
        p.add_argument("--data", metavar="DEST", default=None,
                       help="sharded dataset for the top-1 comparison (default: the run's dataset, if readable)")
        p.add_argument("--split", default="val", help="split to compare on (default: val)")
        p.add_argument("--val-samples", type=_count(1), default=500, help="samples compared (default: 500)")
        p.add_argument("--threads", type=_count(1), default=1, help="CPU threads for the latency (default: 1)")
        _output_flags(p)
    return p


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command not in COMMANDS:
        print(f"alexray: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    prog = f"alexray {command}"
    args = _parser(command).parse_args(rest)
    logging.basicConfig(level=logging.WARNING, format="alexray: %(message)s")
    handler = {"evaluate": _evaluate, "predict": _predict, "finetune": _finetune, "export": _export}[command]
    try:
        return handler(args, prog)
    except AlexrayError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except ImportError as e:
        if (e.name or "").split(".")[0] not in _EXPORT_EXTRA:  # a dependency alexray cannot run without: a bug
            raise
        print(f"{prog}: error: {e.name} is not installed; ONNX export needs the export extra: "
              "pip install 'alexray[export]'", file=sys.stderr)
        return EXIT_USAGE


def _emit(report: dict, args, summary: str) -> None:
    if args.report:
        path = Path(args.report).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1) if args.json else summary)


def _dataset(given: str | None, checkpoint: str) -> str | None:
    """--data, else the dataset the checkpoint's run trained on if it is still readable."""
    if given:
        return given
    from alexray_core.storage import open_storage
    from workers.models.loading import run_data_path

    found = run_data_path(checkpoint)
    try:
        return found if found and open_storage(found).exists("manifest.json") else None
    except Exception:  # noqa: BLE001 - only a default: the caller asks for --data instead
        return None


def _evaluate(args, prog: str) -> int:
    from workers.models.loading import load_checkpoint
    from workers.tools.inference import EvalOptions, evaluate

    loaded = load_checkpoint(args.checkpoint)
    data = _dataset(args.data, args.checkpoint)
    if not data:
        raise AlexrayError("--data: required: the dataset to evaluate on (a directory written by 'alexray shard', "
                           "local or s3://); the checkpoint's run names none that is readable")
    options = EvalOptions(split=args.split, ten_crop=args.ten_crop, batch_size=args.batch_size,
                          num_workers=args.num_workers, worst=args.worst)
    r = evaluate(loaded, data, options, args.address, args.workers, show_progress=not args.no_progress)
    lines = [f"checkpoint {r['checkpoint']}: {r['model']}",
             f"data {r['data']} ({r['split']}, {'10 crops' if r['ten_crop'] else 'centre crop'} of "
             f"{r['image_size']} px): {r['samples']} samples, {r['skipped']} unreadable, {r['parts']} part(s), "
             f"{r['images_per_s']} img/s",
             f"top-1 {r['top1']:.4f} ({r['correct_top1']}/{r['samples']})   "
             f"top-5 {r['top5']:.4f} ({r['correct_top5']}/{r['samples']})"]
    if r["worst_classes"]:
        lines.append("worst classes (top-1, most often mistaken for):")
        for c in r["worst_classes"]:
            confused = ", ".join(f"{x['name']} x{x['count']}" for x in c["confused_with"]) or "-"
            lines.append(f"  {c['index']:>4} {c['name'][:40]:<40} {c['top1']:.3f} "
                         f"({c['correct_top1']}/{c['samples']})  {confused}")
    _emit(r, args, "\n".join(lines))
    return 0


def _predict(args, prog: str) -> int:
    from workers.models.loading import load_checkpoint
    from workers.tools.inference import predict

    loaded = load_checkpoint(args.checkpoint)
    results = predict(loaded, args.images, ten_crop=args.ten_crop, top_k=args.top, show_progress=not args.no_progress)
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"{prog}: error: {r.error}", file=sys.stderr)
    if args.json:
        print(json.dumps([{"input": r.input, "top": r.top} if not r.error else {"input": r.input, "error": r.error}
                          for r in results], indent=1))
    else:
        for r in results:
            if not r.error:
                print(r.input)
                for entry in r.top:
                    print(f"  {entry['probability']:7.2%}  {entry['name']}")
    if failed:
        print(f"{prog}: {len(results) - len(failed)} of {len(results)} images classified", file=sys.stderr)
    return EXIT_USAGE if failed else 0


def _finetune(args, prog: str) -> int:
    from alexray_core.spec import load_spec, torchvision_source
    from alexray_core.storage import absolute_location
    from workers.models.loading import checkpoint_info
    from workers.models.pretrained import check_source, check_weights_source
    from workers.training.cli import main as train_main

    source = args.source
    if torchvision_source(source) is None:
        source = absolute_location(source)
    overrides = [*args.overrides, f"finetune.from_checkpoint={json.dumps(source)}"]
    if args.freeze_features:
        overrides.append("finetune.freeze_features=true")
    if args.backbone_lr_mult is not None:
        overrides.append(f"finetune.backbone_lr_mult={args.backbone_lr_mult}")
    spec = load_spec(args.spec, overrides)
    if check_weights_source(spec) is None:  # refused here, before any Ray worker starts
        info, where = checkpoint_info(source)
        check_source(info, spec, where)
    train_argv = [args.spec, *[arg for item in overrides for arg in ("--set", item)]]
    if args.address:
        train_argv += ["--address", args.address]
    if args.no_ray:
        train_argv.append("--no-ray")
    return train_main(train_argv, prog=prog)


def _export(args, prog: str) -> int:
    from workers.models.loading import load_checkpoint
    from workers.tools.export import ExportOptions, export

    loaded = load_checkpoint(args.checkpoint)
    data = _dataset(args.data, args.checkpoint)
    options = ExportOptions(format=args.format, quantize=args.quantize, output=args.output, data=data,
                            split=args.split, val_samples=args.val_samples, threads=args.threads)
    r = export(loaded, options, show_progress=not args.no_progress)
    e = r["exported"]
    lines = [f"wrote {e['file']}: {e['bytes'] / 1e6:.2f} MB"
             + (f" (float {r['float']['bytes'] / 1e6:.2f} MB, {r['size_ratio_float_to_int8']:.2f}x smaller)"
                if "float" in r else ""),
             f"CPU latency per image (batch 1, {r['threads']} thread(s)): {e['latency_ms_per_image']:.2f} ms"
             + (f" (float {r['float']['latency_ms_per_image']:.2f} ms)" if "float" in r else ""),
             f"compared on {r['compared_on']}: max |logit - pytorch| {e['max_abs_logit_diff_vs_pytorch']:.2e}, "
             f"top-1 agreement {e['top1_agreement_with_pytorch']:.4f}"]
    if "top1" in e:
        reference = r["float"]["top1"] if "float" in r else r["pytorch_top1"]
        lines.append(f"top-1 {e['top1']:.4f} (float {reference:.4f}, change {r['top1_change']:+.4f})")
    _emit(r, args, "\n".join(lines))
    return 0
