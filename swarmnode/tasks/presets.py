"""Named task mixes ("presets"): which reasoning-gym datasets a node trains on, with which configs.

A preset is a tuple of `TaskSpec`s. Besides the named presets below, any reasoning-gym dataset
name is a preset of its own with that dataset's default config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import reasoning_gym.factory

PAPER_DATASETS = (
    "arc_1d",
    "basic_arithmetic",
    "base_conversion",
    "bf",
    "binary_matrix",
    "calendar_arithmetic",
    "decimal_arithmetic",
    "fraction_simplification",
    "propositional_logic",
)

# Two-term sums of 1-2 digit numbers: what a ~1 M parameter model can learn on a CPU (ML_NOTES).
EASY_CHAIN_SUM: dict[str, Any] = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
# One-digit +, -, * : a second, differently worded arithmetic task of similar difficulty.
EASY_BASIC_ARITHMETIC: dict[str, Any] = {
    "min_terms": 2,
    "max_terms": 2,
    "min_digits": 1,
    "max_digits": 1,
    "operators": ["+", "-", "*"],
    "allow_parentheses": False,
    "allow_negation": False,
}


@dataclass(frozen=True)
class TaskSpec:
    """One dataset of a mix: reasoning-gym name, config overrides (everything but the seed), weight."""

    dataset: str
    config: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0


PRESETS: dict[str, tuple[TaskSpec, ...]] = {
    "paper": tuple(TaskSpec(name) for name in PAPER_DATASETS),
    "easy": (TaskSpec("chain_sum", EASY_CHAIN_SUM),),
    "easy-mix": (
        TaskSpec("chain_sum", EASY_CHAIN_SUM),
        TaskSpec("basic_arithmetic", EASY_BASIC_ARITHMETIC),
    ),
}


class UnknownPresetError(ValueError):
    """The preset name is neither a named preset nor a reasoning-gym dataset."""


def reasoning_gym_datasets() -> list[str]:
    return sorted(reasoning_gym.factory.DATASETS)


def resolve_preset(name: str) -> tuple[TaskSpec, ...]:
    """The specs of a named preset, or of a single reasoning-gym dataset with its default config."""
    if name in PRESETS:
        return PRESETS[name]
    if name in reasoning_gym.factory.DATASETS:
        return (TaskSpec(name),)
    datasets = reasoning_gym_datasets()
    raise UnknownPresetError(
        f"unknown task preset {name!r}: use one of the presets {sorted(PRESETS)} or a reasoning-gym "
        f"dataset name ({len(datasets)} available, e.g. {', '.join(datasets[:5])}, ...)"
    )
