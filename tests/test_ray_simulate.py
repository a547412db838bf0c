"""`swarmnode simulate --ray`: a real two-node Ray cluster on loopback runs a 3-node experiment.

The head Ray node offers the custom resource `node_a`, a second Ray worker process `node_b`; the
experiment pins node 0 to `node_a` and nodes 1 and 2 to `node_b`, so the swarm spans both. Each Ray
node gets its own loopback address (127.0.0.2 and 127.0.0.3: Ray replaces 127.0.0.1 by the machine's
outward address), so the swarm nodes find each other at the cluster's addresses, as they would on
separate machines. Both Ray processes are started here with `ray start --block` in their own
process group and stopped by their PIDs (never `ray stop`, which would reach other users' Ray).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip(
    "ray",
    reason="Ray is not installed: the ray extra (pip install -e '.[dev,ray]', as scripts/setup.sh does)",
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
ROUNDS = (
    100  # a round of this tiny setup takes ~0.06 s: enough rounds that the nodes' runs overlap by seconds
)
EXPERIMENT = f"""
name = "ray-tiny"
nodes = 3
rounds = {ROUNDS}
seeds = [0]

[base]
"sampler.local_groups" = 1
"sampler.external_groups" = 1
"grpo.num_generations" = 4
"tasks.eval_size" = 8
"eval_every" = {ROUNDS}
"checkpoint_every" = 100
# Node start-up (torch, model, p2p host) takes a minute on a loaded 2-core machine: wait longer
# for peers than the default, so that the three nodes start round 0 together.
"p2p.start_wait_s" = 240

[[node]]
index = 0
resources = {{ node_a = 1 }}

[[node]]
index = 1
resources = {{ node_b = 1 }}

[[node]]
index = 2
resources = {{ node_b = 1 }}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_env() -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _ray_start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    ray_cli = Path(sys.executable).with_name("ray")
    with log.open("wb") as out:
        # --block: the command owns the Ray processes it starts and ends them when it gets SIGTERM.
        return subprocess.Popen(
            [str(ray_cli), "start", "--block", "--disable-usage-stats", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_ray_env(),
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):  # what is left of the process group this test made
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=30)


def _wait_for_nodes(address: str, count: int, timeout_s: float = 120.0) -> None:
    script = (
        "import ray, sys, time\n"
        f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
        f"deadline = time.monotonic() + {timeout_s}\n"
        f"while sum(n['Alive'] for n in ray.nodes()) < {count} and time.monotonic() < deadline:\n"
        "    time.sleep(1)\n"
        f"sys.exit(0 if sum(n['Alive'] for n in ray.nodes()) >= {count} else 1)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=_ray_env(), capture_output=True, text=True, timeout=timeout_s + 60
    )
    assert done.returncode == 0, f"the Ray cluster did not reach {count} nodes: {done.stderr[-2000:]}"


@pytest.fixture
def ray_cluster():
    # Ray's unix sockets live under the temp dir and must stay short: not under pytest's tmp_path.
    temp = Path(tempfile.mkdtemp(prefix="snray-"))
    port = _free_port()
    address = f"{HEAD_IP}:{port}"
    head = _ray_start(
        [
            "--head",
            f"--port={port}",
            f"--node-ip-address={HEAD_IP}",
            "--num-cpus=2",
            "--num-gpus=0",
            '--resources={"node_a": 1}',
            "--include-dashboard=false",
            f"--temp-dir={temp / 'ray'}",
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
        ],
        temp / "head.log",
    )
    procs = [head]
    try:
        _wait_for_nodes(address, 1)
        procs.append(
            _ray_start(
                [
                    f"--address={address}",
                    f"--node-ip-address={WORKER_IP}",
                    "--num-cpus=2",
                    "--num-gpus=0",
                    '--resources={"node_b": 2}',
                    f"--dashboard-agent-listen-port={_free_port()}",
                ],
                temp / "worker.log",
            )
        )
        _wait_for_nodes(address, 2)
        yield address, temp
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


def test_three_nodes_on_two_ray_nodes_train_together_and_report(ray_cluster, tmp_path: Path):
    address, temp = ray_cluster
    (tmp_path / "ray-tiny.toml").write_text(EXPERIMENT)
    out = tmp_path / "report"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "swarmnode",
            "simulate",
            str(tmp_path / "ray-tiny.toml"),
            "--out",
            str(out),
            "--ray",
            address,
            "--ray-work-dir",
            str(temp / "work"),
            "--run-timeout",
            "400",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=_ray_env(),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    run = out / "runs" / "default" / "seed-0"
    placements = [json.loads((run / f"node-{i}" / "placement.json").read_text()) for i in range(3)]
    assert [p["ip"] for p in placements] == [HEAD_IP, WORKER_IP, WORKER_IP]
    assert placements[0]["ray_node_id"] != placements[1]["ray_node_id"] == placements[2]["ray_node_id"]
    assert all(p["launcher"] == "ray" and p["device"] == "cpu" for p in placements)
    # Each node listened at its Ray node's address; the others bootstrapped from nodes 0 and 1 there.
    assert [p["multiaddr"].split("/")[2] for p in placements] == [HEAD_IP, WORKER_IP, WORKER_IP]
    bootstraps = (run / "node-2" / "config.resolved.toml").read_text()
    assert placements[0]["multiaddr"] in bootstraps and placements[1]["multiaddr"] in bootstraps
    # The files came back from the workers: every node's full curve, and the report built from them.
    for i in range(3):
        rows = [json.loads(line) for line in (run / f"node-{i}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == list(range(ROUNDS))
        assert (run / f"node-{i}" / "config.resolved.toml").exists()
    received = [
        sum(
            json.loads(line).get("received", 0)
            for line in (run / f"node-{i}" / "metrics.jsonl").read_text().splitlines()
        )
        for i in range(3)
    ]
    assert all(r > 0 for r in received), received  # every node got peers' groups over libp2p
    results = json.loads((out / "results.json").read_text())
    assert len(results["nodes"]) == 3
    assert [n["ran_on"].split("/", 1)[1] for n in results["nodes"]] == [
        f"{ip} cpu" for ip in (HEAD_IP, WORKER_IP, WORKER_IP)
    ]
    assert "| ran on |" in (out / "report.md").read_text()
