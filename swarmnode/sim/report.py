"""The simulation report: results table (markdown + JSON), per-node CSV, PNG plots, TensorBoard files.

What is measured (per node, from its metrics.jsonl, the source of truth):
- cumulative local reward: the sum over rounds of the mean reward of the node's OWN rollouts that
  round, scored by its own verifier. This is the headline: it moves only when the node's policy
  gets better at producing correct answers.
- paper-like batch reward: the same sum over the mean reward of the whole training batch (local
  plus the external groups chosen that round). Shown beside the headline, labelled, because it is
  inflated by selection: external groups pass a zero-variance filter at intake, so every one of
  them holds at least one correct completion, and the more external groups a configuration mixes
  in, the higher this figure climbs with no change in what the node learned.
- held-out greedy accuracy: every `eval_every` rounds (a curve) and at the end.
- compute: rollouts and tokens the node generated itself (a 4/4 node generates half of an 8/0's).
- share of the loss from external groups: the trainer's figure when it reports one
  (`loss_share_external`), and always the share of trained tokens from external groups.

Aggregation over a configuration: each seed's figure is the SUM over its nodes (cumulative
rewards, rollouts) or the MEAN over its nodes (accuracies); then mean and sample standard deviation
over seeds. Runs without `done.json` (unfinished) are left out and listed. The experiment's first
configuration is the baseline of every ratio.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import tomllib
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from swarmnode.sim.experiment import Experiment
from swarmnode.sim.placement import where_node_ran

# SAPO paper (arXiv 2509.08721): cumulative reward over 8 nodes x 2000 rounds, Qwen2.5-0.5B.
PAPER_RESULTS = {"8/0": 561.79, "6/2": 854.43, "4/4": 1093.31, "2/6": 945.87}
MOVING_AVERAGE = 10
DEFAULT_GROUP_SIZE = 8
GRAD_SPIKE = 10.0  # a round whose (largest) grad norm before clipping exceeds this counts as a spike
# Names under which the trainer may report the external share of the loss (tolerate absence).
LOSS_SHARE_KEYS = ("loss_share_external", "external_loss_share")
PAPER_LIKE_EXPLANATION = (
    "paper-like batch reward = the same sum over the whole training batch (own + chosen external "
    "groups). It is inflated by selection: external groups are filtered for non-zero reward variance "
    "at intake, so each holds a correct answer, and the figure rises with the external share even "
    "when nothing is learned. Shown for comparison with the paper only."
)


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


def mean_std(values: Iterable[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value; None, None for none)."""
    values = list(values)
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _resolved(node_dir: Path) -> dict[str, Any]:
    path = node_dir / "config.resolved.toml"
    try:
        return tomllib.loads(path.read_text()) if path.exists() else {}
    except tomllib.TOMLDecodeError:
        return {}


def node_record(rows: list[dict[str, Any]], group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, Any]:
    """A node's figures from its metrics rows (already cut to the experiment's rounds, sorted)."""
    evals = [(r["round"] + 1, r["eval_accuracy"]) for r in rows if r.get("eval_accuracy") is not None]
    loss_shares = [r[k] for r in rows for k in LOSS_SHARE_KEYS if r.get(k) is not None]
    tokens_local = sum(r.get("num_tokens_local", 0) or 0 for r in rows)
    tokens_external = sum(r.get("num_tokens_external", 0) or 0 for r in rows)
    trained = tokens_local + tokens_external
    return {
        "rounds": len(rows),
        "rewards": [r["reward_mean"] for r in rows],
        "cumulative_reward": sum(r["reward_mean"] for r in rows),
        # Old metrics files (or a round that trained nothing) have no batch figure: use the local one.
        "cumulative_batch_reward": sum(
            r["batch_reward_mean"] if r.get("batch_reward_mean") is not None else r["reward_mean"]
            for r in rows
        ),
        "external_used": sum(r.get("used_external", 0) for r in rows),
        "generated_rollouts": sum(r.get("used_local", 0) for r in rows) * group_size,
        "generated_tokens": sum(r.get("generated_tokens", 0) for r in rows),
        "external_token_share": tokens_external / trained if trained else None,
        "loss_share_external": statistics.fmean(loss_shares) if loss_shares else None,
        # A step with no local token trained (every local group flat): the audit's source of spikes.
        "external_only_steps": sum(
            1
            for r in rows
            if r.get("external_only_step")
            or (r.get("num_tokens_local") or 0) == 0
            and (r.get("num_tokens_external") or 0) > 0
        ),
        "grad_norm_spikes": sum(
            1 for r in rows if (r.get("grad_norm_max") or r.get("grad_norm") or 0) > GRAD_SPIKE
        ),
        "eval_curve": evals,
        "final_eval_accuracy": evals[-1][1] if evals else None,
    }


def collect(out: Path, experiment: Experiment) -> tuple[list[dict[str, Any]], list[str]]:
    """One record per (configuration, seed, node) of every finished run, and the unfinished runs."""
    records, unfinished = [], []
    for configuration in experiment.configurations:
        for seed in experiment.seeds:
            run = out / "runs" / configuration.slug / f"seed-{seed}"
            if not (run / "done.json").exists():
                if run.exists():
                    unfinished.append(f"{configuration.name} seed {seed}")
                continue
            for index in range(experiment.nodes):
                node_dir = run / f"node-{index}"
                rows = [r for r in read_metrics(node_dir / "metrics.jsonl") if r["round"] < experiment.rounds]
                rows.sort(key=lambda r: r["round"])
                resolved = _resolved(node_dir)
                group_size = resolved.get("grpo", {}).get("num_generations", DEFAULT_GROUP_SIZE)
                records.append(
                    {
                        "configuration": configuration.name,
                        "seed": seed,
                        "node": index,
                        "model": resolved.get("model", {}).get("path", "?"),
                        "ran_on": where_node_ran(node_dir),  # host and device, from placement.json
                        **node_record(rows, group_size),
                    }
                )
    return records, unfinished


def per_seed(records: list[dict[str, Any]], key: str, how: str = "sum") -> dict[int, float]:
    """A figure per seed over that seed's nodes: their sum or mean (nodes without the figure skipped)."""
    grouped: dict[int, list[float]] = defaultdict(list)
    for r in records:
        if r.get(key) is not None:
            grouped[r["seed"]].append(r[key])
    reduce = sum if how == "sum" else statistics.fmean
    return {seed: reduce(values) for seed, values in sorted(grouped.items())}


def eval_curve(records: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Held-out accuracy per evaluation round: per seed the mean over nodes, then mean/std over seeds.

    Only rounds every finished seed evaluated are kept, so a point never mixes different seed sets.
    """
    by_round: dict[int, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    seeds = {r["seed"] for r in records}
    for r in records:
        for round_number, accuracy in r["eval_curve"]:
            by_round[round_number][r["seed"]].append(accuracy)
    curve = []
    for round_number in sorted(by_round):
        if set(by_round[round_number]) != seeds:
            continue
        mean, std = mean_std(statistics.fmean(v) for v in by_round[round_number].values())
        curve.append({"round": round_number, "mean": mean, "std": std})
    return curve


def _ratio(value: float | None, baseline: float | None) -> float | None:
    return value / baseline if value is not None and baseline else None


def summarize(records: list[dict[str, Any]], experiment: Experiment) -> list[dict[str, Any]]:
    """One row per configuration; ratios are to the experiment's first configuration (None while it has
    no finished run: a ratio to another configuration would read as a result)."""
    rows: list[dict[str, Any]] = []
    baseline: dict[str, Any] | None = None
    for configuration in experiment.configurations:
        mine = [r for r in records if r["configuration"] == configuration.name]
        local = per_seed(mine, "cumulative_reward")
        batch = per_seed(mine, "cumulative_batch_reward")
        accuracy = per_seed(mine, "final_eval_accuracy", how="mean")
        rollouts = per_seed(mine, "generated_rollouts")
        tokens = per_seed(mine, "generated_tokens")
        local_mean, local_std = mean_std(local.values())
        batch_mean, batch_std = mean_std(batch.values())
        acc_mean, acc_std = mean_std(accuracy.values())
        node_accuracies = [r["final_eval_accuracy"] for r in mine if r["final_eval_accuracy"] is not None]
        nodes = experiment.nodes
        rollouts_mean = mean_std(rollouts.values())[0]
        row = {
            "configuration": configuration.name,
            "seeds": len(local),
            "seed_list": sorted(local),
            "cumulative_reward_mean": local_mean,
            "cumulative_reward_std": local_std,
            "per_seed": local,
            "final_eval_accuracy_mean": acc_mean,
            "final_eval_accuracy_std": acc_std,
            "final_eval_accuracy_per_seed": accuracy,
            "final_eval_accuracy_node_min": min(node_accuracies) if node_accuracies else None,
            "final_eval_accuracy_node_max": max(node_accuracies) if node_accuracies else None,
            "eval_curve": eval_curve(mine),
            "paper_like_batch_reward_mean": batch_mean,
            "paper_like_batch_reward_std": batch_std,
            "generated_rollouts_per_node": rollouts_mean / nodes if rollouts_mean is not None else None,
            "generated_tokens_per_node": (mean_std(tokens.values())[0] or 0) / nodes if tokens else None,
            # Learning per unit of compute: own-rollout reward earned per 1000 rollouts generated.
            "cumulative_reward_per_1k_rollouts": 1000 * local_mean / rollouts_mean
            if local_mean is not None and rollouts_mean
            else None,
            "external_token_share": mean_std(
                r["external_token_share"] for r in mine if r["external_token_share"] is not None
            )[0],
            "loss_share_external": mean_std(
                r["loss_share_external"] for r in mine if r["loss_share_external"] is not None
            )[0],
            "external_only_steps_per_node": mean_std(r["external_only_steps"] for r in mine)[0],
            "grad_norm_spikes_per_node": mean_std(r["grad_norm_spikes"] for r in mine)[0],
            "paper_cumulative_reward": PAPER_RESULTS.get(configuration.name),
            "paper_vs_8_0": PAPER_RESULTS[configuration.name] / PAPER_RESULTS["8/0"]
            if configuration.name in PAPER_RESULTS
            else None,
        }
        if baseline is None and local and configuration == experiment.configurations[0]:
            baseline = row
        rows.append(row)
    for row in rows:
        base = baseline or {}
        row["baseline"] = base.get("configuration")
        row["vs_baseline"] = _ratio(row["cumulative_reward_mean"], base.get("cumulative_reward_mean"))
        row["vs_first"] = row["vs_baseline"]  # the name older reports used
        row["paper_like_vs_baseline"] = _ratio(
            row["paper_like_batch_reward_mean"], base.get("paper_like_batch_reward_mean")
        )
        row["compute_efficiency_vs_baseline"] = _ratio(
            row["cumulative_reward_per_1k_rollouts"], base.get("cumulative_reward_per_1k_rollouts")
        )
        row["final_eval_accuracy_vs_baseline"] = (
            row["final_eval_accuracy_mean"] - base["final_eval_accuracy_mean"]
            if row["final_eval_accuracy_mean"] is not None
            and base.get("final_eval_accuracy_mean") is not None
            else None
        )
    return rows


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def _times(value: float | None) -> str:
    """A ratio as "1.23x", or "-" where there is none (not "-x")."""
    return "-" if value is None or value != value else f"{value:.2f}x"


def _pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    return f"{_fmt(mean, digits)} ± {_fmt(std, digits)}" if mean is not None else "-"


def write_markdown(
    path: Path,
    experiment: Experiment,
    summary: list[dict[str, Any]],
    records: list[dict[str, Any]],
    unfinished: list[str] | None = None,
) -> None:
    base = next((row["baseline"] for row in summary if row["baseline"]), None)
    lines = [
        f"# {experiment.name}: simulation report",
        "",
        f"{experiment.nodes} nodes x {experiment.rounds} rounds, seeds {list(experiment.seeds)}; "
        f"experiment `{experiment.source}`. Baseline of every ratio: `{base}`.",
        "",
        "- **cumulative local reward** (the headline) = sum over nodes and rounds of each node's mean "
        "reward on its OWN rollouts (own verifier); mean ± std over seeds.",
        "- **held-out accuracy** = greedy accuracy on the held-out questions at the end; per seed the mean "
        "over nodes, then mean ± std over seeds (node min-max beside it).",
        f"- {PAPER_LIKE_EXPLANATION}",
        "- **reward per 1k rollouts** = cumulative local reward / rollouts the nodes generated themselves "
        "(learning per unit of compute; a 4/4 node generates half the rollouts of an 8/0 node).",
        "",
    ]
    if unfinished:
        lines += [f"**Partial:** unfinished runs left out: {', '.join(unfinished)}.", ""]
    lines += [
        "| configuration | seeds | cumulative local reward | vs baseline | final held-out accuracy | node min-max "
        "| paper-like batch reward (inflated) | vs baseline | reward per 1k rollouts | external token share "
        "| paper vs 8/0 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        lines.append(
            f"| {row['configuration']} | {row['seeds']} | "
            f"{_pm(row['cumulative_reward_mean'], row['cumulative_reward_std'], 1)} | {_times(row['vs_baseline'])} | "
            f"{_pm(row['final_eval_accuracy_mean'], row['final_eval_accuracy_std'], 3)} | "
            f"{_fmt(row['final_eval_accuracy_node_min'], 3)}-{_fmt(row['final_eval_accuracy_node_max'], 3)} | "
            f"{_pm(row['paper_like_batch_reward_mean'], row['paper_like_batch_reward_std'], 1)} | "
            f"{_times(row['paper_like_vs_baseline'])} | {_fmt(row['cumulative_reward_per_1k_rollouts'], 3)} | "
            f"{_fmt(row['external_token_share'])} | {_times(row['paper_vs_8_0'])} |"
        )
    lines += [
        "",
        "| configuration | loss share external (trainer) | external-only steps per node | "
        f"rounds with grad norm > {GRAD_SPIKE:g} per node | rollouts generated per node |",
        "|---|---|---|---|---|",
    ]
    for row in summary:
        lines.append(
            f"| {row['configuration']} | {_fmt(row['loss_share_external'])} | "
            f"{_fmt(row['external_only_steps_per_node'], 1)} | {_fmt(row['grad_norm_spikes_per_node'], 1)} | "
            f"{_fmt(row['generated_rollouts_per_node'], 0)} |"
        )
    curves = [row for row in summary if row["eval_curve"]]
    if curves:
        rounds = sorted({p["round"] for row in curves for p in row["eval_curve"]})
        lines += [
            "",
            "## Held-out accuracy curve (mean ± std over seeds)",
            "",
            "| round | " + " | ".join(row["configuration"] for row in curves) + " |",
            "|---|" + "---|" * len(curves),
        ]
        for round_number in rounds:
            cells = []
            for row in curves:
                point = next((p for p in row["eval_curve"] if p["round"] == round_number), None)
                cells.append(_pm(point["mean"], point["std"], 3) if point else "-")
            lines.append(f"| {round_number} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Per node (mean over seeds)",
        "",
        "| configuration | node | model | ran on | cumulative local reward | "
        "external groups used | external-only steps | loss share external | final held-out accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        grouped[(r["configuration"], r["node"])].append(r)
    for (name, node), rs in grouped.items():
        lines.append(
            f"| {name} | {node} | {rs[0]['model']} | {', '.join(sorted({r['ran_on'] for r in rs}))} | {_pm(*mean_std(r['cumulative_reward'] for r in rs), 1)} | "
            f"{statistics.fmean(r['external_used'] for r in rs):.0f} | "
            f"{statistics.fmean(r['external_only_steps'] for r in rs):.0f} | "
            f"{_fmt(mean_std(r['loss_share_external'] for r in rs if r['loss_share_external'] is not None)[0])} | "
            f"{_fmt(mean_std(r['final_eval_accuracy'] for r in rs if r['final_eval_accuracy'] is not None)[0], 3)} |"
        )
    lines += [
        "",
        "Plots: `reward_curves.png` (moving average over "
        f"{MOVING_AVERAGE} rounds), `cumulative_reward.png`, `heldout_accuracy.png`. TensorBoard: "
        "`tensorboard --logdir runs/` (one event file per node). Per-node metrics: "
        "`runs/<configuration>/seed-<s>/node-<i>/metrics.jsonl`, resolved configs next to them.",
        "",
    ]
    path.write_text("\n".join(lines))


def plot(
    out: Path,
    experiment: Experiment,
    records: list[dict[str, Any]],
    summary: list[dict[str, Any]] | None = None,
) -> list[Path]:
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
    for ax, ylabel in (
        (ax_curves, f"mean local reward (moving avg {MOVING_AVERAGE})"),
        (ax_cum, "cumulative local reward, summed over nodes"),
    ):
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_curves.set_title(f"{experiment.name}: own-rollout reward per round (mean over nodes and seeds)")
    ax_cum.set_title(f"{experiment.name}: cumulative local reward")
    figures = [(fig_curves, "reward_curves.png"), (fig_cum, "cumulative_reward.png")]
    with_curve = [row for row in summary or [] if row["eval_curve"]]
    if with_curve:
        fig_eval, ax_eval = plt.subplots(figsize=(8, 4.5))
        for row in with_curve:
            xs = [p["round"] for p in row["eval_curve"]]
            means = [p["mean"] for p in row["eval_curve"]]
            stds = [p["std"] for p in row["eval_curve"]]
            ax_eval.errorbar(xs, means, yerr=stds, capsize=3, marker="o", label=row["configuration"])
        ax_eval.set_xlabel("round")
        ax_eval.set_ylabel("held-out greedy accuracy (mean ± std over seeds)")
        ax_eval.set_title(f"{experiment.name}: held-out accuracy")
        ax_eval.grid(alpha=0.3)
        ax_eval.legend()
        figures.append((fig_eval, "heldout_accuracy.png"))
    for fig, name in figures:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)
    return paths


# Round metrics written to TensorBoard (scalars only; metrics.jsonl keeps everything).
TENSORBOARD_KEYS = (
    "reward_mean",
    "reward_mean_external",
    "batch_reward_mean",
    "eval_accuracy",
    "loss",
    "grad_norm",
    "entropy",
    "used_external",
    "accepted",
    "received",
    "pool_size",
    "num_tokens_local",
    "num_tokens_external",
    "clip_frac_low",
    "clip_frac_high",
    "grad_norm_max",
    "entropy_local",
    "entropy_external",
    "ratio_mean_external",
    "is_weight_mean",
    *LOSS_SHARE_KEYS,
    "round_seconds",
)


def write_tensorboard(out: Path, experiment: Experiment) -> list[Path]:
    """One event file per node under `<node dir>/tensorboard/` (rewritten each time the report runs)."""
    from swarmnode.sim.tb_events import EventFileWriter

    written = []
    for configuration in experiment.configurations:
        for seed in experiment.seeds:
            run = out / "runs" / configuration.slug / f"seed-{seed}"
            for index in range(experiment.nodes):
                node_dir = run / f"node-{index}"
                rows = read_metrics(node_dir / "metrics.jsonl")
                if not rows:
                    continue
                logdir = node_dir / "tensorboard"
                for old in logdir.glob("events.out.tfevents.*"):
                    old.unlink()
                with EventFileWriter(logdir, wall_time=rows[0].get("time")) as writer:
                    for r in sorted(rows, key=lambda r: r["round"]):
                        scalars = {
                            key: r[key]
                            for key in TENSORBOARD_KEYS
                            if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)
                        }
                        writer.add_scalars(r["round"], scalars, wall_time=r.get("time"))
                written.append(writer.path)
    return written


def summary_entry(
    experiment: Experiment, summary: list[dict[str, Any]], unfinished: list[str]
) -> dict[str, Any]:
    """The compact per-experiment entry of docs/results/summary.json."""
    keep = (
        "configuration",
        "seeds",
        "seed_list",
        "cumulative_reward_mean",
        "cumulative_reward_std",
        "vs_baseline",
        "final_eval_accuracy_mean",
        "final_eval_accuracy_std",
        "final_eval_accuracy_vs_baseline",
        "paper_like_batch_reward_mean",
        "paper_like_batch_reward_std",
        "paper_like_vs_baseline",
        "generated_rollouts_per_node",
        "cumulative_reward_per_1k_rollouts",
        "external_token_share",
        "loss_share_external",
        "external_only_steps_per_node",
        "grad_norm_spikes_per_node",
    )
    return {
        "nodes": experiment.nodes,
        "rounds": experiment.rounds,
        "baseline": next((row["baseline"] for row in summary if row["baseline"]), None),
        "unfinished_runs": unfinished,
        "paper_like_note": PAPER_LIKE_EXPLANATION,
        "configurations": [{k: _clean(row[k]) for k in keep} for row in summary],
    }


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    return value


def build_report(out: Path, experiment: Experiment) -> Path:
    records, unfinished = collect(out, experiment)
    summary = summarize(records, experiment)
    (out / "results.json").write_text(
        json.dumps(
            {
                "summary": summary,
                "unfinished_runs": unfinished,
                "summary_entry": summary_entry(experiment, summary, unfinished),
                "nodes": [{k: v for k, v in r.items() if k != "rewards"} for r in records],
            },
            indent=1,
        )
    )
    with (out / "per_node.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "configuration",
                "seed",
                "node",
                "model",
                "rounds",
                "cumulative_reward",
                "cumulative_batch_reward",
                "generated_rollouts",
                "external_used",
                "external_token_share",
                "final_eval_accuracy",
            ]
        )
        for r in records:
            writer.writerow(
                [
                    r["configuration"],
                    r["seed"],
                    r["node"],
                    r["model"],
                    r["rounds"],
                    f"{r['cumulative_reward']:.4f}",
                    f"{r['cumulative_batch_reward']:.4f}",
                    r["generated_rollouts"],
                    r["external_used"],
                    r["external_token_share"],
                    r["final_eval_accuracy"],
                ]
            )
    write_markdown(out / "report.md", experiment, summary, records, unfinished)
    write_tensorboard(out, experiment)
    if records:
        plot(out, experiment, records, summary)
    return out / "report.md"
