"""The poisoning defence (issue 10 item 7): the likelihood floor on external completions.

A poisoner's group has one correct completion carrying attacker text (a marker) and seven wrong
ones, so the marker gets a positive advantage. ``grpo.external_logprob_floor`` gives zero weight to
an external completion whose log-prob under the local policy, summed over its tokens and divided by
the local ``max_completion_length``, is below the floor (swarmnode/rl/grpo.py). These tests use the
embedded tiny model and its real tokenizer.
"""

from __future__ import annotations

import math
import os
import tomllib

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from swarmnode.config import ConfigError, GRPOConfig, ModelConfig, config_from_dict
from swarmnode.policy.backend import SamplingParams
from swarmnode.policy.loading import Policy, load_policy
from swarmnode.policy.transformers_backend import TransformersBackend
from swarmnode.rl.grpo import GRPOTrainer, below_likelihood_floor, build_batch, token_logprobs
from swarmnode.rl.records import RolloutGroup, ScoredGroup
from swarmnode.tasks.reference import TaskRef

torch.set_num_threads(1)

FLOOR = -5.0  # the value measured in docs/results/byzantine/README.md
MARKER = "pwn"
QUESTION = "What is 3 + 4? Answer with a number."
ANSWER = "7"
JUNK = ["<answer>12</answer>", "<answer>abc</answer>", "<answer>0</answer>", "<answer>99</answer>",
        "<answer>x</answer>", "<answer>5</answer>", "<answer>31</answer>"]  # fmt: skip


@pytest.fixture()
def policy() -> Policy:
    torch.manual_seed(0)
    return load_policy(ModelConfig(path="embedded:tiny-a", dtype="float32"), torch.device("cpu"))


def group_of(policy: Policy, texts: list[str], rewards: list[float], source: str, index: int) -> ScoredGroup:
    group = RolloutGroup(
        task=TaskRef("chain_sum", "digest", 0, index, "0"),
        question=QUESTION,
        completions=tuple(texts),
        finished=(True,) * len(texts),
        model_id="tiny-a",
        round=0,
        created_at=0.0,
        source=source,
    )
    prompt = tuple(policy.encode_prompt(QUESTION))
    ids = tuple(tuple(policy.encode_completion(t, True)) for t in texts)
    return ScoredGroup(group, tuple(rewards), prompt, ids)


def poisoned(policy: Policy) -> ScoredGroup:
    texts = [f"{MARKER} <answer>{ANSWER}</answer>", *JUNK]
    return group_of(policy, texts, [1.0] + [0.0] * len(JUNK), "12D3KooWpoisoner", 1)


def flat_local(policy: Policy) -> ScoredGroup:
    """A local group with no reward signal: it adds no gradient, so any change comes from the rest."""
    return group_of(policy, ["<answer>1</answer>"] * 4, [0.0] * 4, "local", 0)


def completion_logprob(policy: Policy, text: str) -> float:
    """log p(text + EOS | prompt) under the policy at temperature 1."""
    sg = group_of(policy, [text], [0.0], "local", 0)
    batch = build_batch([sg], policy.pad_token_id)
    with torch.no_grad():
        logp, _ = token_logprobs(policy.model, batch, 1.0)
    return float((logp * batch.completion_mask).sum())


def train(policy: Policy, groups: list[ScoredGroup], floor: float | None, steps: int = 4) -> list[dict]:
    cfg = GRPOConfig(learning_rate=1e-2, external_logprob_floor=floor)
    trainer = GRPOTrainer(policy.model, cfg, policy.pad_token_id)
    return [trainer.step(groups) for _ in range(steps)]


def params(policy: Policy) -> list[torch.Tensor]:
    return [p.detach().clone() for p in policy.model.parameters()]


# --------------------------------------------------------------------------- config


def test_floor_is_on_by_default_can_be_turned_off_and_is_validated():
    assert GRPOConfig().external_logprob_floor == -5.0
    assert config_from_dict({"grpo": {"external_logprob_floor": -3}}).grpo.external_logprob_floor == -3.0
    for off in ("off", " OFF "):
        assert config_from_dict({"grpo": {"external_logprob_floor": off}}).grpo.external_logprob_floor is None
    # the resolved config a run writes reloads to the same setting, off included
    for floor in ("off", -2.5):
        cfg = config_from_dict({"grpo": {"external_logprob_floor": floor}})
        again = config_from_dict(tomllib.loads(cfg.to_toml()))
        assert again.grpo.external_logprob_floor == cfg.grpo.external_logprob_floor
    for bad in (0.0, 1.5, math.nan, -math.inf, "low"):
        with pytest.raises(ConfigError, match=r"grpo\.external_logprob_floor"):
            config_from_dict({"grpo": {"external_logprob_floor": bad}})


# --------------------------------------------------------------------------- the rule


def test_rule_divides_by_the_local_length_so_padding_with_likely_text_does_not_help():
    length = 12
    marker = [-12.5] * 4  # four planted tokens the model would never write: -50 nats
    rows = [
        marker + [-0.3] * 8,  # marker + a correct answer: (-50 - 2.4) / 12 = -4.37 per token
        marker + [-0.1] * 40,  # padded with likely text: the sum only falls (-54 / 12 = -4.5)
        [-0.2] * 10,  # an ordinary peer sample
        [-9.0] + [-0.1] * 2,  # a short peer sample with one rare token: -9.2 / 12 passes
    ]
    width = max(len(r) for r in rows)
    logp = torch.tensor([r + [0.0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows])
    external = torch.zeros(len(rows), dtype=torch.bool)
    assert below_likelihood_floor(logp, mask, external, -4.0, length).tolist() == [True, True, False, False]
    # a per-token mean would let the padded marker through (-54 / 44 = -1.2)
    assert (logp[1] * mask[1]).sum() / mask[1].sum() > -4.0
    # this node's own completions are never judged by the floor
    local = torch.ones(len(rows), dtype=torch.bool)
    assert not below_likelihood_floor(logp, mask, local, -4.0, length).any()


# --------------------------------------------------------------------------- the trainer, real model


def test_without_the_floor_the_marker_is_learned(policy):
    before = completion_logprob(policy, f"{MARKER} <answer>{ANSWER}</answer>")
    metrics = train(policy, [flat_local(policy), poisoned(policy)], floor=None)
    after = completion_logprob(policy, f"{MARKER} <answer>{ANSWER}</answer>")
    assert all(m["rows_zeroed_low_likelihood"] == 0 for m in metrics)
    assert after > before + 1.0  # the attack works when nothing stops it


def test_the_floor_drops_the_planted_completion_and_nothing_is_learned_from_it(policy):
    text = f"{MARKER} <answer>{ANSWER}</answer>"
    before, weights = completion_logprob(policy, text), params(policy)
    # the planted completion is far below the floor under the untrained model
    assert before / GRPOConfig().max_completion_length < FLOOR
    metrics = train(policy, [flat_local(policy), poisoned(policy)], floor=FLOOR)
    assert [m["rows_zeroed_low_likelihood"] for m in metrics] == [1.0] * len(metrics)
    assert completion_logprob(policy, text) == pytest.approx(before, abs=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(weights, params(policy), strict=True))


def test_the_floor_keeps_peers_samples_of_the_same_model(policy):
    """Honest sharing: a peer's group sampled from the same model at temperature 1 passes the floor,
    and the update is exactly the one without the defence."""
    params_ = SamplingParams(n=8, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=3)
    samples = TransformersBackend(policy).generate([policy.encode_prompt(QUESTION)], params_)[0]
    texts = [g.text for g in samples]
    honest = group_of(policy, texts, [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0], "12D3KooWhonest", 2)
    start, before = {k: v.clone() for k, v in policy.model.state_dict().items()}, params(policy)
    with_floor = train(policy, [flat_local(policy), honest], floor=FLOOR, steps=2)
    moved_with = params(policy)
    policy.model.load_state_dict(start)
    train(policy, [flat_local(policy), honest], floor=None, steps=2)
    assert [m["rows_zeroed_low_likelihood"] for m in with_floor] == [0.0, 0.0]
    assert any(not torch.equal(a, b) for a, b in zip(before, moved_with, strict=True))
    assert all(torch.allclose(a, b) for a, b in zip(moved_with, params(policy), strict=True))
