"""The peer-list protocol: parsing lists from untrusted peers, and asking non-swarmnode peers rarely."""

from __future__ import annotations

import json

import multiaddr
import pytest
import trio
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from swarmnode.identity import Identity
from swarmnode.p2p.discovery import (
    MAX_ADDRS_PER_PEER,
    MAX_PEERS_SHARED,
    MAX_RESPONSE_BYTES,
    PEER_LIST_PROTOCOL,
    PROBE_BACKOFF_S,
    PeerListExchange,
    parse_peer_list,
)


def peer_id() -> str:
    return Identity.generate().peer_id


ADDR = "/ip4/127.0.0.1/tcp/4001"


def test_a_well_formed_list_parses() -> None:
    a, b = peer_id(), peer_id()
    entries = parse_peer_list(
        json.dumps([{"id": a, "addrs": [ADDR]}, {"id": b, "addrs": [ADDR, ADDR]}]).encode()
    )
    assert [(p.to_base58(), [str(x) for x in addrs]) for p, addrs in entries] == [
        (a, [ADDR]),
        (b, [ADDR, ADDR]),
    ]


@pytest.mark.parametrize(
    "data, match",
    [
        (b"x" * (MAX_RESPONSE_BYTES + 1), "exceeds"),
        (b"\xff\xfe not json", "not JSON"),
        (b"{not json", "not JSON"),
        (b"[" * 50_000 + b"]" * 50_000, "exceeds|nests too deeply"),
        (b"[" * 30_000 + b"]" * 30_000, "nests too deeply"),
        (b'{"id": "x"}', "not a JSON list"),
    ],
)
def test_an_unusable_answer_raises_value_error(data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_peer_list(data)


def test_malformed_entries_are_skipped_one_by_one_and_good_ones_kept() -> None:
    good = peer_id()
    junk = [
        "a string",
        17,
        None,
        {"addrs": [ADDR]},  # no id
        {"id": 5, "addrs": [ADDR]},
        {"id": "not-base58-0OIl", "addrs": [ADDR]},
        {"id": "Qm" + "1" * 500, "addrs": [ADDR]},  # absurdly long id
        {"id": peer_id(), "addrs": ADDR},  # a string where a list belongs (sliced into characters before)
        {"id": peer_id(), "addrs": [5, None, "not a multiaddr", "/ip4/" + "9" * 400]},
        {"id": peer_id(), "addrs": []},
    ]
    entries = parse_peer_list(json.dumps([*junk, {"id": good, "addrs": [ADDR, 7, "bogus"]}]).encode())
    assert [(p.to_base58(), [str(x) for x in addrs]) for p, addrs in entries] == [(good, [ADDR])]


def test_entries_and_addresses_are_capped() -> None:
    many = [
        {"id": peer_id(), "addrs": [f"/ip4/127.0.0.1/tcp/{4000 + i}" for i in range(10)]} for i in range(60)
    ]
    entries = parse_peer_list(json.dumps(many).encode())
    assert len(entries) == MAX_PEERS_SHARED
    assert all(len(addrs) == MAX_ADDRS_PER_PEER for _, addrs in entries)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeStore:
    def __init__(self) -> None:
        self.protocols: dict[ID, list[str]] = {}
        self.added: dict[ID, list[multiaddr.Multiaddr]] = {}

    def get_protocols(self, peer: ID) -> list[str]:
        return self.protocols.get(peer, [])

    def peers_with_addrs(self) -> list[ID]:
        return list(self.added)

    def add_addrs(self, peer: ID, addrs: list[multiaddr.Multiaddr], ttl: int) -> None:
        self.added[peer] = addrs


class FakeStream:
    def __init__(self, data: bytes) -> None:
        self.chunks = [data[: len(data) // 2], data[len(data) // 2 :]]

    async def read(self, _n: int) -> bytes:
        if not self.chunks:
            raise StreamEOF("py-libp2p raises at the end of a stream the other side closed")
        return self.chunks.pop(0)

    async def close(self) -> None:
        return None


class FakeHost:
    """Just enough of a libp2p host to isolate PeerListExchange's bookkeeping."""

    def __init__(self, connected: list[ID], answers: dict[ID, bytes]) -> None:
        self.store, self.connected, self.answers = FakeStore(), connected, answers
        self.asked: list[ID] = []
        self.me = ID.from_base58(peer_id())

    def set_stream_handler(self, protocol: str, handler: object) -> None:
        assert protocol == PEER_LIST_PROTOCOL

    def get_peerstore(self) -> FakeStore:
        return self.store

    def get_id(self) -> ID:
        return self.me

    def get_connected_peers(self) -> list[ID]:
        return self.connected

    async def new_stream(self, peer: ID, protocols: list[str]) -> FakeStream:
        self.asked.append(peer)
        if peer not in self.answers:
            raise RuntimeError("protocols not supported:\n  a multi-line library error")
        return FakeStream(self.answers[peer])


def test_a_peer_without_the_protocol_is_asked_again_only_after_a_growing_backoff() -> None:
    swarmnode_peer, other = ID.from_base58(peer_id()), ID.from_base58(peer_id())
    learned, banned = ID.from_base58(peer_id()), ID.from_base58(peer_id())
    answer = json.dumps([{"id": p.to_base58(), "addrs": [ADDR]} for p in (learned, banned)]).encode()
    host = FakeHost([swarmnode_peer, other], {swarmnode_peer: answer})
    clock = FakeClock()
    exchange = PeerListExchange(host, accept_peer=lambda p: p != banned, clock=clock)  # type: ignore[arg-type]

    async def rounds(n: int) -> None:
        for _ in range(n):
            await exchange.ask_some(count=2)

    trio.run(rounds, 5)  # five maintenance ticks at the same time
    assert host.asked.count(other) == 1 and host.asked.count(swarmnode_peer) == 5
    assert exchange.failed_asks == 1
    assert set(host.store.added) == {learned}  # the banned peer in the list is not added
    clock.t += PROBE_BACKOFF_S[0]
    trio.run(rounds, 3)
    assert host.asked.count(other) == 2
    clock.t += PROBE_BACKOFF_S[0]  # the second backoff is longer
    trio.run(rounds, 1)
    assert host.asked.count(other) == 2
    clock.t += PROBE_BACKOFF_S[1]
    trio.run(rounds, 1)
    assert host.asked.count(other) == 3


def test_a_peer_whose_identify_lacks_the_protocol_is_not_asked() -> None:
    libp2p_only = ID.from_base58(peer_id())
    host = FakeHost([libp2p_only], {})
    host.store.protocols[libp2p_only] = ["/ipfs/id/1.0.0", "/meshsub/1.1.0"]
    exchange = PeerListExchange(host, clock=FakeClock())  # type: ignore[arg-type]
    trio.run(exchange.ask_some)
    assert host.asked == [] and exchange.failed_asks == 1


@pytest.mark.integration
def test_real_hosts_exchange_peer_lists() -> None:
    """Three py-libp2p hosts on loopback: B learns C's address from A over /swarmnode/peers/1.0.0."""
    from libp2p import new_host
    from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
    from libp2p.peer.peerinfo import PeerInfo
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport

    def make_host() -> object:
        key_pair = Identity.generate().key_pair
        noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
        return new_host(key_pair=key_pair, sec_opt={NOISE_PROTOCOL_ID: noise}, muxer_preference="YAMUX")

    hosts = [make_host() for _ in range(3)]
    a, b, c = hosts
    exchanges = [PeerListExchange(h) for h in hosts]  # type: ignore[arg-type]
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]

    async def scenario() -> None:
        async with a.run(listen), b.run(listen), c.run(listen):  # type: ignore[attr-defined]
            with trio.fail_after(60):
                a_info = PeerInfo(a.get_id(), a.get_addrs())  # type: ignore[attr-defined]
                await c.connect(a_info)  # type: ignore[attr-defined]
                await b.connect(a_info)  # type: ignore[attr-defined]
                while c.get_id() not in a.get_connected_peers():  # type: ignore[attr-defined]
                    await trio.sleep(0.05)
                # A knows C only as an inbound peer; its listen address came with identify, or not at all.
                a.get_peerstore().add_addrs(c.get_id(), c.get_addrs(), 600)  # type: ignore[attr-defined]
                learned = await exchanges[1].ask(a.get_id())  # type: ignore[attr-defined]
        assert learned == 1 and exchanges[1].failed_asks == 0
        assert c.get_id() in b.get_peerstore().peers_with_addrs()  # type: ignore[attr-defined]

    trio.run(scenario)
