"""Generation with transformers' `generate` (CPU or one GPU): batched, left-padded, seeded sampling.

The sampling settings are passed explicitly (no top-k, no repetition penalty from a model's
generation_config.json), so completions are drawn from the policy's own distribution, which is what
the GRPO update assumes. Sampled completions carry their behaviour log-prob (``Generation.logprob``):
temperature and top-p are applied by ``SampledTokenLogprobs``, which records the log-prob of each
sampled token under exactly the distribution it was drawn from.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from swarmnode.policy.backend import Generation, SamplingParams
from swarmnode.policy.loading import Policy


class SampledTokenLogprobs(LogitsProcessor):
    """Applies temperature and top-p itself and records each sampled token's log-prob.

    ``generate()`` appends its own warpers after user processors, so it is called with temperature
    1 and top-p 1 (no warper of its own) and this processor's output is exactly the distribution
    sampled from. At each step the token chosen at the previous step is in ``input_ids``; its
    log-prob is read from the previous step's scores (one step of scores is kept, never all).
    """

    def __init__(self, temperature: float, top_p: float) -> None:
        self.warpers = LogitsProcessorList()
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p))
        self._previous: torch.Tensor | None = None
        self._steps: list[torch.Tensor] = []

    def _record(self, chosen: torch.Tensor) -> None:
        scores = self._previous.float()  # type: ignore[union-attr]
        self._steps.append((scores.gather(-1, chosen.unsqueeze(-1)).squeeze(-1) - scores.logsumexp(-1)).cpu())

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._previous is not None:
            self._record(input_ids[:, -1])
        scores = self.warpers(input_ids, scores)
        self._previous = scores
        return scores

    def finish(self, generated: torch.Tensor) -> torch.Tensor:
        """[rows, steps] log-probs of the sampled tokens ``generated`` [rows, steps].

        transformers (5.x) calls the processors once more after the last token, which records it;
        when a version does not, the last token is read from the scores kept here.
        """
        steps = generated.shape[1]
        if len(self._steps) < steps and self._previous is not None:
            self._record(generated[:, len(self._steps)])
        self._previous = None
        if len(self._steps) < steps:
            raise RuntimeError(
                f"recorded {len(self._steps)} sampled-token log-probs for {steps} generated tokens"
            )
        return torch.stack(self._steps[:steps], dim=1) if steps else torch.zeros(len(generated), 0)


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
    def _generate_chunk(
        self, prompt_ids: list[list[int]], params: SamplingParams, copies: int
    ) -> list[Generation]:
        policy = self.policy
        if any(not ids for ids in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), policy.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompt_ids):  # left padding: every prompt ends at the last column
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        recorder = None if params.greedy else SampledTokenLogprobs(params.temperature, params.top_p)
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=not params.greedy,
            # sampling: temperature and top-p are applied by the recorder (see SampledTokenLogprobs)
            temperature=None if params.greedy else 1.0,
            top_p=None if params.greedy else 1.0,
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
            logits_processor=LogitsProcessorList([recorder]) if recorder else None,
        )
        token_logprobs = None if recorder is None else recorder.finish(output[:, width:]).tolist()
        stops = set(policy.stop_token_ids)
        generations = []
        for r, row in enumerate(output[:, width:].tolist()):  # prompt0 x copies, prompt1 x copies, ...
            end = next((i for i, token in enumerate(row) if token in stops), None)
            ids = row if end is None else row[: end + 1]
            logprob = None if token_logprobs is None else float(sum(token_logprobs[r][: len(ids)]))
            generations.append(
                Generation(
                    text=policy.decode(ids), token_ids=tuple(ids), finished=end is not None, logprob=logprob
                )
            )
        return generations
