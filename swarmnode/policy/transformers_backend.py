"""Generation with transformers' `generate` (CPU or one GPU): batched, left-padded, seeded sampling.

The sampling settings are passed explicitly (no top-k, no repetition penalty from a model's
generation_config.json), so completions are drawn from the policy's own distribution, which is what
the GRPO update assumes.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from swarmnode.policy.backend import Generation, SamplingParams
from swarmnode.policy.loading import Policy


class TransformersBackend:
    name = "transformers"

    def __init__(self, policy: Policy, max_batch_sequences: int = 256) -> None:
        self.policy = policy
        self.max_batch_sequences = max_batch_sequences  # sequences per generate() call, bounds memory

    def sync_weights(self) -> None:
        """Nothing to do: the backend samples from the trainer's model object itself."""

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Generation]]:
        """`params.n` generations per prompt, in prompt order (greedy: one decode, repeated n times)."""
        copies = 1 if params.greedy else params.n
        prompts_per_call = max(1, self.max_batch_sequences // copies)
        rng_devices = [self.policy.device] if self.policy.device.type == "cuda" else []
        results: list[list[Generation]] = []
        with torch.random.fork_rng(devices=rng_devices):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(prompt_ids), prompts_per_call):
                chunk = prompt_ids[start : start + prompts_per_call]
                generations = self._generate_chunk(chunk, params, copies)
                for i in range(len(chunk)):
                    group = generations[i * copies : (i + 1) * copies]
                    results.append(group * params.n if params.greedy else group)
        return results

    @torch.no_grad()
    def _generate_chunk(self, prompt_ids: list[list[int]], params: SamplingParams, copies: int) -> list[Generation]:
        policy = self.policy
        if any(not ids for ids in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), policy.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompt_ids):  # left padding: every prompt ends at the last column
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=not params.greedy,
            temperature=None if params.greedy else params.temperature,
            top_p=None if params.greedy else params.top_p,
            # Unset (None) values are filled from the model's generation_config.json, then from
            # transformers' defaults (top_k=50): disable top-k explicitly when sampling.
            top_k=None if params.greedy else 0,
            repetition_penalty=1.0,
            num_return_sequences=copies,
            eos_token_id=list(policy.stop_token_ids),
            pad_token_id=policy.pad_token_id,
        )
        output = policy.model.generate(
            input_ids=input_ids.to(policy.device),
            attention_mask=attention_mask.to(policy.device),
            generation_config=config,
        )
        stops = set(policy.stop_token_ids)
        generations = []
        for row in output[:, width:].tolist():  # prompt0 x copies, prompt1 x copies, ...
            end = next((i for i, token in enumerate(row) if token in stops), None)
            ids = row if end is None else row[: end + 1]
            generations.append(Generation(text=policy.decode(ids), token_ids=tuple(ids), finished=end is not None))
        return generations
