"""Peak memory of one GRPO step on a Qwen2.5-0.5B-shaped model, before and after chunked log-probs.

The model is built locally from its shape (random init, no download): hidden 896, 24 layers, 14
attention heads, 2 KV heads, intermediate 4864, vocabulary 151,936, tied embeddings, on CPU, in
bfloat16 by default (as on a GPU; ``--dtype float32`` doubles the fixed part and needs ~13 GiB).
The batch is ``--groups`` groups of ``--completions`` sequences of ``--prompt-tokens`` prompt and
``--completion-tokens`` completion tokens (default 2 x 2 x (64 + 128), fits a 24 GiB machine).

Each variant runs in a fresh subprocess so the two cannot contaminate each other's peak:
- ``full_vocab``: the log-prob function as it was before (float32 log_softmax over the full
  vocabulary at every position, entropy from its exp), patched into the trainer, here only;
- ``chunked``: ``swarmnode.rl.grpo.token_logprobs`` (completion positions only, chunked,
  recomputed in backward);
- ``chunked_checkpointing``: the same with ``grpo.gradient_checkpointing = true`` (each decoder
  layer's activations recomputed in backward).

Per variant it records the process's peak RSS (``resource.getrusage`` maxrss, everything
included: weights, AdamW state, the step) and the step's own peak: the optimizer state is created
first, the kernel's high-water mark is reset (``/proc/self/clear_refs``), and ``VmHWM`` after the
step minus ``VmRSS`` before it is what the step added. It writes bench/results/grpo_memory.json.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_grpo_memory.py

Takes a few minutes of CPU (one 0.5 B step per variant).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "grpo_memory.json"
VARIANTS = ("full_vocab", "chunked", "chunked_checkpointing")
HEAD_VARIANTS = ("head_full_vocab", "head_chunked")
GIB = 1 << 30


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _full_vocab_logprobs(model, batch, temperature=1.0):  # type: ignore[no-untyped-def]
    """The trainer's log-prob function before the change, kept here only to measure it."""
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).logits
    logits = logits[:, :-1].float() / temperature
    logp_all = logits.log_softmax(dim=-1)
    logp = logp_all.gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    import torch

    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
    return logp, entropy


def run_variant(args: argparse.Namespace) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from swarmnode.config import GRPOConfig
    from swarmnode.rl import grpo
    from swarmnode.rl.records import RolloutGroup, ScoredGroup
    from swarmnode.tasks.reference import TaskRef

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.variant == "full_vocab":
        grpo.token_logprobs = _full_vocab_logprobs  # the trainer looks the name up at call time
    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=args.layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        eos_token_id=151645,
        pad_token_id=151643,
    )
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)  # built in its dtype: no float32 copy inflates the peak
    model = Qwen2ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    groups = []
    for g in range(args.groups):
        prompt = tuple(torch.randint(0, 150000, (args.prompt_tokens,), generator=gen).tolist())
        completions = tuple(
            tuple(torch.randint(0, 150000, (args.completion_tokens,), generator=gen).tolist())
            for _ in range(args.completions)
        )
        rewards = tuple(float(i % 2 == 0) for i in range(args.completions))
        group = RolloutGroup(
            task=TaskRef("chain_sum", "bench", 0, g, "0"),
            question="q",
            completions=("c",) * args.completions,
            finished=(False,) * args.completions,
            model_id="qwen2.5-0.5b-shaped",
            round=0,
            created_at=0.0,
        )
        groups.append(ScoredGroup(group, rewards, prompt, completions))
    cfg = GRPOConfig(
        micro_batch_size=0, off_policy="none", gradient_checkpointing=args.variant == "chunked_checkpointing"
    )
    trainer = grpo.GRPOTrainer(model, cfg, pad_token_id=config.pad_token_id)
    # AdamW state exists before the measured step, as in every round after the first
    for p in trainer.params:
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)

    baseline_kib = _status_kib("VmRSS")
    reset = _reset_high_water_mark()
    start = time.perf_counter()
    metrics = trainer.step(groups)
    seconds = time.perf_counter() - start
    hwm_kib = _status_kib("VmHWM")
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "variant": args.variant,
        "parameters": params,
        "peak_rss_gib": maxrss_kib * 1024 / GIB,
        "rss_before_step_gib": baseline_kib * 1024 / GIB,
        "step_peak_rss_gib": hwm_kib * 1024 / GIB if reset else None,
        "step_added_gib": (hwm_kib - baseline_kib) * 1024 / GIB if reset else None,
        "step_seconds": seconds,
        "loss": metrics["loss"],
        "grad_norm": metrics["grad_norm"],
        "num_tokens": metrics["num_tokens"],
    }


def run_head_variant(args: argparse.Namespace) -> dict:
    """The log-prob part alone: output projection + log-probs + entropy, forward and backward.

    Hidden states of the batch's shape stand in for the decoder's output, so what is measured is
    exactly what ``token_logprobs`` allocates beyond the decoder (and the projection's gradient).
    """
    import torch

    from swarmnode.rl import grpo

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    rows, width = args.groups * args.completions, args.prompt_tokens + args.completion_tokens
    weight = (torch.randn(151936, 896, generator=gen) * 0.02).to(dtype).requires_grad_()
    hidden = torch.randn(rows, width, 896, generator=gen).to(dtype).requires_grad_()
    input_ids = torch.randint(0, 151936, (rows, width), generator=gen)
    mask = torch.zeros(rows, width - 1)
    mask[:, args.prompt_tokens - 1 :] = 1.0
    baseline_kib = _status_kib("VmRSS")
    reset = _reset_high_water_mark()
    start = time.perf_counter()
    if args.variant == "head_full_vocab":
        logits = torch.nn.functional.linear(hidden, weight)[:, :-1].float() / 1.0
        logp_all = logits.log_softmax(dim=-1)
        logp = logp_all.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
        loss = (logp * mask).sum()
    else:
        r, c = mask.nonzero(as_tuple=True)
        logp, entropy = grpo._SelectedTokenLogprobs.apply(hidden[r, c], weight, input_ids[r, c + 1], 1.0)
        loss = logp.sum()
    loss.backward()
    seconds = time.perf_counter() - start
    hwm_kib = _status_kib("VmHWM")
    return {
        "variant": args.variant,
        "positions": rows * (width - 1),
        "completion_positions": int(mask.sum()),
        "step_added_gib": (hwm_kib - baseline_kib) * 1024 / GIB if reset else None,
        "seconds": seconds,
        "loss": loss.item(),
        "entropy_sum": float((entropy * (mask if entropy.dim() == 2 else 1)).sum()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variant", choices=VARIANTS + HEAD_VARIANTS, help="run one variant in this process (internal)"
    )
    parser.add_argument(
        "--variants",
        help="comma-separated subset to (re)measure; the others are kept from the existing --out file",
    )
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--completions", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--completion-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="weights, activations and AdamW state (the log-probs are float32 either way)",
    )
    parser.add_argument("--layers", type=int, default=24, help="fewer only to smoke-test the script")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    if args.variant:
        runner = run_head_variant if args.variant in HEAD_VARIANTS else run_variant
        print(json.dumps(runner(args)))
        return 0

    results: dict[str, dict] = {}
    chosen = VARIANTS + HEAD_VARIANTS
    if args.variants:
        chosen = tuple(v for v in chosen if v in args.variants.split(","))
        if args.out.exists():
            results = json.loads(args.out.read_text())["variants"]
    forwarded = list(sys.argv[1:])
    if "--variants" in forwarded:  # "--variants a,b"
        i = forwarded.index("--variants")
        del forwarded[i : i + 2]
    forwarded = [a for a in forwarded if not a.startswith("--variants=")]
    for variant in chosen:
        cmd = [sys.executable, __file__, "--variant", variant, *forwarded]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{variant}: {json.dumps(results[variant])}", flush=True)
        write_report(args, results)  # after each variant, so a cut-short run keeps what it measured
    for v, r in results.items():
        print(
            f"{v:>22}: peak RSS {r.get('peak_rss_gib', 0):.2f} GiB, step added {r['step_added_gib']:.2f} GiB"
        )
    print(f"written to {args.out}")
    return 0


def write_report(args: argparse.Namespace, results: dict[str, dict]) -> None:
    before = results.get("full_vocab")
    others = [v for v in VARIANTS[1:] if v in results and before]
    head = (
        results["head_full_vocab"]["step_added_gib"] / results["head_chunked"]["step_added_gib"]
        if {"head_full_vocab", "head_chunked"} <= set(results)
        else None
    )

    def ratio(key: str, variant: str) -> float | None:
        after = results[variant][key]
        return before[key] / after if before[key] and after else None

    report = {
        "what": "peak memory of one GRPO step, Qwen2.5-0.5B-shaped random-init model, CPU",
        "dtype": args.dtype,
        "command": "OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_grpo_memory.py",
        "layers": args.layers,
        "batch": {
            "groups": args.groups,
            "completions_per_group": args.completions,
            "prompt_tokens": args.prompt_tokens,
            "completion_tokens": args.completion_tokens,
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads},
        "variants": results,
        "ratios_to_full_vocab": {
            v: {"peak_rss": ratio("peak_rss_gib", v), "step_added": ratio("step_added_gib", v)}
            for v in others
        },
        "numerics": {
            v: {
                "loss_abs_diff": abs(before["loss"] - results[v]["loss"]),
                "grad_norm_rel_diff": abs(before["grad_norm"] - results[v]["grad_norm"])
                / max(before["grad_norm"], 1e-12),
            }
            for v in others
        },
        "log_prob_part_ratio": head,
        "bar": "GRPO step peak memory at least 3x lower than today at the same batch",
        "note": (
            "peak_rss includes what no log-prob change can remove: the weights and AdamW state (3x the "
            "weights: ~3 GiB in bfloat16, ~6 GiB in float32); step_added is what the step itself adds on "
            "top (gradients, activations, logits). head_* variants measure the log-prob part alone "
            "(output projection, log-probs, entropy, forward and backward) on hidden states of the same "
            "shape; log_prob_part_ratio is its full_vocab / chunked memory."
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
