"""Hardware detection and the runtime choices that follow from it.

``detect_hardware()`` looks at the machine once (CUDA / MPS / CPU, memory, whether vLLM is
installed). ``choose_runtime(hw, cfg)`` is a pure function of that description and the node config:
it picks device, dtype, generation backend, generation batch size and torch threads, and says why
for each choice. Explicit config values (``device``, ``model.dtype``, ``model.backend``,
``threads``) always win over the automatic choice; a request the machine cannot honour (vLLM
without CUDA, CUDA without a GPU) is a ``ConfigError`` that says what to change.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from swarmnode.config import ConfigError, NodeConfig
from swarmnode.policy.loading import EMBEDDED_PREFIX

# A model this small (embedded tiny models) runs fastest on one thread, even alone on a machine.
SMALL_MODEL_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Hardware:
    device: str  # best accelerator present: "cuda", "mps" or "cpu"
    gpu_name: str | None
    gpu_mem_gb: float  # total memory of GPU 0 (0 without CUDA)
    cpu_count: int  # CPUs this process may run on
    ram_gb: float
    vllm_available: bool
    bf16_supported: bool  # the accelerator computes in bfloat16 natively


@dataclass(frozen=True)
class RuntimeChoice:
    device: str
    dtype: str  # "float32", "bfloat16" or "float16"
    backend: str  # "transformers" or "vllm"
    generation_batch_size: int  # prompts per generate() call
    threads: int  # torch intra-op threads
    reasons: list[str] = field(default_factory=list)
    # Share of the GPU's memory this node may use, and the part of it given to vLLM (0 without vLLM).
    gpu_memory_fraction: float = 1.0
    vllm_memory_utilization: float = 0.0


def detect_hardware() -> Hardware:
    """Describe this machine. Imports torch; never initialises anything beyond a device query."""
    import torch

    gpu_name, gpu_mem_gb, bf16 = None, 0.0, False
    if torch.cuda.is_available():
        device = "cuda"
        props = torch.cuda.get_device_properties(0)
        gpu_name, gpu_mem_gb = props.name, props.total_memory / 2**30
        bf16 = bool(torch.cuda.is_bf16_supported())
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device = "mps"
    else:
        device = "cpu"
    return Hardware(
        device=device,
        gpu_name=gpu_name,
        gpu_mem_gb=round(gpu_mem_gb, 1),
        cpu_count=_cpu_count(),
        ram_gb=round(_ram_bytes() / 2**30, 1),
        vllm_available=importlib.util.find_spec("vllm") is not None,
        bf16_supported=bf16,
    )


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity API
        return os.cpu_count() or 1


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def estimate_model_bytes(model_path: str) -> int | None:
    """Size of the model's weights on disk, or None when it cannot be told without downloading.

    Embedded models are tiny; a local directory is measured; a hub id is measured in the local
    Hugging Face cache, else guessed from a size in its name ("Qwen2.5-0.5B" -> 0.5e9 x 2 bytes).
    """
    if model_path.startswith(EMBEDDED_PREFIX):
        return 8 * 2**20
    local = Path(model_path).expanduser()
    if local.is_dir():
        return _weights_bytes(local)
    cached = _hub_cache_dir(model_path)
    if cached is not None:
        size = _weights_bytes(cached)
        if size:
            return size
    match = re.search(r"(\d+(?:\.\d+)?)\s*([bBmM])(?![a-zA-Z])", model_path.rsplit("/", 1)[-1])
    if match:
        scale = 1e9 if match.group(2).lower() == "b" else 1e6
        return int(float(match.group(1)) * scale * 2)  # 16-bit weights
    return None


def _weights_bytes(directory: Path) -> int:
    patterns = ("*.safetensors", "*.bin", "*.pt", "*.pth")
    return sum(p.stat().st_size for pattern in patterns for p in directory.rglob(pattern) if p.is_file())


def _hub_cache_dir(repo_id: str) -> Path | None:
    """The snapshot folder of a hub model in the local cache, without touching the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an invalid repo id raises a validation error
        return None
    return Path(found).parent if isinstance(found, str) else None


def choose_runtime(hw: Hardware, cfg: NodeConfig) -> RuntimeChoice:
    """Pick device, dtype, backend, batch size and threads for ``cfg`` on ``hw``; explain each."""
    reasons: list[str] = []

    if cfg.device == "auto":
        device = hw.device
        reasons.append(
            f"device {device}: best accelerator found" + (f" ({hw.gpu_name})" if hw.gpu_name else "")
        )
    else:
        device = cfg.device
        if device in ("cuda", "mps") and hw.device != device:
            raise ConfigError(
                f"device = {device!r} was requested but this machine has no {device.upper()} device "
                f"(found {hw.device}); set device = 'auto' or 'cpu' (flag --device)"
            )
        reasons.append(f"device {device}: set in config")

    model_bytes = estimate_model_bytes(cfg.model.path)
    small_model = model_bytes is not None and model_bytes <= SMALL_MODEL_BYTES

    dtype = _choose_dtype(hw, cfg, device, reasons)
    backend = _choose_backend(hw, cfg, device, reasons)
    batch = _choose_batch_size(hw, cfg, device, backend, model_bytes, reasons)
    threads = _choose_threads(hw, cfg, device, small_model, reasons)
    fraction = cfg.gpu_memory_fraction if device == "cuda" else 1.0
    vllm_share = vllm_memory_utilization(cfg) if backend == "vllm" else 0.0
    if device == "cuda" and fraction < 1.0:
        reasons.append(
            f"GPU memory {fraction:.0%} of {hw.gpu_mem_gb:.0f} GiB: gpu_memory_fraction (the GPU is shared)"
            + (f", vLLM gets {vllm_share:.0%} of the GPU" if backend == "vllm" else "")
        )
    return RuntimeChoice(device, dtype, backend, batch, threads, reasons, fraction, vllm_share)


def vllm_memory_utilization(cfg: NodeConfig) -> float:
    """vLLM's ``gpu_memory_utilization``: its share of the node's part of the GPU, as a share of the GPU.

    With k nodes on one GPU each node's ``gpu_memory_fraction`` is at most 1/k, so k engines never
    ask for the same GPU's memory twice.
    """
    return round(cfg.model.gpu_memory_utilization * cfg.gpu_memory_fraction, 4)


def limit_gpu_memory(choice: RuntimeChoice) -> bool:
    """Cap this process's CUDA caching allocator at the node's share of the GPU; True when capped.

    Only with the transformers backend: vLLM sizes its own pools from ``gpu_memory_utilization``
    and a cap underneath it would break its memory profiling.
    """
    if choice.device != "cuda" or choice.gpu_memory_fraction >= 1.0 or choice.backend == "vllm":
        return False
    import torch

    torch.cuda.set_per_process_memory_fraction(choice.gpu_memory_fraction)
    return True


def _choose_dtype(hw: Hardware, cfg: NodeConfig, device: str, reasons: list[str]) -> str:
    if cfg.model.dtype != "auto":
        if cfg.model.dtype == "bfloat16" and device == "cuda" and not hw.bf16_supported:
            raise ConfigError(
                f"model.dtype = 'bfloat16' but the GPU ({hw.gpu_name}) has no bfloat16 support; "
                "use 'float16' or 'auto'"
            )
        if cfg.model.dtype != "float32" and device == "cpu":
            reasons.append(f"dtype {cfg.model.dtype}: set in config (slower than float32 on most CPUs)")
        else:
            reasons.append(f"dtype {cfg.model.dtype}: set in config")
        return cfg.model.dtype
    if device == "cuda":
        dtype = "bfloat16" if hw.bf16_supported else "float16"
        reasons.append(
            f"dtype {dtype}: " + ("GPU supports bfloat16" if hw.bf16_supported else "GPU lacks bfloat16")
        )
        return dtype
    # Training in float16 without loss scaling is unstable; MPS and CPU train in float32.
    reasons.append(f"dtype float32: training on {device}")
    return "float32"


def _choose_backend(hw: Hardware, cfg: NodeConfig, device: str, reasons: list[str]) -> str:
    requested = cfg.model.backend
    if requested == "vllm":
        if device != "cuda":
            raise ConfigError(
                f"model.backend = 'vllm' needs a CUDA GPU, but the device is {device}; "
                "set model.backend = 'auto' or 'transformers' (flag --backend)"
            )
        if not hw.vllm_available:
            raise ConfigError(
                "model.backend = 'vllm' but vLLM is not installed: install swarmnode[vllm] in a CUDA "
                "environment (or use the CUDA image docker/Dockerfile.cuda), or set model.backend = 'auto'"
            )
        reasons.append("backend vllm: set in config")
        return "vllm"
    if requested == "transformers":
        reasons.append("backend transformers: set in config")
        return "transformers"
    if device == "cuda" and hw.vllm_available:
        reasons.append("backend vllm: CUDA device and vLLM installed")
        return "vllm"
    why = "vLLM not installed" if device == "cuda" else f"vLLM needs CUDA, device is {device}"
    reasons.append(f"backend transformers: {why}")
    return "transformers"


def _choose_batch_size(
    hw: Hardware, cfg: NodeConfig, device: str, backend: str, model_bytes: int | None, reasons: list[str]
) -> int:
    prompts = max(1, cfg.sampler.local_groups)
    G = cfg.grpo.num_generations
    if backend == "vllm":
        reasons.append(f"generation batch {prompts} prompts: vLLM schedules all of a round's prompts itself")
        return prompts
    if device == "cuda":
        # Left after weights, gradients and Adam state (~4x the weights in the training dtype).
        weights_gb = (model_bytes or 2 * 2**30) / 2**30
        # Only the node's share of the GPU counts: other nodes may be placed on the same one.
        spare_gb = max(hw.gpu_mem_gb * cfg.gpu_memory_fraction - 4 * weights_gb, 1.0)
        sequences = int(spare_gb * 32)  # ~32 sequences of a few hundred tokens per GiB for <1B models
        size = max(1, min(prompts, sequences // G))
        reasons.append(
            f"generation batch {size} prompts: ~{spare_gb:.0f} GiB GPU memory spare after training state"
        )
        return size
    # CPU / MPS: bounded by memory bandwidth; 64 sequences per call keeps latency low.
    size = max(1, min(prompts, 64 // G))
    reasons.append(f"generation batch {size} prompts: {device} generates ~64 sequences per call efficiently")
    return size


def _choose_threads(hw: Hardware, cfg: NodeConfig, device: str, small_model: bool, reasons: list[str]) -> int:
    if "threads" in cfg.model_fields_set:
        reasons.append(f"threads {cfg.threads}: set in config")
        return cfg.threads
    if device != "cpu":
        threads = min(4, hw.cpu_count)
        reasons.append(f"threads {threads}: the accelerator does the heavy work")
    elif small_model:
        threads = 1
        reasons.append("threads 1: a tiny model gains nothing from more threads")
    else:
        threads = max(1, min(16, hw.cpu_count - 1))
        reasons.append(f"threads {threads}: a larger model on CPU uses all but one core")
    return threads
