"""Typed rollout records shared by the node loop, the sampler and the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field

from swarmnode.tasks.reference import TaskRef

LOCAL_SOURCE = "local"


@dataclass(frozen=True)
class RolloutGroup:
    """One question and its G completions, as text: the unit that is shared and sampled."""

    task: TaskRef
    question: str
    completions: tuple[str, ...]
    finished: tuple[bool, ...]  # completion i ended with EOS (else truncated at max length)
    model_id: str
    round: int
    created_at: float
    source: str = LOCAL_SOURCE  # peer id of the sender, or "local"
    sequence: int = 0  # sender's sequence number of the batch that carried it
    # Sender-declared behaviour log-probability of each completion: the sum over its tokens of
    # log pi_gen(token) at the sampling temperature, under the generating model and tokenizer, with
    # its token count (for length normalisation). None when unknown (older senders). Travels signed
    # (wire Completion.behaviour_logprob / num_tokens); a receiver must treat it as a claim, never
    # let it push an importance weight past its cap.
    behaviour_logprobs: tuple[float, ...] | None = None
    behaviour_num_tokens: tuple[int, ...] | None = None

    @property
    def is_local(self) -> bool:
        return self.source == LOCAL_SOURCE


@dataclass(frozen=True)
class ScoredGroup:
    """A group scored by this node's own verifier, ready for the trainer."""

    group: RolloutGroup
    rewards: tuple[float, ...]
    # Token ids under the local tokenizer. For local groups these are the generated ids (exact);
    # for external groups the text re-tokenized locally.
    prompt_ids: tuple[int, ...] = ()
    completion_ids: tuple[tuple[int, ...], ...] = field(default_factory=tuple)

    @property
    def reward_std(self) -> float:
        n = len(self.rewards)
        mean = sum(self.rewards) / n
        return (sum((r - mean) ** 2 for r in self.rewards) / n) ** 0.5
