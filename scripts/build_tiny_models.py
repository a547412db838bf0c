"""Build the embedded tiny models (swarmnode/policy/embedded/tiny-a, tiny-b) from scratch, offline.

For each model: train a byte-level BPE tokenizer on procedurally generated task text, initialise a
small causal LM from a seed, and warm-start it by supervised training on ``<answer>N</answer>``
targets of the "easy" preset until greedy accuracy on a validation set (training seed space)
reaches the target, so RL starts with signal and headroom. The held-out accuracy is then measured
and written to card.json and README.md next to the weights.

The two models differ in architecture, size and tokenizer, so that a heterogeneous local swarm
really exchanges text between different tokenizers:
- tiny-a: Qwen2, hidden 128 x 4 layers, vocab 512, Qwen2's exact pre-tokenizer (digits split);
- tiny-b: Llama, hidden 96 x 6 layers, vocab 384, digits + GPT-2 byte-level pre-tokenizer.

Deterministic given the seeds on the same machine (one thread). Usage:
    OMP_NUM_THREADS=1 .venv/bin/python scripts/build_tiny_models.py [--models tiny-a tiny-b]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from swarmnode.config import ModelConfig
from swarmnode.policy.backend import SamplingParams
from swarmnode.policy.chat import tiny_chat_template
from swarmnode.policy.evaluate import greedy_accuracy
from swarmnode.policy.loading import load_policy
from swarmnode.policy.transformers_backend import TransformersBackend
from swarmnode.tasks.registry import TaskRegistry

EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "swarmnode" / "policy" / "embedded"
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
console = Console()


@dataclass(frozen=True)
class TinySpec:
    name: str
    architecture: str  # "qwen2" | "llama"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    eos_token: str
    pad_token: str
    user_token: str
    assistant_token: str
    seed: int


SPECS = {
    "tiny-a": TinySpec(
        "tiny-a",
        "qwen2",
        128,
        4,
        4,
        2,
        512,
        512,
        "<|endoftext|>",
        "<|endoftext|>",
        "<|user|>",
        "<|assistant|>",
        seed=1,
    ),
    "tiny-b": TinySpec("tiny-b", "llama", 96, 6, 4, 2, 256, 384, "</s>", "<pad>", "[Q]", "[A]", seed=2),
}


@dataclass(frozen=True)
class TrainSettings:
    batch_size: int = 64
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    max_steps: int = 4000
    eval_every: int = 50
    validation_size: int = 100
    target_accuracy: float = 0.30  # stop once validation accuracy reaches this
    heldout_size: int = 200


def answer_target(answer: str) -> str:
    return f"<answer>{answer}</answer>"


def tokenizer_corpus(seed: int) -> list[str]:
    """Procedural task text: easy-mix questions and answer targets, plus some paper-task questions."""
    rng = random.Random(seed)
    texts = []
    for task in TaskRegistry("easy-mix").sample(rng, 20_000):
        texts += [task.question, answer_target(task.answer)]
    texts += [task.question for task in TaskRegistry("paper").sample(rng, 300)]
    return texts


def train_tokenizer(spec: TinySpec, corpus: list[str]) -> PreTrainedTokenizerFast:
    special = list(dict.fromkeys([spec.eos_token, spec.pad_token, spec.user_token, spec.assistant_token]))
    tokenizer = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    if spec.architecture == "qwen2":
        # Exactly Qwen2Tokenizer's pipeline: AutoTokenizer rebuilds it for model_type qwen2 and would
        # silently replace any other normalizer / pre-tokenizer (ML_NOTES).
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tokenizer_class = "Qwen2Tokenizer"
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        tokenizer_class = "PreTrainedTokenizerFast"
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=spec.eos_token,
        pad_token=spec.pad_token,
        additional_special_tokens=[spec.user_token, spec.assistant_token],
        padding_side="left",
        model_max_length=2048,
    )
    wrapped.chat_template = tiny_chat_template(spec.user_token, spec.assistant_token, spec.eos_token)
    wrapped.tokenizer_class_name = tokenizer_class  # written into tokenizer_config.json by save_tokenizer
    return wrapped


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = tokenizer.tokenizer_class_name
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def init_model(spec: TinySpec, tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=2048,  # rotary: costs no parameters
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    config = Qwen2Config(**common) if spec.architecture == "qwen2" else LlamaConfig(**common)
    torch.manual_seed(spec.seed)
    return AutoModelForCausalLM.from_config(config)


def sft_batch(policy, tasks) -> dict[str, torch.Tensor]:  # noqa: ANN001 (script-local helper)
    """Right-padded prompt + answer-target sequences; loss only on the target (EOS included)."""
    rows = []
    for task in tasks:
        prompt = policy.encode_prompt(task.question)
        target = policy.encode_completion(answer_target(task.answer), finished=True)
        rows.append((prompt + target, [-100] * len(prompt) + target))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), policy.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, target) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(target)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def build(spec: TinySpec, settings: TrainSettings, out_root: Path) -> dict:
    started = time.perf_counter()
    out = out_root / spec.name
    tmp = out_root / f".{spec.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)

    console.print(f"[bold]{spec.name}[/]: training a {spec.vocab_size}-token BPE tokenizer")
    tokenizer = train_tokenizer(spec, tokenizer_corpus(spec.seed))
    model = init_model(spec, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"[bold]{spec.name}[/]: {spec.architecture}, {n_params / 1e6:.2f} M parameters")
    # Save the untrained model and reload it through the normal path, so training uses exactly the
    # tokenizer and prompt format that users will load.
    model.save_pretrained(tmp)
    save_tokenizer(tokenizer, tmp)
    policy = load_policy(ModelConfig(path=str(tmp), id=spec.name), "cpu")
    model = policy.model
    backend = TransformersBackend(policy)

    easy = TaskRegistry("easy")
    rng = random.Random(spec.seed)
    validation = easy.sample(random.Random(10_000 + spec.seed), settings.validation_size)
    val_prompts = [policy.encode_prompt(t.question) for t in validation]

    def validation_accuracy() -> float:
        model.eval()
        groups = backend.generate(val_prompts, SamplingParams(n=1, greedy=True, max_new_tokens=12))
        model.train()
        return sum(easy.score(t, g[0].text) for t, g in zip(validation, groups, strict=True)) / len(
            validation
        )

    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / settings.warmup_steps)
    )
    model.train()
    val_acc, loss_value, step = 0.0, float("nan"), 0
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}  val acc {task.fields[acc]:.2f}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(
            f"{spec.name} warm start", total=settings.max_steps, loss=loss_value, acc=val_acc
        )
        for step in range(1, settings.max_steps + 1):
            loss = model(**sft_batch(policy, easy.sample(rng, settings.batch_size))).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            loss_value = loss.item()
            if step % settings.eval_every == 0:
                val_acc = validation_accuracy()
            progress.update(bar, completed=step, loss=loss_value, acc=val_acc)
            if val_acc >= settings.target_accuracy:
                break

    model.eval()
    heldout = {
        preset: greedy_accuracy(policy, backend, TaskRegistry(preset), settings.heldout_size)
        for preset in ("easy", "easy-mix")
    }
    build_seconds = time.perf_counter() - started
    model.save_pretrained(tmp)
    card = {
        "name": spec.name,
        "architecture": spec.architecture,
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "spec": asdict(spec),
        "warm_start": {
            **asdict(settings),
            "steps": step,
            "final_loss": round(loss_value, 4),
            "validation_accuracy": val_acc,
        },
        "heldout_greedy_accuracy": heldout,
        "heldout_n": settings.heldout_size,
        "build_seconds": round(build_seconds, 1),
        "build_command": "OMP_NUM_THREADS=1 .venv/bin/python scripts/build_tiny_models.py",
        "versions": {"torch": torch.__version__, "reasoning-gym": easy.version},
    }
    (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (tmp / "README.md").write_text(model_readme(card))
    for path in tmp.iterdir():  # safetensors writes 0600; the package must be readable by any user
        path.chmod(0o644)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    console.print(
        f"[bold green]{spec.name}[/]: {step} steps, held-out greedy accuracy "
        f"easy {heldout['easy']:.1%} easy-mix {heldout['easy-mix']:.1%}, {build_seconds:.0f} s -> {out}"
    )
    return card


def model_readme(card: dict) -> str:
    spec = card["spec"]
    acc = card["heldout_greedy_accuracy"]
    return f"""# {card["name"]}: embedded tiny model

A {card["parameters"] / 1e6:.2f} M-parameter {card["architecture"]} causal LM (hidden {spec["hidden_size"]},
{spec["num_layers"]} layers) with its own {card["vocab_size"]}-token byte-level BPE tokenizer, trained
offline on procedurally generated reasoning-gym text. Load it with `model.path = "embedded:{card["name"]}"`.

Warm start: supervised on `<answer>N</answer>` targets of the "easy" preset (chain_sum, 2 terms,
1-2 digits) for {card["warm_start"]["steps"]} steps, stopped at validation accuracy
>= {card["warm_start"]["target_accuracy"]:.0%} so that RL has signal and headroom.

| held-out greedy accuracy (n={card["heldout_n"]}) | value |
|---|---|
| easy | {acc["easy"]:.1%} |
| easy-mix | {acc["easy-mix"]:.1%} |

Prompt format (chat template): `{spec["user_token"]}<question>{spec["assistant_token"]}`; the model answers
`<answer>N</answer>{spec["eos_token"]}`.

Build ({card["build_seconds"]} s on the development CPU): `{card["build_command"]}`
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SPECS), choices=list(SPECS))
    parser.add_argument("--out", type=Path, default=EMBEDDED_DIR, help="where the model folders go")
    parser.add_argument("--max-steps", type=int, default=TrainSettings.max_steps)
    parser.add_argument("--target-accuracy", type=float, default=TrainSettings.target_accuracy)
    args = parser.parse_args()
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()  # our rich bar is the progress display
    settings = TrainSettings(max_steps=args.max_steps, target_accuracy=args.target_accuracy)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        build(SPECS[name], settings, args.out)


if __name__ == "__main__":
    main()
