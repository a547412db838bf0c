"""Receiving external groups trusts nothing; the pool keeps them fresh, bounded and unique."""

import random
import re
import time
from dataclasses import replace

import pytest

from swarmnode.config import SamplerConfig
from swarmnode.rl.external import ExternalIntake, ExternalPool, IntakeReason
from swarmnode.rl.records import RolloutGroup, ScoredGroup
from swarmnode.rl.sampler import SamplerContext, get_strategy, select_external
from swarmnode.tasks.reference import TaskRef
from swarmnode.tasks.registry import TaskRegistry


@pytest.fixture(scope="module")
def registry() -> TaskRegistry:
    return TaskRegistry("easy", eval_size=20)


def _encode(text: str) -> list[int]:
    return [ord(c) % 97 for c in text]


def _intake(registry: TaskRegistry) -> ExternalIntake:
    return ExternalIntake(registry, _encode, lambda text, done: _encode(text) + ([0] if done else []), 16)


def _group(
    registry: TaskRegistry, completions: list[str], source: str = "peerA", round_: int = 0, seed: int = 1
):
    task = registry.sample(random.Random(seed), 1)[0]
    return task, RolloutGroup(
        task=task.ref,
        question=task.question,
        completions=tuple(completions),
        finished=tuple(True for _ in completions),
        model_id="m",
        round=round_,
        created_at=0.0,
        source=source,
    )


def _right_and_wrong(registry: TaskRegistry, seed: int = 1) -> tuple[str, str]:
    task = registry.sample(random.Random(seed), 1)[0]
    return f"<answer>{task.answer}</answer>", "<answer>-1</answer>"


def test_external_group_is_rescored_by_the_local_verifier_and_retokenized(registry):
    right, wrong = _right_and_wrong(registry)
    _, group = _group(registry, [right, wrong, wrong, right])
    result = _intake(registry).process(group)
    assert result.reason is IntakeReason.ACCEPTED
    assert result.scored.rewards == (1.0, 0.0, 0.0, 1.0)
    assert result.scored.completion_ids[0] == tuple((_encode(right) + [0])[:16])
    assert result.scored.prompt_ids == tuple(_encode(group.question))


def test_question_not_matching_its_reference_is_dropped_and_reported(registry):
    right, wrong = _right_and_wrong(registry)
    _, group = _group(registry, [right, wrong])
    forged = replace(group, question=re.sub(r"\d+", "7", group.question, count=1) + " ")
    result = _intake(registry).process(forged)
    assert result.reason is IntakeReason.QUESTION_MISMATCH
    assert result.reason.reported_to_network


def test_unknown_reference_is_dropped_and_reported(registry):
    right, wrong = _right_and_wrong(registry)
    _, group = _group(registry, [right, wrong])
    for ref in (
        replace(group.task, dataset="no_such_dataset"),
        replace(group.task, config_digest="0" * 16),
        replace(group.task, generator_version="0.0.1"),
    ):
        result = _intake(registry).process(replace(group, task=ref))
        assert result.reason is IntakeReason.TASK_UNKNOWN, ref
        assert result.reason.reported_to_network


def test_zero_variance_group_is_dropped_without_penalty(registry):
    right, _ = _right_and_wrong(registry)
    _, group = _group(registry, [right] * 4)
    result = _intake(registry).process(group)
    assert result.reason is IntakeReason.ZERO_VARIANCE
    assert not result.reason.reported_to_network


def _scored(
    source: str, index: int, rewards=(1.0, 0.0), round_: int = 0, created_at: float | None = None
) -> ScoredGroup:
    ref = TaskRef("chain_sum", "d", 1, index, "v")
    created_at = time.time() if created_at is None else created_at
    group = RolloutGroup(
        ref,
        f"q{index}",
        tuple(f"c{index}-{i}" for i in range(len(rewards))),
        (True,) * len(rewards),
        "m",
        round_,
        created_at,
        source,
    )
    return ScoredGroup(group, tuple(rewards))


def test_pool_deduplicates_and_caps_per_source():
    pool = ExternalPool(SamplerConfig(pool_size=8))
    assert pool.add(_scored("a", 0))
    assert not pool.add(_scored("a", 0))
    for i in range(1, 6):
        pool.add(_scored("a", i))
    assert len(pool) == 2  # pool_size // 4 per source
    assert pool.evicted["per_source_cap"] == 4


def test_pool_expires_by_age_and_by_the_senders_round():
    now = [1000.0]
    pool = ExternalPool(SamplerConfig(max_age_s=10, max_round_lag=2, pool_size=64), clock=lambda: now[0])
    pool.add(_scored("a", 0, round_=0, created_at=now[0]))
    pool.add(
        _scored("a", 1, round_=5, created_at=now[0])
    )  # the sender moved on: round 0 is more than 2 behind
    pool.add(_scored("b", 2, round_=0, created_at=now[0]))
    assert {p.scored.group.question for p in pool.eligible()} == {"q1", "q2"}
    now[0] += 11
    assert pool.eligible() == []
    assert pool.evicted["round_lag"] == 1 and pool.evicted["too_old"] == 2


def test_used_groups_leave_the_pool():
    pool = ExternalPool(SamplerConfig())
    for i in range(4):
        pool.add(_scored(f"s{i}", i))
    chosen = select_external("uniform", pool.eligible(), 2, random.Random(0), SamplerContext())
    pool.take(chosen)
    assert len(pool) == 2 and not any(pool.contains(p.scored.group) for p in chosen)


def test_per_source_cap_limits_one_sender():
    candidates = ExternalPool(SamplerConfig())
    for i in range(6):
        candidates.add(_scored("flooder" if i < 5 else "other", i))
    chosen = select_external(
        "uniform", candidates.eligible(), 4, random.Random(0), SamplerContext(per_source_cap=1)
    )
    assert sorted(p.source for p in chosen) == ["flooder", "other"]


def test_variance_strategy_prefers_high_variance_groups():
    pool = ExternalPool(SamplerConfig(pool_size=400))
    low = (1.0,) + (0.0,) * 15  # std 0.24
    for i in range(100):
        pool.add(_scored(f"s{i % 20}", i, rewards=low if i % 2 else (1.0, 1.0, 0.0, 0.0)))  # std 0.5

    def share_of_high(strategy: str) -> float:
        rng = random.Random(0)
        picks = [
            p
            for _ in range(100)
            for p in select_external(strategy, pool.eligible(), 4, rng, SamplerContext())
        ]
        return sum(1 for p in picks if p.scored.reward_std == 0.5) / len(picks)

    # Weights 0.55 vs 0.29: about 65 % of picks are high-variance groups; uniform gives about 50 %.
    assert share_of_high("variance") > share_of_high("uniform") + 0.08


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ValueError, match="uniform"):
        get_strategy("smartest")
