"""Post-hoc evaluation of a simulation's checkpoints: held-out accuracy per dataset.

A node logs one held-out figure (``eval_accuracy``: the mean over the datasets it serves). Where
nodes sample different tasks (``builtin:specialties``) the question is per task: did a node learn
the task it never sampled? This loads each node's newest valid checkpoint (or, with ``--initial``,
the model it started from) and scores greedy completions on the same held-out questions, split by
dataset, on CPU::

    python -m swarmnode.sim.checkpoint_eval runs/specialties --out runs/specialties/by_dataset.json

It walks ``RUN_DIR/runs/<configuration>/seed-<s>/node-<i>/`` (or takes node directories) and writes
one row per node (configuration, seed, node, the datasets it samples, accuracy per dataset).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from swarmnode.config import NodeConfig


def load_node_policy(node_dir: Path, initial: bool = False) -> tuple[NodeConfig, Any, int]:
    """A simulation node's config (``node.toml``), its policy on CPU in float32 restored from its
    newest valid checkpoint unless ``initial`` (then the model it started from), and that
    checkpoint's round (0: none restored)."""
    import torch

    from swarmnode.policy.loading import load_policy
    from swarmnode.rl.checkpoint import load_latest_checkpoint
    from swarmnode.sim.adversary import load_node_config

    cfg = load_node_config(node_dir / "node.toml")
    policy = load_policy(cfg.model.model_copy(update={"dtype": "float32"}), torch.device("cpu"))
    ckpt = None if initial else load_latest_checkpoint(node_dir / "checkpoints")
    if ckpt is not None:
        ckpt.restore(policy.model, restore_rng=False)
    return cfg, policy, ckpt.round if ckpt is not None else 0


def node_accuracy_by_dataset(node_dir: Path, initial: bool = False) -> dict[str, Any]:
    from swarmnode.policy.evaluate import greedy_accuracy_by_dataset
    from swarmnode.policy.transformers_backend import TransformersBackend
    from swarmnode.tasks.registry import TaskRegistry

    cfg, policy, checkpoint_round = load_node_policy(node_dir, initial)
    registry = TaskRegistry.from_config(cfg.tasks)
    accuracy = greedy_accuracy_by_dataset(
        policy, TransformersBackend(policy), registry, cfg.tasks.eval_size, cfg.grpo.max_completion_length
    )
    sampled = sorted({entry.dataset for entry in cfg.tasks.mix}) or [cfg.tasks.preset]
    return {
        "node_dir": str(node_dir),
        "checkpoint_round": checkpoint_round,
        "samples": sampled,
        "accuracy": accuracy,
    }


def node_dirs(paths: list[Path]) -> list[Path]:
    """Node directories: the paths that hold a ``node.toml``, or every node under a run directory."""
    found: list[Path] = []
    for path in paths:
        if (path / "node.toml").exists():
            found.append(path)
        else:
            found.extend(sorted(p.parent for p in path.glob("runs/*/seed-*/node-*/node.toml")))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "paths", nargs="+", type=Path, help="a simulation's --out directory, or node directories"
    )
    parser.add_argument("--initial", action="store_true", help="evaluate the models the nodes started from")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    nodes = node_dirs(args.paths)
    if not nodes:
        print(
            f"no node directories (with node.toml) under {', '.join(map(str, args.paths))}", file=sys.stderr
        )
        return 2
    rows = []
    for node_dir in nodes:
        row = node_accuracy_by_dataset(node_dir, args.initial)
        parts = node_dir.parts
        row |= {"configuration": parts[-3], "seed": parts[-2], "node": parts[-1]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
