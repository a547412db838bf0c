"""`swarmnode simulate`: Ctrl-C stops every node cleanly, a second call resumes, the report is built."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from swarmnode.config import ConfigError
from swarmnode.sim.experiment import builtin_experiments, load_experiment, parse_experiment

pytestmark = pytest.mark.integration

EXPERIMENT = """
name = "tiny"
nodes = 2
rounds = 30
seeds = [0]

[base]
"sampler.local_groups" = 2
"grpo.num_generations" = 4
"tasks.eval_size" = 8
"eval_every" = 30
"checkpoint_every" = 5

[[configuration]]
name = "1/1"
set = { "sampler.local_groups" = 1, "sampler.external_groups" = 1 }
"""


def simulate(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "swarmnode", "simulate", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def rounds_done(metrics: Path) -> int:
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def test_interrupted_simulation_stops_nodes_then_resumes_and_reports(tmp_path: Path):
    (tmp_path / "tiny.toml").write_text(EXPERIMENT)
    out = tmp_path / "report"
    run = out / "runs" / "1-1" / "seed-0"
    first = simulate(str(tmp_path / "tiny.toml"), "--out", str(out))
    try:
        deadline = time.monotonic() + 180
        # both nodes have trained (a node interrupted before its first round has nothing to save)
        while (
            time.monotonic() < deadline
            and min(rounds_done(run / node / "metrics.jsonl") for node in ("node-0", "node-1")) < 3
        ):
            assert first.poll() is None, first.stderr.read()[-3000:]
            time.sleep(0.5)
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err[-3000:]
    assert not (run / "done.json").exists()
    for node in ("node-0", "node-1"):
        log = (run / node / "node.log").read_text()
        assert "stopped by SIGTERM" in log, log[-2000:]
        assert any((run / node / "checkpoints").iterdir())

    second = simulate(str(tmp_path / "tiny.toml"), "--out", str(out))
    _, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-3000:]
    assert json.loads((run / "done.json").read_text())["exit_codes"] == [0, 0]
    for node in ("node-0", "node-1"):
        rows = [json.loads(line) for line in (run / node / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == list(range(30))  # the curve continues across the resume
        assert "resumed from" in (run / node / "node.log").read_text()
    report = (out / "report.md").read_text()
    assert "| 1/1 | 1 |" in report
    assert (out / "reward_curves.png").stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    summary = results["summary"][0]
    # The report's figures are the nodes' own metrics, summed over rounds and nodes.
    rows = {
        node: [json.loads(line) for line in (run / node / "metrics.jsonl").read_text().splitlines()]
        for node in ("node-0", "node-1")
    }
    expected_reward = sum(r["reward_mean"] for node_rows in rows.values() for r in node_rows)
    assert summary["cumulative_reward_mean"] == pytest.approx(expected_reward)
    final_accuracies = [node_rows[-1]["eval_accuracy"] for node_rows in rows.values()]
    assert summary["final_eval_accuracy_mean"] == pytest.approx(sum(final_accuracies) / 2)
    assert summary["generated_rollouts_per_node"] == 30 * 1 * 4  # 30 rounds x I=1 x G=4
    assert len(list(run.glob("node-*/tensorboard/events.out.tfevents.*"))) == 2

    # A finished run is skipped; --report-only rebuilds the same report from what is there.
    (out / "results.json").unlink()
    (out / "report.md").unlink()
    third = simulate(str(tmp_path / "tiny.toml"), "--out", str(out), "--report-only")
    _, err = third.communicate(timeout=120)
    assert third.returncode == 0, err[-3000:]
    assert "already done" not in err  # --report-only starts no run, not even to skip it
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]
    assert (out / "report.md").read_text() == report


def test_experiment_errors_name_the_configuration_and_key(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"(?s)configuration .bad.*grpo\.epsilon"):
        parse_experiment(
            {"nodes": 2, "rounds": 1, "configuration": [{"name": "bad", "set": {"grpo.epsilon": "x"}}]}
        )
    with pytest.raises(ConfigError, match="no built-in experiment"):
        load_experiment("builtin:nope")
    assert load_experiment("builtin:paper-cpu").nodes == 8


@pytest.mark.parametrize("name", builtin_experiments())
def test_every_builtin_experiment_builds_a_valid_config_for_every_node(name: str, tmp_path: Path):
    experiment = load_experiment(f"builtin:{name}")
    for configuration in experiment.configurations:
        for index in range(experiment.nodes):
            cfg = experiment.node_config(configuration, experiment.seeds[0], index, tmp_path / str(index))
            assert cfg.rounds == experiment.rounds


def test_a_node_setting_overrides_the_base_for_that_node_only(tmp_path: Path):
    experiment = load_experiment("builtin:mixed-strength-fastweak")
    four = next(c for c in experiment.configurations if c.name == "4/4")
    rates = [experiment.node_config(four, 0, i, tmp_path / str(i)).grpo.learning_rate for i in range(4)]
    assert rates == [1e-4, 1e-3, 1e-3, 1e-3]


def test_inline_task_mix_and_verify_extra_reach_the_node_registry(tmp_path: Path):
    from swarmnode.config import config_from_dict
    from swarmnode.tasks.registry import TaskRegistry, UnknownTaskError

    two_digit = {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2}
    experiment = parse_experiment(
        {
            "nodes": 2,
            "rounds": 1,
            "base": {"tasks.mix": [{"dataset": "chain_sum", "config": two_digit}], "tasks.eval_size": 4},
            "node": [{"index": 1, "set": {"tasks.verify_extra": [{"dataset": "basic_arithmetic"}]}}],
        }
    )
    configs = [experiment.node_config(experiment.configurations[0], 0, i, tmp_path) for i in range(2)]
    # The inline mix survives the resolved config file each node process reads back.
    reread = [config_from_dict(tomllib.loads(cfg.to_toml())) for cfg in configs]
    assert reread == configs
    plain, verifier = (TaskRegistry.from_config(cfg.tasks) for cfg in reread)
    sampled = verifier.sample(random.Random(0), 40)
    assert {t.ref.dataset for t in sampled} == {"chain_sum"}  # verify_extra is never sampled
    numbers = [int(n) for t in sampled for n in re.findall(r"\d+", t.question)]
    assert len(numbers) == 80 and all(10 <= n <= 99 for n in numbers)  # the inline config, not "easy"
    assert [t.ref.dataset for t in verifier.eval_tasks(4)] == ["chain_sum", "basic_arithmetic"] * 2
    foreign = verifier.eval_tasks(2)[1]
    assert verifier.regenerate(foreign.ref) == foreign  # it can check a peer's basic_arithmetic group
    with pytest.raises(UnknownTaskError, match="basic_arithmetic"):
        plain.regenerate(foreign.ref)
    assert plain.sample(random.Random(0), 1)[0].ref.config_digest == sampled[0].ref.config_digest
