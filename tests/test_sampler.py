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
