"""A real 3-node SAPO swarm on loopback (plus one dishonest peer).

Every honest node must receive its peers' groups, verify and re-score them with its own verifier,
and train on them; the forger's groups (question text not matching the task reference) must be
rejected with their reason, counted against the forger, and never trained on.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarmnode.identity import Identity
from swarmnode.sim.experiment import parse_experiment
from swarmnode.sim.launcher import launch, prepare_nodes, stop_all
from swarmnode.sim.report import read_metrics

pytestmark = pytest.mark.integration

ROUNDS = 20
EXPERIMENT = {
    "name": "ci-swarm",
    "nodes": 3,
    "rounds": ROUNDS,
    "seeds": [0],
    "base": {
        "sampler.local_groups": 4,
        "sampler.external_groups": 4,
        "grpo.num_generations": 8,
        "tasks.eval_size": 16,
        "checkpoint_every": 5,
        "admin.heartbeat_interval": 2.0,
        "p2p.min_peers_at_start": 3,  # the two other honest nodes and the forger
    },
    "node": [{"index": 2, "set": {"model.path": "embedded:tiny-b"}}],  # another model and tokenizer
}


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("swarm")
    experiment = parse_experiment(EXPERIMENT, "test")
    configuration = experiment.configurations[0]
    paths = prepare_nodes(experiment, configuration, 0, root)
    # The forger dials every honest node, and they wait for it (min_peers_at_start = 3) before round 0.
    bootstrap = []
    for i in range(3):
        port = (root / f"node-{i}" / "node.toml").read_text().split("/ip4/127.0.0.1/tcp/")[1].split('"')[0]
        bootstrap.append(
            f"/ip4/127.0.0.1/tcp/{port}/p2p/{Identity.load(root / f'node-{i}' / 'identity.key').peer_id}"
        )
    forger_key = root / "forger" / "identity.key"
    forger_key.parent.mkdir()
    forger_id = Identity.load_or_create(forger_key).peer_id
    procs = launch(paths)
    deadline = time.monotonic() + 120  # start the forger once every honest host listens
    while time.monotonic() < deadline and not all(
        "listening on" in _read(root / f"node-{i}" / "p2p" / "p2p-host.log") for i in range(3)
    ):
        time.sleep(0.5)
    forger = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("forger_node.py")),
            str(forger_key),
            str(root / "forger"),
            "150",
            *bootstrap,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and any(p.proc.poll() is None for p in procs):
            time.sleep(1)
    finally:
        stop_all(procs, grace_s=30)
        forger.kill()
        forger.wait(timeout=30)
        for p in procs:
            p.log.close()
    metrics = [read_metrics(root / f"node-{i}" / "metrics.jsonl") for i in range(3)]
    logs = [(root / f"node-{i}" / "node.log").read_text() for i in range(3)]
    return {
        "metrics": metrics,
        "logs": logs,
        "codes": [p.proc.returncode for p in procs],
        "forger": forger_id,
        "peer_ids": [Identity.load(root / f"node-{i}" / "identity.key").peer_id for i in range(3)],
    }


def test_every_node_receives_verifies_and_trains_on_external_groups(swarm):
    assert swarm["codes"] == [0, 0, 0], [log[-2000:] for log in swarm["logs"]]
    for index, rows in enumerate(swarm["metrics"]):
        assert [r["round"] for r in rows] == list(range(ROUNDS)), swarm["logs"][index][-2000:]
        received = sum(r["received"] for r in rows)
        accepted = sum(r["accepted"] for r in rows)
        used = sum(r["used_external"] for r in rows)
        assert received > 0 and accepted > 0 and used > 0, (index, received, accepted, used)
        # Re-scored locally: zero-variance groups were dropped by this node's own verifier.
        assert any(r["rejected_by_reason"].get("zero_variance", 0) for r in rows) or accepted < received
        # Its own groups without reward variance were not sent (p2p.publish_zero_variance = false).
        assert sum(r["unpublished_zero_variance"] for r in rows) > 0
        honest_peers = set(swarm["peer_ids"]) - {swarm["peer_ids"][index]}
        sources = {peer for r in rows for peer in r["used_by_source"]}
        assert sources and sources <= honest_peers, sources
        assert any(r["num_tokens_external"] > 0 for r in rows)
        assert any(r["reward_mean_external"] is not None for r in rows)
        # Headline reward = own rollouts only; the trainer's batch figure mixes in external groups.
        assert all("batch_reward_mean" in r and r["used_local"] == 4 for r in rows)


def test_forged_question_text_is_rejected_counted_and_never_trained_on(swarm):
    forger = swarm["forger"]
    rejected = 0
    for rows in swarm["metrics"]:
        assert all(forger not in r["used_by_source"] for r in rows)
        rejected += sum(r["rejected_by_source"].get(forger, 0) for r in rows)
    assert rejected > 0
    assert (
        sum(r["rejected_by_reason"].get("question_mismatch", 0) for rows in swarm["metrics"] for r in rows)
        > 0
    )
