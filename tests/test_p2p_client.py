"""P2PClient with a real host process: silo reporting, non-blocking calls, supervised restarts."""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from swarmnode.config import P2PConfig
from swarmnode.identity import Identity
from swarmnode.p2p.client import P2PClient
from swarmnode.p2p.ipc import Deliver
from swarmnode.wire import Kind


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.integration
def test_lonely_node_reports_silo_and_supervisor_restarts_killed_host_with_same_peer_id(
    short_tmp: Path, free_port: Callable[[], int]
) -> None:
    key = short_tmp / "node.key"
    peer_id = Identity.load_or_create(key).peer_id
    unreachable = [f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{Identity.generate().peer_id}" for _ in range(2)]
    cfg = P2PConfig(listen=[f"/ip4/127.0.0.1/tcp/{free_port()}"], bootstrap=unreachable)
    client = P2PClient(cfg, key, short_tmp / "run", publish_queue=4)
    client.start()
    try:
        assert client.wait_ready(timeout=30), (short_tmp / "run" / "p2p-host.log").read_text()
        assert stat.S_IMODE(os.stat(client.socket_path).st_mode) == 0o600
        status = client.status()
        assert status.peer_id == peer_id
        assert status.silo and status.host_running and not status.peers

        # Calls from the training loop never wait on the network: with nobody listening, a full
        # queue makes publish() return False (counted) instead of blocking. Run in a thread so a
        # blocking call fails the test (bounded join) instead of hanging it.
        results: list[bool] = []
        drained: list[object] = []

        def training_loop_calls() -> None:
            results.extend(client.publish(Kind.ROLLOUT_BATCH, b"x" * 1000) for _ in range(50))
            drained.extend(client.drain(10))

        caller = threading.Thread(target=training_loop_calls, daemon=True)
        caller.start()
        caller.join(timeout=30)
        assert not caller.is_alive(), "publish() or drain() blocked"
        assert len(results) == 50 and drained == []
        assert results.count(True) >= 4
        assert client.status().drops["node_publish_queue_full"] == results.count(False)

        first_pid = client.host_pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        assert _wait_for(lambda: client.status().restarts == 1 and client.host_pid != first_pid, 10)
        old_snapshot_at = client.status().snapshot_at
        assert _wait_for(
            lambda: client.status().snapshot_at > old_snapshot_at and client.status().host_running, 30
        )
        assert client.status().peer_id == peer_id
    finally:
        client.stop()
    assert client._proc is not None and client._proc.poll() is not None
    assert not client.socket_path.exists()


def test_one_forwarding_connection_gets_at_most_a_quarter_of_the_receive_queue(short_tmp: Path) -> None:
    """A flood over one connection (e.g. sybil authors) cannot crowd out what other peers deliver."""
    client = P2PClient(P2PConfig(receive_queue=8), short_tmp / "k", short_tmp / "run")

    def deliver(forwarder: str, n: int) -> None:
        for i in range(n):
            client._on_frame(
                Deliver("ROLLOUT_BATCH", b"x", f"author-{i}", f"{forwarder}-{i}", 0.0, forwarder)
            )

    deliver("flooder", 5)
    deliver("honest", 2)
    assert client.status().drops["node_receive_forwarder_share"] == 3
    got = client.drain()
    assert [r.forwarder for r in got] == ["flooder", "flooder", "honest", "honest"]
    deliver("flooder", 2)  # draining gave the flooder its share back
    assert [r.forwarder for r in client.drain()] == ["flooder", "flooder"]
    deliver("", 6)  # a host that names no forwarder is only bounded by the queue itself
    assert len(client.drain()) == 6 and client.status().drops["node_receive_queue_full"] == 0
