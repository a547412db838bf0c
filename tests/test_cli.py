"""The `swarmnode` command: key management, resolved config, one-line errors, one key per process."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def swarmnode(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "swarmnode", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def test_help_is_the_map_of_features():
    out = swarmnode("--help").stdout
    for command in ("run", "simulate", "status", "peers", "net", "key", "config"):
        assert command in out


def test_key_init_then_show_print_the_same_peer_id(tmp_path: Path):
    key = tmp_path / "node.key"
    init = swarmnode("key", "init", "--path", str(key))
    assert init.returncode == 0, init.stderr
    peer_id = init.stdout.split("peer id ")[1].strip()
    assert peer_id.startswith("12D3KooW")
    assert swarmnode("key", "show", "--path", str(key)).stdout.strip() == peer_id
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    again = swarmnode("key", "init", "--path", str(key))
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert swarmnode("key", "show", "--path", str(key)).stdout.strip() == peer_id  # nothing overwritten


def test_config_command_prints_the_resolved_config():
    out = swarmnode("config", "--set", "grpo.learning_rate=0.0003", "-I", "4", "-J", "4").stdout
    assert "learning_rate = 0.0003" in out
    assert "local_groups = 4" in out and "external_groups = 4" in out


@pytest.mark.integration
def test_a_second_node_with_the_same_key_refuses_to_start(tmp_path: Path):
    first = subprocess.Popen(
        [sys.executable, "-m", "swarmnode", "run", "--silo", "--rounds", "100000", "--data-dir", str(tmp_path),
         "--set", "tasks.eval_size=8", "--set", "sampler.local_groups=1", "--set", "grpo.num_generations=2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (tmp_path / "metrics.jsonl").exists():
            assert first.poll() is None
            time.sleep(0.5)
        second = swarmnode("run", "--silo", "--rounds", "1", "--data-dir", str(tmp_path), "--skip-preflight")
        assert second.returncode == 2
        assert "in use by process" in second.stderr and str(first.pid) in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the running node is untouched
    finally:
        first.terminate()
        first.wait(timeout=60)
