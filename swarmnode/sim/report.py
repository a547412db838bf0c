"""The simulation report: a results table (markdown + JSON), per-node CSV and PNG plots.

Cumulative training reward of a node = the sum over its rounds of the mean reward of its own
(local) rollouts that round, as scored by its own verifier. A configuration's cumulative reward is
the sum over its nodes, averaged over seeds (with the spread over seeds). Held-out greedy accuracy
is each node's final `eval_accuracy` (if the experiment evaluates).
"""

from __future__ import annotations

import csv
import json
import statistics
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

from swarmnode.sim.experiment import Experiment

# SAPO paper (arXiv 2509.08721): cumulative reward over 8 nodes x 2000 rounds, Qwen2.5-0.5B.
PAPER_RESULTS = {"8/0": 561.79, "6/2": 854.43, "4/4": 1093.31, "2/6": 945.87}
MOVING_AVERAGE = 10


def read_metrics(path: Path, tail: int | None = None) -> list[dict[str, Any]]:
    """Rows of a node's metrics.jsonl; a line cut by a crash is skipped."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for line in lines[-tail:] if tail else lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def collect(out: Path, experiment: Experiment) -> list[dict[str, Any]]:
    """One record per (configuration, seed, node) with its reward curve and final accuracy."""
    records = []
    for configuration in experiment.configurations:
        for seed in experiment.seeds:
            run = out / "runs" / configuration.slug / f"seed-{seed}"
            if not (run / "done.json").exists():
                continue
            for index in range(experiment.nodes):
                node_dir = run / f"node-{index}"
                rows = [r for r in read_metrics(node_dir / "metrics.jsonl") if r["round"] < experiment.rounds]
                rows.sort(key=lambda r: r["round"])
                evals = [r["eval_accuracy"] for r in rows if r.get("eval_accuracy") is not None]
                resolved = node_dir / "config.resolved.toml"
                model = tomllib.loads(resolved.read_text())["model"]["path"] if resolved.exists() else "?"
                records.append({
                    "configuration": configuration.name,
                    "seed": seed,
                    "node": index,
                    "model": model,
                    "rounds": len(rows),
                    "rewards": [r["reward_mean"] for r in rows],
                    "cumulative_reward": sum(r["reward_mean"] for r in rows),
                    "external_used": sum(r.get("used_external", 0) for r in rows),
                    "final_eval_accuracy": evals[-1] if evals else None,
                })
    return records


def summarize(records: list[dict[str, Any]], experiment: Experiment) -> list[dict[str, Any]]:
    rows = []
    baseline = None
    for configuration in experiment.configurations:
        mine = [r for r in records if r["configuration"] == configuration.name]
        by_seed: dict[int, float] = defaultdict(float)
        for r in mine:
            by_seed[r["seed"]] += r["cumulative_reward"]
        mean, std = _mean_std(list(by_seed.values()))
        evals = [r["final_eval_accuracy"] for r in mine if r["final_eval_accuracy"] is not None]
        if baseline is None and by_seed:
            baseline = mean
        rows.append({
            "configuration": configuration.name,
            "seeds": len(by_seed),
            "cumulative_reward_mean": mean,
            "cumulative_reward_std": std,
            "per_seed": dict(sorted(by_seed.items())),
            "vs_first": mean / baseline if baseline else None,
            "final_eval_accuracy_mean": statistics.fmean(evals) if evals else None,
            "paper_cumulative_reward": PAPER_RESULTS.get(configuration.name),
            "paper_vs_8_0": PAPER_RESULTS[configuration.name] / PAPER_RESULTS["8/0"]
            if configuration.name in PAPER_RESULTS else None,
        })
    return rows


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def write_markdown(path: Path, experiment: Experiment, summary: list[dict[str, Any]],
                   records: list[dict[str, Any]]) -> None:
    lines = [
        f"# {experiment.name}: simulation report",
        "",
        f"{experiment.nodes} nodes x {experiment.rounds} rounds, seeds {list(experiment.seeds)}; "
        f"experiment `{experiment.source}`.",
        "Cumulative reward = sum over nodes and rounds of each node's mean local reward per round "
        "(own verifier), mean ± std over seeds. The first configuration is the reference for the ratio.",
        "",
        "| configuration | seeds | cumulative reward | vs first | final held-out accuracy | paper (8 x 0.5B, 2000 rounds) | paper vs 8/0 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        lines.append(
            f"| {row['configuration']} | {row['seeds']} | {_fmt(row['cumulative_reward_mean'])} ± "
            f"{_fmt(row['cumulative_reward_std'])} | {_fmt(row['vs_first'])}x | "
            f"{_fmt(row['final_eval_accuracy_mean'], 3)} | {_fmt(row['paper_cumulative_reward'])} | "
            f"{_fmt(row['paper_vs_8_0'])}x |"
        )
    lines += ["", "## Per node (mean over seeds)", "", "| configuration | node | model | cumulative reward | "
              "external groups used | final held-out accuracy |", "|---|---|---|---|---|---|"]
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        grouped[(r["configuration"], r["node"])].append(r)
    for (name, node), rs in grouped.items():
        mean, std = _mean_std([r["cumulative_reward"] for r in rs])
        evals = [r["final_eval_accuracy"] for r in rs if r["final_eval_accuracy"] is not None]
        lines.append(
            f"| {name} | {node} | {rs[0]['model']} | {_fmt(mean)} ± {_fmt(std)} | "
            f"{statistics.fmean(r['external_used'] for r in rs):.0f} | "
            f"{_fmt(statistics.fmean(evals) if evals else None, 3)} |"
        )
    lines += ["", "Plots: `reward_curves.png` (moving average over "
              f"{MOVING_AVERAGE} rounds), `cumulative_reward.png`. Per-node metrics: "
              "`runs/<configuration>/seed-<s>/node-<i>/metrics.jsonl`, resolved configs next to them.", ""]
    path.write_text("\n".join(lines))


def plot(out: Path, experiment: Experiment, records: list[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig_curves, ax_curves = plt.subplots(figsize=(8, 4.5))
    fig_cum, ax_cum = plt.subplots(figsize=(8, 4.5))
    for configuration in experiment.configurations:
        curves = [r["rewards"] for r in records if r["configuration"] == configuration.name and r["rewards"]]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        mean_curve = [statistics.fmean(c[i] for c in curves) for i in range(length)]
        ax_curves.plot(_moving_average(mean_curve, MOVING_AVERAGE), label=configuration.name)
        # Cumulative, summed over nodes: mean per node-round times nodes.
        cumulative, total = [], 0.0
        for value in mean_curve:
            total += value * experiment.nodes
            cumulative.append(total)
        ax_cum.plot(cumulative, label=configuration.name)
    for ax, ylabel in ((ax_curves, f"mean local reward (moving avg {MOVING_AVERAGE})"),
                       (ax_cum, "cumulative reward, summed over nodes")):
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_curves.set_title(f"{experiment.name}: reward per round (mean over nodes and seeds)")
    ax_cum.set_title(f"{experiment.name}: cumulative reward")
    for fig, name in ((fig_curves, "reward_curves.png"), (fig_cum, "cumulative_reward.png")):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)
    return paths


def build_report(out: Path, experiment: Experiment) -> Path:
    records = collect(out, experiment)
    summary = summarize(records, experiment)
    (out / "results.json").write_text(json.dumps({"summary": summary, "nodes": [
        {k: v for k, v in r.items() if k != "rewards"} for r in records]}, indent=1))
    with (out / "per_node.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["configuration", "seed", "node", "model", "rounds", "cumulative_reward",
                         "external_used", "final_eval_accuracy"])
        for r in records:
            writer.writerow([r["configuration"], r["seed"], r["node"], r["model"], r["rounds"],
                             f"{r['cumulative_reward']:.4f}", r["external_used"], r["final_eval_accuracy"]])
    write_markdown(out / "report.md", experiment, summary, records)
    if records:
        plot(out, experiment, records)
    return out / "report.md"
