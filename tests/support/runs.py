"""A training run seen from outside: the step its progress file has reached, and the end of its command."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def progress_step(run_dir: Path) -> int:
    """The step ``run_dir/progress.json`` reports, or -1 while it is not there or is being rewritten."""
    try:
        return json.loads((Path(run_dir) / "progress.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def finish(proc: subprocess.Popen, timeout: float = 420) -> str:
    """Wait for ``proc`` to exit and return its stdout; fail, showing the tail of its stderr (or of its
    stdout where stderr goes there), when it exits non-zero or has not ended after ``timeout``
    seconds (it is killed then)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"training did not finish in {timeout} s:\n{(out if err is None else err)[-4000:]}")
    assert proc.returncode == 0, (out if err is None else err)[-4000:]
    return out
