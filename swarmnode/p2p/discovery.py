"""Peer discovery beyond the bootstraps: a tiny peer-list protocol, next to Kademlia.

Gossipsub peer exchange never produced connections in py-libp2p (docs/LIBP2P.md), and Kademlia's
random walk took ~10 s to introduce two non-bootstrap nodes on a 4-node loopback swarm. So each
host also serves ``/swarmnode/peers/1.0.0``: on a new stream it writes the ids and addresses of
the peers it is connected to (JSON, bounded), and closes. The host asks one or two connected
peers for their list every few seconds while it has fewer connections than it wants, and adds
what it learns to the peerstore, from where the connection keeper dials it.

A peer's list is untrusted input: it is size-capped before parsing, malformed entries are skipped
one by one, and banned peers in it are not added. A connected peer that does not serve the
protocol (any non-swarmnode libp2p peer) is asked again only after a growing backoff, and its
identify record is consulted first, so the host does not probe it every few seconds.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

log = logging.getLogger(__name__)

PEER_LIST_PROTOCOL = TProtocol("/swarmnode/peers/1.0.0")
MAX_PEERS_SHARED = 50
MAX_ADDRS_PER_PEER = 4
MAX_RESPONSE_BYTES = 64 * 1024
MAX_ID_CHARS = 128
MAX_ADDR_CHARS = 256
REQUEST_TIMEOUT_S = 3.0
ADDR_TTL_S = 600
PROBE_BACKOFF_S = (10.0, 60.0, 300.0, 1800.0)  # after 1, 2, 3, 4+ failed asks of one peer
MAX_PROBE_RECORDS = 4096


def peer_list(host: IHost, exclude: ID | None = None) -> bytes:
    """Our connected peers and their addresses, as the JSON the protocol sends."""
    store = host.get_peerstore()
    entries = []
    for peer in host.get_connected_peers()[:MAX_PEERS_SHARED]:
        if peer == exclude:
            continue
        try:
            addrs = [str(a) for a in store.addrs(peer)[:MAX_ADDRS_PER_PEER]]
        except Exception:  # the peerstore raises for a peer without known addresses (inbound only)
            continue
        if addrs:
            entries.append({"id": peer.to_base58(), "addrs": addrs})
    return json.dumps(entries).encode()


def parse_peer_list(data: bytes) -> list[tuple[ID, list[multiaddr.Multiaddr]]]:
    """Parse an untrusted peer list: at most MAX_PEERS_SHARED entries of at most MAX_ADDRS_PER_PEER addresses.

    Raises ValueError when the answer as a whole is unusable (too big, not JSON, not a list);
    malformed entries and addresses are skipped one by one.
    """
    if len(data) > MAX_RESPONSE_BYTES:
        raise ValueError(f"peer list of {len(data)} bytes exceeds {MAX_RESPONSE_BYTES}")
    try:
        entries = json.loads(data)
    except RecursionError as exc:  # deeply nested JSON
        raise ValueError("peer list nests too deeply") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"peer list is not JSON: {exc}") from exc
    if not isinstance(entries, list):
        raise ValueError("peer list is not a JSON list")
    out = []
    for entry in entries[:MAX_PEERS_SHARED]:
        parsed = _parse_entry(entry)
        if parsed is not None:
            out.append(parsed)
    return out


def _parse_entry(entry: object) -> tuple[ID, list[multiaddr.Multiaddr]] | None:
    if not isinstance(entry, dict):
        return None
    peer_id, raw_addrs = entry.get("id"), entry.get("addrs")
    if not isinstance(peer_id, str) or len(peer_id) > MAX_ID_CHARS or not isinstance(raw_addrs, list):
        return None
    try:
        peer = ID.from_base58(peer_id)
    except Exception:  # the base58 and multihash decoders raise several types
        return None
    addrs = []
    for raw in raw_addrs[:MAX_ADDRS_PER_PEER]:
        if isinstance(raw, str) and len(raw) <= MAX_ADDR_CHARS:
            try:
                addrs.append(multiaddr.Multiaddr(raw))
            except Exception:
                continue
    return (peer, addrs) if addrs else None


@dataclass
class _ProbeState:
    failures: int = 0
    next_try: float = 0.0


class PeerListExchange:
    """Serves and queries the peer-list protocol on one host."""

    def __init__(
        self,
        host: IHost,
        accept_peer: Callable[[ID], bool] = lambda _peer: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.accept_peer = accept_peer  # False for peers never to add (banned)
        self.learned = 0  # peers added to the peerstore from others' lists
        self.failed_asks = 0
        self._clock = clock
        self._probes: OrderedDict[ID, _ProbeState] = OrderedDict()
        host.set_stream_handler(PEER_LIST_PROTOCOL, self._serve)

    def _probe(self, peer: ID) -> _ProbeState:
        state = self._probes.get(peer)
        if state is None:
            state = self._probes[peer] = _ProbeState()
            while len(self._probes) > MAX_PROBE_RECORDS:
                self._probes.popitem(last=False)
        return state

    def _known_not_to_serve(self, peer: ID) -> bool:
        """Identify told us the peer's protocols, and ours is not among them."""
        try:
            protocols = self.host.get_peerstore().get_protocols(peer)
        except Exception:
            return False
        return bool(protocols) and PEER_LIST_PROTOCOL not in protocols

    def askable(self, peers: list[ID]) -> list[ID]:
        """The peers worth asking now: not backing off after a failure, not known to lack the protocol."""
        now = self._clock()
        out = []
        for peer in peers:
            state = self._probes.get(peer)
            if state is not None and state.next_try > now:
                continue
            if self._known_not_to_serve(peer):
                self._failed(peer, "does not list the peer-list protocol")
                continue
            out.append(peer)
        return out

    def _failed(self, peer: ID, why: str) -> None:
        state = self._probe(peer)
        delay = PROBE_BACKOFF_S[min(state.failures, len(PROBE_BACKOFF_S) - 1)]
        state.failures += 1
        state.next_try = self._clock() + delay
        self.failed_asks += 1
        log.info(
            "peer list from %s unavailable (%s); next ask in %.0f s", peer, why.splitlines()[0][:200], delay
        )

    async def _serve(self, stream: INetStream) -> None:
        # An exception escaping a stream handler takes the whole host down (py-libp2p #1118).
        try:
            remote = stream.muxed_conn.peer_id
            await stream.write(peer_list(self.host, exclude=remote))
        except Exception as exc:
            log.debug("serving the peer list failed: %s", exc)
        finally:
            with trio.move_on_after(1):
                await stream.close()

    async def ask(self, peer: ID) -> int:
        """Fetch ``peer``'s list and add unknown peers to the peerstore; returns how many were new."""
        me = self.host.get_id()
        store = self.host.get_peerstore()
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                stream = await self.host.new_stream(peer, [PEER_LIST_PROTOCOL])
                chunks, size = [], 0
                while size <= MAX_RESPONSE_BYTES:
                    try:
                        chunk = await stream.read(MAX_RESPONSE_BYTES)
                    except StreamEOF:  # py-libp2p raises at the end of a closed stream
                        break
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                await stream.close()
            entries = parse_peer_list(b"".join(chunks))
        except Exception as exc:  # the peer may not speak the protocol, or sent junk: ask another
            self._failed(peer, f"{type(exc).__name__}: {exc}")
            return 0
        self._probes.pop(peer, None)
        known = set(store.peers_with_addrs())
        new = 0
        for other, addrs in entries:
            if other != me and self.accept_peer(other):
                new += other not in known
                store.add_addrs(other, addrs, ADDR_TTL_S)
        self.learned += new
        return new

    async def ask_some(self, count: int = 2) -> None:
        """Ask up to ``count`` random connected peers that are worth asking, concurrently."""
        peers = self.askable(list(self.host.get_connected_peers()))
        async with trio.open_nursery() as nursery:
            for peer in random.sample(peers, min(count, len(peers))):
                nursery.start_soon(self.ask, peer)
