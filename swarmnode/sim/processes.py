"""Stopping the processes a simulation started: SIGTERM all, wait once for all, then kill stragglers."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence


def terminate_all(
    procs: Sequence[subprocess.Popen],
    grace_s: float,
    kill: Callable[[subprocess.Popen], None] = subprocess.Popen.kill,
) -> None:
    """SIGTERM every process still running, give them ``grace_s`` together to exit (each may save its
    state), then ``kill`` the ones still there (a process, or its whole group)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill(proc)
            proc.wait(timeout=10)
