"""Peer discovery beyond the bootstraps: a tiny peer-list protocol, next to Kademlia.

Gossipsub peer exchange never produced connections in py-libp2p (docs/LIBP2P.md), and Kademlia's
random walk took ~10 s to introduce two non-bootstrap nodes on a 4-node loopback swarm. So each
host also serves ``/swarmnode/peers/1.0.0``: on a new stream it writes the ids and addresses of
the peers it is connected to (JSON, bounded), and closes. The host asks one or two connected
peers for their list every few seconds while it has fewer connections than it wants, and adds
what it learns to the peerstore, from where the connection keeper dials it.
"""

from __future__ import annotations

import json
import logging
import random

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

log = logging.getLogger(__name__)

PEER_LIST_PROTOCOL = TProtocol("/swarmnode/peers/1.0.0")
MAX_PEERS_SHARED = 50
MAX_ADDRS_PER_PEER = 4
MAX_RESPONSE_BYTES = 64 * 1024
REQUEST_TIMEOUT_S = 3.0
ADDR_TTL_S = 600


def peer_list(host: IHost, exclude: ID | None = None) -> bytes:
    """Our connected peers and their addresses, as the JSON the protocol sends."""
    store = host.get_peerstore()
    entries = []
    for peer in host.get_connected_peers()[:MAX_PEERS_SHARED]:
        if peer == exclude:
            continue
        addrs = [str(a) for a in store.addrs(peer)[:MAX_ADDRS_PER_PEER]]
        if addrs:
            entries.append({"id": peer.to_base58(), "addrs": addrs})
    return json.dumps(entries).encode()


def parse_peer_list(data: bytes) -> list[tuple[ID, list[multiaddr.Multiaddr]]]:
    """Parse a peer list; raises ValueError on anything malformed (the caller drops the answer)."""
    if len(data) > MAX_RESPONSE_BYTES:
        raise ValueError(f"peer list of {len(data)} bytes exceeds {MAX_RESPONSE_BYTES}")
    entries = json.loads(data)
    if not isinstance(entries, list):
        raise ValueError("peer list is not a JSON list")
    out = []
    for entry in entries[:MAX_PEERS_SHARED]:
        peer = ID.from_base58(entry["id"])
        addrs = [multiaddr.Multiaddr(a) for a in entry["addrs"][:MAX_ADDRS_PER_PEER]]
        out.append((peer, addrs))
    return out


class PeerListExchange:
    """Serves and queries the peer-list protocol on one host."""

    def __init__(self, host: IHost) -> None:
        self.host = host
        self.learned = 0  # peers added to the peerstore from others' lists
        host.set_stream_handler(PEER_LIST_PROTOCOL, self._serve)

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
                    chunk = await stream.read(MAX_RESPONSE_BYTES)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                await stream.close()
            entries = parse_peer_list(b"".join(chunks))
        except Exception as exc:  # the peer may not speak the protocol, or sent junk: ask another
            log.debug("peer list from %s failed: %s", peer, exc)
            return 0
        known = set(store.peers_with_addrs())
        new = 0
        for other, addrs in entries:
            if other != me and addrs:
                new += other not in known
                store.add_addrs(other, addrs, ADDR_TTL_S)
        self.learned += new
        return new

    async def ask_some(self, count: int = 2) -> None:
        """Ask up to ``count`` random connected peers, concurrently."""
        peers = self.host.get_connected_peers()
        async with trio.open_nursery() as nursery:
            for peer in random.sample(peers, min(count, len(peers))):
                nursery.start_soon(self.ask, peer)
