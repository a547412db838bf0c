"""An operator of several machines: `swarmnode net` on one node lists the admin and /metrics
addresses the others advertise in their signed heartbeats, and `status --node`/Prometheus reach a
node on another address with the admin token. "Another host" is 127.0.0.2 here (loopback, so the
test needs no network); the token is enforced on it as it is on a public address."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from swarmnode import wire
from swarmnode.admin.metrics import NodeMetrics
from swarmnode.admin.network_view import NetworkView, heartbeat_from_status
from swarmnode.admin.service import AdminServer
from swarmnode.admin.source import EventLog, NetworkNode, NodeStatus, PeerInfo
from swarmnode.config import AdminConfig, config_from_dict
from swarmnode.identity import Identity

TOKEN = "f00dfeedcafe0123456789abcdef4567"


@dataclass
class Node:
    """One node's admin side: identity, status, network view, admin API and /metrics."""

    name: str
    identity: Identity
    view: NetworkView
    events: EventLog

    def status(self) -> NodeStatus:
        return NodeStatus(
            name=self.name, peer_id=self.identity.peer_id, model_id="embedded:tiny-a", round=3,
            rounds_target=10, recent_rewards=[0.5], uptime_s=1.0, silo=False, p2p_state="running",
            listen_addrs=[], data_dir="/tmp", started_at=0.0, config_digest="abc", version="test",
        )  # fmt: skip

    def peers(self) -> list[PeerInfo]:
        return []

    def network(self) -> list[NetworkNode]:
        return self.view.nodes()

    def events_since(self, cursor: int):
        return self.events.events_since(cursor)


def make_node(name: str) -> Node:
    return Node(name, Identity.generate(), NetworkView(expire_s=600), EventLog())


def deliver_heartbeat(sender: Node, admin: str, metrics: str, receivers: list[Node], sequence: int) -> None:
    """What gossip does with a heartbeat: sign, then at each receiver open, verify, decode, observe."""
    hb = heartbeat_from_status(
        sender.status(), {}, sequence=sequence, admin_address=admin, metrics_address=metrics
    )
    sealed = wire.seal(sender.identity, wire.Kind.HEARTBEAT, wire.encode_heartbeat(hb))
    caps = wire.WireCaps()
    for receiver in receivers:
        envelope = wire.open_envelope(sealed, caps)
        assert wire.verify_envelope(envelope)
        receiver.view.observe(wire.decode_message(envelope, caps), envelope.signer, time.time())


def cli(*args: str, token_env: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SWARMNODE__ADMIN__TOKEN"}
    env["OMP_NUM_THREADS"] = "1"
    if token_env is not None:
        env["SWARMNODE__ADMIN__TOKEN"] = token_env
    return subprocess.run(
        [sys.executable, "-m", "swarmnode", *args], capture_output=True, text=True, timeout=120, env=env
    )


def scrape_status(url: str, token: str | None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def two_hosts():
    """Node A on 127.0.0.1 (no token, loopback), node B on 127.0.0.2 with its admin API and /metrics
    behind the token; each advertises its addresses to the other in a heartbeat."""
    a, b = make_node("a"), make_node("b")
    b_cfg = config_from_dict(
        {"admin": {"listen": "127.0.0.2:0", "metrics_listen": "127.0.0.2:0", "token": TOKEN}}
    )
    a_server = AdminServer(a, AdminConfig(listen="127.0.0.1:0")).start()
    b_server = AdminServer(b, b_cfg.admin, require_token=True).start()
    a_metrics = NodeMetrics().serve("127.0.0.1:0")
    b_metrics = NodeMetrics().serve(b_cfg.admin.metrics_listen, token=TOKEN)
    try:
        deliver_heartbeat(a, a_server.address, a_metrics.address, [a, b], sequence=1)
        deliver_heartbeat(b, b_server.address, b_metrics.address, [a, b], sequence=1)
        yield SimpleNamespace(a=a, b=b, a_admin=a_server.address, b_admin=b_server.address,
                              b_metrics=b_metrics.address)  # fmt: skip
    finally:
        for server in (a_server, b_server):
            server.stop()
        for metrics in (a_metrics, b_metrics):
            metrics.stop()


def test_net_lists_advertised_addresses_and_they_reach_the_other_host_with_the_token(two_hosts) -> None:
    net = cli("net", "--node", two_hosts.a_admin, "--json")
    assert net.returncode == 0, net.stderr
    nodes = {n["name"]: n for n in json.loads(net.stdout)}
    assert set(nodes) == {"a", "b"}
    b = nodes["b"]
    assert b["peer_id"] == two_hosts.b.identity.peer_id
    assert b["admin_address"] == two_hosts.b_admin and b["admin_address"].startswith("127.0.0.2:")
    assert b["metrics_address"] == two_hosts.b_metrics

    # status of B at the address A's view advertises, the token from the environment ...
    status = cli("status", "--node", b["admin_address"], "--json", token_env=TOKEN)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["peer_id"] == two_hosts.b.identity.peer_id
    # ... or from the flag; without it, one line saying what to pass.
    flagged = cli("net", "--node", b["admin_address"], "--json", "--token", TOKEN)
    assert {n["name"] for n in json.loads(flagged.stdout)} == {"a", "b"}
    refused = cli("status", "--node", b["admin_address"])
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().startswith(f"admin service at {b['admin_address']} refused the call:")
    assert "pass --token" in refused.stderr

    # Prometheus reaches B's advertised /metrics with the token as a bearer token, not without.
    assert scrape_status(f"http://{b['metrics_address']}/metrics", TOKEN) == 200
    assert scrape_status(f"http://{b['metrics_address']}/metrics", None) == 401


def test_net_table_shows_the_advertised_addresses(two_hosts, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps at 80 columns when stdout is not a terminal
    table = cli("net", "--node", two_hosts.b_admin, token_env=TOKEN)
    assert table.returncode == 0, table.stderr
    assert "admin / metrics" in table.stdout
    assert f"{two_hosts.b_admin} / {two_hosts.b_metrics}" in table.stdout


def test_advertised_addresses_use_advertise_host_with_the_bound_ports() -> None:
    from swarmnode.node.runtime import advertised_addresses

    def runtime(advertise_host: str | None) -> SimpleNamespace:
        admin = (
            config_from_dict({"admin": {"advertise_host": advertise_host}}).admin
            if advertise_host
            else AdminConfig()
        )
        return SimpleNamespace(
            cfg=SimpleNamespace(admin=admin),
            admin=SimpleNamespace(address="0.0.0.0:7500"),
            metrics_server=SimpleNamespace(address="0.0.0.0:9100"),
        )

    assert advertised_addresses(runtime(None)) == ("", "")  # nothing announced unless asked
    assert advertised_addresses(runtime("node7.example.org")) == (
        "node7.example.org:7500",
        "node7.example.org:9100",
    )
    assert advertised_addresses(runtime("[2001:db8::7]")) == ("[2001:db8::7]:7500", "[2001:db8::7]:9100")
