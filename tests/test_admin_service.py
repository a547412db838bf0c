"""The admin gRPC service and the operator CLI against an in-memory source, on loopback."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent import futures
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
from swarmnode.admin.metrics import NodeMetrics
from swarmnode.admin.service import AdminServer
from swarmnode.admin.source import EventLog, NetworkNode, NodeStatus, PeerInfo
from swarmnode.config import REDACTED, AdminConfig, ConfigError, config_from_dict
from swarmnode.wire.gen import admin_pb2, admin_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
TOKEN = "0123456789abcdef0123456789abcdef"  # 32 hex characters, as `openssl rand -hex 16` prints


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


class EmitOnSecondPoll(FakeSource):
    """Emits one new event when the stream polls a second time: a follower must deliver it."""

    def __init__(self) -> None:
        super().__init__()
        self.polls = 0

    def events_since(self, cursor: int):
        self.polls += 1
        if self.polls == 2:
            self.events.emit("round", "round 1 done", reward=0.5)
        return self.events.events_since(cursor)


def test_event_stream_delivers_past_then_new_events() -> None:
    source = EmitOnSecondPoll()
    source.events.emit("start", "node started", round=0)
    with AdminServer(source, AdminConfig(listen="127.0.0.1:0")) as srv, AdminClient(srv.address) as client:
        stream = client.events(0, max_duration_s=60)
        received = [next(stream), next(stream)]  # the second exists only once the stream polled again
        stream.close()  # cancels the call; the server's worker ends at its next poll
    assert [(e.kind, e.fields) for e, _ in received] == [
        ("start", {"round": "0"}),
        ("round", {"reward": "0.5"}),
    ]
    assert [cursor for _, cursor in received] == [1, 2]  # cursor to resume after each event


def test_event_stream_ends_by_itself_after_max_duration(server: AdminServer, source: FakeSource) -> None:
    source.events.emit("start", "node started")
    # A stream that overran max_duration_s would hit the client's deadline (max + 5 s) and raise.
    with AdminClient(server.address) as client:
        assert list(client.events(1, max_duration_s=0.2)) == []
        assert [e.kind for e, _ in client.events(0, max_duration_s=0)] == ["start"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_event_stream_refuses_a_non_finite_or_negative_duration(server: AdminServer, bad: float) -> None:
    """NaN compared false with the deadline, so a NaN stream never ended and held a worker forever."""
    channel = grpc.insecure_channel(server.address)
    try:
        stub = admin_pb2_grpc.AdminStub(channel)
        stream = stub.StreamEvents(admin_pb2.EventsRequest(cursor=0, max_duration_s=bad), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # not DEADLINE_EXCEEDED
        assert "max_duration_s must be a finite number" in info.value.details()
    finally:
        channel.close()
    with AdminClient(server.address) as client, pytest.raises(AdminError, match="finite number of seconds"):
        list(client.events(0, max_duration_s=bad))


def test_token_is_required_and_checked_when_enforced(source: FakeSource) -> None:
    cfg = AdminConfig(listen="127.0.0.1:0", token=TOKEN)
    with AdminServer(source, cfg, require_token=True) as srv:
        assert srv.requires_token
        for token in (None, "wrong"):
            with AdminClient(srv.address, token=token) as client, pytest.raises(AdminError, match="token"):
                client.status()
        with AdminClient(srv.address, token=TOKEN) as client:
            assert client.status().name == "alpha"
            assert len(client.peers()) == 2
    assert source.calls == 1  # refused calls never reached the source


def test_server_refuses_to_start_on_non_loopback_without_token(source: FakeSource) -> None:
    # The config refuses it at load (see test_config_*); a config built around validation is refused too.
    unchecked = AdminConfig.model_construct(listen="0.0.0.0:0", token=None)
    with pytest.raises(ConfigError, match="admin.token"):
        AdminServer(source, unchecked)
    with pytest.raises(ConfigError, match="admin.token"):
        AdminServer(source, AdminConfig(listen="127.0.0.1:0"), require_token=True)
    assert AdminServer(source, AdminConfig(listen="0.0.0.0:0", token=TOKEN)).requires_token
    assert not AdminServer(source, AdminConfig(listen="localhost:0")).requires_token


def test_config_refuses_a_reachable_admin_api_without_token_at_load() -> None:
    with pytest.raises(ConfigError, match=r"admin: .*admin\.listen = '0\.0\.0\.0:7500' is reachable"):
        config_from_dict({"admin": {"listen": "0.0.0.0:7500"}})
    with pytest.raises(ConfigError, match=r"admin\.listen: expected HOST:PORT"):
        config_from_dict({"admin": {"listen": "nonsense"}})
    assert config_from_dict({"admin": {"listen": "0.0.0.0:7500", "token": TOKEN}}).admin.token == TOKEN


@pytest.mark.parametrize("weak", ["Q7", "x" * 15, "with space in the token", "tab\tin\tthe\ttoken!"])
def test_config_refuses_a_weak_admin_token_and_never_echoes_it(weak: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"admin": {"token": weak}})
    message = str(info.value)
    assert re.search(r"^  admin\.token: .*at least 16 printable ASCII characters", message, re.M)
    assert weak not in message  # a secret in an error message ends up in logs


def test_config_refuses_the_redacted_placeholder_as_a_token() -> None:
    with pytest.raises(ConfigError, match=r"admin\.token: .*placeholder written to config\.resolved\.toml"):
        config_from_dict({"admin": {"token": REDACTED}})


def test_metrics_off_loopback_needs_a_token_or_an_explicit_public_choice() -> None:
    with pytest.raises(ConfigError, match=r"admin\.metrics_listen = '0\.0\.0\.0:9100' is reachable"):
        config_from_dict({"admin": {"metrics_listen": "0.0.0.0:9100"}})
    public = config_from_dict({"admin": {"metrics_listen": "0.0.0.0:9100", "metrics_public": True}})
    assert public.admin.metrics_public
    assert (
        config_from_dict({"admin": {"metrics_listen": "0.0.0.0:9100", "token": TOKEN}}).admin.token == TOKEN
    )
    assert AdminConfig().metrics_listen == "127.0.0.1:0"  # the default stays on loopback


def test_malformed_listen_address_is_a_config_error(source: FakeSource) -> None:
    with pytest.raises(ConfigError, match=r"admin\.listen: expected HOST:PORT"):
        config_from_dict({"admin": {"listen": "127.0.0.1"}})
    with pytest.raises(ConfigError, match=r"admin\.listen: expected HOST:PORT"):
        AdminServer(source, AdminConfig.model_construct(listen="127.0.0.1", token=None))


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
    for expected in (
        "alpha",
        "7 / 100",
        "bad_signature=1",
        "2 connected peers",
        "2 nodes seen",
        "embedded:tiny-b",
    ):
        assert re.search(rf"(?<![\w.:/=]){re.escape(expected)}(?![\w.:/=])", out), expected


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


class FailingAdmin(admin_pb2_grpc.AdminServicer):
    """A real gRPC Admin service whose GetStatus fails with a chosen status code."""

    def __init__(self, code: grpc.StatusCode, release: threading.Event) -> None:
        self.code = code
        self.release = release

    def GetStatus(self, request, context):
        if self.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self.release.wait(10)  # outlive the client's deadline; released when the test ends
            return admin_pb2.NodeStatus()
        context.abort(self.code, "detail from the server")


@pytest.mark.parametrize(
    ("code", "unreachable", "message"),
    [
        (grpc.StatusCode.UNAVAILABLE, True, "no swarmnode admin service at {address} (is the node running?"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, True, "no swarmnode admin service at {address} (is the node running?"),
        (grpc.StatusCode.UNAUTHENTICATED, False, "admin service at {address} refused the call: detail from the server"),
        (grpc.StatusCode.UNIMPLEMENTED, False, "admin service at {address} failed: the service there is not a swarmnode admin API of this version"),
        (grpc.StatusCode.INTERNAL, False, "admin service at {address} failed: detail from the server"),
        (grpc.StatusCode.PERMISSION_DENIED, False, "admin service at {address} failed: detail from the server"),
    ],
)  # fmt: skip
def test_client_maps_each_grpc_status_to_its_operator_error(
    code: grpc.StatusCode, unreachable: bool, message: str
) -> None:
    """AdminClient._error: only "nobody answers" codes are AdminUnreachable (exit 2), the rest AdminError."""
    release = threading.Event()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    if code == grpc.StatusCode.UNAVAILABLE:
        port = server.add_insecure_port("127.0.0.1:0")  # started, then stopped: nothing listens
        server.start()
        server.stop(0).wait(5)
    else:
        admin_pb2_grpc.add_AdminServicer_to_server(FailingAdmin(code, release), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
    address = f"127.0.0.1:{port}"
    try:
        with AdminClient(address, timeout_s=0.5) as client, pytest.raises(AdminError) as info:
            client.status()
    finally:
        release.set()
        server.stop(0).wait(5)
    assert isinstance(info.value, AdminUnreachable) is unreachable
    assert str(info.value).startswith(message.format(address=address))


def test_a_server_without_the_admin_service_is_reported_as_the_wrong_api() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))  # some other gRPC service
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with AdminClient(f"127.0.0.1:{port}") as client, pytest.raises(AdminError) as info:
            client.peers()
    finally:
        server.stop(0).wait(5)
    assert not isinstance(info.value, AdminUnreachable)
    assert str(info.value).endswith("not a swarmnode admin API of this version")


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


# ---------------------------------------------------------------- banned peers in `swarmnode peers`


class WithBannedPeer(FakeSource):
    def __init__(self, banned_until: float) -> None:
        super().__init__()
        self.banned_until = banned_until

    def peers(self) -> list[PeerInfo]:
        banned = PeerInfo(
            "12D3KooWMallory", [], 0.0, 0, 0, 0, 0, {}, 0.0, True, "bad_signature", self.banned_until
        )
        return [*super().peers(), banned]


def test_peers_lists_banned_peers_with_reason_and_time_left(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    until = time.time() + 250
    with AdminServer(WithBannedPeer(until), AdminConfig(listen="127.0.0.1:0")) as srv:
        with AdminClient(srv.address) as client:
            peers = client.peers()
        assert peers_command(srv.address, as_json=True) == 0
        data = json.loads(capsys.readouterr().out)
        assert peers_command(srv.address) == 0
        table = capsys.readouterr().out
    [mallory] = [p for p in peers if p.banned]
    assert (mallory.peer_id, mallory.ban_reason, mallory.banned_until) == (
        "12D3KooWMallory",
        "bad_signature",
        until,
    )
    assert [p["peer_id"] for p in data if p["banned"]] == ["12D3KooWMallory"]
    assert {p["peer_id"] for p in data if not p["banned"]} == {"12D3KooWBeta", "12D3KooWGamma"}
    assert re.search(r"\b2 connected peers, 1 banned\b", table)
    assert re.search(r"\bbanned \(bad_signature\), 4m(0[0-9]|1[0-9])s left\b", table)


def test_runtime_lists_the_hosts_banned_peers_with_reason_and_expiry() -> None:
    from swarmnode.node.runtime import banned_peers
    from swarmnode.p2p.ipc import P2PStatus

    snapshot = {
        "banned": ["12D3KooWMallory", "12D3KooWTrudy"],
        "banned_peers": [
            {
                "peer_id": "12D3KooWMallory",
                "reason": "bad_signature",
                "expires_at": 1_700_000_300.0,
                "bans": 2,
            },
            {"peer_id": "12D3KooWTrudy", "reason": "replay", "expires_at": 1_700_000_100.0, "bans": 1},
        ],
    }
    rows = banned_peers(P2PStatus.from_snapshot(snapshot))
    assert [(p.peer_id, p.banned, p.ban_reason, p.banned_until) for p in rows] == [
        ("12D3KooWMallory", True, "bad_signature", 1_700_000_300.0),
        ("12D3KooWTrudy", True, "replay", 1_700_000_100.0),
    ]
    assert all(p.msgs_in == 0 and p.addrs == [] for p in rows)
    # A host that reports bare ids only: still listed, reason and expiry unknown.
    bare = banned_peers(P2PStatus.from_snapshot({"banned": ["12D3KooWMallory"]}))
    assert [(p.peer_id, p.banned, p.ban_reason, p.banned_until) for p in bare] == [
        ("12D3KooWMallory", True, "", 0.0)
    ]
    assert banned_peers(P2PStatus()) == []


# ---------------------------------------------------------------- /metrics off loopback


def scrape(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_with_a_token_refuses_scrapes_without_it() -> None:
    metrics = NodeMetrics()
    metrics.set_identity("12D3KooWAlpha", "alpha", "m")
    server = metrics.serve("127.0.0.2:0", token=TOKEN)
    try:
        assert server.address.startswith("127.0.0.2:")
        for wrong in (None, "x" * 32, TOKEN + "x"):
            status, body = scrape(server.url, wrong)
            assert status == 401 and "swarmnode_node_info" not in body
        status, body = scrape(server.url, TOKEN)
        assert status == 200 and "swarmnode_node_info" in body
    finally:
        server.stop()


def test_runtime_serves_metrics_by_the_config_and_warns_when_public(caplog) -> None:
    from swarmnode.node.runtime import serve_metrics

    loopback = config_from_dict({"admin": {"metrics_listen": "127.0.0.1:0"}}).admin
    guarded = config_from_dict({"admin": {"metrics_listen": "0.0.0.0:0", "token": TOKEN}}).admin
    public = config_from_dict({"admin": {"metrics_listen": "0.0.0.0:0", "metrics_public": True}}).admin
    servers = []
    try:
        with caplog.at_level(logging.WARNING, logger="swarmnode.node.runtime"):
            servers = [serve_metrics(NodeMetrics(), cfg) for cfg in (loopback, guarded, public)]
        assert [s.requires_token for s in servers] == [False, True, False]
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1 and "served without a token" in warnings[0]
        assert "(admin.metrics_public = true)" in warnings[0]
        port = servers[1].address.rsplit(":", 1)[1]
        assert scrape(f"http://127.0.0.1:{port}/metrics")[0] == 401
    finally:
        for server in servers:
            server.stop()
