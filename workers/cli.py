"""``alexray train SPEC [--set k=v ...]`` on Ray, and ``python -m workers train SPEC`` without Ray."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def train_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train a model described by a YAML spec.")
    p.add_argument("spec", metavar="SPEC.yaml", help="job spec (see examples/ and the README)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set train.epochs=2 (repeatable; applied after the file)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to run on (default: RAY_ADDRESS, else a local cluster started for the job)")
    p.add_argument("--no-ray", action="store_true", help="run in this process without Ray (one worker)")
    return p


def main(argv: list[str] | None = None, prog: str = "alexray train") -> int:
    import os

    from alexray_core.spec import SpecError, load_spec

    args = train_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="alexray: %(message)s")
    try:
        spec = load_spec(args.spec, args.overrides)
    except SpecError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        if args.no_ray:
            from .launch import prepare_run
            from .train import run_local

            summary = run_local(spec, prepare_run(spec))
        else:
            from .launch import launch

            summary = launch(spec, args.address or os.environ.get("RAY_ADDRESS"))
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - Ray's errors carry pages of traceback; say it in one line
        if type(e).__module__.startswith("ray") or type(e).__name__ in ("ShardError", "StorageError", "CheckpointError"):
            print(f"{prog}: error: training failed: {_last_line(e)}", file=sys.stderr)
            return 1
        raise
    print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "model")}, indent=1))
    return 0


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "Error:" in line or "error:" in line]
    return (errors or lines or [type(error).__name__])[-1]


if __name__ == "__main__":
    sys.exit(main())
