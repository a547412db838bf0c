"""Held-out accuracy per dataset, live and from a simulation node's checkpoint on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from swarmnode.config import ModelConfig, NodeConfig, config_from_dict
from swarmnode.policy.evaluate import greedy_accuracy, greedy_accuracy_by_dataset
from swarmnode.policy.loading import load_policy
from swarmnode.policy.transformers_backend import TransformersBackend
from swarmnode.rl.checkpoint import save_checkpoint
from swarmnode.sim import checkpoint_eval
from swarmnode.tasks.registry import TaskRegistry

torch.set_num_threads(1)


def test_accuracy_by_dataset_splits_the_same_questions_as_the_overall_figure() -> None:
    policy = load_policy(ModelConfig(path="embedded:tiny-a"), "cpu")
    backend, registry = TransformersBackend(policy), TaskRegistry("easy-mix")
    split = greedy_accuracy_by_dataset(policy, backend, registry, n=40)
    assert set(split) == {"chain_sum", "basic_arithmetic", "all"}
    assert split["all"] == pytest.approx(greedy_accuracy(policy, backend, registry, n=40))
    # round-robin over the two datasets: 20 questions each, so "all" is their plain mean
    assert split["all"] == pytest.approx((split["chain_sum"] + split["basic_arithmetic"]) / 2)
    assert split["chain_sum"] != split["basic_arithmetic"]  # tiny-a was warm-started on chain_sum only


def write_node(node_dir: Path) -> NodeConfig:
    cfg = config_from_dict(
        {
            "model": {"path": "embedded:tiny-a"},
            "tasks": {
                "mix": [
                    {"dataset": "chain_sum", "config": {"min_terms": 2, "max_terms": 2, "max_digits": 1}}
                ],
                "verify_extra": [{"dataset": "basic_arithmetic", "config": {"min_terms": 2, "max_terms": 2}}],
                "eval_size": 20,
            },
        }
    )
    node_dir.mkdir(parents=True)
    (node_dir / "node.toml").write_text(cfg.to_toml())
    return cfg


def test_a_nodes_checkpoint_is_evaluated_per_dataset_and_its_initial_model_on_request(tmp_path: Path) -> None:
    node_dir = tmp_path / "sim" / "runs" / "4-4" / "seed-0" / "node-1"
    write_node(node_dir)
    untrained = checkpoint_eval.node_accuracy_by_dataset(node_dir)  # no checkpoint yet: the start model
    assert untrained["checkpoint_round"] == 0 and untrained["samples"] == ["chain_sum"]
    assert set(untrained["accuracy"]) == {"chain_sum", "basic_arithmetic", "all"}

    policy = load_policy(ModelConfig(path="embedded:tiny-a", dtype="float32"), "cpu")
    with torch.no_grad():  # a checkpoint that cannot answer anything: every weight zeroed
        for parameter in policy.model.parameters():
            parameter.zero_()
    save_checkpoint(node_dir / "checkpoints", 7, policy.model)
    restored = checkpoint_eval.node_accuracy_by_dataset(node_dir)
    assert restored["checkpoint_round"] == 7
    assert restored["accuracy"] == {"chain_sum": 0.0, "basic_arithmetic": 0.0, "all": 0.0}
    initial = checkpoint_eval.node_accuracy_by_dataset(node_dir, initial=True)
    assert initial == untrained

    out = tmp_path / "rows.json"
    assert checkpoint_eval.main([str(tmp_path / "sim"), "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert (row["configuration"], row["seed"], row["node"], row["checkpoint_round"]) == (
        "4-4",
        "seed-0",
        "node-1",
        7,
    )
    assert checkpoint_eval.main([str(tmp_path / "nothing-here")]) == 2
