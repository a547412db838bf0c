"""The receive-side validation pipeline: an ordered list of named rules, cheapest first.

Each gossip message (envelope bytes, its topic's kind and its authenticated libp2p origin) runs
through ``ValidationPipeline.rules`` in order; the first rule that fails decides the verdict:
ACCEPT, REJECT (the origin is penalized) or IGNORE (dropped, no penalty). Each reason has a fixed
action and penalty (``Reason.action``, ``Reason.penalty``), and every verdict is counted by
(kind, reason) and per peer. ``validate`` never raises: an exception inside a rule becomes an
``internal_error`` verdict, so no message can take the host down.

Why some reasons are IGNORE: anyone can re-publish a validly signed message, so a duplicate, a
replay or a stale message does not prove its signer misbehaved; penalizing the signer would let
an attacker get honest peers banned. Content faults (oversize, garbage, caps, signature, signer
binding) are the origin's own doing, since py-libp2p strict signing authenticates the origin.

Sequence numbers are per (peer, kind) and time based (``swarmnode.wire.Sequencer``), so a
restarted node's fresh messages are above everything it sent before and are not replays.

A pipeline is not thread-safe: the libp2p host owns one and calls it from its event loop.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum, StrEnum
from typing import TYPE_CHECKING, NamedTuple

from swarmnode.p2p.scoring import Clock, PeerScores, TokenBucket
from swarmnode.wire import (
    DecodedBatch,
    Envelope,
    Kind,
    NodeHeartbeat,
    WireCaps,
    WireError,
    decode_message,
    open_envelope,
    verify_envelope,
)

if TYPE_CHECKING:
    from swarmnode.config import P2PConfig

log = logging.getLogger(__name__)


class Action(Enum):
    ACCEPT = "accept"
    REJECT = "reject"  # dropped and the origin penalized
    IGNORE = "ignore"  # dropped, no penalty


class Reason(StrEnum):
    """Why a message got its verdict; also the metric label."""

    ACCEPTED = "accepted"
    BANNED_PEER = "banned_peer"
    OVERSIZE = "oversize"
    DECODE_ERROR = "decode_error"
    UNKNOWN_KIND = "unknown_kind"
    SCHEMA_CAP = "schema_cap"
    BAD_SIGNATURE = "bad_signature"
    SIGNER_MISMATCH = "signer_mismatch"
    DUPLICATE = "duplicate"
    REPLAY = "replay"
    STALE = "stale"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXCEEDED = "quota_exceeded"
    INTERNAL_ERROR = "internal_error"
    # Reported later by the node (ValidationPipeline.report), after regenerating the task.
    TASK_UNKNOWN = "task_unknown"  # a task this node does not serve: not the sender's fault
    QUESTION_MISMATCH = "question_mismatch"  # question text differs from the regenerated one

    @property
    def action(self) -> Action:
        return _POLICY[self][0]

    @property
    def penalty(self) -> float:
        return _POLICY[self][1]


# (action, score penalty). With the default threshold of -20, one forged signature or foreign
# signer bans a peer at once, two or three malformed messages do, and rate-limit hits need a
# sustained flood (scores decay with a half-life).
_POLICY: dict[Reason, tuple[Action, float]] = {
    Reason.ACCEPTED: (Action.ACCEPT, 0.0),
    Reason.BANNED_PEER: (Action.IGNORE, 0.0),
    Reason.OVERSIZE: (Action.REJECT, 10.0),
    Reason.DECODE_ERROR: (Action.REJECT, 10.0),
    Reason.UNKNOWN_KIND: (Action.REJECT, 5.0),
    Reason.SCHEMA_CAP: (Action.REJECT, 10.0),
    Reason.BAD_SIGNATURE: (Action.REJECT, 25.0),
    Reason.SIGNER_MISMATCH: (Action.REJECT, 25.0),
    Reason.DUPLICATE: (Action.IGNORE, 0.0),
    Reason.REPLAY: (Action.IGNORE, 0.0),
    Reason.STALE: (Action.IGNORE, 0.0),
    Reason.RATE_LIMITED: (Action.REJECT, 1.0),
    Reason.QUOTA_EXCEEDED: (Action.REJECT, 1.0),
    Reason.INTERNAL_ERROR: (Action.IGNORE, 0.0),
    Reason.TASK_UNKNOWN: (Action.IGNORE, 0.0),
    Reason.QUESTION_MISMATCH: (Action.REJECT, 5.0),
}


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: Reason
    envelope: Envelope | None  # set once the envelope parsed
    detail: str = ""
    message: DecodedBatch | NodeHeartbeat | None = None  # the decoded payload when accepted
    banned_now: bool = False  # this verdict pushed the origin below the threshold: disconnect it

    @property
    def accepted(self) -> bool:
        return self.action is Action.ACCEPT


class _Failure(Exception):
    """Raised by a rule to end the pipeline with ``reason``."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class _Candidate:
    """A message on its way through the rules; rules fill in what later rules need."""

    kind: Kind
    data: bytes
    origin: str
    now: float
    envelope: Envelope | None = None
    message: DecodedBatch | NodeHeartbeat | None = None


class Rule(NamedTuple):
    name: str
    check: Callable[[_Candidate], None]  # raises _Failure (or WireError) to stop the pipeline


@dataclass
class _SequenceWindow:
    """Sequences seen from one (peer, kind): reject those seen or below ``floor``."""

    highest: int
    floor: int
    seen: set[int] = field(default_factory=set)


class _BoundedLRU(OrderedDict):
    """An OrderedDict that forgets its least recently used keys beyond ``capacity``."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def touch(self, key: object, default_factory: Callable[[], object]) -> object:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = default_factory()
        while len(self) > self.capacity:
            self.popitem(last=False)
        return value


class ValidationPipeline:
    def __init__(
        self,
        caps: WireCaps,
        *,
        rate_msgs_per_s: float,
        rate_bytes_per_s: float,
        scores: PeerScores,
        clock: Clock = time.time,
        burst_seconds: float = 10.0,
        replay_window: int = 600_000,
        max_seen_per_peer: int = 1024,
        max_age_s: float = 600.0,
        max_future_s: float = 60.0,
        dedup_size: int = 65_536,
        max_peers: int = 10_000,
    ) -> None:
        """``replay_window`` is in sequence units (milliseconds with time-based sequences).

        ``max_age_s`` / ``max_future_s`` bound a message's creation time against this node's clock;
        the sampler applies its own, tighter freshness window to rollout groups.
        """
        self.caps = caps
        self.scores = scores
        self.rate_msgs_per_s = rate_msgs_per_s
        self.rate_bytes_per_s = rate_bytes_per_s
        self.burst_seconds = burst_seconds
        self.replay_window = replay_window
        self.max_seen_per_peer = max_seen_per_peer
        self.max_age_s = max_age_s
        self.max_future_s = max_future_s
        self._clock = clock
        self.counts: Counter[tuple[Kind, Reason]] = Counter()
        self._peer_counts = _BoundedLRU(max_peers)
        self._seen_ids = _BoundedLRU(dedup_size)
        self._sequences = _BoundedLRU(max_peers)
        self._buckets = _BoundedLRU(max_peers)
        self._last_log: dict[Reason, float] = {}
        self.rules: list[Rule] = [
            Rule("banned_peer", self._check_not_banned),
            Rule("size", self._check_size),
            Rule("envelope", self._check_envelope),
            Rule("kind", self._check_kind),
            Rule("signer", self._check_signer),
            Rule("signature", self._check_signature),
            Rule("duplicate", self._check_duplicate),
            Rule("rate", self._check_rate),
            Rule("payload", self._check_payload),
            Rule("replay", self._check_replay),
            Rule("freshness", self._check_freshness),
        ]

    @classmethod
    def from_config(cls, cfg: P2PConfig, clock: Clock = time.time) -> ValidationPipeline:
        """A pipeline (and its PeerScores) from the p2p config section."""
        scores = PeerScores(cfg.score_threshold, cfg.ban_seconds, clock)
        return cls(
            WireCaps.from_config(cfg),
            rate_msgs_per_s=cfg.rate_msgs_per_s,
            rate_bytes_per_s=cfg.rate_bytes_per_s,
            scores=scores,
            clock=clock,
        )

    # -- entry points -------------------------------------------------------------------------

    def validate(self, kind_topic: Kind, data: bytes, origin: str) -> Verdict:
        """Run the rules on one message received on ``kind_topic``'s topic from ``origin``; never raises."""
        candidate: _Candidate | None = None
        try:
            if not isinstance(data, bytes | bytearray | memoryview):
                raise TypeError(f"message data must be bytes, got {type(data).__name__}")
            candidate = _Candidate(Kind(kind_topic), bytes(data), str(origin), self._clock())
            for rule in self.rules:
                rule.check(candidate)
            verdict = Verdict(Action.ACCEPT, Reason.ACCEPTED, candidate.envelope, "", candidate.message)
        except _Failure as fail:
            verdict = Verdict(fail.reason.action, fail.reason, candidate.envelope, fail.detail)
        except WireError as err:
            reason = Reason(err.reason)
            verdict = Verdict(reason.action, reason, candidate.envelope if candidate else None, err.detail)
        except Exception as exc:  # a bug must cost one message, never the host
            log.exception("validation of a message from %s failed", origin)
            envelope = candidate.envelope if candidate else None
            verdict = Verdict(Action.IGNORE, Reason.INTERNAL_ERROR, envelope, f"{type(exc).__name__}: {exc}")
        try:
            return self._record(kind_topic, origin, verdict)
        except Exception:
            log.exception("recording a verdict for %s failed", origin)
            return verdict

    def report(self, peer: str, reason: Reason, kind: Kind = Kind.ROLLOUT_BATCH) -> bool:
        """Count and apply a verdict the node reached later (e.g. question_mismatch); True if it banned the peer."""
        return self._record(kind, peer, Verdict(reason.action, reason, None)).banned_now

    def peer_counts(self, peer: str) -> Counter[Reason]:
        return Counter(self._peer_counts.get(peer, {}))

    def snapshot(self) -> dict[str, object]:
        """Counts and peer standings for status and metrics."""
        return {
            "counts": {f"{kind.name.lower()}/{reason}": n for (kind, reason), n in self.counts.items()},
            "peers": self.scores.snapshot(),
            "banned": self.scores.banned(),
        }

    def _record(self, kind: Kind | int, origin: str, verdict: Verdict) -> Verdict:
        kind_label = Kind(kind) if kind in Kind._value2member_map_ else kind
        self.counts[(kind_label, verdict.reason)] += 1
        self._peer_counts.touch(origin, Counter)[verdict.reason] += 1
        if verdict.action is Action.ACCEPT:
            self.scores.reward(origin)
        elif verdict.action is Action.REJECT:
            self._log_rejection(origin, verdict)
            if self.scores.penalize(origin, verdict.reason):
                log.warning("peer %s banned for %.0f s (last: %s)", origin, self.scores.ban_seconds, verdict.reason)
                return replace(verdict, banned_now=True)
        return verdict

    def _log_rejection(self, origin: str, verdict: Verdict) -> None:
        """Log each rejection reason at most once a minute; the counters hold the full picture."""
        now = self._clock()
        if now - self._last_log.get(verdict.reason, float("-inf")) >= 60.0:
            self._last_log[verdict.reason] = now
            log.warning("rejected message from %s: %s (%s)", origin, verdict.reason, verdict.detail)

    # -- rules, in order ----------------------------------------------------------------------

    def _check_not_banned(self, c: _Candidate) -> None:
        if self.scores.is_banned(c.origin):
            raise _Failure(Reason.BANNED_PEER, "origin is banned")

    def _check_size(self, c: _Candidate) -> None:
        if len(c.data) > self.caps.max_message_bytes:
            raise _Failure(Reason.OVERSIZE, f"{len(c.data)} bytes, cap {self.caps.max_message_bytes}")

    def _check_envelope(self, c: _Candidate) -> None:
        c.envelope = open_envelope(c.data, self.caps)

    def _check_kind(self, c: _Candidate) -> None:
        assert c.envelope is not None
        if c.envelope.kind != c.kind:
            raise _Failure(Reason.UNKNOWN_KIND, f"{c.envelope.kind.name} envelope on the {c.kind.name} topic")

    def _check_signer(self, c: _Candidate) -> None:
        assert c.envelope is not None
        if c.envelope.signer != c.origin:
            raise _Failure(Reason.SIGNER_MISMATCH, f"signed by {c.envelope.signer}, published by {c.origin}")

    def _check_signature(self, c: _Candidate) -> None:
        assert c.envelope is not None
        if not verify_envelope(c.envelope):
            raise _Failure(Reason.BAD_SIGNATURE, "Ed25519 signature does not match the envelope")

    def _check_duplicate(self, c: _Candidate) -> None:
        assert c.envelope is not None
        msg_id = c.envelope.message_id
        if msg_id in self._seen_ids:
            self._seen_ids.move_to_end(msg_id)
            raise _Failure(Reason.DUPLICATE, f"message {msg_id.hex()[:16]} seen before")
        self._seen_ids.touch(msg_id, lambda: None)

    def _check_rate(self, c: _Candidate) -> None:
        msgs, data = self._buckets.touch(c.origin, lambda: self._new_buckets(c.now))
        if not msgs.take(1, c.now):
            raise _Failure(Reason.RATE_LIMITED, f"over {self.rate_msgs_per_s} messages/s")
        if not data.take(len(c.data), c.now):
            raise _Failure(Reason.QUOTA_EXCEEDED, f"over {self.rate_bytes_per_s:.0f} bytes/s")

    def _new_buckets(self, now: float) -> tuple[TokenBucket, TokenBucket]:
        msg_burst = max(1.0, self.rate_msgs_per_s * self.burst_seconds)
        byte_burst = max(float(self.caps.max_message_bytes), self.rate_bytes_per_s * self.burst_seconds)
        return (
            TokenBucket(self.rate_msgs_per_s, msg_burst, now),
            TokenBucket(self.rate_bytes_per_s, byte_burst, now),
        )

    def _check_payload(self, c: _Candidate) -> None:
        assert c.envelope is not None
        c.message = decode_message(c.envelope, self.caps)

    def _check_replay(self, c: _Candidate) -> None:
        assert c.message is not None
        seq = c.message.sequence
        window: _SequenceWindow = self._sequences.touch(
            (c.origin, c.kind), lambda: _SequenceWindow(highest=seq, floor=seq - self.replay_window - 1)
        )
        if seq <= window.floor or seq <= window.highest - self.replay_window:
            raise _Failure(Reason.REPLAY, f"sequence {seq} is below the window (highest {window.highest})")
        if seq in window.seen:
            raise _Failure(Reason.REPLAY, f"sequence {seq} already seen")
        window.seen.add(seq)
        window.highest = max(window.highest, seq)
        if len(window.seen) > self.max_seen_per_peer:
            window.floor = max(window.floor, window.highest - self.replay_window)
            keep = sorted(s for s in window.seen if s > window.floor)[-self.max_seen_per_peer // 2 :]
            if keep:
                window.floor = max(window.floor, keep[0] - 1)
            window.seen = set(keep)

    def _check_freshness(self, c: _Candidate) -> None:
        assert c.message is not None
        age = c.now - c.message.created_at
        if age > self.max_age_s:
            raise _Failure(Reason.STALE, f"created {age:.0f} s ago, limit {self.max_age_s:.0f} s")
        if age < -self.max_future_s:
            raise _Failure(Reason.STALE, f"created {-age:.0f} s in the future (clock skew?)")
