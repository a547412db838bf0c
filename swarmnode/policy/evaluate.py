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
    tasks = registry.eval_tasks(n)
    prompts = [policy.encode_prompt(task.question) for task in tasks]
    groups = backend.generate(prompts, SamplingParams(n=1, greedy=True, max_new_tokens=max_new_tokens))
    rewards = [registry.score(task, group[0].text) for task, group in zip(tasks, groups, strict=True)]
    return sum(rewards) / len(rewards)
