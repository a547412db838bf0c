"""The libp2p host process: gossipsub, discovery and validation, isolated from the trainer.

Started by :class:`swarmnode.p2p.client.P2PClient` as ``python -m swarmnode.p2p.host --config C
--key K --ipc SOCKET``; it connects back to the node over the Unix socket and exits when that
socket closes. Everything here runs in one trio event loop:

- settings per docs/LIBP2P.md: Noise only, Yamux, /meshsub/1.1.0 only, small degree, 1 s heartbeat,
  adaptive gossip and the built-in spam limiter off, strict signing, content-addressed message ids;
- every received message passes the ordered :class:`ValidationPipeline` as a topic validator
  (wrapped so no exception can kill the host); rejected messages are not forwarded and their
  sender is penalized, banned peers are disconnected and not redialed until the ban expires;
- accepted messages are drained at once from the subscription into a bounded queue (drops
  counted) and forwarded to the node;
- publishes wait while any peer's outbound queue holds 4 or more RPCs (the library drops silently
  at 32), for a bounded time, then count a drop;
- bootstraps are dialed with backoff forever; Kademlia (server mode, random walk) and a tiny
  peer-list protocol (swarmnode.p2p.discovery) find the rest;
  peers whose pubsub stream died while the connection stayed up are disconnected and redialed;
- with no peers the host keeps running and reports ``silo``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import multiaddr
import trio
from google.protobuf.message import DecodeError
from libp2p import new_host
from libp2p.abc import INetStream
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.exceptions import ParseError
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from swarmnode.config import P2PConfig
from swarmnode.identity import Identity
from swarmnode.p2p.discovery import PeerListExchange
from swarmnode.p2p.ipc import (
    Deliver,
    FrameDecoder,
    IPCError,
    Publish,
    Report,
    Shutdown,
    Snapshot,
    encode_frame,
)
from swarmnode.p2p.pipeline import Reason, ValidationPipeline
from swarmnode.wire import Kind, message_id

log = logging.getLogger("swarmnode.p2p.host")

TOPICS: dict[str, str] = {kind.name: kind.topic for kind in Kind}
# Measured (LIBP2P.md): per-peer RPC queues drop silently at 32; waiting below 4 delivered 200/200.
PEER_QUEUE_HIGH_WATER = 4
PUBLISH_MAX_WAIT_S = 2.0
# libp2p drops payloads above 1,048,176 bytes silently; leave room for the RPC framing.
LIBP2P_MAX_DATA = 1_040_000
SNAPSHOT_INTERVAL_S = 0.5
MAINTAIN_INTERVAL_S = 1.0
DIAL_TIMEOUT_S = 5.0
DIAL_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
PUBSUB_DEAD_AFTER_S = 5.0  # connected but without a pubsub stream this long: reconnect
IPC_WRITE_QUEUE = 256
PEER_EXCHANGE_INTERVAL_S = 2.0  # while below degree_high connections


def content_message_id(msg: rpc_pb2.Message) -> bytes:
    """Message id = hash of the envelope, so one envelope cannot circulate under many ids."""
    return message_id(msg.data)


@dataclass
class PeerCounters:
    connected_since: float
    msgs_in: int = 0
    bytes_in: int = 0
    msgs_out: int = 0
    bytes_out: int = 0


@dataclass
class DialState:
    """Backoff bookkeeping for one address we keep trying."""

    attempts: int = 0
    next_try: float = 0.0

    def failed(self, now: float) -> None:
        self.next_try = now + DIAL_BACKOFF_S[min(self.attempts, len(DIAL_BACKOFF_S) - 1)]
        self.attempts += 1

    def succeeded(self) -> None:
        self.attempts, self.next_try = 0, 0.0


class GuardedPubsub(Pubsub):
    """Pubsub that survives two py-libp2p 0.8.1 failure modes, each of which took the host down.

    - An unparseable RPC: protobuf's DecodeError escapes the stream reader (measured: a burst of
      large messages coalesced into an RPC over the 1 MiB read limit). Turned into a ParseError,
      the library resets that peer's stream; the liveness check reconnects it.
    - Banning a peer (blacklist) races with the peer's own disconnect: the library's teardown
      does `del self.peers[peer_id]` after an await, and a KeyError there kills the host
      (measured in the adversarial test, about 1 run in 3).
    """

    async def _teardown_if_connected(self, peer_id: ID) -> None:
        stream = self.peers.get(peer_id)
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.reset()
            self.peers.pop(peer_id, None)
        self._forget_all_subscriptions(peer_id)

    async def continuously_read_stream(self, stream: INetStream) -> None:
        try:
            await super().continuously_read_stream(stream)
        except DecodeError as exc:
            log.warning("unparseable pubsub RPC from %s; resetting its stream", stream.muxed_conn.peer_id)
            raise ParseError(f"unparseable pubsub RPC: {exc}") from exc


class SwarmHost:
    """One libp2p host with its gossip topics, validation, discovery and the IPC link to the node."""

    def __init__(self, cfg: P2PConfig, identity: Identity, ipc_path: Path) -> None:
        self.cfg = cfg
        self.identity = identity
        self.ipc_path = ipc_path
        self.pipeline = ValidationPipeline.from_config(cfg)
        self.host = new_host(
            key_pair=identity.key_pair,
            sec_opt={
                NOISE_PROTOCOL_ID: NoiseTransport(
                    identity.key_pair, noise_privkey=create_x25519_key_pair().private_key
                )
            },
            muxer_preference="YAMUX",
            announce_addrs=[multiaddr.Multiaddr(a) for a in cfg.announce] or None,
        )
        self.my_id = self.host.get_id()
        self.gossipsub = GossipSub(
            protocols=[PROTOCOL_ID_V11],
            degree=cfg.degree,
            degree_low=cfg.degree_low,
            degree_high=cfg.degree_high,
            heartbeat_interval=cfg.heartbeat_interval,  # type: ignore[arg-type]  # trio.sleep takes floats
            adaptive_gossip_enabled=False,
            spam_protection_enabled=False,
        )
        self.pubsub = GuardedPubsub(
            self.host, self.gossipsub, strict_signing=True, msg_id_constructor=content_message_id
        )
        self.dht = KadDHT(self.host, DHTMode.SERVER, enable_random_walk=True)
        self.peer_exchange = PeerListExchange(self.host)
        self.next_peer_exchange = 0.0
        self.bootstraps = [info_from_p2p_addr(multiaddr.Multiaddr(a)) for a in cfg.bootstrap]
        # counters and state, all touched only from the trio thread
        self.peers: dict[ID, PeerCounters] = {}
        self.drops: dict[str, int] = defaultdict(int)
        self.totals = {"msgs_in": 0, "bytes_in": 0, "msgs_out": 0, "bytes_out": 0}
        self.dial_state: dict[ID, DialState] = defaultdict(DialState)
        self.pubsub_missing_since: dict[ID, float] = {}
        self.silo = True
        self._to_disconnect_tx, self._to_disconnect_rx = trio.open_memory_channel[ID](math.inf)
        self._publish_tx, self._publish_rx = trio.open_memory_channel[Publish](64)
        self._accepted_tx, self._accepted_rx = trio.open_memory_channel[Deliver](cfg.receive_queue)
        self._ipc_tx, self._ipc_rx = trio.open_memory_channel[bytes](IPC_WRITE_QUEUE)

    # ----------------------------------------------------------------- validation (sync, never raises)
    def _validator(self, kind: str):  # noqa: ANN202 - libp2p's SyncValidatorFn
        def validate(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            if forwarder == self.my_id:
                return True  # our own publish: the node built and signed it
            try:
                return self._validate(kind, forwarder, msg)
            except Exception:  # a validator exception would take the whole host down (#1118)
                log.exception("validator failed on a message from %s; dropping it", forwarder)
                self.drops["validator_error"] += 1
                return False

        return validate

    def _validate(self, kind: str, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        verdict = self.pipeline.validate(Kind[kind], msg.data, ID(msg.from_id).to_base58())
        counters = self._peer(forwarder)
        counters.msgs_in += 1
        counters.bytes_in += len(msg.data)
        self.totals["msgs_in"] += 1
        self.totals["bytes_in"] += len(msg.data)
        if verdict.banned_now:
            self._ban(ID(msg.from_id))
        return verdict.accepted

    def _ban(self, peer: ID) -> None:
        """The pipeline banned ``peer``: stop taking its messages, disconnect it, don't redial it."""
        self.pubsub.add_to_blacklist(peer)
        self._to_disconnect_tx.send_nowait(peer)
        log.warning("peer %s banned for %.0f s: disconnecting it", peer, self.cfg.ban_seconds)

    def _is_banned(self, peer: ID) -> bool:
        return self.pipeline.scores.is_banned(peer.to_base58())

    def _peer(self, peer: ID) -> PeerCounters:
        if peer not in self.peers:
            self.peers[peer] = PeerCounters(connected_since=time.time())
        return self.peers[peer]

    # ----------------------------------------------------------------- main
    async def run(self) -> None:
        listen = [multiaddr.Multiaddr(a) for a in self.cfg.listen]
        ipc = await trio.open_unix_socket(str(self.ipc_path))
        async with (
            self.host.run(listen_addrs=listen),
            background_trio_service(self.pubsub),
            background_trio_service(self.gossipsub),
            background_trio_service(self.dht),
            trio.open_nursery() as nursery,
        ):
            await self.pubsub.wait_until_ready()
            for kind, topic in TOPICS.items():
                self.pubsub.set_topic_validator(topic, self._validator(kind), is_async_validator=False)
                subscription = await self.pubsub.subscribe(topic)
                nursery.start_soon(self._drain_subscription, kind, subscription)
            log.info("p2p host %s listening on %s", self.my_id, [str(a) for a in self.host.get_addrs()])
            nursery.start_soon(self._ipc_write_loop, ipc)
            nursery.start_soon(self._forward_loop)
            nursery.start_soon(self._publish_loop)
            nursery.start_soon(self._maintain_loop)
            nursery.start_soon(self._disconnect_loop)
            nursery.start_soon(self._snapshot_loop)
            await self._ipc_read_loop(ipc)  # returns on Shutdown or when the node goes away
            nursery.cancel_scope.cancel()

    # ----------------------------------------------------------------- IPC
    async def _ipc_read_loop(self, ipc: trio.SocketStream) -> None:
        decoder = FrameDecoder()
        while True:
            chunk = await ipc.receive_some(1 << 16)
            if not chunk:
                log.warning("the node closed the IPC socket; host exiting")
                return
            try:
                frames = list(decoder.feed(chunk))
            except IPCError as exc:
                log.error("bad frame from the node, exiting: %s", exc)
                return
            for frame in frames:
                if isinstance(frame, Shutdown):
                    log.info("shutdown requested by the node")
                    return
                if isinstance(frame, Publish):
                    try:
                        self._publish_tx.send_nowait(frame)
                    except trio.WouldBlock:
                        self.drops["host_publish_queue_full"] += 1
                elif isinstance(frame, Report):
                    self._on_report(frame)

    def _on_report(self, report: Report) -> None:
        try:
            peer, reason = ID.from_base58(report.peer_id), Reason(report.reason.lower())
        except ValueError:
            log.error("the node reported %r for peer %r: not a known peer id / reason", report.reason, report.peer_id)
            return
        if self.pipeline.report(report.peer_id, reason):
            self._ban(peer)

    async def _ipc_write_loop(self, ipc: trio.SocketStream) -> None:
        async for data in self._ipc_rx:
            await ipc.send_all(data)

    # ----------------------------------------------------------------- receive
    async def _drain_subscription(self, kind: str, subscription: Any) -> None:
        """Empty the library's 32-message subscription buffer at once into our bounded queue."""
        while True:
            msg = await subscription.get()
            if msg.from_id == self.my_id.to_bytes():
                continue  # our own publish, echoed back
            item = Deliver(
                kind=kind,
                data=msg.data,
                origin=ID(msg.from_id).to_base58(),
                msg_id=content_message_id(msg).hex(),
                received_at=time.time(),
            )
            try:
                self._accepted_tx.send_nowait(item)
            except trio.WouldBlock:
                self.drops["host_receive_queue_full"] += 1

    async def _forward_loop(self) -> None:
        async for item in self._accepted_rx:
            try:
                frame = encode_frame(item)
            except IPCError:
                self.drops["ipc_frame_too_large"] += 1
                continue
            await self._ipc_tx.send(frame)

    # ----------------------------------------------------------------- publish
    async def _publish_loop(self) -> None:
        async for item in self._publish_rx:
            if len(item.data) > LIBP2P_MAX_DATA:
                log.warning("not publishing a %d-byte message: libp2p drops anything over ~1 MB", len(item.data))
                self.drops["publish_too_large"] += 1
                continue
            if not await self._wait_for_peer_queues():
                self.drops["publish_backpressure"] += 1
                continue
            topic = TOPICS[item.kind]
            await self.pubsub.publish(topic, item.data)
            self.totals["msgs_out"] += 1
            self.totals["bytes_out"] += len(item.data)
            for peer in self.gossipsub.mesh.get(topic, ()):
                counters = self._peer(peer)
                counters.msgs_out += 1
                counters.bytes_out += len(item.data)

    async def _wait_for_peer_queues(self) -> bool:
        with trio.move_on_after(PUBLISH_MAX_WAIT_S):
            while any(len(q) >= PEER_QUEUE_HIGH_WATER for q in list(self.pubsub.peer_queues.values())):
                await trio.sleep(0.005)
            return True
        return False

    # ----------------------------------------------------------------- connections
    async def _maintain_loop(self) -> None:
        """Dial bootstraps and discovered peers with backoff, enforce bans, watch pubsub liveness."""
        for info in self.bootstraps:
            self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 3600 * 24)
        while True:
            try:
                await self._maintain_once()
            except Exception:
                log.exception("connection maintenance failed; retrying")
            await trio.sleep(MAINTAIN_INTERVAL_S)

    async def _maintain_once(self) -> None:
        now = time.monotonic()
        for peer in self.pipeline.scores.ban_expired():
            self.pubsub.remove_from_blacklist(ID.from_base58(peer))
            log.info("ban of %s expired; it may reconnect", peer)
        connected = set(self.host.get_connected_peers())
        for peer in connected:
            if self._is_banned(peer):
                self._to_disconnect_tx.send_nowait(peer)
        self._check_pubsub_liveness(connected, now)
        self._update_silo(connected)

        wanted = [info.peer_id for info in self.bootstraps]
        if len(connected) < self.cfg.degree_high:
            if connected and now >= self.next_peer_exchange:
                await self.peer_exchange.ask_some()
                self.next_peer_exchange = now + PEER_EXCHANGE_INTERVAL_S
            wanted += list(self.host.get_peerstore().peers_with_addrs())
        to_dial: list[ID] = []
        for peer in dict.fromkeys(wanted):
            if peer == self.my_id or peer in connected or self._is_banned(peer):
                continue
            if self.dial_state[peer].next_try <= now:
                to_dial.append(peer)
        async with trio.open_nursery() as nursery:
            for peer in to_dial[: 2 * self.cfg.degree_high]:
                nursery.start_soon(self._dial, peer)

    async def _dial(self, peer: ID) -> None:
        info = PeerInfo(peer, self.host.get_peerstore().addrs(peer))
        state = self.dial_state[peer]
        try:
            with trio.fail_after(DIAL_TIMEOUT_S):
                await self.host.connect(info)
            state.succeeded()
            log.info("connected to %s", peer)
        except Exception as exc:  # unreachable peers are normal; keep trying with backoff
            state.failed(time.monotonic())
            log.debug("dial %s failed (%s); next try in %.0f s", peer, exc, state.next_try - time.monotonic())

    def _check_pubsub_liveness(self, connected: set[ID], now: float) -> None:
        """An oversize inbound message resets the peer's pubsub stream but not the connection."""
        for peer in connected:
            self._peer(peer)  # starts its connected_since clock
            if peer in self.pubsub.peers:
                self.pubsub_missing_since.pop(peer, None)
                continue
            since = self.pubsub_missing_since.setdefault(peer, now)
            if now - since > PUBSUB_DEAD_AFTER_S and not self._is_banned(peer):
                log.warning("peer %s is connected without a pubsub stream; reconnecting", peer)
                self.pubsub_missing_since.pop(peer, None)
                self.dial_state[peer].succeeded()
                self._to_disconnect_tx.send_nowait(peer)
        for peer in list(self.peers):
            if peer not in connected:
                del self.peers[peer]
                self.pubsub_missing_since.pop(peer, None)

    def _update_silo(self, connected: set[ID]) -> None:
        silo = not any(p in self.pubsub.peers for p in connected)
        if silo != self.silo:
            if silo:
                log.warning("no reachable peers: this node trains alone (silo) and keeps dialing bootstraps")
            else:
                log.info("joined the swarm: %d peer(s) connected", len(connected))
            self.silo = silo

    async def _disconnect_loop(self) -> None:
        async for peer in self._to_disconnect_rx:
            try:
                await self.host.disconnect(peer)
            except Exception as exc:
                log.debug("disconnect %s failed: %s", peer, exc)

    # ----------------------------------------------------------------- status
    def snapshot(self) -> dict[str, Any]:
        scores = self.pipeline.scores
        mesh = set().union(*self.gossipsub.mesh.values()) if self.gossipsub.mesh else set()
        peers = []
        for peer, counters in self.peers.items():
            name = peer.to_base58()
            if scores.is_banned(name):
                continue  # listed under "banned"; it is cut again within a second if it redials
            verdicts = {str(reason): n for reason, n in self.pipeline.peer_counts(name).items()}
            peers.append({"peer_id": name, "addrs": self._addrs_of(peer), **asdict(counters), "verdicts": verdicts,
                          "score": round(scores.score(name), 3), "in_mesh": peer in mesh})  # fmt: skip
        verdicts: dict[str, int] = defaultdict(int)
        for (_kind, reason), n in self.pipeline.counts.items():
            verdicts[str(reason)] += n
        return {
            "peer_id": self.my_id.to_base58(),
            "listen_addrs": [str(a) for a in self.host.get_addrs()],
            "peers": peers,
            **self.totals,
            "verdicts": dict(verdicts),
            "drops": dict(self.drops),
            "banned": scores.banned(),
            "silo": self.silo,
            "snapshot_at": time.time(),
        }

    def _addrs_of(self, peer: ID) -> list[str]:
        try:
            return sorted({str(a) for a in self.host.get_peerstore().addrs(peer)})[:8]
        except Exception:  # the peerstore raises for a peer without stored addresses
            return []

    async def _snapshot_loop(self) -> None:
        while True:
            # When the node is not reading, skip: the next snapshot supersedes this one.
            with contextlib.suppress(trio.WouldBlock):
                self._ipc_tx.send_nowait(encode_frame(Snapshot(self.snapshot())))
            await trio.sleep(SNAPSHOT_INTERVAL_S)


def configure_logging(level: str) -> None:
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler])
    # libp2p's logger does not propagate: without a handler of our own its warnings vanish. Its
    # modules set their own levels (some chatty at INFO), so filter on the handler.
    libp2p_handler = logging.StreamHandler(sys.stderr)
    libp2p_handler.setFormatter(formatter)
    libp2p_handler.setLevel(logging.WARNING)
    logging.getLogger("libp2p").addHandler(libp2p_handler)
    # "GRAFT flood detected" fires constantly at N=8 and is harmless with library scoring off.
    logging.getLogger("libp2p.pubsub.gossipsub").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="swarmnode libp2p host process (started by the node)")
    parser.add_argument("--config", type=Path, required=True, help="P2PConfig as JSON")
    parser.add_argument("--key", type=Path, required=True, help="Ed25519 identity key file")
    parser.add_argument("--ipc", type=Path, required=True, help="the node's Unix socket")
    parser.add_argument("--log-level", default=os.environ.get("SWARMNODE_P2P_LOG", "INFO"))
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    cfg = P2PConfig.model_validate_json(args.config.read_text())
    identity = Identity.load_or_create(args.key)
    host = SwarmHost(cfg, identity, args.ipc)
    try:
        trio.run(host.run)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
