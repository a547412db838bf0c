"""Peer scores fed by the validation pipeline's verdicts, temporary bans, and per-peer token buckets.

A peer's score starts at 0, drops by the penalty of each rejection reason, rises a little with
each accepted message (up to ``max_score``), and decays toward 0 with a half-life, so old faults
are forgiven. When it falls below ``threshold`` the peer is banned for ``ban_seconds``: the host
disconnects it and the pipeline ignores its messages until the ban ends, when its score restarts
at 0. We score peers ourselves instead of using py-libp2p's simplified gossipsub scoring
(docs/LIBP2P.md).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swarmnode.p2p.pipeline import Reason

Clock = Callable[[], float]


class TokenBucket:
    """Allows a sustained ``rate`` per second with bursts up to ``capacity``."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError(f"token bucket needs rate > 0 and capacity > 0, got {rate} and {capacity}")
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self._updated = now

    def take(self, amount: float, now: float) -> bool:
        """Take ``amount`` tokens if available; False (and nothing taken) otherwise."""
        self.tokens = min(self.capacity, self.tokens + max(0.0, now - self._updated) * self.rate)
        self._updated = now
        if amount > self.tokens:
            return False
        self.tokens -= amount
        return True


@dataclass
class _PeerRecord:
    score: float
    updated: float
    banned_until: float = 0.0
    bans: int = 0
    penalties: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class PeerScoreView:
    """One peer's standing, for status displays."""

    score: float
    banned_for_s: float  # 0 when not banned
    bans: int
    penalties: dict[str, int]


class PeerScores:
    def __init__(
        self,
        threshold: float = -20.0,
        ban_seconds: float = 300.0,
        clock: Clock = time.time,
        *,
        half_life_s: float = 300.0,
        accept_reward: float = 0.1,
        max_score: float = 10.0,
        max_peers: int = 10_000,
    ) -> None:
        if threshold >= 0:
            raise ValueError(f"score threshold must be negative (a new peer scores 0), got {threshold}")
        self.threshold = threshold
        self.ban_seconds = ban_seconds
        self.half_life_s = half_life_s
        self.accept_reward = accept_reward
        self.max_score = max_score
        self.max_peers = max_peers
        self._clock = clock
        self._peers: OrderedDict[str, _PeerRecord] = OrderedDict()

    def _record(self, peer: str) -> _PeerRecord:
        """The peer's record with its score decayed to now (created at 0 when new)."""
        now = self._clock()
        rec = self._peers.get(peer)
        if rec is None:
            rec = self._peers[peer] = _PeerRecord(score=0.0, updated=now)
            self._evict()
        else:
            self._peers.move_to_end(peer)
            rec.score *= 0.5 ** (max(0.0, now - rec.updated) / self.half_life_s)
            rec.updated = now
        return rec

    def _evict(self) -> None:
        """Forget the least recently seen peers that are not banned, beyond ``max_peers``."""
        excess = len(self._peers) - self.max_peers
        if excess <= 0:
            return
        now = self._clock()
        for peer in [p for p, r in self._peers.items() if r.banned_until <= now][:excess]:
            del self._peers[peer]

    def penalize(self, peer: str, reason: Reason) -> bool:
        """Lower the peer's score by the reason's penalty; True when this penalty banned the peer."""
        rec = self._record(peer)
        rec.penalties[str(reason)] += 1
        if self.is_banned(peer):
            return False
        rec.score -= reason.penalty
        if rec.score >= self.threshold:
            return False
        rec.banned_until = self._clock() + self.ban_seconds
        rec.bans += 1
        return True

    def reward(self, peer: str) -> None:
        """Credit an accepted message."""
        rec = self._record(peer)
        rec.score = min(self.max_score, rec.score + self.accept_reward)

    def score(self, peer: str) -> float:
        rec = self._peers.get(peer)
        return 0.0 if rec is None else self._record(peer).score

    def is_banned(self, peer: str) -> bool:
        rec = self._peers.get(peer)
        return rec is not None and rec.banned_until > self._clock()

    def banned(self) -> list[str]:
        now = self._clock()
        return [p for p, r in self._peers.items() if r.banned_until > now]

    def ban_expired(self) -> list[str]:
        """Peers whose ban has ended since the last call (the host may reconnect them); scores restart at 0."""
        now = self._clock()
        expired = [p for p, r in self._peers.items() if 0.0 < r.banned_until <= now]
        for peer in expired:
            rec = self._peers[peer]
            rec.banned_until = 0.0
            rec.score = 0.0
            rec.updated = now
        return expired

    def snapshot(self) -> dict[str, PeerScoreView]:
        now = self._clock()
        return {
            peer: PeerScoreView(
                score=round(self.score(peer), 3),
                banned_for_s=max(0.0, rec.banned_until - now),
                bans=rec.bans,
                penalties=dict(rec.penalties),
            )
            for peer, rec in list(self._peers.items())
        }
