"""The wire format: signed, compressed, capped protobuf envelopes carrying rollout batches and heartbeats.

Sending: ``seal(identity, Kind.ROLLOUT_BATCH, encode_rollout_batch(groups, ...))``.
Receiving (the validation pipeline does this, in this order): ``open_envelope`` (size cap, parse,
canonical encoding), ``verify_envelope``, then ``decode_message`` (bounded decompression, a
pre-scan of counts and sizes, parse, remaining caps, records). docs/PROTOCOL.md describes the
format for other implementations.
Every failure is a ``WireError`` whose ``reason`` is a validation-pipeline reason. This package
must not import torch: the libp2p host process uses it.
"""

from __future__ import annotations

from swarmnode.identity import peer_id_from_public_key
from swarmnode.wire.caps import WireCaps, WireError, WireFailure
from swarmnode.wire.envelope import (
    ENVELOPE_VERSION,
    Compression,
    Envelope,
    Kind,
    Sequencer,
    Signer,
    message_id,
    open_envelope,
    open_payload,
    payload_cap,
    seal,
    signing_digest,
    verify_envelope,
)
from swarmnode.wire.messages import (
    DecodedBatch,
    NodeHeartbeat,
    decode_heartbeat,
    decode_rollout_batch,
    encode_heartbeat,
    encode_rollout_batch,
    scan_prefix,
)


def decode_message(env: Envelope, caps: WireCaps) -> DecodedBatch | NodeHeartbeat:
    """Decompress (bounded) and decode an opened envelope's payload by its kind; raises WireError.

    Rollout groups get the envelope's signer peer id as their ``source``.
    """
    payload = open_payload(env, caps, check_prefix=lambda prefix: scan_prefix(env.kind, prefix, caps))
    if env.kind == Kind.ROLLOUT_BATCH:
        return decode_rollout_batch(payload, caps, source=env.signer)
    return decode_heartbeat(payload, caps)


__all__ = [
    "ENVELOPE_VERSION",
    "Compression",
    "DecodedBatch",
    "Envelope",
    "Kind",
    "NodeHeartbeat",
    "Sequencer",
    "Signer",
    "WireCaps",
    "WireError",
    "WireFailure",
    "decode_heartbeat",
    "decode_message",
    "decode_rollout_batch",
    "encode_heartbeat",
    "encode_rollout_batch",
    "message_id",
    "open_envelope",
    "open_payload",
    "payload_cap",
    "peer_id_from_public_key",
    "seal",
    "signing_digest",
    "verify_envelope",
]
