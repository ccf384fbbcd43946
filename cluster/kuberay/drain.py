"""preStop hook of alexray's Ray worker pods: drain the node, let training checkpoint, stop Ray.

    python /home/ray/alexray/cluster/kuberay/drain.py --deadline 90

1. Finds this pod's Ray node id (a short-lived driver connected to the local raylet).
2. Asks the GCS to drain the node as a *preemption* with a deadline: Ray stops placing work there,
   and Ray Train's ``get_preemption_info()`` reports it, so alexray's workers write a checkpoint at
   their next check (``failure.preemption_check_steps``) instead of losing the steps since the last
   one. Ray Train tears the worker group down at the deadline and restarts it elsewhere.
3. Waits until no actor is left alive on the node, or the deadline has passed.
4. Runs ``ray stop``.

Kubernetes kills the pod ``terminationGracePeriodSeconds`` after the hook starts whatever happens,
so that value must exceed the deadline (the tests check it). Every failure is reported and the
remaining steps still run: a hook that dies early would only leave Ray to be killed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

POLL_S = 2.0


def log(message: str) -> None:
    print(f"alexray-drain: {message}", file=sys.stderr, flush=True)


def local_node_id() -> str:
    import ray

    ray.init(address="auto", logging_level="ERROR", log_to_driver=False, configure_logging=False)
    return ray.get_runtime_context().get_node_id()


def drain(node_id: str, deadline_s: int, reason_message: str) -> None:
    subprocess.run(["ray", "drain-node", "--node-id", node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                    "--reason-message", reason_message, "--deadline-remaining-seconds", str(deadline_s)],
                   check=True, timeout=30)


def alive_actors(node_id: str) -> int:
    from ray.util.state import list_actors

    return len(list_actors(filters=[("node_id", "=", node_id), ("state", "=", "ALIVE")], raise_on_missing_output=False))


def stop_ray() -> None:
    subprocess.run(["ray", "stop", "--grace-period", "10"], check=False, timeout=60)


def run(deadline_s: int, *, node_id_fn=local_node_id, drain_fn=drain, alive_fn=alive_actors, stop_fn=stop_ray,
        clock=time.monotonic, sleep=time.sleep, hostname: str = "") -> int:
    """The hook's steps with their effects passed in (the tests replace them). Returns an exit code."""
    started = clock()
    ended_by = started + deadline_s
    node_id = None
    try:
        node_id = node_id_fn()
        drain_fn(node_id, deadline_s, f"pod {hostname or '?'} is terminating")
        log(f"node {node_id[:12]} draining, deadline {deadline_s} s")
    except Exception as e:  # noqa: BLE001 - the remaining steps must run
        log(f"could not drain this node ({e}); stopping Ray")
    while node_id is not None and clock() < ended_by:
        try:
            if alive_fn(node_id) == 0:
                break
        except Exception as e:  # noqa: BLE001
            log(f"cannot list the node's actors ({e}); waiting for the deadline")
            sleep(max(0.0, ended_by - clock()))
            break
        sleep(min(POLL_S, max(0.0, ended_by - clock())))
    stop_fn()
    log(f"Ray stopped after {clock() - started:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deadline", type=int, required=True,
                   help="seconds Ray is told it has before the node goes (below terminationGracePeriodSeconds)")
    args = p.parse_args(argv)
    if args.deadline <= 0:
        p.error("--deadline must be positive")
    return run(args.deadline, hostname=os.environ.get("HOSTNAME", ""))


if __name__ == "__main__":
    sys.exit(main())
