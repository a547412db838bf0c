"""The SAPO sampler: which external groups join this round's I local groups.

Selection is a purely local decision. Strategies are small functions registered by name:
- ``uniform`` (the paper's rule, inside the turns below): uniformly among eligible external groups.
- ``variance``: prefer groups whose rewards under the LOCAL verifier vary most (most learning
  signal for a group-relative update), sampling without replacement with weight = reward std,
  plus a little floor so no eligible group is starved.
- ``difficulty``: prefer groups whose pass rate under the local verifier is close to the node's
  own recent pass rate (groups "at the frontier" of what this node can do).
Every strategy honours ``per_source_cap`` so a single sender cannot fill the batch, and picks turn
by turn (`PooledGroup.turn`: each connected peer's own groups, and one turn for all relayed ones)
so that a sybil swarm, relayed over its own connection or by honest peers, gets one connected
peer's share of the batch, not one share per identity.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

from swarmnode.rl.external import PooledGroup

Strategy = Callable[[list[PooledGroup], int, random.Random, "SamplerContext"], list[PooledGroup]]


class SamplerContext:
    """What a strategy may know about the node: its recent local pass rate, the per-source cap."""

    def __init__(self, local_pass_rate: float = 0.5, per_source_cap: int = 0) -> None:
        self.local_pass_rate = local_pass_rate
        self.per_source_cap = per_source_cap


def _weighted_pick(
    candidates: list[PooledGroup],
    k: int,
    rng: random.Random,
    weight: Callable[[PooledGroup], float],
    per_source_cap: int,
) -> list[PooledGroup]:
    """Sample without replacement, turn by turn (`swarmnode.rl.external.turn_of`): each pass
    visits the turns that still have groups in random order (each connected author's own groups,
    and one turn for everything relayed) and takes one group from each, within a turn from a
    delivering connection chosen uniformly and there proportionally to weight, honouring the
    per-source cap. A turn's share is thus 1/turns while it has groups (identities are free,
    connections are not), and what one turn lacks the others fill."""
    turns: dict[str, dict[str, tuple[list[PooledGroup], list[float]]]] = {}
    for pooled in candidates:
        groups, weights = turns.setdefault(pooled.turn, {}).setdefault(pooled.lane, ([], []))
        groups.append(pooled)
        weights.append(max(weight(pooled), 1e-6))
    chosen: list[PooledGroup] = []
    per_source: Counter[str] = Counter()
    while turns and len(chosen) < k:
        order = sorted(turns)
        rng.shuffle(order)
        for turn in order:
            if len(chosen) >= k:
                break
            lanes = turns[turn]
            while lanes:
                lane = rng.choice(sorted(lanes))
                groups, weights = lanes[lane]
                (i,) = rng.choices(range(len(groups)), weights=weights)
                pick = groups.pop(i)
                weights.pop(i)
                if not groups:
                    del lanes[lane]
                if not (per_source_cap and per_source[pick.source] >= per_source_cap):
                    per_source[pick.source] += 1
                    chosen.append(pick)
                    break
            if not lanes:
                del turns[turn]
    return chosen


def uniform(
    candidates: list[PooledGroup], k: int, rng: random.Random, ctx: SamplerContext
) -> list[PooledGroup]:
    return _weighted_pick(candidates, k, rng, lambda p: 1.0, ctx.per_source_cap)


def variance(
    candidates: list[PooledGroup], k: int, rng: random.Random, ctx: SamplerContext
) -> list[PooledGroup]:
    return _weighted_pick(candidates, k, rng, lambda p: 0.05 + p.scored.reward_std, ctx.per_source_cap)


def difficulty_weight(pass_rate: float, local_pass_rate: float) -> float:
    """Weight of a group with this pass rate: 1.05 at the node's own rate, falling to the 0.05 floor
    at half a unit away."""
    return 0.05 + max(0.0, 1.0 - 2.0 * abs(pass_rate - local_pass_rate))


def difficulty(
    candidates: list[PooledGroup], k: int, rng: random.Random, ctx: SamplerContext
) -> list[PooledGroup]:
    def closeness(p: PooledGroup) -> float:
        return difficulty_weight(sum(p.scored.rewards) / len(p.scored.rewards), ctx.local_pass_rate)

    return _weighted_pick(candidates, k, rng, closeness, ctx.per_source_cap)


STRATEGIES: dict[str, Strategy] = {"uniform": uniform, "variance": variance, "difficulty": difficulty}


def get_strategy(name: str) -> Strategy:
    """The strategy registered under ``name`` (config validation already restricts the names)."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"sampler.strategy: unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}"
        ) from None


def select_external(
    strategy: str, candidates: list[PooledGroup], k: int, rng: random.Random, ctx: SamplerContext
) -> list[PooledGroup]:
    if k <= 0 or not candidates:
        return []
    return get_strategy(strategy)(candidates, k, rng, ctx)
