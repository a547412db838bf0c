"""GRPO trainer: advantages, batch layout, clipped loss and update, against hand-computed values."""

from __future__ import annotations

import copy
import dataclasses
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
    by_hand = reference.gather(-1, alone.input_ids[0, 1:, None]).squeeze(-1) * alone.completion_mask[0]
    assert torch.allclose(logp_alone[0], by_hand, atol=1e-5)
    assert torch.all(logp_padded[padded.completion_mask == 0] == 0)  # prompt and padding not computed


def test_temperature_divides_logits_before_log_softmax():
    model = tiny_model()
    batch = build_batch([scored((1, 3), [(10, 11)], [1.0])], PAD)
    mask = batch.completion_mask[0].bool()
    with torch.no_grad():
        logp, entropy = token_logprobs(model, batch, temperature=0.5)
        logits = model(input_ids=batch.input_ids).logits[0, :-1] / 0.5
    expected = logits.log_softmax(-1).gather(-1, batch.input_ids[0, 1:, None]).squeeze(-1)
    assert torch.allclose(logp[0][mask], expected[mask], atol=1e-5)
    probs = logits.softmax(-1)
    assert torch.allclose(entropy[0][mask], -(probs * probs.log()).sum(-1)[mask], atol=1e-5)


def _full_vocab_logprobs(model, batch, temperature=1.0):
    """The implementation before the memory-efficient one, kept as the oracle: float32 log_softmax
    over the full vocabulary at every position."""
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).logits
    logits = logits[:, :-1].float() / temperature
    logp_all = logits.log_softmax(dim=-1)
    logp = logp_all.gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
    return logp, entropy


@pytest.mark.parametrize("path", ["split_head", "generic"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_equal_the_full_vocabulary_oracle(monkeypatch, path, temperature):
    monkeypatch.setattr(grpo, "LOGITS_CHUNK_BYTES", 3 * 64 * 4)  # 3 positions per chunk: many chunks
    if path == "generic":
        monkeypatch.setattr(grpo, "_plain_output_head", lambda model: None)
    model, oracle = tiny_model(seed=3), tiny_model(seed=3)
    groups = _signal_groups()
    batch = build_batch(groups, PAD)
    mask = batch.completion_mask
    logp, entropy = token_logprobs(model, batch, temperature)
    ref_logp, ref_entropy = _full_vocab_logprobs(oracle, batch, temperature)
    assert torch.allclose(logp, ref_logp * mask, atol=1e-5)
    assert torch.allclose(entropy, ref_entropy * mask, atol=1e-5)
    assert not entropy.requires_grad
    # the same gradient of a weighted sum of completion log-probs, in every parameter
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0)) * mask
    (logp * weights).sum().backward()
    (ref_logp * weights).sum().backward()
    for (name, a), b in zip(model.named_parameters(), oracle.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def test_selected_logprobs_gradient_passes_gradcheck(monkeypatch):
    monkeypatch.setattr(grpo, "LOGITS_CHUNK_BYTES", 2 * 11 * 4)  # 2 rows per chunk
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(11, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.tensor([0, 3, 10, 3, 7])

    def logp_only(h, w):
        return grpo._SelectedTokenLogprobs.apply(h, w, targets, 0.8)[0]

    assert torch.autograd.gradcheck(logp_only, (hidden, weight), atol=1e-6)


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


@pytest.mark.parametrize(("minibatches", "iterations"), [(2, 2), (2, 1), (1, 2)])
def test_old_logprobs_are_from_before_the_update_so_later_minibatches_have_ratio_not_one(
    monkeypatch, minibatches, iterations
):
    ratios: list[torch.Tensor] = []
    real_loss = grpo.clipped_policy_loss

    def spy(logp, old_logp, advantages, mask, *args, **kwargs):
        loss, stats = real_loss(logp, old_logp, advantages, mask, *args, **kwargs)
        ratios.append(stats["ratio"][mask.bool()])
        return loss, stats

    monkeypatch.setattr(grpo, "clipped_policy_loss", spy)
    cfg = GRPOConfig(minibatches=minibatches, num_iterations=iterations, learning_rate=1e-2)
    metrics = GRPOTrainer(tiny_model(), cfg, PAD).step(_signal_groups())
    assert metrics["optimizer_steps"] == minibatches * iterations
    assert torch.allclose(ratios[0], torch.ones_like(ratios[0]), atol=1e-6)  # same weights as old
    for later in ratios[1:]:
        assert (later - 1).abs().max() > 1e-3


def test_single_step_config_trains_with_ratio_one(monkeypatch):
    ratios: list[torch.Tensor] = []
    real_loss = grpo.clipped_policy_loss

    def spy(logp, old_logp, *args, **kwargs):
        ratios.append(torch.exp(logp - old_logp).detach())
        return real_loss(logp, old_logp, *args, **kwargs)

    monkeypatch.setattr(grpo, "clipped_policy_loss", spy)
    metrics = GRPOTrainer(tiny_model(), GRPOConfig(), PAD).step(_signal_groups())
    assert metrics["optimizer_steps"] == 1
    assert torch.all(ratios[0] == 1.0)


def _formula_loss(model: torch.nn.Module, groups: list[ScoredGroup], cfg: GRPOConfig) -> torch.Tensor:
    """The module docstring's objective with ratio 1, written out independently of the trainer."""
    weights = grpo.group_weights(groups, cfg.external_loss_share, cfg.max_source_loss_share)
    total = torch.zeros(())
    for g, w in zip(groups, weights.policy, strict=True):
        adv = group_advantages(g.rewards, cfg.scale_rewards)
        tokens = sum(len(c) for c in g.completion_ids)
        for completion, a in zip(g.completion_ids, adv.tolist(), strict=True):
            if cfg.off_policy == "positive_only" and not g.group.is_local and a <= 0:
                continue
            batch = build_batch([scored(g.prompt_ids, [completion], [0.0])], PAD)
            logp, _ = token_logprobs(model, batch, cfg.temperature)
            ratio = torch.exp(logp - logp.detach())  # 1, with the gradient of logp
            total = total + w / tokens * (-(ratio * a) * batch.completion_mask).sum()
    return total


@pytest.mark.parametrize("off_policy", ["none", "positive_only"])
def test_step_reports_grad_norm_and_loss_of_the_formula(off_policy):
    model = tiny_model()
    cfg = GRPOConfig(max_grad_norm=1e-3, off_policy=off_policy)
    groups = _signal_groups()
    shadow = copy.deepcopy(model)
    loss = _formula_loss(shadow, groups, cfg)
    loss.backward()
    expected_norm = torch.cat([p.grad.flatten() for p in shadow.parameters()]).norm().item()
    # By hand: one local, one external group -> shares 1/2 each. Local A = +-0.9998 on lengths
    # 3, 3, 2, 2 cancels; external A = -1.2244449, +1.2244449, 0 on lengths 2, 4, 1 (7 tokens).
    a = 0.5 / 0.4082483 * (1 / (1 + 1e-4 / 0.4082483))
    by_hand = -(0.5 / 7) * ((-2 * a if off_policy == "none" else 0.0) + 4 * a)
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)

    metrics = GRPOTrainer(model, cfg, PAD).step(groups)
    assert metrics["loss"] == pytest.approx(by_hand, rel=1e-4, abs=1e-7)
    assert metrics["grad_norm"] == pytest.approx(expected_norm, rel=1e-4)  # before clipping
    assert metrics["grad_norm"] > cfg.max_grad_norm
    # positive_only does not compute the external completions with A <= 0 (2 + 1 tokens)
    assert metrics["num_tokens"] == (17 if off_policy == "none" else 14)
    assert metrics["rows_zeroed_off_policy"] == (0 if off_policy == "none" else 2)


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
    cfg = GRPOConfig(minibatches=4, num_iterations=2, learning_rate=5e-2, off_policy="none")
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
    # Adam turns float-level differences of near-zero gradients into steps of up to lr-size noise
    for a, b in zip(whole.parameters(), split.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_automatic_micro_batch_size_bounds_logits_memory(monkeypatch):
    model = tiny_model()
    trainer = GRPOTrainer(model, GRPOConfig(), PAD)
    batch = build_batch(_signal_groups(), PAD)  # 7 rows x 6 tokens x vocab 64 x 4 bytes = 1536 bytes per row
    monkeypatch.setattr(grpo, "LOGITS_BYTES_PER_MICRO_BATCH", 3 * 1536)
    assert [len(c) for c in trainer._micro_batches(torch.arange(7), batch)] == [3, 3, 1]


# --------------------------------------------------------------------------- group weights


def _mixed_groups() -> list[ScoredGroup]:
    signal, flat = [1.0, 0.0], [1.0, 1.0]
    return [
        scored((1,), [(5, EOS), (6, EOS)], signal, index=0),
        scored((1,), [(5, EOS), (6, EOS)], signal, index=1),
        scored((1,), [(5, EOS), (6, EOS)], flat, index=2),
        scored((1,), [(5, EOS), (6, EOS)], flat, index=3),
        scored((1,), [(5, EOS), (6, EOS)], signal, source="peer-a", index=4),
        scored((1,), [(5, EOS), (6, EOS)], signal, source="peer-a", index=5),
        scored((1,), [(5, EOS), (6, EOS)], signal, source="peer-b", index=6),
    ]


def test_group_weights_default_to_the_kinds_share_of_groups_spread_over_signal_groups():
    # 4 local groups (2 with signal), 3 external: lambda_E = 3/7; local 4/7 over 2 signal groups
    w = grpo.group_weights(_mixed_groups())
    assert w.external_share == pytest.approx(3 / 7)
    assert w.policy == pytest.approx([2 / 7, 2 / 7, 0, 0, 1 / 7, 1 / 7, 1 / 7])
    assert w.kl == pytest.approx([1 / 7] * 7)  # every group of a kind carries its KL term
    assert w.capped_sources == ()


def test_explicit_external_share_and_per_sender_cap():
    w = grpo.group_weights(_mixed_groups(), external_loss_share=0.5)
    assert w.policy == pytest.approx([0.25, 0.25, 0, 0, 1 / 6, 1 / 6, 1 / 6])
    # peer-a holds 2/6 > 0.25: scaled down to 0.25 in total, nothing redistributed
    w = grpo.group_weights(_mixed_groups(), external_loss_share=0.5, max_source_loss_share=0.25)
    assert w.policy == pytest.approx([0.25, 0.25, 0, 0, 0.125, 0.125, 1 / 6])
    assert w.capped_sources == ("peer-a",)


def test_a_kind_with_no_groups_gives_its_share_away_but_a_flat_kind_keeps_it():
    local = _mixed_groups()[:4]
    assert grpo.group_weights(local, external_loss_share=0.3).policy == pytest.approx([0.5, 0.5, 0, 0])
    # every local group flat: the external groups still weigh only their share (no external-only step
    # at full strength)
    flat_local = [_mixed_groups()[2], _mixed_groups()[3]]
    w = grpo.group_weights([*flat_local, *_mixed_groups()[4:]], external_loss_share=0.5)
    assert sum(w.policy) == pytest.approx(0.5)


def test_per_group_normalisation_long_external_completions_weigh_no_more():
    short = scored((1,), [(10, EOS), (11, EOS)], [1.0, 0.0])
    long = scored((1,), [(10,) * 7 + (EOS,), (11,) * 7 + (EOS,)], [1.0, 0.0], source="peer-a", index=1)
    batch = build_batch([short, long], PAD, weights=grpo.group_weights([short, long]))
    mass = batch.policy_weight * batch.row_tokens
    assert mass[:2].sum().item() == pytest.approx(0.5)
    assert mass[2:].sum().item() == pytest.approx(0.5)  # 16 tokens, the same total weight as 4


def test_trainer_reports_loss_shares_and_the_external_only_step():
    cfg = GRPOConfig(external_loss_share=0.5, off_policy="none")
    groups = _mixed_groups()
    metrics = GRPOTrainer(tiny_model(), cfg, PAD).step(groups)
    assert metrics["external_only_step"] == 0.0
    assert metrics["loss_share_external"] == pytest.approx(0.5, rel=1e-5)
    assert metrics["loss_share_local"] == pytest.approx(0.5, rel=1e-5)
    flat_local = [groups[2], groups[3], groups[4]]
    metrics = GRPOTrainer(tiny_model(), cfg, PAD).step(flat_local)
    assert metrics["external_only_step"] == 1.0
    assert metrics["loss_share_external"] == 1.0


def test_fraction_of_steps_with_a_grad_norm_spike(monkeypatch):
    norms = iter([12.0, 3.0])
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: torch.tensor(next(norms)))
    metrics = GRPOTrainer(tiny_model(), GRPOConfig(minibatches=2), PAD).step(_signal_groups())
    assert metrics["frac_steps_grad_norm_gt_10"] == 0.5
    assert metrics["grad_norm_max"] == 12.0
    assert metrics["grad_norm"] == 7.5


# --------------------------------------------------------------------------- off-policy strategies


def _factor(strategy: str, cap: float = 1.0) -> list[float]:
    # rows: external A>0 (rho 0.5), external A<0 (rho 0.5), external A>0 (rho 4), external A<0 (rho 4),
    #       external A<0 (unknown), external A=0 (rho 0.5), local A<0 (rho ignored)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 0.0, -1.0])
    is_local = torch.tensor([False] * 6 + [True])
    log_rho = torch.tensor(
        [math.log(0.5), math.log(0.5), math.log(4), math.log(4), math.nan, math.log(0.5), 0.3]
    )
    return grpo.off_policy_factor(strategy, advantages, is_local, log_rho, cap).tolist()


def test_off_policy_factors_match_hand_values():
    assert _factor("none") == [1, 1, 1, 1, 1, 1, 1]
    assert _factor("positive_only") == [1, 0, 1, 0, 0, 0, 1]
    assert _factor("importance", cap=2.0) == pytest.approx([0.5, 0.5, 2.0, 2.0, 1.0, 0.5, 1.0])
    assert _factor("importance", cap=1.0) == pytest.approx([0.5, 0.5, 1.0, 1.0, 1.0, 0.5, 1.0])
    assert _factor("topr") == pytest.approx([1, 0.5, 1, 1, 0, 0, 1])
    with pytest.raises(ValueError, match="off_policy.*expected one of"):
        _factor("trust-me")


def _with_claims(group: ScoredGroup, logprobs: tuple[float, ...], tokens: tuple[int, ...]) -> ScoredGroup:
    g = dataclasses.replace(group.group, behaviour_logprobs=logprobs, behaviour_num_tokens=tokens)
    return dataclasses.replace(group, group=g)


def test_malformed_behaviour_claims_count_as_unknown():
    group = scored((1,), [(5, EOS), (6, EOS)], [1.0, 0.0], source="peer-a")
    assert grpo.declared_behaviour_mean(_with_claims(group, (-3.0, -1.0), (2, 2))) == [-1.5, -0.5]
    for logprobs, tokens in [((0.5, -1.0), (2, 2)), ((math.inf, -1.0), (2, 2)), ((-1.0, -1.0), (0, 2))]:
        assert math.isnan(grpo.declared_behaviour_mean(_with_claims(group, logprobs, tokens))[0])
    assert all(map(math.isnan, grpo.declared_behaviour_mean(_with_claims(group, (-1.0,), (2,)))))
    assert all(map(math.isnan, grpo.declared_behaviour_mean(group)))  # no claim at all


def test_importance_weights_in_the_trainer_match_hand_computed_values():
    model = tiny_model()
    local = scored((1, 3), [(10, 11, EOS), (12, EOS)], [1.0, 0.0])
    honest = _with_claims(
        scored((1, 3), [(20, 21, EOS), (22, EOS)], [1.0, 0.0], source="peer-a", index=1), (-9.0, -4.0), (3, 2)
    )
    cfg = GRPOConfig(off_policy="importance", importance_cap=1.5)
    means = []
    for completion in honest.completion_ids:
        batch = build_batch([scored((1, 3), [completion], [0.0])], PAD)
        with torch.no_grad():
            logp, _ = token_logprobs(model, batch)
        means.append(((logp * batch.completion_mask).sum() / batch.completion_mask.sum()).item())
    rho = [min(1.5, math.exp(m - b)) for m, b in zip(means, (-3.0, -2.0), strict=True)]
    a = 0.5 / (0.5 + 1e-4)
    # local A = +-a on 3 and 2 tokens (5 in all); external the same with weights rho; shares 1/2
    by_hand = -(0.5 / 5) * (3 * a - 2 * a) - (0.5 / 5) * (rho[0] * 3 * a - rho[1] * 2 * a)
    metrics = GRPOTrainer(model, cfg, PAD).step([local, honest])
    assert metrics["loss"] == pytest.approx(by_hand, rel=1e-4)
    assert metrics["is_weight_mean"] == pytest.approx(sum(rho) / 2, rel=1e-5)


def test_a_forged_behaviour_logprob_cannot_push_the_weight_past_the_cap():
    model = tiny_model()
    local = scored((1, 3), [(10, 11, EOS), (12, EOS)], [1.0, 0.0])
    forged = _with_claims(
        scored((1, 3), [(20, 21, EOS), (22, EOS)], [1.0, 0.0], source="peer-a", index=1),
        (-1e30, -1e30),  # "my policy found this text astronomically unlikely": rho would be e^(3e29)
        (1, 1),
    )
    cfg = GRPOConfig(off_policy="importance", importance_cap=2.0)
    metrics = GRPOTrainer(model, cfg, PAD).step([local, forged])
    assert metrics["is_weight_mean"] == 2.0
    assert metrics["is_frac_capped"] == 1.0
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
    a = 0.5 / (0.5 + 1e-4)
    assert metrics["loss"] == pytest.approx(-(0.5 / 5) * a - (0.5 / 5) * 2.0 * a, rel=1e-4)


def test_external_text_is_clipped_against_this_nodes_policy_of_before_the_round():
    cfg = GRPOConfig(minibatches=2, num_iterations=3, learning_rate=5e-2, off_policy="none")
    metrics = GRPOTrainer(tiny_model(), cfg, PAD).step(_signal_groups())
    assert metrics["ratio_max_external"] > 1.0 + cfg.epsilon_high  # the ratio moved past the clip range
    assert metrics["clip_frac_low_external"] + metrics["clip_frac_high_external"] > 0
    assert metrics["ratio_min_local"] < 1.0 < metrics["ratio_max_local"]


# --------------------------------------------------------------------------- trainer settings that must reach the update


def test_zero_variance_groups_are_kept_for_their_kl_term_when_beta_is_positive():
    model = tiny_model()
    trainer = GRPOTrainer(
        model, GRPOConfig(beta=0.1, learning_rate=1e-2), PAD, ref_model=copy.deepcopy(model)
    )
    for _ in range(3):
        trainer.step(_signal_groups())  # move away from the reference
    flat = scored((1, 3), [(10, 11, EOS), (20, 21, EOS)], [1.0, 1.0])
    before = [p.detach().clone() for p in model.parameters()]
    metrics = trainer.step([flat])
    assert metrics["num_groups_trained"] == 1 and metrics["optimizer_steps"] == 1
    assert metrics["kl"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(("scale_rewards", "advantage"), [(True, 0.5 / (0.5 + 1e-4)), (False, 0.5)])
def test_scale_rewards_reaches_the_trainer(scale_rewards, advantage):
    # rewards 1, 0 on 3 and 1 tokens: loss = -(1/4) (3 A - A) = -A / 2 at ratio 1
    group = scored((1, 3), [(10, 11, EOS), (12,)], [1.0, 0.0])
    metrics = GRPOTrainer(tiny_model(), GRPOConfig(scale_rewards=scale_rewards), PAD).step([group])
    assert metrics["loss"] == pytest.approx(-advantage / 2, rel=1e-5)


def test_temperature_reaches_the_trainer():
    model = tiny_model()
    groups = _signal_groups()
    batch = build_batch(groups, PAD)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1] / 0.5
    probs = logits.softmax(-1)
    entropy = -(probs * probs.log()).sum(-1)
    expected = grpo.masked_mean(entropy, batch.completion_mask).item()
    metrics = GRPOTrainer(model, GRPOConfig(temperature=0.5, off_policy="none"), PAD).step(groups)
    assert metrics["entropy"] == pytest.approx(expected, rel=1e-4)


def test_the_reference_model_stays_frozen():
    model = tiny_model()
    ref = copy.deepcopy(model)
    ref.train()
    frozen = [p.detach().clone() for p in ref.parameters()]
    trainer = GRPOTrainer(model, GRPOConfig(beta=0.1, learning_rate=1e-2), PAD, ref_model=ref)
    assert not ref.training
    assert not any(p.requires_grad for p in ref.parameters())
    for _ in range(2):
        trainer.step(_signal_groups())
    assert all(torch.equal(a, b) for a, b in zip(frozen, ref.parameters(), strict=True))
    assert all(p.grad is None for p in ref.parameters())


def test_reward_mean_covers_every_completion_given():
    flat = scored((1,), [(5, EOS), (6, EOS)], [1.0, 1.0], index=3)
    metrics = GRPOTrainer(tiny_model(), GRPOConfig(), PAD).step([*_signal_groups(), flat])
    # (1 + 0 + 1 + 0) + (0 + 1 + 0.5) + (1 + 1) = 5.5 over 9 completions
    assert metrics["reward_mean"] == pytest.approx(5.5 / 9)


def test_gradient_checkpointing_gives_the_same_update_and_leaves_the_model_in_eval_mode():
    plain, checkpointed = tiny_model(), tiny_model()
    cfg = GRPOConfig(learning_rate=1e-2, off_policy="none")
    m_plain = GRPOTrainer(plain, cfg, PAD).step(_signal_groups())
    m_ckpt = GRPOTrainer(checkpointed, cfg.model_copy(update={"gradient_checkpointing": True}), PAD).step(
        _signal_groups()
    )
    assert checkpointed.is_activation_checkpointing and not plain.is_activation_checkpointing
    assert m_ckpt["loss"] == pytest.approx(m_plain["loss"], rel=1e-6)
    assert m_ckpt["grad_norm"] == pytest.approx(m_plain["grad_norm"], rel=1e-5)
    for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert not checkpointed.training  # generation after the step keeps its KV cache


def test_every_minibatch_carries_the_whole_batchs_weight(monkeypatch):
    sums: list[float] = []
    real_loss = grpo.clipped_policy_loss

    def spy(*args, token_weights, **kwargs):
        sums.append(token_weights.sum().item())
        return real_loss(*args, token_weights=token_weights, **kwargs)

    monkeypatch.setattr(grpo, "clipped_policy_loss", spy)
    cfg = GRPOConfig(minibatches=3, num_iterations=2, off_policy="none")
    GRPOTrainer(tiny_model(), cfg, PAD).step(_signal_groups())
    # shares 1/2 + 1/2, whichever rows a minibatch holds
    assert sums == pytest.approx([1.0] * 6, rel=1e-5)


# --------------------------------------------------------------------------- every metric of a step (mutation-tested, issue 13)

STEP_METRICS = {
    "loss",
    "grad_norm",
    "grad_norm_max",
    "frac_steps_grad_norm_gt_10",
    "external_only_step",
    "entropy",
    "entropy_local",
    "entropy_external",
    "clip_frac_low",
    "clip_frac_high",
    "clip_frac_low_local",
    "clip_frac_high_local",
    "clip_frac_low_external",
    "clip_frac_high_external",
    "ratio_mean_local",
    "ratio_mean_external",
    "ratio_max_local",
    "ratio_max_external",
    "ratio_min_local",
    "ratio_min_external",
    "loss_share_local",
    "loss_share_external",
    "signal_share_external",
    "external_share_target",
    "num_sources_capped",
    "rows_zeroed_off_policy",
    "rows_zeroed_low_likelihood",
    "is_weight_mean",
    "is_frac_capped",
    "is_rows_unknown",
    "frac_zero_std",
    "reward_mean",
    "num_groups",
    "num_groups_trained",
    "num_tokens",
    "num_tokens_local",
    "num_tokens_external",
    "optimizer_steps",
    "step_seconds",
}


def _two_kinds() -> list[ScoredGroup]:
    """A local group (A = 2/3, -1/3, -1/3 unscaled) and a sender's group (A = +-1/2), 2 tokens each."""
    return [
        scored((1, 3), [(10, EOS), (11, EOS), (12, EOS)], [1.0, 0.0, 0.0]),
        scored((1, 3), [(20, EOS), (21, EOS)], [1.0, 0.0], source="peer-a", index=1),
    ]


def test_single_step_metrics_match_hand_and_oracle_values():
    import time

    model = tiny_model()
    groups = _two_kinds()
    cfg = GRPOConfig(
        external_loss_share=0.5, max_source_loss_share=0.3, scale_rewards=False, off_policy="importance"
    )
    batch = build_batch(groups, PAD)
    with torch.no_grad():
        _, entropy = token_logprobs(model, batch)
    mask = batch.completion_mask
    local_mask = mask * batch.is_local.unsqueeze(-1)
    started = time.perf_counter()
    metrics = GRPOTrainer(model, cfg, PAD).step(groups)
    elapsed = time.perf_counter() - started
    assert set(metrics) == STEP_METRICS
    assert 0.0 < metrics["step_seconds"] <= elapsed
    assert (metrics["num_groups"], metrics["num_groups_trained"], metrics["optimizer_steps"]) == (
        2.0,
        2.0,
        1.0,
    )
    assert (metrics["num_tokens"], metrics["num_tokens_local"], metrics["num_tokens_external"]) == (10, 6, 4)
    assert metrics["external_share_target"] == 0.5 and metrics["num_sources_capped"] == 1.0  # 0.5 > 0.3
    assert metrics["is_rows_unknown"] == 2.0  # the sender made no behaviour claim on either row
    assert metrics["is_weight_mean"] == 0.0 and metrics["is_frac_capped"] == 0.0
    assert metrics["reward_mean"] == pytest.approx(2 / 5) and metrics["frac_zero_std"] == 0.0
    # |A|-weighted mass: local 0.5 * mean(2/3, 1/3, 1/3) = 2/9; the sender's 0.3 * 1/2 (capped from 0.5)
    assert metrics["signal_share_external"] == pytest.approx(0.15 / (0.15 + 2 / 9), rel=1e-5)
    assert metrics["loss_share_external"] == pytest.approx(0.3 / 0.8, rel=1e-5)
    assert metrics["entropy"] == pytest.approx(((entropy * mask).sum() / mask.sum()).item(), rel=1e-5)
    assert metrics["entropy_local"] == pytest.approx(((entropy * local_mask).sum() / 6).item(), rel=1e-5)
    external_entropy = (entropy * (mask - local_mask)).sum() / 4
    assert metrics["entropy_external"] == pytest.approx(external_entropy.item(), rel=1e-5)
    for name in ("ratio_mean_local", "ratio_mean_external", "ratio_min_local", "ratio_max_external"):
        assert metrics[name] == pytest.approx(1.0, abs=1e-6), name  # one step: new = old
    assert metrics["rows_zeroed_off_policy"] == 0.0 and metrics["rows_zeroed_low_likelihood"] == 0.0


def test_multi_step_metrics_stay_consistent_per_kind():
    cfg = GRPOConfig(
        minibatches=2, num_iterations=2, learning_rate=5e-2, off_policy="none", scale_rewards=False
    )
    metrics = GRPOTrainer(tiny_model(), cfg, PAD).step(_two_kinds())
    n, n_local, n_external = (
        metrics["num_tokens"],
        metrics["num_tokens_local"],
        metrics["num_tokens_external"],
    )
    assert (n, n_local, n_external) == (10, 6, 4)  # per pass, not summed over the 2 iterations
    assert metrics["optimizer_steps"] == 4.0 and metrics["is_rows_unknown"] == 2.0
    combined = metrics["entropy_local"] * n_local + metrics["entropy_external"] * n_external
    assert metrics["entropy"] * n == pytest.approx(combined, rel=1e-5)
    for part in ("local", "external"):
        low, mean, high = (metrics[f"ratio_{x}_{part}"] for x in ("min", "mean", "max"))
        assert low < 1.0 < high and low <= mean <= high, part
        assert mean != 1.0
    side = metrics["clip_frac_high_local"] * n_local + metrics["clip_frac_high_external"] * n_external
    assert metrics["clip_frac_high"] * n == pytest.approx(side, rel=1e-6, abs=1e-9)


def test_a_step_with_nothing_to_train_reports_zeros():
    flat = scored((1,), [(5, EOS)], [1.0])
    metrics = GRPOTrainer(tiny_model(), GRPOConfig(), PAD).step([flat])
    assert set(metrics) == STEP_METRICS
    zeros = (
        "loss",
        "grad_norm",
        "grad_norm_max",
        "entropy",
        "num_tokens",
        "num_tokens_local",
        "optimizer_steps",
        "rows_zeroed_off_policy",
        "rows_zeroed_low_likelihood",
        "is_rows_unknown",
    )
    assert all(metrics[name] == 0.0 for name in zeros)
    assert (metrics["frac_zero_std"], metrics["reward_mean"], metrics["num_groups_trained"]) == (
        1.0,
        1.0,
        0.0,
    )
    assert metrics["ratio_mean_local"] == metrics["ratio_mean_external"] == 1.0
    assert metrics["frac_steps_grad_norm_gt_10"] == 0.0 and metrics["external_only_step"] == 0.0


@pytest.mark.parametrize(("norm", "spike"), [(10.0, 0.0), (10.5, 1.0)])
def test_one_step_above_the_spike_norm_is_the_whole_fraction(monkeypatch, norm, spike):
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: torch.tensor(norm))
    metrics = GRPOTrainer(tiny_model(), GRPOConfig(), PAD).step(_two_kinds())
    assert metrics["optimizer_steps"] == 1.0
    assert (metrics["frac_steps_grad_norm_gt_10"], metrics["grad_norm_max"]) == (spike, norm)


def test_the_kl_term_adds_beta_times_the_weighted_k3_to_the_loss():
    groups = _two_kinds()
    model, ref = tiny_model(0), tiny_model(1)
    batch = build_batch(groups, PAD)
    with torch.no_grad():
        logp, _ = token_logprobs(model, batch)
        ref_logp, _ = token_logprobs(ref, batch)
    kl_tok = k3_kl(logp, ref_logp) * batch.completion_mask
    weighted = (kl_tok * batch.kl_weight.unsqueeze(-1)).sum().item()
    cfg = GRPOConfig(beta=0.2, off_policy="none")  # one step: the loss is taken before the update
    with_kl = GRPOTrainer(copy.deepcopy(model), cfg, PAD, ref_model=ref).step(groups)
    without = GRPOTrainer(copy.deepcopy(model), cfg.model_copy(update={"beta": 0.0}), PAD).step(groups)
    assert with_kl["loss"] - without["loss"] == pytest.approx(0.2 * weighted, rel=1e-4)
    assert with_kl["kl"] == pytest.approx((kl_tok.sum() / batch.completion_mask.sum()).item(), rel=1e-5)
    assert "kl" not in without


def test_batch_tensors_have_their_documented_dtypes():
    batch = build_batch(_two_kinds(), PAD)
    assert batch.attention_mask.dtype == torch.long and batch.completion_mask.dtype == torch.float32
    assert batch.kl_weight.tolist() == pytest.approx([0.5 / 6] * 3 + [0.5 / 4] * 2)  # u_g / T_g


def test_clip_indicators_exclude_the_boundaries_and_the_wrong_advantage_sign():
    f64 = torch.float64
    r_low, r_high = math.exp(math.log(0.5)), math.exp(math.log(1.5))
    eps_low, eps_high = 1.0 - r_low, r_high - 1.0  # exact: 1 - eps_low == r_low, 1 + eps_high == r_high
    ratios = [r_low, 0.25, 0.25, r_high, 4.0, 0.25, 4.0]
    adv = torch.tensor([[-1.0, 0.0, 0.5, 1.0, 0.0, -1.0, 1.0]], dtype=f64)
    logp = torch.tensor([[math.log(r) for r in ratios]], dtype=f64)
    mask = torch.ones_like(logp)
    _, stats = clipped_policy_loss(logp, torch.zeros_like(logp), adv, mask, eps_low, eps_high)
    assert stats["low"].tolist() == [[0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]]
    assert stats["high"].tolist() == [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]]
    assert stats["clip_frac_low"].item() == pytest.approx(1 / 7)


def test_group_weights_of_a_single_kind_and_the_default_sender_cap():
    external = [scored((1,), [(5,), (6,)], [1.0, 0.0], source="peer-a", index=i) for i in range(2)]
    w = grpo.group_weights(external)
    assert (w.external_share, w.policy, w.capped_sources) == (
        1.0,
        (0.5, 0.5),
        (),
    )  # one sender, 100 %: not capped
    local = [scored((1,), [(5,), (6,)], [1.0, 0.0], index=i) for i in range(2)]
    assert grpo.group_weights(local).external_share == 0.0


def test_advantages_are_computed_in_float64():
    # 1e8 + 1 and 1e8 are the same float32: a float32 computation would see no signal
    assert group_advantages([1e8 + 1, 1e8]).tolist() == pytest.approx([0.5 / 0.5001, -0.5 / 0.5001])
    assert group_advantages([2.0, 2.0]).dtype == torch.float32
    with pytest.raises(ValueError, match="a group needs at least one reward"):
        group_advantages([])


def test_means_over_a_single_token_and_over_none():
    assert grpo.masked_mean(torch.tensor([3.0, 7.0]), torch.tensor([1.0, 0.0])).item() == 3.0
    assert grpo.masked_mean(torch.tensor([3.0]), torch.tensor([0.0])).item() == 0.0
    old = torch.tensor([[-2.0, -9.0], [-1.0, -3.0]])
    rho = grpo.sequence_log_rho(old, torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([-0.5, -1.0]))
    assert rho.tolist() == [-1.5, -1.0]


def test_round_totals_defaults_for_missing_sums():
    totals = grpo._RoundTotals()
    assert totals.ratio("entropy", "tokens") == 0.0 and totals.share("local", "weight") == 0.0
    assert totals.extreme("log_ratio_max_local") == 1.0
    totals.add("tokens", 4.0)
    totals.add("weight_local", 2.0)
    assert totals.ratio("entropy", "tokens") == 0.0  # nothing summed over 4 tokens
    assert totals.share("local", "weight") == 1.0 and totals.share("external", "weight") == 0.0
    totals.high("log_ratio_max_local", -0.5)
    totals.high("log_ratio_max_local", -2.0)
    assert totals.extreme("log_ratio_max_local") == pytest.approx(math.exp(-0.5))


class _Head(torch.nn.Module):
    """A causal-LM-shaped stub: only what _plain_output_head looks at."""

    def __init__(self, bias=False, softcap=None, scale=None, body=True) -> None:
        super().__init__()
        if body:
            self.model = torch.nn.Identity()
        self.head = torch.nn.Linear(4, 8, bias=bias)
        self.config = dataclasses.make_dataclass("C", ["final_logit_softcapping", "logit_scale"])(
            softcap, scale
        )

    def get_output_embeddings(self):
        return self.head


def test_only_a_bias_free_unscaled_head_is_split_off():
    for stub in (_Head(), _Head(scale=1.0)):
        body, weight = grpo._plain_output_head(stub)
        assert body is stub.model and weight is stub.head.weight
    for stub in (_Head(bias=True), _Head(softcap=30.0), _Head(scale=2.0), _Head(body=False)):
        assert grpo._plain_output_head(stub) is None
    no_head = torch.nn.Module()
    no_head.model = torch.nn.Identity()
    assert grpo._plain_output_head(no_head) is None
    model = tiny_model()
    assert grpo._plain_output_head(model)[1] is model.lm_head.weight


def test_rows_that_can_get_no_weight_are_not_computed():
    local = scored((1,), [(5,), (6,), (7,)], [1.0, 0.0, 0.5])  # A = +, -, 0
    claimed = _with_claims(
        scored((1,), [(5,), (6,), (7,)], [1.0, 0.0, 0.5], source="peer-a", index=1),
        (-1.0, -1.0, -1.0),
        (1, 1, 1),
    )
    unclaimed = scored((1,), [(5,), (6,), (7,)], [1.0, 0.0, 0.5], source="peer-b", index=2)
    batch = build_batch([local, claimed, unclaimed], PAD)
    static = grpo.static_off_policy_factor
    assert static("positive_only", batch).tolist() == [1, 1, 1] + [1, 0, 0] * 2
    # topr: a negative external row needs a known claim (its weight is the truncated ratio); A = 0 never
    assert static("topr", batch).tolist() == [1, 1, 1] + [1, 1, 0] + [1, 0, 0]
    assert static("importance", batch).tolist() == [1.0] * 9


def test_a_reference_model_is_ignored_and_left_alone_when_beta_is_zero():
    ref = tiny_model(1)
    trainer = GRPOTrainer(tiny_model(), GRPOConfig(beta=0.0), PAD, ref_model=ref)
    assert trainer.ref_model is None and all(p.requires_grad for p in ref.parameters())


def test_the_optimizer_uses_the_configured_hyperparameters():
    cfg = GRPOConfig(learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.95, weight_decay=0.05)
    (group,) = GRPOTrainer(tiny_model(), cfg, PAD).optimizer.param_groups
    assert (group["lr"], group["betas"], group["weight_decay"]) == (3e-4, (0.8, 0.95), 0.05)


def test_minibatches_are_drawn_from_shuffled_rows(monkeypatch):
    seen: list[list[tuple[int, ...]]] = []
    real = grpo.token_logprobs

    def spy(model, batch, temperature=1.0):
        if torch.is_grad_enabled():  # the training passes, not the frozen old log-probs
            seen.append([tuple(row) for row in batch.input_ids.tolist()])
        return real(model, batch, temperature)

    monkeypatch.setattr(grpo, "token_logprobs", spy)
    torch.manual_seed(0)
    cfg = GRPOConfig(minibatches=2, num_iterations=2, off_policy="none")
    GRPOTrainer(tiny_model(), cfg, PAD).step(_signal_groups())
    rows = [tuple(row) for row in build_batch(_signal_groups(), PAD).input_ids.tolist()]
    in_order = [rows[:4], rows[4:]]
    assert len(seen) == 4 and sorted(seen[0] + seen[1]) == sorted(rows)
    assert [seen[0], seen[1]] != in_order or [seen[2], seen[3]] != in_order


def test_likelihood_floor_by_hand():
    # sums over completion tokens / L = 4: -2/4 = -0.5 (not below -0.5), -10/4 = -2.5 (below); local rows never
    old = torch.tensor([[-1.0, -1.0, -9.0], [-5.0, -5.0, -9.0], [-5.0, -5.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    is_local = torch.tensor([False, False, True])
    assert grpo.below_likelihood_floor(old, mask, is_local, -0.5, 4).tolist() == [False, True, False]
