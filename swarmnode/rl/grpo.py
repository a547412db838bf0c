"""GRPO policy update for one SAPO round: advantages, group weights, clipped loss, optimizer steps.

The objective of one round, over the groups g handed to the trainer (this node's own and external),
their completions i and each completion's tokens t:

    A_i      = (r_i - mean(r_g)) / (std(r_g) + 1e-4)         (or r_i - mean(r_g) without scaling)
    ratio_t  = exp(logp_t - old_logp_t)
    pg_t     = -min(ratio_t * A_i, clamp(ratio_t, 1 - epsilon, 1 + epsilon_high) * A_i)
    kl_t     = exp(ref_t - logp_t) - (ref_t - logp_t) - 1     (k3 estimator, only when beta > 0)

    PG_g     = sum_{i in g} c_i * sum_t pg_t / T_g            T_g = completion tokens of group g
    KL_g     = sum_{i in g} sum_t kl_t / T_g
    loss     = sum_g w_g * PG_g  +  beta * sum_g u_g * KL_g

Group weights. Each group is first normalised to its own token mean, so a peer's longer completions
(up to 4x ``max_completion_length``) or larger groups (up to 64) weigh no more than one of ours. The
two kinds k (local, external) then get explicit shares of the loss, lambda_E and lambda_L = 1 - lambda_E:

    lambda_E = grpo.external_loss_share, or when unset n_E / (n_L + n_E)   (n_k = groups of kind k
               handed to the trainer, zero-variance ones included: J / (I + J) with a full pool)
    w_g      = lambda_k / |S_k|  for g in S_k (the kind's groups with reward signal), else 0
    u_g      = lambda_k / n_k    (every group of the kind carries its KL term)

A kind with no group at all gives its share to the other (a silo trains on lambda_L = 1). A kind
whose groups are all zero-variance keeps its share and contributes nothing, so an "external-only"
step (every local group flat) moves the policy by lambda_E of a step, not by a whole one. Finally one
sender's total weight is capped: when sum_{g from s} w_g > grpo.max_source_loss_share, that sender's
w (and u) are scaled down to the cap; nothing is redistributed, so the weights sum to <= 1.

Off-policy factor c_i, per completion: 1 for this node's own completions (on-policy), and for
external ones per ``grpo.off_policy``:

    none           c_i = 1                                   (the paper: external text as if on-policy)
    positive_only  c_i = 1 if A_i > 0 else 0                 (the default, see below)
    importance     c_i = min(importance_cap, rho_i)
    topr           c_i = 1 if A_i > 0, min(1, rho_i) if A_i < 0, else 0   (TOPR-like asymmetry)

    rho_i    = exp( sum_t old_logp_t / T_i  -  b_i / n_i )

where b_i and n_i are the sender-declared behaviour log-prob (sum over its tokens at its sampling
temperature) and token count, and old_logp_t the log-probs of the locally re-tokenized text under
this node's weights of before the round's first step, computed without gradient. rho_i is the
length-normalised (per-token geometric mean) sequence-level importance weight pi_local / pi_sender.
It is truncated, and the cap is applied in log space, so a sender that lies about b_i can at most
reach the cap; a group whose claim is missing or malformed gets c_i = min(1, cap) under
``importance`` and its negatives 0 under ``topr``.

Likelihood floor (the poisoning defence, ``grpo.external_logprob_floor``, -5 by default, "off" disables): an
external completion gets c_i = 0 when

    sum_t old_logp_t / L  <  external_logprob_floor            L = grpo.max_completion_length

i.e. when the text is less likely under this node's policy of the start of the round than a
full-length local completion at ``floor`` nats per token. Planted text (a marker the local model
would never write) costs many nats per token; peers' samples of the same or a similar model cost
well under one on average. Dividing by the local length L rather than the completion's own length
makes padding a marker with likely text useless (every token only lowers the sum) and makes a short
honest completion with one rare token pass. Such rows are counted (``rows_zeroed_low_likelihood``);
their group's weight is not redistributed.

Trust region (decoupled PPO, Hilton et al. 2022): the clip acts on pi_theta / pi_old, where pi_old is
this node's policy at the start of the round (the "proximal" policy), for local and external tokens
alike; the mismatch between the sender's policy and pi_old is carried by the truncated c_i, not by
the clip ratio (pi_theta / pi_sender on external text is far from 1, and clipping on it would zero
external gradients at random). ``old_logp`` is computed under ``no_grad`` before the first update
whenever a round makes more than one optimizer step; with one step per round it equals the detached
new log-probs, the ratio is exactly 1 and the clip cannot act (as in TRL): the trust region is then
c_i <= cap and ``max_grad_norm``. Use ``minibatches > 1`` or ``num_iterations > 1`` to clip.

Each round makes ``num_iterations`` passes over the batch, each split into ``minibatches`` optimizer
steps. The weights are computed once for the whole batch; a minibatch's loss is rescaled so its total
(static) weight equals the batch's, so every optimizer step sees the same loss scale. A minibatch
too large for memory runs in micro-batches (gradient accumulation, ``micro_batch_size``).

Choices, documented once:
- Per-group token mean (not sequence-mean-then-group-mean): inside a group this is DAPO's token-level
  aggregation (a long wrong completion is not diluted by its own length), while across groups each
  weighs only its share. The cost: a group with longer completions gets a smaller per-token weight.
- positive_only is the default because of the audit's evidence (issue 9): with a synthetic stronger
  peer, giving external completions with negative advantage zero weight, and nothing else, turned a
  loss of held-out accuracy into a gain (0.26/0.35 -> 0.44/0.46 against 0.385/0.415 for the silo),
  and in a 4/4 swarm (one seed) 0.302 -> 0.456 against 0.443 for 8/0. Pushing down text that the
  local policy would rarely produce looks like the source of the harm. Those rows are then not
  computed at all (zero weight and no KL term when beta = 0).
- The group std is the population std (divide by n), the same as ``ScoredGroup.reward_std``. It is
  defined for every group size, including 1; TRL's sample std (n - 1) is NaN there.
- A group whose rewards are all equal (including a single completion) gets zero advantages. With
  beta = 0 it adds no gradient, so the trainer does not compute it (DAPO's "dynamic sampling"); it
  still counts as present for its kind's share, the same rule for local and external groups. With
  beta > 0 it is computed for its KL term.
- Log-probs are those of the sampling distribution: logits are divided by ``cfg.temperature``, as
  in TRL. They are computed only at completion positions, in chunks, without a float32 copy of the
  full vocabulary logits of every position (``token_logprobs``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from swarmnode.config import GRPOConfig
from swarmnode.rl.records import ScoredGroup

ADVANTAGE_STD_EPS = 1e-4
OFF_POLICY_STRATEGIES = ("none", "positive_only", "importance", "topr")
GRAD_NORM_SPIKE = 10.0  # steps whose grad norm (before clipping) exceeds this are counted


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


# --------------------------------------------------------------------------- group weights


@dataclass(frozen=True)
class GroupWeights:
    """Loss weights of each group (``w_g``, ``u_g`` of the module docstring) and the kinds' shares."""

    policy: tuple[float, ...]  # w_g: weight of the group's policy-gradient token mean
    kl: tuple[float, ...]  # u_g: weight of the group's KL token mean
    external_share: float  # lambda_E actually used
    capped_sources: tuple[str, ...]  # senders scaled down to max_source_loss_share


def group_weights(
    groups: Sequence[ScoredGroup],
    external_loss_share: float | None = None,
    max_source_loss_share: float = 1.0,
) -> GroupWeights:
    """The per-group loss weights of the module docstring (shares, signal groups, per-sender cap)."""
    n_external = sum(not g.group.is_local for g in groups)
    n_local = len(groups) - n_external
    if n_local == 0 or n_external == 0:
        share = 1.0 if n_local == 0 and n_external > 0 else 0.0
    elif external_loss_share is None:
        share = n_external / (n_local + n_external)
    else:
        share = external_loss_share
    lam = {True: 1.0 - share, False: share}  # keyed by is_local
    count = {True: n_local, False: n_external}
    signal = {kind: sum(has_reward_signal(g) for g in groups if g.group.is_local is kind) for kind in lam}
    policy = [
        lam[g.group.is_local] / signal[g.group.is_local] if has_reward_signal(g) else 0.0 for g in groups
    ]
    kl = [lam[g.group.is_local] / count[g.group.is_local] for g in groups]

    capped: list[str] = []
    for source in sorted({g.group.source for g in groups if not g.group.is_local}):
        members = [k for k, g in enumerate(groups) if g.group.source == source]
        for weights in (policy, kl):
            total = sum(weights[k] for k in members)
            if total > max_source_loss_share:
                for k in members:
                    weights[k] *= max_source_loss_share / total
                if source not in capped:
                    capped.append(source)
    return GroupWeights(tuple(policy), tuple(kl), share, tuple(capped))


def declared_behaviour_mean(group: ScoredGroup) -> list[float]:
    """Per completion, the sender's claimed mean token log-prob b_i / n_i; NaN when missing or malformed.

    Malformed: counts that do not match the completions, a non-finite or positive log-prob, a token
    count below 1. The wire decoder already refuses most of these; the trainer does not rely on it.
    """
    g = group.group
    n = len(group.rewards)
    unknown = [math.nan] * n
    if g.is_local or g.behaviour_logprobs is None or g.behaviour_num_tokens is None:
        return unknown
    if len(g.behaviour_logprobs) != n or len(g.behaviour_num_tokens) != n:
        return unknown
    out = []
    for logprob, tokens in zip(g.behaviour_logprobs, g.behaviour_num_tokens, strict=True):
        ok = isinstance(tokens, int) and tokens >= 1 and math.isfinite(logprob) and logprob <= 0.0
        out.append(logprob / tokens if ok else math.nan)
    return out


def off_policy_factor(
    strategy: str,
    advantages: torch.Tensor,
    is_local: torch.Tensor,
    log_rho: torch.Tensor | None,
    importance_cap: float,
) -> torch.Tensor:
    """c_i of the module docstring, per row [B]. ``log_rho`` is NaN where the claim is unknown.

    The truncation happens in log space (min(log rho, log cap)) so a huge forged ratio never
    becomes inf or NaN on the way to the cap.
    """
    if strategy not in OFF_POLICY_STRATEGIES:
        raise ValueError(
            f"grpo.off_policy: unknown strategy {strategy!r}; expected one of {OFF_POLICY_STRATEGIES}"
        )
    ones = torch.ones_like(advantages)
    if strategy == "none":
        factor = ones
    elif strategy == "positive_only":
        factor = (advantages > 0).float()
    else:
        if log_rho is None:
            log_rho = torch.full_like(advantages, math.nan)
        known = ~torch.isnan(log_rho)
        if strategy == "importance":
            capped = torch.exp(torch.clamp(torch.nan_to_num(log_rho, nan=0.0), max=math.log(importance_cap)))
            factor = torch.where(known, capped, torch.full_like(advantages, min(1.0, importance_cap)))
        else:  # topr
            truncated = torch.exp(torch.clamp(torch.nan_to_num(log_rho, nan=-math.inf), max=0.0))
            negative = torch.where(known, truncated, torch.zeros_like(advantages))
            factor = torch.where(advantages > 0, ones, torch.where(advantages < 0, negative, 0.0 * ones))
    return torch.where(is_local, ones, factor)


# --------------------------------------------------------------------------- batch


@dataclass
class Batch:
    """Prompt + completion sequences, right-padded, one row per completion.

    ``completion_mask[b, t]`` is 1 when the target of position t, ``input_ids[b, t + 1]``, is a
    completion token, so it lines up with the shifted log-probs of ``token_logprobs``. The per-row
    weights are per token: the group's weight divided by the group's completion tokens.
    """

    input_ids: torch.Tensor  # [B, T] long, padded with pad_token_id
    attention_mask: torch.Tensor  # [B, T] long, 1 on real tokens
    position_ids: torch.Tensor  # [B, T] long, 0..len-1 on real tokens
    completion_mask: torch.Tensor  # [B, T-1] float
    advantages: torch.Tensor  # [B] float
    is_local: torch.Tensor  # [B] bool, the row comes from one of this node's own groups
    group_index: torch.Tensor  # [B] long, index of the row's group in the groups given
    policy_weight: torch.Tensor  # [B] float, w_g / T_g
    kl_weight: torch.Tensor  # [B] float, u_g / T_g
    behaviour_mean: torch.Tensor  # [B] float, sender-declared b_i / n_i (NaN: unknown or local)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def row_tokens(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def select(self, rows: torch.Tensor) -> Batch:
        return Batch(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def to(self, device: str | torch.device) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def build_batch(
    groups: Sequence[ScoredGroup],
    pad_token_id: int,
    scale_rewards: bool = True,
    weights: GroupWeights | None = None,
) -> Batch:
    """One right-padded row per completion of every group, with its advantage and per-token weights.

    Completion ids are used as given: they end with the EOS id when the completion finished
    (``Generation.token_ids`` / ``Policy.encode_completion``), and that EOS is a training target.
    ``weights`` defaults to ``group_weights(groups)`` (group-proportional shares, no sender cap).
    """
    weights = weights or group_weights(groups)
    rows: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    advantages: list[float] = []
    is_local: list[bool] = []
    group_index: list[int] = []
    policy_weight: list[float] = []
    kl_weight: list[float] = []
    behaviour: list[float] = []
    for k, sg in enumerate(groups):
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
        n = len(sg.rewards)
        is_local += [sg.group.is_local] * n
        group_index += [k] * n
        group_tokens = max(sum(len(c) for c in sg.completion_ids), 1)
        policy_weight += [weights.policy[k] / group_tokens] * n
        kl_weight += [weights.kl[k] / group_tokens] * n
        behaviour += declared_behaviour_mean(sg)
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
        group_index=torch.tensor(group_index, dtype=torch.long),
        policy_weight=torch.tensor(policy_weight, dtype=torch.float32),
        kl_weight=torch.tensor(kl_weight, dtype=torch.float32),
        behaviour_mean=torch.tensor(behaviour, dtype=torch.float32),
    )


# --------------------------------------------------------------------------- log-probs and loss


# float32 logits of one chunk of completion positions stay under this many bytes (the chunk's peak
# is ~3x: logits, probabilities, gradient)
LOGITS_CHUNK_BYTES = 1 << 26


def _chunk_rows(vocab_size: int) -> int:
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size))


class _SelectedTokenLogprobs(torch.autograd.Function):
    """log softmax(hidden @ W^T / T)[target] and the entropy, chunked, recomputing logits in backward.

    Only [chunk, V] float32 logits exist at any time, in forward and in backward; the saved state
    is the [N, H] hidden states of the selected positions.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        temperature: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 in gradcheck
        logp = torch.empty(n, dtype=dtype, device=hidden.device)
        entropy = torch.empty(n, dtype=dtype, device=hidden.device)
        for start in range(0, n, _chunk_rows(weight.shape[0])):
            end = min(start + _chunk_rows(weight.shape[0]), n)
            logits = nn.functional.linear(hidden[start:end], weight).to(dtype) / temperature
            lse = logits.logsumexp(-1)
            logp[start:end] = logits.gather(-1, targets[start:end, None]).squeeze(-1) - lse
            # H = lse - sum_v p_v z_v, p = exp(z - lse)
            entropy[start:end] = lse - (torch.exp(logits - lse[:, None]) * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_logp: torch.Tensor, _grad_entropy: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        hidden, weight, targets = ctx.saved_tensors  # type: ignore[attr-defined]
        temperature = ctx.temperature  # type: ignore[attr-defined]
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # type: ignore[attr-defined]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        # The projection's gradient is accumulated in the weight's own dtype: no float32 [V, H] copy
        # (0.5 GiB for Qwen2.5's vocabulary); each chunk's product is summed in float32 by the
        # matmul and rounded once when added.
        grad_weight = torch.zeros_like(weight) if need_weight else None
        n = hidden.shape[0]
        for start in range(0, n, _chunk_rows(weight.shape[0])):
            end = min(start + _chunk_rows(weight.shape[0]), n)
            h = hidden[start:end]
            logits = nn.functional.linear(h, weight).to(dtype) / temperature
            # d logp / d logits = onehot(target) - softmax; then the 1 / temperature of the scaling
            grad = torch.softmax(logits, -1).mul_(-grad_logp[start:end, None].to(dtype))
            del logits
            rows = torch.arange(end - start, device=grad.device)
            grad[rows, targets[start:end]] += grad_logp[start:end].to(dtype)
            grad.div_(temperature)
            if grad_hidden is not None:
                grad_hidden[start:end] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad.t().to(weight.dtype), h.to(weight.dtype))
        return grad_hidden, grad_weight, None, None


def _plain_output_head(model: nn.Module) -> tuple[nn.Module, torch.Tensor] | None:
    """The decoder body and the bias-free, unscaled output projection, when the model is built so.

    Models that post-process their logits (soft-capping, a logit scale, a bias) get None and the
    generic path.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "model", None)
    config = getattr(model, "config", None)
    if not isinstance(head, nn.Linear) or head.bias is not None or not isinstance(body, nn.Module):
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (
        None,
        1.0,
    ):
        return None
    return body, head.weight


def token_logprobs(
    model: nn.Module, batch: Batch, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each completion token and the policy's entropy there, both [B, T-1].

    Only positions where ``batch.completion_mask`` is set are computed; every other entry is 0.
    Memory: the output projection runs on the selected positions only, in chunks of
    ``LOGITS_CHUNK_BYTES`` of float32 logits, and is recomputed in backward; no [B, T, V] tensor
    is ever built (the generic path, for heads it cannot split, builds the model's own logits once).
    The entropy is detached.
    """
    rows, cols = batch.completion_mask.nonzero(as_tuple=True)
    targets = batch.input_ids[rows, cols + 1]  # position t predicts token t + 1
    inputs = dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    split = _plain_output_head(model)
    if split is not None:
        body, weight = split
        hidden = body(**inputs).last_hidden_state[rows, cols]
        logp_sel, entropy_sel = _SelectedTokenLogprobs.apply(hidden, weight, targets, temperature)
    else:
        logits = model(**inputs).logits[rows, cols]
        chunks = logits.split(_chunk_rows(logits.shape[-1]))
        picked = targets.split(_chunk_rows(logits.shape[-1]))
        parts = [_generic_chunk(z, t, temperature) for z, t in zip(chunks, picked, strict=True)]
        logp_sel = torch.cat([p for p, _ in parts]) if parts else logits.new_zeros(0, dtype=torch.float32)
        entropy_sel = torch.cat([e for _, e in parts]) if parts else logp_sel.detach()
    shape = batch.completion_mask.shape
    logp = torch.zeros(shape, dtype=logp_sel.dtype, device=logp_sel.device).index_put((rows, cols), logp_sel)
    entropy = torch.zeros(shape, dtype=logp_sel.dtype, device=logp_sel.device).index_put(
        (rows, cols), entropy_sel.detach()
    )
    return logp, entropy


def _generic_chunk(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits.float() / temperature
    lse = z.logsumexp(-1)
    logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse
    with torch.no_grad():
        entropy = lse - (torch.exp(z - lse[:, None]) * z).sum(-1)
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
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO/GRPO clipped surrogate: sum_t pg_t * token_weights_t (default: the token mean over ``mask``).

    ``advantages`` is per sequence [B] or per token [B, T]; ``token_weights`` [B, T] must already
    be zero outside ``mask``. Returns the loss and, as in TRL, per-token indicators of the clipped
    tokens (``low``: ratio < 1 - eps_low where A < 0, ``high``: ratio > 1 + eps_high where A > 0),
    already multiplied by ``mask``, with their token means ``clip_frac_low`` / ``clip_frac_high``
    and the ``ratio``.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.min(unclipped, clipped)
    loss = masked_mean(per_token, mask) if token_weights is None else (per_token * token_weights).sum()

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


def sequence_log_rho(
    old_logp: torch.Tensor, mask: torch.Tensor, behaviour_mean: torch.Tensor
) -> torch.Tensor:
    """log rho_i = mean_t old_logp_t - b_i / n_i per row [B]; NaN where the claim is unknown."""
    local_mean = (old_logp * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return local_mean - behaviour_mean


def below_likelihood_floor(
    old_logp: torch.Tensor, mask: torch.Tensor, is_local: torch.Tensor, floor: float, length: int
) -> torch.Tensor:
    """Rows [B] of external completions under the likelihood floor of the module docstring."""
    return ~is_local & ((old_logp * mask).sum(-1) / length < floor)


def static_off_policy_factor(strategy: str, batch: Batch) -> torch.Tensor:
    """1 where a row may get a nonzero c_i before any log-prob is known, else 0 (rows not computed)."""
    if strategy == "positive_only":
        return torch.where(batch.is_local, 1.0, (batch.advantages > 0).float())
    if strategy == "topr":
        known = ~torch.isnan(batch.behaviour_mean)
        may = (batch.advantages > 0) | ((batch.advantages < 0) & known)
        return torch.where(batch.is_local, 1.0, may.float())
    return torch.ones(len(batch))


# --------------------------------------------------------------------------- trainer

# Automatic micro-batch size: rows whose full float32 logits would stay under this many bytes (CPU),
# or under a tenth of free GPU memory when that is more. The rule dates from full-vocabulary
# log-probs (peak ~6x the logits, measured on an H100 with a Qwen2.5-0.5B-shaped model); with the
# chunked log-probs it is conservative: a row now costs its activations, not its logits.
LOGITS_BYTES_PER_MICRO_BATCH = 1 << 30


class _RoundTotals:
    """Sums, extremes and per-step values over a round's optimizer steps, turned into metrics."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.maxes: dict[str, float] = {}
        self.grad_norms: list[float] = []

    def add(self, key: str, value: torch.Tensor | float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def high(self, key: str, value: float) -> None:
        self.maxes[key] = max(self.maxes.get(key, -math.inf), value)

    def add_tokens(
        self,
        mb: Batch,
        entropy: torch.Tensor,
        stats: dict[str, torch.Tensor],
        factor: torch.Tensor,
        log_rho: torch.Tensor,
        importance_cap: float,
    ) -> None:
        mask = mb.completion_mask
        local = mb.is_local.unsqueeze(-1).float()
        self.add("tokens", mask.sum())
        self.add("entropy", (entropy * mask).sum())
        for side in ("low", "high"):
            self.add(side, stats[side].sum())
        mass = mb.policy_weight * factor * mask.sum(-1)
        log_ratio = torch.log(stats["ratio"].clamp(min=1e-30))
        for part, weight in [("local", local), ("external", 1.0 - local)]:
            part_mask = mask * weight
            rows = weight.squeeze(-1).bool()
            self.add(f"tokens_{part}", part_mask.sum())
            self.add(f"entropy_{part}", (entropy * part_mask).sum())
            self.add(f"ratio_{part}", (stats["ratio"] * part_mask).sum())
            if part_mask.sum() > 0:
                picked = log_ratio[part_mask.bool()]
                self.high(f"log_ratio_max_{part}", picked.max().item())
                self.high(f"neg_log_ratio_max_{part}", (-picked).max().item())
            for side in ("low", "high"):
                self.add(f"{side}_{part}", (stats[side] * weight).sum())
            self.add(f"weight_{part}", mass[rows].sum())
            self.add(f"signal_{part}", (mass * mb.advantages.abs())[rows].sum())
        external_known = ~mb.is_local & ~torch.isnan(log_rho)
        self.add("is_rows", external_known.sum())
        self.add("is_unknown", (~mb.is_local & torch.isnan(log_rho)).sum())
        if external_known.any():
            rho = torch.exp(log_rho[external_known].clamp(max=math.log(importance_cap)))
            self.add("is_weight", rho.sum())
            self.add("is_capped", (log_rho[external_known] > math.log(importance_cap)).sum())

    def ratio(self, key: str, denominator: str) -> float:
        return self.sums.get(key, 0.0) / self.sums[denominator] if self.sums.get(denominator) else 0.0

    def share(self, part: str, key: str) -> float:
        total = self.sums.get(f"{key}_local", 0.0) + self.sums.get(f"{key}_external", 0.0)
        return self.sums.get(f"{key}_{part}", 0.0) / total if total > 0 else 0.0

    def extreme(self, key: str) -> float:
        return math.exp(self.maxes[key]) if key in self.maxes else 1.0


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
        if cfg.gradient_checkpointing and not hasattr(model, "activation_checkpointing_enable"):
            raise ValueError(
                "grpo.gradient_checkpointing needs a transformers model (activation_checkpointing_enable); "
                "set grpo.gradient_checkpointing = false"
            )
        if cfg.gradient_checkpointing:
            # only in train mode: the step switches the model back to eval, so generation keeps its cache
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
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
        groups = list(groups)
        totals = _RoundTotals()
        steps = 0
        external_only = 0.0
        zeroed_rows = 0
        weights = group_weights(groups, cfg.external_loss_share, cfg.max_source_loss_share)
        computed = [k for k, g in enumerate(groups) if cfg.beta > 0 or has_reward_signal(g)]
        batch = None
        if computed:
            subset = GroupWeights(
                tuple(weights.policy[k] for k in computed),
                tuple(weights.kl[k] for k in computed),
                weights.external_share,
                weights.capped_sources,
            )
            full = build_batch([groups[k] for k in computed], self.pad_token_id, cfg.scale_rewards, subset)
            static = static_off_policy_factor(cfg.off_policy, full)
            zeroed_rows = int(((static == 0) & (full.policy_weight > 0)).sum())
            keep = full.policy_weight * static > 0
            if cfg.beta > 0:
                keep |= full.kl_weight > 0
            if keep.any():
                batch = full.select(keep.nonzero().squeeze(-1)).to(self.device)
                static = static[keep].to(self.device)
                signal_rows = (batch.policy_weight * static) > 0
                if signal_rows.any() and not signal_rows[batch.is_local].any():
                    external_only = 1.0  # every local group flat: the step is external text only
        if batch is not None:
            self.model.train()
            # Old log-probs with the weights of before the first step. With a single optimizer step
            # they equal the detached new ones (ratio = 1), so that forward pass is skipped (as TRL).
            minibatches = min(cfg.minibatches, len(batch))
            single_step = cfg.num_iterations * minibatches == 1
            old_logp = None if single_step else self._frozen_logprobs(self.model, batch)
            ref_logp = None if self.ref_model is None else self._frozen_logprobs(self.ref_model, batch)
            tokens = batch.row_tokens
            policy_mass = (batch.policy_weight * static * tokens).sum()
            kl_mass = (batch.kl_weight * tokens).sum()

            for _ in range(cfg.num_iterations):
                order = torch.randperm(len(batch)) if minibatches > 1 else torch.arange(len(batch))
                for rows in order.tensor_split(minibatches):
                    self.optimizer.zero_grad(set_to_none=True)
                    # each minibatch carries the batch's total weight, however the rows fall
                    rows_mass = (batch.policy_weight[rows] * static[rows] * tokens[rows]).sum()
                    pg_scale = policy_mass / rows_mass if rows_mass > 0 else 0.0
                    rows_kl = (batch.kl_weight[rows] * tokens[rows]).sum()
                    kl_scale = kl_mass / rows_kl if rows_kl > 0 else 0.0
                    step_loss = 0.0
                    for micro in self._micro_batches(rows, batch):
                        mb = batch.select(micro)
                        mask = mb.completion_mask
                        logp, entropy = token_logprobs(self.model, mb, cfg.temperature)
                        old = logp.detach() if old_logp is None else old_logp[micro]
                        log_rho = sequence_log_rho(old, mask, mb.behaviour_mean)
                        factor = off_policy_factor(
                            cfg.off_policy, mb.advantages, mb.is_local, log_rho, cfg.importance_cap
                        )
                        if cfg.external_logprob_floor is not None:
                            low = below_likelihood_floor(
                                old, mask, mb.is_local, cfg.external_logprob_floor, cfg.max_completion_length
                            )
                            totals.add("low_likelihood", (low & (factor * mb.policy_weight > 0)).sum())
                            factor = torch.where(low, torch.zeros_like(factor), factor)
                        row_weight = mb.policy_weight * factor * pg_scale
                        loss, stats = clipped_policy_loss(
                            logp,
                            old,
                            mb.advantages,
                            mask,
                            cfg.epsilon,
                            cfg.epsilon_high,
                            token_weights=mask * row_weight.unsqueeze(-1),
                        )
                        if ref_logp is not None:
                            kl_tok = k3_kl(logp, ref_logp[micro])
                            kl_weight = mask * (mb.kl_weight * kl_scale).unsqueeze(-1)
                            loss = loss + cfg.beta * (kl_tok * kl_weight).sum()
                            totals.add("kl", (kl_tok.detach() * mask).sum())
                        loss.backward()
                        step_loss += loss.item()
                        totals.add_tokens(mb, entropy, stats, factor, log_rho, cfg.importance_cap)
                    totals.add("loss", step_loss)
                    norm = float(nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
                    totals.grad_norms.append(norm)
                    self.optimizer.step()
                    steps += 1

            self.model.eval()  # generation and evaluation run in eval mode (and with their KV cache)
        norms = totals.grad_norms
        num_tokens = totals.sums.get("tokens", 0.0) / max(cfg.num_iterations, 1)
        num_tokens_local = totals.sums.get("tokens_local", 0.0) / max(cfg.num_iterations, 1)
        metrics = {
            "loss": totals.sums.get("loss", 0.0) / max(steps, 1),
            "grad_norm": sum(norms) / max(len(norms), 1),  # before clipping
            "grad_norm_max": max(norms, default=0.0),
            "frac_steps_grad_norm_gt_10": sum(n > GRAD_NORM_SPIKE for n in norms) / max(len(norms), 1),
            "external_only_step": external_only,
            "entropy": totals.ratio("entropy", "tokens"),
            "entropy_local": totals.ratio("entropy_local", "tokens_local"),
            "entropy_external": totals.ratio("entropy_external", "tokens_external"),
            "clip_frac_low": totals.ratio("low", "tokens"),
            "clip_frac_high": totals.ratio("high", "tokens"),
            "clip_frac_low_local": totals.ratio("low_local", "tokens_local"),
            "clip_frac_high_local": totals.ratio("high_local", "tokens_local"),
            "clip_frac_low_external": totals.ratio("low_external", "tokens_external"),
            "clip_frac_high_external": totals.ratio("high_external", "tokens_external"),
            "ratio_mean_local": totals.ratio("ratio_local", "tokens_local") or 1.0,
            "ratio_mean_external": totals.ratio("ratio_external", "tokens_external") or 1.0,
            "ratio_max_local": totals.extreme("log_ratio_max_local"),
            "ratio_max_external": totals.extreme("log_ratio_max_external"),
            "ratio_min_local": 1.0 / totals.extreme("neg_log_ratio_max_local"),
            "ratio_min_external": 1.0 / totals.extreme("neg_log_ratio_max_external"),
            # share of the policy-gradient weight (sum of w_g c_i over tokens) and of |A|-weighted mass
            "loss_share_local": totals.share("local", "weight"),
            "loss_share_external": totals.share("external", "weight"),
            "signal_share_external": totals.share("external", "signal"),
            "external_share_target": weights.external_share,
            "num_sources_capped": float(len(weights.capped_sources)),
            "rows_zeroed_off_policy": float(zeroed_rows),
            "rows_zeroed_low_likelihood": totals.sums.get("low_likelihood", 0.0) / max(cfg.num_iterations, 1),
            "is_weight_mean": totals.ratio("is_weight", "is_rows") or 0.0,
            "is_frac_capped": totals.ratio("is_capped", "is_rows"),
            "is_rows_unknown": totals.sums.get("is_unknown", 0.0) / max(cfg.num_iterations, 1),
            "frac_zero_std": sum(not has_reward_signal(g) for g in groups) / max(len(groups), 1),
            "reward_mean": sum(sum(g.rewards) for g in groups) / max(sum(len(g.rewards) for g in groups), 1),
            "num_groups": float(len(groups)),
            "num_groups_trained": float(len(computed)),
            "num_tokens": num_tokens,
            "num_tokens_local": num_tokens_local,
            "num_tokens_external": num_tokens - num_tokens_local,
            "optimizer_steps": float(steps),
            "step_seconds": time.perf_counter() - start,
        }
        if cfg.beta > 0:
            metrics["kl"] = totals.ratio("kl", "tokens")
        return metrics
