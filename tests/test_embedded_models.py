"""The shipped tiny models: offline loading, tokenizer faithfulness, heterogeneity, warm-start accuracy."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from swarmnode.config import ModelConfig
from swarmnode.policy.evaluate import greedy_accuracy
from swarmnode.policy.loading import embedded_models, load_policy, resolve_model_path
from swarmnode.policy.transformers_backend import TransformersBackend
from swarmnode.tasks.registry import TaskRegistry

torch.set_num_threads(1)
TINY_MODELS = ["tiny-a", "tiny-b"]


def _folder(name: str) -> Path:
    return Path(resolve_model_path(f"embedded:{name}")[0])


def _sample_texts() -> list[str]:
    questions = [
        t.question for t in TaskRegistry("paper").eval_tasks(27) + TaskRegistry("easy-mix").eval_tasks(10)
    ]
    return questions + ["<answer>-1234</answer>", "Ünïcödé ✓ text\n\twith  spaces", "0123456789"]


def test_both_tiny_models_are_shipped() -> None:
    assert set(TINY_MODELS) <= set(embedded_models())
    for name in TINY_MODELS:
        files = {p.name for p in _folder(name).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "card.json", "README.md"} <= files
        assert (_folder(name) / "model.safetensors").stat().st_size < 8_000_000


@pytest.mark.parametrize("name", TINY_MODELS)
def test_embedded_model_loads_offline(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # No wall-clock bound here: load time on a shared CPU is a benchmark's business, not a test's.
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("loading an embedded model must not touch the network")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    policy = load_policy(ModelConfig(path=f"embedded:{name}"), "cpu")
    assert policy.model_id == name
    assert policy.model.dtype == torch.float32


@pytest.mark.parametrize("name", TINY_MODELS)
def test_auto_tokenizer_ids_equal_raw_tokenizer_json_ids(name: str) -> None:
    auto = AutoTokenizer.from_pretrained(_folder(name))
    raw = Tokenizer.from_file(str(_folder(name) / "tokenizer.json"))
    for text in _sample_texts():
        assert (
            auto.encode(text, add_special_tokens=False) == raw.encode(text, add_special_tokens=False).ids
        ), text


@pytest.mark.parametrize("name", TINY_MODELS)
def test_every_digit_is_its_own_token(name: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(_folder(name))
    ids = tokenizer.encode("9081726354", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in ids] == list("9081726354")


def test_tiny_models_differ_in_architecture_size_and_tokenizer() -> None:
    a, b = (load_policy(ModelConfig(path=f"embedded:{name}"), "cpu") for name in TINY_MODELS)
    assert a.model.config.model_type != b.model.config.model_type
    assert a.model.num_parameters() != b.model.num_parameters()
    assert len(a.tokenizer) != len(b.tokenizer)
    question = TaskRegistry("easy").eval_tasks(1)[0].question
    assert a.encode_prompt(question) != b.encode_prompt(question)
    assert a.encode_completion("<answer>57</answer>", True) != b.encode_completion(
        "<answer>57</answer>", True
    )


@pytest.mark.parametrize("name", TINY_MODELS)
def test_warm_start_accuracy_leaves_signal_and_headroom(name: str) -> None:
    card = json.loads((_folder(name) / "card.json").read_text())
    assert 0.15 <= card["heldout_greedy_accuracy"]["easy"] <= 0.5
    policy = load_policy(ModelConfig(path=f"embedded:{name}"), "cpu")
    accuracy = greedy_accuracy(policy, TransformersBackend(policy), TaskRegistry("easy"), n=card["heldout_n"])
    assert accuracy == pytest.approx(card["heldout_greedy_accuracy"]["easy"], abs=0.05)
