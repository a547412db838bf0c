"""The network view built from heartbeats, and heartbeats built from a node's status."""

from __future__ import annotations

import dataclasses

import pytest

from swarmnode import wire
from swarmnode.admin.network_view import TREND_POINTS, NetworkView, advertised_address, heartbeat_from_status
from swarmnode.admin.source import NodeStatus
from swarmnode.identity import Identity
from swarmnode.wire.gen import wire_pb2

STATUS = NodeStatus(
    name="alpha",
    peer_id="12D3KooWAlpha",
    model_id="embedded:tiny-a",
    round=42,
    rounds_target=100,
    recent_rewards=[i / 40 for i in range(40)],
    uptime_s=100.0,
    silo=False,
    p2p_state="running",
    listen_addrs=[],
    data_dir="/tmp/alpha",
    started_at=0.0,
    config_digest="abc",
    version="0.1.0",
    connected_peers=3,
)


def beat(sequence: int, name: str = "alpha", round_: int = 42) -> wire.NodeHeartbeat:
    status = dataclasses.replace(STATUS, name=name, round=round_)
    return heartbeat_from_status(status, {"groups_sent": 5}, sequence=sequence, created_at=1000.0)


def test_heartbeat_from_status_carries_round_trend_and_counters() -> None:
    hb = heartbeat_from_status(STATUS, {"groups_sent": 7, "rejected_bad_signature": -1}, sequence=9)
    assert (hb.name, hb.model_id, hb.node_round, hb.sequence) == ("alpha", "embedded:tiny-a", 42, 9)
    assert len(hb.reward_trend) == TREND_POINTS and hb.reward_trend[-1] == STATUS.recent_rewards[-1]
    assert hb.counters == {"groups_sent": 7, "rejected_bad_signature": 0}  # the wire holds unsigned counters
    assert hb.peers == 3 and hb.silo is False and hb.software_version == "0.1.0"


def test_view_lists_each_origin_once_with_its_latest_heartbeat() -> None:
    view = NetworkView(expire_s=30)
    assert view.observe(beat(1, round_=1), "peerA", received_at=100.0)
    assert view.observe(beat(2, round_=2), "peerA", received_at=101.0)
    assert view.observe(beat(1, name="beta", round_=7), "peerB", received_at=102.0)
    nodes = view.nodes(now=103.0)
    assert [(n.peer_id, n.name, n.round, n.last_seen) for n in nodes] == [
        ("peerA", "alpha", 2, 101.0),
        ("peerB", "beta", 7, 102.0),
    ]
    assert nodes[0].counters == {"groups_sent": 5} and nodes[0].peers == 3


def test_replayed_or_older_heartbeat_does_not_replace_a_newer_one() -> None:
    view = NetworkView(expire_s=30)
    view.observe(beat(5, round_=5), "peerA", received_at=100.0)
    assert not view.observe(beat(4, round_=4), "peerA", received_at=110.0)
    assert not view.observe(beat(5, round_=5), "peerA", received_at=110.0)
    [node] = view.nodes(now=111.0)
    assert node.round == 5 and node.last_seen == 100.0


def test_silent_nodes_expire_from_the_view() -> None:
    view = NetworkView(expire_s=30)
    view.observe(beat(1), "peerA", received_at=100.0)
    view.observe(beat(1, name="beta"), "peerB", received_at=120.0)
    assert [n.peer_id for n in view.nodes(now=130.0)] == ["peerA", "peerB"]
    assert [n.peer_id for n in view.nodes(now=140.0)] == ["peerB"]
    assert len(view) == 1  # expired nodes are forgotten, not just hidden
    assert view.observe(beat(1), "peerA", received_at=141.0)  # and come back with their next heartbeat
    assert len(view.nodes(now=141.0)) == 2


def test_view_is_bounded_and_evicts_the_stalest_node() -> None:
    view = NetworkView(expire_s=1000, max_nodes=2)
    view.observe(beat(1), "old", received_at=1.0)
    view.observe(beat(1), "mid", received_at=2.0)
    view.observe(beat(1), "new", received_at=3.0)
    assert [n.peer_id for n in view.nodes(now=4.0)] == ["mid", "new"]


def test_signed_heartbeat_round_trips_into_the_view_and_a_forged_one_fails_verification() -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    caps = wire.WireCaps()
    sealed = wire.seal(alice, wire.Kind.HEARTBEAT, wire.encode_heartbeat(beat(3)))
    envelope = wire.open_envelope(sealed, caps)
    assert wire.verify_envelope(envelope) and envelope.signer == alice.peer_id
    view = NetworkView(expire_s=30)
    view.observe(wire.decode_message(envelope, caps), envelope.signer, received_at=100.0)
    [node] = view.nodes(now=100.0)
    assert (node.peer_id, node.name, node.round) == (alice.peer_id, "alpha", 42)

    # Mallory re-signs Alice's payload but claims Alice's key: the signature does not verify.
    forged = wire_pb2.Envelope.FromString(sealed)
    forged.signature = mallory.sign(
        wire.signing_digest(forged.version, forged.kind, forged.compression, forged.payload)
    )
    assert not wire.verify_envelope(wire.open_envelope(forged.SerializeToString(), caps))


def test_a_signed_heartbeat_carries_the_advertised_admin_and_metrics_addresses() -> None:
    bob = Identity.generate()
    caps = wire.WireCaps()
    hb = heartbeat_from_status(
        STATUS, {}, sequence=1, admin_address="127.0.0.2:7500", metrics_address="127.0.0.2:9100"
    )
    envelope = wire.open_envelope(wire.seal(bob, wire.Kind.HEARTBEAT, wire.encode_heartbeat(hb)), caps)
    view = NetworkView(expire_s=30)
    view.observe(wire.decode_message(envelope, caps), envelope.signer, received_at=10.0)
    [node] = view.nodes(now=10.0)
    assert (node.admin_address, node.metrics_address) == ("127.0.0.2:7500", "127.0.0.2:9100")
    assert heartbeat_from_status(STATUS, {}, sequence=2).admin_address == ""  # nothing advertised by default


@pytest.mark.parametrize(
    "claim",
    [
        "[bold red]pwned[/]:1",  # rich markup in a table cell
        "evil\x1b[2J:80",  # a terminal escape sequence
        "host name:80",
        "127.0.0.1",  # no port
        "x" * 300 + ":1",
        "http://127.0.0.1:80/metrics",
    ],
)
def test_an_advertised_address_that_is_not_a_plain_host_port_is_dropped(claim: str) -> None:
    hb = dataclasses.replace(beat(1), admin_address=claim, metrics_address=claim)
    view = NetworkView(expire_s=30)
    view.observe(hb, "peerA", received_at=1.0)
    [node] = view.nodes(now=1.0)
    assert (node.admin_address, node.metrics_address) == ("", "")
    assert advertised_address("node7.example.org:9100") == "node7.example.org:9100"
    assert advertised_address("[::1]:7500") == "[::1]:7500"
