"""GPU placement of simulated nodes, tested on faked hardware (lists of fake GPUs, a fake torch.cuda)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from swarmnode.config import ConfigError, config_from_dict
from swarmnode.policy.hardware import Hardware, choose_runtime, vllm_memory_utilization
from swarmnode.sim.experiment import load_experiment, parse_experiment
from swarmnode.sim.launcher import plan_for, preflight_experiment, prepare_nodes
from swarmnode.sim.placement import (
    Gpu,
    PlacementError,
    PlacementSpec,
    detect_gpus,
    parse_placement,
    plan_placement,
    where_node_ran,
)


def fake_gpus(count: int, memory_gb: float = 80.0) -> list[Gpu]:
    return [Gpu(i, str(i), "Fake H100", memory_gb) for i in range(count)]


def gpu_hardware(memory_gb: float = 80.0, vllm: bool = True) -> Hardware:
    return Hardware("cuda", "Fake H100", memory_gb, 16, 256.0, vllm, True)


def spec(**placement: object) -> PlacementSpec:
    return parse_placement(dict(placement), [], 32)


def test_one_node_per_gpu_each_sees_only_its_own():
    plan = plan_placement(spec(strategy="round-robin", nodes_per_gpu=1), 8, fake_gpus(8))
    assert [p.environment()["CUDA_VISIBLE_DEVICES"] for p in plan] == [str(i) for i in range(8)]
    assert all(p.sharing == 1 and p.memory_fraction == pytest.approx(0.95) for p in plan)
    assert plan[3].config_overrides() == {"device": "cuda", "gpu_memory_fraction": 0.95}


def test_round_robin_and_pack_share_gpus_and_split_memory():
    plan = plan_placement(spec(strategy="round-robin"), 5, fake_gpus(2))
    assert [p.device for p in plan] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert [p.sharing for p in plan] == [3, 2, 3, 2, 3]
    packed = plan_placement(spec(strategy="pack", nodes_per_gpu=2), 5, fake_gpus(3))
    assert [p.device for p in packed] == ["cuda:0", "cuda:0", "cuda:1", "cuda:1", "cuda:2"]
    for gpus in (plan, packed):
        for ordinal in {p.gpu.ordinal for p in gpus}:
            mine = [p for p in gpus if p.gpu.ordinal == ordinal]
            assert sum(p.memory_fraction for p in mine) <= 0.95 + 1e-9
            assert all(p.memory_fraction <= 1 / len(mine) for p in mine)


def test_too_few_gpus_names_what_is_needed_and_found():
    with pytest.raises(PlacementError, match=r"GPUs: need 8 \(8 node\(s\), 1 per GPU\), found 2"):
        plan_placement(spec(nodes_per_gpu=1), 8, fake_gpus(2))
    with pytest.raises(PlacementError, match=r"GPUs: need 4 \(placement.gpus = 4\), found 0"):
        plan_placement(spec(gpus=4), 4, [])
    with pytest.raises(PlacementError, match=r"names GPU\(s\) \[5\]"):
        plan_placement(spec(gpus=[0, 5]), 2, fake_gpus(2))


def test_explicit_devices_and_fractions_leave_the_rest_to_the_others():
    experiment = parse_experiment(
        {
            "nodes": 3,
            "rounds": 1,
            "placement": {"gpus": [1, 2]},
            "node": [
                {"index": 0, "device": "cuda:0", "memory_fraction": 0.6},
                {"index": 2, "device": "cuda:0"},
                {"index": 1, "device": "cpu"},
            ],
        }
    )
    plan = plan_placement(experiment.placement, 3, fake_gpus(3))
    assert [p.device for p in plan] == ["cuda:0", "cpu", "cuda:0"]
    assert plan[0].memory_fraction == pytest.approx(0.6)
    assert plan[2].memory_fraction == pytest.approx(0.35)  # 1 - 0.05 headroom - 0.6
    assert plan[1].environment() == {"CUDA_VISIBLE_DEVICES": ""} and plan[1].config_overrides() == {}
    over = parse_placement(
        {},
        [
            {"index": 0, "device": "cuda:0", "memory_fraction": 0.7},
            {"index": 1, "device": "cuda:0", "memory_fraction": 0.5},
        ],
        2,
    )
    with pytest.raises(PlacementError, match="adds up to more than 1"):
        plan_placement(over, 2, fake_gpus(1))
    with pytest.raises(PlacementError, match="pinned to cuda:3"):
        plan_placement(parse_placement({}, [{"index": 0, "device": "cuda:3"}], 1), 1, fake_gpus(2))


def test_without_gpus_nodes_run_on_cpu_unless_they_ask_for_cuda():
    plan = plan_placement(PlacementSpec(), 3, [])
    assert all(p.gpu is None and p.environment() == {"CUDA_VISIBLE_DEVICES": ""} for p in plan)
    with pytest.raises(PlacementError, match="node 1 sets device = 'cuda' but is placed on CPU"):
        plan_placement(PlacementSpec(), 3, [], {1: "cuda"})
    # strategy "cpu" hides the GPUs of a GPU machine
    assert all(p.gpu is None for p in plan_placement(spec(strategy="cpu"), 2, fake_gpus(2)))


@pytest.mark.parametrize(
    ("placement", "node", "message"),
    [
        ({"strategy": "spread"}, {}, "placement.strategy must be one of"),
        ({"gpu": 2}, {}, "unknown .placement. keys"),
        ({"gpus": 0}, {}, "placement.gpus must be"),
        ({"memory_headroom": 0.7}, {}, "memory_headroom must be in"),
        ({}, {"device": "gpu1"}, "device must be 'cpu' or 'cuda:N'"),
        ({}, {"memory_fraction": 1.5}, "memory_fraction must be in"),
        ({}, {"resources": {"node_a": -1}}, "resources must map"),
        ({}, {"devices": "cpu"}, "unknown keys"),
    ],
)
def test_placement_errors_name_the_key(placement, node, message):
    with pytest.raises(ConfigError, match=message):
        parse_experiment({"nodes": 2, "rounds": 1, "placement": placement, "node": [{"index": 0, **node}]})


@pytest.mark.parametrize("sharing", [1, 2, 3, 8])
def test_auto_config_never_hands_nodes_on_one_gpu_its_whole_memory(sharing):
    """k nodes on one GPU: their vLLM engines and training budgets together stay within the GPU."""
    plan = plan_placement(spec(), sharing, fake_gpus(1))
    hw = gpu_hardware()
    vllm_total, training_total = 0.0, 0.0
    for p in plan:
        cfg = config_from_dict({**p.config_overrides(), "model": {"backend": "vllm"}})
        choice = choose_runtime(hw, cfg)
        assert choice.gpu_memory_fraction <= 1 / sharing
        assert choice.vllm_memory_utilization == vllm_memory_utilization(cfg)
        vllm_total += choice.vllm_memory_utilization
        training_total += choice.gpu_memory_fraction
    assert training_total <= 1.0 and vllm_total < training_total


def test_transformers_batch_is_sized_from_the_nodes_share_of_the_gpu():
    # A 2 GB model on a 24 GB GPU: alone it has room for many sequences; 4 nodes sharing have not.
    hw = gpu_hardware(memory_gb=24.0, vllm=False)
    base = {"device": "cuda", "model": {"path": "some-org/model-1B"}, "sampler": {"local_groups": 8}}
    alone = choose_runtime(hw, config_from_dict(base))
    shared = choose_runtime(hw, config_from_dict({**base, "gpu_memory_fraction": 0.2375}))
    assert alone.generation_batch_size == 8
    assert shared.generation_batch_size < alone.generation_batch_size
    assert any("gpu_memory_fraction" in reason for reason in shared.reasons)


def test_detect_gpus_keeps_the_launchers_own_visible_devices(monkeypatch):
    import torch

    class Props:
        def __init__(self, ordinal: int) -> None:
            self.name, self.total_memory = f"Fake {ordinal}", 40 * 2**30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", Props)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    gpus = detect_gpus()
    assert [(g.ordinal, g.visible_id, g.name, g.memory_gb) for g in gpus] == [
        (0, "3", "Fake 0", 40.0),
        (1, "5", "Fake 1", 40.0),
    ]
    plan = plan_placement(PlacementSpec(), 2, gpus)
    assert [p.environment()["CUDA_VISIBLE_DEVICES"] for p in plan] == ["3", "5"]


def test_prepared_nodes_get_their_device_share_and_a_placement_record(tmp_path: Path):
    experiment = parse_experiment({"nodes": 3, "rounds": 1, "placement": {"nodes_per_gpu": 2}})
    configuration = experiment.configurations[0]
    placements = plan_for(experiment, configuration, fake_gpus(2))
    paths = prepare_nodes(experiment, configuration, 0, tmp_path, placements)
    configs = [tomllib.loads(p.read_text()) for p in paths]
    assert [c["device"] for c in configs] == ["cuda", "cuda", "cuda"]
    assert [c["gpu_memory_fraction"] for c in configs] == [0.475, 0.95, 0.475]
    record = json.loads((tmp_path / "node-1" / "placement.json").read_text())
    assert (
        record["device"] == "cuda:1"
        and record["cuda_visible_devices"] == "1"
        and record["launcher"] == "local"
    )
    assert where_node_ran(tmp_path / "node-2").endswith("cuda:0 (48% mem)")
    assert where_node_ran(tmp_path / "node-1").endswith(" cuda:1 (95% mem)")
    assert where_node_ran(tmp_path / "missing") == "?"


def test_paper_gpu_preflight_lists_everything_missing_in_one_message():
    experiment = load_experiment("builtin:paper-gpu")
    assert experiment.nodes == 8 and experiment.rounds == 2000
    assert [c.name for c in experiment.configurations] == ["8/0", "6/2", "4/4", "2/6"]
    cfg = experiment.node_config(experiment.configurations[2], 0, 0, Path("/x"))
    assert (
        cfg.tasks.preset,
        cfg.grpo.num_generations,
        cfg.grpo.epsilon,
        cfg.grpo.epsilon_high,
        cfg.grpo.beta,
    ) == ("paper", 8, 0.2, 0.28, 0.0)
    assert cfg.sampler.local_groups + cfg.sampler.external_groups == 8
    with pytest.raises(ConfigError) as caught:
        preflight_experiment(experiment, list(experiment.configurations), [])
    message = str(caught.value)
    assert "GPUs: need 8 (placement.gpus = 8), found 0" in message
    assert "model weights: Qwen/Qwen2.5-0.5B-Instruct is not in the local Hugging Face cache" in message
    assert ("vLLM: not installed" in message) == (importlib.util.find_spec("vllm") is None)
    # With 8 GPUs, the GPU line is gone; a local copy of the weights removes the weights line.
    with pytest.raises(ConfigError) as caught:
        preflight_experiment(experiment, list(experiment.configurations), fake_gpus(8))
    assert "GPUs" not in str(caught.value)


def test_simulate_paper_gpu_on_a_cpu_machine_fails_fast_with_one_message(tmp_path: Path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the paper-gpu preflight is tested for a CPU machine")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}  # an empty HF cache
    done = subprocess.run(
        [sys.executable, "-m", "swarmnode", "simulate", "builtin:paper-gpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("swarmnode simulate:") == 1 and "Traceback" not in done.stderr
    assert "GPUs: need 8" in done.stderr and "found 0" in done.stderr
    assert "hf download Qwen/Qwen2.5-0.5B-Instruct" in done.stderr
    assert not out.exists()  # nothing was started or written
