"""The SAPO sampler: which external groups join this round's I local groups.

Selection is a purely local decision. Strategies are small functions registered by name:
- ``uniform`` (the paper's rule): uniformly among eligible external groups.
- ``variance``: prefer groups whose rewards under the LOCAL verifier vary most (most learning
  signal for a group-relative update), sampling without replacement with weight = reward std,
  plus a little floor so no eligible group is starved.
- ``difficulty``: prefer groups whose pass rate under the local verifier is close to the node's
  own recent pass rate (groups "at the frontier" of what this node can do).
Every strategy honours ``per_source_cap`` so a single sender cannot fill the batch, and picks lane
by lane (`PooledGroup.lane`, the connection that delivered a group) so that a sybil swarm relayed
over one connection gets one connection's share of the batch, not one share per identity.
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
    """Sample without replacement, lane by lane: each pass visits the delivering connections that
    still have groups in random order and takes one group from each, chosen within the lane
    proportionally to weight, honouring the per-source cap. A lane's share is thus 1/lanes while
    it has groups (identities are free, connections are not), and what one lane lacks the others
    fill."""
    lanes: dict[str, tuple[list[PooledGroup], list[float]]] = {}
    for pooled in candidates:
        groups, weights = lanes.setdefault(pooled.lane, ([], []))
        groups.append(pooled)
        weights.append(max(weight(pooled), 1e-6))
    chosen: list[PooledGroup] = []
    per_source: Counter[str] = Counter()
    while lanes and len(chosen) < k:
        order = sorted(lanes)
        rng.shuffle(order)
        for lane in order:
            if len(chosen) >= k:
                break
            groups, weights = lanes[lane]
            while groups:
                (i,) = rng.choices(range(len(groups)), weights=weights)
                pick = groups.pop(i)
                weights.pop(i)
                if not (per_source_cap and per_source[pick.source] >= per_source_cap):
                    per_source[pick.source] += 1
                    chosen.append(pick)
                    break
            if not groups:
                del lanes[lane]
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
