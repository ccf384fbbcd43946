"""``make demo``: the whole product on a laptop, on the embedded defaults (local disk, local Ray).

1. Build a small real dataset in ImageNet layout: scikit-learn's handwritten digits as RGB JPEGs.
2. Shard it to a local directory with ``alexray shard`` and verify the shards.
3. Start a Ray cluster bound to 127.0.0.1 with token auth on, its dashboard and Jobs API.
4. Submit ``examples/digits.yaml`` through the Jobs API, the same path as a real cluster (2 CPU
   workers, a narrow AlexNet), and follow it: epoch, step, images/s, loss.
   Prometheus (Debian's package) scrapes every worker while the job runs, and a dashboard page
   plots throughput, data-wait, step time, loss and accuracy from it.
5. Print the final val top-1, where the checkpoints are and where the metrics are served, then stop
   Prometheus and the cluster and check that none of the cluster's processes is left.

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


def start_monitoring(base: Path, cluster):
    """Prometheus on the job's targets and Ray's own; None (and a note) when it is not installed."""
    from .prometheus import PrometheusError, start_prometheus

    try:
        return start_prometheus(base / "prometheus", targets_dir=base / "prometheus-targets",
                                ray_sd_file=f"{cluster.temp_dir}/prom_metrics_service_discovery.json",
                                scrape_interval="2s", evaluation_interval="2s")
    except PrometheusError as e:
        say(f"no metrics dashboard: {e}")
        return None


def run_job(base: Path, shards: Path, spec: Path, overrides: list[str]) -> int:
    from alexray_core.discovery import TARGETS_ENV
    from alexray_core.localcluster import (
        interrupts_deferred,
        start_local_cluster,
        stop_local_cluster,
    )

    from . import jobs
    from .follow import describe, describe_goodput, follow

    say("starting a local Ray cluster on 127.0.0.1 (token auth on)")
    started = time.monotonic()
    # The job's driver publishes its workers' metrics endpoints where this demo's Prometheus looks.
    # Ray Train's controller polls the workers every 0.5 s, not 2: the end of the run, each report
    # and each failure wait for its next poll (the demo's shut-down: 9 s at 2 s, under 2 at 0.5 s).
    # Its cost is a status call per worker per poll; a cluster of one machine has no drained node
    # whose notice a faster poll could outrun (see tests/test_multinode.py).
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", **os.environ, TARGETS_ENV: str(base / "prometheus-targets")}
    code, job_id, prometheus, dashboard = 1, None, None, None
    # A Ctrl-C during the start is handled by start_local_cluster, which stops what it started.
    cluster = start_local_cluster(num_cpus=4, env=env, token_file=base / "ray" / "auth_token")
    try:
        # This process talks to the cluster it started, whatever RAY_ADDRESS or token the shell has.
        os.environ["RAY_AUTH_TOKEN"] = cluster.token
        say(f"cluster up in {time.monotonic() - started:.0f} s: dashboard and Jobs API at {cluster.dashboard_url} "
            f"(token in {base / 'ray' / 'auth_token'}, Ray's files in {cluster.temp_dir})")
        overrides = [f"data.path={shards}", f"run.storage={base / 'runs'}", *overrides]
        job_id, run_name = jobs.submit(spec, overrides, cluster.dashboard_url)
        say(f"submitted job {job_id}, run {run_name} ({spec.name}: 2 CPU workers, narrow AlexNet)")
        prometheus = start_monitoring(base, cluster)
        if prometheus is not None:
            from .monitor import start_dashboard

            dashboard = start_dashboard(prometheus.url, run=run_name)
            say(f"dashboard: {dashboard.url} (Prometheus {prometheus.url}; in a terminal: "
                f"alexray watch {run_name} --prometheus {prometheus.url})")
        say(f"Ray's dashboard: {cluster.dashboard_url}; status: "
            f"alexray status {run_name} --address {cluster.dashboard_url}")
        final = follow(cluster.dashboard_url, job_id)
        if final["status"] != "SUCCEEDED":
            say(f"job {job_id} {final['status']}: {jobs.failure_reason(final['message'])}")
            tail = jobs.logs(cluster.dashboard_url, job_id)[-4000:]
            print(tail, file=sys.stderr)
            return 1
        top1 = final.get("top1")
        say(f"run {run_name} succeeded: {describe(final)}")
        say(f"final val top-1: {100 * top1:.1f}%" if top1 is not None else "final val top-1: not measured")
        say(f"where the workers' time went: {describe_goodput(final.get('goodput'))}")
        say(f"newest checkpoint: {final['newest_checkpoint']}")
        say(f"best model: {final['run_dir']}/best; summary: {final['run_dir']}/summary.json")
        if prometheus is not None:
            say(f"metrics were served by every worker and scraped into {prometheus.workdir}/data")
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
        with interrupts_deferred():  # a second Ctrl-C must not cut the clean-up short
            if dashboard is not None:
                dashboard.stop()
            if prometheus is not None:
                prometheus.stop()
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
    from alexray_core.errors import AlexrayError

    base = Path(args.dir).resolve()
    started = time.monotonic()
    try:
        shards = prepare_data(base)
        say(f"data ready in {time.monotonic() - started:.1f} s")
        code = run_job(base, shards, Path(args.spec), args.overrides)
    except AlexrayError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    say(f"{'done' if code == 0 else 'failed'} in {time.monotonic() - started:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
