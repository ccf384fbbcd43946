"""Follow a submitted run to its end with live progress: epoch, step, images/s, loss, val top-1.

Progress comes from the run directory (``progress.json``, written by rank 0 every
``train.log_every`` steps) and the job's state from the Jobs API, polled once a second. On a
terminal it is a progress bar with rate and ETA; otherwise one plain line per epoch and at most
one every ``quiet_every`` seconds, so CI logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import IO

from alexray_core import runs
from alexray_core.errors import AlexrayError
from alexray_core.spec import planned_steps, spec_from_dict
from alexray_core.storage import open_storage

from . import jobs, rayclient
from .rayclient import JobError


def _total_steps(storage: str, run_name: str, progress: dict) -> int | None:
    """Steps the run will take, from its spec.json; None while that is not known."""
    per_epoch = progress.get("steps_per_epoch")
    if not per_epoch:
        return None
    run_dir = runs.run_dir(storage, run_name)
    try:
        recorded = runs.RunFiles(run_dir, open_storage(run_dir)).spec()
        spec = spec_from_dict(recorded) if recorded is not None else None
    except (AlexrayError, OSError):  # unreadable storage, or a spec this version cannot read
        return None
    return planned_steps(spec, per_epoch) if spec is not None else None


def describe(progress: dict) -> str:
    """``epoch 3, step 120, 840 img/s, loss 0.4123, val top-1 91.2%`` from whatever is known yet."""
    shown = (("epoch", "epoch {}"), ("step", "step {}"), ("images_per_s", "{:.0f} img/s"),
             ("flops_per_s", "{}"), ("mfu", "MFU {:.1%}"), ("loss", "loss {:.4f}"))
    parts = [form.format(format_flops(progress[key]) if key == "flops_per_s" else progress[key])
             for key, form in shown if progress.get(key) is not None]
    if progress.get("top1") is not None:
        parts.append(f"val top-1 {100 * progress['top1']:.1f}%")
    elif progress.get("best_top1") is not None:
        parts.append(f"best val top-1 {100 * progress['best_top1']:.1f}%")
    if progress.get("restarts"):
        parts.append(f"{progress['restarts']} restart(s)")
    if progress.get("goodput"):
        parts.append(f"goodput {progress['goodput']['goodput']:.0%}")
    return ", ".join(parts)


def describe_goodput(block: dict | None) -> str:
    """``goodput 61% of 2 workers x 0:01:40: productive 61%, startup 30%, evaluation 5%, ...``."""
    if not block:
        return "no goodput account"
    shares = sorted(((f, c) for c, f in block["fractions"].items() if f >= 0.0005), reverse=True)
    wall = int(round(block["wall_seconds"]))
    return (f"goodput {block['goodput']:.0%} of {block['slots']} worker(s) x {wall // 3600}:{wall // 60 % 60:02d}:"
            f"{wall % 60:02d}: " + ", ".join(f"{c.replace('_', ' ')} {f:.1%}" for f, c in shares))


_DECIMAL = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
_BINARY = ((2.0 ** 50, "Pi"), (2.0 ** 40, "Ti"), (2.0 ** 30, "Gi"), (2.0 ** 20, "Mi"), (2.0 ** 10, "Ki"))
# The units that take an SI prefix themselves, and theirs; any other (a count such as img/s) carries
# the decimal prefixes on its number.
_PREFIXED = {"FLOP/s": _DECIMAL, "s": ((1.0, ""), (1e-3, "m"), (1e-6, "µ"), (1e-9, "n")),
             "B": _BINARY, "B/s": _BINARY}


def format_si(value: float | None, unit: str = "") -> str:
    """A value with its unit, SI-prefixed: ``8.6 GFLOP/s``, ``150 ms``, ``512 MiB``, ``1.2k img/s``;
    '-' when unknown. The dashboard page's ``fmt`` (orchestrator/static/dashboard.html) follows the
    same rules, so the page and the terminal show a figure alike."""
    if value is None or value != value:  # None or NaN
        return "-"
    factor, prefix = next(((f, p) for f, p in _PREFIXED.get(unit, _DECIMAL) if abs(value) >= f), (1.0, ""))
    n = value / factor
    if abs(n) >= 100:
        text = f"{n:.0f}"
    elif abs(n) >= 1 and unit:  # a bare number (a loss) keeps three digits
        text = f"{n:.1f}".removesuffix(".0")
    else:
        text = f"{n:.3g}"
    if unit in _PREFIXED:
        return f"{text} {prefix}{unit}"
    return text + prefix + (f" {unit}" if unit else "")


def format_flops(value: float | None) -> str:
    """1.23e12 -> '1.2 TFLOP/s'; '-' when unknown."""
    return format_si(value, "FLOP/s")


def follow(address, job_id: str, *, insecure: bool = False, timeout: float | None = None, poll: float = 1.0,
           out: IO[str] | None = None, bar: bool | None = None, quiet_every: float = 15.0) -> dict:
    """Show the job's progress until it ends; returns its final ``jobs.status`` dict.

    ``bar``: a progress bar (True), plain lines (False), or a bar only on a terminal (None).
    """
    from tqdm import tqdm

    out = sys.stderr if out is None else out
    if bar is None:
        bar = hasattr(out, "isatty") and out.isatty()
    job_client = rayclient.client(address, insecure)
    deadline = None if timeout is None else time.monotonic() + timeout
    shown_state, last_line, last_epoch, progress_bar = None, 0.0, None, None
    try:
        while True:
            status = jobs.status(job_client, job_id)
            state = status["status"]
            if state != shown_state:
                if progress_bar is None or state in jobs.TERMINAL:
                    (progress_bar.write if progress_bar else lambda s: print(s, file=out, flush=True))(
                        f"job {status['job_id']} (run {status['run_name']}): {state}")
                shown_state = state
            if status.get("step") is not None:
                if bar and progress_bar is None:
                    total = _total_steps(status["storage"], status["run_name"], status) if status["storage"] else None
                    progress_bar = tqdm(total=total, unit="step", file=out, dynamic_ncols=True,
                                        desc=status["run_name"], initial=0)
                if progress_bar is not None:
                    progress_bar.update(max(0, status["step"] - progress_bar.n))
                    progress_bar.set_postfix_str(describe(status), refresh=True)
                elif status.get("epoch") != last_epoch or time.monotonic() - last_line > quiet_every:
                    print(f"  {describe(status)}", file=out, flush=True)
                    last_line, last_epoch = time.monotonic(), status.get("epoch")
            if state in jobs.TERMINAL:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise JobError(f"job {job_id} is still {state} after {timeout:g} s; follow it with "
                               f"'alexray logs --follow {job_id}'", exit_code=1)
            time.sleep(poll)
    finally:
        if progress_bar is not None:
            progress_bar.close()
