"""Checkpoints: round trip of weights/optimizer/RNG/round, atomic writes, corruption, retention."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from swarmnode.config import GRPOConfig
from swarmnode.rl import checkpoint as ckpt_module
from swarmnode.rl.checkpoint import CheckpointError, load_latest_checkpoint, save_checkpoint
from swarmnode.rl.grpo import GRPOTrainer
from swarmnode.rl.records import RolloutGroup, ScoredGroup
from swarmnode.tasks.reference import TaskRef

torch.set_num_threads(1)


def tiny_model(seed: int = 0, hidden: int = 32) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config)


def groups() -> list[ScoredGroup]:
    rollout = RolloutGroup(
        TaskRef("chain_sum", "d", 0, 0, "0.1.25"), "q", ("a",) * 4, (True,) * 4, "m", 0, 0.0
    )
    completions = ((10, 11, 2), (20, 2), (12, 13, 14), (30, 2))
    return [ScoredGroup(rollout, (1.0, 0.0, 1.0, 0.0), (1, 3, 4), completions)]


def trained_trainer(seed: int = 0) -> GRPOTrainer:
    trainer = GRPOTrainer(tiny_model(seed), GRPOConfig(minibatches=2, learning_rate=1e-2), pad_token_id=0)
    trainer.step(groups())
    return trainer


def draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def snapshot(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip_restores_weights_optimizer_rng_round_and_extra(tmp_path):
    trainer = trained_trainer(seed=0)
    extra = {"sampler": {"seen": [1, 2, 3]}, "reward_mean": 0.5}
    save_checkpoint(tmp_path, 7, trainer.model, trainer.optimizer, extra=extra)
    # what the original run does next: random draws, then a step whose minibatch order uses torch RNG
    expected_draws = draws()
    trainer.step(groups())
    expected_params = [p.detach().clone() for p in trainer.model.parameters()]

    resumed = GRPOTrainer(tiny_model(seed=1), GRPOConfig(minibatches=2, learning_rate=1e-2), pad_token_id=0)
    ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.round == 7 and ckpt.extra == extra
    ckpt.restore(resumed.model, resumed.optimizer)
    assert draws() == expected_draws
    resumed.step(groups())
    for got, want in zip(resumed.model.parameters(), expected_params, strict=True):
        assert torch.equal(got, want)


def test_restored_tied_weights_stay_tied(tmp_path):
    model = tiny_model(seed=0)
    save_checkpoint(tmp_path, 1, model)
    other = tiny_model(seed=1)
    load_latest_checkpoint(tmp_path).restore(other)
    assert torch.equal(other.lm_head.weight, model.lm_head.weight)
    assert other.lm_head.weight.data_ptr() == other.model.embed_tokens.weight.data_ptr()


def test_model_dir_loads_with_from_pretrained_and_tokenizer_is_saved(tmp_path):
    vocab = {"[PAD]": 0, "a": 1, "b": 2}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[PAD]")))
    model = tiny_model()
    save_checkpoint(tmp_path, 3, model, tokenizer=tokenizer)
    ckpt = load_latest_checkpoint(tmp_path)
    loaded = Qwen2ForCausalLM.from_pretrained(ckpt.model_dir)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert PreTrainedTokenizerFast.from_pretrained(ckpt.tokenizer_dir).get_vocab() == vocab


def test_failed_save_leaves_previous_latest_intact(tmp_path, monkeypatch):
    trainer = trained_trainer()
    save_checkpoint(tmp_path, 1, trainer.model, trainer.optimizer)
    before = snapshot(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_module.torch, "save", disk_full)  # fails after the model was written
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 2, trainer.model, trainer.optimizer)
    assert snapshot(tmp_path) == before
    assert load_latest_checkpoint(tmp_path).round == 1


def test_chaos_hold_keeps_the_save_half_written_while_it_waits(tmp_path, monkeypatch):
    seen: list[tuple[float, list[str]]] = []

    def record(seconds: float) -> None:  # what a kill during the hold would leave on disk
        (tmp,) = tmp_path.glob(".tmp-*")
        seen.append((seconds, sorted(p.name for p in tmp.iterdir())))

    monkeypatch.setattr(ckpt_module.time, "sleep", record)
    monkeypatch.setenv(ckpt_module.HOLD_ENV, "99")
    trainer = trained_trainer()
    save_checkpoint(tmp_path, 1, trainer.model, trainer.optimizer)
    assert seen == [(ckpt_module.MAX_HOLD_S, ["model"])]  # capped; optimizer and state not yet written
    assert load_latest_checkpoint(tmp_path).round == 1
    monkeypatch.delenv(ckpt_module.HOLD_ENV)
    save_checkpoint(tmp_path, 2, trainer.model, trainer.optimizer)
    assert len(seen) == 1  # no hold outside a chaos run


def test_leftover_of_a_crashed_save_is_ignored_then_cleaned(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path, 1, model)
    crashed = tmp_path / ".tmp-round-00000002-4242"
    (crashed / "model").mkdir(parents=True)
    (crashed / "model" / "model.safetensors").write_bytes(b"\x00" * 10)
    assert load_latest_checkpoint(tmp_path).round == 1
    save_checkpoint(tmp_path, 2, model)
    assert not crashed.exists()
    assert load_latest_checkpoint(tmp_path).round == 2


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda d: (d / "model" / "model.safetensors").write_bytes(b"trunc"), "model.safetensors"),
        (lambda d: (d / "state.json").write_text("{not json"), "state.json"),
        (lambda d: (d / "rng.json").unlink(), "rng.json"),
    ],
    ids=["truncated-weights", "garbage-state", "missing-file"],
)
def test_corrupt_checkpoint_raises_naming_the_file_and_deletes_nothing(tmp_path, damage, named):
    model = tiny_model()
    save_checkpoint(tmp_path, 1, model)
    newest = save_checkpoint(tmp_path, 2, model)
    damage(newest)
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=rf"{named}.*move .*round-00000002.*round-00000001"):
        load_latest_checkpoint(tmp_path)
    assert snapshot(tmp_path) == before


def test_flipped_bytes_of_same_size_fail_the_checksum(tmp_path):
    newest = save_checkpoint(tmp_path, 1, tiny_model())
    weights = newest / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors does not match its sha256"):
        load_latest_checkpoint(tmp_path)


def test_only_the_last_k_checkpoints_are_kept(tmp_path):
    model = tiny_model()
    for round_ in range(1, 6):
        save_checkpoint(tmp_path, round_, model, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-00000004", "round-00000005"]
    assert load_latest_checkpoint(tmp_path).round == 5


def test_saving_the_same_round_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 4, tiny_model(), extra={"try": 1})
    save_checkpoint(tmp_path, 4, tiny_model(), extra={"try": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["round-00000004"]
    assert load_latest_checkpoint(tmp_path).extra == {"try": 2}


def test_no_checkpoint_gives_none(tmp_path):
    assert load_latest_checkpoint(tmp_path / "missing") is None
    assert load_latest_checkpoint(tmp_path) is None


def test_restoring_into_another_architecture_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path, 1, tiny_model(hidden=32))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_latest_checkpoint(tmp_path).restore(tiny_model(hidden=16))


def test_extra_state_must_be_json(tmp_path):
    with pytest.raises(ValueError, match="not JSON-serializable"):
        save_checkpoint(tmp_path, 1, tiny_model(), extra={"bad": object()})
    assert list(tmp_path.iterdir()) == []


# -- limits, defaults and the failure paths (mutation-tested, issue 13) ---------------------------


def test_round_zero_and_keep_last_one_are_allowed_and_the_default_keeps_three(tmp_path):
    model = tiny_model()
    assert save_checkpoint(tmp_path / "one", 0, model, keep_last=1).name == "round-00000000"
    save_checkpoint(tmp_path / "one", 1, model, keep_last=1)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["round-00000001"]
    for round_ in range(5):
        save_checkpoint(tmp_path / "default", round_, model)
    assert sorted(p.name for p in (tmp_path / "default").iterdir())[0] == "round-00000002"
    assert len(list((tmp_path / "default").iterdir())) == 3
    for bad in ({"round_": -1}, {"round_": 1, "keep_last": 0}):
        with pytest.raises(ValueError):
            save_checkpoint(tmp_path / "bad", model=model, **bad)


def test_a_missing_parent_directory_is_created(tmp_path):
    root = tmp_path / "a" / "b" / "checkpoints"
    save_checkpoint(root, 1, tiny_model())
    assert load_latest_checkpoint(root).round == 1


def test_the_state_file_is_indented_json_with_its_creation_time(tmp_path):
    import time

    before = time.time()
    path = save_checkpoint(tmp_path, 1, tiny_model())
    after = time.time()
    text = (path / "state.json").read_text()
    assert text.startswith('{\n "format": ')  # indent 1: diffable by hand
    assert before <= load_latest_checkpoint(tmp_path).created_at <= after


def test_a_resave_that_fails_at_the_swap_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 4, tiny_model(), extra={"try": 1})
    real_replace = os.replace

    def fail_publishing(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_module.os, "replace", fail_publishing)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 4, tiny_model(), extra={"try": 2})
    monkeypatch.undo()
    assert load_latest_checkpoint(tmp_path).extra == {"try": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-00000004"]  # no tmp or trash left


def test_restoring_into_a_model_with_more_parameters_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path, 1, tiny_model())
    bigger = tiny_model()
    bigger.model.register_parameter("extra_scale", torch.nn.Parameter(torch.ones(3)))
    with pytest.raises(CheckpointError, match=r"missing \['model.extra_scale'\]"):
        load_latest_checkpoint(tmp_path).restore(bigger)


_UNPICKLED: list[int] = []


class _Payload:
    def __reduce__(self):
        return (_UNPICKLED.append, (1,))


def test_the_optimizer_file_is_loaded_without_running_pickled_code(tmp_path):
    import pickle

    trainer = trained_trainer()
    path = save_checkpoint(tmp_path, 1, trainer.model, trainer.optimizer)
    state = trainer.optimizer.state_dict()
    state["payload"] = _Payload()
    torch.save(state, path / "optimizer.pt")  # a hostile file (its checksum no longer matters here)
    checkpoint = ckpt_module.Checkpoint(path=path, round=1)
    trainer = trained_trainer()
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.restore(trainer.model, trainer.optimizer, restore_rng=False)
    assert _UNPICKLED == []


def test_a_short_chaos_hold_is_held_too(tmp_path, monkeypatch):
    held: list[float] = []
    monkeypatch.setattr(ckpt_module.time, "sleep", held.append)
    monkeypatch.setenv(ckpt_module.HOLD_ENV, "0.5")
    save_checkpoint(tmp_path, 1, tiny_model())
    assert held == [0.5]


def test_a_state_file_without_a_creation_time_reads_as_zero(tmp_path):
    import json

    path = save_checkpoint(tmp_path, 1, tiny_model())
    state = json.loads((path / "state.json").read_text())
    del state["created_at"]
    (path / "state.json").write_text(json.dumps(state))  # state.json is not in its own file list
    assert load_latest_checkpoint(tmp_path).created_at == 0.0


class _ShardedModel(Qwen2ForCausalLM):
    """Saves its weights in several safetensors shards, as large models do."""

    def save_pretrained(self, directory, **kwargs):
        return super().save_pretrained(directory, max_shard_size="40KB", **kwargs)


def test_every_weight_shard_is_restored(tmp_path):
    torch.manual_seed(5)
    source = _ShardedModel(tiny_model().config)
    path = save_checkpoint(tmp_path, 1, source)
    assert len(list((path / "model").glob("*.safetensors"))) > 1
    target = tiny_model(seed=9)
    load_latest_checkpoint(tmp_path).restore(target, restore_rng=False)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
