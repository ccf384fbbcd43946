"""Command line of ``alexray shard``: argument parsing, one-line errors, exit codes."""

from __future__ import annotations

import argparse
import logging
import sys

from alexray_core.errors import EXIT_FAILED, EXIT_INTERRUPTED, AlexrayError

from .errors import ShardError
from .executor import default_workers
from .images import DEFAULT_MAX_PIXELS

log = logging.getLogger("alexray")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _byte_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 1000000, 512MB or 1GiB)") from None


def shard_parser(prog: str = "alexray shard") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Shard an ImageFolder/ImageNet-layout dataset into WebDataset tar files on S3 or a local "
                    "directory. Run it again after an interruption to resume. 'alexray shard verify DEST' checks a result.",
    )
    p.add_argument("src", metavar="SRC", help="dataset root holding train/<class>/* and val/<class>/* (or a flat val/ "
                   "with LOC_val_solution.csv beside it)")
    p.add_argument("dest", metavar="DEST", help="s3://bucket/prefix or a local directory")
    p.add_argument("--splits", help="comma-separated splits to shard (default: train and val, those present)")
    p.add_argument("--shard-size", type=_positive_int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--max-shard-bytes", type=_byte_size, default=None,
                   help="lower the samples per shard so shards stay under about this size (e.g. 512MB)")
    p.add_argument("--resize-short-side", type=_positive_int, default=None, metavar="N",
                   help="re-encode images larger than N on their short side (default: keep original JPEG bytes)")
    p.add_argument("--quality", type=_positive_int, default=90, help="JPEG quality of re-encoded images (default 90)")
    p.add_argument("--check", choices=("header", "decode"), default="header",
                   help="'header' (default) checks the structure of clean JPEGs, 'decode' decodes every image")
    p.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse larger images as decompression bombs (default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--workers", type=_positive_int, default=default_workers(),
                   help="local worker processes (default: the CPUs available)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed; the same seed gives identical shards (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset already at DEST")
    p.add_argument("--max-reject-fraction", type=float, default=0.001,
                   help="exit non-zero when more than this fraction of inputs is rejected (default 0.001)")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="write shards as Ray tasks on this cluster ('auto' or host:port); SRC must be readable on every "
                        "node and DEST an s3:// URL (or see --shared-fs)")
    p.add_argument("--shared-fs", action="store_true",
                   help="with --ray and a local DEST: DEST is on a file system every node mounts at the same path")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics (images, bytes, rejects) on 127.0.0.1:PORT while sharding "
                        "(0: any free port) and register them in ALEXRAY_PROMETHEUS_TARGETS_DIR")
    return p


def verify_parser(prog: str = "alexray shard verify") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Re-read manifest.json and every shard at DEST; report mismatches.")
    p.add_argument("dest", metavar="DEST", help="s3://bucket/prefix or a local directory written by 'alexray shard'")
    p.add_argument("--decode", action="store_true", help="also decode every image (slower)")
    p.add_argument("--workers", type=_positive_int, default=4, help="shards read at once (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _print_summary(summary) -> None:
    m = summary.manifest
    if summary.up_to_date:
        print(f"{summary.dest} already holds this dataset ({m['totals']['samples']} samples, "
              f"{m['totals']['shards']} shards); nothing to do")
        return
    rate = sum(s["samples"] for p in m["splits"].values() for s in p["shards"]) / summary.seconds if summary.seconds else 0
    for split, part in m["splits"].items():
        print(f"{split}: {part['samples']} samples in {len(part['shards'])} shards, "
              f"{part['bytes'] / 1e6:.1f} MB, {len(part['rejected'])} rejected")
    resumed = f" ({summary.skipped} found complete and kept)" if summary.skipped else ""
    print(f"wrote {summary.written} shards{resumed} in {summary.seconds:.1f} s ({rate:.0f} img/s)")
    print(f"manifest: {summary.dest.rstrip('/')}/manifest.json")


def run_shard(argv: list[str]) -> int:
    from .pipeline import ShardConfig, shard_dataset

    args = shard_parser().parse_args(argv)
    config = ShardConfig(
        splits=[s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None,
        shard_size=args.shard_size, max_shard_bytes=args.max_shard_bytes,
        resize_short_side=args.resize_short_side, quality=args.quality, check=args.check,
        max_pixels=args.max_pixels, seed=args.seed, workers=args.workers, overwrite=args.overwrite,
        max_reject_fraction=args.max_reject_fraction, ray_address=args.ray, shared_fs=args.shared_fs,
        progress=not args.no_progress,
    )
    metrics = None
    if args.metrics_port is not None:
        from .metrics import ShardMetrics, run_label

        metrics = ShardMetrics(run_label(args.dest))
        try:
            url = metrics.serve(args.metrics_port)
        except OSError as e:
            raise ShardError(f"--metrics-port {args.metrics_port}: cannot listen there ({e.strerror}); "
                             "pick another port or 0 for any free one") from None
        print(f"alexray shard: metrics on {url}", file=sys.stderr, flush=True)
    try:
        _print_summary(shard_dataset(args.src, args.dest, config, metrics))
    finally:
        if metrics is not None:
            metrics.close()
    return 0


def run_verify(argv: list[str]) -> int:
    from .verify import verify_dataset

    args = verify_parser().parse_args(argv)
    report = verify_dataset(args.dest, decode=args.decode, workers=args.workers, progress=not args.no_progress)
    for problem in report.problems:
        print(f"MISMATCH {problem}")
    if report.ok:
        print(f"{report.dest}: {report.shards} shards, {report.samples} samples: all match the manifest")
        return 0
    print(f"{report.dest}: {len(report.problems)} problems in {report.shards} shards", file=sys.stderr)
    return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """``alexray shard ...`` and ``alexray shard verify ...``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="alexray: %(message)s")
    try:
        if argv and argv[0] == "verify":
            return run_verify(argv[1:])
        return run_shard(argv)
    except AlexrayError as e:
        print(f"alexray shard: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("alexray shard: interrupted; run the same command again to resume where it stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
