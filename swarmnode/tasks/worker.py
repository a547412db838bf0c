"""Scoring peers' completions in an isolated worker process that holds nothing worth stealing.

The node process holds the identity key, the admin token and the model. Peer text is scored in a
separate ``python -m swarmnode.tasks.worker`` process instead (docs/SCORING_SAFETY.md):

- started with ``exec`` (never a fork of the node), so no key, token or model is in its memory;
  its environment is scrubbed to a few harmless variables (``SWARMNODE__*`` secrets stay out), its
  working directory is a fresh temporary directory, and it inherits no descriptors but its two
  pipes (``close_fds``; stderr goes to /dev/null);
- it sets its own limits before it reads any request: ``RLIMIT_AS`` (memory), ``RLIMIT_FSIZE = 0``
  (it cannot write a byte to any file), ``RLIMIT_CORE = 0``, and per request ``RLIMIT_CPU`` = CPU
  used so far + the group's CPU budget, so a group that spins is killed by the kernel (SIGXCPU);
- the node waits for each answer with a wall-clock deadline as a backstop, kills the worker when
  it is late or dead, and starts a fresh one for the next group.

The grammar check (`swarmnode.tasks.safety`) already keeps peer text away from scorers that could
execute it; the worker is the second wall, for the scorer bugs nobody has found yet. It does not
hide the file system (same user): confining that needs a separate uid or seccomp, see the docs.

Protocol on the pipes: 4-byte big-endian length, then a JSON object. The worker first sends
``{"ready": true}``; requests are ``{"ref": [...], "completions": [...]}``; answers
``{"rewards": [...], "cpu_s": float}`` or ``{"error": str}``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from swarmnode.tasks.reference import TaskRef

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 16 * 1024 * 1024  # a request carries at most one group's completions
# The only variables the worker sees: no SWARMNODE__* (admin token), no proxies, no HOME of the user.
_PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TZ")


class ScoreStatus(StrEnum):
    OK = "ok"
    OVER_BUDGET = "over_budget"  # killed by a signal (CPU limit, memory, crash) or late: the sender's fault
    ERROR = "error"  # the worker answered with an error, or died otherwise: not blamed on the sender


@dataclass(frozen=True)
class WorkerScore:
    status: ScoreStatus
    rewards: tuple[float, ...] = ()
    detail: str = ""


@dataclass(frozen=True)
class WorkerLimits:
    cpu_s_per_group: float = 2.0  # RLIMIT_CPU margin per request (rounded up to whole seconds)
    wall_s_per_group: float = 20.0  # backstop on a machine so loaded that CPU time lags wall time
    memory_bytes: int = 1 << 30  # RLIMIT_AS
    lifetime_cpu_s: int = 3600  # hard RLIMIT_CPU; the worker is replaced before it gets there
    start_timeout_s: float = 120.0  # importing reasoning-gym on a loaded 2-core machine
    start_retry_s: float = 30.0  # after a failed start, groups fail fast (scoring_error) this long


class ScoringWorker:
    """The node-side handle of the scoring worker: `score(ref, completions)`, restarts as needed."""

    def __init__(self, registry_args: dict[str, Any], limits: WorkerLimits | None = None) -> None:
        self.registry_args = registry_args
        self.limits = limits or WorkerLimits()
        self.counts: Counter[str] = Counter()  # started, over_budget, errors, recycled
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._cpu_used = 0.0
        self._retry_at = 0.0  # monotonic time before which a failed start is not retried

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> None:
        """Start the worker now (otherwise the first `score` does); raises RuntimeError if it fails."""
        if self.pid is not None:
            return
        if time.monotonic() < self._retry_at:
            raise RuntimeError("the scoring worker failed to start recently; retrying later")
        self._stop_process()
        self._workdir = tempfile.TemporaryDirectory(prefix="swarmnode-scorer-")
        env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
        env.update(
            HOME=self._workdir.name,
            TMPDIR=self._workdir.name,
            PYTHONDONTWRITEBYTECODE="1",
            PYTHONPATH=str(Path(__file__).resolve().parents[2]),
            OMP_NUM_THREADS="1",
            OPENBLAS_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
        )
        limits = {
            "memory_bytes": self.limits.memory_bytes,
            "lifetime_cpu_s": self.limits.lifetime_cpu_s,
            "cpu_s_per_group": self.limits.cpu_s_per_group,
        }
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-s",
                "-P",
                "-m",
                "swarmnode.tasks.worker",
                json.dumps(self.registry_args),
                json.dumps(limits),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=self._workdir.name,
            close_fds=True,
            start_new_session=True,  # a Ctrl-C on the node's terminal is the node's to handle
        )
        self._cpu_used = 0.0
        self.counts["started"] += 1
        reply = self._read(self.limits.start_timeout_s)
        if reply is None or not reply.get("ready"):
            detail = (reply or {}).get("error", "no ready message")
            self._stop_process()
            self._retry_at = time.monotonic() + self.limits.start_retry_s
            raise RuntimeError(
                f"the scoring worker did not start: {detail}; check that `{sys.executable} -m "
                "swarmnode.tasks.worker` can import swarmnode and reasoning-gym in this environment"
            )

    def close(self) -> None:
        self._stop_process()

    def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    # -- scoring -------------------------------------------------------------------------------
    def score(self, ref: TaskRef, completions: Sequence[str]) -> WorkerScore:
        """Rewards of a peer's completions for `ref`, or why there are none."""
        request = {"ref": list(dataclasses.astuple(ref)), "completions": list(completions)}
        reply = self._request(request, ref.key())
        if isinstance(reply, WorkerScore):
            return reply
        rewards = tuple(float(r) for r in reply.get("rewards", ()))
        if len(rewards) != len(completions):
            return self._fail(ScoreStatus.ERROR, "worker answered with the wrong number of rewards")
        return WorkerScore(ScoreStatus.OK, rewards)

    def probe(self, kind: str) -> dict[str, Any] | WorkerScore:
        """Ask the worker about itself, for tests and diagnostics: "self" (its environment,
        descriptors, working directory, and whether it can write a file), "memory" (try to allocate
        2 GiB) or "spin" (burn CPU until the kernel stops it, as a CPU bomb would)."""
        return self._request({"probe": kind}, f"probe {kind}")

    def _request(self, request: dict[str, Any], label: str) -> dict[str, Any] | WorkerScore:
        try:
            self.start()
        except (RuntimeError, OSError) as exc:
            self.counts["errors"] += 1
            return WorkerScore(ScoreStatus.ERROR, detail=str(exc))
        assert self._proc is not None and self._proc.stdin is not None
        try:
            _write_frame(self._proc.stdin, request)
        except (BrokenPipeError, OSError, ValueError) as exc:
            return self._fail(ScoreStatus.ERROR, f"worker pipe closed: {exc}")
        reply = self._read(self.limits.wall_s_per_group)
        if reply is None:
            code = self._proc.poll()
            # Python errors are caught inside the worker, so a worker killed by a signal while it
            # scored this group (CPU limit, memory, a crash in C code) was killed by the group.
            if code is None or code < 0:
                why = "past its deadline" if code is None else f"until killed by {_signal_name(-code)}"
                return self._fail(ScoreStatus.OVER_BUDGET, f"{label} ran {why}")
            return self._fail(ScoreStatus.ERROR, f"scoring worker exited with {code} on {label}")
        if "error" in reply:
            self.counts["errors"] += 1
            return WorkerScore(ScoreStatus.ERROR, detail=str(reply["error"]))
        self._cpu_used = float(reply.get("cpu_s", 0.0))
        if self._cpu_used > self.limits.lifetime_cpu_s - 2 * self.limits.cpu_s_per_group - 2:
            self.counts["recycled"] += 1
            self._stop_process()  # near its hard CPU limit: the next request starts a fresh one
        return reply

    def _fail(self, status: ScoreStatus, detail: str) -> WorkerScore:
        self.counts["over_budget" if status is ScoreStatus.OVER_BUDGET else "errors"] += 1
        self._stop_process()  # kill it (it may still be spinning) and start afresh next time
        return WorkerScore(status, detail=detail)

    def _read(self, timeout_s: float) -> dict[str, Any] | None:
        """One frame from the worker, or None on timeout, EOF or garbage."""
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        fd = self._proc.stdout.fileno()
        buffer = b""
        needed = _HEADER.size
        length: int | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, max(needed - len(buffer), 1))
            if not chunk:
                return None
            buffer += chunk
            if len(buffer) < needed:
                continue
            if length is None:
                (length,) = _HEADER.unpack(buffer)
                if length > MAX_FRAME_BYTES:
                    return None
                buffer, needed = b"", length
                if length:
                    continue
            try:
                message = json.loads(buffer)
            except ValueError:
                return None
            return message if isinstance(message, dict) else None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _write_frame(stream: IO[bytes], message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


# -- the worker process --------------------------------------------------------------------------


def _read_frame(stream: IO[bytes]) -> dict[str, Any] | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        return None
    message = json.loads(stream.read(length))
    return message if isinstance(message, dict) else None


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _set_cpu_limit(budget_s: float, hard_s: int) -> None:
    import resource

    soft = min(hard_s, math.ceil(_cpu_seconds() + budget_s))
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard_s))


def _probe(kind: str) -> dict[str, Any]:
    if kind == "spin":
        while True:  # a CPU bomb: only RLIMIT_CPU (or the node's deadline) ends it
            pass
    if kind == "memory":  # a memory bomb of 2 GiB: RLIMIT_AS makes it a MemoryError
        try:
            block = bytearray(2 << 30)
            return {"allocated": len(block)}
        except MemoryError:
            return {"allocated": 0}
    try:
        with open("probe-write.txt", "w") as fh:
            fh.write("x")
            fh.flush()
        can_write = True
    except OSError:
        can_write = False
    return {
        "environ": dict(os.environ),
        "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
        "cwd": os.getcwd(),
        "can_write_files": can_write,
        "cpu_s": _cpu_seconds(),
    }


def worker_main(registry_json: str, limits_json: str) -> int:
    import resource

    limits = json.loads(limits_json)
    # Limits first, before any import that peer text could later reach.
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write then fails with EFBIG instead of killing us
    hard_cpu = math.ceil(_cpu_seconds()) + int(limits["lifetime_cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (hard_cpu, hard_cpu))

    # The protocol gets private copies of the pipes; fds 0 and 1 point at /dev/null so a library
    # that prints (reasoning-gym's bf generator prints dots) cannot corrupt a frame.
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process

    try:
        from swarmnode.tasks.registry import TaskRegistry

        registry = TaskRegistry.from_rebuild_args(json.loads(registry_json))
    except Exception as exc:  # reported to the node, which says what to fix
        _write_frame(replies, {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    _write_frame(replies, {"ready": True})

    while True:
        request = _read_frame(requests)
        if request is None:
            return 0
        _set_cpu_limit(float(limits["cpu_s_per_group"]), hard_cpu)
        if "probe" in request:
            _write_frame(replies, _probe(str(request["probe"])))
            continue
        try:
            ref = TaskRef(*request["ref"])
            task = registry.regenerate(ref)
            rewards = [registry.score(task, str(text), foreign=True) for text in request["completions"]]
            reply: dict[str, Any] = {"rewards": rewards, "cpu_s": _cpu_seconds()}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        _write_frame(replies, reply)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1], sys.argv[2]))
