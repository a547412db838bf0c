"""The generation backend interface: transformers (CPU/GPU) and vLLM (GPU) implement it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    n: int = 8  # completions per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 12
    seed: int | None = None
    greedy: bool = False  # argmax decoding (evaluation); ignores temperature/top_p


@dataclass(frozen=True)
class Generation:
    text: str  # decoded completion, special tokens removed
    token_ids: tuple[int, ...]  # generated ids; includes the EOS id when finished
    finished: bool  # True when the model emitted EOS within max_new_tokens
    # Behaviour log-prob: sum over token_ids of log p(token) under the distribution it was sampled
    # from (temperature and top-p applied); None when the backend does not know it (greedy decoding).
    logprob: float | None = None


class GenerationBackend(Protocol):
    name: str

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Generation]]:
        """Return params.n generations for each prompt, in prompt order."""
        ...

    def sync_weights(self) -> None:
        """Make the backend sample from the trainer's current weights (no-op when they share memory)."""
        ...
