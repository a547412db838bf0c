"""Receiving other nodes' rollout groups, trusting nothing, and verifying only what gets used.

Two stages (docs/DESIGN.md "As built", intake bounded by use):

1. `ExternalPool.offer` keeps every received group as a cheap *candidate*: no scoring, no
   tokenizing; a de-duplication check against a bounded memory of fingerprints, a freshness check,
   and bounds on the number of candidates, their bytes, and each sender's share of both, and the
   same share for each *connection* that delivered them (its lane): identities are free, so a
   sybil swarm relayed over one connection gets one lane's share, not one share per identity.
2. `ExternalPool.verify_for_use` runs the expensive part only for as many candidates as the
   sampler is about to use plus a bounded look-ahead (so a zero-variance pick is replaced), under
   a per-round limit on attempts and time. `ExternalIntake.process` regenerates the question from
   its task reference with the local task registry, drops it if the text differs or the reference
   is unknown (the sender is reported), refuses datasets whose scorer is unsafe on foreign text,
   scores the completions in the isolated scoring worker (swarmnode.tasks.worker; a group over its
   CPU budget is reported and penalized), re-tokenizes the text with the local tokenizer, scores 0
   a completion longer than this node's own token budget (it is cut, and the cut loses its answer:
   score what is trained on), and drops zero-variance groups (no learning signal; no penalty).

Candidates that expire or are pushed out before anyone needed them are counted as skipped work
(``intake_skipped``), never silently lost. The sampler picks from `eligible()`: verified groups.

Freshness is the group's creation time on the sender's clock, bounded by our receive time so a
timestamp in the future cannot extend a group's life, plus the sender's own round counter.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from swarmnode.config import SamplerConfig
from swarmnode.rl.records import RolloutGroup, ScoredGroup


class IntakeReason(StrEnum):
    ACCEPTED = "accepted"
    TASK_UNKNOWN = "task_unknown"  # a reference this node cannot regenerate (other preset or version)
    QUESTION_MISMATCH = "question_mismatch"  # the text does not match its reference: a lie
    DATASET_REFUSED = "dataset_refused"  # its scorer is unsafe on foreign text (tasks.safety)
    SCORING_TIMEOUT = "scoring_timeout"  # scoring it blew the worker's CPU/time budget
    SCORING_ERROR = "scoring_error"  # the worker failed for another reason (not blamed on the sender)
    ZERO_VARIANCE = "zero_variance"  # every completion got the same local reward: no signal
    DUPLICATE = "duplicate"  # already a candidate, in the pool, or seen recently
    TOO_OLD = "too_old"  # created longer ago than sampler.max_age_s when it arrived
    CANDIDATE_CAP = "candidate_cap"  # too big to hold as a candidate at all
    EMPTY = "empty"  # no completions (the wire decoder already refuses these)

    @property
    def reported_to_network(self) -> bool:
        """Verdicts about the sender that go to the p2p host, whose pipeline counts them per peer and
        applies its penalty policy: a question mismatch and a scoring timeout are penalized; an
        unknown task or a refused dataset is only counted, since honest nodes may serve other task
        presets or reasoning-gym versions."""
        return self in (
            IntakeReason.TASK_UNKNOWN,
            IntakeReason.QUESTION_MISMATCH,
            IntakeReason.SCORING_TIMEOUT,
            IntakeReason.DATASET_REFUSED,
        )

    @property
    def penalized(self) -> bool:
        """Reported verdicts the host's policy penalizes (the sender lied or attacked)."""
        return self in (IntakeReason.QUESTION_MISMATCH, IntakeReason.SCORING_TIMEOUT)


@dataclass(frozen=True)
class IntakeResult:
    reason: IntakeReason
    scored: ScoredGroup | None = None
    detail: str = ""


class ExternalIntake:
    """Verifies one received group: regenerate, match, check the dataset's policy, score, tokenize."""

    def __init__(
        self,
        registry: Any,  # swarmnode.tasks.registry.TaskRegistry
        encode_prompt: Callable[[str], list[int]],
        encode_completion: Callable[[str, bool], list[int]],
        max_completion_tokens: int,
        worker: Any = None,  # swarmnode.tasks.worker.ScoringWorker
    ) -> None:
        """`worker` scores peers' completions in an isolated process (what a node uses); without
        one they are scored in this process, behind the same grammars: for tests of the logic only."""
        self.registry = registry
        self.encode_prompt = encode_prompt
        self.encode_completion = encode_completion
        self.max_completion_tokens = max_completion_tokens
        self.worker = worker

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()

    def _score(self, task: Any, completions: Sequence[str]) -> Any:
        """A `WorkerScore`: status "ok" with rewards, "over_budget" or "error" with a detail."""
        if self.worker is not None:
            return self.worker.score(task.ref, completions)
        from swarmnode.tasks.worker import ScoreStatus, WorkerScore

        return WorkerScore(
            ScoreStatus.OK, tuple(self.registry.score(task, text, foreign=True) for text in completions)
        )

    def precheck(self, group: RolloutGroup) -> IntakeResult | None:
        """The checks cheap enough to run on every received group (no item generated, nothing
        scored): None when the group may become a candidate."""
        from swarmnode.tasks.registry import UnknownTaskError

        if not group.completions:
            return IntakeResult(IntakeReason.EMPTY, detail="group has no completions")
        try:
            self.registry.check_served(group.task)
        except UnknownTaskError as exc:
            return IntakeResult(IntakeReason.TASK_UNKNOWN, detail=str(exc))
        policy = self.registry.foreign_text_policy(group.task.dataset)
        if policy.refused:
            return IntakeResult(IntakeReason.DATASET_REFUSED, detail=f"{group.task.dataset}: {policy.note}")
        return None

    def process(self, group: RolloutGroup) -> IntakeResult:
        # Imported here so rl stays importable without reasoning-gym for pure-logic tests.
        from swarmnode.tasks.registry import UnknownTaskError

        if not group.completions:
            return IntakeResult(IntakeReason.EMPTY, detail="group has no completions")
        try:
            task = self.registry.regenerate(group.task)
        except UnknownTaskError as exc:
            return IntakeResult(IntakeReason.TASK_UNKNOWN, detail=str(exc))
        if task.question != group.question:
            return IntakeResult(IntakeReason.QUESTION_MISMATCH, detail=f"task {group.task.key()}")
        policy = self.registry.foreign_text_policy(group.task.dataset)
        if policy.refused:
            return IntakeResult(IntakeReason.DATASET_REFUSED, detail=f"{group.task.dataset}: {policy.note}")
        # One character past the cap is enough for the scorer to see the text is too long.
        limit = self.registry.max_completion_chars + 1
        result = self._score(task, [text[:limit] for text in group.completions])
        if result.status == "over_budget":
            return IntakeResult(IntakeReason.SCORING_TIMEOUT, detail=result.detail)
        if result.status != "ok":
            return IntakeResult(IntakeReason.SCORING_ERROR, detail=result.detail)
        rewards = tuple(result.rewards)
        if max(rewards) == min(rewards):
            return IntakeResult(IntakeReason.ZERO_VARIANCE)
        full_ids = [
            self.encode_completion(text, done)
            for text, done in zip(group.completions, group.finished, strict=True)
        ]
        # Score what is trained on: a completion longer in local tokens than this node's own budget
        # is cut to it, and the cut loses its answer, so it scores 0, as the node's own cut
        # completions do (a correct 200-token answer cut to 48 tokens must not be trained on with a
        # positive advantage).
        over = [len(ids) > self.max_completion_tokens for ids in full_ids]
        if any(over):
            rewards = tuple(0.0 if cut else reward for reward, cut in zip(rewards, over, strict=True))
            if max(rewards) == min(rewards):
                return IntakeResult(
                    IntakeReason.ZERO_VARIANCE,
                    detail=f"{sum(over)} completions over {self.max_completion_tokens} tokens score 0",
                )
        prompt_ids = tuple(self.encode_prompt(task.question))
        completion_ids = tuple(tuple(ids[: self.max_completion_tokens]) for ids in full_ids)
        scored = ScoredGroup(group, rewards, prompt_ids, completion_ids)
        return IntakeResult(IntakeReason.ACCEPTED, scored)


def group_fingerprint(group: RolloutGroup) -> str:
    digest = hashlib.sha256(group.task.key().encode())
    for text in group.completions:
        digest.update(b"\x00" + text.encode())
    return digest.hexdigest()[:32]


def group_bytes(group: RolloutGroup) -> int:
    """What holding the group as a candidate costs, roughly (text dominates)."""
    return len(group.question) + sum(len(text) for text in group.completions) + 64 * len(group.completions)


RELAYED = "relayed"


def turn_of(origin: str, forwarder: str) -> str:
    """Whose turn a group takes in verification and in the sampler: its author's when the author
    delivered it over its own connection (or the forwarder is unknown), else one turn shared by
    everything relayed. A connected peer's own groups are what its connection vouches for; relayed
    groups can come from any number of identities (a sybil swarm relayed by honest peers too), so
    together they weigh as much as one connected peer."""
    return origin if not forwarder or forwarder == origin else RELAYED


class _Delivered:
    """How a received group arrived: its sender, the envelope's author (`origin`) and the connected
    peer that delivered it (`forwarder`), and the fairness units derived from them."""

    origin: str
    forwarder: str

    @property
    def source(self) -> str:
        raise NotImplementedError

    @property
    def lane(self) -> str:
        """The delivering connection, the unit of fairness identities cannot multiply; the sender
        when nothing else is known."""
        return self.forwarder or self.origin or self.source

    @property
    def turn(self) -> str:
        return turn_of(self.origin or self.source, self.forwarder)


@dataclass
class PooledGroup(_Delivered):
    scored: ScoredGroup
    received_at: float
    origin: str = ""  # the peer that delivered it (reports go there)
    forwarder: str = ""  # the connected peer that delivered it ("" when unknown)

    @property
    def source(self) -> str:
        return self.scored.group.source


@dataclass
class Candidate(_Delivered):
    group: RolloutGroup
    origin: str
    received_at: float
    size: int
    msg_id: str = ""  # content id of the message that carried it (blames its forwarder on a bad verdict)
    forwarder: str = ""  # the connected peer that delivered it ("" when unknown)

    @property
    def source(self) -> str:
        return self.group.source


class _Shares:
    """Candidate fingerprints per owner (a sender or a delivering connection), oldest first, with bytes."""

    def __init__(self) -> None:
        self.keys: dict[str, OrderedDict[str, None]] = {}
        self.bytes: Counter[str] = Counter()

    def add(self, owner: str, key: str, size: int) -> None:
        self.keys.setdefault(owner, OrderedDict())[key] = None
        self.bytes[owner] += size

    def remove(self, owner: str, key: str, size: int) -> None:
        mine = self.keys[owner]
        del mine[key]
        self.bytes[owner] -= size
        if not mine:
            del self.keys[owner], self.bytes[owner]

    def oldest_over(self, owner: str, max_count: int, max_bytes: int) -> str | None:
        """The owner's oldest key while it holds more than its share, else None."""
        mine = self.keys.get(owner)
        if mine and (len(mine) > max_count or self.bytes[owner] > max_bytes):
            return next(iter(mine))
        return None


def round_robin(queues: list[list[str]]) -> list[str]:
    """The first item of every queue in turn, then the second of every queue, and so on."""
    order: list[str] = []
    depth = 0
    while any(depth < len(q) for q in queues):
        order.extend(q[depth] for q in queues if depth < len(q))
        depth += 1
    return order


@dataclass(frozen=True)
class IntakeLimits:
    """How much unverified material a node holds, and how much verification a round may do."""

    max_candidates: int = 512
    max_candidate_bytes: int = 32 * 1024 * 1024
    lookahead: int = 4  # verified groups kept ready beyond the J the sampler takes
    max_attempts_per_round: int = 64  # verifications per round, whatever their outcome
    budget_s_per_round: float = 10.0  # wall time per round for verification
    seen_memory: int = 8192  # fingerprints remembered to drop re-sent groups cheaply


@dataclass
class VerifyReport:
    """What one `verify_for_use` call did, for the round's counters."""

    attempted: int = 0
    outcomes: list[tuple[Candidate, IntakeResult]] = field(default_factory=list)
    stopped_by: str = ""  # "" (enough ready / nothing left), "attempts" or "budget"


def effective_created_at(group: RolloutGroup, received_at: float) -> float:
    """The group's creation time, never later than when we received it (a future timestamp would
    otherwise keep it fresh forever); a NaN claim counts as received now."""
    created = group.created_at
    if math.isnan(created):
        return received_at
    return min(created, received_at)


class ExternalPool:
    """Candidates (received, unverified) and verified groups, both fresh, bounded and unique."""

    def __init__(
        self,
        cfg: SamplerConfig,
        clock: Callable[[], float] = time.time,
        limits: IntakeLimits | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.monotonic = monotonic
        self.limits = limits or IntakeLimits(max_candidates=cfg.pool_size)
        self._groups: OrderedDict[str, PooledGroup] = OrderedDict()  # fingerprint -> verified, oldest first
        # fingerprint -> unverified candidate, oldest first; and the same keys per sender, with bytes
        self._candidates: OrderedDict[str, Candidate] = OrderedDict()
        self._by_source = _Shares()
        self._by_lane = _Shares()
        self._candidate_bytes = 0
        self._seen: OrderedDict[str, None] = OrderedDict()  # fingerprints verified or dropped before
        # sender -> highest node round seen; bounded like `_seen` (sybils bring many senders)
        self._latest_round: OrderedDict[str, int] = OrderedDict()
        self.evicted: Counter[str] = Counter()  # verified groups evicted, by reason
        self.skipped: Counter[str] = Counter()  # candidates dropped unverified, by reason

    def __len__(self) -> int:
        return len(self._groups)

    @property
    def candidate_count(self) -> int:
        return len(self._candidates)

    @property
    def candidate_bytes(self) -> int:
        return self._candidate_bytes

    # -- freshness -----------------------------------------------------------------------------
    def _age(self, group: RolloutGroup, received_at: float, now: float) -> float:
        return now - effective_created_at(group, received_at)

    def _round_lagging(self, group: RolloutGroup) -> bool:
        return group.round < self._latest_round.get(group.source, group.round) - self.cfg.max_round_lag

    def _note_round(self, group: RolloutGroup) -> None:
        self._latest_round[group.source] = max(self._latest_round.get(group.source, -1), group.round)
        self._latest_round.move_to_end(group.source)
        while len(self._latest_round) > self.limits.seen_memory:
            self._latest_round.popitem(last=False)

    def _remember(self, key: str) -> None:
        self._seen[key] = None
        self._seen.move_to_end(key)
        while len(self._seen) > self.limits.seen_memory:
            self._seen.popitem(last=False)

    # -- stage 1: cheap candidates ---------------------------------------------------------------
    def offer(
        self,
        group: RolloutGroup,
        origin: str,
        received_at: float | None = None,
        msg_id: str = "",
        forwarder: str = "",
    ) -> IntakeReason | None:
        """Keep a received group as a candidate; None when kept, else why it was dropped at once."""
        received_at = self.clock() if received_at is None else received_at
        if not group.completions:
            return IntakeReason.EMPTY
        key = group_fingerprint(group)
        if key in self._candidates or key in self._groups or key in self._seen:
            return IntakeReason.DUPLICATE
        if self._age(group, received_at, self.clock()) > self.cfg.max_age_s:
            self._remember(key)
            return IntakeReason.TOO_OLD
        size = group_bytes(group)
        per_source_bytes = self.limits.max_candidate_bytes // 4
        if size > per_source_bytes:
            return IntakeReason.CANDIDATE_CAP
        self._note_round(group)
        candidate = Candidate(group, origin, received_at, size, msg_id, forwarder)
        self._candidates[key] = candidate
        self._by_source.add(candidate.source, key, size)
        self._by_lane.add(candidate.lane, key, size)
        self._candidate_bytes += size
        # One sender, and one delivering connection, gets at most a quarter of the candidates (count
        # and bytes): its oldest go first.
        per_source_count = max(1, self.limits.max_candidates // 4)
        for shares, owner, reason in (
            (self._by_source, candidate.source, "per_source_cap"),
            (self._by_lane, candidate.lane, "per_connection_cap"),
        ):
            while (oldest := shares.oldest_over(owner, per_source_count, per_source_bytes)) is not None:
                self._drop_candidate(oldest, reason)
        while self._candidates and (
            len(self._candidates) > self.limits.max_candidates
            or self._candidate_bytes > self.limits.max_candidate_bytes
        ):
            self._drop_candidate(next(iter(self._candidates)), "candidates_full")
        return None

    def _drop_candidate(self, key: str, reason: str) -> Candidate:
        candidate = self._candidates.pop(key)
        self._candidate_bytes -= candidate.size
        self._by_source.remove(candidate.source, key, candidate.size)
        self._by_lane.remove(candidate.lane, key, candidate.size)
        if reason:
            self.skipped[reason] += 1
        return candidate

    def expire_candidates(self) -> None:
        now = self.clock()
        for key, candidate in list(self._candidates.items()):
            if self._age(candidate.group, candidate.received_at, now) > self.cfg.max_age_s:
                self._drop_candidate(key, "too_old")
            elif self._round_lagging(candidate.group):
                self._drop_candidate(key, "round_lag")

    def _verification_order(self, rng: random.Random) -> list[str]:
        """Candidates to verify first: one per turn in turn (each connected author's own groups,
        newest first, and one shared turn for everything relayed), in random order; within the
        relayed turn one per delivering connection in turn and within a connection one per sender
        in turn. Neither a flooder, nor a sybil swarm behind one connection, nor one relayed by
        honest peers can monopolize the budget."""
        lanes = sorted(self._by_lane.keys)
        rng.shuffle(lanes)
        own: dict[str, list[str]] = {}
        relayed: list[list[str]] = []
        for lane in lanes:
            by_source: dict[str, list[str]] = {}
            for key in reversed(self._by_lane.keys[lane]):  # newest first
                candidate = self._candidates[key]
                if (turn := candidate.turn) == RELAYED:
                    by_source.setdefault(candidate.source, []).append(key)
                else:
                    own.setdefault(turn, []).append(key)
            if by_source:
                sources = sorted(by_source)
                rng.shuffle(sources)
                relayed.append(round_robin([by_source[source] for source in sources]))
        turns = sorted(own)
        rng.shuffle(turns)
        queues = [own[turn] for turn in turns]
        if relayed:
            queues.insert(rng.randrange(len(queues) + 1), round_robin(relayed))
        return round_robin(queues)

    # -- stage 2: verify what will be used ---------------------------------------------------------
    def verify_for_use(
        self, process: Callable[[RolloutGroup], IntakeResult], wanted: int, rng: random.Random
    ) -> VerifyReport:
        """Verify candidates until `wanted` verified groups are ready and every turn (see
        `turn_of`) that still has candidates holds its share of them, or this round's attempts or
        time run out. Verified groups join the pool; every outcome is in the report.

        The share (`wanted` over the turns that have verified groups or candidates, rounded up)
        keeps the pool fair: without it, leftovers of the turn whose groups always verify (a sybil
        swarm's) satisfy `wanted` and the other turns are never verified, so the sampler can only
        draw from that one."""
        report = VerifyReport()
        self.expire()
        self.expire_candidates()
        if wanted <= 0:
            return report
        order = self._verification_order(rng)
        ready = Counter(pooled.turn for pooled in self._groups.values())
        unvisited = Counter(self._candidates[key].turn for key in order)
        share = -(-wanted // max(1, len(set(ready) | set(unvisited))))
        short = {turn for turn in unvisited if ready[turn] < share}  # turns below their share
        started = self.monotonic()
        for key in order:
            turn = self._candidates[key].turn
            unvisited[turn] -= 1
            if not unvisited[turn]:
                short.discard(turn)  # after this candidate, nothing left to verify in its turn
            if len(self._groups) >= wanted and ready[turn] >= share:
                if not short:
                    break
                continue
            if report.attempted >= self.limits.max_attempts_per_round:
                report.stopped_by = "attempts"
                break
            if self.monotonic() - started > self.limits.budget_s_per_round:
                report.stopped_by = "budget"
                break
            candidate = self._drop_candidate(key, "")
            self._remember(key)
            report.attempted += 1
            result = process(candidate.group)
            if result.reason is IntakeReason.ACCEPTED:
                assert result.scored is not None
                if self._add(result.scored, candidate.received_at, candidate.origin, candidate.forwarder):
                    ready[turn] += 1
                    if ready[turn] >= share:
                        short.discard(turn)
                else:
                    result = IntakeResult(IntakeReason.DUPLICATE)
            report.outcomes.append((candidate, result))
        return report

    # -- verified groups -------------------------------------------------------------------------------
    def add(
        self, scored: ScoredGroup, received_at: float | None = None, origin: str = "", forwarder: str = ""
    ) -> bool:
        """Add a verified group directly; False when it is a duplicate."""
        return self._add(scored, self.clock() if received_at is None else received_at, origin, forwarder)

    def _add(self, scored: ScoredGroup, received_at: float, origin: str, forwarder: str = "") -> bool:
        key = group_fingerprint(scored.group)
        if key in self._groups:
            return False
        source = scored.group.source
        self._note_round(scored.group)
        self._groups[key] = PooledGroup(scored, received_at, origin, forwarder)
        per_source_limit = max(1, self.cfg.pool_size // 4)
        from_source = [k for k, p in self._groups.items() if p.source == source]
        for old in from_source[: max(0, len(from_source) - per_source_limit)]:
            del self._groups[old]
            self.evicted["per_source_cap"] += 1
        while len(self._groups) > self.cfg.pool_size:
            self._groups.popitem(last=False)
            self.evicted["pool_full"] += 1
        return True

    def contains(self, group: RolloutGroup) -> bool:
        return group_fingerprint(group) in self._groups

    def expire(self) -> None:
        now = self.clock()
        for key, pooled in list(self._groups.items()):
            group = pooled.scored.group
            if self._age(group, pooled.received_at, now) > self.cfg.max_age_s:
                del self._groups[key]
                self.evicted["too_old"] += 1
            elif self._round_lagging(group):
                del self._groups[key]
                self.evicted["round_lag"] += 1

    def eligible(self) -> list[PooledGroup]:
        self.expire()
        return list(self._groups.values())

    def take(self, chosen: list[PooledGroup]) -> None:
        """Remove groups that were trained on, so none is used twice."""
        for pooled in chosen:
            self._groups.pop(group_fingerprint(pooled.scored.group), None)
