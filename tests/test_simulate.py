"""`swarmnode simulate`: Ctrl-C stops every node cleanly, a second call resumes, the report is built."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarmnode.config import ConfigError
from swarmnode.sim.experiment import load_experiment, parse_experiment

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
    return subprocess.Popen([sys.executable, "-m", "swarmnode", "simulate", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def rounds_done(metrics: Path) -> int:
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def test_interrupted_simulation_stops_nodes_then_resumes_and_reports(tmp_path: Path):
    (tmp_path / "tiny.toml").write_text(EXPERIMENT)
    out = tmp_path / "report"
    run = out / "runs" / "1-1" / "seed-0"
    first = simulate(str(tmp_path / "tiny.toml"), "--out", str(out))
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and rounds_done(run / "node-1" / "metrics.jsonl") < 3:
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
    summary = json.loads((out / "results.json").read_text())["summary"][0]
    assert summary["final_eval_accuracy_mean"] is not None and summary["cumulative_reward_mean"] >= 0

    # A finished run is skipped; --report-only aggregates what is there.
    third = simulate(str(tmp_path / "tiny.toml"), "--out", str(out), "--report-only")
    assert third.wait(timeout=120) == 0


def test_experiment_errors_name_the_configuration_and_key(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"(?s)configuration .bad.*grpo\.epsilon"):
        parse_experiment({"nodes": 2, "rounds": 1, "configuration": [{"name": "bad", "set": {"grpo.epsilon": "x"}}]})
    with pytest.raises(ConfigError, match="no built-in experiment"):
        load_experiment("builtin:nope")
    assert load_experiment("builtin:paper-cpu").nodes == 8
