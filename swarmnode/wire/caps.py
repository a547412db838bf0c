"""Hard limits on what a received message may contain, and the error raised when one is broken."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from swarmnode.config import P2PConfig

# The values are the validation pipeline's reasons (swarmnode.p2p.pipeline.Reason) for these failures.
WireFailure = Literal["oversize", "decode_error", "unknown_kind", "schema_cap"]


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
    max_payload_bytes: int = 8_000_000
    max_name_chars: int = 256  # model ids, dataset names, node names, counter names, digests
    max_heartbeat_entries: int = 256  # counters and reward-trend points in one heartbeat

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
        )
