"""The vLLM backend's plumbing, without a GPU: a real tiny transformers model and a fake engine."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from swarmnode.policy.backend import SamplingParams
from swarmnode.policy.vllm_backend import INSTALL_HINT, VLLMBackend, push_weights

torch.set_num_threads(1)
EOS = 1


@pytest.fixture(scope="module")
def policy() -> SimpleNamespace:
    vocab = {"<pad>": 0, "<eos>": EOS} | {f"w{i}": i for i in range(2, 64)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=EOS,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    return SimpleNamespace(model=Qwen2ForCausalLM(config), tokenizer=tokenizer, model_id="test/tiny")


class FakeModel:
    def __init__(self) -> None:
        self.loaded: dict[str, torch.Tensor] = {}

    def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> set[str]:
        self.loaded.update({name: tensor.clone() for name, tensor in weights})
        return set(self.loaded)


class FakeLLM:
    """Stands in for vllm.LLM: scripted completions, records calls and pushed weights."""

    def __init__(self, script: list[tuple[list[int], str]] | None = None, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.model = FakeModel()
        self.script = script or [([5, 6, EOS], "stop"), ([7, 8], "stop"), ([9, 10, 11], "length")]
        self.calls: list[tuple[list[dict], list[Any]]] = []
        self.prefix_resets = 0

    def generate(self, prompts: list[dict], sampling: list[Any], use_tqdm: bool = True) -> list[Any]:
        self.calls.append((prompts, sampling))
        return [
            SimpleNamespace(
                prompt_token_ids=p["prompt_token_ids"],
                outputs=[
                    SimpleNamespace(
                        index=i,
                        token_ids=self.script[i % len(self.script)][0],
                        finish_reason=self.script[i % len(self.script)][1],
                        cumulative_logprob=-1.5 * (i + 1),
                    )
                    for i in range(sp.n)
                ],
            )
            for p, sp in zip(prompts, sampling, strict=True)
        ]

    def apply_model(self, fn: Any) -> list[Any]:
        return [fn(self.model)]

    def reset_prefix_cache(self) -> bool:
        self.prefix_resets += 1
        return True


class LegacyFakeLLM(FakeLLM):
    """Older vLLM: no apply_model; the model hangs off the driver worker."""

    apply_model = None  # type: ignore[assignment]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        runner = SimpleNamespace(model=self.model)
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner))
        )


def make_backend(policy: SimpleNamespace, factory: Any = FakeLLM, **kwargs: Any) -> VLLMBackend:
    return VLLMBackend(policy, gpu_memory_utilization=0.3, seed=7, engine_factory=factory, **kwargs)


def test_engine_is_built_from_an_exported_model_dir_with_configured_memory_share(
    policy: SimpleNamespace,
) -> None:
    backend = make_backend(policy, max_model_len=256)
    kwargs = backend.engine.kwargs
    assert (Path(kwargs["model"]) / "config.json").is_file()
    assert (Path(kwargs["model"]) / "tokenizer.json").is_file()
    assert kwargs["gpu_memory_utilization"] == 0.3
    assert kwargs["dtype"] == "float32"
    assert kwargs["enable_prefix_caching"] is True
    assert kwargs["max_model_len"] == 256 and kwargs["seed"] == 7
    exported = kwargs["model"]
    backend.close()
    assert not Path(exported).exists()


def test_generate_returns_n_generations_per_prompt_in_order_with_eos_rules(policy: SimpleNamespace) -> None:
    backend = make_backend(policy)
    out = backend.generate(
        [[2, 3], [4]], SamplingParams(n=3, temperature=0.9, top_p=0.95, max_new_tokens=5, seed=100)
    )
    assert [len(gens) for gens in out] == [3, 3]
    stop_with_eos, stop_without_eos, truncated = out[0]
    assert stop_with_eos.token_ids == (5, 6, EOS) and stop_with_eos.finished
    assert stop_without_eos.token_ids == (7, 8, EOS) and stop_without_eos.finished  # EOS restored
    assert truncated.token_ids == (9, 10, 11) and not truncated.finished
    assert stop_with_eos.text == policy.tokenizer.decode([5, 6]) == "w5 w6"
    assert "<eos>" not in stop_without_eos.text
    prompts, sampling = backend.engine.calls[0]
    assert prompts == [{"prompt_token_ids": [2, 3]}, {"prompt_token_ids": [4]}]
    assert [(s.n, s.temperature, s.top_p, s.max_tokens) for s in sampling] == [(3, 0.9, 0.95, 5)] * 2
    # behaviour log-probs: the sampled tokens' log-probs after temperature and top-p
    assert [s.logprobs for s in sampling] == [0, 0]
    assert backend.engine.kwargs["logprobs_mode"] == "processed_logprobs"
    assert [g.logprob for g in out[0]] == [-1.5, -3.0, -4.5]
    assert [s.seed for s in sampling] == [100, 101]  # one seed per prompt


def test_greedy_maps_to_temperature_zero_and_no_seed_stays_unseeded(policy: SimpleNamespace) -> None:
    backend = make_backend(policy)
    backend.generate([[2]], SamplingParams(n=1, temperature=1.3, top_p=0.5, greedy=True))
    (params,) = backend.engine.calls[0][1]
    assert (params.temperature, params.top_p, params.seed) == (0.0, 1.0, None)
    assert backend.generate([], SamplingParams()) == []


def test_sync_weights_pushes_the_trainers_current_state_dict(policy: SimpleNamespace) -> None:
    backend = make_backend(policy)
    with torch.no_grad():
        policy.model.model.norm.weight.add_(0.5)  # one "update"
    backend.sync_weights()
    loaded = backend.engine.model.loaded
    state = policy.model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert torch.equal(loaded["model.norm.weight"], state["model.norm.weight"])
    assert backend.engine.prefix_resets == 1
    assert (backend.last_sync_path, backend.weight_syncs) == ("apply_model", 1)


def test_sync_weights_uses_the_driver_worker_path_on_older_vllm(policy: SimpleNamespace) -> None:
    backend = make_backend(policy, factory=LegacyFakeLLM)
    backend.sync_weights()
    assert backend.last_sync_path == "driver_worker"
    assert set(backend.engine.model.loaded) == set(policy.model.state_dict())


def test_push_weights_explains_an_engine_it_cannot_reach() -> None:
    with pytest.raises(RuntimeError, match="use vLLM >= 0.8"):
        push_weights(object(), [("w", torch.zeros(1))])


def test_missing_vllm_gives_an_actionable_error(
    policy: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(RuntimeError, match=r"install swarmnode\[vllm\] in a CUDA environment"):
        VLLMBackend(policy, gpu_memory_utilization=0.3, seed=0)
    assert "CUDA" in INSTALL_HINT


def test_memory_share_outside_zero_one_is_rejected(policy: SimpleNamespace) -> None:
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMBackend(policy, 1.5, 0, engine_factory=FakeLLM)
