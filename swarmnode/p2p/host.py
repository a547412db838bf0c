"""The libp2p host process: gossipsub, discovery and validation, isolated from the trainer.

Started by :class:`swarmnode.p2p.client.P2PClient` as ``python -m swarmnode.p2p.host --config C
--key K --ipc SOCKET``; it connects back to the node over the Unix socket and exits when that
socket closes. Everything here runs in one trio event loop:

- settings per docs/LIBP2P.md: Noise only, Yamux, /meshsub/1.1.0 only, small degree, 1 s heartbeat,
  adaptive gossip and the built-in spam limiter off, content-addressed message ids, and (wire
  protocol 2, kept in 3) StrictNoSign: the envelope's signature is a message's only one (``NoSignGossipSub``);
- every received message passes the ordered :class:`ValidationPipeline` as a topic validator
  (wrapped so no exception can kill the host), called by the libp2p peer that delivered it (the
  forwarder); rejected messages are not forwarded and the blamed peers (forwarder, author) are
  penalized; banned peers are disconnected, refused at the dial path (Kademlia included) and not
  redialed until the ban expires; bans are saved to a file so a restarted host keeps them;
- py-libp2p's validation cache is bypassed (:class:`GuardedPubsub`): it keeps any verdict per
  message id for 300 s, which let a state-dependent drop (rate, duplicate) censor a later valid
  delivery and let replays skip our pipeline once the 120-180 s seen cache forgot them;
- accepted messages are drained at once from the subscription into the bounded queue to the node
  (drops counted); frames queued meanwhile go to the node in one socket write;
- publishes wait while any peer's outbound queue holds 4 or more RPCs (the library drops silently
  at 32), for a bounded time, then count a drop;
- bootstraps are dialed with backoff forever; Kademlia (server mode, random walks only while the
  host needs peers) and a tiny peer-list protocol (swarmnode.p2p.discovery) find the rest;
- with ``p2p.rollout_shards`` = K > 1 rollout batches use the host's shard topic only
  (``shard_of``, ``topics_for``; docs/DESIGN.md "Cost per node against swarm size"), and the host
  dials peers of its own shard first;
- per-RPC costs of py-libp2p 0.8.1 cut without dropping a check: yamux window updates at half the
  window (``window_update_at_half``), one stream read per RPC (``BufferedStreamReader``), one
  socket read per Noise frame (``buffered_tcp_read``), verified peer records remembered
  (``SignedRecordCache``), debug log arguments built only when DEBUG is on
  (``swarmnode.p2p.lazy_debug``), no task spawned for a copy ``push_msg`` would drop at once, a
  new message judged in its stream's order and forwarded from a plain trio task
  (``GuardedPubsub.skip_seen_copies``), each check made once (``GuardedPubsub.push_msg``), no
  forward written to a peer that already sent us the message (``GuardedPubsub.write_msg``), gossip
  keyed by message id (``ContentIdMessageCache``), free locks taken without a trip through the
  scheduler (``free_locks_without_yield``); ``SWARMNODE_P2P_BASELINE=1`` turns the cuts off (and
  uses the library's StrictSign) for before/after measurements;
  peers whose pubsub stream died while the connection stayed up are disconnected and redialed;
- with no peers the host keeps running and reports ``silo``.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
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
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.trio import TrioTCPStream
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub import gossipsub as libp2p_gossipsub
from libp2p.pubsub import pubsub as libp2p_pubsub
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.mcache import CacheEntry, MessageCache
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.validators import signature_validator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import YamuxStream
from libp2p.tools.anyio_service import background_trio_service

from swarmnode.config import P2PConfig
from swarmnode.identity import Identity
from swarmnode.p2p.discovery import PeerListExchange
from swarmnode.p2p.ipc import (
    SNAPSHOT_MAX_BANNED,
    SNAPSHOT_MAX_PEERS,
    Deliver,
    FrameDecoder,
    IPCError,
    Publish,
    Report,
    Shutdown,
    Snapshot,
    encode_frame,
)
from swarmnode.p2p.lazy_debug import guard_hot_debug_logs
from swarmnode.p2p.pipeline import Reason, ValidationPipeline
from swarmnode.p2p.scoring import BanRecord
from swarmnode.wire import Kind, message_id

log = logging.getLogger("swarmnode.p2p.host")

TOPICS: dict[str, str] = {kind.name: kind.topic for kind in Kind}  # unsharded (rollout_shards = 1)
# Measured (LIBP2P.md): per-peer RPC queues drop silently at 32; waiting below 4 delivered 200/200.
PEER_QUEUE_HIGH_WATER = 4
PUBLISH_MAX_WAIT_S = 2.0
# libp2p drops payloads above 1,048,176 bytes silently; leave room for the RPC framing.
LIBP2P_MAX_DATA = 1_040_000
SNAPSHOT_INTERVAL_S = 1.0  # status for the node (and its admin API and metrics): once a second
LOOP_STALL_DUMP_S = 10.0  # the trio thread stuck this long: every thread's stack goes to the host log
MAINTAIN_INTERVAL_S = 1.0
DIAL_TIMEOUT_S = 5.0
DIAL_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
PUBSUB_DEAD_AFTER_S = 5.0  # connected but without a pubsub stream this long: reconnect
HOLDERS_REMEMBERED = 4096  # message ids whose senders a host remembers (newest), for write_msg
MAX_HOLDERS_PER_MESSAGE = 16
# IDONTWANT (gossipsub v1.2's control message, docs/PROTOCOL.md): ids a peer said it does not want,
# kept per peer (newest), so one peer's flood of ids evicts only its own; ids read per IDONTWANT.
DONT_WANT_IDS_PER_PEER = 512
DONT_WANT_PEERS = 256
MAX_DONT_WANT_IDS_PER_CONTROL = 64
MESSAGE_ID_BYTES = 32  # sha256 (wire.message_id)
IPC_SNAPSHOT_HEADROOM = 4  # room for status snapshots beside a full receive queue
IPC_WRITE_BATCH_BYTES = 1 << 20  # queued frames joined into one socket write, up to this size
PEER_EXCHANGE_INTERVAL_S = 2.0  # while below degree_high connections
MAX_DIAL_STATES = 4096
BAN_LOG_INTERVAL_S = 10.0  # at most one "banned" log line per interval; the rest are counted
BAN_FILE_MAX_BYTES = 4 * 1024 * 1024
BAN_SAVE_INTERVAL_S = 5.0  # a flood of bans rewrites the file at most this often (and once at exit)
PROFILE_ENV = "SWARMNODE_P2P_PROFILE"  # a directory: the host writes a cProfile dump there on exit
# Measurement only: "1" restores the py-libp2p 0.8.1 behaviour this host changes for cost (a yamux
# window update per read; two socket reads per Noise frame; debug log arguments always built;
# Kademlia random walks whatever the connection count; peer records re-verified and rebuilt on every
# RPC; a managed task spawned per copy; every forward written), so scripts/bench_gossip.py
# --compare-baseline measures before and after in one run. Never in production.
BASELINE_ENV = "SWARMNODE_P2P_BASELINE"
MAX_CONNECTIONS_SHARDED = 24  # sharded: stop dialing for own-shard peers beyond this many connections
ADDR_CACHE_S = 10.0  # status snapshots reuse a peer's formatted addresses this long


def shard_of(peer_id: str, shards: int) -> int:
    """The rollout shard of a peer: the first 8 bytes of sha256(peer id text), big-endian, mod ``shards``.

    A function of the peer id alone, so a host knows the shard of any peer it has heard of before
    dialing it, and nodes agree on it without a protocol.
    """
    if shards <= 1:
        return 0
    return int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:8], "big") % shards


def pruned_addr_cache(cache: dict[Any, Any], connected: Any, keep: int) -> dict[Any, Any]:
    """The newest ``keep`` entries of connected peers: pruning then happens once per ``keep``
    inserts at most, even with more connected peers than the cache may hold (keeping every connected
    peer would rebuild the cache on every insert)."""
    return dict([(p, v) for p, v in cache.items() if p in connected][-keep:])


def topics_for(shards: int, shard: int) -> dict[str, str]:
    """Kind name -> topic; with ``shards`` > 1 rollout batches go to ``<topic>/<shards>/<shard>``."""
    topics = {kind.name: kind.topic for kind in Kind}
    if shards > 1:
        topics[Kind.ROLLOUT_BATCH.name] = f"{Kind.ROLLOUT_BATCH.topic}/{shards}/{shard}"
    return topics


class SignedRecordCache:
    """Skips py-libp2p's repeated peer-record work on every pubsub RPC, keeping its checks.

    py-libp2p 0.8.1 attaches the sender's signed peer record to every RPC it sends, rebuilding it
    from the host's addresses each time, and verifies the record of every RPC it receives (Ed25519
    verify plus a rewrite of the peer's addresses in the peerstore): ~7 % of a host's CPU in the
    gossip bench. Here a record that verified is remembered per (receiving host, peer, exact bytes)
    for ``ttl_s``, at most ``capacity`` of them: the same bytes from the same peer would verify the
    same way, so the RPC is let through without redoing it (that host's peerstore already holds
    those addresses). Any other bytes take the library's full path, and a failure is never
    remembered. A host's own record is rebuilt at most every ``own_s``.
    """

    def __init__(self, capacity: int = 4096, ttl_s: float = 600.0, own_s: float = 10.0) -> None:
        self.capacity, self.ttl_s, self.own_s = capacity, ttl_s, own_s
        self.verified: OrderedDict[tuple[ID, ID, bytes], float] = OrderedDict()
        self.hits = 0
        self._own: dict[ID, tuple[float, tuple[bytes, bool]]] = {}

    def wrap_consume(self, consume: Callable[[Any, Any, ID], bool]) -> Callable[[Any, Any, ID], bool]:
        def consume_cached(msg: Any, host: Any, peer_id: ID) -> bool:
            if not msg.HasField("senderRecord"):
                return True
            key, now = (host.get_id(), peer_id, bytes(msg.senderRecord)), time.monotonic()
            seen = self.verified.get(key)
            if seen is not None and now - seen < self.ttl_s:
                self.hits += 1
                return True
            ok = consume(msg, host, peer_id)
            if ok:
                self.verified[key] = now
                self.verified.move_to_end(key)
                while len(self.verified) > self.capacity:
                    self.verified.popitem(last=False)
            return ok

        return consume_cached

    def wrap_own(self, make: Callable[[Any], tuple[bytes, bool]]) -> Callable[[Any], tuple[bytes, bool]]:
        def own_cached(host: Any) -> tuple[bytes, bool]:
            now, me = time.monotonic(), host.get_id()
            cached = self._own.get(me)
            if cached is None or now - cached[0] >= self.own_s:
                if len(self._own) >= 64:  # one host per process in production; tests run a few
                    self._own.clear()
                cached = self._own[me] = (now, make(host))
            return cached[1]

        return own_cached


# Bytes read from and written to this process's libp2p TCP connections (Noise, yamux, every
# protocol, duplicates included): what a node pays on the wire. Counted by a wrapper on
# RawConnection, once per process (one host per process outside the tests).
WIRE_BYTES = {"in": 0, "out": 0}


def count_wire_bytes() -> None:
    if getattr(RawConnection, "_swarmnode_counted", False):
        return
    read, write = RawConnection.read, RawConnection.write

    async def counted_read(self: RawConnection, n: int | None = None) -> bytes:
        data = await read(self, n)
        WIRE_BYTES["in"] += len(data)
        return data

    async def counted_write(self: RawConnection, data: bytes) -> None:
        await write(self, data)
        WIRE_BYTES["out"] += len(data)

    RawConnection.read, RawConnection.write = counted_read, counted_write  # type: ignore[method-assign]
    RawConnection._swarmnode_counted = True  # type: ignore[attr-defined]


async def window_update_at_half(self: YamuxStream, *, bytes_read: int = 0) -> None:
    """go-yamux's receive-window rule: credit the peer only once half the window is consumed.

    py-libp2p 0.8.1 also sends a WINDOW_UPDATE whenever any consumed bytes are outstanding (its
    "partial slack" branch, which ``PY_YAMUX_RELEASE_ON_READ=0`` does not turn off): about one
    12-byte frame per RPC read, each encrypted, written, and read and handled by the peer. Here the
    peer's credit falls to at most half the target window before it is restored in one frame; the
    library's window auto-tuning (doubling the target within 4 RTTs) is kept.
    """
    del bytes_read  # what was consumed shows in recv_window and the buffer, as in go-yamux
    async with self.window_lock:
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        delta = self.target_recv_window - (self.recv_window + buffered)
        if delta < self.target_recv_window // 2:
            return
        self.recv_window += delta
        delta += self._apply_autotune_epoch(buffered)
    await self.send_window_update(delta, skip_lock=True)


LIBRARY_WINDOW_UPDATE = YamuxStream._auto_tune_and_send_window_update  # kept for the baseline test


def batch_yamux_window_updates() -> None:
    """Install :func:`window_update_at_half` on py-libp2p's yamux streams, once per process."""
    if YamuxStream._auto_tune_and_send_window_update is not window_update_at_half:
        YamuxStream._auto_tune_and_send_window_update = window_update_at_half  # type: ignore[method-assign]


TCP_READ_CHUNK = 64 * 1024  # bytes one socket read may take ahead of what the reader asked for


def _take_ahead(stream: TrioTCPStream, n: int | None) -> bytes:
    """Up to ``n`` (None: all) bytes already read from the socket and not yet served; b"" if none."""
    ahead: bytes = stream.__dict__.get("_swarmnode_ahead", b"")
    at: int = stream.__dict__.get("_swarmnode_ahead_at", 0)
    if at >= len(ahead):
        return b""
    end = len(ahead) if n is None else min(len(ahead), at + n)
    stream._swarmnode_ahead_at = end  # type: ignore[attr-defined]
    return ahead[at:end]


async def buffered_tcp_read(self: TrioTCPStream, n: int | None = None) -> bytes:
    """A TCP read that takes up to ``TCP_READ_CHUNK`` bytes from the socket and serves later reads from them.

    Noise reads each frame as two reads (its 2-byte length, then the body), and py-libp2p 0.8.1
    passes each to the socket: a syscall, the stream's read lock and a trio checkpoint per read, at
    least two per RPC. Here a read the buffered bytes can serve returns them at once; otherwise one
    socket read (under the same lock, with the library's error mapping) fetches up to a chunk.
    What is returned, and in what order, is what the socket delivered; at most one chunk is held.
    """
    if n is not None and n <= 0:
        return b""
    data = _take_ahead(self, n)
    if data:
        return data
    async with self.read_lock:
        data = _take_ahead(self, n)  # another reader filled the buffer while this one waited
        if data:
            return data
        try:
            chunk = await self.stream.receive_some(None if n is None else max(n, TCP_READ_CHUNK))
        except trio.BrokenResourceError as error:  # as TrioTCPStream.read: the peer reset it
            raise ConnectionClosedError(
                f"TCP connection reset by remote peer: {error}", transport="tcp"
            ) from error
        except trio.ClosedResourceError:  # closed locally: EOF, as TrioTCPStream.read
            return b""
        if n is None or len(chunk) <= n:
            return chunk
        self._swarmnode_ahead, self._swarmnode_ahead_at = chunk, n  # type: ignore[attr-defined]
        return chunk[:n]


LIBRARY_TCP_READ = TrioTCPStream.read  # kept for the baseline and its test


def buffer_tcp_reads() -> None:
    """Install :func:`buffered_tcp_read` on py-libp2p's TCP streams, once per process."""
    if TrioTCPStream.read is not buffered_tcp_read:
        TrioTCPStream.read = buffered_tcp_read  # type: ignore[method-assign]


def _acquire_free_without_yield(library_acquire: Callable[[Any], Any]) -> Callable[[Any], Any]:
    async def acquire(self: Any) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()  # still a cancel point
        try:
            self.acquire_nowait()
        except trio.WouldBlock:
            await library_acquire(self)  # held by another task: wait as the library does (FIFO)

    acquire.swarmnode_free_without_yield = True  # type: ignore[attr-defined]
    return trio.lowlevel.enable_ki_protection(acquire)


LIBRARY_LOCK_ACQUIRE = {cls: cls.acquire for cls in (trio.Lock, trio.Semaphore)}  # trio's, for a held lock


def free_locks_without_yield() -> None:
    """Make taking a free ``trio.Lock`` or ``trio.Semaphore`` a cancel point only, not a schedule
    point, in this process (once).

    py-libp2p 0.8.1 takes about eight locks per RPC on its way through TCP, Noise, yamux and the
    stream (the stream state, yamux's read-write lock and window lock, the connection's write
    lock, the socket's read and write locks), almost always free. trio's ``acquire`` then still
    yields to the scheduler, so each RPC paid eight trips through the run loop for nothing:
    25 % of the transport's CPU per RPC (measured in-process, 3,000 RPCs of 8 KB sent and
    received: 149 -> 111 us). Here a free lock is taken at once; a held one is waited for as the
    library does (FIFO, handed over on release), and a cancelled task still raises at ``acquire``.
    The run loop is still entered on every socket read and write, so no task holds it for longer
    than one 64 KB read's worth of work.
    """
    for cls, library_acquire in LIBRARY_LOCK_ACQUIRE.items():
        if not getattr(cls.acquire, "swarmnode_free_without_yield", False):
            cls.acquire = _acquire_free_without_yield(library_acquire)  # type: ignore[method-assign]


_record_cache: SignedRecordCache | None = None


def install_record_cache() -> SignedRecordCache:
    """Patch py-libp2p's module-level peer-record helpers once per process; returns the cache."""
    global _record_cache
    if _record_cache is None:
        _record_cache = SignedRecordCache()
        for module in (libp2p_pubsub, libp2p_gossipsub):
            module.maybe_consume_signed_record = _record_cache.wrap_consume(
                module.maybe_consume_signed_record
            )  # type: ignore[attr-defined]
            module.env_to_send_in_RPC = _record_cache.wrap_own(module.env_to_send_in_RPC)  # type: ignore[attr-defined]
    return _record_cache


# The ids of the last messages hashed, by message object: one received message object is hashed
# by the reader, the forward (the router's id and its message cache) and the hand-off to the node.
_RECENT_IDS: OrderedDict[int, tuple[rpc_pb2.Message, bytes]] = OrderedDict()
RECENT_IDS_KEPT = 32


def content_message_id(msg: rpc_pb2.Message) -> bytes:
    """Message id = hash of the envelope, so one envelope cannot circulate under many ids.

    Each message object is hashed once: its id is kept, with the object itself (so its ``id()``
    cannot be reused meanwhile), for the last ``RECENT_IDS_KEPT`` objects; received messages are
    never modified. At 64 KB one hash is ~40 us, and the same object was hashed 4 times.
    """
    key = id(msg)
    kept = _RECENT_IDS.get(key)
    if kept is not None and kept[0] is msg:
        return kept[1]
    msg_id = message_id(msg.data)
    _RECENT_IDS[key] = (msg, msg_id)
    if len(_RECENT_IDS) > RECENT_IDS_KEPT:
        _RECENT_IDS.popitem(last=False)
    return msg_id


class ContentIdMessageCache(MessageCache):
    """gossipsub's message cache, keyed by the message id (``content_message_id``) as the spec says.

    py-libp2p 0.8.1's cache keys every message by ``from + seqno`` whatever the pubsub's id
    function: empty under StrictNoSign, so all messages would share one key. Under StrictSign its
    IHAVE gossip advertised those keys; the receiver looked them up in its seen cache, which holds
    content ids, never found them, and asked for every advertised message with an IWANT (in the
    gossip bench, N = 8: 480 full copies per 25 s run, each of a message the peer already had).
    Keyed by content ids, an IHAVE names what the peer's seen cache knows, and an IWANT finds it.
    """

    def put(self, msg: rpc_pb2.Message) -> None:
        mid = content_message_id(msg)
        if mid in self.msgs:
            return
        self.msgs[mid] = msg
        self.history[0].append(CacheEntry(mid, msg.topicIDs))


# The libp2p message fields StrictNoSign forbids: the author of a swarmnode message is the
# envelope's signer, so a libp2p signature would only verify the same key a second time.
LIBP2P_AUTHOR_FIELDS = ("from_id", "seqno", "signature", "key")


class NoSignGossipSub(GossipSub):
    """py-libp2p 0.8.1's GossipSub for StrictNoSign messages (no ``from``, no ``seqno``).

    The library keys two structures by ``from + seqno``, which is empty for every such message:
    its message cache (replaced by :class:`ContentIdMessageCache`) and its equivocation check
    (the same ``from + seqno`` with other data), which would take every message after the first
    for an equivocation and forward none. An author's sequence numbers are checked by our pipeline
    instead (the ``replay`` rule, on the envelope's signed sequence number).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mcache = ContentIdMessageCache(self.mcache.window_size, self.mcache.history_size)

    def _check_equivocation(self, msg: rpc_pb2.Message) -> bool:
        if not msg.from_id and not msg.seqno:
            return True
        return super()._check_equivocation(msg)

    _choosing_gossip_peers = False

    def gossip_heartbeat(self) -> defaultdict[ID, dict[str, list[bytes]]]:
        """The library's IHAVE gossip, sent to peers in GRAFT backoff too.

        py-libp2p 0.8.1 picks gossip recipients with its GRAFT backoff filter. Backoff only bars
        re-joining a mesh (the spec's gossip goes to any non-mesh peer above the gossip threshold);
        with the filter, a node that every mesh peer pruned at once (oversubscribed meshes prune
        their lowest scorers, so a node that joined last is everyone's lowest) got neither mesh
        copies nor gossip until the backoff ran out: in the 64 KB synchronized gossip bench one
        node of eight received nothing for the first 22 s and nobody received its messages (2 of
        ~80 runs). With gossip it asks for what it misses (IWANT) within a heartbeat.
        """
        self._choosing_gossip_peers = True
        try:
            return super().gossip_heartbeat()
        finally:
            self._choosing_gossip_peers = False

    def _get_in_topic_gossipsub_peers_from_minus(
        self, topic: str, num_to_select: int, minus: Iterable[ID], backoff_check: bool = False
    ) -> list[ID]:
        backoff_check = backoff_check and not self._choosing_gossip_peers
        return super()._get_in_topic_gossipsub_peers_from_minus(topic, num_to_select, minus, backoff_check)

    async def handle_idontwant(self, idontwant_msg: rpc_pb2.ControlIDontWant, sender_peer_id: ID) -> None:
        """Kept by :class:`GuardedPubsub` (per peer, bounded), where ``write_msg`` and the forward look."""
        if isinstance(self.pubsub, GuardedPubsub):
            self.pubsub.note_dont_want(sender_peer_id, idontwant_msg.messageIDs)

    def remove_peer(self, peer_id: ID) -> None:
        super().remove_peer(peer_id)
        if isinstance(self.pubsub, GuardedPubsub):
            self.pubsub.forget_dont_want(peer_id)

    def _get_peers_to_send(
        self, topic_ids: Iterable[str], msg_forwarder: ID, origin: ID, msg_id: bytes | None = None
    ) -> Iterator[ID]:
        """The library's choice, less the peers that have the message (sent it to us, or IDONTWANT):
        no copy of it is made and queued for them (``copies_not_queued``)."""
        pubsub = self.pubsub if msg_id is not None and isinstance(self.pubsub, GuardedPubsub) else None
        for peer in super()._get_peers_to_send(topic_ids, msg_forwarder, origin, msg_id):
            if pubsub is not None and pubsub.peer_has(peer, msg_id):  # type: ignore[arg-type]
                pubsub.copies_not_queued += 1
                continue
            yield peer


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


class BufferedStreamReader:
    """A pubsub stream read in chunks, so that one RPC costs one read of the stream, not three.

    py-libp2p's RPC reader reads the varint length prefix one byte at a time and then the body:
    three reads per RPC, each through the stream's state lock, yamux's stream table lock and its
    window lock (each a trio checkpoint). Here a read of fewer than ``CHUNK`` bytes takes what the
    stream has buffered (at most ``CHUNK``) and serves the next reads from it; larger reads pass
    through once it is drained. Every other attribute is the stream's. The library's checks are
    unchanged: the prefix is still decoded and checked against its RPC size limit before the body
    is read, and at most ``CHUNK`` bytes are held ahead of it.
    """

    CHUNK = 64 * 1024

    def __init__(self, stream: INetStream) -> None:
        self._stream = stream
        self._ahead = b""
        self._at = 0  # bytes of _ahead already served (an offset: no copy of the rest per read)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def read(self, n: int | None = None) -> bytes:
        if self._at == len(self._ahead):
            if n is None or n < 0 or n >= self.CHUNK:
                return await self._stream.read(n)
            self._ahead, self._at = await self._stream.read(self.CHUNK), 0
        end = len(self._ahead) if n is None or n < 0 else self._at + n
        data = self._ahead[self._at : end]
        self._at += len(data)
        return data


class GuardedPubsub(Pubsub):
    """Pubsub that survives two py-libp2p 0.8.1 failure modes, each of which took the host down,
    and that keeps message validity a function of the message id.

    - An unparseable RPC: protobuf's DecodeError escapes the stream reader (measured: a burst of
      large messages coalesced into an RPC over the 1 MiB read limit). Turned into a ParseError,
      the library resets that peer's stream; the liveness check reconnects it.
    - Banning a peer (blacklist) races with the peer's own disconnect: the library's teardown
      does `del self.peers[peer_id]` after an await, and a KeyError there kills the host
      (measured in the adversarial test, about 1 run in 3).
    - ``push_msg`` runs the topic validators on every delivery and caches nothing. The library's
      ``validate_msg`` cached each verdict per message id for 300 s: a drop that depends on state
      (rate, a banned forwarder) then censored the same bytes from every other forwarder, and a
      cached "valid" let a replay through unchecked once the seen cache (120-180 s) had forgotten
      the id. Our pipeline keeps its own, longer windows and caches only verdicts decided by content.
    - Messages follow libp2p's StrictNoSign policy (docs/PROTOCOL.md, "Transport"): ``publish``
      sends data and topics only, and ``push_msg`` reports a received message that carries
      ``from``, ``seqno``, ``signature`` or ``key`` to ``on_signing_policy_broken(forwarder)``.
      With ``strict_signing`` (the measurement baseline) it is the library's StrictSign instead.
    """

    on_signing_policy_broken: Callable[[ID], None] = staticmethod(lambda _forwarder: None)
    # Reports a peer's malformed or excess IDONTWANT ids: (peer, what, how many).
    on_dont_want_junk: Callable[[ID, str, int], None] = staticmethod(lambda _peer, _what, _n: None)
    seen_copies_skipped = 0
    copies_not_sent = 0
    copies_not_queued = 0
    dont_want_sent = 0
    dont_want_ids_received = 0
    dont_want_ids_coalesced = 0
    dont_want_min_bytes = 0  # a first copy this large is announced with IDONTWANT to the mesh (0: never)
    push_failures = 0
    _holders: OrderedDict[bytes, set[ID]]  # content id -> peers that sent it to us (newest last)
    _dont_want: OrderedDict[ID, OrderedDict[bytes, None]]  # peer -> ids it sent IDONTWANT for
    buffered_reads = False  # BufferedStreamReader on every pubsub stream (off: the library's reads)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._holders = OrderedDict()
        self._dont_want = OrderedDict()
        self._dont_want_queued: dict[ID, rpc_pb2.RPC] = {}  # our IDONTWANT still queued for a peer

    def skip_seen_copies(self, push_nursery: trio.Nursery | None = None) -> None:
        """Do not spawn a task for a copy that ``push_msg`` would drop at once (seen, blacklisted);
        with ``push_nursery``, judge the others at once, in the order their stream delivered them,
        and forward an accepted one from a plain trio task there.

        The library's stream reader spawns ``push_msg`` as a managed task for every message of
        every RPC, duplicates included (~70 % of the copies at N = 8 with degree 4), and each spawn
        walks the service's whole task tree to find its parent and builds a task object with its
        own cancel scope and events. ``push_msg`` returns at once for such a copy, so not spawning
        it changes nothing but the cost. Judged in the reader, a peer's messages are validated in
        the order it sent them: as spawned tasks, trio's scheduler ran two messages of one RPC in
        either order, so of two batches one author signed with the same sequence number the later
        one was kept about half the time and the earlier one dropped as its replay (the adversarial
        test's flake); a rejected message no longer costs a task at all. The forward in
        ``push_nursery`` (one that lives as long as the host's services) skips the manager's
        bookkeeping; an exception while judging or forwarding is logged and counted in
        ``push_failures`` (under the library's manager it would have stopped the whole pubsub
        service). Call once the pubsub service runs (its manager exists).
        """
        manager = self.manager
        run_task = manager.run_task

        def run_task_unless_dropped(async_fn: Any, *args: Any, **kwargs: Any) -> None:
            if async_fn == self.push_msg and len(args) == 2 and not kwargs:
                msg_forwarder, msg = args
                msg_id = self._msg_id_constructor(msg)  # hashed once for every use
                self._note_holder(msg_forwarder, msg_id)
                if self._drops_before_signature(msg_forwarder, msg, msg_id):
                    self.seen_copies_skipped += 1
                    return None
                self._announce_dont_want(msg_forwarder, msg, msg_id)
                if push_nursery is not None:
                    try:
                        accepted = self._accept(msg_forwarder, msg, msg_id)
                    except Exception:  # never into the library's stream reader
                        self._count_push_failure(msg_forwarder)
                        return None
                    if accepted:
                        push_nursery.start_soon(self._forward_guarded, msg_forwarder, msg)
                    return None
            return run_task(async_fn, *args, **kwargs)

        manager.run_task = run_task_unless_dropped  # type: ignore[method-assign]

    def _note_holder(self, msg_forwarder: ID, msg_id: bytes) -> None:
        """Remember that ``msg_forwarder`` has the message ``msg_id`` (it sent it to us), for ``write_msg``.

        Keyed by the content id, not by (author, seqno): a restarted host reuses seqnos its
        previous run already sent, and a peer holding the old message would miss the new one.
        """
        with contextlib.suppress(Exception):
            holders = self._holders.setdefault(msg_id, set())
            if len(holders) < MAX_HOLDERS_PER_MESSAGE:
                holders.add(msg_forwarder)
            while len(self._holders) > HOLDERS_REMEMBERED:
                self._holders.popitem(last=False)

    def peer_has(self, peer: ID, msg_id: bytes) -> bool:
        """True when ``peer`` sent us the message ``msg_id``, or told us it does not want it (IDONTWANT)."""
        if peer in self._holders.get(msg_id, ()):
            return True
        dont_want = self._dont_want.get(peer)
        return dont_want is not None and msg_id in dont_want

    def _announce_dont_want(self, msg_forwarder: ID, msg: rpc_pb2.Message, msg_id: bytes) -> None:
        """IDONTWANT to our other mesh peers on the first copy of a large message, before validating it.

        Their forwards of it to us, still queued behind other writes, are then not written
        (gossipsub v1.2's rule: a message at least ``dont_want_min_bytes`` long; the control message
        is one small RPC per peer, sent ahead of queued messages).
        """
        if not self.dont_want_min_bytes or msg.ByteSize() < self.dont_want_min_bytes:
            return
        try:
            router = self.router
            targets = {peer for topic in msg.topicIDs for peer in router.mesh.get(topic, ())}
            targets.discard(msg_forwarder)
            targets.difference_update(self._holders.get(msg_id, ()))
            for peer in targets:
                self._queue_dont_want(peer, msg_id)
        except Exception:  # an announcement is an optimisation: never lose the message over it
            log.debug("IDONTWANT for a message from %s not sent", msg_forwarder, exc_info=True)

    def _queue_dont_want(self, peer: ID, msg_id: bytes) -> None:
        """Add ``msg_id`` to the IDONTWANT still queued for ``peer``, or queue one ahead of its messages.

        In a burst a peer's queue is often busy writing a forward when the next first copy
        arrives: one control message then carries several ids (one RPC each cost as much as
        ~a third of the 64 KB copy it saves, measured in the gossip bench).
        """
        pending = self._dont_want_queued.get(peer)
        if pending is not None:
            ids = pending.control.idontwant[0].messageIDs
            if msg_id in ids:
                return
            if len(ids) < MAX_DONT_WANT_IDS_PER_CONTROL:
                ids.append(msg_id)
                self.dont_want_ids_coalesced += 1
                return
        queue = self.peer_queues.get(peer)
        if queue is None:
            return
        rpc = rpc_pb2.RPC(
            control=rpc_pb2.ControlMessage(idontwant=[rpc_pb2.ControlIDontWant(messageIDs=[msg_id])])
        )
        if queue.push(rpc, priority=True):
            self._dont_want_queued[peer] = rpc
            self.dont_want_sent += 1

    def note_dont_want(self, peer: ID, msg_ids: Sequence[bytes]) -> None:
        """``peer`` sent IDONTWANT for ``msg_ids``: do not send it those messages.

        At most ``MAX_DONT_WANT_IDS_PER_CONTROL`` ids per control message are read; ids that are not
        message ids, and the excess, are reported (``on_dont_want_junk``) and ignored. Each peer's
        ids (the newest ``DONT_WANT_IDS_PER_PEER``) are kept apart, for at most ``DONT_WANT_PEERS`` peers.
        """
        count = len(msg_ids)
        if count > MAX_DONT_WANT_IDS_PER_CONTROL:
            self.on_dont_want_junk(peer, "idontwant_excess_ids", count - MAX_DONT_WANT_IDS_PER_CONTROL)
            msg_ids = msg_ids[:MAX_DONT_WANT_IDS_PER_CONTROL]
        wanted = [mid for mid in msg_ids if len(mid) == MESSAGE_ID_BYTES]
        if len(wanted) < len(msg_ids):
            self.on_dont_want_junk(peer, "idontwant_bad_id", len(msg_ids) - len(wanted))
        if not wanted:
            return
        ids = self._dont_want.get(peer)
        if ids is None:
            ids = self._dont_want[peer] = OrderedDict()
            while len(self._dont_want) > DONT_WANT_PEERS:
                self._dont_want.popitem(last=False)
        else:
            self._dont_want.move_to_end(peer)
        for mid in wanted:
            ids[mid] = None
        while len(ids) > DONT_WANT_IDS_PER_PEER:
            ids.popitem(last=False)
        self.dont_want_ids_received += len(wanted)

    def forget_dont_want(self, peer: ID) -> None:
        self._dont_want.pop(peer, None)
        self._dont_want_queued.pop(peer, None)

    async def write_msg(self, stream: INetStream, rpc_msg: rpc_pb2.RPC) -> bool:
        if self._dont_want_queued:
            with contextlib.suppress(Exception):
                peer = stream.muxed_conn.peer_id
                if self._dont_want_queued.get(peer) is rpc_msg:  # our IDONTWANT leaves: no more ids join it
                    del self._dont_want_queued[peer]
        return await self._write_unless_held(stream, rpc_msg)

    async def _write_unless_held(self, stream: INetStream, rpc_msg: rpc_pb2.RPC) -> bool:
        """The library's write, except for an RPC of messages only, every one of which the peer sent
        us or said it does not want (IDONTWANT).

        A copy crosses each mesh link in both directions when both ends forward at once; by the
        time a queued forward is written, the peer may already have delivered that message to us,
        and it would drop our copy as seen; or its IDONTWANT arrived after the forward was queued.
        Such an RPC is not written (``copies_not_sent``).
        """
        if (
            (self._holders or self._dont_want)
            and rpc_msg.publish
            and not rpc_msg.subscriptions
            and not rpc_msg.HasField("control")
        ):
            try:
                peer = stream.muxed_conn.peer_id
                if all(self.peer_has(peer, self._msg_id_constructor(m)) for m in rpc_msg.publish):
                    self.copies_not_sent += 1
                    return True
            except Exception:  # never lose a write over this check
                pass
        return await super().write_msg(stream, rpc_msg)

    async def _forward_guarded(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        try:
            await self.router.publish(msg_forwarder, msg)
        except Exception:  # one message's failure must not take the host down
            self._count_push_failure(msg_forwarder)

    def _count_push_failure(self, msg_forwarder: ID) -> None:
        self.push_failures += 1
        if self.push_failures == 1:
            log.exception("handling a pubsub message from %s failed", msg_forwarder)

    def _passes_validators(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> bool:
        # Our validators are all synchronous (set_topic_validator(..., is_async_validator=False)).
        return all(v.validator(msg_forwarder, msg) for v in self.get_msg_validators(msg))

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        """py-libp2p 0.8.1's ``Pubsub.push_msg`` (pinned), in its order, with each check made once
        (the library's hashed a message three times for its seen cache) and our signing policy in
        place of its signature check."""
        msg_id = self._msg_id_constructor(msg)  # hashed once here, for the seen check and the mark
        if self._drops_before_signature(msg_forwarder, msg, msg_id):  # blacklisted forwarder or author, seen
            return
        if self._accept(msg_forwarder, msg, msg_id):
            await self.router.publish(msg_forwarder, msg)

    def _accept(self, msg_forwarder: ID, msg: rpc_pb2.Message, msg_id: bytes) -> bool:
        """The checks of the library's ``push_msg`` after blacklist and seen, in its order, without
        a checkpoint: on success the message is marked seen, handed to our subscriptions, and the
        caller forwards it."""
        scorer = getattr(self.router, "scorer", None)
        with contextlib.suppress(Exception):  # as the library: a router without scoring passes
            if scorer is not None and not scorer.allow_publish(msg_forwarder, list(msg.topicIDs)):
                return False
        if not self._follows_signing_policy(msg):
            with contextlib.suppress(Exception):  # counting must never fail the library's task
                self.on_signing_policy_broken(msg_forwarder)
            return False
        if not self._passes_validators(msg_forwarder, msg):
            with contextlib.suppress(Exception):
                if scorer is not None:
                    for topic in msg.topicIDs:
                        scorer.on_invalid_message(msg_forwarder, topic)
            return False
        self.seen_messages.add(msg_id)  # the library's _mark_msg_seen, without hashing again
        with contextlib.suppress(Exception):
            if scorer is not None:
                for topic in msg.topicIDs:
                    scorer.on_first_delivery(msg_forwarder, topic)
        self_id = self.host.get_id()
        if msg_forwarder == self_id:
            return True  # our own publish: forwarded, not handed back to our node
        if self.strict_signing and ID(msg.from_id) == self_id:
            return False  # claims to be from us but was not published here
        self.notify_subscriptions(msg)
        return True

    def _follows_signing_policy(self, msg: rpc_pb2.Message) -> bool:
        """StrictNoSign: no ``from``, ``seqno``, ``signature`` or ``key`` (the author is the envelope's
        signer). With ``strict_signing`` (the library's StrictSign, measurement baseline only): a
        valid libp2p signature."""
        if not self.strict_signing:
            return not any(msg.HasField(name) for name in LIBP2P_AUTHOR_FIELDS)
        try:
            return bool(signature_validator(msg))
        except Exception:
            return False

    async def publish(self, topic_id: str | list[str], data: bytes) -> None:
        """Publish ``data`` under StrictNoSign: a message of data and topics only (the library's
        ``publish`` adds ``from`` and ``seqno`` whatever the signing policy)."""
        if self.strict_signing:
            await super().publish(topic_id, data)
            return
        topics = [topic_id] if isinstance(topic_id, str) else list(topic_id)
        await self.push_msg(self.my_id, rpc_pb2.Message(data=data, topicIDs=topics))

    def _drops_before_signature(self, msg_forwarder: ID, msg: rpc_pb2.Message, msg_id: bytes) -> bool:
        """The library's own checks that come before its signature check (blacklist, seen)."""
        try:
            return (
                self.is_peer_blacklisted(msg_forwarder)
                or (self.strict_signing and self.is_peer_blacklisted(ID(msg.from_id)))
                or self.seen_messages.has(msg_id)
            )
        except Exception:
            return False

    async def _teardown_if_connected(self, peer_id: ID) -> None:
        stream = self.peers.get(peer_id)
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.reset()
            self.peers.pop(peer_id, None)
        self._forget_all_subscriptions(peer_id)

    async def continuously_read_stream(self, stream: INetStream) -> None:
        try:
            await super().continuously_read_stream(
                BufferedStreamReader(stream) if self.buffered_reads else stream  # type: ignore[arg-type]
            )
        except DecodeError as exc:
            log.warning("unparseable pubsub RPC from %s; resetting its stream", stream.muxed_conn.peer_id)
            raise ParseError(f"unparseable pubsub RPC: {exc}") from exc


class _LibraryDrops(logging.Filter):
    """Turns py-libp2p's log-only drops into counter callbacks (the library exposes no hook for them).

    Matched on the library's own message formats (0.8.1); an unmatched record passes untouched.
    """

    def __init__(self, on_drop: Callable[[str, str], None]) -> None:
        super().__init__()
        self.on_drop = on_drop

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = str(record.msg)
            if msg.startswith("Inbound pubsub RPC from peer") and "exceeded size limit" in msg:
                self.on_drop("libp2p_rpc_too_large", str(record.args[0]) if record.args else "")
            elif msg.startswith("Received an invalid-signed-record"):
                self.on_drop("libp2p_invalid_peer_record", "")
        except Exception:  # an exception here would surface inside the library's read loop
            pass
        return True


class _FirstLineOnly(logging.Filter):
    """Keeps the first line of multi-line library log records (e.g. 'Failed to open stream')."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\n" in message:
            record.msg, record.args = message.splitlines()[0], None
        return True


class SwarmHost:
    """One libp2p host with its gossip topics, validation, discovery and the IPC link to the node."""

    def __init__(
        self, cfg: P2PConfig, identity: Identity, ipc_path: Path, ban_file: Path | None = None
    ) -> None:
        self.cfg = cfg
        self.identity = identity
        self.ipc_path = ipc_path
        self.ban_file = ban_file
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
        self.baseline = os.environ.get(BASELINE_ENV) == "1"
        self.gossipsub = (GossipSub if self.baseline else NoSignGossipSub)(
            protocols=[PROTOCOL_ID_V11],
            degree=cfg.degree,
            degree_low=cfg.degree_low,
            degree_high=cfg.degree_high,
            heartbeat_interval=cfg.heartbeat_interval,  # type: ignore[arg-type]  # trio.sleep takes floats
            prune_back_off=cfg.prune_backoff_s,
            adaptive_gossip_enabled=False,
            spam_protection_enabled=False,
        )
        self.pubsub = GuardedPubsub(
            self.host,
            self.gossipsub,
            strict_signing=self.baseline,  # StrictNoSign; the baseline measures the library's StrictSign
            msg_id_constructor=content_message_id,
        )
        self.pubsub.on_signing_policy_broken = self._on_signing_policy_broken
        self.pubsub.on_dont_want_junk = self._on_dont_want_junk
        if not self.baseline:
            self.pubsub.dont_want_min_bytes = cfg.idontwant_min_bytes
        self.dht = KadDHT(self.host, DHTMode.SERVER, enable_random_walk=True)
        self.work: dict[str, int] = defaultdict(int)  # work done or skipped on purpose (not drops)
        self._addr_cache: dict[ID, tuple[float, list[str]]] = {}
        self._listen_cache: tuple[float, list[str]] = (-math.inf, [])
        self.shards = cfg.rollout_shards
        self.shard = shard_of(self.my_id.to_base58(), self.shards)
        self.topics = topics_for(self.shards, self.shard)
        self.record_cache: SignedRecordCache | None = None
        count_wire_bytes()
        if not self.baseline:
            self._gate_random_walks()
            self.record_cache = install_record_cache()
            batch_yamux_window_updates()
            buffer_tcp_reads()
            guard_hot_debug_logs()
            free_locks_without_yield()
        self.peer_exchange = PeerListExchange(self.host, accept_peer=lambda peer: not self._is_banned(peer))
        self.next_peer_exchange = 0.0
        self.bootstraps = [info_from_p2p_addr(multiaddr.Multiaddr(a)) for a in cfg.bootstrap]
        # counters and state, all touched only from the trio thread; every table is bounded
        self.peers: dict[ID, PeerCounters] = {}  # connected peers only (pruned each maintenance tick)
        self.drops: dict[str, int] = defaultdict(int)
        self.totals = {"msgs_in": 0, "bytes_in": 0, "msgs_out": 0, "bytes_out": 0}
        self.dial_state: OrderedDict[ID, DialState] = OrderedDict()
        self.pubsub_missing_since: dict[ID, float] = {}
        self.silo = True
        self._ban_logged_at = -math.inf
        self._bans_unlogged = 0
        self._bans_dirty = False
        self._next_ban_save = 0.0
        self._to_disconnect_tx, self._to_disconnect_rx = trio.open_memory_channel[ID](1024)
        self._publish_tx, self._publish_rx = trio.open_memory_channel[Publish](64)
        # Frames for the node: accepted messages (at most receive_queue of them waiting) and snapshots.
        self._ipc_tx, self._ipc_rx = trio.open_memory_channel[bytes](
            cfg.receive_queue + IPC_SNAPSHOT_HEADROOM
        )
        self._guard_dials()
        self.profiler: Any = None  # a cProfile.Profile when PROFILE_ENV is set (measurement only)
        self.profile_path: Path | None = None
        self._library_drops = _LibraryDrops(self._on_library_drop)
        logging.getLogger("libp2p.pubsub.pubsub").addFilter(self._library_drops)
        self.load_bans()

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
        began = time.thread_time()
        data = msg.data  # (each read of a protobuf bytes field is a copy)
        verdict = self.pipeline.validate(Kind[kind], data, forwarder.to_base58())
        self.work["validate_cpu_us"] += round(1e6 * (time.thread_time() - began))
        counters = self._peer(forwarder)
        counters.msgs_in += 1
        counters.bytes_in += len(data)
        self.totals["msgs_in"] += 1
        self.totals["bytes_in"] += len(data)
        for peer in verdict.banned_now:
            self._ban(peer, verdict.reason)
        return verdict.accepted

    def _on_signing_policy_broken(self, forwarder: ID) -> None:
        """A message broke the signing policy (it carried libp2p author fields): count it and blame
        the connection that sent it (a relay that forwards such a message is not following the protocol)."""
        reason = Reason.LIBP2P_SIGNING_POLICY
        self.drops[reason.value] += 1
        self._blame_forwarder(forwarder, reason)

    def _on_dont_want_junk(self, peer: ID, what: str, count: int) -> None:
        self.drops[what] += count
        self._blame_forwarder(peer, Reason.IDONTWANT_JUNK)

    def _blame_forwarder(self, forwarder: ID, reason: Reason) -> None:
        """Penalise the connection for something the host judged outside the pipeline; ban what that sinks."""
        for peer in self.pipeline.record_forwarder(forwarder.to_base58(), reason):
            self._ban(peer, reason)

    def _on_library_drop(self, place: str, peer: str) -> None:
        self.drops[place] += 1
        if place == "libp2p_rpc_too_large" and peer:
            # Honest peers can coalesce large messages into one RPC: counted against the peer, no penalty.
            self.pipeline.record_forwarder(peer, Reason.RPC_TOO_LARGE)

    def _ban(self, peer: str, reason: Reason | str) -> None:
        """The pipeline banned ``peer``: stop taking its messages, disconnect it, don't redial it."""
        try:
            peer_id = ID.from_base58(peer)
        except Exception:  # a node report may name anything; only real peer ids reach libp2p
            return
        self.pubsub.add_to_blacklist(peer_id)
        self._disconnect(peer_id)
        self._bans_dirty = True
        now = time.monotonic()
        if now - self._ban_logged_at >= BAN_LOG_INTERVAL_S:
            more = (
                f"; {self._bans_unlogged} more peer(s) banned since the last such line"
                if self._bans_unlogged
                else ""
            )
            log.warning(
                "peer %s banned for %.0f s (%s): disconnected%s", peer, self.cfg.ban_seconds, reason, more
            )
            self._ban_logged_at, self._bans_unlogged = now, 0
        else:
            self._bans_unlogged += 1

    def _disconnect(self, peer: ID) -> None:
        try:
            self._to_disconnect_tx.send_nowait(peer)
        except trio.WouldBlock:
            self.drops["disconnect_queue_full"] += 1  # maintenance cuts banned peers again within a second

    def _is_banned(self, peer: ID) -> bool:
        return self.pipeline.scores.is_banned(peer.to_base58())

    def _peer(self, peer: ID) -> PeerCounters:
        if peer not in self.peers:
            self.peers[peer] = PeerCounters(connected_since=time.time())
        return self.peers[peer]

    def _dial_state(self, peer: ID) -> DialState:
        state = self.dial_state.get(peer)
        if state is None:
            state = self.dial_state[peer] = DialState()
            while len(self.dial_state) > MAX_DIAL_STATES:
                self.dial_state.popitem(last=False)
        return state

    def _gate_random_walks(self) -> None:
        """Run Kademlia random walks only while this host needs peers (``_needs_peers``).

        py-libp2p 0.8.1 re-runs a batch of random walks (each dozens of DHT queries, every one a new
        stream) at start, every 120 s and on every auto-connector discovery, whatever the connection
        count: with the per-read yamux window updates, an idle node at N = 8 spent ~11 ms CPU/s, and
        half of that went once walks stopped when the node had its peers. The DHT stays in server
        mode (it answers others' queries), and the walks resume as soon as peers are needed.
        """
        manager = self.dht.rt_refresh_manager
        if manager is None:
            return
        do_refresh = manager._do_refresh

        async def gated_refresh(force: bool = False) -> None:
            if not self._needs_peers(set(self.host.get_connected_peers())):
                self.work["random_walks_skipped"] += 1
                return
            self.work["random_walks_run"] += 1
            await do_refresh(force=force)

        manager._do_refresh = gated_refresh  # type: ignore[method-assign]

    def _guard_dials(self) -> None:
        """Refuse dials to banned peers at the network, where Kademlia's and our own dials all pass."""
        network = self.host.get_network()
        dial_peer = network.dial_peer

        async def guarded_dial_peer(peer_id: ID, *args: Any, **kwargs: Any) -> Any:
            if self._is_banned(peer_id):
                self.drops["dial_refused_banned"] += 1
                raise SwarmException(f"not dialing {peer_id}: it is banned")
            return await dial_peer(peer_id, *args, **kwargs)

        network.dial_peer = guarded_dial_peer  # type: ignore[method-assign]

    # ----------------------------------------------------------------- bans that survive a restart
    def load_bans(self) -> int:
        """Re-apply the bans a previous host saved; a missing or unreadable file means none."""
        if self.ban_file is None or not self.ban_file.exists():
            return 0
        try:
            if self.ban_file.stat().st_size > BAN_FILE_MAX_BYTES:
                raise ValueError(f"over {BAN_FILE_MAX_BYTES} bytes")
            entries = json.loads(self.ban_file.read_text())["bans"][: self.pipeline.scores.max_banned]
            records = [
                BanRecord(str(e["peer_id"]), str(e["reason"]), float(e["until"]), int(e["bans"]))
                for e in entries
            ]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the ban file %s (%s); starting with no bans", self.ban_file, exc)
            return 0
        applied = self.pipeline.scores.import_bans(records)
        for peer in self.pipeline.scores.banned():
            with contextlib.suppress(Exception):
                self.pubsub.blacklisted_peers.add(ID.from_base58(peer))
        if applied:
            log.info("re-applied %d ban(s) from %s", applied, self.ban_file)
        return applied

    def save_bans(self) -> None:
        """Write the current bans (bounded by max_banned) atomically."""
        if self.ban_file is None:
            return
        bans = [asdict(b) for b in self.pipeline.scores.ban_records()]
        tmp = self.ban_file.with_name(self.ban_file.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"version": 1, "bans": bans}))
            os.replace(tmp, self.ban_file)
            self._bans_dirty = False
        except OSError as exc:
            self.drops["ban_file_write_failed"] += 1
            log.warning("could not save bans to %s: %s", self.ban_file, exc)

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
            if not self.baseline:
                self.pubsub.skip_seen_copies(push_nursery=nursery)
                self.pubsub.buffered_reads = True
            for kind, topic in self.topics.items():
                self.pubsub.set_topic_validator(topic, self._validator(kind), is_async_validator=False)
                subscription = await self.pubsub.subscribe(topic)
                nursery.start_soon(self._drain_subscription, kind, subscription)
            log.info("p2p host %s listening on %s", self.my_id, [str(a) for a in self.host.get_addrs()])
            nursery.start_soon(self._ipc_write_loop, ipc)
            nursery.start_soon(self._publish_loop)
            nursery.start_soon(self._maintain_loop)
            nursery.start_soon(self._disconnect_loop)
            nursery.start_soon(self._snapshot_loop)
            try:
                await self._ipc_read_loop(ipc)  # returns on Shutdown or when the node goes away
            finally:
                faulthandler.cancel_dump_traceback_later()
                self._dump_profile()
                nursery.cancel_scope.cancel()
                logging.getLogger("libp2p.pubsub.pubsub").removeFilter(self._library_drops)
                if self._bans_dirty:
                    self.save_bans()

    def _dump_profile(self) -> None:
        """Write the cProfile dump at once on shutdown: the node kills a host that is slow to stop."""
        if self.profiler is not None and self.profile_path is not None:
            self.profiler.disable()
            with contextlib.suppress(OSError):
                self.profiler.dump_stats(str(self.profile_path))

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
            reason = Reason(report.reason.lower())
            msg_id = bytes.fromhex(report.msg_id) if report.msg_id else None
        except ValueError:
            self.drops["node_report_unknown"] += 1
            log.error(
                "the node reported %r (msg %r): not a known reason; update the host",
                report.reason,
                report.msg_id,
            )
            return
        for peer in self.pipeline.report(report.peer_id, reason, msg_id=msg_id):
            self._ban(peer, reason)

    async def _ipc_write_loop(self, ipc: trio.SocketStream) -> None:
        """Write queued frames to the node; what queued up meanwhile goes in the same write.

        Under a burst (every node publishing on one tick) that is one socket write, and one wake-up
        of the node's reader, for many deliveries; at most ``IPC_WRITE_BATCH_BYTES`` per write.
        """
        async for data in self._ipc_rx:
            frames = [data]
            size = len(data)
            while size < IPC_WRITE_BATCH_BYTES:
                try:
                    frames.append(more := self._ipc_rx.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                size += len(more)
            await ipc.send_all(frames[0] if len(frames) == 1 else b"".join(frames))

    # ----------------------------------------------------------------- receive
    async def _drain_subscription(self, kind: str, subscription: Any) -> None:
        """Empty the library's 32-message subscription buffer at once into the bounded queue to the node."""
        me = self.my_id.to_base58()
        while True:
            msg = await subscription.get()  # never our own publish (GuardedPubsub._accept)
            msg_id = content_message_id(msg)
            forwarder, author = self.pipeline.delivered_by.get(msg_id, ("", ""))
            if author == me:
                continue  # our own envelope, re-published by someone else
            item = Deliver(
                kind=kind,
                data=msg.data,
                origin=author,
                msg_id=msg_id.hex(),
                received_at=time.time(),
                forwarder=forwarder,
            )
            try:
                self._ipc_tx.send_nowait(encode_frame(item))
            except IPCError:
                self.drops["ipc_frame_too_large"] += 1
            except trio.WouldBlock:
                self.drops["host_receive_queue_full"] += 1

    # ----------------------------------------------------------------- publish
    async def _publish_loop(self) -> None:
        async for item in self._publish_rx:
            if len(item.data) > LIBP2P_MAX_DATA:
                log.warning(
                    "not publishing a %d-byte message: libp2p drops anything over ~1 MB", len(item.data)
                )
                self.drops["publish_too_large"] += 1
                continue
            if not await self._wait_for_peer_queues():
                self.drops["publish_backpressure"] += 1
                continue
            topic = self.topics[item.kind]
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

    def _sync_bans(self) -> None:
        """End expired bans, mirror our ban table into libp2p's blacklist, save it when it changed."""
        expired = self.pipeline.scores.ban_expired()
        if expired:
            self._bans_dirty = True
            log.info("%d ban(s) ended (first: %s); those peers may reconnect", len(expired), expired[0])
        banned = set(self.pipeline.scores.banned())
        for peer in list(self.pubsub.blacklisted_peers):
            if peer.to_base58() not in banned:
                self.pubsub.remove_from_blacklist(peer)
        if self._bans_dirty and time.monotonic() >= self._next_ban_save:
            self.save_bans()
            self._next_ban_save = time.monotonic() + BAN_SAVE_INTERVAL_S

    async def _maintain_once(self) -> None:
        now = time.monotonic()
        self._sync_bans()
        connected = set(self.host.get_connected_peers())
        for peer in connected:
            if self._is_banned(peer):
                self._disconnect(peer)
        self._check_pubsub_liveness(connected, now)
        self._update_silo(connected)

        wanted = [info.peer_id for info in self.bootstraps]
        if self._needs_peers(connected):
            if connected and now >= self.next_peer_exchange:
                await self.peer_exchange.ask_some()
                self.next_peer_exchange = now + PEER_EXCHANGE_INTERVAL_S
            known = list(self.host.get_peerstore().peers_with_addrs())
            if len(connected) < self.cfg.degree_high:
                wanted += known
            # Sharded: peers of our own shard first (their shard follows from their id); once we
            # have degree_high connections, only those, up to MAX_CONNECTIONS_SHARDED.
            wanted = [p for p in known if self._same_shard(p)] + wanted
        to_dial: list[ID] = []
        for peer in dict.fromkeys(wanted):
            if peer == self.my_id or peer in connected or self._is_banned(peer):
                continue
            state = self.dial_state.get(peer)
            if state is None or state.next_try <= now:
                to_dial.append(peer)
                if len(to_dial) >= 2 * self.cfg.degree_high:
                    break
        async with trio.open_nursery() as nursery:
            for peer in to_dial:
                nursery.start_soon(self._dial, peer)

    def _same_shard(self, peer: ID) -> bool:
        return self.shards <= 1 or shard_of(peer.to_base58(), self.shards) == self.shard

    def _needs_peers(self, connected: set[ID]) -> bool:
        """Below degree_high connections; sharded, also below ``degree`` peers of our own shard
        (while under MAX_CONNECTIONS_SHARDED connections in all)."""
        if len(connected) < self.cfg.degree_high:
            return True
        if self.shards <= 1 or len(connected) >= MAX_CONNECTIONS_SHARDED:
            return False
        return sum(1 for peer in connected if self._same_shard(peer)) < self.cfg.degree

    async def _dial(self, peer: ID) -> None:
        info = PeerInfo(peer, self.host.get_peerstore().addrs(peer))
        state = self._dial_state(peer)
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
                self._dial_state(peer).succeeded()
                self._disconnect(peer)
        for peer in list(self.peers):
            if peer not in connected:
                del self.peers[peer]
        for peer in list(self.pubsub_missing_since):
            if peer not in connected:
                del self.pubsub_missing_since[peer]

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
        """Status for the node: bounded (SNAPSHOT_MAX_PEERS peers, SNAPSHOT_MAX_BANNED bans) whatever happens."""
        scores = self.pipeline.scores
        mesh = set().union(*self.gossipsub.mesh.values()) if self.gossipsub.mesh else set()
        peers = []
        for peer, counters in self.peers.items():
            name = peer.to_base58()
            if scores.is_banned(name):
                continue  # listed under "banned_peers"; it is cut again within a second if it redials
            if len(peers) >= SNAPSHOT_MAX_PEERS:
                break
            verdicts = {str(reason): n for reason, n in self.pipeline.peer_counts(name).items()}
            peers.append({"peer_id": name, "addrs": self._addrs_of(peer), **asdict(counters), "verdicts": verdicts,
                          "score": round(scores.score(name), 3), "in_mesh": peer in mesh})  # fmt: skip
        verdicts: dict[str, int] = defaultdict(int)
        for (_kind, reason), n in self.pipeline.counts.items():
            verdicts[str(reason)] += n
        bans = scores.ban_records(limit=SNAPSHOT_MAX_BANNED)
        return {
            "peer_id": self.my_id.to_base58(),
            "listen_addrs": self._listen_addrs(),
            "peers": peers,
            "peers_total": len(self.peers),
            **self.totals,
            "verdicts": dict(verdicts),
            "drops": dict(self.drops)
            | ({"push_msg_failed": self.pubsub.push_failures} if self.pubsub.push_failures else {}),
            "work": dict(self.work)
            | {
                "peer_record_cache_hits": self.record_cache.hits if self.record_cache else 0,
                "seen_copies_not_spawned": self.pubsub.seen_copies_skipped,
                "copies_not_sent": self.pubsub.copies_not_sent,
                "copies_not_queued": self.pubsub.copies_not_queued,
                "idontwant_sent": self.pubsub.dont_want_sent,
                "idontwant_ids_coalesced": self.pubsub.dont_want_ids_coalesced,
                "idontwant_ids_received": self.pubsub.dont_want_ids_received,
            },
            "mesh_peers": {
                kind: len(self.gossipsub.mesh.get(topic, ())) for kind, topic in self.topics.items()
            },
            "rollout_shard": [self.shard, self.shards],
            "wire_bytes_in": WIRE_BYTES["in"],
            "wire_bytes_out": WIRE_BYTES["out"],
            "banned": [b.peer_id for b in bans],
            "banned_peers": [
                {"peer_id": b.peer_id, "reason": b.reason, "expires_at": b.until, "bans": b.bans}
                for b in bans
            ],
            "banned_total": len(scores.banned()),
            "silo": self.silo,
            "snapshot_at": time.time(),
        }

    def _addrs_of(self, peer: ID) -> list[str]:
        """A peer's addresses as text; formatting multiaddrs was ~10 % of an idle host's CPU at two
        snapshots a second, so each peer's list is reused for ADDR_CACHE_S."""
        now = time.monotonic()
        cached = self._addr_cache.get(peer)
        if cached is not None and now - cached[0] < ADDR_CACHE_S:
            return cached[1]
        try:
            addrs = sorted({str(a) for a in self.host.get_peerstore().addrs(peer)})[:8]
        except Exception:  # the peerstore raises for a peer without stored addresses
            addrs = []
        if len(self._addr_cache) >= 2 * SNAPSHOT_MAX_PEERS:
            self._addr_cache = pruned_addr_cache(self._addr_cache, self.peers, SNAPSHOT_MAX_PEERS)
        self._addr_cache[peer] = (now, addrs)
        return addrs

    def _listen_addrs(self) -> list[str]:
        now = time.monotonic()
        if now - self._listen_cache[0] >= ADDR_CACHE_S:
            self._listen_cache = (now, [str(a) for a in self.host.get_addrs()][:16])
        return self._listen_cache[1]

    async def _snapshot_loop(self) -> None:
        """A status snapshot for the node once a second; also re-arms the stall watchdog.

        If this loop is not back within ``LOOP_STALL_DUMP_S`` (the trio thread blocked, e.g. in a
        synchronous call), ``faulthandler`` writes every thread's stack to the host log.
        """
        while True:
            faulthandler.dump_traceback_later(LOOP_STALL_DUMP_S, exit=False)
            try:
                frame = encode_frame(Snapshot(self.snapshot()))
                # When the node is not reading, skip: the next snapshot supersedes this one.
                try:
                    self._ipc_tx.send_nowait(frame)
                except trio.WouldBlock:
                    self.drops["snapshot_node_not_reading"] += 1
                    if self.drops["snapshot_node_not_reading"] == 1:
                        log.warning("the node is not reading what the host sends it (IPC queue full)")
            except Exception:  # a status snapshot must never take the host down
                self.drops["snapshot_failed"] += 1
                if self.drops["snapshot_failed"] == 1:
                    log.exception("building the status snapshot failed; the node sees stale status")
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
    libp2p_handler.addFilter(_FirstLineOnly())  # e.g. a 7-line ERROR per failed stream negotiation
    logging.getLogger("libp2p").addHandler(libp2p_handler)
    # "GRAFT flood detected" fires constantly at N=8 and is harmless with library scoring off.
    logging.getLogger("libp2p.pubsub.gossipsub").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="swarmnode libp2p host process (started by the node)")
    parser.add_argument("--config", type=Path, required=True, help="P2PConfig as JSON")
    parser.add_argument("--key", type=Path, required=True, help="Ed25519 identity key file")
    parser.add_argument("--ipc", type=Path, required=True, help="the node's Unix socket")
    parser.add_argument("--ban-file", type=Path, default=None, help="where bans are kept across restarts")
    parser.add_argument("--log-level", default=os.environ.get("SWARMNODE_P2P_LOG", "INFO"))
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    cfg = P2PConfig.model_validate_json(args.config.read_text())
    identity = Identity.load_or_create(args.key)
    host = SwarmHost(cfg, identity, args.ipc, ban_file=args.ban_file)
    profile_dir = os.environ.get(PROFILE_ENV)
    if profile_dir:  # measurement only (scripts/bench_gossip.py --profile): cProfile of the whole loop
        import cProfile

        host.profiler = cProfile.Profile(time.process_time)  # CPU time: waits off the core do not count
        host.profile_path = Path(profile_dir) / f"host-{os.getpid()}.prof"
        host.profiler.enable()
    try:
        trio.run(host.run)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
