"""``make demo``: the whole product on a laptop, on the embedded defaults (local disk, local Ray).

1. Build a small real dataset in ImageNet layout: scikit-learn's handwritten digits as RGB JPEGs.
2. Shard it to a local directory with ``alexray shard`` and verify the shards.
3. Start a Ray cluster bound to 127.0.0.1 with token auth on, its dashboard and Jobs API.
4. Submit ``examples/digits.yaml`` through the Jobs API, the same path as a real cluster (2 CPU
   workers, a narrow AlexNet), and follow it: epoch, step, images/s, loss.
5. Print the final val top-1, where the checkpoints are and where the metrics are served, then stop
   the cluster and check that none of its processes is left.

A second run reuses the dataset and the shards (``alexray shard`` finds them up to date).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits.yaml"


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def prepare_data(base: Path) -> Path:
    """The digits dataset and its shards under ``base``; returns the shards' directory."""
    from data_prep.cli import main as shard_main
    from data_prep.demo_data import write_digits_dataset

    images, shards = base / "digits", base / "shards"
    if images.is_dir():
        say(f"reusing the handwritten-digits dataset in {images}")
    else:
        say(f"writing the handwritten-digits dataset to {images}")
        partial = images.with_name(images.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_digits_dataset(partial)
        partial.rename(images)  # only a complete dataset ever sits under the final name
    say(f"sharding {images} -> {shards}")
    code = shard_main([str(images), str(shards), "--shard-size", "256"])
    if code == 0:
        code = shard_main(["verify", str(shards), "--no-progress"])
    if code:
        raise SystemExit(code)
    return shards


def run_job(base: Path, shards: Path, spec: Path, overrides: list[str]) -> int:
    from . import jobs
    from .follow import describe, follow
    from .localcluster import start_local_cluster, stop_local_cluster

    say("starting a local Ray cluster on 127.0.0.1 (token auth on)")
    started = time.monotonic()
    cluster = start_local_cluster(num_cpus=4, token_file=base / "ray" / "auth_token")
    # This process talks to the cluster it started, whatever RAY_ADDRESS or token the shell has.
    os.environ["RAY_AUTH_TOKEN"] = cluster.token
    code, job_id = 1, None
    try:
        say(f"cluster up in {time.monotonic() - started:.0f} s: dashboard and Jobs API at {cluster.dashboard_url} "
            f"(token in {base / 'ray' / 'auth_token'}, Ray's files in {cluster.temp_dir})")
        overrides = [f"data.path={shards}", f"run.storage={base / 'runs'}", *overrides]
        job_id, run_name = jobs.submit(spec, overrides, cluster.dashboard_url)
        say(f"submitted job {job_id}, run {run_name} ({spec.name}: 2 CPU workers, narrow AlexNet)")
        say(f"metrics: Ray's dashboard {cluster.dashboard_url}; follow with "
            f"'alexray status {run_name} --address {cluster.dashboard_url}'")
        final = follow(cluster.dashboard_url, job_id)
        if final["status"] != "SUCCEEDED":
            say(f"job {job_id} {final['status']}: {jobs.failure_reason(final['message'])}")
            tail = jobs.logs(cluster.dashboard_url, job_id)[-4000:]
            print(tail, file=sys.stderr)
            return 1
        top1 = final.get("top1")
        say(f"run {run_name} succeeded: {describe(final)}")
        say(f"final val top-1: {100 * top1:.1f}%" if top1 is not None else "final val top-1: not measured")
        say(f"newest checkpoint: {final['newest_checkpoint']}")
        say(f"best model: {final['run_dir']}/best; summary: {final['run_dir']}/summary.json")
        code = 0
    except KeyboardInterrupt:
        say("interrupted: stopping the job and the cluster")
        if job_id:
            try:
                jobs.stop(cluster.dashboard_url, job_id, wait=False)
            except Exception:  # noqa: BLE001 - the cluster is stopped next anyway
                pass
        code = 130
    finally:
        left = stop_local_cluster(cluster)
        if left:
            say(f"could not stop these Ray processes: {left}")
            code = code or 1
        else:
            say("stopped the local Ray cluster; none of its processes is left")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=".demo", help="where the demo keeps its data and runs (default .demo)")
    parser.add_argument("--spec", default=str(EXAMPLE), help="the job spec (default examples/digits.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field, e.g. --set train.epochs=2")
    args = parser.parse_args(argv)
    from .jobs import JobError
    from .localcluster import ClusterStartError

    base = Path(args.dir).resolve()
    started = time.monotonic()
    try:
        shards = prepare_data(base)
        say(f"data ready in {time.monotonic() - started:.1f} s")
        code = run_job(base, shards, Path(args.spec), args.overrides)
    except (JobError, ClusterStartError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        return 130
    say(f"{'done' if code == 0 else 'failed'} in {time.monotonic() - started:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
