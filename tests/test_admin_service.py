"""The admin gRPC service and the operator CLI against an in-memory source, on loopback."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from swarmnode.admin.client import (
    EXIT_UNREACHABLE,
    AdminClient,
    AdminError,
    AdminUnreachable,
    net_command,
    peers_command,
    status_command,
)
from swarmnode.admin.discovery import read_discovery_file, resolve_admin_address, write_discovery_file
from swarmnode.admin.service import AdminServer
from swarmnode.admin.source import EventLog, NetworkNode, NodeStatus, PeerInfo
from swarmnode.config import AdminConfig, ConfigError

REPO = Path(__file__).resolve().parent.parent


class FakeSource:
    """An in-memory AdminSource whose state the tests change between calls."""

    def __init__(self) -> None:
        self.round = 7
        self.events = EventLog(capacity=100)
        self.calls = 0
        self._lock = threading.Lock()

    def status(self) -> NodeStatus:
        with self._lock:
            self.calls += 1
            return NodeStatus(
                name="alpha",
                peer_id="12D3KooWAlpha",
                model_id="embedded:tiny-a",
                round=self.round,
                rounds_target=100,
                recent_rewards=[0.25, 0.5, 0.75],
                uptime_s=12.5,
                silo=False,
                p2p_state="running",
                listen_addrs=["/ip4/127.0.0.1/tcp/4001"],
                data_dir="/tmp/alpha",
                started_at=1_700_000_000.0,
                config_digest="abc123",
                connected_peers=2,
            )

    def peers(self) -> list[PeerInfo]:
        return [
            PeerInfo("12D3KooWBeta", ["/ip4/127.0.0.1/tcp/4002"], 1_700_000_001.0, 10, 4, 2048, 512,
                     {"accepted": 9, "bad_signature": 1}, 3.5),
            PeerInfo("12D3KooWGamma", [], 1_700_000_002.0, 0, 0, 0, 0, {}, 0.0),
        ]  # fmt: skip

    def network(self) -> list[NetworkNode]:
        return [
            NetworkNode("12D3KooWAlpha", "alpha", "embedded:tiny-a", 7, [0.5, 0.75], time.time(),
                        {"groups_sent": 7}, silo=False, peers=2),
            NetworkNode("12D3KooWBeta", "beta", "embedded:tiny-b", 3, [], time.time(), {}, silo=True),
        ]  # fmt: skip

    def events_since(self, cursor: int):
        return self.events.events_since(cursor)


@pytest.fixture
def free_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def source() -> FakeSource:
    return FakeSource()


@pytest.fixture
def server(source: FakeSource):
    with AdminServer(source, AdminConfig(listen="127.0.0.1:0")) as srv:
        yield srv


def test_status_call_returns_the_sources_numbers(server: AdminServer, source: FakeSource) -> None:
    with AdminClient(server.address) as client:
        first = client.status()
        source.round = 8
        second = client.status()
    assert first == dataclasses.replace(source.status(), round=7)
    assert second.round == 8 and second.recent_rewards == [0.25, 0.5, 0.75]
    assert server.address.startswith("127.0.0.1:") and not server.address.endswith(":0")


def test_peers_and_network_calls_round_trip_every_field(server: AdminServer, source: FakeSource) -> None:
    with AdminClient(server.address) as client:
        peers = client.peers()
        nodes = client.network()
    assert peers == source.peers()
    assert peers[0].verdicts == {"accepted": 9, "bad_signature": 1}
    assert [(n.peer_id, n.round, n.silo, n.counters) for n in nodes] == [
        ("12D3KooWAlpha", 7, False, {"groups_sent": 7}),
        ("12D3KooWBeta", 3, True, {}),
    ]


def test_event_stream_delivers_past_and_new_events_then_ends(server: AdminServer, source: FakeSource) -> None:
    source.events.emit("start", "node started", round=0)
    threading.Timer(0.3, lambda: source.events.emit("round", "round 1 done", reward=0.5)).start()
    started = time.monotonic()
    with AdminClient(server.address) as client:
        received = list(client.events(0, max_duration_s=1.2))
    elapsed = time.monotonic() - started
    assert [(e.kind, e.fields) for e, _ in received] == [
        ("start", {"round": "0"}),
        ("round", {"reward": "0.5"}),
    ]
    assert received[-1][1] == 2  # cursor to resume after the last event
    assert 1.0 <= elapsed < 5.0  # the stream is bounded by max_duration_s
    with AdminClient(server.address) as client:
        assert list(client.events(2, max_duration_s=0)) == []


def test_token_is_required_and_checked_when_enforced(source: FakeSource) -> None:
    cfg = AdminConfig(listen="127.0.0.1:0", token="s3cret")
    with AdminServer(source, cfg, require_token=True) as srv:
        assert srv.requires_token
        for token in (None, "wrong"):
            with AdminClient(srv.address, token=token) as client, pytest.raises(AdminError, match="token"):
                client.status()
        with AdminClient(srv.address, token="s3cret") as client:
            assert client.status().name == "alpha"
            assert len(client.peers()) == 2
    assert source.calls == 1  # refused calls never reached the source


def test_server_refuses_to_start_on_non_loopback_without_token(source: FakeSource) -> None:
    with pytest.raises(ConfigError, match="admin.token"):
        AdminServer(source, AdminConfig(listen="0.0.0.0:0"))
    with pytest.raises(ConfigError, match="admin.token"):
        AdminServer(source, AdminConfig(listen="127.0.0.1:0"), require_token=True)
    assert AdminServer(source, AdminConfig(listen="0.0.0.0:0", token="t")).requires_token
    assert not AdminServer(source, AdminConfig(listen="localhost:0")).requires_token


def test_malformed_listen_address_is_a_config_error(source: FakeSource) -> None:
    with pytest.raises(ConfigError, match="admin.listen: expected HOST:PORT"):
        AdminServer(source, AdminConfig(listen="127.0.0.1"))


def test_service_exposes_no_write_methods() -> None:
    from swarmnode.wire.gen import admin_pb2

    methods = {m.name for m in admin_pb2.DESCRIPTOR.services_by_name["Admin"].methods}
    assert methods == {"GetStatus", "ListPeers", "GetNetwork", "StreamEvents"}


def test_status_json_command_prints_the_nodes_status(server: AdminServer, capsys) -> None:
    assert status_command(server.address, as_json=True) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["peer_id"] == "12D3KooWAlpha" and data["round"] == 7 and data["silo"] is False


def test_table_commands_render_rows(server: AdminServer, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at 80 columns when stdout is not a terminal
    assert status_command(server.address) == 0
    assert peers_command(server.address) == 0
    assert net_command(server.address) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and "7 / 100" in out
    assert "bad_signature=1" in out and "2 connected peers" in out
    assert "2 nodes seen" in out and "embedded:tiny-b" in out


def test_watch_refreshes_until_watch_count(server: AdminServer, source: FakeSource, capsys) -> None:
    calls_before = source.calls
    code = status_command(server.address, as_json=True, watch=True, watch_count=3, interval_s=0.05)
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 3 and source.calls - calls_before == 3
    assert all(json.loads(line)["name"] == "alpha" for line in lines)


def test_unreachable_address_gives_one_line_and_exit_code_2(free_port: int, capsys) -> None:
    address = f"127.0.0.1:{free_port}"
    for command in (status_command, peers_command, net_command):
        assert command(address, as_json=True) == EXIT_UNREACHABLE
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.strip() == (
            f"no swarmnode admin service at {address} "
            "(is the node running? start it with `swarmnode run`, or pass --node)"
        )
    with AdminClient(address) as client, pytest.raises(AdminUnreachable):
        client.network()


def test_unreachable_node_from_the_command_line_has_no_traceback(free_port: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "swarmnode.admin.client", "status", "--node", f"127.0.0.1:{free_port}"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=env,
    )  # fmt: skip
    assert proc.returncode == EXIT_UNREACHABLE
    assert proc.stderr.strip().startswith(f"no swarmnode admin service at 127.0.0.1:{free_port} ")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_address_resolution_prefers_flag_then_discovery_file(
    tmp_path: Path, server: AdminServer, capsys
) -> None:
    assert resolve_admin_address(None, tmp_path) == "127.0.0.1:7500"
    write_discovery_file(tmp_path, server.address, "127.0.0.1:9", peer_id="12D3KooWAlpha")
    assert read_discovery_file(tmp_path)["metrics"] == "127.0.0.1:9"
    assert resolve_admin_address(None, tmp_path) == server.address
    assert resolve_admin_address("10.0.0.1:1", tmp_path) == "10.0.0.1:1"
    assert status_command(None, as_json=True, data_dir=tmp_path) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "alpha"


def test_grpc_status_codes_other_than_unavailable_are_not_reported_as_unreachable(
    server: AdminServer,
) -> None:
    channel = grpc.insecure_channel(server.address)
    try:
        unknown = channel.unary_unary("/swarmnode.v1.Admin/DeleteEverything")
        with pytest.raises(grpc.RpcError) as info:
            unknown(b"", timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        channel.close()


def test_a_failing_source_gives_a_one_line_error_and_the_server_keeps_serving(
    source: FakeSource, capsys
) -> None:
    class BrokenPeers(FakeSource):
        def peers(self) -> list[PeerInfo]:
            raise RuntimeError("p2p snapshot unavailable")

    with AdminServer(BrokenPeers(), AdminConfig(listen="127.0.0.1:0")) as srv:
        assert peers_command(srv.address, as_json=True) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"admin service at {srv.address} failed:") and len(err.splitlines()) == 1
        assert status_command(srv.address, as_json=True) == 0
