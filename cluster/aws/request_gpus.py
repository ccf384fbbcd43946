"""Ask Ray's autoscaler for GPU nodes before 'alexray submit', and give them back afterwards.

    python ~/alexray/cluster/aws/request_gpus.py 8      # on the head: nodes for 8 GPU workers; waits
    python ~/alexray/cluster/aws/request_gpus.py 0      # withdraw the request

'alexray submit' checks that the GPUs for the run's minimum number of workers are on nodes that are
up; a cluster whose GPU nodes were scaled to zero would be refused. This asks the autoscaler for
one bundle {GPU: 1, CPU: --cpus-per-gpu} per worker (the spec's scaling.cpus_per_worker) and waits
until the GPUs have joined. The request stays until it is replaced: withdraw it with 0 after the
run, and the idle nodes go after idle_timeout_minutes (alexray-cluster.yaml) or idleTimeoutSeconds
(cluster/kuberay). Works on any Ray cluster with an autoscaler (the AWS launcher, KubeRay).
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gpus", type=int, help="GPU workers to make room for; 0 withdraws the request")
    p.add_argument("--cpus-per-gpu", type=float, default=8.0, help="the spec's scaling.cpus_per_worker")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the nodes")
    args = p.parse_args(argv)
    if args.gpus < 0:
        p.error("gpus must be >= 0")

    import ray
    from ray.autoscaler.sdk import request_resources

    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    request_resources(bundles=[{"GPU": 1, "CPU": args.cpus_per_gpu}] * args.gpus)
    if args.gpus == 0:
        print("GPU request withdrawn: idle GPU nodes leave after the idle timeout")
        return 0
    deadline = time.monotonic() + args.timeout
    while (have := ray.cluster_resources().get("GPU", 0)) < args.gpus:
        if time.monotonic() > deadline:
            print(f"only {have:g} of {args.gpus} GPUs after {args.timeout:.0f} s: see 'ray status' "
                  "(spot capacity, quota)", file=sys.stderr)
            return 1
        print(f"waiting for GPU nodes: {have:g}/{args.gpus} GPUs", flush=True)
        time.sleep(15)
    print(f"{have:g} GPUs ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
