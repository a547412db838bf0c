"""Two simulated nodes share one GPU with explicit memory fractions; writes bench/results/gpu_sharing.json.

    python scripts/check_gpu_sharing.py [--rounds 3] [--fraction 0.45] [--out bench/results/gpu_sharing.json]
    python scripts/check_gpu_sharing.py --cpu --shape tiny      # the same pipeline on CPU (script check)

Builds a randomly initialised Qwen2 model with Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14
heads, 2 KV heads, MLP 4864; the embedded tiny-a tokenizer, so no download) in a temporary
directory, writes a 2-node experiment that pins both nodes to cuda:0 with `memory_fraction`, runs
`swarmnode simulate` with the transformers backend for a few rounds, and records where the report
says each node ran, with the fraction it was given and each node's log tail. Exit code 0 when both
nodes finished every round on cuda:0.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_A = ROOT / "swarmnode" / "policy" / "embedded" / "tiny-a"
SHAPES = {
    "0.5b": {
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
    },
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
    },
}


def build_model(directory: Path, shape: str) -> int:
    """A random model of the given shape with tiny-a's tokenizer and chat template; returns its parameters."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = json.loads((TINY_A / "config.json").read_text())
    config.update(SHAPES[shape])
    for derived in ("layer_types", "head_dim", "max_window_layers"):  # recomputed from the new shape
        config.pop(derived, None)
    config["torch_dtype"] = "bfloat16"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**config))
    model.to(torch.bfloat16).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (TINY_A / name).exists():
            shutil.copy(TINY_A / name, directory / name)
    return sum(p.numel() for p in model.parameters())


def experiment_toml(model_dir: Path, rounds: int, fraction: float, cpu: bool) -> str:
    placement = (
        '[placement]\nstrategy = "cpu"\n'
        if cpu
        else (
            "[placement]\ngpus = 1\n\n"
            f'[[node]]\nindex = 0\ndevice = "cuda:0"\nmemory_fraction = {fraction}\n\n'
            f'[[node]]\nindex = 1\ndevice = "cuda:0"\nmemory_fraction = {fraction}\n'
        )
    )
    return f"""name = "gpu-sharing"
nodes = 2
rounds = {rounds}
seeds = [0]

[base]
"model.path" = "{model_dir}"
"model.backend" = "transformers"
"sampler.local_groups" = 2
"sampler.external_groups" = 2
"grpo.num_generations" = 4
"grpo.max_completion_length" = 32
"tasks.eval_size" = 8
"eval_every" = {rounds}
"checkpoint_every" = 100

{placement}"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.45, help="memory_fraction of each node")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    parser.add_argument(
        "--cpu", action="store_true", help="run the same pipeline on CPU (no placement on a GPU)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_sharing.json")
    parser.add_argument("--timeout", type=float, default=480.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="swarmnode-gpu-sharing-"))
    try:
        model_dir = work / "model"
        params = build_model(model_dir, args.shape)
        (work / "experiment.toml").write_text(
            experiment_toml(model_dir, args.rounds, args.fraction, args.cpu)
        )
        started = time.monotonic()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "swarmnode",
                "simulate",
                str(work / "experiment.toml"),
                "--out",
                str(work / "report"),
                "--run-timeout",
                str(args.timeout),
            ],
            capture_output=True,
            text=True,
            timeout=args.timeout + 120,
        )
        wall = time.monotonic() - started
        run = work / "report" / "runs" / "default" / "seed-0"
        nodes = []
        for index in range(2):
            node_dir = run / f"node-{index}"
            placement = (
                json.loads((node_dir / "placement.json").read_text())
                if (node_dir / "placement.json").exists()
                else None
            )
            metrics = (
                [json.loads(line) for line in (node_dir / "metrics.jsonl").read_text().splitlines()]
                if (node_dir / "metrics.jsonl").exists()
                else []
            )
            nodes.append(
                {
                    "node": index,
                    "placement": placement,
                    "rounds": len(metrics),
                    "log_tail": (node_dir / "node.log").read_text()[-1500:]
                    if (node_dir / "node.log").exists()
                    else "",
                }
            )
        results = (
            json.loads((work / "report" / "results.json").read_text())
            if (work / "report" / "results.json").exists()
            else {}
        )
        ok = (
            done.returncode == 0
            and all(n["rounds"] == args.rounds for n in nodes)
            and (args.cpu or all(n["placement"] and n["placement"]["device"] == "cuda:0" for n in nodes))
        )
        summary = {
            "ok": ok,
            "exit_code": done.returncode,
            "wall_s": round(wall, 1),
            "shape": args.shape,
            "parameters": params,
            "fraction_per_node": None if args.cpu else args.fraction,
            "rounds": args.rounds,
            "ran_on": [n.get("ran_on") for n in results.get("nodes", [])],
            "nodes": nodes,
            "stderr_tail": done.stderr[-2000:],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))
        print(json.dumps({k: v for k, v in summary.items() if k not in ("nodes", "stderr_tail")}, indent=1))
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
