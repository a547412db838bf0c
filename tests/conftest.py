"""Shared fixtures for tests that start real processes on loopback: free ports and cleanup by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """Processes a test started; every one still alive at teardown is killed by its PID."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], log_path: Path, **kwargs: object) -> subprocess.Popen[bytes]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                [sys.executable, *args], stdout=log_file, stderr=subprocess.STDOUT, env=env, **kwargs
            )
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture
def processes() -> Iterator[Processes]:
    group = Processes()
    try:
        yield group
    finally:
        group.kill_all()


@pytest.fixture
def free_port() -> Callable[[], int]:
    """Call it for each TCP port a test needs on 127.0.0.1."""
    return free_tcp_port


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: Unix socket paths must stay under ~100 characters.

    Set SWARMNODE_KEEP_TEST_DIRS=1 to keep it (node logs, JSON lines) for debugging.
    """
    path = Path(tempfile.mkdtemp(prefix="sn-", dir="/tmp"))
    yield path
    if not os.environ.get("SWARMNODE_KEEP_TEST_DIRS"):
        shutil.rmtree(path, ignore_errors=True)
