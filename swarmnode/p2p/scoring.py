"""Peer scores fed by the validation pipeline's verdicts, temporary bans, and per-peer token buckets.

A peer's score starts at 0, drops by the penalty of each rejection reason, rises a little with
each accepted message (up to ``max_score``), and decays toward 0 with a half-life, so old faults
are forgiven. When it falls below ``threshold`` the peer is banned for ``ban_seconds``: the host
disconnects it and the pipeline ignores its messages until the ban ends, when its score restarts
at 0. We score peers ourselves instead of using py-libp2p's simplified gossipsub scoring
(docs/LIBP2P.md).

Peer ids are free to mint, so every table is bounded by count: beyond ``max_peers`` the least
recently seen unbanned peers are forgotten, and beyond ``max_banned`` the bans that end first are
dropped early (their peers are reported by ``ban_expired`` like any ended ban). Bans can be
exported and re-imported (``export_bans`` / ``import_bans``) so a restarted host keeps them.
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
    ban_reason: str = ""
    penalties: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class BanRecord:
    """One current ban, for status displays and the host's ban file."""

    peer_id: str
    reason: str  # the verdict reason that pushed the peer below the threshold
    until: float  # wall-clock (the scores' clock) time the ban ends
    bans: int  # how many times this peer was banned while we remembered it


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
        max_banned: int = 4096,
    ) -> None:
        if threshold >= 0:
            raise ValueError(f"score threshold must be negative (a new peer scores 0), got {threshold}")
        self.threshold = threshold
        self.ban_seconds = ban_seconds
        self.half_life_s = half_life_s
        self.accept_reward = accept_reward
        self.max_score = max_score
        self.max_peers = max_peers
        self.max_banned = max_banned
        self._clock = clock
        self._peers: OrderedDict[str, _PeerRecord] = OrderedDict()
        self._banned: dict[str, float] = {}  # peer -> banned_until, for the bounded ban table
        self._released: list[str] = []  # bans dropped early (over max_banned), reported by ban_expired

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
        victims = []
        for peer in self._peers:  # oldest first; stops after ``excess`` unbanned ones
            if peer not in self._banned:
                victims.append(peer)
                if len(victims) == excess:
                    break
        for peer in victims:
            del self._peers[peer]

    def _ban(self, peer: str, rec: _PeerRecord, until: float, reason: str) -> None:
        rec.banned_until, rec.ban_reason = until, reason
        rec.bans += 1
        self._banned[peer] = until
        while len(self._banned) > self.max_banned:
            # Drop the ban that ends first: a flood of sybil bans must not grow this table.
            first = min(self._banned, key=self._banned.__getitem__)
            self._lift(first, self._clock())
            self._released.append(first)
        # Peers beyond max_peers that are banned cannot be evicted: keep the table bounded anyway.
        self._evict()

    def _lift(self, peer: str, now: float) -> None:
        self._banned.pop(peer, None)
        rec = self._peers.get(peer)
        if rec is not None:
            rec.banned_until, rec.score, rec.updated, rec.ban_reason = 0.0, 0.0, now, ""

    def penalize(self, peer: str, reason: Reason, penalty: float | None = None) -> bool:
        """Lower the peer's score by ``penalty`` (default: the reason's); True when this banned the peer.

        A banned peer's penalties are counted but do not lower its score further (no second ban).
        """
        rec = self._record(peer)
        rec.penalties[str(reason)] += 1
        if self.is_banned(peer):
            return False
        rec.score -= reason.penalty if penalty is None else penalty
        if rec.score >= self.threshold:
            return False
        self._ban(peer, rec, self._clock() + self.ban_seconds, str(reason))
        return True

    def reward(self, peer: str) -> None:
        """Credit an accepted message."""
        rec = self._record(peer)
        rec.score = min(self.max_score, rec.score + self.accept_reward)

    def score(self, peer: str) -> float:
        rec = self._peers.get(peer)
        return 0.0 if rec is None else self._record(peer).score

    def is_banned(self, peer: str) -> bool:
        return self._banned.get(peer, 0.0) > self._clock()

    def banned(self) -> list[str]:
        now = self._clock()
        return [p for p, until in self._banned.items() if until > now]

    def size(self) -> int:
        return len(self._peers)

    def ban_records(self, limit: int | None = None) -> list[BanRecord]:
        """Current bans, those ending last first, at most ``limit``."""
        now = self._clock()
        active = sorted(((u, p) for p, u in self._banned.items() if u > now), reverse=True)[:limit]
        out = []
        for until, peer in active:
            rec = self._peers.get(peer)
            out.append(BanRecord(peer, rec.ban_reason if rec else "", until, rec.bans if rec else 1))
        return out

    def import_bans(self, records: list[BanRecord]) -> int:
        """Re-apply bans saved by a previous host (ended ones are skipped); returns how many apply."""
        now, applied = self._clock(), 0
        for ban in records:
            if ban.until > now and not self.is_banned(ban.peer_id):
                rec = self._record(ban.peer_id)
                rec.score = min(rec.score, self.threshold)
                self._ban(ban.peer_id, rec, min(ban.until, now + self.ban_seconds), ban.reason)
                rec.bans = max(rec.bans, ban.bans)
                applied += 1
        return applied

    def ban_expired(self) -> list[str]:
        """Peers whose ban has ended (or was dropped over ``max_banned``) since the last call; scores restart at 0."""
        now = self._clock()
        expired = [p for p, until in self._banned.items() if until <= now]
        for peer in expired:
            self._lift(peer, now)
        released, self._released = [p for p in self._released if p not in self._banned], []
        return [*released, *expired]

    def snapshot(self, limit: int = 1000) -> dict[str, PeerScoreView]:
        """The ``limit`` most recently seen peers' standings."""
        now = self._clock()
        recent = list(self._peers.items())[-limit:]
        return {
            peer: PeerScoreView(
                score=round(self.score(peer), 3),
                banned_for_s=max(0.0, rec.banned_until - now),
                bans=rec.bans,
                penalties=dict(rec.penalties),
            )
            for peer, rec in recent
        }
