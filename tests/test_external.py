"""Receiving external groups trusts nothing; the pool keeps them fresh, bounded and unique."""

import random
import re
import time
from collections import Counter
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


def _intake(registry: TaskRegistry, max_tokens: int = 64) -> ExternalIntake:
    return ExternalIntake(
        registry, _encode, lambda text, done: _encode(text) + ([0] if done else []), max_tokens
    )


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
    assert result.scored.completion_ids[0] == tuple(_encode(right) + [0])
    assert result.scored.prompt_ids == tuple(_encode(group.question))


def test_a_completion_over_the_local_token_budget_scores_what_is_trained_on(registry):
    """A correct answer longer than this node's max_completion_length is cut to it, and the cut has
    lost its answer: it scores 0 (no positive advantage for a prefix); a group left with no
    variance is dropped, the reason named."""
    right, wrong = _right_and_wrong(registry)
    budget = len(right) + 1  # the right answer with its EOS fits exactly
    long_right = "x" * 40 + right
    _, group = _group(registry, [long_right, right, wrong, wrong])
    result = _intake(registry, budget).process(group)
    assert result.reason is IntakeReason.ACCEPTED and result.scored.rewards == (0.0, 1.0, 0.0, 0.0)
    assert [len(ids) for ids in result.scored.completion_ids] == [
        budget,
        budget,
        len(wrong) + 1,
        len(wrong) + 1,
    ]
    _, only_long = _group(registry, [long_right, wrong])
    dropped = _intake(registry, budget).process(only_long)
    assert (dropped.reason, dropped.detail) == (
        IntakeReason.ZERO_VARIANCE,
        f"1 completions over {budget} tokens score 0",
    )
    assert _intake(registry, budget + 40).process(only_long).scored.rewards == (1.0, 0.0)


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


def test_the_sampler_gives_each_delivering_connection_an_equal_share():
    """A sybil swarm relayed over one connection holds most of the pool; the batch still gets one
    group per connection in turn (2 honest lanes + the relay, 4 slots: the relay 1-2, never more)."""
    pool = ExternalPool(SamplerConfig(pool_size=400))
    for i in range(60):
        pool.add(_scored(f"sybil{i}", i), origin=f"sybil{i}", forwarder="relay")
    for i in range(3):
        for j, honest in enumerate(("h1", "h2")):
            assert pool.add(_scored(honest, 100 + 10 * j + i), origin=honest, forwarder=honest)
    rng = random.Random(0)
    relay_picks = []
    for _ in range(200):
        chosen = select_external("uniform", pool.eligible(), 4, rng, SamplerContext())
        lanes = Counter(p.lane for p in chosen)
        assert len(chosen) == 4 and lanes["h1"] >= 1 and lanes["h2"] >= 1 and lanes["relay"] in (1, 2)
        relay_picks.append(lanes["relay"])
    assert 0.25 < sum(relay_picks) / (4 * len(relay_picks)) < 0.42  # about a third, not 60/66
    # what one lane lacks, the others fill
    only = ExternalPool(SamplerConfig())
    only.add(_scored("h1", 1), origin="h1")
    for i in range(5):
        only.add(_scored(f"s{i}", 10 + i), origin="relay")
    chosen = select_external("uniform", only.eligible(), 4, random.Random(0), SamplerContext())
    assert Counter(p.lane for p in chosen) == {"h1": 1, "relay": 3}


def test_sybil_groups_relayed_by_honest_peers_get_one_turn_in_the_batch():
    pool = ExternalPool(SamplerConfig(pool_size=400))
    for i in range(90):
        relay = ("h1", "h2", "relay")[i % 3]
        pool.add(_scored(f"sybil{i}", i), origin=f"sybil{i}", forwarder=relay)
    for i in range(3):
        for j, honest in enumerate(("h1", "h2")):
            assert pool.add(_scored(honest, 200 + 10 * j + i), origin=honest, forwarder=honest)
    rng = random.Random(1)
    sybil = 0
    for _ in range(200):
        chosen = select_external("uniform", pool.eligible(), 3, rng, SamplerContext())
        assert Counter(p.turn for p in chosen) == {"h1": 1, "h2": 1, "relayed": 1}
        sybil += sum(p.source.startswith("sybil") for p in chosen)
    assert sybil == 200  # one of three slots, not 90 of 96


def test_variance_strategy_prefers_high_variance_groups():
    pool = ExternalPool(SamplerConfig(pool_size=400))
    low = (1.0,) + (0.0,) * 15  # std 0.24
    for i in range(100):  # every sender (its own lane here) holds both kinds
        pool.add(_scored(f"s{i % 20}", i, rewards=low if (i // 20) % 2 else (1.0, 1.0, 0.0, 0.0)))  # std 0.5

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


# -- intake outcomes with their details, and the pool's bookkeeping (mutation-tested, issue 13) ------


class RecordingWorker:
    """Stands in for the isolated scoring worker: records what it is asked, answers a fixed score."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.calls: list[tuple[TaskRef, tuple[str, ...]]] = []
        self.closed = False

    def score(self, ref, completions):
        self.calls.append((ref, tuple(completions)))
        return self.answer

    def close(self) -> None:
        self.closed = True


def test_worker_outcomes_become_intake_reasons_with_the_workers_detail(registry):
    from swarmnode.tasks.worker import ScoreStatus, WorkerScore

    right, wrong = _right_and_wrong(registry)
    _, group = _group(registry, [right, wrong + "x" * (registry.max_completion_chars + 50)])
    for answer, reason in [
        (WorkerScore(ScoreStatus.OVER_BUDGET, detail="cpu 2 s"), IntakeReason.SCORING_TIMEOUT),
        (WorkerScore(ScoreStatus.ERROR, detail="worker died"), IntakeReason.SCORING_ERROR),
    ]:
        worker = RecordingWorker(answer)
        intake = ExternalIntake(registry, _encode, lambda t, d: _encode(t), 16, worker=worker)
        result = intake.process(group)
        assert (result.reason, result.detail, result.scored) == (reason, answer.detail, None)
        ((ref, texts),) = worker.calls
        assert ref == group.task
        # one character past the cap is enough for the scorer to see the text is too long
        assert [len(t) for t in texts] == [len(right), registry.max_completion_chars + 1]
        intake.close()
        assert worker.closed


def test_accepted_group_keeps_the_group_and_ends_only_finished_completions_with_eos(registry):
    right, wrong = _right_and_wrong(registry)
    _, group = _group(registry, [right, wrong])
    group = replace(group, finished=(False, True))
    intake = ExternalIntake(registry, _encode, lambda text, done: _encode(text) + ([0] if done else []), 64)
    result = intake.process(group)
    assert result.reason is IntakeReason.ACCEPTED and result.scored.group is group and result.detail == ""
    assert result.scored.completion_ids == (tuple(_encode(right)), tuple(_encode(wrong) + [0]))


def test_refusals_name_what_was_refused(registry):
    right, wrong = _right_and_wrong(registry)
    task, group = _group(registry, [right, wrong])
    empty = _intake(registry).process(replace(group, completions=(), finished=()))
    assert (empty.reason, empty.detail) == (IntakeReason.EMPTY, "group has no completions")
    empty_pre = _intake(registry).precheck(replace(group, completions=()))
    assert (empty_pre.reason, empty_pre.detail) == (IntakeReason.EMPTY, "group has no completions")
    forged = _intake(registry).process(replace(group, question=group.question + " "))
    assert (forged.reason, forged.detail) == (IntakeReason.QUESTION_MISMATCH, f"task {group.task.key()}")
    unknown = _intake(registry).process(replace(group, task=replace(group.task, dataset="no_such_dataset")))
    assert unknown.reason is IntakeReason.TASK_UNKNOWN and "no_such_dataset" in unknown.detail
    precheck = _intake(registry).precheck(replace(group, task=replace(group.task, dataset="no_such_dataset")))
    assert precheck.reason is IntakeReason.TASK_UNKNOWN and "no_such_dataset" in precheck.detail


def test_fingerprints_are_32_hex_digits_and_separate_completions():
    from swarmnode.rl.external import group_fingerprint

    a = _scored("a", 0).group

    fp = group_fingerprint(a)
    assert len(fp) == 32 and int(fp, 16) >= 0
    joined = replace(a, completions=(a.completions[0] + a.completions[1],), finished=(True,))
    assert group_fingerprint(joined) != fp


def test_pool_full_evicts_the_oldest_group_and_counts_each():
    pool = ExternalPool(SamplerConfig(pool_size=4))  # one sender may hold max(1, 4 // 4) = 1
    for i in range(7):
        assert pool.add(_scored(f"s{i}", i))
    assert [p.scored.group.question for p in pool.eligible()] == ["q3", "q4", "q5", "q6"]
    assert pool.evicted["pool_full"] == 3 and pool.eligible()[0].origin == ""
    first = pool.eligible()[:1]
    pool.take(first)
    pool.take(first)  # taking a group that already left is harmless
    assert len(pool) == 3 and not pool.contains(first[0].scored.group)


def test_expiry_keeps_a_group_exactly_at_the_age_limit_and_counts_each_lag():
    now = [1000.0]
    pool = ExternalPool(SamplerConfig(max_age_s=10, max_round_lag=2, pool_size=64), clock=lambda: now[0])
    pool.add(_scored("a", 0, round_=5, created_at=990.0))  # 10 s old: still fresh
    for i in (1, 2):
        pool.add(_scored("a", i, round_=2, created_at=now[0]))  # 5 - 2 = 3 > 2: lagging
    pool.add(_scored("a", 3, round_=3, created_at=now[0]))  # exactly max_round_lag behind: kept
    assert {p.scored.group.question for p in pool.eligible()} == {"q0", "q3"}
    assert pool.evicted["round_lag"] == 2


def test_a_senders_round_is_its_highest_seen_even_out_of_order():
    pool = ExternalPool(SamplerConfig(max_round_lag=0, pool_size=64))
    assert pool.add(_scored("a", 0, round_=0))  # a new sender at round 0 is not lagging
    assert [p.scored.group.question for p in pool.eligible()] == ["q0"]
    pool.add(_scored("b", 1, round_=5))
    pool.add(_scored("b", 2, round_=4))  # arrives late: round 4 < 5
    assert {p.scored.group.question for p in pool.eligible()} == {"q0", "q1"}


def test_round_memory_is_bounded_and_forgets_the_least_recent_sender():
    from swarmnode.rl.external import IntakeLimits

    pool = ExternalPool(SamplerConfig(max_round_lag=2, pool_size=64), limits=IntakeLimits(seen_memory=2))
    for i, source in enumerate(("a", "b", "c")):
        pool.add(_scored(source, i, round_=10))
    assert pool.add(_scored("a", 10, round_=0))  # "a" was forgotten: nothing to lag behind
    assert pool.add(_scored("c", 11, round_=0))
    questions = {p.scored.group.question for p in pool.eligible()}
    assert "q10" in questions and "q11" not in questions and pool.evicted["round_lag"] == 1


def test_a_dataset_unsafe_on_foreign_text_is_refused_before_scoring():
    from swarmnode.tasks.presets import TaskSpec
    from swarmnode.tasks.registry import TaskRegistry as Registry

    refusing = Registry("easy", eval_size=20, verify_extra=(TaskSpec("spiral_matrix"),))
    task = refusing.regenerate(refusing.eval_tasks(2)[1].ref)
    assert task.ref.dataset == "spiral_matrix"
    group = RolloutGroup(task.ref, task.question, ("a", "b"), (True, True), "m", 0, 0.0, "peer")
    note = refusing.foreign_text_policy("spiral_matrix").note
    for check in (_intake(refusing).precheck, _intake(refusing).process):
        result = check(group)
        assert (result.reason, result.detail) == (IntakeReason.DATASET_REFUSED, f"spiral_matrix: {note}")
