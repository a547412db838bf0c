"""P2PClient with a real host process: silo reporting, non-blocking calls, supervised restarts."""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from swarmnode.config import P2PConfig
from swarmnode.identity import Identity
from swarmnode.p2p.client import P2PClient
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
    unreachable = [
        f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{Identity.generate().peer_id}" for _ in range(2)
    ]
    cfg = P2PConfig(listen=[f"/ip4/127.0.0.1/tcp/{free_port()}"], bootstrap=unreachable)
    client = P2PClient(cfg, key, short_tmp / "run", publish_queue=4)
    client.start()
    try:
        assert client.wait_ready(timeout=30), (short_tmp / "run" / "p2p-host.log").read_text()
        assert stat.S_IMODE(os.stat(client.socket_path).st_mode) == 0o600
        status = client.status()
        assert status.peer_id == peer_id
        assert status.silo and status.host_running and not status.peers

        # Calls from the training loop return at once even though nobody is listening.
        started = time.monotonic()
        results = [client.publish(Kind.ROLLOUT_BATCH, b"x" * 1000) for _ in range(50)]
        assert client.drain(10) == []
        assert time.monotonic() - started < 0.5
        assert results.count(True) >= 4
        assert client.status().drops["node_publish_queue_full"] == results.count(False)

        first_pid = client.host_pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        assert _wait_for(lambda: client.status().restarts == 1 and client.host_pid != first_pid, 10)
        old_snapshot_at = client.status().snapshot_at
        assert _wait_for(lambda: client.status().snapshot_at > old_snapshot_at and client.status().host_running, 30)
        assert client.status().peer_id == peer_id
    finally:
        client.stop()
    assert client._proc is not None and client._proc.poll() is not None
    assert not client.socket_path.exists()
