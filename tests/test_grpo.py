"""GRPO trainer: advantages, batch layout, clipped loss and update, against hand-computed values."""

from __future__ import annotations

import copy
import math
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from swarmnode.config import GRPOConfig
from swarmnode.rl import grpo
from swarmnode.rl.grpo import (
    GRPOTrainer,
    build_batch,
    clipped_policy_loss,
    group_advantages,
    k3_kl,
    token_logprobs,
)
from swarmnode.rl.records import RolloutGroup, ScoredGroup
from swarmnode.tasks.reference import TaskRef

torch.set_num_threads(1)

EOS = 2
PAD = 0


def tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return Qwen2ForCausalLM(config)


def scored(
    prompt: tuple[int, ...],
    completions: list[tuple[int, ...]],
    rewards: list[float],
    source: str = "local",
    index: int = 0,
) -> ScoredGroup:
    group = RolloutGroup(
        task=TaskRef("chain_sum", "digest", 0, index, "0.1.25"),
        question="q",
        completions=tuple("c" for _ in completions),
        finished=tuple(c[-1:] == (EOS,) for c in completions),
        model_id="tiny",
        round=0,
        created_at=0.0,
        source=source,
    )
    return ScoredGroup(group, tuple(rewards), prompt, tuple(completions))


# --------------------------------------------------------------------------- advantages


def test_advantages_use_population_std_with_epsilon():
    # mean 0.25, population std sqrt(0.1875) = 0.4330127; A = (r - 0.25) / (0.4330127 + 1e-4)
    adv = group_advantages([1.0, 0.0, 0.0, 0.0])
    assert adv.tolist() == pytest.approx([1.7316509, -0.5772170, -0.5772170, -0.5772170], rel=1e-6)


def test_advantages_without_scaling_are_centered_rewards():
    adv = group_advantages([1.0, 0.0, 0.0, 0.0], scale_rewards=False)
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_advantages_handle_variable_group_sizes_in_one_batch():
    groups = [
        scored((1,), [(5,), (6,)], [0.0, 1.0]),  # std 0.5 -> +-0.5 / 0.5001
        scored((1,), [(5,), (6,), (7,)], [0.0, 0.5, 1.0]),  # std sqrt(1/6) -> +-0.5 / 0.4083483
        scored((1,), [(5,)], [1.0]),  # a single completion: no signal
    ]
    batch = build_batch(groups, PAD)
    expected = [-0.9998000, 0.9998000, -1.2244449, 0.0, 1.2244449, 0.0]
    assert batch.advantages.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_zero_variance_group_gets_exactly_zero_advantages():
    assert group_advantages([0.3, 0.3, 0.3]).tolist() == [0.0, 0.0, 0.0]
    assert group_advantages([0.7]).tolist() == [0.0]


# --------------------------------------------------------------------------- batch layout


def test_batch_is_right_padded_with_positions_and_completion_mask():
    groups = [
        scored((1, 3, 4), [(10, EOS), (11, 12, 13)], [1.0, 0.0]),
        scored((5,), [(20, 21, 22, EOS)], [1.0], source="peer-x"),
    ]
    batch = build_batch(groups, PAD)
    assert batch.input_ids.tolist() == [
        [1, 3, 4, 10, EOS, PAD],
        [1, 3, 4, 11, 12, 13],
        [5, 20, 21, 22, EOS, PAD],
    ]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    assert batch.position_ids[:, :5].tolist() == [[0, 1, 2, 3, 4]] * 3
    # completion_mask[t] marks that input_ids[t + 1] is a completion token
    assert batch.completion_mask.tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch.is_local.tolist() == [True, True, False]


def test_finished_completion_keeps_eos_as_a_training_target():
    # pad == eos, as for many Qwen checkpoints: EOS must still be trained, padding must not
    group = scored((1, 3), [(10, EOS), (11, 12)], [1.0, 0.0])
    batch = build_batch([group], pad_token_id=EOS)
    targets = batch.input_ids[:, 1:]
    trained_targets = [targets[b][batch.completion_mask[b].bool()].tolist() for b in range(2)]
    assert trained_targets == [[10, EOS], [11, 12]]


def test_mismatched_completions_and_rewards_name_the_group():
    bad = scored((1,), [(5,), (6,)], [1.0])
    with pytest.raises(ValueError, match="chain_sum/digest/0/0.*2 completion_ids but 1 rewards"):
        build_batch([bad], PAD)


# --------------------------------------------------------------------------- log-probs


def test_right_padded_logprobs_equal_unpadded_single_sequence():
    model = tiny_model()
    short, long = scored((1, 3), [(10, 11, EOS)], [1.0]), scored((1, 3, 4, 5), [(20, 21, 22, 23, 24)], [0.0])
    padded = build_batch([short, long], PAD)
    alone = build_batch([short], PAD)
    with torch.no_grad():
        logp_padded, _ = token_logprobs(model, padded)
        logp_alone, _ = token_logprobs(model, alone)
        reference = model(input_ids=alone.input_ids).logits[0, :-1].log_softmax(-1)
    n = alone.input_ids.shape[1] - 1
    assert torch.allclose(logp_padded[0, :n], logp_alone[0], atol=1e-5)
    by_hand = reference.gather(-1, alone.input_ids[0, 1:, None]).squeeze(-1)
    assert torch.allclose(logp_alone[0], by_hand, atol=1e-5)


def test_temperature_divides_logits_before_log_softmax():
    model = tiny_model()
    batch = build_batch([scored((1, 3), [(10, 11)], [1.0])], PAD)
    with torch.no_grad():
        logp, entropy = token_logprobs(model, batch, temperature=0.5)
        logits = model(input_ids=batch.input_ids).logits[0, :-1] / 0.5
    expected = logits.log_softmax(-1).gather(-1, batch.input_ids[0, 1:, None]).squeeze(-1)
    assert torch.allclose(logp[0], expected, atol=1e-5)
    probs = logits.softmax(-1)
    assert torch.allclose(entropy[0], -(probs * probs.log()).sum(-1), atol=1e-5)


# --------------------------------------------------------------------------- clipped loss


def _clip_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # row 0: A = +1, ratios 1.5 (above 1 + 0.28: clipped), 1.1 (inside), masked pad with ratio 3
    # row 1: A = -2, ratios 0.5 (below 1 - 0.2: clipped), 1.5 (A < 0: not clipped), 0.9 (inside)
    ratios = torch.tensor([[1.5, 1.1, 3.0], [0.5, 1.5, 0.9]])
    logp = ratios.log().requires_grad_(True)
    old_logp = torch.zeros(2, 3)
    advantages = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    return logp, old_logp, advantages, mask


def test_clipped_loss_value_and_gradient_on_both_clip_sides():
    logp, old_logp, advantages, mask = _clip_case()
    loss, stats = clipped_policy_loss(logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.28)
    # per-token -min(r A, clip(r) A): -1.28, -1.1, (masked), 1.6, 3.0, 1.8 -> sum 4.02 over 5 tokens
    assert loss.item() == pytest.approx(4.02 / 5, rel=1e-6)
    loss.backward()
    # d/dlogp of -r A / 5 is -r A / 5 where unclipped; 0 where clipped or masked
    expected_grad = torch.tensor([[0.0, -1.1 / 5, 0.0], [0.0, 3.0 / 5, 1.8 / 5]])
    assert torch.allclose(logp.grad, expected_grad, atol=1e-6)
    assert stats["clip_frac_low"].item() == pytest.approx(1 / 5)
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 5)
    assert stats["low"].tolist() == [[0, 0, 0], [1, 0, 0]]
    assert stats["high"].tolist() == [[1, 0, 0], [0, 0, 0]]


def test_masked_tokens_do_not_change_loss_or_receive_gradient():
    logp, old_logp, advantages, mask = _clip_case()
    loss, _ = clipped_policy_loss(logp, old_logp, advantages, mask, 0.2, 0.28)
    noisy = logp.detach() + (1 - mask) * torch.randn(2, 3) * 5  # only masked positions change
    noisy_old = old_logp + (1 - mask) * torch.randn(2, 3) * 5
    loss_noisy, _ = clipped_policy_loss(noisy, noisy_old, advantages, mask, 0.2, 0.28)
    assert loss_noisy.item() == pytest.approx(loss.item(), rel=1e-7)
    loss.backward()
    assert torch.all(logp.grad[mask == 0] == 0)


def test_prompt_and_pad_tokens_get_no_loss_in_a_real_model():
    model = tiny_model()
    group = scored((1, 3, 4), [(10, EOS), (11, 12, 13, 14)], [1.0, 0.0])
    batch = build_batch([group], PAD)
    logp, _ = token_logprobs(model, batch)
    loss, _ = clipped_policy_loss(logp, logp.detach(), batch.advantages, batch.completion_mask, 0.2, 0.28)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.all(grad[batch.completion_mask == 0] == 0)
    assert torch.all(grad[batch.completion_mask == 1] != 0)
    # a different pad id changes only padded positions: same loss
    other = build_batch([group], pad_token_id=63)
    logp_other, _ = token_logprobs(model, other)
    loss_other, _ = clipped_policy_loss(
        logp_other, logp_other.detach(), other.advantages, other.completion_mask, 0.2, 0.28
    )
    assert loss_other.item() == pytest.approx(loss.item(), rel=1e-6)


def test_k3_kl_matches_hand_value():
    # policy p = 0.5, reference q = 0.25: q/p - log(q/p) - 1 = 0.5 + ln 2 - 1
    value = k3_kl(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert value.item() == pytest.approx(0.5 + math.log(2) - 1, rel=1e-6)
    assert k3_kl(torch.tensor([-1.3]), torch.tensor([-1.3])).item() == 0.0


# --------------------------------------------------------------------------- trainer


def _signal_groups() -> list[ScoredGroup]:
    return [
        scored((1, 3, 4), [(10, 11, EOS), (20, 21, EOS), (10, 22), (30, EOS)], [1.0, 0.0, 1.0, 0.0]),
        scored((5, 6), [(12, EOS), (13, 14, 15, EOS), (16,)], [0.0, 1.0, 0.5], source="peer-a", index=1),
    ]


def test_old_logprobs_are_from_before_the_update_so_later_minibatches_have_ratio_not_one(monkeypatch):
    ratios: list[torch.Tensor] = []
    real_loss = grpo.clipped_policy_loss

    def spy(logp, old_logp, advantages, mask, eps_low, eps_high):
        loss, stats = real_loss(logp, old_logp, advantages, mask, eps_low, eps_high)
        ratios.append(stats["ratio"][mask.bool()])
        return loss, stats

    monkeypatch.setattr(grpo, "clipped_policy_loss", spy)
    trainer = GRPOTrainer(tiny_model(), GRPOConfig(minibatches=2, num_iterations=2, learning_rate=1e-2), PAD)
    metrics = trainer.step(_signal_groups())
    assert metrics["optimizer_steps"] == 4
    assert torch.allclose(ratios[0], torch.ones_like(ratios[0]), atol=1e-6)  # same weights as old
    for later in ratios[1:]:
        assert (later - 1).abs().max() > 1e-3


def test_single_step_config_trains_with_ratio_one(monkeypatch):
    ratios: list[torch.Tensor] = []
    real_loss = grpo.clipped_policy_loss

    def spy(logp, old_logp, *args):
        ratios.append(torch.exp(logp - old_logp).detach())
        return real_loss(logp, old_logp, *args)

    monkeypatch.setattr(grpo, "clipped_policy_loss", spy)
    metrics = GRPOTrainer(tiny_model(), GRPOConfig(), PAD).step(_signal_groups())
    assert metrics["optimizer_steps"] == 1
    assert torch.all(ratios[0] == 1.0)


def test_step_reports_grad_norm_and_loss_of_the_formula():
    model = tiny_model()
    cfg = GRPOConfig(max_grad_norm=1e-3)
    groups = _signal_groups()
    shadow = copy.deepcopy(model)
    batch = build_batch(groups, PAD)
    logp, entropy = token_logprobs(shadow, batch)
    loss, _ = clipped_policy_loss(logp, logp.detach(), batch.advantages, batch.completion_mask, 0.2, 0.28)
    loss.backward()
    expected_norm = torch.cat([p.grad.flatten() for p in shadow.parameters()]).norm().item()

    metrics = GRPOTrainer(model, cfg, PAD).step(groups)
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-4, abs=1e-7)
    assert metrics["grad_norm"] == pytest.approx(expected_norm, rel=1e-4)  # before clipping
    assert metrics["grad_norm"] > cfg.max_grad_norm
    assert metrics["num_tokens"] == batch.completion_mask.sum().item() == 17
    assert metrics["entropy"] == pytest.approx(
        grpo.masked_mean(entropy, batch.completion_mask).item(), rel=1e-5
    )


def test_zero_variance_groups_are_counted_and_not_trained():
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = GRPOTrainer(model, GRPOConfig(), PAD)
    flat = scored((1,), [(5, EOS), (6, EOS)], [1.0, 1.0])
    metrics = trainer.step([flat, scored((1,), [(7,)], [0.0])])
    assert metrics["frac_zero_std"] == 1.0
    assert metrics["optimizer_steps"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

    metrics = trainer.step([flat, _signal_groups()[0]])
    assert metrics["frac_zero_std"] == 0.5
    assert metrics["num_groups_trained"] == 1
    assert metrics["num_tokens"] == 10  # only the group with signal


def test_clip_fractions_split_by_local_and_external_tokens():
    cfg = GRPOConfig(minibatches=4, num_iterations=2, learning_rate=5e-2)
    metrics = GRPOTrainer(tiny_model(), cfg, PAD).step(_signal_groups())
    assert metrics["clip_frac_low"] + metrics["clip_frac_high"] > 0  # large steps do get clipped
    n, n_local, n_external = (
        metrics["num_tokens"],
        metrics["num_tokens_local"],
        metrics["num_tokens_external"],
    )
    assert (n_local, n_external) == (10, 7)
    for side in ("low", "high"):
        combined = (
            metrics[f"clip_frac_{side}_local"] * n_local + metrics[f"clip_frac_{side}_external"] * n_external
        )
        assert metrics[f"clip_frac_{side}"] * n == pytest.approx(combined, rel=1e-6, abs=1e-9)


def test_kl_penalty_needs_a_reference_and_grows_as_the_policy_moves():
    model = tiny_model()
    cfg = GRPOConfig(beta=0.1, learning_rate=1e-2)
    with pytest.raises(ValueError, match="reference model"):
        GRPOTrainer(model, cfg, PAD)
    trainer = GRPOTrainer(model, cfg, PAD, ref_model=copy.deepcopy(model))
    first = trainer.step(_signal_groups())
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    for _ in range(3):
        later = trainer.step(_signal_groups())
    assert later["kl"] > 1e-4


def _sequence_logprob(model: torch.nn.Module, prompt: tuple[int, ...], completion: tuple[int, ...]) -> float:
    batch = build_batch([scored(prompt, [completion], [0.0])], PAD)
    with torch.no_grad():
        logp, _ = token_logprobs(model, batch)
    return (logp * batch.completion_mask).sum().item()


def test_a_few_steps_raise_the_probability_of_the_rewarded_completion():
    model = tiny_model(seed=1)
    prompt, good, bad = (1, 3, 4), (10, 11, 12, EOS), (20, 21, 22, EOS)
    group = scored(prompt, [good, bad, good, bad], [1.0, 0.0, 1.0, 0.0])
    good_before, bad_before = _sequence_logprob(model, prompt, good), _sequence_logprob(model, prompt, bad)
    trainer = GRPOTrainer(model, GRPOConfig(learning_rate=3e-3), PAD)
    for _ in range(10):
        trainer.step([group])
    good_after, bad_after = _sequence_logprob(model, prompt, good), _sequence_logprob(model, prompt, bad)
    assert good_after > good_before + 1.0  # probability up by more than e
    assert bad_after < bad_before


@pytest.mark.parametrize("micro_batch_size", [1, 3])
def test_micro_batches_give_the_same_update_as_one_pass(micro_batch_size):
    whole, split = tiny_model(), tiny_model()
    cfg = GRPOConfig(minibatches=2, num_iterations=2, learning_rate=1e-2)
    torch.manual_seed(5)
    m_whole = GRPOTrainer(whole, cfg, PAD).step(_signal_groups())
    torch.manual_seed(5)  # same minibatch order
    m_split = GRPOTrainer(split, cfg.model_copy(update={"micro_batch_size": micro_batch_size}), PAD).step(
        _signal_groups()
    )
    for key in ("loss", "grad_norm", "entropy", "clip_frac_low", "clip_frac_high"):
        assert m_split[key] == pytest.approx(m_whole[key], rel=1e-4, abs=1e-6)
    for a, b in zip(whole.parameters(), split.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_automatic_micro_batch_size_bounds_logits_memory(monkeypatch):
    model = tiny_model()
    trainer = GRPOTrainer(model, GRPOConfig(), PAD)
    batch = build_batch(_signal_groups(), PAD)  # 7 rows x 6 tokens x vocab 64 x 4 bytes = 1536 bytes per row
    monkeypatch.setattr(grpo, "LOGITS_BYTES_PER_MICRO_BATCH", 3 * 1536)
    assert [len(c) for c in trainer._micro_batches(torch.arange(7), batch)] == [3, 3, 1]
