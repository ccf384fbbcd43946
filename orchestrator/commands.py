"""``alexray submit | status | logs | stop | list | resume``: job commands over Ray's Jobs API.

Every failure is one line on stderr and an exit code: 2 for bad input or environment (spec,
preflight, address, token), 1 for a job that ran and failed. No torch is imported here.
"""

from __future__ import annotations

import argparse
import json
import sys

from alexray_core.errors import AlexrayError

from .rayclient import JobError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="the cluster's Jobs API, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, "
                        "else http://127.0.0.1:8265)")
    p.add_argument("--insecure", action="store_true",
                   help="allow plain http to a host that is not loopback (the Jobs API runs arbitrary code: prefer "
                        "an SSH tunnel)")


def _submitting(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="follow the job to its end; exit 0 only if it succeeded")
    p.add_argument("--python", default=None,
                   help="the interpreter that runs the job on the cluster (default: ALEXRAY_CLUSTER_PYTHON, else this "
                        "one for a loopback address, else 'python'); give it when a tunnel makes a remote head look local")
    p.add_argument("--no-resource-check", action="store_true",
                   help="skip the CPU/GPU capacity check (an autoscaling cluster scaled to zero grows on demand)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alexray", add_help=False)
    sub = p.add_subparsers(dest="command", required=True)
    submit = sub.add_parser("submit", help="validate, preflight and submit a training run")
    submit.add_argument("spec", metavar="SPEC.yaml")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _submitting(submit)
    _common(submit)
    status = sub.add_parser("status", help="state, progress and newest checkpoint of a job (default: the newest)")
    status.add_argument("job", nargs="?", metavar="JOB", help="job id or run name")
    _common(status)
    logs = sub.add_parser("logs", help="the job's output")
    logs.add_argument("job", metavar="JOB")
    logs.add_argument("--follow", action="store_true", help="stream until the job ends")
    _common(logs)
    stop = sub.add_parser("stop", help="stop a running job")
    stop.add_argument("job", metavar="JOB")
    _common(stop)
    resume = sub.add_parser("resume", help="resubmit a run so it continues from its newest checkpoint")
    resume.add_argument("run", metavar="RUN_NAME")
    resume.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a field that does not define the job (epochs, lr, workers...)")
    resume.add_argument("--storage", default=None,
                        help="where the run lives (the spec's run.storage; default: from its last job on the cluster)")
    _submitting(resume)
    _common(resume)
    listing = sub.add_parser("list", help="alexray jobs on the cluster")
    listing.add_argument("--all", action="store_true", help="every job, not only alexray's")
    _common(listing)
    return p


def _follow_to_end(args, job_id: str) -> int:
    """Live progress until the job ends; 0 only if it succeeded."""
    from . import jobs
    from .follow import describe, follow

    final = follow(args.address, job_id, insecure=args.insecure)
    if final["status"] == "SUCCEEDED":
        print(f"run {final['run_name']} succeeded: {describe(final)}")
        if final.get("newest_checkpoint"):
            print(f"newest checkpoint: {final['newest_checkpoint']}")
        return 0
    raise JobError(f"job {job_id} (run {final['run_name']}) {final['status']}: "
                   f"{jobs.failure_reason(final['message'])}; see 'alexray logs {job_id}'", exit_code=1)


def main(argv: list[str]) -> int:
    from . import jobs

    args = _parser().parse_args(argv)
    try:
        if args.command == "submit":
            job_id, run_name = jobs.submit(args.spec, args.overrides, args.address, args.insecure, python=args.python,
                                           check_resources=not args.no_resource_check)
            print(f"job {job_id}\nrun {run_name}", flush=True)
            if args.wait:
                return _follow_to_end(args, job_id)
        elif args.command == "resume":
            result = jobs.resume(args.address, args.run, args.overrides, storage=args.storage,
                                 insecure=args.insecure, python=args.python,
                                 check_resources=not args.no_resource_check)
            start = (f"from {result['checkpoint']} (step {result['step']})" if result["checkpoint"]
                     else "from step 0 (it had no checkpoint yet)")
            print(f"job {result['job_id']}\nrun {result['run_name']}\nresumes {start}", flush=True)
            if args.wait:
                return _follow_to_end(args, result["job_id"])
        elif args.command == "status":
            print(json.dumps(jobs.status(args.address, args.job, insecure=args.insecure), indent=1, default=str))
        elif args.command == "logs":
            text = jobs.logs(args.address, args.job, follow=args.follow, insecure=args.insecure)
            if not args.follow:
                print(text, end="")
        elif args.command == "stop":
            print(json.dumps(jobs.stop(args.address, args.job, insecure=args.insecure), indent=1, default=str))
        else:
            for job in jobs.list_jobs(args.address, insecure=args.insecure, all_jobs=args.all):
                print(f"{job['job_id']}\t{job['status']}\t{job['run_name'] or ''}")
    except AlexrayError as e:
        print(f"alexray {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0
