"""vLLM generation backend (CUDA): the same ``GenerationBackend`` interface as transformers.

The engine runs in this process beside the trainer's model (colocated, like TRL's "colocate"
mode): it takes ``gpu_memory_utilization`` of the GPU for its weights and KV cache, generates from
prompt token ids (with each completion's behaviour log-prob, ``Generation.logprob``, read from
vLLM's ``cumulative_logprob`` in "processed_logprobs" mode), and after each policy update
``sync_weights()`` pushes the trainer's state_dict into the engine's model and drops the prefix
cache computed with the old weights.

vLLM is imported lazily, only when an engine is built, so this module imports anywhere; tests pass
a fake ``engine_factory``. Only ``Policy.model``, ``Policy.tokenizer`` and ``Policy.model_id`` are
used from the policy.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from swarmnode.policy.backend import Generation, SamplingParams

INSTALL_HINT = (
    "vLLM is not installed: install swarmnode[vllm] in a CUDA environment (or use the image built "
    "from docker/Dockerfile.cuda), or set model.backend = 'transformers'"
)

WeightPairs = Iterable[tuple[str, Any]]


def _import_vllm() -> Any:
    # The engine must run in this process for sync_weights to reach its model directly (V1 engine).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as exc:
        raise RuntimeError(INSTALL_HINT) from exc
    return vllm


def push_weights(engine: Any, weights: WeightPairs) -> str:
    """Load (name, tensor) pairs into the engine's model; return which API path was used.

    Newer vLLM (V1 engine, >= 0.8) exposes ``LLM.apply_model(fn)``, which calls ``fn(model)`` in
    each worker; older versions reach the model through the driver worker. Both end in the model's
    own ``load_weights``, which maps Hugging Face parameter names to vLLM's fused layout.
    """
    weights = list(weights)
    if callable(getattr(engine, "apply_model", None)):
        engine.apply_model(lambda model: model.load_weights(weights))
        path = "apply_model"
    else:
        try:
            model = engine.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError as exc:
            raise RuntimeError(
                "cannot reach the vLLM model to load weights: this vLLM has neither LLM.apply_model nor "
                "llm_engine.model_executor.driver_worker.model_runner.model; use vLLM >= 0.8"
            ) from exc
        model.load_weights(weights)
        path = "driver_worker"
    reset = getattr(engine, "reset_prefix_cache", None)
    if callable(reset):
        reset()  # cached KV blocks were computed with the old weights
    return path


def _torch_dtype_name(model: Any) -> str:
    dtype = str(getattr(model, "dtype", "auto"))  # e.g. "torch.bfloat16"
    name = dtype.removeprefix("torch.")
    return name if name in ("float32", "bfloat16", "float16") else "auto"


def _eos_ids(tokenizer: Any, model: Any) -> set[int]:
    ids: set[int] = set()
    for source in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(i for i in source if isinstance(i, int))
    return ids


class VLLMBackend:
    """Generate with a colocated vLLM engine; ``sync_weights()`` after every optimizer update."""

    name = "vllm"

    def __init__(
        self,
        policy: Any,
        gpu_memory_utilization: float,
        seed: int,
        engine_factory: Callable[..., Any] | None = None,
        *,
        sampling_params_factory: Callable[..., Any] | None = None,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        model_dir: str | Path | None = None,
    ) -> None:
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        self.policy = policy
        self.seed = seed
        self.eos_ids = _eos_ids(policy.tokenizer, policy.model)
        if not self.eos_ids:
            raise ValueError(
                f"the tokenizer of {policy.model_id} has no EOS token; generation could not finish"
            )
        self.eos_id = getattr(policy.tokenizer, "eos_token_id", None)
        if not isinstance(self.eos_id, int):
            self.eos_id = min(self.eos_ids)
        if engine_factory is None:
            vllm = _import_vllm()
            engine_factory = vllm.LLM
            sampling_params_factory = sampling_params_factory or vllm.SamplingParams
        self._make_params = sampling_params_factory or SimpleNamespace
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.engine_kwargs = dict(
            model=str(model_dir) if model_dir else self._export_model(),
            dtype=_torch_dtype_name(policy.model),
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching,
            seed=seed,
            # log-probs of the distribution actually sampled from (temperature and top-p applied), so
            # a completion's cumulative_logprob is its behaviour log-prob (vLLM >= 0.10.2)
            logprobs_mode="processed_logprobs",
        )
        if max_model_len is not None:
            self.engine_kwargs["max_model_len"] = max_model_len
        self.engine = engine_factory(**self.engine_kwargs)
        self.weight_syncs = 0
        self.last_sync_path: str | None = None

    def _export_model(self) -> str:
        """A directory vLLM can load: the model's own folder, or a temporary save of it.

        Saving is also right for embedded models and resumed checkpoints: the engine then starts
        from exactly the trainer's weights.
        """
        source = getattr(getattr(self.policy.model, "config", None), "_name_or_path", "") or ""
        if source and (Path(source) / "config.json").is_file():
            return source
        self._tmp = tempfile.TemporaryDirectory(prefix="swarmnode-vllm-")
        self.policy.model.save_pretrained(self._tmp.name)
        self.policy.tokenizer.save_pretrained(self._tmp.name)
        return self._tmp.name

    def _vllm_params(self, params: SamplingParams, seed: int | None) -> Any:
        if params.greedy:
            return self._make_params(
                n=params.n, temperature=0.0, top_p=1.0, max_tokens=params.max_new_tokens, seed=seed
            )
        return self._make_params(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            seed=seed,
            logprobs=0,  # only the sampled token's log-prob: fills cumulative_logprob
        )

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Generation]]:
        """Return params.n generations for each prompt, in prompt order."""
        if not prompt_ids:
            return []
        # One seed per prompt: identical prompts in one call still get independent samples.
        sampling = [
            self._vllm_params(params, None if params.seed is None else params.seed + i)
            for i in range(len(prompt_ids))
        ]
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        outputs = self.engine.generate(prompts, sampling, use_tqdm=False)
        if len(outputs) != len(prompt_ids):
            raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(prompt_ids)} prompts")
        return [[self._to_generation(out) for out in request.outputs] for request in outputs]

    def _to_generation(self, completion: Any) -> Generation:
        ids = list(completion.token_ids)
        finished = completion.finish_reason == "stop"
        if finished and (not ids or ids[-1] not in self.eos_ids):
            # A stop on EOS may come back without the EOS id; the trainer needs it as a target.
            ids.append(self.eos_id)
        body = ids[:-1] if finished else ids
        text = self.policy.tokenizer.decode(body, skip_special_tokens=True)
        cumulative = getattr(completion, "cumulative_logprob", None)
        logprob = (
            float(cumulative) if isinstance(cumulative, int | float) and math.isfinite(cumulative) else None
        )
        return Generation(text=text, token_ids=tuple(ids), finished=finished, logprob=logprob)

    def sync_weights(self) -> None:
        """Push the trainer model's current weights into the engine."""
        state = self.policy.model.state_dict()
        self.last_sync_path = push_weights(
            self.engine, ((name, tensor.detach()) for name, tensor in state.items())
        )
        self.weight_syncs += 1

    def close(self) -> None:
        """Drop the engine and the temporary model copy (GPU memory is freed with the engine)."""
        self.engine = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
