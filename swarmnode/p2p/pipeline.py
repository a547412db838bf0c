"""The receive-side validation pipeline: an ordered list of named rules, cheapest first.

Each gossip message (envelope bytes, its topic's kind, and the libp2p peer that delivered it, the
*forwarder*) runs through ``ValidationPipeline.rules`` in order; the first rule that fails decides
the verdict: ACCEPT, REJECT (someone is penalized) or IGNORE (dropped, no penalty). Each reason has
a fixed action, penalty and blame (``Reason.action``, ``Reason.penalty``, ``Reason.blame``), and
every verdict is counted by (kind, reason) and per peer. ``validate`` never raises: an exception
inside a rule becomes an ``internal_error`` verdict, so no message can take the host down.

Validity is a function of the message bytes, so of its content id. The envelope is signed by its
*author*, who need not be the peer that published it on libp2p: anyone may re-publish a genuine
envelope, and a tampered copy has other bytes, hence another id, so a forged copy can never get
the genuine one dropped. A rule that depends on our state (banned, duplicate, replay, rate,
admission, freshness) only drops the copy in hand: the host never lets py-libp2p cache such a
verdict for the message id (``swarmnode.p2p.host.GuardedPubsub``).

Who is blamed: junk (oversize, undecodable, wrong kind, caps, bad signature) is the forwarder's
doing (an honest peer validates before it forwards), and also the author's once its signature
verified; rate and quota are counted per author and per forwarder; never-seen authors are
admitted per forwarder at a bounded rate, since identities are free (sybils).

Why some reasons are IGNORE: anyone can re-publish a validly signed message, so a duplicate, a
replay or a stale message does not prove its author or forwarder misbehaved.

Our duplicate and replay windows outlive every py-libp2p cache (seen cache 120-180 s): an accepted
id is remembered until its message is stale anyway (``max_age_s + max_future_s``), and sequence
numbers (per author and kind, time based, ``swarmnode.wire.Sequencer``) are tracked over
``replay_window`` milliseconds. Every structure is bounded by count.

A pipeline is not thread-safe: the libp2p host owns one and calls it from its event loop.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
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
    message_id,
    open_envelope,
    verify_envelope,
)

if TYPE_CHECKING:
    from swarmnode.config import P2PConfig

log = logging.getLogger(__name__)

# A forwarder relays many authors' messages: its budget is this many authors' worth.
RELAY_RATE_FACTOR = 16.0
RELAY_BYTES_FACTOR = 4.0
# Never-seen authors one forwarder may introduce: a burst (a node joining a swarm learns every
# author at once), then a trickle. Sybil identities are free; this bounds what one connection buys.
ADMIT_BURST = 32.0
ADMIT_PER_S = 0.5
# A node-side report about a message (e.g. question_mismatch) costs its forwarder this fraction
# of the penalty when the forwarder is not the author: honest relays pass on a liar's messages
# until their own node catches it, so they must survive that; a sybil relay pays per sybil.
RELAY_REPORT_FACTOR = 0.25
REJECTION_LOG_INTERVAL_S = 60.0


class Action(Enum):
    ACCEPT = "accept"
    REJECT = "reject"  # dropped and the blamed peers penalized
    IGNORE = "ignore"  # dropped, no penalty


class Blame(Enum):
    NOBODY = "nobody"
    FORWARDER = "forwarder"  # the connection that delivered it
    AUTHOR = "author"  # the envelope's signer
    SENDER = "sender"  # the forwarder, and the author too once its signature verified


class Reason(StrEnum):
    """Why a message got its verdict; also the metric label."""

    ACCEPTED = "accepted"
    BANNED_PEER = "banned_peer"
    OVERSIZE = "oversize"
    RELAY_RATE_LIMITED = "relay_rate_limited"
    DECODE_ERROR = "decode_error"
    UNKNOWN_KIND = "unknown_kind"
    SCHEMA_CAP = "schema_cap"
    BAD_SIGNATURE = "bad_signature"
    # A pubsub message that breaks the libp2p signing policy (StrictNoSign: it carries from, seqno,
    # signature or key); judged and counted by the host before the pipeline.
    LIBP2P_SIGNING_POLICY = "libp2p_signing_policy"
    RPC_TOO_LARGE = "rpc_too_large"  # an RPC over py-libp2p's 1 MiB read limit; counted by the host
    # An IDONTWANT control message with more ids than one message needs, or ids that are not message ids.
    IDONTWANT_JUNK = "idontwant_junk"
    DUPLICATE = "duplicate"
    REPLAY = "replay"
    STALE = "stale"
    ADMISSION_LIMITED = "admission_limited"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXCEEDED = "quota_exceeded"
    INTERNAL_ERROR = "internal_error"
    # Reported later by the node (ValidationPipeline.report), after regenerating the task.
    TASK_UNKNOWN = "task_unknown"  # a task this node does not serve: not the sender's fault
    QUESTION_MISMATCH = "question_mismatch"  # question text differs from the regenerated one
    SCORING_TIMEOUT = "scoring_timeout"  # the group blew the node's scoring budget
    DATASET_REFUSED = "dataset_refused"  # a dataset this node will not score on foreign text

    @property
    def action(self) -> Action:
        return _POLICY[self][0]

    @property
    def penalty(self) -> float:
        return _POLICY[self][1]

    @property
    def blame(self) -> Blame:
        return _POLICY[self][2]


# (action, score penalty, who pays). With the default threshold of -20, one forged signature bans
# the connection that delivered it at once, two or three malformed messages do, and rate-limit
# hits need a sustained flood (scores decay with a half-life).
_POLICY: dict[Reason, tuple[Action, float, Blame]] = {
    Reason.ACCEPTED: (Action.ACCEPT, 0.0, Blame.NOBODY),
    Reason.BANNED_PEER: (Action.IGNORE, 0.0, Blame.NOBODY),
    Reason.OVERSIZE: (Action.REJECT, 10.0, Blame.SENDER),
    Reason.RELAY_RATE_LIMITED: (Action.REJECT, 1.0, Blame.FORWARDER),
    Reason.DECODE_ERROR: (Action.REJECT, 10.0, Blame.SENDER),
    Reason.UNKNOWN_KIND: (Action.REJECT, 5.0, Blame.SENDER),
    Reason.SCHEMA_CAP: (Action.REJECT, 10.0, Blame.SENDER),
    Reason.BAD_SIGNATURE: (Action.REJECT, 25.0, Blame.FORWARDER),
    Reason.LIBP2P_SIGNING_POLICY: (Action.REJECT, 25.0, Blame.FORWARDER),
    Reason.RPC_TOO_LARGE: (Action.IGNORE, 0.0, Blame.NOBODY),  # honest peers can coalesce big messages
    Reason.IDONTWANT_JUNK: (Action.REJECT, 5.0, Blame.FORWARDER),
    Reason.DUPLICATE: (Action.IGNORE, 0.0, Blame.NOBODY),
    Reason.REPLAY: (Action.IGNORE, 0.0, Blame.NOBODY),
    Reason.STALE: (Action.IGNORE, 0.0, Blame.NOBODY),
    Reason.ADMISSION_LIMITED: (Action.IGNORE, 0.0, Blame.NOBODY),
    Reason.RATE_LIMITED: (Action.REJECT, 1.0, Blame.AUTHOR),
    Reason.QUOTA_EXCEEDED: (Action.REJECT, 1.0, Blame.AUTHOR),
    Reason.INTERNAL_ERROR: (Action.IGNORE, 0.0, Blame.NOBODY),
    Reason.TASK_UNKNOWN: (Action.IGNORE, 0.0, Blame.NOBODY),
    Reason.QUESTION_MISMATCH: (Action.REJECT, 5.0, Blame.SENDER),
    Reason.SCORING_TIMEOUT: (Action.REJECT, 5.0, Blame.SENDER),
    Reason.DATASET_REFUSED: (Action.IGNORE, 0.0, Blame.NOBODY),
}


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: Reason
    envelope: Envelope | None  # set once the envelope parsed
    detail: str = ""
    message: DecodedBatch | NodeHeartbeat | None = None  # the decoded payload when accepted
    author: str = ""  # the envelope's signer, once its signature verified
    forwarder: str = ""
    banned_now: tuple[str, ...] = ()  # peers this verdict pushed below the threshold: disconnect them
    reported: bool = False  # reached by the node after delivery (ValidationPipeline.report)

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
    forwarder: str
    now: float
    msg_id: bytes = b""
    envelope: Envelope | None = None
    author: str = ""  # set once the signature verified
    message: DecodedBatch | NodeHeartbeat | None = None


class Rule(NamedTuple):
    name: str
    check: Callable[[_Candidate], None]  # raises _Failure (or WireError) to stop the pipeline


@dataclass
class _SequenceWindow:
    """Sequences seen from one (author, kind): reject those seen or below ``floor``."""

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


class _TimedIds:
    """Message ids with the time first seen, forgotten after ``window_s`` or beyond ``capacity``."""

    def __init__(self, window_s: float, capacity: int) -> None:
        self.window_s = window_s
        self.capacity = capacity
        self._ids: OrderedDict[bytes, float] = OrderedDict()  # insertion order = time order

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, msg_id: bytes, now: float) -> None:
        self._ids.setdefault(msg_id, now)
        self.prune(now)

    def prune(self, now: float) -> None:
        while self._ids:
            oldest, seen_at = next(iter(self._ids.items()))
            if len(self._ids) <= self.capacity and now - seen_at <= self.window_s:
                return
            del self._ids[oldest]


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
        known_invalid_size: int = 8192,
        admit_burst: float = ADMIT_BURST,
        admit_per_s: float = ADMIT_PER_S,
    ) -> None:
        """``replay_window`` is in sequence units (milliseconds with time-based sequences).

        ``max_age_s`` / ``max_future_s`` bound a message's creation time against this node's clock;
        the sampler applies its own, tighter freshness window to rollout groups. An accepted id is
        remembered for ``max_age_s + max_future_s`` (after that the message is stale anyway), at
        most ``dedup_size`` of them.
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
        self.admit_burst = admit_burst
        self.admit_per_s = admit_per_s
        self._clock = clock
        self.counts: Counter[tuple[Kind, Reason]] = Counter()
        self._peer_counts = _BoundedLRU(max_peers)
        self._seen_ids = _TimedIds(max_age_s + max_future_s, dedup_size)
        self._known_invalid = _BoundedLRU(known_invalid_size)  # content id -> content-determined reason
        self._sequences = _BoundedLRU(max_peers)
        self._author_buckets = _BoundedLRU(max_peers)
        self._forwarder_buckets = _BoundedLRU(max_peers)
        self._admission = _BoundedLRU(max_peers)  # forwarder -> bucket of never-seen authors
        # known author -> the forwarder of its first accepted message
        self._introduced_by = _BoundedLRU(max_peers)
        self.delivered_by = _BoundedLRU(dedup_size)  # accepted content id -> (forwarder, author)
        self._last_log: dict[Reason, float] = {}
        self.rules: list[Rule] = [
            Rule("banned_forwarder", self._check_forwarder_not_banned),
            Rule("size", self._check_size),
            Rule("relay_rate", self._check_relay_rate),
            Rule("duplicate", self._check_duplicate),
            Rule("known_invalid", self._check_known_invalid),
            Rule("envelope", self._check_envelope),
            Rule("kind", self._check_kind),
            Rule("signature", self._check_signature),
            Rule("banned_author", self._check_author_not_banned),
            Rule("admission", self._check_admission),
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

    def validate(self, kind_topic: Kind, data: bytes, forwarder: str) -> Verdict:
        """Run the rules on one message received on ``kind_topic``'s topic, delivered by ``forwarder``; never raises."""
        candidate: _Candidate | None = None
        try:
            if not isinstance(data, bytes | bytearray | memoryview):
                raise TypeError(f"message data must be bytes, got {type(data).__name__}")
            candidate = _Candidate(Kind(kind_topic), bytes(data), str(forwarder), self._clock())
            for rule in self.rules:
                rule.check(candidate)
            verdict = Verdict(Action.ACCEPT, Reason.ACCEPTED, candidate.envelope, "", candidate.message)
        except _Failure as fail:
            verdict = Verdict(
                fail.reason.action, fail.reason, candidate.envelope if candidate else None, fail.detail
            )
        except WireError as err:
            reason = Reason(err.reason)
            verdict = Verdict(reason.action, reason, candidate.envelope if candidate else None, err.detail)
        except Exception as exc:  # a bug must cost one message, never the host
            log.exception("validation of a message from %s failed", forwarder)
            envelope = candidate.envelope if candidate else None
            verdict = Verdict(Action.IGNORE, Reason.INTERNAL_ERROR, envelope, f"{type(exc).__name__}: {exc}")
        verdict = replace(verdict, forwarder=str(forwarder), author=candidate.author if candidate else "")
        try:
            if candidate is not None:
                self._remember(candidate, verdict)
            return self._record(kind_topic, verdict)
        except Exception:
            log.exception("recording a verdict for %s failed", forwarder)
            return verdict

    def report(
        self, author: str, reason: Reason, kind: Kind = Kind.ROLLOUT_BATCH, msg_id: bytes | None = None
    ) -> tuple[str, ...]:
        """Count and apply a verdict the node reached later (e.g. question_mismatch); returns the peers it banned.

        The author pays the reason's penalty; the forwarder that delivered the message (by
        ``msg_id`` when known, else the one that introduced the author) pays a fraction of it.
        """
        delivered = self.delivered_by.get(msg_id) if msg_id else None
        forwarder = delivered[0] if delivered else self._introduced_by.get(author, author)
        verdict = Verdict(reason.action, reason, None, author=author, forwarder=forwarder, reported=True)
        return self._record(kind, verdict).banned_now

    def record_forwarder(
        self, forwarder: str, reason: Reason, kind: Kind = Kind.ROLLOUT_BATCH
    ) -> tuple[str, ...]:
        """Count and apply a verdict the host saw outside the pipeline (e.g. a libp2p-level bad signature)."""
        return self._record(kind, Verdict(reason.action, reason, None, forwarder=forwarder)).banned_now

    def peer_counts(self, peer: str) -> Counter[Reason]:
        return Counter(self._peer_counts.get(peer, {}))

    def snapshot(self) -> dict[str, object]:
        """Counts and peer standings for status and metrics."""
        return {
            # a kind outside Kind (an unknown topic) is kept as its bare number
            "counts": {
                f"{str(getattr(kind, 'name', kind)).lower()}/{reason}": n
                for (kind, reason), n in self.counts.items()
            },
            "peers": self.scores.snapshot(),
            "banned": self.scores.banned(),
        }

    def structure_sizes(self) -> dict[str, int]:
        """How many entries each per-peer or per-message structure holds (all bounded)."""
        return {
            "peer_counts": len(self._peer_counts),
            "seen_ids": len(self._seen_ids),
            "known_invalid": len(self._known_invalid),
            "sequences": len(self._sequences),
            "author_buckets": len(self._author_buckets),
            "forwarder_buckets": len(self._forwarder_buckets),
            "admission": len(self._admission),
            "introduced_by": len(self._introduced_by),
            "delivered_by": len(self.delivered_by),
            "scores": self.scores.size(),
        }

    def _remember(self, c: _Candidate, verdict: Verdict) -> None:
        """Keep what later copies need: accepted ids (de-dup) and content-determined rejections."""
        if verdict.accepted:
            self._seen_ids.add(c.msg_id, c.now)
            self.delivered_by.touch(c.msg_id, lambda: (c.forwarder, c.author))
            if c.author not in self._introduced_by:
                self._introduced_by.touch(c.author, lambda: c.forwarder)
        elif verdict.reason in _CONTENT_REASONS and c.msg_id:
            # An author-blamed content fault stays author-blamed on later copies.
            self._known_invalid.touch((c.msg_id, c.kind), lambda: (verdict.reason, c.author))

    def _blamed(self, verdict: Verdict) -> Iterator[tuple[str, float]]:
        """(peer, penalty) for everyone a REJECT verdict penalizes."""
        blame, penalty = verdict.reason.blame, verdict.reason.penalty
        author, forwarder = verdict.author, verdict.forwarder
        if blame is Blame.AUTHOR and author:
            yield author, penalty
        elif blame is Blame.FORWARDER and forwarder:
            yield forwarder, penalty
        elif blame is Blame.SENDER:
            if author:
                yield author, penalty
            if forwarder and forwarder != author:
                # A node-side report on an accepted message: the relay could not have known.
                yield forwarder, penalty * (RELAY_REPORT_FACTOR if verdict.reported else 1.0)

    def _record(self, kind: Kind | int, verdict: Verdict) -> Verdict:
        kind_label = Kind(kind) if kind in Kind._value2member_map_ else kind
        self.counts[(kind_label, verdict.reason)] += 1
        counted = {p for p in (verdict.author, verdict.forwarder) if p}
        for peer in counted:
            self._peer_counts.touch(peer, Counter)[verdict.reason] += 1
        if verdict.action is Action.ACCEPT:
            self.scores.reward(verdict.author)
            return verdict
        if verdict.action is not Action.REJECT:
            return verdict
        self._log_rejection(verdict)
        banned = tuple(
            peer
            for peer, penalty in self._blamed(verdict)
            if self.scores.penalize(peer, verdict.reason, penalty)
        )
        if banned:
            return replace(verdict, banned_now=banned)
        return verdict

    def _log_rejection(self, verdict: Verdict) -> None:
        """Log each rejection reason at most once a minute; the counters hold the full picture."""
        now = self._clock()
        if now - self._last_log.get(verdict.reason, float("-inf")) >= REJECTION_LOG_INTERVAL_S:
            self._last_log[verdict.reason] = now
            log.warning(
                "rejected message from author %s via %s: %s (%s)",
                verdict.author or "?", verdict.forwarder or "?", verdict.reason, verdict.detail,
            )  # fmt: skip

    # -- rules, in order ----------------------------------------------------------------------

    def _check_forwarder_not_banned(self, c: _Candidate) -> None:
        """[IGNORE] the connection that delivered the message is banned."""
        if self.scores.is_banned(c.forwarder):
            raise _Failure(Reason.BANNED_PEER, "forwarder is banned")

    def _check_size(self, c: _Candidate) -> None:
        """[REJECT] the message is larger than max_message_bytes."""
        if len(c.data) > self.caps.max_message_bytes:
            raise _Failure(Reason.OVERSIZE, f"{len(c.data)} bytes, cap {self.caps.max_message_bytes}")

    def _check_relay_rate(self, c: _Candidate) -> None:
        """[REJECT] the forwarder delivered over 16x rate_msgs_per_s messages or 4x rate_bytes_per_s bytes per second."""
        msgs, data = self._forwarder_buckets.touch(
            c.forwarder, lambda: self._new_buckets(c.now, RELAY_RATE_FACTOR, RELAY_BYTES_FACTOR)
        )
        if not msgs.take(1, c.now) or not data.take(len(c.data), c.now):
            raise _Failure(Reason.RELAY_RATE_LIMITED, "forwarder over its relay budget")

    def _check_duplicate(self, c: _Candidate) -> None:
        """[IGNORE] the same bytes (content id) were accepted within the de-dup window."""
        c.msg_id = message_id(c.data)
        self._seen_ids.prune(c.now)
        if c.msg_id in self._seen_ids:
            raise _Failure(Reason.DUPLICATE, f"message {c.msg_id.hex()[:16]} seen before")

    def _check_known_invalid(self, c: _Candidate) -> None:
        """[REJECT] the same bytes were rejected on this topic before for their content (no re-parse)."""
        known = self._known_invalid.get((c.msg_id, c.kind))
        if known is not None:
            reason, author = known
            c.author = author
            raise _Failure(reason, "content rejected before")

    def _check_envelope(self, c: _Candidate) -> None:
        """[REJECT] the envelope does not parse or breaks an envelope cap."""
        c.envelope = open_envelope(c.data, self.caps)

    def _check_kind(self, c: _Candidate) -> None:
        """[REJECT] the envelope's kind is not its topic's kind."""
        assert c.envelope is not None
        if c.envelope.kind != c.kind:
            raise _Failure(Reason.UNKNOWN_KIND, f"{c.envelope.kind.name} envelope on the {c.kind.name} topic")

    def _check_signature(self, c: _Candidate) -> None:
        """[REJECT] the author's Ed25519 signature does not match the envelope."""
        assert c.envelope is not None
        if not verify_envelope(c.envelope):
            raise _Failure(Reason.BAD_SIGNATURE, "Ed25519 signature does not match the envelope")
        c.author = c.envelope.signer

    def _check_author_not_banned(self, c: _Candidate) -> None:
        """[IGNORE] the envelope's author is banned."""
        if self.scores.is_banned(c.author):
            raise _Failure(Reason.BANNED_PEER, "author is banned")

    def _check_admission(self, c: _Candidate) -> None:
        """[IGNORE] the author is new to us and its forwarder introduced over 32 new authors (refill: 1 per 2 s)."""
        if c.author in self._introduced_by or c.author == c.forwarder:
            return  # a known author, or a peer speaking for itself (its connection is accounted)
        bucket = self._admission.touch(
            c.forwarder, lambda: TokenBucket(self.admit_per_s, self.admit_burst, c.now)
        )
        if not bucket.take(1, c.now):
            raise _Failure(Reason.ADMISSION_LIMITED, "forwarder introduced too many new authors")

    def _check_rate(self, c: _Candidate) -> None:
        """[REJECT] the author sent more messages or bytes per second than rate_msgs_per_s / rate_bytes_per_s."""
        msgs, data = self._author_buckets.touch(c.author, lambda: self._new_buckets(c.now, 1.0, 1.0))
        if not msgs.take(1, c.now):
            raise _Failure(Reason.RATE_LIMITED, f"over {self.rate_msgs_per_s} messages/s")
        if not data.take(len(c.data), c.now):
            raise _Failure(Reason.QUOTA_EXCEEDED, f"over {self.rate_bytes_per_s:.0f} bytes/s")

    def _new_buckets(
        self, now: float, msg_factor: float, byte_factor: float
    ) -> tuple[TokenBucket, TokenBucket]:
        msg_rate, byte_rate = self.rate_msgs_per_s * msg_factor, self.rate_bytes_per_s * byte_factor
        msg_burst = max(msg_factor, msg_rate * self.burst_seconds)
        byte_burst = max(self.caps.max_message_bytes * byte_factor, byte_rate * self.burst_seconds)
        return TokenBucket(msg_rate, msg_burst, now), TokenBucket(byte_rate, byte_burst, now)

    def _check_payload(self, c: _Candidate) -> None:
        """[REJECT] the payload does not decompress or decode within the caps."""
        assert c.envelope is not None
        c.message = decode_message(c.envelope, self.caps)

    def _check_replay(self, c: _Candidate) -> None:
        """[IGNORE] the (author, kind) sequence number was seen, or is below the replay window."""
        assert c.message is not None
        seq = c.message.sequence
        window: _SequenceWindow = self._sequences.touch(
            (c.author, c.kind), lambda: _SequenceWindow(highest=seq, floor=seq - self.replay_window - 1)
        )
        if seq <= window.floor or seq <= window.highest - self.replay_window:
            raise _Failure(Reason.REPLAY, f"sequence {seq} is below the window (highest {window.highest})")
        if seq in window.seen:
            raise _Failure(Reason.REPLAY, f"sequence {seq} already seen")
        window.seen.add(seq)
        window.highest = max(window.highest, seq)
        if len(window.seen) > self.max_seen_per_peer:
            # Forget the oldest half; everything at or below the new floor counts as a replay.
            window.floor = max(window.floor, window.highest - self.replay_window)
            keep = sorted(s for s in window.seen if s > window.floor)[-self.max_seen_per_peer // 2 :]
            if keep:
                window.floor = max(window.floor, keep[0] - 1)
            window.seen = set(keep)

    def _check_freshness(self, c: _Candidate) -> None:
        """[IGNORE] the message was created more than max_age_s ago or max_future_s ahead."""
        assert c.message is not None
        age = c.now - c.message.created_at
        if age > self.max_age_s:
            raise _Failure(Reason.STALE, f"created {age:.0f} s ago, limit {self.max_age_s:.0f} s")
        if age < -self.max_future_s:
            raise _Failure(Reason.STALE, f"created {-age:.0f} s in the future (clock skew?)")


def rule_docs(pipeline: ValidationPipeline) -> list[tuple[str, str, str]]:
    """(rule name, REJECT or IGNORE, condition) for each rule, in order, from its one-line docstring."""
    out = []
    for rule in pipeline.rules:
        first = (rule.check.__doc__ or "").strip().splitlines()[0] if rule.check.__doc__ else ""
        tag, _, condition = first.partition("] ")
        out.append((rule.name, tag.removeprefix("["), condition.rstrip(".")))
    return out


# Verdicts decided by the bytes alone: a later copy of the same bytes gets the same verdict.
_CONTENT_REASONS = frozenset(
    {Reason.OVERSIZE, Reason.DECODE_ERROR, Reason.UNKNOWN_KIND, Reason.SCHEMA_CAP, Reason.BAD_SIGNATURE}
)
