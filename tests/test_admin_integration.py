"""The operator view of a real swarm: 3 node processes on loopback, queried through the CLI.

Node A is the bootstrap; B and C dial it. The test then checks, against A:
- `status --json` and `peers --json` return A's real identity, round and peers;
- `net --json` lists all 3 nodes, learned from signed heartbeats alone;
- a forged heartbeat (signed with another node's key claim) from a 4th peer is rejected by A's
  validation pipeline and counted, in `peers` verdicts and in the /metrics scrape;
- the /metrics scrape parses with the Prometheus text parser and holds the issue's counters.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from swarmnode import wire
from swarmnode.admin.discovery import read_discovery_file
from swarmnode.admin.network_view import heartbeat_from_status
from swarmnode.admin.source import NodeStatus
from swarmnode.config import P2PConfig
from swarmnode.identity import Identity
from swarmnode.wire.gen import wire_pb2

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
START_TIMEOUT_S = 180.0  # three nodes load torch and a model on 2 shared cores
CONVERGE_TIMEOUT_S = 120.0
FORGED_REASONS = {"bad_signature"}  # an envelope whose signature does not verify

# The smallest rounds that still exercise every part: 1 question x 2 completions of 4 tokens.
SMALL = [
    "admin.heartbeat_interval=1",
    "grpo.num_generations=2",
    "grpo.max_completion_length=4",
    "sampler.local_groups=1",
    "sampler.external_groups=1",
    "tasks.eval_size=1",
    "checkpoint_every=1000000",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, every_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "swarmnode", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=ENV,
    )


def cli_json(*args: str) -> Any:
    proc = cli(*args, "--json")
    assert proc.returncode == 0, f"swarmnode {' '.join(args)} failed: {proc.stderr}"
    return json.loads(proc.stdout)


class Swarm:
    """Node processes started by this test, stopped by PID at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.peer_ids: dict[str, str] = {}

    def start(self, name: str, bootstrap: str | None) -> str:
        data_dir = self.root / name
        self.peer_ids[name] = Identity.load_or_create(data_dir / "identity.key").peer_id
        port = free_port()
        cmd = [
            sys.executable, "-m", "swarmnode", "run", "--skip-preflight", "--name", name,
            "--data-dir", str(data_dir), "--rounds", "1000000", "--seed", str(len(self.procs)),
            "--listen", f"/ip4/127.0.0.1/tcp/{port}",
        ]  # fmt: skip
        for item in SMALL:
            cmd += ["--set", item]
        if bootstrap:
            cmd += ["--bootstrap", bootstrap]
        log = (self.root / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        return f"/ip4/127.0.0.1/tcp/{port}/p2p/{self.peer_ids[name]}"

    def admin_address(self, name: str) -> str:
        def ready() -> str | None:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise AssertionError(f"node {name} exited with {proc.returncode}:\n{self.log(name)}")
            record = read_discovery_file(self.root / name)
            return record["admin"] if record else None

        return wait_for(f"node {name}'s admin.json", ready, START_TIMEOUT_S)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: the p2p client's Unix socket path must stay under ~100 characters."""
    path = Path(tempfile.mkdtemp(prefix="snadm-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def scrape_families(metrics_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        return {f.name: f for f in text_string_to_metric_families(response.read().decode())}


def forged_in_metrics(metrics_url: str) -> float:
    """How many messages the node rejected as forged (bad signature or signer != origin)."""
    return sum(
        s.value
        for s in scrape_families(metrics_url)["swarmnode_p2p_verdicts"].samples
        if s.name.endswith("_total") and s.labels.get("reason") in FORGED_REASONS
    )


@pytest.fixture
def swarm(short_tmp: Path) -> Iterator[Swarm]:
    swarm = Swarm(short_tmp)
    try:
        yield swarm
    finally:
        swarm.stop()


def forged_heartbeat(claimed: str, forger: Identity) -> bytes:
    """A heartbeat envelope that names `claimed`'s key as signer but is signed by `forger`."""
    status = NodeStatus(
        name="impostor", peer_id="", model_id="evil", round=10**6, rounds_target=0, recent_rewards=[1.0],
        uptime_s=0.0, silo=False, p2p_state="running", listen_addrs=[], data_dir="", started_at=0.0,
        config_digest="",
    )  # fmt: skip
    hb = heartbeat_from_status(status, {}, sequence=int(time.time() * 1000))
    envelope = wire_pb2.Envelope.FromString(wire.seal(forger, wire.Kind.HEARTBEAT, wire.encode_heartbeat(hb)))
    envelope.signer_public_key = Identity.load(claimed).public_key_bytes
    return envelope.SerializeToString()


@pytest.mark.integration
@pytest.mark.slow
def test_operator_cli_against_a_three_node_swarm(swarm: Swarm) -> None:
    tmp_path = swarm.root
    from swarmnode.p2p.client import P2PClient

    bootstrap = swarm.start("a", None)
    swarm.start("b", bootstrap)
    swarm.start("c", bootstrap)
    node_a = swarm.admin_address("a")

    # net: all three nodes, from heartbeats (A hears B and C, and its own heartbeat).
    def three_nodes() -> list[dict] | None:
        nodes = cli_json("net", "--node", node_a)
        return nodes if len(nodes) == 3 else None

    nodes = wait_for("3 nodes in A's network view", three_nodes, CONVERGE_TIMEOUT_S, every_s=2.0)
    assert {n["peer_id"] for n in nodes} == set(swarm.peer_ids.values())
    assert {n["name"] for n in nodes} == {"a", "b", "c"}

    # status and peers: A's real numbers.
    status = cli_json("status", "--data-dir", str(tmp_path / "a"))  # found through A's discovery file
    assert status["peer_id"] == swarm.peer_ids["a"] and status["name"] == "a"
    assert status["round"] >= 1 and status["silo"] is False and status["p2p_state"] == "running"
    assert len(status["recent_rewards"]) >= 1 and status["uptime_s"] > 0
    peers = cli_json("peers", "--node", node_a)
    assert {swarm.peer_ids["b"], swarm.peer_ids["c"]} <= {p["peer_id"] for p in peers}
    assert all(p["msgs_in"] > 0 and p["verdicts"].get("accepted", 0) > 0 for p in peers)
    assert all(p["addrs"] and p["addrs"][0].startswith("/ip4/127.0.0.1/tcp/") for p in peers)

    # A forged heartbeat from a 4th peer is rejected by A and counted.
    forger_dir = tmp_path / "forger"
    forger = Identity.load_or_create(forger_dir / "identity.key")
    client = P2PClient(P2PConfig(bootstrap=[bootstrap]), forger_dir / "identity.key", forger_dir / "p2p")
    client.start()
    try:
        assert client.wait_ready(timeout=60), "the forger's p2p host did not start"

        def forged_counted() -> float | None:
            client.publish(
                wire.Kind.HEARTBEAT, forged_heartbeat(str(tmp_path / "b" / "identity.key"), forger)
            )
            return forged_in_metrics(read_discovery_file(tmp_path / "a")["metrics"]) or None

        wait_for("A to reject the forged heartbeat", forged_counted, CONVERGE_TIMEOUT_S, every_s=2.0)
    finally:
        client.stop()

    # One forgery is enough for A to ban the forger. The ban and the disconnect happen in A's p2p
    # host after the verdict, so wait (bounded) for them: `peers` then lists the forger as banned,
    # not as connected, with the reason and the time the ban ends.
    def forger_banned() -> dict | None:
        rows = [p for p in cli_json("peers", "--node", node_a) if p["peer_id"] == forger.peer_id]
        return rows[0] if len(rows) == 1 and rows[0]["banned"] else None

    banned = wait_for("A to list the forger as banned", forger_banned, CONVERGE_TIMEOUT_S, every_s=1.0)
    assert banned["msgs_in"] == 0 and banned["addrs"] == []  # a ban row, not a connection
    assert banned["ban_reason"] in FORGED_REASONS and banned["banned_until"] > time.time()
    assert "impostor" not in {n["name"] for n in cli_json("net", "--node", node_a)}

    # /metrics: parses, holds the counters, and counts the forgery.
    metrics_url = read_discovery_file(tmp_path / "a")["metrics"]

    def scrape() -> dict[str, Any] | None:
        families = scrape_families(metrics_url)
        return families if forged_in_metrics(metrics_url) >= 1 else None

    families = wait_for("the forgery in A's /metrics", scrape, 60, every_s=2.0)
    for name in (
        "swarmnode_rounds",
        "swarmnode_rollouts_published",
        "swarmnode_rollouts_received",
        "swarmnode_rollouts_accepted",
        "swarmnode_rollouts_rejected",
        "swarmnode_round_reward",
        "swarmnode_peers",
        "swarmnode_gossip_latency_seconds",
        "swarmnode_generation_tokens_per_second",
        "swarmnode_train_step_seconds",
    ):
        assert name in families, f"/metrics lacks {name}"
    [rounds] = [s.value for s in families["swarmnode_rounds"].samples if s.name == "swarmnode_rounds_total"]
    assert rounds >= 1


def test_status_against_an_address_with_no_node_is_one_line_and_exit_2() -> None:
    port = free_port()
    proc = cli("status", "--node", f"127.0.0.1:{port}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"no swarmnode admin service at 127.0.0.1:{port} "
        "(is the node running? start it with `swarmnode run`, or pass --node)"
    )
    assert proc.stdout == ""
