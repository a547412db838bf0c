"""The SAPO sampler's strategies: hand-computed weights and their effect on what is picked."""

import random
import typing

import pytest

from swarmnode.config import SamplerConfig
from swarmnode.rl.external import PooledGroup
from swarmnode.rl.records import RolloutGroup, ScoredGroup
from swarmnode.rl.sampler import STRATEGIES, SamplerContext, difficulty_weight, select_external
from swarmnode.tasks.reference import TaskRef


def _pooled(index: int, rewards: tuple[float, ...], source: str = "peer") -> PooledGroup:
    group = RolloutGroup(
        task=TaskRef("chain_sum", "digest", 0, index, "0.1.25"),
        question="q",
        completions=tuple(f"c{i}" for i in range(len(rewards))),
        finished=(True,) * len(rewards),
        model_id="m",
        round=0,
        created_at=0.0,
        source=source,
    )
    return PooledGroup(ScoredGroup(group, rewards), received_at=0.0)


def test_difficulty_weight_hand_values():
    assert difficulty_weight(0.5, 0.5) == pytest.approx(1.05)
    assert difficulty_weight(0.25, 0.5) == pytest.approx(0.55)
    assert difficulty_weight(0.75, 0.5) == pytest.approx(0.55)
    assert difficulty_weight(0.0, 0.5) == pytest.approx(0.05)  # the floor: never starved
    assert difficulty_weight(1.0, 0.1) == pytest.approx(0.05)


@pytest.mark.parametrize(("local_pass_rate", "preferred"), [(0.5, "frontier"), (0.0, "hard")])
def test_difficulty_strategy_prefers_groups_at_the_nodes_own_pass_rate(local_pass_rate, preferred):
    frontier = _pooled(0, (1.0, 0.0, 1.0, 0.0))  # pass rate 0.5
    hard = _pooled(1, (0.0, 0.0, 0.0, 0.0))  # pass rate 0.0
    rng = random.Random(0)
    ctx = SamplerContext(local_pass_rate=local_pass_rate)
    picks = [select_external("difficulty", [frontier, hard], 1, rng, ctx)[0] for _ in range(400)]
    share = sum(p is (frontier if preferred == "frontier" else hard) for p in picks) / len(picks)
    # weights 1.05 vs 0.05: ~95 % of picks; uniform would give ~50 %
    assert share > 0.9


def test_config_choices_are_exactly_the_registered_strategies():
    annotation = SamplerConfig.model_fields["strategy"].annotation
    assert set(typing.get_args(annotation)) == set(STRATEGIES)


# -- mutation-tested behaviour (issue 13): the per-source cap, the weights of each strategy ------------

ALL_STRATEGIES = sorted(STRATEGIES)


def _share(
    strategy: str, wanted: PooledGroup, other: PooledGroup, ctx: SamplerContext, draws: int = 600
) -> float:
    rng = random.Random(1)
    picks = [select_external(strategy, [wanted, other], 1, rng, ctx)[0] for _ in range(draws)]
    return sum(p is wanted for p in picks) / draws


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_per_source_cap_is_reached_exactly_and_other_sources_fill_the_rest(strategy):
    # 3 groups from each of two senders, cap 2, k 4: every draw must take exactly 2 from each, whatever
    # order the senders' groups come out in (a capped pick is skipped, not the end of the selection).
    candidates = [_pooled(i, (1.0, 0.0, 1.0, 0.0), source="a" if i < 3 else "b") for i in range(6)]
    for seed in range(40):
        picks = select_external(
            strategy, candidates, 4, random.Random(seed), SamplerContext(per_source_cap=2)
        )
        assert sorted(p.source for p in picks) == ["a", "a", "b", "b"], seed
        assert len({id(p) for p in picks}) == 4  # without replacement


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_without_a_cap_one_sender_may_fill_the_batch(strategy):
    candidates = [_pooled(i, (1.0, 0.0), source="a") for i in range(3)]
    picks = select_external(strategy, candidates, 3, random.Random(0), SamplerContext())
    assert len(picks) == 3


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_k_bounds_the_picks_and_a_small_pool_is_taken_whole(strategy):
    candidates = [_pooled(i, (1.0, 0.0), source=f"s{i}") for i in range(5)]
    assert len(select_external(strategy, candidates, 2, random.Random(0), SamplerContext())) == 2
    whole = select_external(strategy, candidates, 9, random.Random(0), SamplerContext())
    assert sorted(id(p) for p in whole) == sorted(id(p) for p in candidates)
    assert select_external(strategy, candidates, 0, random.Random(0), SamplerContext()) == []
    assert select_external(strategy, [], 3, random.Random(0), SamplerContext()) == []


def test_uniform_ignores_variance_and_pass_rate():
    varied = _pooled(0, (1.0, 0.0, 1.0, 0.0))
    flat = _pooled(1, (0.0, 0.0, 0.0, 0.0))
    share = _share("uniform", varied, flat, SamplerContext(local_pass_rate=0.5))
    assert share == pytest.approx(0.5, abs=0.06)


def test_variance_weights_are_the_floor_plus_the_reward_std():
    varied = _pooled(0, (1.0, 0.0, 1.0, 0.0))  # std 0.5: weight 0.55
    flat = _pooled(1, (0.0, 0.0, 0.0, 0.0))  # std 0.0: weight 0.05 (the floor)
    share = _share("variance", varied, flat, SamplerContext())
    assert share == pytest.approx(0.55 / 0.60, abs=0.04)


def test_sampler_context_defaults_are_the_middle_pass_rate_and_no_cap():
    ctx = SamplerContext()
    assert (ctx.local_pass_rate, ctx.per_source_cap) == (0.5, 0)
    frontier = _pooled(0, (1.0, 0.0, 1.0, 0.0))  # pass rate 0.5
    easy = _pooled(1, (1.0, 1.0, 1.0, 1.0))  # pass rate 1.0
    assert _share("difficulty", frontier, easy, ctx) == pytest.approx(1.05 / 1.10, abs=0.04)


def test_unknown_strategy_is_refused_naming_it_and_the_choices():
    with pytest.raises(
        ValueError, match=r"unknown strategy 'varience'; expected one of \['difficulty', 'uniform'"
    ):
        select_external("varience", [_pooled(0, (1.0, 0.0))], 1, random.Random(0), SamplerContext())


@pytest.mark.parametrize(
    ("rewards", "std"),
    [((1.0, 0.0, 1.0, 0.0), 0.5), ((1.0, 1.0, 1.0), 0.0), ((0.0, 0.5, 1.0), (1 / 6) ** 0.5)],
)
def test_scored_group_reward_std_is_the_population_std(rewards, std):
    assert _pooled(0, rewards).scored.reward_std == pytest.approx(std)


def test_a_group_is_local_only_without_a_sender():
    local = RolloutGroup(TaskRef("chain_sum", "d", 0, 0, "v"), "q", ("c",), (True,), "m", 0, 0.0)
    assert local.is_local and local.source == "local"
    assert not _pooled(0, (1.0, 0.0), source="peer").scored.group.is_local
