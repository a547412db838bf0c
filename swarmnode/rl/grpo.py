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
from 1 and clipping acts.

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


class GRPOTrainer:
    """Owns the optimizer and turns one round's scored groups into optimizer steps."""

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

    @torch.no_grad()
    def _frozen_logprobs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Log-probs of the whole batch without gradients, computed in minibatch-sized chunks."""
        chunks = torch.arange(len(batch)).tensor_split(min(self.cfg.minibatches, len(batch)))
        return torch.cat(
            [token_logprobs(model, batch.select(rows), self.cfg.temperature)[0] for rows in chunks]
        )

    def step(self, groups: Sequence[ScoredGroup]) -> dict[str, float]:
        """One round's update: num_iterations x minibatches optimizer steps. Returns metrics."""
        cfg = self.cfg
        start = time.perf_counter()
        metrics = {
            "frac_zero_std": sum(not has_reward_signal(g) for g in groups) / max(len(groups), 1),
            "reward_mean": sum(sum(g.rewards) for g in groups) / max(sum(len(g.rewards) for g in groups), 1),
        }
        trained = list(groups) if cfg.beta > 0 else [g for g in groups if has_reward_signal(g)]
        totals = dict.fromkeys(
            ["loss", "grad_norm", "tokens", "tokens_local", "tokens_external", "entropy", "kl",
             "low", "high", "low_local", "high_local", "low_external", "high_external"], 0.0
        )  # fmt: skip
        optimizer_steps = 0
        num_tokens = num_tokens_local = 0.0
        if trained:
            batch = build_batch(trained, self.pad_token_id, cfg.scale_rewards).to(self.device)
            num_tokens = batch.completion_mask.sum().item()
            num_tokens_local = batch.completion_mask[batch.is_local].sum().item()
            self.model.train()
            # Old log-probs with the weights of before the first step. With a single optimizer step
            # they equal the detached new ones (ratio = 1), so that forward pass is skipped (as TRL).
            single_step = cfg.num_iterations * min(cfg.minibatches, len(batch)) == 1
            old_logp = None if single_step else self._frozen_logprobs(self.model, batch)
            ref_logp = self._frozen_logprobs(self.ref_model, batch) if self.ref_model is not None else None

            for _ in range(cfg.num_iterations):
                order = torch.randperm(len(batch)) if cfg.minibatches > 1 else torch.arange(len(batch))
                for rows in order.tensor_split(min(cfg.minibatches, len(batch))):
                    mb = batch.select(rows)
                    logp, entropy = token_logprobs(self.model, mb, cfg.temperature)
                    old = logp.detach() if old_logp is None else old_logp[rows]
                    loss, stats = clipped_policy_loss(
                        logp, old, mb.advantages, mb.completion_mask, cfg.epsilon, cfg.epsilon_high
                    )
                    mask = mb.completion_mask
                    if ref_logp is not None:
                        kl_tok = k3_kl(logp, ref_logp[rows])
                        loss = loss + cfg.beta * masked_mean(kl_tok, mask)
                        totals["kl"] += (kl_tok.detach() * mask).sum().item()

                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    grad_norm = nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                    self.optimizer.step()
                    optimizer_steps += 1

                    local = mb.is_local.unsqueeze(-1).float()
                    totals["loss"] += loss.item()
                    totals["grad_norm"] += grad_norm.item()
                    totals["tokens"] += mask.sum().item()
                    totals["tokens_local"] += (mask * local).sum().item()
                    totals["tokens_external"] += (mask * (1 - local)).sum().item()
                    totals["entropy"] += (entropy * mask).sum().item()
                    for side in ("low", "high"):
                        totals[side] += stats[side].sum().item()
                        totals[f"{side}_local"] += (stats[side] * local).sum().item()
                        totals[f"{side}_external"] += (stats[side] * (1 - local)).sum().item()

        def per(key: str, denominator: str) -> float:
            return totals[key] / totals[denominator] if totals[denominator] else 0.0

        metrics |= {
            "loss": totals["loss"] / max(optimizer_steps, 1),
            "grad_norm": totals["grad_norm"] / max(optimizer_steps, 1),
            "entropy": per("entropy", "tokens"),
            "clip_frac_low": per("low", "tokens"),
            "clip_frac_high": per("high", "tokens"),
            "clip_frac_low_local": per("low_local", "tokens_local"),
            "clip_frac_high_local": per("high_local", "tokens_local"),
            "clip_frac_low_external": per("low_external", "tokens_external"),
            "clip_frac_high_external": per("high_external", "tokens_external"),
            "num_groups": float(len(groups)),
            "num_groups_trained": float(len(trained)),
            "num_tokens": num_tokens,
            "num_tokens_local": num_tokens_local,
            "num_tokens_external": num_tokens - num_tokens_local,
            "optimizer_steps": float(optimizer_steps),
            "step_seconds": time.perf_counter() - start,
        }
        if cfg.beta > 0:
            metrics["kl"] = per("kl", "tokens")
        return metrics
