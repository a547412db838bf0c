"""GRPO policy update for one SAPO round: advantages, batch, clipped loss, optimizer steps.

Read top to bottom, the objective is (token-level aggregation, as in DAPO / TRL ``loss_type="dapo"``):

    A_i      = (r_i - mean(r_g)) / (std(r_g) + 1e-4)        (or r_i - mean(r_g) without scaling)
    ratio_t  = exp(logp_t - old_logp_t)
    pg_t     = -min(ratio_t * A_i, clamp(ratio_t, 1 - epsilon, 1 + epsilon_high) * A_i)
    kl_t     = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (k3 estimator, only when beta > 0)
    loss     = sum_t (pg_t + beta * kl_t) * mask_t / sum_t mask_t

where t runs over the completion tokens of every sequence of a minibatch (prompt and padding masked
out, the EOS token kept when the completion finished) and ``old_logp`` is computed with the weights
of before the round's first optimizer step. Each round makes ``num_iterations`` passes over the
batch, each split into ``minibatches`` optimizer steps, so from the second step on the ratio differs
from 1 and clipping acts. A minibatch too large for memory is run in micro-batches (gradient
accumulation, ``micro_batch_size``) weighted so that the loss is still the token mean above.

Choices, documented once:
- The group std is the population std (divide by n), the same as ``ScoredGroup.reward_std``. It is
  defined for every group size, including 1; TRL's sample std (n - 1) is NaN there.
- A group whose rewards are all equal (including a single completion) gets zero advantages. With
  beta = 0 such a group adds no gradient, only compute and dilution of the token mean, so the
  trainer drops it (DAPO's "dynamic sampling"); with beta > 0 it is kept for its KL term.
- Log-probs are those of the sampling distribution: logits are divided by ``cfg.temperature``, as
  in TRL.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from swarmnode.config import GRPOConfig
from swarmnode.rl.records import ScoredGroup

ADVANTAGE_STD_EPS = 1e-4


# --------------------------------------------------------------------------- advantages


def group_advantages(rewards: Sequence[float], scale_rewards: bool = True) -> torch.Tensor:
    """Group-relative advantages of one group (any size >= 1), as float32."""
    if len(rewards) == 0:
        raise ValueError("group_advantages: a group needs at least one reward")
    r = torch.tensor(rewards, dtype=torch.float64)
    if r.max() == r.min():  # exact zeros, not float residue of r - r.mean()
        return torch.zeros(len(rewards), dtype=torch.float32)
    advantages = r - r.mean()
    if scale_rewards:
        advantages = advantages / (r.std(correction=0) + ADVANTAGE_STD_EPS)
    return advantages.float()


def has_reward_signal(group: ScoredGroup) -> bool:
    """True when the group's rewards differ, i.e. its advantages are not all zero."""
    return len(set(group.rewards)) > 1


# --------------------------------------------------------------------------- batch


@dataclass
class Batch:
    """Prompt + completion sequences, right-padded, one row per completion.

    ``completion_mask[b, t]`` is 1 when the target of position t, ``input_ids[b, t + 1]``, is a
    completion token, so it lines up with the shifted log-probs of ``token_logprobs``.
    """

    input_ids: torch.Tensor  # [B, T] long, padded with pad_token_id
    attention_mask: torch.Tensor  # [B, T] long, 1 on real tokens
    position_ids: torch.Tensor  # [B, T] long, 0..len-1 on real tokens
    completion_mask: torch.Tensor  # [B, T-1] float
    advantages: torch.Tensor  # [B] float
    is_local: torch.Tensor  # [B] bool, the row comes from one of this node's own groups

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor) -> Batch:
        return Batch(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def to(self, device: str | torch.device) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def build_batch(groups: Sequence[ScoredGroup], pad_token_id: int, scale_rewards: bool = True) -> Batch:
    """One right-padded row per completion of every group, with its group-relative advantage.

    Completion ids are used as given: they end with the EOS id when the completion finished
    (``Generation.token_ids`` / ``Policy.encode_completion``), and that EOS is a training target.
    """
    rows: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    advantages: list[float] = []
    is_local: list[bool] = []
    for sg in groups:
        name = sg.group.task.key()
        if len(sg.completion_ids) != len(sg.rewards):
            raise ValueError(
                f"group {name}: {len(sg.completion_ids)} completion_ids but {len(sg.rewards)} rewards; "
                "tokenize every scored completion before training"
            )
        if not sg.prompt_ids:
            raise ValueError(f"group {name}: empty prompt_ids; encode the question before training")
        rows += [(sg.prompt_ids, c) for c in sg.completion_ids]
        advantages += group_advantages(sg.rewards, scale_rewards).tolist()
        is_local += [sg.group.is_local] * len(sg.rewards)
    if not rows:
        raise ValueError("build_batch: no completions to train on")

    seq_len = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), seq_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), seq_len - 1), dtype=torch.float32)
    for b, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        input_ids[b, :n] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[b, :n] = 1
        completion_mask[b, len(prompt) - 1 : n - 1] = 1.0  # targets input_ids[b, len(prompt):n]
    # Right padding: real tokens sit at 0..len-1; pads continue the count (never attended to).
    position_ids = torch.arange(seq_len, dtype=torch.long).expand(len(rows), seq_len).clone()
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        completion_mask=completion_mask,
        advantages=torch.tensor(advantages, dtype=torch.float32),
        is_local=torch.tensor(is_local, dtype=torch.bool),
    )


# --------------------------------------------------------------------------- log-probs and loss


def token_logprobs(
    model: nn.Module, batch: Batch, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each next token and the policy's entropy there, both [B, T-1] (entropy detached)."""
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).logits
    logits = logits[:, :-1].float() / temperature  # position t predicts token t + 1
    logp_all = logits.log_softmax(dim=-1)
    logp = logp_all.gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
    return logp, entropy


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the mask divided by the number of masked tokens (0 when the mask is empty)."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO/GRPO clipped surrogate, token-level mean over ``mask``.

    ``advantages`` is per sequence [B] or per token [B, T]. Returns the loss and, as in TRL,
    per-token indicators of the clipped tokens (``low``: ratio < 1 - eps_low where A < 0,
    ``high``: ratio > 1 + eps_high where A > 0), already multiplied by ``mask``, with their
    token means ``clip_frac_low`` / ``clip_frac_high`` and the ``ratio``.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss = masked_mean(-torch.min(unclipped, clipped), mask)

    with torch.no_grad():
        low = ((ratio < 1.0 - eps_low) & (adv < 0)).float() * mask
        high = ((ratio > 1.0 + eps_high) & (adv > 0)).float() * mask
        stats = {
            "ratio": ratio.detach(),
            "low": low,
            "high": high,
            "clip_frac_low": masked_mean(low, mask),
            "clip_frac_high": masked_mean(high, mask),
        }
    return loss, stats


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1 >= 0."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


# --------------------------------------------------------------------------- trainer

# Automatic micro-batch size: float32 logits of a micro-batch stay under this many bytes (CPU), or
# under a tenth of free GPU memory when that is more (its peak is ~6x the logits, measured on an
# H100 with a Qwen2.5-0.5B-shaped model).
LOGITS_BYTES_PER_MICRO_BATCH = 1 << 30


class _RoundTotals:
    """Token-weighted sums over a round's optimizer steps, turned into the metrics dict."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.optimizer_steps = 0

    def add(self, key: str, value: torch.Tensor | float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def add_tokens(self, mb: Batch, entropy: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        local = mb.is_local.unsqueeze(-1).float()
        self.add("tokens", mb.completion_mask.sum())
        self.add("entropy", (entropy * mb.completion_mask).sum())
        for part, weight in [("local", local), ("external", 1.0 - local)]:
            self.add(f"tokens_{part}", (mb.completion_mask * weight).sum())
        for side in ("low", "high"):
            self.add(side, stats[side].sum())
            self.add(f"{side}_local", (stats[side] * local).sum())
            self.add(f"{side}_external", (stats[side] * (1.0 - local)).sum())

    def ratio(self, key: str, denominator: str) -> float:
        return self.sums.get(key, 0.0) / self.sums[denominator] if self.sums.get(denominator) else 0.0

    def per_step(self, key: str) -> float:
        return self.sums.get(key, 0.0) / max(self.optimizer_steps, 1)


class GRPOTrainer:
    """Owns the optimizer and turns one round's scored groups into optimizer steps.

    ``model`` (and ``ref_model``) must already be on ``device``.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: GRPOConfig,
        pad_token_id: int,
        ref_model: nn.Module | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if cfg.beta > 0 and ref_model is None:
            raise ValueError(
                f"grpo.beta = {cfg.beta} needs a frozen reference model: pass ref_model "
                "(e.g. a second copy of the starting weights) or set grpo.beta = 0"
            )
        self.model = model
        self.cfg = cfg
        self.pad_token_id = pad_token_id
        self.device = torch.device(device)
        self.ref_model = ref_model if cfg.beta > 0 else None
        if self.ref_model is not None:
            self.ref_model.eval().requires_grad_(False)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.weight_decay,
        )

    def _micro_batches(self, rows: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, ...]:
        """Split rows into forward/backward chunks of cfg.micro_batch_size (0: sized by logits memory)."""
        size = self.cfg.micro_batch_size
        if size == 0:
            budget = LOGITS_BYTES_PER_MICRO_BATCH
            if self.device.type == "cuda":
                budget = max(budget, torch.cuda.mem_get_info(self.device)[0] // 10)
            bytes_per_row = batch.input_ids.shape[1] * self.model.config.vocab_size * 4
            size = max(1, budget // bytes_per_row)
        return rows.split(size)

    @torch.no_grad()
    def _frozen_logprobs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Log-probs of the whole batch without gradients, micro-batch by micro-batch."""
        chunks = self._micro_batches(torch.arange(len(batch)), batch)
        return torch.cat([token_logprobs(model, batch.select(c), self.cfg.temperature)[0] for c in chunks])

    def step(self, groups: Sequence[ScoredGroup]) -> dict[str, float]:
        """One round's update: num_iterations x minibatches optimizer steps. Returns metrics."""
        cfg = self.cfg
        start = time.perf_counter()
        trained = list(groups) if cfg.beta > 0 else [g for g in groups if has_reward_signal(g)]
        totals = _RoundTotals()
        num_tokens = num_tokens_local = 0.0
        if trained:
            batch = build_batch(trained, self.pad_token_id, cfg.scale_rewards).to(self.device)
            num_tokens = batch.completion_mask.sum().item()
            num_tokens_local = batch.completion_mask[batch.is_local].sum().item()
            self.model.train()
            # Old log-probs with the weights of before the first step. With a single optimizer step
            # they equal the detached new ones (ratio = 1), so that forward pass is skipped (as TRL).
            minibatches = min(cfg.minibatches, len(batch))
            single_step = cfg.num_iterations * minibatches == 1
            old_logp = None if single_step else self._frozen_logprobs(self.model, batch)
            ref_logp = None if self.ref_model is None else self._frozen_logprobs(self.ref_model, batch)

            for _ in range(cfg.num_iterations):
                order = torch.randperm(len(batch)) if minibatches > 1 else torch.arange(len(batch))
                for rows in order.tensor_split(minibatches):
                    self.optimizer.zero_grad(set_to_none=True)
                    minibatch_tokens = batch.completion_mask[rows].sum().clamp(min=1.0)
                    for micro in self._micro_batches(rows, batch):
                        mb = batch.select(micro)
                        mask = mb.completion_mask
                        logp, entropy = token_logprobs(self.model, mb, cfg.temperature)
                        old = logp.detach() if old_logp is None else old_logp[micro]
                        loss, stats = clipped_policy_loss(
                            logp, old, mb.advantages, mask, cfg.epsilon, cfg.epsilon_high
                        )
                        if ref_logp is not None:
                            kl_tok = k3_kl(logp, ref_logp[micro])
                            loss = loss + cfg.beta * masked_mean(kl_tok, mask)
                            totals.add("kl", (kl_tok.detach() * mask).sum())
                        # token-level mean over the whole minibatch, however it is split
                        loss = loss * mask.sum() / minibatch_tokens
                        loss.backward()
                        totals.add("loss", loss.detach())
                        totals.add_tokens(mb, entropy, stats)
                    totals.add("grad_norm", nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
                    self.optimizer.step()
                    totals.optimizer_steps += 1

        metrics = {
            "loss": totals.per_step("loss"),
            "grad_norm": totals.per_step("grad_norm"),  # before clipping
            "entropy": totals.ratio("entropy", "tokens"),
            "clip_frac_low": totals.ratio("low", "tokens"),
            "clip_frac_high": totals.ratio("high", "tokens"),
            "clip_frac_low_local": totals.ratio("low_local", "tokens_local"),
            "clip_frac_high_local": totals.ratio("high_local", "tokens_local"),
            "clip_frac_low_external": totals.ratio("low_external", "tokens_external"),
            "clip_frac_high_external": totals.ratio("high_external", "tokens_external"),
            "frac_zero_std": sum(not has_reward_signal(g) for g in groups) / max(len(groups), 1),
            "reward_mean": sum(sum(g.rewards) for g in groups) / max(sum(len(g.rewards) for g in groups), 1),
            "num_groups": float(len(groups)),
            "num_groups_trained": float(len(trained)),
            "num_tokens": num_tokens,
            "num_tokens_local": num_tokens_local,
            "num_tokens_external": num_tokens - num_tokens_local,
            "optimizer_steps": float(totals.optimizer_steps),
            "step_seconds": time.perf_counter() - start,
        }
        if cfg.beta > 0:
            metrics["kl"] = totals.ratio("kl", "tokens")
        return metrics
