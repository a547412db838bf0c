"""Attacks on the p2p host, each with real py-libp2p hosts on loopback in one trio loop.

The host under test is the real :class:`SwarmHost` (gossipsub, our GuardedPubsub, the validation
pipeline, its IPC link), with the test playing the node on the other end of its Unix socket. The
attackers are plain py-libp2p hosts with strict signing that publish whatever bytes they like, as
any third-party libp2p implementation could:

- a forged copy of a genuine envelope published first by another identity (censorship through
  py-libp2p's per-message-id verdict cache);
- a copy dropped for a state-dependent reason (relay over budget) that must not poison the id;
- a replay after py-libp2p's seen cache forgot the id;
- 600 sybil authors behind one connection;
- ~1,300 banned sybils, which overflowed the status snapshot's 16-bit header and crashed the host;
- bans kept across a host restart, refused at the dial path.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11
from libp2p.pubsub.pb import rpc_pb2
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from swarmnode.config import P2PConfig
from swarmnode.identity import Identity
from swarmnode.p2p.host import (
    GuardedPubsub,
    NoSignGossipSub,
    SwarmHost,
    _FirstLineOnly,
    content_message_id,
)
from swarmnode.p2p.ipc import SNAPSHOT_MAX_BANNED, Deliver, FrameDecoder, P2PStatus, Snapshot, encode_frame
from swarmnode.p2p.pipeline import ADMIT_BURST, ADMIT_PER_S, Reason
from swarmnode.wire import Kind, NodeHeartbeat, encode_heartbeat, message_id, seal

pytestmark = pytest.mark.integration

TOPIC = Kind.HEARTBEAT.topic
WAIT_S = 30.0  # upper bound for any one event on a loaded 2-core machine; tests end at the event


def heartbeat(ident: Identity, sequence: int) -> bytes:
    beat = NodeHeartbeat(name="n", model_id="m", node_round=1, sequence=sequence, created_at=time.time())
    return seal(ident, Kind.HEARTBEAT, encode_heartbeat(beat))


async def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class NodeSide:
    """The test plays the node: it reads the host's frames from the IPC socket."""

    delivered: list[Deliver] = field(default_factory=list)
    snapshots: list[dict] = field(default_factory=list)

    def delivered_ids(self) -> list[str]:
        return [d.msg_id for d in self.delivered]


class Publisher:
    """A py-libp2p peer that publishes raw bytes under the protocol's StrictNoSign policy (the
    project's pubsub and router classes), attached to the host under test."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.host = new_host(
            key_pair=identity.key_pair,
            sec_opt={
                NOISE_PROTOCOL_ID: NoiseTransport(
                    identity.key_pair, noise_privkey=create_x25519_key_pair().private_key
                )
            },
            muxer_preference="YAMUX",
        )
        self.gossipsub = NoSignGossipSub(
            protocols=[PROTOCOL_ID_V11], degree=4, degree_low=3, degree_high=6, heartbeat_interval=1,
            adaptive_gossip_enabled=False, spam_protection_enabled=False,
        )  # fmt: skip
        self.pubsub = GuardedPubsub(
            self.host, self.gossipsub, strict_signing=False, msg_id_constructor=content_message_id
        )

    async def publish(self, data: bytes) -> None:
        # Not subscribed, so it never sees (and never de-duplicates) what the host forwards.
        with trio.fail_after(WAIT_S):  # the library drops silently beyond 32 queued RPCs
            while any(len(q) >= 4 for q in list(self.pubsub.peer_queues.values())):
                await trio.sleep(0.005)
        await self.pubsub.publish(TOPIC, data)


@asynccontextmanager
async def host_under_test(
    tmp: Path, cfg: P2PConfig | None = None, ban_file: Path | None = None
) -> AsyncIterator[tuple[SwarmHost, NodeSide]]:
    cfg = cfg or P2PConfig(listen=["/ip4/127.0.0.1/tcp/0"])
    host = SwarmHost(cfg, Identity.generate(), tmp / "ipc.sock", ban_file=ban_file)
    node = NodeSide()
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(tmp / "ipc.sock"))
    listener.listen(1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(host.run)
        with trio.fail_after(WAIT_S):
            conn, _ = await listener.accept()
        stream = trio.SocketStream(conn)

        async def read_frames() -> None:
            decoder = FrameDecoder()
            while chunk := await stream.receive_some(1 << 16):
                for frame in decoder.feed(chunk):
                    if isinstance(frame, Deliver):
                        node.delivered.append(frame)
                    elif isinstance(frame, Snapshot):
                        node.snapshots.append(frame.status)

        nursery.start_soon(read_frames)
        await wait_for(lambda: bool(node.snapshots), "the host's first snapshot")
        try:
            yield host, node
        finally:
            nursery.cancel_scope.cancel()
            listener.close()


@asynccontextmanager
async def attached(publisher: Publisher, host: SwarmHost) -> AsyncIterator[Publisher]:
    async with (
        publisher.host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]),
        background_trio_service(publisher.pubsub),
        background_trio_service(publisher.gossipsub),
    ):
        await publisher.pubsub.wait_until_ready()
        await publisher.host.connect(PeerInfo(host.my_id, host.host.get_addrs()))
        await wait_for(
            lambda: host.my_id in publisher.pubsub.peer_topics.get(TOPIC, set()),
            "the host's subscription to reach the publisher",
        )
        yield publisher


def count(host: SwarmHost, reason: Reason) -> int:
    return host.pipeline.counts[(Kind.HEARTBEAT, reason)]


def test_a_forged_copy_published_first_by_another_identity_does_not_censor_the_genuine_envelope(
    short_tmp: Path,
) -> None:
    """Issue 10 item 4: the copy X publishes first is the same bytes, so it is valid; nothing is cached against the id."""
    alice, mallory = Identity.generate(), Identity.generate()

    async def scenario() -> None:
        async with (
            host_under_test(short_tmp) as (host, node),
            attached(Publisher(mallory), host) as x,
            attached(Publisher(alice), host) as genuine,
        ):
            envelope = heartbeat(alice, 1)
            wanted = message_id(envelope).hex()
            await x.publish(envelope)  # mallory publishes alice's envelope first, under its own libp2p id
            await wait_for(lambda: wanted in node.delivered_ids(), "the envelope to be delivered")
            await genuine.publish(envelope)
            await genuine.publish(heartbeat(alice, 2))  # a marker: once it is in, the copy was handled
            await wait_for(lambda: len(node.delivered) == 2, "alice's next heartbeat")
            (first, _second) = node.delivered
            assert (first.msg_id, first.origin, first.forwarder) == (wanted, alice.peer_id, mallory.peer_id)
            assert node.delivered_ids().count(wanted) == 1
            assert not host.pipeline.scores.is_banned(mallory.peer_id)

    trio.run(scenario)


def test_a_copy_dropped_for_a_state_reason_does_not_poison_the_id_for_other_forwarders(
    short_tmp: Path,
) -> None:
    """A relay over its budget gets its copy dropped; the same bytes from another peer still arrive."""
    alice, relay = Identity.generate(), Identity.generate()
    # rate 0.01/s: each author's burst is 1 message, the relay budget 16 messages then one per 6 s.
    cfg = P2PConfig(listen=["/ip4/127.0.0.1/tcp/0"], rate_msgs_per_s=0.01)

    async def scenario() -> None:
        async with (
            host_under_test(short_tmp, cfg) as (host, node),
            attached(Publisher(relay), host) as flooder,
            attached(Publisher(alice), host) as genuine,
        ):
            for _ in range(20):  # other authors' valid heartbeats use up the relay's budget
                await flooder.publish(heartbeat(Identity.generate(), 1))
            await wait_for(lambda: count(host, Reason.RELAY_RATE_LIMITED) >= 4, "the relay to hit its budget")
            envelope = heartbeat(alice, 1)
            limited = count(host, Reason.RELAY_RATE_LIMITED)
            await flooder.publish(envelope)
            await wait_for(
                lambda: count(host, Reason.RELAY_RATE_LIMITED) > limited, "the relay's copy to be dropped"
            )
            assert message_id(envelope).hex() not in node.delivered_ids()
            await genuine.publish(envelope)
            await wait_for(lambda: message_id(envelope).hex() in node.delivered_ids(), "alice's own copy")
            assert node.delivered[-1].forwarder == alice.peer_id

    trio.run(scenario)


def test_a_replay_after_the_library_seen_cache_forgot_the_id_is_dropped_by_our_pipeline(
    short_tmp: Path,
) -> None:
    alice, replayer = Identity.generate(), Identity.generate()

    async def scenario() -> None:
        async with (
            host_under_test(short_tmp) as (host, node),
            attached(Publisher(alice), host) as genuine,
            attached(Publisher(replayer), host) as late,
        ):
            envelope = heartbeat(alice, 1)
            await genuine.publish(envelope)
            await wait_for(lambda: len(node.delivered) == 1, "the original")
            # What a 120-180 s wait does to py-libp2p's seen cache (its validation cache is bypassed).
            host.pubsub.seen_messages.cache.clear()
            duplicates = count(host, Reason.DUPLICATE)
            await late.publish(envelope)
            await wait_for(lambda: count(host, Reason.DUPLICATE) == duplicates + 1, "the replay to be judged")
            await genuine.publish(heartbeat(alice, 2))  # a marker after the replay
            await wait_for(lambda: len(node.delivered) == 2, "alice's next heartbeat")
            assert node.delivered_ids().count(message_id(envelope).hex()) == 1

    trio.run(scenario)


def test_600_sybil_authors_behind_one_connection_are_admitted_at_a_bounded_rate(short_tmp: Path) -> None:
    """Issue 10 item 5: identities are free; what one connection introduces is bounded."""
    alice, gateway = Identity.generate(), Identity.generate()
    sybils = [Identity.generate() for _ in range(600)]
    cfg = P2PConfig(listen=["/ip4/127.0.0.1/tcp/0"], receive_queue=64)

    async def scenario() -> None:
        async with (
            host_under_test(short_tmp, cfg) as (host, node),
            attached(Publisher(gateway), host) as attacker,
            attached(Publisher(alice), host) as honest,
        ):
            started = time.monotonic()
            for sybil in sybils:
                await attacker.publish(heartbeat(sybil, 1))
            await wait_for(
                lambda: count(host, Reason.ACCEPTED) + count(host, Reason.ADMISSION_LIMITED) >= 600,
                "every sybil message to be judged",
            )
            elapsed = time.monotonic() - started
            await honest.publish(heartbeat(alice, 1))
            await wait_for(
                lambda: any(d.origin == alice.peer_id for d in node.delivered), "the honest heartbeat"
            )
            from_sybils = sum(d.forwarder == gateway.peer_id for d in node.delivered)
            assert from_sybils <= ADMIT_BURST + ADMIT_PER_S * elapsed + 1, (from_sybils, elapsed)
            assert count(host, Reason.ADMISSION_LIMITED) >= 600 - from_sybils - 1
            assert host.drops["host_receive_queue_full"] == 0

    trio.run(scenario)


def test_1300_banned_sybils_do_not_crash_the_snapshot_and_bans_survive_a_restart(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 10 item 3: ~1,200 banned origins overflowed the snapshot header (struct.error) and the
    restarted host forgot every ban."""
    ban_file = short_tmp / "bans.json"
    sybils = [Identity.generate() for _ in range(1300)]
    junk = rpc_pb2.Message(data=b"\xff" * 64, topicIDs=[TOPIC])

    async def first_life() -> None:
        async with host_under_test(short_tmp, ban_file=ban_file) as (host, node):
            validate = host._validator(Kind.HEARTBEAT.name)
            for sybil in sybils:  # each one delivers junk three times: -30, banned below -20
                forwarder = ID.from_base58(sybil.peer_id)
                for _ in range(3):
                    validate(forwarder, junk)
            assert len(host.pipeline.scores.banned()) == 1300
            ban_lines = [r for r in caplog.records if "banned" in r.getMessage()]
            assert len(ban_lines) == 1  # one line per 10 s however many peers get banned
            frame = encode_frame(Snapshot(host.snapshot()))
            (decoded,) = FrameDecoder().feed(frame)
            status = P2PStatus.from_snapshot(decoded.status)
            assert status.banned_total == 1300 and len(status.banned_peers) == SNAPSHOT_MAX_BANNED
            assert {b.reason for b in status.banned_peers} == {"decode_error"}
            assert all(b.expires_at > time.time() for b in status.banned_peers)
            seen = len(node.snapshots)
            await wait_for(lambda: len(node.snapshots) > seen + 1, "snapshots to keep flowing")
            assert node.snapshots[-1]["banned_total"] == 1300
            # The maintenance tick saves changed bans (at most every few seconds), before any crash.
            await wait_for(
                lambda: ban_file.exists() and "decode_error" in ban_file.read_text(), "the ban file"
            )

    trio.run(first_life)
    (short_tmp / "ipc.sock").unlink()

    async def second_life() -> None:
        async with host_under_test(short_tmp, ban_file=ban_file) as (host, _node):
            assert len(host.pipeline.scores.banned()) == 1300
            banned = ID.from_base58(sybils[0].peer_id)
            assert banned in host.pubsub.blacklisted_peers
            # Kademlia, the peer list and our own keeper all dial through the network: refused there.
            with pytest.raises(SwarmException, match="banned"):
                await host.host.get_network().dial_peer(banned)
            assert host.drops["dial_refused_banned"] == 1

    trio.run(second_life)


def test_a_message_carrying_libp2p_author_fields_is_counted_and_bans_the_connection_that_sent_it(
    short_tmp: Path,
) -> None:
    """StrictNoSign: a valid envelope inside a pubsub message with ``from``/``seqno``/``signature``/
    ``key`` (here a forged libp2p signature) is dropped before our pipeline, and the forwarder blamed."""
    author, relay = Identity.generate(), Identity.generate()
    msg = rpc_pb2.Message(
        from_id=ID.from_base58(author.peer_id).to_bytes(),
        data=heartbeat(author, 1),
        seqno=b"\x00" * 8,
        topicIDs=[TOPIC],
        signature=b"\x01" * 64,
        key=author.key_pair.public_key.serialize(),
    )

    async def scenario() -> None:
        async with host_under_test(short_tmp) as (host, node):
            forwarder = ID.from_base58(relay.peer_id)
            await host.pubsub.push_msg(forwarder, msg)
            assert host.drops["libp2p_signing_policy"] == 1
            assert host.pipeline.peer_counts(relay.peer_id)[Reason.LIBP2P_SIGNING_POLICY] == 1
            assert (
                host.pipeline.scores.is_banned(relay.peer_id) and forwarder in host.pubsub.blacklisted_peers
            )
            assert not host.pipeline.scores.is_banned(author.peer_id)
            assert node.delivered == []

    trio.run(scenario)


def test_library_log_only_drops_become_counters_and_multiline_errors_one_line(short_tmp: Path) -> None:
    relay = Identity.generate()

    async def scenario() -> None:
        async with host_under_test(short_tmp) as (host, _node):
            # The exact record py-libp2p 0.8.1 emits when an inbound RPC exceeds its 1 MiB limit.
            logging.getLogger("libp2p.pubsub.pubsub").warning(
                "Inbound pubsub RPC from peer %s exceeded size limit: %s",
                ID.from_base58(relay.peer_id),
                "too big",
            )
            assert host.drops["libp2p_rpc_too_large"] == 1
            assert host.pipeline.peer_counts(relay.peer_id)[Reason.RPC_TOO_LARGE] == 1
            assert host.pipeline.scores.score(relay.peer_id) == 0  # honest peers can coalesce: no penalty

    trio.run(scenario)
    record = logging.LogRecord(
        "libp2p.host", logging.ERROR, __file__, 1, "Failed:\n  Error: %s\n  more", ("x",), None
    )
    assert _FirstLineOnly().filter(record) and record.getMessage() == "Failed:"


def test_a_host_its_only_peer_pruned_and_backed_off_still_gets_that_peers_messages_by_gossip(
    short_tmp: Path,
) -> None:
    """docs/DESIGN.md "Gossip reaches peers in backoff": with no mesh link either way and a GRAFT
    backoff of a minute on both sides, the message still arrives, by IHAVE and IWANT."""
    alice = Identity.generate()

    async def scenario() -> None:
        async with host_under_test(short_tmp) as (host, node), attached(Publisher(alice), host) as peer:
            await peer.pubsub.subscribe(TOPIC)
            await wait_for(lambda: host.my_id in peer.gossipsub.mesh.get(TOPIC, set()), "the peer's mesh")
            for router, other in ((peer.gossipsub, host.my_id), (host.gossipsub, peer.host.get_id())):
                router.mesh[TOPIC].discard(other)  # pruned, each way
                router._add_back_off(other, TOPIC, False, 60)
            envelope = heartbeat(alice, 1)
            await peer.publish(envelope)
            # Well within the backoff: without gossip to backed-off peers nothing arrives for 60 s.
            await wait_for(lambda: message_id(envelope).hex() in node.delivered_ids(), "the envelope", 20.0)
            assert peer.gossipsub.mesh[TOPIC] == set() and host.gossipsub.mesh.get(TOPIC) == set()

    trio.run(scenario)
