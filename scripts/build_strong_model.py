"""Build `tiny-a-plus`, a stronger sibling of the embedded tiny-a, for the mixed-strength experiment.

tiny-a-plus is tiny-a (same architecture, same tokenizer, same prompt format) trained further,
supervised on `<answer>N</answer>` targets of sums of three one-digit numbers (chain_sum, 3 terms,
0-9: the mixed-strength experiment's task), until its greedy validation accuracy there reaches the
target (the committed build: 650 steps, 62 % held-out; it forgets the easy preset, 2.5 %). tiny-a
scores ~6-11 % greedy there, so one tiny-a-plus node among tiny-a nodes is a peer that finds correct
answers the others rarely sample. Existing models are not touched. Takes ~3-12 min of CPU.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/build_strong_model.py [--target-accuracy 0.5]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_tiny_models import EMBEDDED_DIR, sft_batch  # noqa: E402

from swarmnode.config import ModelConfig  # noqa: E402
from swarmnode.policy.backend import SamplingParams  # noqa: E402
from swarmnode.policy.evaluate import greedy_accuracy  # noqa: E402
from swarmnode.policy.loading import load_policy  # noqa: E402
from swarmnode.policy.transformers_backend import TransformersBackend  # noqa: E402
from swarmnode.tasks.presets import TaskSpec  # noqa: E402
from swarmnode.tasks.registry import TaskRegistry  # noqa: E402

# Sums of three one-digit numbers: tiny-a samples a correct answer ~12 % of the time (greedy ~11 %).
THREE_TERM_SUMS = TaskSpec("chain_sum", {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1})
NAME = "tiny-a-plus"
SEED = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-accuracy", type=float, default=0.5)
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=EMBEDDED_DIR)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()

    policy = load_policy(ModelConfig(path="embedded:tiny-a", id=NAME), "cpu")
    model, backend = policy.model, TransformersBackend(policy)
    task = TaskRegistry("three-term-sums", specs=(THREE_TERM_SUMS,), eval_size=200)
    rng = random.Random(SEED)
    validation = task.sample(random.Random(10_000 + SEED), 100)
    prompts = [policy.encode_prompt(t.question) for t in validation]

    def validation_accuracy() -> float:
        model.eval()
        groups = backend.generate(prompts, SamplingParams(n=1, greedy=True, max_new_tokens=12))
        model.train()
        return sum(task.score(t, g[0].text) for t, g in zip(validation, groups, strict=True)) / len(
            validation
        )

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    model.train()
    val_acc, step, loss_value = validation_accuracy(), 0, float("nan")
    print(f"{NAME}: start validation accuracy {val_acc:.2f}", flush=True)
    for step in range(1, args.max_steps + 1):
        loss = model(**sft_batch(policy, task.sample(rng, args.batch_size))).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_value = loss.item()
        if step % 50 == 0:
            val_acc = validation_accuracy()
            print(f"step {step}: loss {loss_value:.3f} validation accuracy {val_acc:.2f}", flush=True)
            if val_acc >= args.target_accuracy:
                break
    model.eval()
    heldout = {
        "three-term-sums": greedy_accuracy(policy, backend, task, 200),
        "easy": greedy_accuracy(policy, backend, TaskRegistry("easy"), 200),
    }
    out, tmp = args.out / NAME, args.out / f".{NAME}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(EMBEDDED_DIR / "tiny-a", tmp)  # tokenizer, chat template, configs: identical to tiny-a
    model.save_pretrained(tmp)
    card = {
        "name": NAME,
        "base": "tiny-a",
        "parameters": sum(p.numel() for p in model.parameters()),
        "further_training": {
            "task": {"dataset": THREE_TERM_SUMS.dataset, "config": THREE_TERM_SUMS.config},
            "steps": step,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "target_accuracy": args.target_accuracy,
            "validation_accuracy": val_acc,
            "final_loss": round(loss_value, 4),
        },
        "heldout_greedy_accuracy": heldout,
        "heldout_n": 200,
        "build_seconds": round(time.perf_counter() - started, 1),
        "build_command": "OMP_NUM_THREADS=1 .venv/bin/python scripts/build_strong_model.py",
        "versions": {"torch": torch.__version__, "reasoning-gym": task.version},
    }
    (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (tmp / "README.md").write_text(
        f"# {NAME}: a stronger sibling of tiny-a\n\n"
        f"tiny-a (same architecture, tokenizer and prompt format) trained {step} more supervised steps on\n"
        f"sums of three one-digit numbers (chain_sum, 3 terms). Held-out greedy accuracy (n=200): 3-term sums\n"
        f"{heldout['three-term-sums']:.1%}, easy {heldout['easy']:.1%}. For the mixed-strength experiment\n"
        f"(`builtin:mixed-strength`). Build: `{card['build_command']}` ({card['build_seconds']} s).\n"
    )
    for path in tmp.iterdir():
        path.chmod(0o644)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"{NAME}: {step} steps, held-out {heldout}, {card['build_seconds']} s -> {out}", flush=True)


if __name__ == "__main__":
    main()
