"""The typed IPC boundary between a node and its libp2p host process.

The node (threads, torch) and the host (trio, libp2p) live in different OS processes and talk over
one local stream socket (a Unix domain socket, mode 0600, in the node's run directory). Each frame
is ``u32 body length | u32 header length | JSON header | raw data``: the JSON header names the
frame type and its small fields, the raw tail carries envelope bytes untouched (no base64). Both
lengths are bounded by ``MAX_FRAME_BYTES``; ``encode_frame`` raises ``IPCError`` (never
``struct.error``) for anything bigger, and the host bounds what it puts in a snapshot.

Both sides use :class:`FrameDecoder` (feed bytes, get frames) and :func:`encode_frame`, so the
format lives in one place.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

# A u16 header length once let ~1,200 banned peers in a snapshot crash the host (struct.error).
_PREFIX = struct.Struct(">II")
# A gossip message is at most ~1 MB (libp2p's limit); the rest is headroom for the header.
MAX_FRAME_BYTES = 2 * 1024 * 1024
# What a host snapshot lists at most (the totals count the rest): about 1 KB per peer, so a
# snapshot stays far below MAX_FRAME_BYTES however many peers connect or get banned.
SNAPSHOT_MAX_PEERS = 256
SNAPSHOT_MAX_BANNED = 128


class IPCError(RuntimeError):
    """The other side of the IPC socket sent something that is not a valid frame."""


@dataclass(frozen=True)
class Publish:
    """Node -> host: publish this signed envelope on the topic of ``kind``."""

    kind: str
    data: bytes
    queued_at: float


@dataclass(frozen=True)
class Deliver:
    """Host -> node: an accepted message from another peer."""

    kind: str
    data: bytes
    origin: str  # the envelope's author (its verified signer), who need not be the libp2p publisher
    msg_id: str  # hex of the content-addressed message id
    received_at: float
    forwarder: str = ""  # the connected peer that delivered it to us


@dataclass(frozen=True)
class Report:
    """Node -> host: the node found this peer's message bad after its own checks."""

    peer_id: str  # the author of the message
    reason: str
    msg_id: str = ""  # hex content id of the message, when known: its forwarder is penalized too


@dataclass(frozen=True)
class Snapshot:
    """Host -> node: periodic status (see :class:`P2PStatus` for the fields)."""

    status: dict[str, Any]


@dataclass(frozen=True)
class Shutdown:
    """Node -> host: stop cleanly."""


Frame = Publish | Deliver | Report | Snapshot | Shutdown
_FRAME_TYPES: dict[str, type] = {
    cls.__name__.lower(): cls for cls in (Publish, Deliver, Report, Snapshot, Shutdown)
}


def encode_frame(frame: Frame) -> bytes:
    """One frame as bytes ready for the socket."""
    # Shallow: dataclasses.asdict() deep-copies nested dicts (a Snapshot's whole status).
    values = {f.name: getattr(frame, f.name) for f in fields(frame)}
    data = values.pop("data", b"")
    header = json.dumps({"type": type(frame).__name__.lower(), **values}, separators=(",", ":")).encode()
    body_len = _PREFIX.size - 4 + len(header) + len(data)
    if body_len > MAX_FRAME_BYTES:
        raise IPCError(f"frame of {body_len} bytes exceeds the IPC limit of {MAX_FRAME_BYTES}")
    return _PREFIX.pack(body_len, len(header)) + header + data


def _decode_body(header: bytes, data: bytes) -> Frame:
    try:
        values = json.loads(header)
        cls = _FRAME_TYPES[values.pop("type")]
        if "data" in {f.name for f in fields(cls)}:
            values["data"] = data
        return cls(**values)
    except (ValueError, KeyError, TypeError) as exc:
        raise IPCError(f"malformed IPC frame header {header[:200]!r}: {exc}") from exc


class FrameDecoder:
    """Incremental decoder: ``feed()`` raw socket bytes, iterate the complete frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> Iterator[Frame]:
        self._buffer += chunk
        while len(self._buffer) >= 4:
            (body_len,) = struct.unpack_from(">I", self._buffer)
            if not 4 <= body_len <= MAX_FRAME_BYTES:
                raise IPCError(f"IPC frame length {body_len} is out of range (max {MAX_FRAME_BYTES})")
            if len(self._buffer) < 4 + body_len:
                return
            (header_len,) = struct.unpack_from(">I", self._buffer, 4)
            if header_len > body_len - 4:
                raise IPCError(f"IPC header length {header_len} exceeds frame length {body_len}")
            header = bytes(self._buffer[_PREFIX.size : _PREFIX.size + header_len])
            data = bytes(self._buffer[_PREFIX.size + header_len : 4 + body_len])
            del self._buffer[: 4 + body_len]
            yield _decode_body(header, data)


@dataclass(frozen=True)
class PeerStatus:
    """One connected peer as the host sees it."""

    peer_id: str
    connected_since: float
    addrs: tuple[str, ...] = ()  # known multiaddrs of the peer
    msgs_in: int = 0
    bytes_in: int = 0
    msgs_out: int = 0  # own publishes sent while this peer was in our mesh
    bytes_out: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)  # received messages by verdict reason
    score: float = 0.0
    in_mesh: bool = False


@dataclass(frozen=True)
class BannedPeer:
    """A peer the host banned: disconnected, its messages ignored, not redialed until ``expires_at``."""

    peer_id: str
    reason: str  # the verdict reason that pushed it below the threshold
    expires_at: float  # host wall-clock time the ban ends
    bans: int = 1


@dataclass(frozen=True)
class P2PStatus:
    """What the node knows about its network side; built from the host's latest snapshot."""

    peer_id: str = ""
    listen_addrs: tuple[str, ...] = ()
    peers: tuple[PeerStatus, ...] = ()
    msgs_in: int = 0
    bytes_in: int = 0
    msgs_out: int = 0
    bytes_out: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)  # all received messages by reason
    drops: dict[str, int] = field(default_factory=dict)  # where messages were dropped, by place
    banned: tuple[str, ...] = ()  # peers banned for bad messages (disconnected, not redialed)
    banned_peers: tuple[BannedPeer, ...] = ()  # the same with reason and expiry (latest-ending first)
    banned_total: int = 0  # bans in force; the snapshot lists at most SNAPSHOT_MAX_BANNED of them
    peers_total: int = 0  # connected peers; the snapshot lists at most SNAPSHOT_MAX_PEERS of them
    silo: bool = True  # no peers: the node trains alone
    mesh_peers: dict[str, int] = field(default_factory=dict)  # gossipsub mesh size per kind's topic
    work: dict[str, int] = field(default_factory=dict)  # work the host did or skipped on purpose (not drops)
    wire_bytes_in: int = 0  # bytes read from all libp2p connections (every protocol, duplicates included)
    wire_bytes_out: int = 0
    restarts: int = 0
    host_running: bool = False
    snapshot_at: float = 0.0  # host time of the snapshot (0 = none yet)

    @classmethod
    def from_snapshot(cls, snapshot: dict[str, Any], **node_side: Any) -> P2PStatus:
        """Build from a host snapshot dict plus node-side fields (restarts, drops, host_running)."""
        peers = tuple(PeerStatus(**p) for p in snapshot.get("peers", ()))
        banned_peers = tuple(BannedPeer(**b) for b in snapshot.get("banned_peers", ()))
        drops = dict(snapshot.get("drops", {}))
        for place, count in node_side.pop("drops", {}).items():
            drops[place] = drops.get(place, 0) + count
        return cls(
            peer_id=snapshot.get("peer_id", ""),
            listen_addrs=tuple(snapshot.get("listen_addrs", ())),
            peers=peers,
            msgs_in=snapshot.get("msgs_in", 0),
            bytes_in=snapshot.get("bytes_in", 0),
            msgs_out=snapshot.get("msgs_out", 0),
            bytes_out=snapshot.get("bytes_out", 0),
            verdicts=dict(snapshot.get("verdicts", {})),
            drops=drops,
            banned=tuple(snapshot.get("banned", ())),
            banned_peers=banned_peers,
            banned_total=snapshot.get("banned_total", len(banned_peers)),
            peers_total=snapshot.get("peers_total", len(peers)),
            silo=snapshot.get("silo", True),
            mesh_peers=dict(snapshot.get("mesh_peers", {})),
            work=dict(snapshot.get("work", {})),
            wire_bytes_in=snapshot.get("wire_bytes_in", 0),
            wire_bytes_out=snapshot.get("wire_bytes_out", 0),
            snapshot_at=snapshot.get("snapshot_at", 0.0),
            **node_side,
        )
