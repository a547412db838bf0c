"""The node's handle on the network: spawns, supervises and talks to the libp2p host process.

The training loop calls :class:`P2PClient` methods that never wait on the network: ``publish``
enqueues (or drops and counts when full), ``drain`` takes what has arrived, ``status`` returns the
host's latest snapshot. Three daemon threads do the rest: a reader (accepts the host's connection
on the run directory's Unix socket, decodes frames), a writer (sends queued frames) and a
supervisor (restarts the host with backoff if it dies; the key file keeps the peer id).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from swarmnode.config import P2PConfig
from swarmnode.p2p.ipc import (
    Deliver,
    Frame,
    FrameDecoder,
    IPCError,
    P2PStatus,
    Publish,
    Report,
    Shutdown,
    Snapshot,
    encode_frame,
)

log = logging.getLogger(__name__)

SOCKET_NAME = "p2p.sock"
HOST_LOG_NAME = "p2p-host.log"
HOST_CONFIG_NAME = "p2p-host.json"
BAN_FILE_NAME = "p2p-bans.json"  # the host's bans, kept across host restarts
P2P_STATUS_FILE = "p2p-status.json"  # the host's last counts, written by the node when it stops
# One forwarding connection may hold at most this fraction of the receive queue, so a flood over
# one connection (e.g. sybil identities) cannot crowd out what honest peers deliver.
FORWARDER_QUEUE_SHARE = 0.25
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
STABLE_AFTER_S = 30.0  # a host that ran this long resets the restart backoff
MAX_SOCKET_PATH = 100  # bytes; the kernel's limit for a Unix socket path is 108


@dataclass(frozen=True)
class Received:
    """A message another peer published, accepted by the host's validation pipeline."""

    kind: str
    data: bytes  # the signed envelope, as published
    origin: str  # the envelope's author: the peer id of its verified signer
    msg_id: str  # hex content-addressed message id
    received_at: float  # wall-clock time the host accepted it
    forwarder: str = ""  # the connected peer that delivered it
    arrived_at: float = 0.0  # wall-clock time this process read it from the host


def _kind_name(kind: enum.Enum | str) -> str:
    return kind.name if isinstance(kind, enum.Enum) else str(kind)


class P2PClient:
    """Runs ``python -m swarmnode.p2p.host`` as a supervised child process and talks to it."""

    def __init__(
        self,
        cfg: P2PConfig,
        key_path: Path,
        run_dir: Path,
        *,
        publish_queue: int = 64,
        python: str = sys.executable,
    ) -> None:
        self.cfg = cfg
        self.key_path = Path(key_path)
        self.run_dir = Path(run_dir)
        self.socket_path = self.run_dir / SOCKET_NAME
        self._socket_dir: Path | None = None  # a short private directory when run_dir is too deep
        self._python = python
        self._outbox: queue.Queue[Frame | None] = queue.Queue(maxsize=publish_queue)
        self._inbox: queue.Queue[Received] = queue.Queue(maxsize=cfg.receive_queue)
        self._inbox_by_forwarder: dict[str, int] = {}  # items in the inbox per forwarder (reader/drain)
        self._inbox_lock = threading.Lock()
        self._forwarder_share = max(1, int(cfg.receive_queue * FORWARDER_QUEUE_SHARE))
        self._drops = {
            "node_publish_queue_full": 0,
            "node_receive_queue_full": 0,
            "node_receive_forwarder_share": 0,
            "ipc_send_failed": 0,
        }
        self._drops_lock = threading.Lock()
        self._snapshot: dict = {}
        self._restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: socket.socket | None = None
        self._conn_ready = threading.Event()
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Spawn the host process and the reader, writer and supervisor threads."""
        if self._listener is not None:
            raise RuntimeError("P2PClient.start() called twice; create a new client instead")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if len(str(self.socket_path)) > MAX_SOCKET_PATH:
            # Unix socket paths are limited to ~108 bytes; a deep data directory (a simulation's
            # runs/<config>/seed-<s>/node-<i>) gets a private short directory instead.
            self._socket_dir = Path(tempfile.mkdtemp(prefix="swarmnode-p2p-"))
            self.socket_path = self._socket_dir / SOCKET_NAME
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is created 0600: only this user may talk to the host
        try:
            listener.bind(str(self.socket_path))
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o600)
        listener.listen(1)
        listener.settimeout(0.5)
        self._listener = listener
        (self.run_dir / HOST_CONFIG_NAME).write_text(self.cfg.model_dump_json(indent=2))
        self._spawn_host()
        for target in (self._read_loop, self._write_loop, self._supervise_loop):
            thread = threading.Thread(target=target, name=f"p2p-{target.__name__.strip('_')}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the host to shut down, wait up to ``timeout`` seconds, then kill it; join threads."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self._outbox.put_nowait(None)  # wakes the writer; a full queue means it is not waiting
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sendall(encode_frame(Shutdown()))
        proc = self._proc
        if proc is not None:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("p2p host pid %d did not stop in %.1f s; killing it", proc.pid, timeout)
                proc.kill()
                proc.wait(timeout=timeout)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=timeout)
        if conn is not None:
            conn.close()
        if self._listener is not None:
            self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        if self._socket_dir is not None:
            with contextlib.suppress(OSError):
                self._socket_dir.rmdir()

    def wait_ready(self, timeout: float = 30.0) -> bool:
        """Block (at start-up only, never in the loop) until the host sent its first snapshot."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stopping.is_set():
            if self._snapshot:
                return True
            time.sleep(0.05)
        return bool(self._snapshot)

    @property
    def host_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # ----------------------------------------------------------------- the node's calls
    def publish(self, kind: enum.Enum | str, envelope: bytes) -> bool:
        """Queue a signed envelope for publishing; False (and a counted drop) if the queue is full."""
        return self._enqueue(Publish(kind=_kind_name(kind), data=envelope, queued_at=time.time()))

    def report(self, peer_id: str, reason: enum.Enum | str, msg_id: str = "") -> bool:
        """Tell the host an author sent something the node rejected after its own checks.

        With the message's ``msg_id`` (``Received.msg_id``) the host also penalizes the peer that
        forwarded it (a fraction of the penalty), which is what stops sybil authors behind one
        connection.
        """
        reason_text = reason.value if isinstance(reason, enum.Enum) else str(reason)
        return self._enqueue(Report(peer_id=peer_id, reason=reason_text, msg_id=msg_id))

    def drain(self, max_items: int = 1 << 30, timeout: float = 0.0) -> list[Received]:
        """Take up to ``max_items`` received messages.

        With ``timeout`` > 0, block up to that many seconds for the first one (woken the moment it
        arrives) instead of polling: a sleep-and-poll loop in each of N node processes costs CPU and
        GIL hand-offs that the host processes need during a burst of deliveries.
        """
        items: list[Received] = []
        if timeout > 0 and max_items > 0:
            try:
                items.append(self._inbox.get(timeout=timeout))
            except queue.Empty:
                return items
        while len(items) < max_items:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        with self._inbox_lock:
            for item in items:
                left = self._inbox_by_forwarder.get(item.forwarder, 0) - 1
                if left > 0:
                    self._inbox_by_forwarder[item.forwarder] = left
                else:
                    self._inbox_by_forwarder.pop(item.forwarder, None)
        return items

    def status(self) -> P2PStatus:
        """The host's latest snapshot plus node-side counters; never waits."""
        with self._drops_lock:
            drops = dict(self._drops)
        proc = self._proc
        return P2PStatus.from_snapshot(
            self._snapshot,
            drops=drops,
            restarts=self._restarts,
            host_running=proc is not None and proc.poll() is None and self._conn is not None,
        )

    # ----------------------------------------------------------------- internals
    def _count_drop(self, place: str) -> None:
        with self._drops_lock:
            self._drops[place] += 1

    def _enqueue(self, frame: Frame) -> bool:
        try:
            self._outbox.put_nowait(frame)
            return True
        except queue.Full:
            self._count_drop("node_publish_queue_full")
            return False

    def _spawn_host(self) -> None:
        cmd = [
            self._python, "-m", "swarmnode.p2p.host",
            "--config", str(self.run_dir / HOST_CONFIG_NAME),
            "--key", str(self.key_path),
            "--ipc", str(self.socket_path),
            "--ban-file", str(self.run_dir / BAN_FILE_NAME),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.run_dir / HOST_LOG_NAME, "ab") as log_file:
            self._proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        log.info("p2p host started (pid %d), log in %s", self._proc.pid, self.run_dir / HOST_LOG_NAME)

    def _supervise_loop(self) -> None:
        """Wait for the host process to exit (blocked in ``waitpid``: no CPU while it runs; polling
        it 5 times a second cost each node ~0.5 ms of CPU per second in the gossip bench) and
        restart it with backoff unless ``stop()`` ended it."""
        attempt = 0
        started = time.monotonic()
        while not self._stopping.is_set():
            proc = self._proc
            if proc is None:
                self._stopping.wait(0.2)
                continue
            proc.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started > STABLE_AFTER_S:
                attempt = 0
            delay = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]
            log.warning(
                "p2p host pid %d exited with %s; restarting in %.1f s", proc.pid, proc.returncode, delay
            )
            if self._stopping.wait(delay):
                return
            self._restarts += 1
            attempt += 1
            started = time.monotonic()
            self._spawn_host()

    def _read_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed by stop()
            conn.settimeout(None)  # stop() unblocks recv() by shutting the socket down
            old, self._conn = self._conn, conn
            if old is not None:
                old.close()
            self._conn_ready.set()
            self._read_frames(conn)
            if self._conn is conn:
                self._conn = None
                self._conn_ready.clear()
            conn.close()

    def _read_frames(self, conn: socket.socket) -> None:
        decoder = FrameDecoder()
        while not self._stopping.is_set():
            try:
                chunk = conn.recv(1 << 16)
            except OSError:
                return
            if not chunk:
                return
            try:
                for frame in decoder.feed(chunk):
                    self._on_frame(frame)
            except IPCError as exc:
                log.error("bad frame from the p2p host, dropping the connection: %s", exc)
                return

    def _on_frame(self, frame: Frame) -> None:
        if isinstance(frame, Deliver):
            item = Received(
                frame.kind,
                frame.data,
                frame.origin,
                frame.msg_id,
                frame.received_at,
                frame.forwarder,
                time.time(),
            )
            with self._inbox_lock:
                held = self._inbox_by_forwarder.get(item.forwarder, 0)
                if item.forwarder and held >= self._forwarder_share:
                    self._count_drop("node_receive_forwarder_share")
                    return
                try:
                    self._inbox.put_nowait(item)
                except queue.Full:
                    self._count_drop("node_receive_queue_full")
                    return
                self._inbox_by_forwarder[item.forwarder] = held + 1
        elif isinstance(frame, Snapshot):
            self._snapshot = frame.status

    def _write_loop(self) -> None:
        pending: Frame | None = None
        while not self._stopping.is_set():
            if pending is None:
                pending = self._outbox.get()  # stop() wakes it with None
                if pending is None:
                    continue
            if not self._conn_ready.wait(0.5):
                continue  # host (re)starting: keep the frame; the queue fills and publish() drops
            conn = self._conn
            if conn is None:
                continue
            try:
                conn.sendall(encode_frame(pending))
            except OSError:
                # A half-sent frame corrupts the stream: drop the connection; the host sees EOF,
                # exits, and the supervisor restarts it.
                self._count_drop("ipc_send_failed")
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            except IPCError as exc:
                log.error("cannot send to the p2p host: %s", exc)
                self._count_drop("ipc_send_failed")
            pending = None
