"""The signed envelope: compress, sign and seal a payload; open, bound and verify a received one.

docs/PROTOCOL.md ("Envelope", "Signing digest", "Message id") is the normative description; see
protos/swarmnode/v1/wire.proto for the schema.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from functools import cached_property
from typing import Protocol

import zstandard
from google.protobuf.message import DecodeError

from swarmnode.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, peer_id_from_public_key, verify
from swarmnode.wire.caps import WireCaps, WireError
from swarmnode.wire.gen import wire_pb2

ENVELOPE_VERSION = 1
# v1 topics carried the same envelopes under libp2p StrictSign; v2 receivers do not read zstd.
TOPIC_VERSION = "v3"
ZSTD_LEVEL = 3  # zstd's default: ~10x zlib level 6's speed at ~3 % more bytes on English text
ZLIB_LEVEL = 6
_DOMAIN = b"swarmnode/v1/envelope\x00"
_INFLATE_CHUNK = 256 * 1024  # zlib output per step while inflating a payload
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # a Zstandard frame (RFC 8878), little-endian 0xFD2FB528
_MIN_ZSTD_WINDOW = 1 << 10


class Kind(IntEnum):
    """What an envelope carries; one gossip topic per kind."""

    ROLLOUT_BATCH = wire_pb2.KIND_ROLLOUT_BATCH
    HEARTBEAT = wire_pb2.KIND_HEARTBEAT

    @property
    def topic(self) -> str:
        """The gossipsub topic of this kind (protocol 3: zstd envelopes; docs/PROTOCOL.md "Versioning")."""
        return f"/swarmnode/{TOPIC_VERSION}/{self.name.lower()}"


class Compression(IntEnum):
    NONE = wire_pb2.COMPRESSION_NONE
    ZLIB = wire_pb2.COMPRESSION_ZLIB
    ZSTD = wire_pb2.COMPRESSION_ZSTD


class _Codecs(threading.local):
    """zstd contexts, one set per thread (they are not thread-safe); a context reused is ~4x cheaper
    than a new one for a small payload. Decompressors are keyed by their window limit."""

    def __init__(self) -> None:
        self.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self.decompressors: dict[int, zstandard.ZstdDecompressor] = {}

    def decompressor(self, max_window: int) -> zstandard.ZstdDecompressor:
        dctx = self.decompressors.get(max_window)
        if dctx is None:
            dctx = self.decompressors[max_window] = zstandard.ZstdDecompressor(max_window_size=max_window)
        return dctx


_codecs = _Codecs()


class Signer(Protocol):
    """What ``seal`` needs of an identity (swarmnode.identity.Identity)."""

    public_key_bytes: bytes

    def sign(self, data: bytes) -> bytes: ...


@dataclass(frozen=True)
class Envelope:
    """A parsed envelope; ``payload`` is still compressed. Not yet verified: see ``verify_envelope``."""

    version: int
    kind: Kind
    compression: Compression
    payload: bytes
    signer_public_key: bytes
    signature: bytes
    raw: bytes = field(repr=False)  # the bytes it was parsed from

    @cached_property
    def signer(self) -> str:
        """The signer's libp2p peer id."""
        return peer_id_from_public_key(self.signer_public_key)

    @cached_property
    def message_id(self) -> bytes:
        return message_id(self.raw)


def message_id(data: bytes) -> bytes:
    """Content-addressed message id of a sealed envelope (use it as the gossipsub message id)."""
    return hashlib.sha256(data).digest()


def signing_digest(version: int, kind: int, compression: int, payload: bytes) -> bytes:
    """The domain-separated digest an envelope's signature covers."""
    header = struct.pack(">III", version, kind, compression)
    return hashlib.sha256(_DOMAIN + header + hashlib.sha256(payload).digest()).digest()


def seal(
    identity: Signer,
    kind: Kind,
    payload: bytes,
    *,
    compression: Compression = Compression.ZSTD,
    max_message_bytes: int = WireCaps.max_message_bytes,
) -> bytes:
    """Compress and sign ``payload`` (an encoded RolloutBatch or Heartbeat); returns envelope bytes.

    An empty payload is sent uncompressed whatever ``compression`` says (receivers refuse a zstd
    frame of no content, see ``open_payload``).

    Raises WireError("oversize") when the sealed envelope exceeds ``max_message_bytes``, or the
    payload exceeds the decompressed cap receivers with that message cap apply (``payload_cap``):
    receivers would reject and penalise either, so publish fewer groups per batch.
    """
    receivers_cap = payload_cap(
        kind, WireCaps(max_message_bytes=max_message_bytes, max_payload_bytes=8 * max_message_bytes)
    )
    if len(payload) > receivers_cap:
        raise WireError(
            "oversize",
            f"{kind.name} payload is {len(payload)} bytes, over the {receivers_cap}-byte cap receivers "
            f"apply after decompression; send fewer groups per message",
        )
    if not payload:
        compression = Compression.NONE
    if compression == Compression.ZSTD:
        body = _codecs.compressor.compress(payload)
    elif compression == Compression.ZLIB:
        body = zlib.compress(payload, ZLIB_LEVEL)
    elif compression == Compression.NONE:
        body = payload
    else:
        raise ValueError(f"unsupported compression {compression!r}")
    signature = identity.sign(signing_digest(ENVELOPE_VERSION, kind, compression, body))
    data = wire_pb2.Envelope(
        version=ENVELOPE_VERSION,
        kind=int(kind),
        compression=int(compression),
        payload=body,
        signer_public_key=identity.public_key_bytes,
        signature=signature,
    ).SerializeToString()
    if len(data) > max_message_bytes:
        raise WireError(
            "oversize",
            f"sealed {kind.name} is {len(data)} bytes, over the {max_message_bytes}-byte cap; "
            f"send fewer groups per message",
        )
    return data


def open_envelope(data: bytes, caps: WireCaps) -> Envelope:
    """Parse envelope bytes with the size cap checked first; raises WireError. Does not verify.

    The bytes must be the envelope's canonical encoding (fields in number order, each once, no
    default-valued or unknown fields): anything else is a decode_error, so one envelope has
    exactly one message id and nobody can re-encode a genuine envelope to make it look new.
    """
    if len(data) > caps.max_message_bytes:
        raise WireError("oversize", f"{len(data)} bytes, cap {caps.max_message_bytes}")
    msg = wire_pb2.Envelope()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise WireError("decode_error", f"not an envelope: {exc}") from None
    if msg.version != ENVELOPE_VERSION:
        raise WireError("decode_error", f"envelope version {msg.version}, this node reads {ENVELOPE_VERSION}")
    try:
        kind = Kind(msg.kind)
    except ValueError:
        raise WireError("unknown_kind", f"kind {msg.kind}") from None
    try:
        compression = Compression(msg.compression)
    except ValueError:
        raise WireError("decode_error", f"unknown compression {msg.compression}") from None
    if len(msg.signer_public_key) != PUBLIC_KEY_BYTES:
        raise WireError(
            "decode_error", f"signer key is {len(msg.signer_public_key)} bytes, not {PUBLIC_KEY_BYTES}"
        )
    if len(msg.signature) != SIGNATURE_BYTES:
        raise WireError("decode_error", f"signature is {len(msg.signature)} bytes, not {SIGNATURE_BYTES}")
    envelope = Envelope(
        version=msg.version,
        kind=kind,
        compression=compression,
        payload=msg.payload,
        signer_public_key=msg.signer_public_key,
        signature=msg.signature,
        raw=bytes(data),
    )
    if _canonical_bytes(envelope) != envelope.raw:
        raise WireError("decode_error", "envelope is not canonically encoded (see docs/PROTOCOL.md)")
    return envelope


def _canonical_bytes(env: Envelope) -> bytes:
    return wire_pb2.Envelope(
        version=env.version,
        kind=int(env.kind),
        compression=int(env.compression),
        payload=env.payload,
        signer_public_key=env.signer_public_key,
        signature=env.signature,
    ).SerializeToString()


def verify_envelope(env: Envelope) -> bool:
    """True when the signature is valid for the envelope's signer key, kind, compression and payload."""
    digest = signing_digest(env.version, env.kind, env.compression, env.payload)
    return verify(env.signer_public_key, digest, env.signature)


def payload_cap(kind: Kind, caps: WireCaps) -> int:
    """The decompressed payload size cap of ``kind``: derived from the schema caps, at most
    ``caps.max_payload_bytes``."""
    return caps.max_heartbeat_payload_bytes if kind == Kind.HEARTBEAT else caps.max_batch_payload_bytes


def open_payload(
    env: Envelope, caps: WireCaps, check_prefix: Callable[[bytes | bytearray], None] | None = None
) -> bytes | bytearray:
    """The decompressed payload, never larger than its kind's cap (a zip bomb is oversize).

    zstd: the frame must state its content size, 1 to cap bytes, checked before anything is
    allocated; a payload over one chunk has its first chunk decompressed and given to
    ``check_prefix`` first, then the frame is decompressed in one step (linear, ~1 GB/s).
    zlib inflates in bounded chunks into one growing buffer, stopping one byte past the cap, so
    a bomb costs at most about the cap in memory whatever it would inflate to, and no step holds
    two copies of the payload. ``check_prefix`` (it raises WireError) sees the first chunk before
    the rest is inflated, so a payload whose first records already break a cap costs one chunk.
    """
    cap = payload_cap(env.kind, caps)
    if env.compression == Compression.NONE:
        if len(env.payload) > cap:
            raise WireError("oversize", f"payload {len(env.payload)} bytes, cap {cap}")
        return env.payload
    if env.compression == Compression.ZSTD:
        return _unzstd(env, cap, check_prefix)
    inflater = zlib.decompressobj()
    out = bytearray()
    tail = env.payload
    try:
        # Each pass either adds output, consumes input or ends the stream; the count bound is a backstop.
        for _ in range(cap // _INFLATE_CHUNK + 3):
            if inflater.eof:
                break
            chunk = inflater.decompress(tail, min(_INFLATE_CHUNK, cap + 1 - len(out)))
            tail = inflater.unconsumed_tail
            out += chunk
            if len(out) > cap:
                raise WireError("oversize", f"{env.kind.name} payload inflates beyond its {cap}-byte cap")
            if not chunk and not tail:
                break
            if check_prefix is not None and len(out) == len(chunk) and not inflater.eof:
                check_prefix(out)
    except zlib.error as exc:
        raise WireError("decode_error", f"bad zlib payload: {exc}") from None
    if not inflater.eof or inflater.unused_data:
        raise WireError("decode_error", "zlib payload is truncated or has trailing bytes")
    return out


def _unzstd(env: Envelope, cap: int, check_prefix: Callable[[bytes | bytearray], None] | None) -> bytes:
    """One zstd frame (RFC 8878) with its content size, no dictionary, no bytes after it."""
    body = env.payload
    if body[:4] != _ZSTD_MAGIC:  # a skippable frame or anything else
        raise WireError("decode_error", "zstd payload does not start with a zstd frame")
    try:
        params = zstandard.get_frame_parameters(body)
    except zstandard.ZstdError as exc:
        raise WireError("decode_error", f"bad zstd frame header: {exc}") from None
    size = params.content_size
    if size == zstandard.CONTENTSIZE_UNKNOWN or size == 0:
        raise WireError("decode_error", "zstd frame does not state a content size of at least 1 byte")
    if size > cap:
        raise WireError("oversize", f"{env.kind.name} payload of {size} bytes is over its {cap}-byte cap")
    if params.dict_id:
        raise WireError("decode_error", f"zstd frame needs dictionary {params.dict_id}")
    # A window over the cap rounded up to a power of two is refused from the header, so the verdict
    # does not depend on which decompression path runs: an honest sender's window is at most its
    # content size rounded up.
    max_window = max(_MIN_ZSTD_WINDOW, 1 << (cap - 1).bit_length())
    if params.window_size > max_window:
        raise WireError("decode_error", f"zstd window of {params.window_size} bytes, over {max_window}")
    dctx = _codecs.decompressor(max_window)
    try:
        if check_prefix is not None and size > _INFLATE_CHUNK:
            check_prefix(next(dctx.read_to_iter(body, read_size=len(body), write_size=_INFLATE_CHUNK), b""))
        out = dctx.decompress(body, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise WireError("decode_error", f"bad zstd payload: {exc}") from None
    if len(out) != size:  # zstandard checks this; a cheap guard against a library change
        raise WireError("decode_error", f"zstd frame inflated to {len(out)} bytes, not the {size} it states")
    return out


class Sequencer:
    """Sender sequence numbers: ``max(previous + 1, Unix ms now)``.

    Time based, so a restarted node continues above the numbers it used before its restart
    without persisting a counter (receivers would otherwise reject its fresh messages as
    replays). Keep one Sequencer per message kind.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._last = 0

    def next(self) -> int:
        self._last = max(self._last + 1, int(self._clock() * 1000))
        return self._last
