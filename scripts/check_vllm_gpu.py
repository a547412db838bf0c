"""End-to-end check of the GPU generation paths on a CUDA machine; prints one JSON summary.

    python scripts/check_vllm_gpu.py [--model embedded:tiny-a | DIR | HUB_ID] [--out FILE]

1. Detects the hardware and prints the runtime auto-config would choose (and why).
2. Loads a small model on CUDA (the given one, else an embedded model, else a random tiny Qwen2
   built here: no download needed) and generates greedily with transformers.
3. Makes one policy-gradient-style update: raises the log-probability of a fixed target completion.
4. If vLLM is installed: builds ``VLLMBackend`` on the same policy, checks its greedy output equals
   transformers' before the update, pushes the updated weights with ``sync_weights()`` and checks
   the engine now produces the updated model's greedy output. Without vLLM it says so and still
   checks the CUDA transformers path. Exit code 0 when every check that could run passed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarmnode.config import NodeConfig  # noqa: E402
from swarmnode.policy.backend import SamplingParams  # noqa: E402
from swarmnode.policy.hardware import choose_runtime, detect_hardware  # noqa: E402

MAX_NEW = 8


def random_tiny_policy(device: str) -> SimpleNamespace:
    """A random Qwen2 (~0.2 M params) with a word-level tokenizer, saved so vLLM could load it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {"<pad>": 0, "<eos>": 1} | {f"w{i}": i for i in range(2, 256)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=1,
        pad_token_id=0,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    model = Qwen2ForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    return SimpleNamespace(model=model, tokenizer=tokenizer, model_id="random-tiny-qwen2")


def load(model_path: str | None, device: str) -> tuple[Any, str]:
    try:
        from swarmnode.config import ModelConfig
        from swarmnode.policy.loading import embedded_models, load_policy

        names = embedded_models()
        path = model_path or (f"embedded:{names[0]}" if names else None)
        if path:
            return load_policy(ModelConfig(path=path, dtype="bfloat16"), device), path
    except Exception as exc:  # report and fall back: this script checks backends, not loading
        print(
            f"load_policy unavailable ({type(exc).__name__}: {exc}); using a random tiny model",
            file=sys.stderr,
        )
    return random_tiny_policy(device), "random-tiny-qwen2"


@torch.no_grad()
def hf_greedy(policy: Any, prompts: list[list[int]]) -> list[list[int]]:
    eos = policy.tokenizer.eos_token_id
    outs = []
    for ids in prompts:
        x = torch.tensor([ids], device=policy.model.device)
        y = policy.model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )
        outs.append(y[0, len(ids) :].tolist())
    return outs


def update_towards(policy: Any, prompt: list[int], target: list[int], steps: int = 100) -> float:
    """Gradient steps that raise log p(target | prompt): a stand-in for one GRPO update."""
    model = policy.model
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.tensor([prompt + target], device=model.device)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        logits = model(x).logits[0, len(prompt) - 1 : -1].float()
        loss = torch.nn.functional.cross_entropy(logits, x[0, len(prompt) :])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def strip_eos(ids: list[int] | tuple[int, ...], eos: int) -> list[int]:
    ids = list(ids)
    return ids[: ids.index(eos)] if eos in ids else ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="embedded:<name>, a local model dir or a hub id")
    parser.add_argument("--out", default=None, help="also write the JSON summary to this file")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    args = parser.parse_args()

    summary: dict[str, Any] = {"checks": {}}
    hw = detect_hardware()
    summary["hardware"] = hw.__dict__
    choice = choose_runtime(hw, NodeConfig(model={"path": args.model or "embedded:tiny-a"}))
    summary["runtime"] = dict(choice.__dict__)
    if hw.device != "cuda":
        summary["error"] = "no CUDA device: run this on a GPU machine"
        print(json.dumps(summary, indent=2, default=str))
        return 1

    policy, source = load(args.model, "cuda")
    summary["model"] = source
    eos = policy.tokenizer.eos_token_id
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    if source != "random-tiny-qwen2":
        prompts = [policy.tokenizer.encode(q, add_special_tokens=False) for q in ("1+1=", "2+3=", "7+8=")]

    t0 = time.perf_counter()
    before = hf_greedy(policy, prompts)
    summary["hf_generate_s"] = round(time.perf_counter() - t0, 3)

    vllm_backend = None
    try:
        from swarmnode.policy.vllm_backend import VLLMBackend

        t0 = time.perf_counter()
        vllm_backend = VLLMBackend(policy, args.gpu_memory_utilization, seed=0, max_model_len=256)
        summary["vllm_engine_start_s"] = round(time.perf_counter() - t0, 1)
    except RuntimeError as exc:
        summary["vllm"] = f"absent: {exc}"
    greedy = SamplingParams(n=1, max_new_tokens=MAX_NEW, greedy=True)
    if vllm_backend is not None:
        v_before = [strip_eos(g[0].token_ids, eos) for g in vllm_backend.generate(prompts, greedy)]
        summary["checks"]["vllm_matches_hf_before_update"] = v_before == [strip_eos(b, eos) for b in before]

    target = (
        [40, 41, 42, 43]
        if source == "random-tiny-qwen2"
        else policy.tokenizer.encode(" 42", add_special_tokens=False)
    )
    summary["update_final_loss"] = round(update_towards(policy, prompts[0], target), 4)
    after = hf_greedy(policy, prompts)
    summary["checks"]["hf_generation_changed_after_update"] = after != before
    summary["checks"]["hf_learned_target"] = strip_eos(after[0], eos)[: len(target)] == target

    if vllm_backend is not None:
        t0 = time.perf_counter()
        vllm_backend.sync_weights()
        summary["vllm_sync_s"] = round(time.perf_counter() - t0, 3)
        summary["vllm_sync_path"] = vllm_backend.last_sync_path
        v_after = [strip_eos(g[0].token_ids, eos) for g in vllm_backend.generate(prompts, greedy)]
        summary["checks"]["vllm_matches_hf_after_sync"] = v_after == [strip_eos(a, eos) for a in after]
        sampled = vllm_backend.generate(prompts[:1], SamplingParams(n=8, max_new_tokens=MAX_NEW, seed=1))
        summary["checks"]["vllm_returns_n_samples"] = len(sampled[0]) == 8
        vllm_backend.close()

    summary["ok"] = all(summary["checks"].values())
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
