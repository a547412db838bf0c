"""The simulation report's aggregation against hand-computed values, and its TensorBoard event files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmnode.sim.experiment import parse_experiment
from swarmnode.sim.report import build_report, collect, eval_curve, mean_std, node_record, per_seed, summarize
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


def test_build_report_writes_summary_and_one_tensorboard_file_per_node(tmp_path: Path):
    write_runs(tmp_path)
    build_report(tmp_path, EXPERIMENT)
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
    shared = summarize(records, EXPERIMENT)[1]
    assert shared["cumulative_reward_mean"] == pytest.approx(2.9)
    assert (
        shared["baseline"] is None
        and shared["vs_baseline"] is None
        and shared["paper_like_vs_baseline"] is None
    )
