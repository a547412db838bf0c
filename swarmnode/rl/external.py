"""Receiving other nodes' rollout groups, trusting nothing, and pooling them for the sampler.

`ExternalIntake` turns a received `RolloutGroup` into a `ScoredGroup` or a rejection reason:
regenerate the question from its task reference with the local task registry, drop it if the
text differs or the reference is unknown (the sender is penalized), score every completion with
the local verifier, drop zero-variance groups (no learning signal; no penalty), and re-tokenize
the text with the local tokenizer.

`ExternalPool` keeps accepted groups under a freshness window (age and the sender's own round
counter), a per-source cap and de-duplication. The sampler picks from `eligible()`.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from swarmnode.config import SamplerConfig
from swarmnode.rl.records import RolloutGroup, ScoredGroup


class IntakeReason(StrEnum):
    ACCEPTED = "accepted"
    TASK_UNKNOWN = "task_unknown"  # a reference this node cannot regenerate (other preset or version)
    QUESTION_MISMATCH = "question_mismatch"  # the text does not match its reference: a lie
    ZERO_VARIANCE = "zero_variance"  # every completion got the same local reward: no signal
    DUPLICATE = "duplicate"  # already in the pool
    EMPTY = "empty"  # no completions (the wire decoder already refuses these)

    @property
    def reported_to_network(self) -> bool:
        """Verdicts about the sender that go to the p2p host, whose pipeline counts them per peer and
        applies its penalty policy: a question mismatch is penalized; an unknown task is only counted,
        since honest nodes may serve other task presets or reasoning-gym versions."""
        return self in (IntakeReason.TASK_UNKNOWN, IntakeReason.QUESTION_MISMATCH)


@dataclass(frozen=True)
class IntakeResult:
    reason: IntakeReason
    scored: ScoredGroup | None = None
    detail: str = ""


class ExternalIntake:
    def __init__(
        self,
        registry,  # swarmnode.tasks.registry.TaskRegistry
        encode_prompt: Callable[[str], list[int]],
        encode_completion: Callable[[str, bool], list[int]],
        max_completion_tokens: int,
    ) -> None:
        self.registry = registry
        self.encode_prompt = encode_prompt
        self.encode_completion = encode_completion
        self.max_completion_tokens = max_completion_tokens

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
        rewards = tuple(self.registry.score(task, text) for text in group.completions)
        if max(rewards) == min(rewards):
            return IntakeResult(IntakeReason.ZERO_VARIANCE)
        prompt_ids = tuple(self.encode_prompt(task.question))
        completion_ids = tuple(
            tuple(self.encode_completion(text, done)[: self.max_completion_tokens])
            for text, done in zip(group.completions, group.finished, strict=True)
        )
        scored = ScoredGroup(group, rewards, prompt_ids, completion_ids)
        return IntakeResult(IntakeReason.ACCEPTED, scored)


def group_fingerprint(group: RolloutGroup) -> str:
    digest = hashlib.sha256(group.task.key().encode())
    for text in group.completions:
        digest.update(b"\x00" + text.encode())
    return digest.hexdigest()[:32]


@dataclass
class PooledGroup:
    scored: ScoredGroup
    received_at: float

    @property
    def source(self) -> str:
        return self.scored.group.source


class ExternalPool:
    """Accepted external groups, freshest first out of the window, bounded per source and in total."""

    def __init__(self, cfg: SamplerConfig, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self._groups: OrderedDict[str, PooledGroup] = OrderedDict()  # fingerprint -> group, oldest first
        self._latest_round: dict[str, int] = {}  # sender -> highest node round seen
        self.evicted: Counter[str] = Counter()  # reason -> count

    def __len__(self) -> int:
        return len(self._groups)

    def add(self, scored: ScoredGroup) -> bool:
        """Add an accepted group; False when it is a duplicate."""
        key = group_fingerprint(scored.group)
        if key in self._groups:
            return False
        source = scored.group.source
        self._latest_round[source] = max(self._latest_round.get(source, -1), scored.group.round)
        self._groups[key] = PooledGroup(scored, self.clock())
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
            if now - pooled.received_at > self.cfg.max_age_s:
                del self._groups[key]
                self.evicted["too_old"] += 1
            elif group.round < self._latest_round[group.source] - self.cfg.max_round_lag:
                del self._groups[key]
                self.evicted["round_lag"] += 1

    def eligible(self) -> list[PooledGroup]:
        self.expire()
        return list(self._groups.values())

    def take(self, chosen: list[PooledGroup]) -> None:
        """Remove groups that were trained on, so none is used twice."""
        for pooled in chosen:
            self._groups.pop(group_fingerprint(pooled.scored.group), None)
