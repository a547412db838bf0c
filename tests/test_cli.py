"""The `swarmnode` command: key management, resolved config, one-line errors, one key per process."""

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENV = {k: v for k, v in os.environ.items() if not k.startswith("SWARMNODE__")} | {"OMP_NUM_THREADS": "1"}
TOKEN = "0123456789abcdef0123456789abcdef"


def swarmnode(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "swarmnode", *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def test_help_is_the_map_of_features():
    out = swarmnode("--help").stdout
    # argparse lists each subcommand on its own line, indented, followed by its help text
    listed = set(re.findall(r"^ {4}([a-z]+) {2,}\S", out, re.M))
    assert {"run", "simulate", "status", "peers", "net", "events", "key", "config"} <= listed


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
    assert re.search(r"^learning_rate = 0\.0003$", out, re.M)
    assert re.search(r"^local_groups = 4$", out, re.M) and re.search(r"^external_groups = 4$", out, re.M)


def test_config_command_never_prints_the_admin_token():
    proc = swarmnode("config", "--set", f"admin.token={TOKEN}")
    assert proc.returncode == 0, proc.stderr
    assert TOKEN not in proc.stdout
    assert re.search(r'^token = "\(redacted: set it with SWARMNODE__ADMIN__TOKEN\)"$', proc.stdout, re.M)


def test_resolved_config_is_written_0600_without_the_token(tmp_path: Path):
    from swarmnode.config import load_config
    from swarmnode.node.runtime import write_resolved_config

    stale = tmp_path / "config.resolved.toml"
    stale.write_text("old")
    stale.chmod(0o644)  # what earlier versions left behind
    cfg = load_config(None, {"data_dir": str(tmp_path), "admin.token": TOKEN}, environ={})
    path = write_resolved_config(cfg)
    assert path == stale and stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert TOKEN not in text and 'token = "(redacted' in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.resolved.toml"]  # no temporary left


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["--set", "admin.token=x"], "admin.token"),
        (["--set", "admin.listen=0.0.0.0:0"], "admin.listen"),
        (["--set", "admin.metrics_listen=0.0.0.0:0"], "admin.metrics_listen"),
    ],
)
def test_run_refuses_an_exposed_or_weak_admin_config_before_loading_anything(
    tmp_path: Path, overrides: list[str], key: str
):
    proc = swarmnode("run", "--silo", "--rounds", "1", "--data-dir", str(tmp_path), *overrides)
    assert proc.returncode == 2
    assert proc.stderr.startswith("swarmnode run: invalid config:") and key in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # refused at config load: no key, no resolved config, no model


@pytest.mark.integration
def test_a_second_node_with_the_same_key_refuses_to_start(tmp_path: Path):
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "swarmnode",
            "run",
            "--silo",
            "--rounds",
            "100000",
            "--data-dir",
            str(tmp_path),
            "--set",
            "tasks.eval_size=8",
            "--set",
            "sampler.local_groups=1",
            "--set",
            "grpo.num_generations=2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (tmp_path / "metrics.jsonl").exists():
            assert first.poll() is None
            time.sleep(0.5)
        assert (tmp_path / "metrics.jsonl").exists(), "the first node finished no round within 120 s"
        second = swarmnode("run", "--silo", "--rounds", "1", "--data-dir", str(tmp_path), "--skip-preflight")
        assert second.returncode == 2
        assert "in use by process" in second.stderr and str(first.pid) in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the running node is untouched
    finally:
        first.terminate()
        first.wait(timeout=60)
