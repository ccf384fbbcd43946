"""``alexray train SPEC [--set k=v ...]`` on Ray, and ``python -m workers train SPEC`` without Ray."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from alexray_core.errors import EXIT_FAILED, EXIT_INTERRUPTED, AlexrayError
from alexray_core.goodput import process_start_time
from alexray_core.spec import JobSpec, load_spec
from alexray_core.storage import StorageError
from data_prep.errors import ShardError


def train_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train a model described by a YAML spec.")
    p.add_argument("spec", metavar="SPEC.yaml", help="job spec (see examples/ and the README)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set train.epochs=2 (repeatable; applied after the file)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to run on (default: RAY_ADDRESS, else a local cluster started for the job)")
    p.add_argument("--no-ray", action="store_true", help="run in this process without Ray (one worker)")
    p.add_argument("--submitted-at", type=float, default=None, help=argparse.SUPPRESS)  # set by 'alexray submit'
    return p


def main(argv: list[str] | None = None, prog: str = "alexray train") -> int:
    args = train_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="alexray: %(message)s")
    spec = None
    try:
        spec = load_spec(args.spec, args.overrides)
        if args.no_ray:
            summary = _train_here(spec, args.submitted_at)
        else:
            from workers.training.driver import launch

            summary = launch(spec, args.address or os.environ.get("RAY_ADDRESS"), args.submitted_at)
    except AlexrayError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{_resume_hint(spec)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "model")}, indent=1))
    return 0


def _train_here(spec: JobSpec, submitted: float | None = None) -> dict:
    """The run in this process. Data that fails it part-way (a shard that vanished, was refused or
    changed, storage that went away) fails the run, as it would on Ray; the spec and checkpoint
    problems found as it starts keep their own exit code."""
    from workers.training.driver import prepare_run
    from workers.training.loop import run_local

    run_dir = prepare_run(spec)
    try:
        return run_local(spec, run_dir, submitted or process_start_time())
    except (ShardError, StorageError) as e:
        raise AlexrayError(f"training failed: {e}", exit_code=EXIT_FAILED) from None


def _resume_hint(spec: JobSpec | None) -> str:
    """How to continue: a run is resumed from its newest checkpoint by starting it again under its name."""
    if spec is None or spec.run.name is None:
        return ""
    return f"; to continue from its newest checkpoint, run the same command with --set run.name={spec.run.name}"


if __name__ == "__main__":
    sys.exit(main())
