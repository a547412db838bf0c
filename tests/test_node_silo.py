"""A real silo node: trains the embedded model for a few rounds, checkpoints, resumes, stops cleanly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

FAST = [
    "--set",
    "tasks.eval_size=16",
    "--set",
    "sampler.local_groups=4",
    "--set",
    "grpo.num_generations=4",
    "--set",
    "checkpoint_every=2",
]
REQUIRED_KEYS = {
    "round",
    "reward_mean",
    "frac_zero_std",
    "tokens_per_s",
    "step_seconds",
    "clip_frac_low",
    "clip_frac_high",
    "entropy",
    "grad_norm",
}


def swarmnode(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "swarmnode", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def metrics(data_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (data_dir / "metrics.jsonl").read_text().splitlines()]


def test_silo_rounds_write_metrics_and_checkpoints_then_resume(tmp_path: Path):
    run = swarmnode("run", "--silo", "--rounds", "3", "--data-dir", str(tmp_path), *FAST)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = metrics(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert set(rows[0]) >= REQUIRED_KEYS, set(rows[0])
    assert all(r["silo"] for r in rows)
    assert 0.0 <= rows[0]["reward_mean"] <= 1.0 and rows[0]["tokens_per_s"] > 0
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints[-1] == "round-00000003"
    assert (tmp_path / "config.resolved.toml").read_text().count("[grpo]") == 1

    resumed = swarmnode("run", "--silo", "--rounds", "5", "--data-dir", str(tmp_path), *FAST)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert [r["round"] for r in metrics(tmp_path)] == [0, 1, 2, 3, 4]


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "swarmnode",
            "run",
            "--silo",
            "--rounds",
            "1000",
            "--data-dir",
            str(tmp_path),
            *FAST,
            "--set",
            "checkpoint_every=1000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 180
        path = tmp_path / "metrics.jsonl"
        while time.monotonic() < deadline and not (path.exists() and path.read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGINT" in err
    done = len(metrics(tmp_path))
    saved = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert saved == [f"round-{done:08d}"]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "grpo.epsilon=wide"], "grpo.epsilon"),
        (["--set", "grpo.learnin_rate=1"], "grpo.learnin_rate: unknown key"),
        (["--model", "/nonexistent/model"], "/nonexistent/model"),
        (["--tasks", "no_such_dataset"], "no_such_dataset"),
    ],
)
def test_bad_input_is_one_clear_line_and_nonzero_exit(tmp_path: Path, args: list[str], message: str):
    run = swarmnode("run", "--silo", "--rounds", "1", "--data-dir", str(tmp_path), *args, timeout=120)
    assert run.returncode != 0
    assert message in run.stderr
    assert "Traceback" not in run.stderr


def test_corrupt_checkpoint_is_reported_and_left_untouched(tmp_path: Path):
    assert swarmnode("run", "--silo", "--rounds", "2", "--data-dir", str(tmp_path), *FAST).returncode == 0
    ckpt = tmp_path / "checkpoints" / "round-00000002"
    weights = next(ckpt.rglob("*.safetensors"))
    weights.write_bytes(b"garbage")
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    run = swarmnode("run", "--silo", "--rounds", "4", "--data-dir", str(tmp_path), *FAST)
    assert run.returncode == 2
    assert "corrupt" in run.stderr or "truncated" in run.stderr
    assert "Traceback" not in run.stderr
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before
    assert [r["round"] for r in metrics(tmp_path)] == [0, 1]
