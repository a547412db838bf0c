"""Held-out evaluation: greedy accuracy of a policy on a registry's held-out tasks."""

from __future__ import annotations

from swarmnode.policy.backend import GenerationBackend, SamplingParams
from swarmnode.policy.loading import Policy
from swarmnode.tasks.registry import TaskRegistry


def greedy_accuracy(
    policy: Policy,
    backend: GenerationBackend,
    registry: TaskRegistry,
    n: int,
    max_new_tokens: int = 12,
) -> float:
    """Mean reward of greedy completions on the first `n` held-out tasks (binary reward: accuracy).

    A node passes its ``grpo.max_completion_length`` (``NodeRuntime.evaluate``) so evaluation gives
    the model the same room as training; the default of 12 fits only the embedded tiny models.
    """
    rewards = [reward for _dataset, reward in _greedy_rewards(policy, backend, registry, n, max_new_tokens)]
    return sum(rewards) / len(rewards)


def greedy_accuracy_by_dataset(
    policy: Policy,
    backend: GenerationBackend,
    registry: TaskRegistry,
    n: int,
    max_new_tokens: int = 12,
) -> dict[str, float]:
    """``greedy_accuracy`` split by dataset (the held-out tasks go round-robin over the served
    datasets, sampled and verified ones alike), plus ``"all"``: the same figure as greedy_accuracy."""
    per: dict[str, list[float]] = {}
    for dataset, reward in _greedy_rewards(policy, backend, registry, n, max_new_tokens):
        per.setdefault(dataset, []).append(reward)
        per.setdefault("all", []).append(reward)
    return {dataset: sum(rewards) / len(rewards) for dataset, rewards in per.items()}


def _greedy_rewards(
    policy: Policy, backend: GenerationBackend, registry: TaskRegistry, n: int, max_new_tokens: int
) -> list[tuple[str, float]]:
    tasks = registry.eval_tasks(n)
    prompts = [policy.encode_prompt(task.question) for task in tasks]
    groups = backend.generate(prompts, SamplingParams(n=1, greedy=True, max_new_tokens=max_new_tokens))
    return [
        (task.ref.dataset, registry.score(task, group[0].text))
        for task, group in zip(tasks, groups, strict=True)
    ]
