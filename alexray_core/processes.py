"""Is the process that left a record (a lease, a scratch folder, a metrics target) still running?

A record names its process by pid, and a pid is reused once the process is gone: a record that
also keeps the process's start time (``start_ticks``) is told apart from a later process that got
the same pid. Linux only for the start time (``/proc``); elsewhere it is unknown and not compared.
"""

from __future__ import annotations

import os


def start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot, as ``/proc/PID/stat`` gives it; "" when unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def alive(pid: int, started: str = "") -> bool:
    """Whether process ``pid`` of this machine is running (another user's counts). With ``started``,
    its ``start_ticks`` when the record was made, a process that started at another time has only
    reused the pid: the recorded one is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    return not started or start_ticks(pid) in ("", started)
