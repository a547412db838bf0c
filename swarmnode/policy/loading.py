"""Load a policy (causal LM + tokenizer) from ``embedded:<name>``, a local directory, or a hub id.

The embedded tiny models ship inside the package (``swarmnode/policy/embedded/<name>/``) and load
offline in well under a second. Hub ids work only where the hub is reachable or the model is in
the local cache; otherwise the error says to pass a local path.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from swarmnode.config import ModelConfig
from swarmnode.policy.chat import DEFAULT_SYSTEM_PROMPT, prompt_text

EMBEDDED_PREFIX = "embedded:"


class ModelLoadError(RuntimeError):
    """The model or its tokenizer cannot be loaded; the message says what to pass instead."""


@dataclass
class Policy:
    model: PreTrainedModel
    tokenizer: Any  # a transformers tokenizer
    model_id: str  # announced to peers
    device: torch.device
    system_prompt: str | None
    stop_token_ids: tuple[int, ...]  # generation ends at any of these; the first is the tokenizer's EOS

    @property
    def eos_token_id(self) -> int:
        return self.stop_token_ids[0]

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.eos_token_id if pad is None else pad

    def encode_prompt(self, question: str) -> list[int]:
        """Token ids of the chat-formatted prompt for `question`, ending where the answer starts."""
        text = prompt_text(self.tokenizer, question, self.system_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_completion(self, text: str, finished: bool) -> list[int]:
        """Re-tokenize a completion (e.g. another node's text); EOS appended when it finished."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ids + [self.eos_token_id] if finished else ids

    def decode(self, ids: list[int] | tuple[int, ...]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def embedded_models() -> list[str]:
    root = importlib.resources.files("swarmnode.policy") / "embedded"
    if not root.is_dir():
        return []
    # Skip hidden folders (a build in progress writes `.NAME.building` next to the finished models).
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / "config.json").is_file()
    )


def resolve_model_path(path: str) -> tuple[str, str]:
    """(what to pass to from_pretrained, default model id) for a ModelConfig.path."""
    if path.startswith(EMBEDDED_PREFIX):
        name = path[len(EMBEDDED_PREFIX) :]
        location = importlib.resources.files("swarmnode.policy") / "embedded" / name
        if name not in embedded_models():
            raise ModelLoadError(
                f"no embedded model {name!r}: available are {embedded_models()} "
                "(build them with `python scripts/build_tiny_models.py`)"
            )
        return str(location), name
    local = Path(path).expanduser()
    if local.is_dir():
        return str(local), local.resolve().name
    looks_like_path = path.startswith((".", "/", "~")) or path.count("/") > 1 or local.exists()
    if looks_like_path:
        raise ModelLoadError(
            f"model path {path} does not exist or is not a directory: pass a directory with config.json "
            f"and tokenizer files, an embedded model ({', '.join(EMBEDDED_PREFIX + m for m in embedded_models())}) "
            "or a hub id"
        )
    return path, path  # a hub id such as "Qwen/Qwen2.5-0.5B-Instruct"


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto': float32 on CPU (and MPS), bfloat16 on CUDA when supported, else float16."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _stop_token_ids(model: PreTrainedModel, tokenizer: Any) -> tuple[int, ...]:
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    configured = getattr(model.generation_config, "eos_token_id", None)
    for token in configured if isinstance(configured, list) else [configured]:
        if token is not None and token not in ids:
            ids.append(token)
    if not ids:
        raise ModelLoadError(
            f"{model.name_or_path}: neither tokenizer nor generation config defines an EOS token"
        )
    return tuple(ids)


def _from_pretrained(loader: Any, source: str, **kwargs: Any) -> Any:
    """Local files (a directory or the hub cache) first: no network round trips for what is on disk."""
    try:
        return loader.from_pretrained(source, local_files_only=True, **kwargs)
    except OSError:
        return loader.from_pretrained(source, **kwargs)


def load_policy(cfg: ModelConfig, device: str | torch.device) -> Policy:
    """Load model and tokenizer for `cfg` onto `device`; raises ModelLoadError with what to do."""
    source, default_id = resolve_model_path(cfg.path)
    device = torch.device(device)
    try:
        tokenizer = _from_pretrained(AutoTokenizer, source)
        model = _from_pretrained(AutoModelForCausalLM, source, dtype=pick_dtype(cfg.dtype, device))
    except OSError as exc:
        if source == cfg.path and not Path(source).exists():
            raise ModelLoadError(
                f"model {cfg.path} not found locally and the hub is unreachable (or has no such model): "
                f"pass a local path ({type(exc).__name__}: {str(exc).splitlines()[0]})"
            ) from exc
        raise ModelLoadError(f"cannot load model from {source}: {exc}") from exc
    model.to(device)
    tokenizer.padding_side = "left"
    system_prompt = cfg.system_prompt if cfg.system_prompt is not None else DEFAULT_SYSTEM_PROMPT
    return Policy(
        model=model,
        tokenizer=tokenizer,
        model_id=cfg.id or default_id,
        device=device,
        system_prompt=system_prompt,
        stop_token_ids=_stop_token_ids(model, tokenizer),
    )
