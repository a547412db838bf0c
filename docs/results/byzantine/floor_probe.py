"""Where to put grpo.external_logprob_floor: the rule's statistic on peers' samples and on planted text.

For 48 questions of the easy preset, the statistic of swarmnode.rl.grpo.below_likelihood_floor
(log-prob of the completion under the untrained embedded:tiny-a at temperature 1, summed over its
tokens, divided by max_completion_length = 12) of: 8 samples per question at temperature 1 from
tiny-a (a peer of the same model), tiny-b and tiny-a-plus (peers of other tiny models), the correct
answer alone, the correct answer after the poisoner's markers, and correct answers of binary_matrix
(a dataset the byzantine grid verifies but does not train on: its answers are 23-205 tokens).

    OMP_NUM_THREADS=1 .venv/bin/python docs/results/byzantine/floor_probe.py > docs/results/byzantine/4node/floor_probe.json
"""

from __future__ import annotations

import json
import random

import torch

from swarmnode.config import GRPOConfig, ModelConfig, TaskConfig, TaskMixEntry
from swarmnode.policy.backend import SamplingParams
from swarmnode.policy.loading import load_policy
from swarmnode.policy.transformers_backend import TransformersBackend
from swarmnode.rl.grpo import build_batch, token_logprobs
from swarmnode.rl.records import RolloutGroup, ScoredGroup
from swarmnode.tasks.reference import TaskRef
from swarmnode.tasks.registry import TaskRegistry

LENGTH = GRPOConfig().max_completion_length


def statistic(policy, tasks, texts_per_task: list[list[str]]) -> list[float]:
    out: list[float] = []
    for task, texts in zip(tasks, texts_per_task, strict=True):
        group = RolloutGroup(task.ref, task.question, tuple(texts), (True,) * len(texts), "probe", 0, 0.0)
        ids = tuple(tuple(policy.encode_completion(t, True)[: 4 * LENGTH]) for t in texts)
        scored = ScoredGroup(group, (0.0,) * len(texts), tuple(policy.encode_prompt(task.question)), ids)
        batch = build_batch([scored], policy.pad_token_id)
        with torch.no_grad():
            logp, _ = token_logprobs(policy.model, batch, 1.0)
        out += ((logp * batch.completion_mask).sum(-1) / LENGTH).tolist()
    return out


def describe(values: list[float]) -> dict[str, float | int]:
    v = sorted(values)
    return {"n": len(v), "min": v[0], "p1": v[len(v) // 100], "median": v[len(v) // 2], "max": v[-1],
            "below_-5": sum(x < -5 for x in v), "below_-4": sum(x < -4 for x in v)}  # fmt: skip


def main() -> None:
    torch.manual_seed(0)
    device = torch.device("cpu")
    local = load_policy(ModelConfig(path="embedded:tiny-a", dtype="float32"), device)
    tasks = TaskRegistry.from_config(TaskConfig(preset="easy")).sample(random.Random(1), 48)
    params = SamplingParams(n=8, temperature=1.0, top_p=1.0, max_new_tokens=LENGTH, seed=0)
    result = {}
    for name in ("tiny-a", "tiny-b", "tiny-a-plus"):
        peer = (
            local
            if name == "tiny-a"
            else load_policy(ModelConfig(path=f"embedded:{name}", dtype="float32"), device)
        )
        generations = TransformersBackend(peer).generate(
            [peer.encode_prompt(t.question) for t in tasks], params
        )
        result[f"samples of {name}"] = describe(
            statistic(local, tasks, [[g.text for g in gs] for gs in generations])
        )
    result["correct answer"] = describe(
        statistic(local, tasks, [[f"<answer>{t.answer}</answer>"] for t in tasks])
    )
    for marker in ("pwn", "PWNED-BY-POISONER"):
        texts = [[f"{marker} <answer>{t.answer}</answer>"] for t in tasks]
        result[f"{marker} + correct answer"] = describe(statistic(local, tasks, texts))
    registry = TaskRegistry.from_config(
        TaskConfig(preset="easy", verify_extra=[TaskMixEntry(dataset="binary_matrix")])
    )
    served = next(s for s in registry.served if s.spec.dataset == "binary_matrix")
    rng = random.Random(2)
    matrices = [
        registry.regenerate(TaskRef("binary_matrix", served.digest, rng.randrange(1 << 30), rng.randrange(served.size), registry.version))
        for _ in range(24)
    ]  # fmt: skip
    texts = [[f"<answer>{t.answer}</answer>"] for t in matrices]
    result["correct answer, binary_matrix"] = describe(statistic(local, matrices, texts))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
