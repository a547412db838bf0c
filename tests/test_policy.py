"""Policy loading, prompt/completion encoding and the transformers generation backend (on tiny-a)."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoTokenizer

from swarmnode.config import ModelConfig
from swarmnode.policy.backend import SamplingParams
from swarmnode.policy.chat import DEFAULT_SYSTEM_PROMPT, prompt_text
from swarmnode.policy.loading import ModelLoadError, Policy, load_policy, pick_dtype, resolve_model_path
from swarmnode.policy.transformers_backend import TransformersBackend
from swarmnode.tasks.registry import TaskRegistry

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(ModelConfig(path="embedded:tiny-a"), "cpu")


@pytest.fixture(scope="module")
def backend(policy: Policy) -> TransformersBackend:
    return TransformersBackend(policy)


@pytest.fixture(scope="module")
def prompts(policy: Policy) -> list[list[int]]:
    # easy-mix alternates two question wordings of different lengths, so batches need padding.
    return [policy.encode_prompt(t.question) for t in TaskRegistry("easy-mix").eval_tasks(6)]


def test_missing_model_path_error_names_the_path(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=f"model path {missing} does not exist"):
        load_policy(ModelConfig(path=str(missing)), "cpu")


def test_unknown_embedded_model_error_lists_the_shipped_ones() -> None:
    with pytest.raises(ModelLoadError, match=r"no embedded model 'tiny-z'.*tiny-a"):
        resolve_model_path("embedded:tiny-z")


def test_hub_id_without_hub_says_to_pass_a_local_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        ModelLoadError, match="not found locally and the hub is unreachable.*pass a local path"
    ):
        load_policy(ModelConfig(path="swarmnode-tests/no-such-model"), "cpu")


def test_auto_dtype_is_float32_on_cpu_and_explicit_dtype_wins() -> None:
    assert pick_dtype("auto", torch.device("cpu")) is torch.float32
    assert pick_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16


def test_model_id_defaults_to_the_model_name_and_can_be_overridden(policy: Policy) -> None:
    assert policy.model_id == "tiny-a"
    assert load_policy(ModelConfig(path="embedded:tiny-a", id="alice-model"), "cpu").model_id == "alice-model"


def test_prompt_goes_through_the_tiny_chat_template(policy: Policy) -> None:
    question = "State the final answer to the following arithmetic problem: 12 + 7 ="
    ids = policy.encode_prompt(question)
    assert policy.tokenizer.decode(ids) == f"<|user|>{question}<|assistant|>"
    assert len(ids) < 25, "the tiny template must keep prompts short"


def test_template_less_tokenizer_gets_the_system_prompt_and_a_plain_format() -> None:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded:tiny-a")[0])
    tokenizer.chat_template = None
    text = prompt_text(tokenizer, "What is 2 + 2?", DEFAULT_SYSTEM_PROMPT)
    assert text == f"{DEFAULT_SYSTEM_PROMPT}\n\nQuestion: What is 2 + 2?\nAnswer: "


def test_completion_encoding_appends_eos_only_when_finished(policy: Policy) -> None:
    text = "<answer>-42</answer>"
    finished = policy.encode_completion(text, finished=True)
    truncated = policy.encode_completion(text, finished=False)
    assert finished == truncated + [policy.eos_token_id]
    assert policy.decode(finished) == text


def test_backend_returns_n_generations_per_prompt_with_consistent_finished_flags(
    policy: Policy, backend: TransformersBackend, prompts: list[list[int]]
) -> None:
    # Room for a one-digit answer and EOS only: some completions end, longer answers are cut.
    one_digit_answer = len(policy.encode_completion("<answer>7</answer>", finished=True))
    params = SamplingParams(n=5, temperature=1.0, max_new_tokens=one_digit_answer, seed=3)
    groups = backend.generate(prompts, params)
    assert [len(group) for group in groups] == [5] * len(prompts)
    flags = [g.finished for group in groups for g in group]
    assert any(flags) and not all(flags)
    for generation in (g for group in groups for g in group):
        assert generation.finished == (generation.token_ids[-1] in policy.stop_token_ids)
        assert policy.stop_token_ids[0] not in generation.token_ids[:-1]
        if not generation.finished:
            assert len(generation.token_ids) == params.max_new_tokens
        assert generation.text == policy.decode(generation.token_ids)


def test_sampling_is_reproducible_with_a_seed(backend: TransformersBackend, prompts: list[list[int]]) -> None:
    params = SamplingParams(n=4, max_new_tokens=8, seed=11)
    first = backend.generate(prompts, params)
    assert backend.generate(prompts, params) == first
    assert backend.generate(prompts, SamplingParams(n=4, max_new_tokens=8, seed=12)) != first


def test_greedy_batched_with_left_padding_matches_one_prompt_at_a_time(
    backend: TransformersBackend, prompts: list[list[int]]
) -> None:
    assert len({len(p) for p in prompts}) > 1, "the prompts must differ in length to exercise padding"
    params = SamplingParams(n=3, greedy=True, max_new_tokens=10)
    batched = backend.generate(prompts, params)
    for prompt, group in zip(prompts, batched, strict=True):
        assert len(set(group)) == 1, "greedy completions of one prompt are identical"
        assert backend.generate([prompt], params)[0][0].token_ids == group[0].token_ids


def test_small_batch_limit_gives_the_same_greedy_results(policy: Policy, prompts: list[list[int]]) -> None:
    params = SamplingParams(n=2, greedy=True, max_new_tokens=10)
    chunked = TransformersBackend(policy, max_batch_sequences=2).generate(prompts, params)
    assert chunked == TransformersBackend(policy).generate(prompts, params)


def _teacher_forced_logprob(
    policy: Policy, prompt: list[int], ids: tuple[int, ...], temperature: float
) -> float:
    sequence = torch.tensor([prompt + list(ids)])
    with torch.no_grad():
        logits = policy.model(input_ids=sequence).logits[0, len(prompt) - 1 : -1] / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).sum().item()


def test_sampled_completions_carry_their_behaviour_logprob(
    policy: Policy, backend: TransformersBackend, prompts: list[list[int]]
) -> None:
    # left-padded batch, some completions finished (EOS counted), some cut at max_new_tokens
    checked = 0
    for temperature, max_new_tokens in [(0.7, 8), (1.5, 3)]:  # the second cuts inside uncertain tokens
        params = SamplingParams(n=3, temperature=temperature, max_new_tokens=max_new_tokens, seed=5)
        groups = backend.generate(prompts, params)
        for prompt, group in zip(prompts, groups, strict=True):
            for generation in group:
                expected = _teacher_forced_logprob(policy, prompt, generation.token_ids, temperature)
                assert generation.logprob == pytest.approx(expected, abs=1e-3)
                checked += 1
    assert checked == 2 * 3 * len(prompts)
    # top-p renormalises over the nucleus: each sampled token is at least as likely as untruncated
    nucleus = backend.generate(
        prompts[:2], SamplingParams(n=4, temperature=1.0, top_p=0.5, max_new_tokens=6, seed=2)
    )
    for prompt, group in zip(prompts[:2], nucleus, strict=True):
        for generation in group:
            assert (
                generation.logprob
                >= _teacher_forced_logprob(policy, prompt, generation.token_ids, 1.0) - 1e-4
            )
    greedy = backend.generate(prompts[:1], SamplingParams(n=1, greedy=True, max_new_tokens=4))
    assert greedy[0][0].logprob is None


def test_held_out_evaluation_uses_the_configured_completion_length(policy: Policy) -> None:
    from types import SimpleNamespace

    from swarmnode.config import NodeConfig
    from swarmnode.node.runtime import NodeRuntime

    seen: list[SamplingParams] = []

    class RecordingBackend(TransformersBackend):
        def generate(self, prompt_ids: list[list[int]], params: SamplingParams):  # type: ignore[override]
            seen.append(params)
            return super().generate(prompt_ids, params)

    cfg = NodeConfig.model_validate({"grpo": {"max_completion_length": 5}, "tasks": {"eval_size": 2}})
    runtime = SimpleNamespace(
        cfg=cfg, policy=policy, backend=RecordingBackend(policy), registry=TaskRegistry("easy")
    )
    accuracy = NodeRuntime.evaluate(runtime)  # type: ignore[arg-type]
    assert 0.0 <= accuracy <= 1.0
    assert [(p.greedy, p.max_new_tokens) for p in seen] == [(True, 5)]


def test_local_rollout_groups_carry_behaviour_logprobs_for_receivers(policy: Policy) -> None:
    from types import SimpleNamespace

    from swarmnode.config import NodeConfig
    from swarmnode.node.loop import Node

    cfg = NodeConfig.model_validate(
        {"sampler": {"local_groups": 2}, "grpo": {"num_generations": 3, "max_completion_length": 6}}
    )
    runtime = SimpleNamespace(
        policy=policy, backend=TransformersBackend(policy), registry=TaskRegistry("easy")
    )
    scored, _ = Node(cfg, runtime=runtime).generate_local(round_index=0)  # type: ignore[arg-type]
    assert len(scored) == 2
    for group in scored:
        rollout = group.group
        assert rollout.behaviour_num_tokens == tuple(len(ids) for ids in group.completion_ids)
        assert rollout.behaviour_logprobs is not None and len(rollout.behaviour_logprobs) == 3
        for logprob, ids in zip(rollout.behaviour_logprobs, group.completion_ids, strict=True):
            expected = _teacher_forced_logprob(policy, list(group.prompt_ids), ids, cfg.grpo.temperature)
            assert logprob == pytest.approx(expected, abs=1e-3)
