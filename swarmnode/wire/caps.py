"""Hard limits on what a received message may contain, and the error raised when one is broken.

docs/PROTOCOL.md ("Caps and windows") lists every cap with its config key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from swarmnode.config import P2PConfig

# The values are the validation pipeline's reasons (swarmnode.p2p.pipeline.Reason) for these failures.
WireFailure = Literal["oversize", "decode_error", "unknown_kind", "schema_cap"]

# Worst-case protobuf framing of one field: a one-byte tag plus a 5-byte length (or a 10-byte varint).
_LEN_FIELD = 6
_VARINT_FIELD = 11
_FIXED32_FIELD = 5
# Room in the derived payload caps for fields a newer sender may add (forward compatibility).
UNKNOWN_FIELDS_ALLOWANCE = 64 * 1024
# A UTF-8 character takes at most 4 bytes: a string of n characters is at most 4n bytes on the wire.
UTF8_MAX_BYTES_PER_CHAR = 4


class WireError(ValueError):
    """A message breaks the wire format or a cap; ``reason`` names which (a pipeline reason)."""

    def __init__(self, reason: WireFailure, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: WireFailure = reason
        self.detail = detail


@dataclass(frozen=True)
class WireCaps:
    """Caps checked on every received message, before anything is built from its contents."""

    max_message_bytes: int = 1_000_000  # signed envelope as received
    max_groups_per_batch: int = 64
    max_completions_per_group: int = 64
    max_chars_per_completion: int = 8192
    max_question_chars: int = 16384
    # Decompressed payload size; bounds the work a small compressed message (a zip bomb) can cause.
    # The cap applied to a message is the smaller of this and the kind's derived cap (payload_cap).
    max_payload_bytes: int = 8_000_000
    max_name_chars: int = 256  # model ids, dataset names, node names, counter names, digests
    max_heartbeat_entries: int = 256  # counters and reward-trend points in one heartbeat
    # A completion's declared token count. Byte-level tokenizers make at most one token per UTF-8
    # byte of the text, so 4 tokens per character is a bound no honest sender reaches.
    max_tokens_per_completion: int = 4 * 8192
    # Fields this version does not know, per protobuf message (a newer sender's additions).
    max_unknown_fields: int = 8

    @classmethod
    def from_config(cls, cfg: P2PConfig) -> WireCaps:
        """Caps from the p2p config section; the decompressed-payload cap is 8x the message cap."""
        return cls(
            max_message_bytes=cfg.max_message_bytes,
            max_groups_per_batch=cfg.max_groups_per_batch,
            max_completions_per_group=cfg.max_completions_per_group,
            max_chars_per_completion=cfg.max_chars_per_completion,
            max_question_chars=cfg.max_question_chars,
            max_payload_bytes=8 * cfg.max_message_bytes,
            max_tokens_per_completion=UTF8_MAX_BYTES_PER_CHAR * cfg.max_chars_per_completion,
        )

    def string_bytes(self, chars: int) -> int:
        """The most UTF-8 bytes a string within a ``chars`` character cap can take."""
        return UTF8_MAX_BYTES_PER_CHAR * chars

    @property
    def max_batch_payload_bytes(self) -> int:
        """Decompressed size cap of a RolloutBatch: the largest batch within the other caps, or
        ``max_payload_bytes`` when that is smaller (it is, with the defaults)."""
        name = _LEN_FIELD + self.string_bytes(self.max_name_chars)
        task_ref = 3 * name + 2 * _VARINT_FIELD
        completion = (
            _LEN_FIELD + self.string_bytes(self.max_chars_per_completion) + 2 * _VARINT_FIELD + _FIXED32_FIELD
        )
        group = (
            _LEN_FIELD
            + task_ref
            + _LEN_FIELD
            + self.string_bytes(self.max_question_chars)
            + self.max_completions_per_group * (_LEN_FIELD + completion)
            + name
        )
        batch = 3 * _VARINT_FIELD + name + self.max_groups_per_batch * (_LEN_FIELD + group)
        return min(self.max_payload_bytes, batch + UNKNOWN_FIELDS_ALLOWANCE)

    @property
    def max_heartbeat_payload_bytes(self) -> int:
        """Decompressed size cap of a Heartbeat: the largest heartbeat within the other caps."""
        name = _LEN_FIELD + self.string_bytes(self.max_name_chars)
        counter = _LEN_FIELD + name + _VARINT_FIELD
        trend = _LEN_FIELD + _FIXED32_FIELD * self.max_heartbeat_entries  # packed or not
        heartbeat = 5 * name + 6 * _VARINT_FIELD + trend + self.max_heartbeat_entries * counter
        return min(self.max_payload_bytes, heartbeat + UNKNOWN_FIELDS_ALLOWANCE)
