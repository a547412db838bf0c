"""Auto-config decisions on faked hardware, and detection on the real machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarmnode.config import ConfigError, NodeConfig, config_from_dict
from swarmnode.policy.hardware import (
    Hardware,
    choose_runtime,
    detect_hardware,
    estimate_model_bytes,
)

CPU_LAPTOP = Hardware("cpu", None, 0.0, cpu_count=8, ram_gb=16.0, vllm_available=False, bf16_supported=False)
H100_WITH_VLLM = Hardware("cuda", "NVIDIA H100", 79.6, 16, 128.0, vllm_available=True, bf16_supported=True)
T4_NO_VLLM = Hardware("cuda", "Tesla T4", 14.6, 4, 32.0, vllm_available=False, bf16_supported=False)
APPLE = Hardware("mps", None, 0.0, 10, 32.0, vllm_available=False, bf16_supported=False)


def cfg(**tree: object) -> NodeConfig:
    return config_from_dict(tree)


def test_detect_hardware_describes_this_cpu_machine() -> None:
    hw = detect_hardware()
    assert hw.device in ("cpu", "cuda", "mps")
    assert hw.cpu_count >= 1
    assert hw.ram_gb > 0
    if hw.device == "cpu":
        assert hw.gpu_name is None and hw.gpu_mem_gb == 0.0


def test_cuda_with_vllm_picks_vllm_bf16_and_whole_round_batches() -> None:
    choice = choose_runtime(H100_WITH_VLLM, cfg(model={"path": "Qwen/Qwen2.5-0.5B-Instruct"}))
    assert (choice.device, choice.dtype, choice.backend) == ("cuda", "bfloat16", "vllm")
    assert choice.generation_batch_size == 8  # all local_groups in one call
    assert any("vLLM installed" in r for r in choice.reasons)


def test_cuda_without_vllm_or_bf16_falls_back_to_transformers_fp16() -> None:
    choice = choose_runtime(T4_NO_VLLM, cfg(model={"path": "Qwen/Qwen2.5-0.5B-Instruct"}))
    assert (choice.device, choice.dtype, choice.backend) == ("cuda", "float16", "transformers")
    assert 1 <= choice.generation_batch_size <= 8
    assert choice.threads == 4


def test_cpu_tiny_model_uses_float32_one_thread_and_64_sequence_batches() -> None:
    choice = choose_runtime(CPU_LAPTOP, cfg())
    assert (choice.device, choice.dtype, choice.backend, choice.threads) == (
        "cpu",
        "float32",
        "transformers",
        1,
    )
    assert choice.generation_batch_size == 64 // 8


def test_cpu_large_model_uses_all_but_one_core() -> None:
    choice = choose_runtime(CPU_LAPTOP, cfg(model={"path": "Qwen/Qwen2.5-7B-Instruct"}))
    assert choice.threads == 7


def test_mps_trains_in_float32_with_transformers() -> None:
    choice = choose_runtime(APPLE, cfg())
    assert (choice.device, choice.dtype, choice.backend) == ("mps", "float32", "transformers")


def test_explicit_values_override_every_auto_choice() -> None:
    choice = choose_runtime(
        H100_WITH_VLLM,
        cfg(device="cpu", threads=3, model={"dtype": "bfloat16", "backend": "transformers"}),
    )
    assert (choice.device, choice.dtype, choice.backend, choice.threads) == (
        "cpu",
        "bfloat16",
        "transformers",
        3,
    )
    assert all("set in config" in r for r in choice.reasons if not r.startswith("generation batch"))


def test_explicit_transformers_backend_on_cuda_with_vllm_is_honoured() -> None:
    choice = choose_runtime(H100_WITH_VLLM, cfg(model={"backend": "transformers"}))
    assert choice.backend == "transformers"


@pytest.mark.parametrize(
    ("hw", "tree", "expected"),
    [
        (CPU_LAPTOP, {"device": "cuda"}, "no CUDA device"),
        (CPU_LAPTOP, {"model": {"backend": "vllm"}}, "needs a CUDA GPU"),
        (T4_NO_VLLM, {"model": {"backend": "vllm"}}, "install swarmnode[vllm]"),
        (T4_NO_VLLM, {"model": {"dtype": "bfloat16"}}, "no bfloat16 support"),
    ],
)
def test_impossible_requests_raise_a_config_error_saying_what_to_change(
    hw: Hardware, tree: dict, expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        choose_runtime(hw, cfg(**tree))


def test_estimate_model_bytes_measures_dirs_and_guesses_hub_names(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    assert estimate_model_bytes(str(tmp_path)) == 1000
    assert estimate_model_bytes("embedded:tiny-a") < 64 * 2**20
    assert estimate_model_bytes("example-org/Made-Up-1.5B-Instruct") == int(1.5e9 * 2)
    assert estimate_model_bytes("someorg/no-size-here") is None
