"""The simulation report's aggregation against hand-computed values, and its TensorBoard event files."""

from __future__ import annotations

import csv
import json
import math
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmnode.sim import report as report_module
from swarmnode.sim import tb_events
from swarmnode.sim.experiment import parse_experiment
from swarmnode.sim.report import (
    PAPER_LIKE_EXPLANATION,
    _clean,
    _moving_average,
    build_report,
    collect,
    eval_curve,
    mean_std,
    node_record,
    per_seed,
    plot,
    read_metrics,
    summarize,
    summary_entry,
    write_markdown,
    write_tensorboard,
)
from swarmnode.sim.tb_events import EventFileWriter, crc32c, read_scalars

EXPERIMENT = parse_experiment(
    {
        "name": "hand",
        "nodes": 2,
        "rounds": 3,
        "seeds": [0, 1, 2],
        "configuration": [
            {"name": "8/0", "set": {"sampler.local_groups": 8, "sampler.external_groups": 0}},
            {"name": "4/4", "set": {"sampler.local_groups": 4, "sampler.external_groups": 4}},
        ],
    }
)

# rewards per (configuration slug, seed, node); 8-0 seed 2 never finishes.
REWARDS = {
    ("8-0", 0, 0): [0.1, 0.2, 0.3],
    ("8-0", 0, 1): [0.0, 0.5, 0.5],
    ("8-0", 1, 0): [0.2, 0.2, 0.2],
    ("8-0", 1, 1): [0.4, 0.4, 0.4],
    ("8-0", 2, 0): [0.9, 0.9, 0.9],
    ("8-0", 2, 1): [0.9, 0.9, 0.9],
    ("4-4", 0, 0): [0.5, 0.5, 0.5],
    ("4-4", 0, 1): [0.3, 0.3, 0.3],
    ("4-4", 1, 0): [1.0, 1.0, 1.0],
    ("4-4", 1, 1): [0.0, 0.0, 0.3],
    ("4-4", 2, 0): [0.5, 0.5, 0.5],
    ("4-4", 2, 1): [0.5, 0.5, 0.5],
}
# held-out accuracy after round 1 and after round 3, 8-0 only (4-4 evaluates only at the end)
EVALS = {
    ("8-0", 0, 0): (0.2, 0.4),
    ("8-0", 0, 1): (0.2, 0.6),
    ("8-0", 1, 0): (0.1, 0.3),
    ("8-0", 1, 1): (0.3, 0.5),
}


def write_runs(out: Path) -> None:
    for (slug, seed, node), rewards in REWARDS.items():
        node_dir = out / "runs" / slug / f"seed-{seed}" / f"node-{node}"
        node_dir.mkdir(parents=True)
        lines = []
        for round_index, reward in enumerate(rewards):
            row = {
                "round": round_index,
                "time": 1000.0 + round_index,
                "reward_mean": reward,
                "used_local": 8 if slug == "8-0" else 4,
                "generated_tokens": 100,
            }
            if slug == "4-4":
                row.update(
                    batch_reward_mean=1.0, used_external=4, num_tokens_local=10, num_tokens_external=30
                )
            if (slug, seed, node) in EVALS and round_index in (0, 2):
                row["eval_accuracy"] = EVALS[(slug, seed, node)][0 if round_index == 0 else 1]
            if slug == "4-4" and round_index == 2:
                row["eval_accuracy"] = 0.5
            lines.append(json.dumps(row))
        lines.append(
            json.dumps({"round": 3, "time": 2000.0, "reward_mean": 100.0})
        )  # past the experiment's rounds
        lines.append('{"round": 4, "reward_me')  # torn by a crash
        (node_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    for slug, seed in (("8-0", 0), ("8-0", 1), ("4-4", 0), ("4-4", 1), ("4-4", 2)):
        (out / "runs" / slug / f"seed-{seed}" / "done.json").write_text("{}")


@pytest.fixture
def summary(tmp_path: Path) -> dict[str, dict]:
    write_runs(tmp_path)
    records, unfinished = collect(tmp_path, EXPERIMENT)
    assert unfinished == ["8/0 seed 2"]
    return {row["configuration"]: row for row in summarize(records, EXPERIMENT)}


def test_cumulative_local_reward_sums_nodes_per_seed_then_mean_and_std_over_seeds(summary):
    base, shared = summary["8/0"], summary["4/4"]
    assert base["seeds"] == 2 and base["seed_list"] == [0, 1]  # the unfinished seed 2 is left out
    assert base["per_seed"] == pytest.approx({0: 1.6, 1: 1.8})
    assert base["cumulative_reward_mean"] == pytest.approx(1.7)
    assert base["cumulative_reward_std"] == pytest.approx(math.sqrt(0.02))
    assert shared["per_seed"] == pytest.approx({0: 2.4, 1: 3.3, 2: 3.0})
    assert shared["cumulative_reward_mean"] == pytest.approx(2.9)
    assert shared["cumulative_reward_std"] == pytest.approx(math.sqrt(0.21))
    assert shared["vs_baseline"] == pytest.approx(2.9 / 1.7) and base["vs_baseline"] == pytest.approx(1.0)


def test_held_out_accuracy_final_and_curve(summary):
    base, shared = summary["8/0"], summary["4/4"]
    assert base["final_eval_accuracy_per_seed"] == pytest.approx({0: 0.5, 1: 0.4})
    assert base["final_eval_accuracy_mean"] == pytest.approx(0.45)
    assert base["final_eval_accuracy_std"] == pytest.approx(math.sqrt(0.005))
    assert (base["final_eval_accuracy_node_min"], base["final_eval_accuracy_node_max"]) == (0.3, 0.6)
    assert [p["round"] for p in base["eval_curve"]] == [1, 3]
    assert base["eval_curve"][0]["mean"] == pytest.approx(0.2) and base["eval_curve"][0]["std"] == 0.0
    assert (
        shared["final_eval_accuracy_mean"] == pytest.approx(0.5) and shared["final_eval_accuracy_std"] == 0.0
    )
    assert shared["final_eval_accuracy_vs_baseline"] == pytest.approx(0.05)


def test_paper_like_batch_metric_and_compute(summary):
    base, shared = summary["8/0"], summary["4/4"]
    # No batch figure in the 8/0 rows: the local reward stands in; 4/4 nodes report 1.0 per round.
    assert base["paper_like_batch_reward_mean"] == pytest.approx(1.7)
    assert shared["paper_like_batch_reward_mean"] == pytest.approx(6.0)
    assert shared["paper_like_vs_baseline"] == pytest.approx(6.0 / 1.7)
    assert (
        base["generated_rollouts_per_node"] == 3 * 8 * 8
        and shared["generated_rollouts_per_node"] == 3 * 4 * 8
    )
    assert base["cumulative_reward_per_1k_rollouts"] == pytest.approx(1000 * 1.7 / 384)
    assert shared["compute_efficiency_vs_baseline"] == pytest.approx(2 * 2.9 / 1.7)
    assert shared["external_token_share"] == pytest.approx(0.75) and base["external_token_share"] is None
    assert shared["loss_share_external"] is None  # the trainer did not report it: tolerated


def test_node_record_counts_external_only_steps_and_loss_share():
    rows = [
        {
            "round": 0,
            "reward_mean": 0.0,
            "num_tokens_local": 0,
            "num_tokens_external": 20,
            "loss_share_external": 1.0,
        },
        {
            "round": 1,
            "reward_mean": 0.5,
            "num_tokens_local": 20,
            "num_tokens_external": 20,
            "loss_share_external": 0.5,
        },
        {"round": 2, "reward_mean": 0.25, "num_tokens_local": 0, "num_tokens_external": 0},
    ]
    record = node_record(rows, group_size=4)
    assert record["external_only_steps"] == 1
    assert record["loss_share_external"] == pytest.approx(0.75)
    assert record["external_token_share"] == pytest.approx(40 / 60)
    assert record["cumulative_reward"] == pytest.approx(0.75) and record["generated_rollouts"] == 0


def test_eval_curve_keeps_only_rounds_every_seed_evaluated():
    records = [
        {"seed": 0, "eval_curve": [(10, 0.2), (20, 0.4)]},
        {"seed": 1, "eval_curve": [(10, 0.4)]},
    ]
    assert eval_curve(records) == [
        {"round": 10, "mean": pytest.approx(0.3), "std": pytest.approx(math.sqrt(0.02))}
    ]


def test_build_report_writes_summary_and_one_tensorboard_file_per_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    write_runs(tmp_path)
    plotted: list[tuple] = []  # plots are rendered (and checked) in test_plots_show_the_hand_computed_curves
    monkeypatch.setattr(report_module, "plot", lambda *args: plotted.append(args))
    assert build_report(tmp_path, EXPERIMENT) == tmp_path / "report.md"
    ((out, experiment, records, summary),) = plotted
    assert (out, experiment, len(records)) == (tmp_path, EXPERIMENT, 10)
    assert [row["configuration"] for row in summary] == ["8/0", "4/4"]
    results = json.loads((tmp_path / "results.json").read_text())
    entry = results["summary_entry"]
    assert entry["baseline"] == "8/0" and entry["unfinished_runs"] == ["8/0 seed 2"]
    assert [c["configuration"] for c in entry["configurations"]] == ["8/0", "4/4"]
    assert entry["configurations"][1]["vs_baseline"] == pytest.approx(2.9 / 1.7, abs=1e-6)
    report = (tmp_path / "report.md").read_text()
    assert "**Partial:** unfinished runs left out: 8/0 seed 2" in report
    assert "| 4/4 | 3 | 8.7 ± 0.0" not in report and "| 4/4 | 3 | 2.9 ± 0.5 | 1.71x |" in report
    files = sorted(tmp_path.glob("runs/*/seed-*/node-*/tensorboard/events.out.tfevents.*"))
    assert len(files) == len(REWARDS)  # every node, unfinished runs included (to watch them live)
    node = tmp_path / "runs/4-4/seed-1/node-1/tensorboard"
    scalars = read_scalars(next(node.iterdir()))
    assert [(s, v) for s, t, v in scalars if t == "reward_mean"] == [
        (0, 0.0),
        (1, 0.0),
        (2, pytest.approx(0.3)),
        (3, 100.0),
    ]
    assert [(s, v) for s, t, v in scalars if t == "eval_accuracy"] == [(2, 0.5)]
    # the JSON (indent 1: diffable), the per-node CSV and the plots
    text = (tmp_path / "results.json").read_text()
    assert text.startswith('{\n "summary": [\n  {\n   "configuration": "8/0"')
    assert results["unfinished_runs"] == ["8/0 seed 2"]
    assert [(n["configuration"], n["seed"], n["node"]) for n in results["nodes"]][:2] == [
        ("8/0", 0, 0),
        ("8/0", 0, 1),
    ]
    assert all("rewards" not in n and "cumulative_reward" in n for n in results["nodes"])
    assert (entry["nodes"], entry["rounds"], entry["paper_like_note"]) == (2, 3, PAPER_LIKE_EXPLANATION)
    assert entry["configurations"][1]["cumulative_reward_std"] == round(math.sqrt(0.21), 6)
    with (tmp_path / "per_node.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == [
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
    assert rows[2] == ["8/0", "0", "1", "?", "3", "1.0000", "1.0000", "192", "0", "", "0.6"]
    assert rows[-1] == ["4/4", "2", "1", "?", "3", "1.5000", "3.0000", "96", "12", "0.75", "0.5"]
    assert b"\r\r" not in (tmp_path / "per_node.csv").read_bytes()  # newline="" for csv


def test_crc32c_and_event_round_trip(tmp_path: Path):
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    with EventFileWriter(tmp_path, wall_time=5.0) as writer:
        writer.add_scalars(7, {"a": 0.5, "b": -2.0, "skipped": float("nan")})
        writer.add_scalars(-1, {"a": 1.0})
    assert read_scalars(writer.path) == [(7, "a", 0.5), (7, "b", -2.0), ((1 << 64) - 1, "a", 1.0)]
    data = bytearray(writer.path.read_bytes())
    data[-5] ^= 1  # one flipped bit in the last record
    writer.path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        read_scalars(writer.path)


def _records(values: dict[tuple[int, int], float]) -> list[dict]:
    return [{"seed": s, "node": n, "cumulative_reward": v} for (s, n), v in values.items()]


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.tuples(st.integers(0, 4), st.integers(0, 5)),
        st.floats(0, 1000, allow_nan=False),
        min_size=1,
        max_size=30,
    )
)
def test_aggregation_properties(values: dict[tuple[int, int], float]):
    records = _records(values)
    sums = per_seed(records, "cumulative_reward")
    assert set(sums) == {s for s, _ in values}
    assert sum(sums.values()) == pytest.approx(sum(values.values()))
    assert per_seed(list(reversed(records)), "cumulative_reward") == pytest.approx(
        sums
    )  # node order is irrelevant
    mean, std = mean_std(sums.values())
    assert min(sums.values()) - 1e-9 <= mean <= max(sums.values()) + 1e-9
    assert std >= 0 and (len(sums) > 1 or std == 0)
    means = per_seed(records, "cumulative_reward", how="mean")
    counts = {s: sum(1 for k in values if k[0] == s) for s in sums}
    assert all(means[s] == pytest.approx(sums[s] / counts[s]) for s in sums)


def test_no_ratio_while_the_baseline_has_no_finished_run(tmp_path: Path):
    write_runs(tmp_path)
    for seed in (0, 1):
        (tmp_path / "runs" / "8-0" / f"seed-{seed}" / "done.json").unlink()
    records, unfinished = collect(tmp_path, EXPERIMENT)
    assert unfinished == ["8/0 seed 0", "8/0 seed 1", "8/0 seed 2"]
    summary = summarize(records, EXPERIMENT)
    shared = summary[1]
    assert summary_entry(EXPERIMENT, summary, unfinished)["baseline"] is None
    write_markdown(tmp_path / "report.md", EXPERIMENT, summary, records, unfinished)
    assert "Baseline of every ratio: `None`." in (tmp_path / "report.md").read_text()
    assert summary[0]["generated_tokens_per_node"] is None  # no finished run
    assert shared["cumulative_reward_mean"] == pytest.approx(2.9)
    assert (
        shared["baseline"] is None
        and shared["vs_baseline"] is None
        and shared["paper_like_vs_baseline"] is None
    )


# -- the written report, plots and files, against hand-computed values (mutation-tested, issue 13) -----

# Every number below follows from REWARDS / EVALS by hand: e.g. 8/0 per seed 1.6 and 1.8 (mean 1.7,
# std 0.141), 1000 * 1.7 / 384 rollouts = 4.427; 4/4 per seed 2.4, 3.3, 3.0 (mean 2.9, std 0.458),
# 1000 * 2.9 / 192 = 15.104; per node 4/4 node 0: 1.5, 3.0, 1.5 over seeds (mean 2.0, std 0.866).
EXPECTED_MARKDOWN_TABLES = """\
| configuration | seeds | cumulative local reward | vs baseline | final held-out accuracy | node min-max \
| paper-like batch reward (inflated) | vs baseline | reward per 1k rollouts | external token share | paper vs 8/0 |
|---|---|---|---|---|---|---|---|---|---|---|
| 8/0 | 2 | 1.7 ± 0.1 | 1.00x | 0.450 ± 0.071 | 0.300-0.600 | 1.7 ± 0.1 | 1.00x | 4.427 | - | 1.00x |
| 4/4 | 3 | 2.9 ± 0.5 | 1.71x | 0.500 ± 0.000 | 0.500-0.500 | 6.0 ± 0.0 | 3.53x | 15.104 | 0.75 | 1.95x |

| configuration | loss share external (trainer) | external-only steps per node | \
rounds with grad norm > 10 per node | rollouts generated per node |
|---|---|---|---|---|
| 8/0 | - | 0.0 | 0.0 | 192 |
| 4/4 | - | 0.0 | 0.0 | 96 |

## Held-out accuracy curve (mean ± std over seeds)

| round | 8/0 | 4/4 |
|---|---|---|
| 1 | 0.200 ± 0.000 | - |
| 3 | 0.450 ± 0.071 | 0.500 ± 0.000 |

## Per node (mean over seeds)

| configuration | node | model | ran on | cumulative local reward | external groups used | \
external-only steps | loss share external | final held-out accuracy |
|---|---|---|---|---|---|---|---|---|
| 8/0 | 0 | ? | ? | 0.6 ± 0.0 | 0 | 0 | - | 0.350 |
| 8/0 | 1 | ? | ? | 1.1 ± 0.1 | 0 | 0 | - | 0.550 |
| 4/4 | 0 | ? | ? | 2.0 ± 0.9 | 12 | 0 | - | 0.500 |
| 4/4 | 1 | ? | ? | 0.9 ± 0.6 | 12 | 0 | - | 0.500 |
"""


def test_markdown_report_tables_and_text(tmp_path: Path):
    write_runs(tmp_path)
    records, unfinished = collect(tmp_path, EXPERIMENT)
    path = tmp_path / "report.md"
    write_markdown(path, EXPERIMENT, summarize(records, EXPERIMENT), records, unfinished)
    text = path.read_text()
    head, _, rest = text.partition("\n| configuration | seeds |")
    assert head.splitlines() == [
        "# hand: simulation report",
        "",
        "2 nodes x 3 rounds, seeds [0, 1, 2]; experiment ``. Baseline of every ratio: `8/0`.",
        "",
        "- **cumulative local reward** (the headline) = sum over nodes and rounds of each node's mean "
        "reward on its OWN rollouts (own verifier); mean ± std over seeds.",
        "- **held-out accuracy** = greedy accuracy on the held-out questions at the end; per seed the mean "
        "over nodes, then mean ± std over seeds (node min-max beside it).",
        f"- {PAPER_LIKE_EXPLANATION}",
        "- **reward per 1k rollouts** = cumulative local reward / rollouts the nodes generated themselves "
        "(learning per unit of compute; a 4/4 node generates half the rollouts of an 8/0 node).",
        "",
        "**Partial:** unfinished runs left out: 8/0 seed 2.",
    ]
    tables, _, tail = ("| configuration | seeds |" + rest).partition("\n\nPlots: ")
    assert tables + "\n" == EXPECTED_MARKDOWN_TABLES
    assert tail == (
        "`reward_curves.png` (moving average over 10 rounds), `cumulative_reward.png`, "
        "`heldout_accuracy.png`. TensorBoard: `tensorboard --logdir runs/` (one event file per node). "
        "Per-node metrics: `runs/<configuration>/seed-<s>/node-<i>/metrics.jsonl`, resolved configs next to them.\n"
    )


def test_markdown_without_unfinished_runs_or_curves_has_no_such_sections(tmp_path: Path):
    records = [
        {
            "configuration": "8/0",
            "seed": 0,
            "node": 0,
            "model": "m",
            "ran_on": "h cpu",
            **node_record([{"round": 0, "reward_mean": 0.5}]),
        }
    ]
    path = tmp_path / "report.md"
    write_markdown(path, EXPERIMENT, summarize(records, EXPERIMENT), records)
    text = path.read_text()
    assert "Partial" not in text and "Held-out accuracy curve" not in text
    assert "| 8/0 | 0 | m | h cpu | 0.5 ± 0.0 | 0 | 0 | - | - |" in text
    records[0]["loss_share_external"] = 0.25
    write_markdown(path, EXPERIMENT, summarize(records, EXPERIMENT), records, ["a seed 1", "b seed 2"])
    text = path.read_text()
    assert "| 8/0 | 0 | m | h cpu | 0.5 ± 0.0 | 0 | 0 | 0.25 | - |" in text
    assert "| 8/0 | 0.25 | 0.0 | 0.0 | 0 |" in text
    assert "**Partial:** unfinished runs left out: a seed 1, b seed 2." in text
    assert "| 4/4 | 0 | - | - | - | --- | - | - | - | - | 1.95x |" in text  # no finished run: dashes


def test_collect_reads_the_resolved_config_and_placement(tmp_path: Path):
    write_runs(tmp_path)
    node_dir = tmp_path / "runs/4-4/seed-0/node-1"
    (node_dir / "config.resolved.toml").write_text('[model]\npath = "tiny-b"\n[grpo]\nnum_generations = 2\n')
    (node_dir / "placement.json").write_text(json.dumps({"host": "h1", "device": "cpu"}))
    (tmp_path / "runs/4-4/seed-1/node-0/config.resolved.toml").write_text("not [ toml")
    records, _ = collect(tmp_path, EXPERIMENT)
    mine = {(r["configuration"], r["seed"], r["node"]): r for r in records}
    assert (mine[("4/4", 0, 1)]["model"], mine[("4/4", 0, 1)]["ran_on"]) == ("tiny-b", "h1 cpu")
    assert mine[("4/4", 0, 1)]["generated_rollouts"] == 3 * 4 * 2  # its own group size
    assert mine[("4/4", 0, 0)]["generated_rollouts"] == 3 * 4 * 8  # the default group size
    assert (mine[("4/4", 1, 0)]["model"], mine[("4/4", 1, 0)]["generated_rollouts"]) == ("?", 96)


def test_read_metrics_tail_and_torn_lines(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0}\n{"round": 1, "rew\n{"round": 2}\n{"round": 3}\n')
    assert read_metrics(path) == [{"round": 0}, {"round": 2}, {"round": 3}]
    assert read_metrics(path, tail=1) == [{"round": 3}]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_moving_average_hand_values():
    assert _moving_average([1.0, 2.0, 3.0, 4.0, 8.0], 2) == [1.0, 1.5, 2.5, 3.5, 6.0]
    assert _moving_average([3.0, 0.0, 3.0, 6.0], 3) == [3.0, 1.5, 2.0, 3.0]


def test_node_record_flags_spikes_and_counts_compute():
    rows = [
        {"round": 0, "reward_mean": 0.5, "grad_norm_max": 12.0, "grad_norm": 1.0, "used_external": 2},
        {
            "round": 1,
            "reward_mean": 0.5,
            "grad_norm": 10.5,
            "generated_tokens": 40,
            "external_only_step": True,
        },
        {"round": 2, "reward_mean": 0.5, "grad_norm": 10.0, "generated_tokens": 2, "num_tokens_external": 1},
        {"round": 3, "reward_mean": 0.5, "grad_norm_max": None, "grad_norm": 3.0, "num_tokens_local": 5},
    ]
    record = node_record(rows, group_size=4)
    assert record["grad_norm_spikes"] == 2  # 12 (the max wins over 1.0) and 10.5; 10.0 is not above 10
    assert record["external_only_steps"] == 2  # the flag, and round 2: external tokens only
    assert (record["generated_tokens"], record["external_used"]) == (42, 2)
    assert record["external_token_share"] == pytest.approx(1 / 6)
    assert record["final_eval_accuracy"] is None and record["eval_curve"] == []
    assert (
        node_record([{"round": 0, "reward_mean": 0.5, "num_tokens_local": None}])["external_token_share"]
        is None
    )


def test_summarize_per_node_figures_and_paper_ratios(tmp_path: Path):
    def rec(seed: int, node: int, **figures: float) -> dict:
        base = {"configuration": "4/4", "seed": seed, "node": node, "eval_curve": []}
        rows = [{"round": 0, "reward_mean": 1.0, "used_local": 1, "generated_tokens": figures.pop("tokens")}]
        return {**base, **node_record(rows, group_size=1), **figures}

    records = [
        rec(0, 0, tokens=10, loss_share_external=0.2, external_only_steps=1, grad_norm_spikes=0),
        rec(0, 1, tokens=30, loss_share_external=0.6, external_only_steps=3, grad_norm_spikes=2),
        rec(1, 0, tokens=20, loss_share_external=None, external_only_steps=2, grad_norm_spikes=4),
        rec(1, 1, tokens=60, loss_share_external=None, external_only_steps=2, grad_norm_spikes=0),
    ]
    (_, row) = summarize(records, EXPERIMENT)
    assert row["generated_tokens_per_node"] == pytest.approx(60 / 2)  # per seed 40 and 80
    idle = summarize([{**records[0], "generated_tokens": 0}], EXPERIMENT)[1]
    assert idle["generated_tokens_per_node"] == 0.0
    assert row["loss_share_external"] == pytest.approx(0.4)
    assert row["external_only_steps_per_node"] == pytest.approx(2.0)
    assert row["grad_norm_spikes_per_node"] == pytest.approx(1.5)
    assert row["paper_cumulative_reward"] == 1093.31
    assert row["paper_vs_8_0"] == pytest.approx(1093.31 / 561.79)
    assert row["baseline"] is None and row["vs_first"] is None
    other = parse_experiment(
        {"name": "x", "nodes": 1, "rounds": 1, "seeds": [0], "configuration": [{"name": "mine", "set": {}}]}
    )
    (mine,) = summarize([{**records[0], "configuration": "mine"}], other)
    assert (mine["paper_cumulative_reward"], mine["paper_vs_8_0"]) == (None, None)
    assert mine["vs_first"] == mine["vs_baseline"] == 1.0
    write_markdown(
        tmp_path / "report.md",
        other,
        [mine],
        [{**records[0], "configuration": "mine", "model": "m", "ran_on": "h cpu"}],
    )
    mine_row = next(
        line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| mine | 1 |")
    )
    assert mine_row.endswith("| - |") and "-x" not in mine_row  # no paper figure: a dash, not "-x"


def test_eval_curve_skips_a_partial_round_and_keeps_later_ones():
    records = [
        {"seed": 0, "eval_curve": [(10, 0.2), (20, 0.4)]},
        {"seed": 1, "eval_curve": [(20, 0.6)]},
    ]
    assert eval_curve(records) == [
        {"round": 20, "mean": pytest.approx(0.5), "std": pytest.approx(math.sqrt(0.02))}
    ]


def _event_wall_times(path: Path) -> list[float]:
    data, pos, times = path.read_bytes(), 0, []
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        fields = dict(tb_events._fields(data[pos + 12 : pos + 12 + length]))
        times.append(fields[1])
        pos += 16 + length
    return times


def test_tensorboard_files_skip_empty_nodes_carry_row_times_and_are_rewritten(tmp_path: Path):
    write_runs(tmp_path)
    (tmp_path / "runs/8-0/seed-0/node-0/metrics.jsonl").write_text("")  # a node that wrote nothing yet
    written = write_tensorboard(tmp_path, EXPERIMENT)
    assert len(written) == len(REWARDS) - 1 and all(p.is_file() for p in written)
    assert not list((tmp_path / "runs/8-0/seed-0/node-0").glob("tensorboard/*"))
    node = tmp_path / "runs/8-0/seed-0/node-1/tensorboard"  # the next node is still written
    (event_file,) = node.glob("events.out.tfevents.*")
    assert event_file.name.startswith("events.out.tfevents.1000.")  # stamped with the rows' own times
    assert _event_wall_times(event_file) == [1000.0, 1000.0, 1001.0, 1002.0, 2000.0]
    metrics = node.parent / "metrics.jsonl"
    metrics.write_text(metrics.read_text().replace('"time": 1000.0', '"time": 1500.0'))
    write_tensorboard(tmp_path, EXPERIMENT)  # rewritten: the old file (another start time) is gone
    assert [f.name[:25] for f in node.glob("events.out.tfevents.*")] == ["events.out.tfevents.1500."]


def test_clean_rounds_to_six_digits_and_drops_nan():
    assert (
        _clean(1 / 3) == 0.333333 and _clean(float("nan")) is None and _clean(3) == 3 and _clean("x") == "x"
    )


def test_plots_show_the_hand_computed_curves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import matplotlib.pyplot as plt

    write_runs(tmp_path)
    records, _ = collect(tmp_path, EXPERIMENT)
    kept: list = []
    monkeypatch.setattr(plt, "close", kept.append)  # keep the figures to look at them
    paths = plot(tmp_path, EXPERIMENT, records, summarize(records, EXPERIMENT))
    assert [p.name for p in paths] == ["reward_curves.png", "cumulative_reward.png", "heldout_accuracy.png"]
    curves, cumulative, held_out = kept
    for fig, path in zip(kept, paths, strict=True):
        assert path.parent == tmp_path and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert tuple(fig.get_size_inches()) == (8.0, 4.5)
        assert struct.unpack(">II", path.read_bytes()[16:24]) == (880, 495)  # 8 x 4.5 in at 110 dpi
        ax = fig.axes[0]
        assert ax.get_xlabel() == "round"
        assert ax.xaxis.get_gridlines()[0].get_alpha() == 0.3
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["8/0", "4/4"]
    (ax,) = curves.axes
    assert ax.get_ylabel() == "mean local reward (moving avg 10)"
    assert ax.get_title() == "hand: own-rollout reward per round (mean over nodes and seeds)"
    # mean over the 4 finished 8/0 node runs per round: 0.175, 0.325, 0.35; moving average over <= 10 rounds
    assert list(ax.lines[0].get_ydata()) == pytest.approx([0.175, 0.25, 0.85 / 3])
    (ax,) = cumulative.axes
    assert (ax.get_ylabel(), ax.get_title()) == (
        "cumulative local reward, summed over nodes",
        "hand: cumulative local reward",
    )
    assert list(ax.lines[0].get_ydata()) == pytest.approx([0.35, 1.0, 1.7])
    assert list(ax.lines[1].get_ydata()) == pytest.approx([2.8 / 3, 5.6 / 3, 2.9])
    (ax,) = held_out.axes
    assert ax.get_ylabel() == "held-out greedy accuracy (mean ± std over seeds)"
    assert ax.get_title() == "hand: held-out accuracy"
    base = ax.containers[0]
    assert list(base.lines[0].get_xdata()) == [1, 3] and base.lines[0].get_marker() == "o"
    assert list(base.lines[0].get_ydata()) == pytest.approx([0.2, 0.45])
    assert base.lines[1][0].get_markersize() == 6  # caps of capsize 3
    low, high = base.lines[2][0].get_segments()[1]
    assert (low[1], high[1]) == pytest.approx((0.45 - math.sqrt(0.005), 0.45 + math.sqrt(0.005)))
    assert len(ax.containers) == 2 and list(ax.containers[1].lines[0].get_xdata()) == [3]
    monkeypatch.undo()
    plt.close("all")


def test_a_configuration_without_curves_does_not_stop_the_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import matplotlib.pyplot as plt

    write_runs(tmp_path)
    records, _ = collect(tmp_path, EXPERIMENT)
    shared_only = [r for r in records if r["configuration"] == "4/4"]  # 8/0, the first, has no curve
    kept: list = []
    monkeypatch.setattr(plt, "close", kept.append)
    plot(tmp_path, EXPERIMENT, shared_only)
    assert [line.get_label() for line in kept[0].axes[0].lines] == ["4/4"]
    assert len(kept) == 2  # no summary: no held-out accuracy figure
    monkeypatch.undo()
    plt.close("all")
