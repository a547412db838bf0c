"""Four real gossip node processes on loopback: delivery, a SIGKILLed node rejoining, adversarial messages.

Each node is ``python -m swarmnode.p2p.gossip_node`` (P2PClient + its supervised libp2p host
process); nodes 0 and 1 are the bootstraps. The nodes write what they sent and received as JSON
lines, which the tests compare.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from swarmnode.identity import Identity

pytestmark = pytest.mark.integration

WARMUP_S = 8.0  # 8 processes importing libp2p on 2 cores, then mesh formation
REJOIN_GRACE_S = 3.0


@dataclass
class Swarm:
    root: Path
    keys: list[Path]
    peer_ids: list[str]
    ports: list[int]

    @classmethod
    def create(cls, root: Path, n: int, free_port: Callable[[], int]) -> Swarm:
        keys = [root / f"k{i}" for i in range(n)]
        return cls(root, keys, [Identity.load_or_create(k).peer_id for k in keys], [free_port() for _ in range(n)])

    def addr(self, i: int) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.ports[i]}/p2p/{self.peer_ids[i]}"

    def args(self, i: int, tag: str, start_at: float, duration: float, *extra: str) -> list[str]:
        bootstraps = [arg for j in (0, 1) if j != i for arg in ("--bootstrap", self.addr(j))]
        if i in (0, 1):  # a bootstrap also knows a second entry point beyond its peer bootstrap
            bootstraps += ["--bootstrap", self.addr(2)]
        return [
            "-m", "swarmnode.p2p.gossip_node",
            "--key", str(self.keys[i]),
            "--run-dir", str(self.root / f"r{tag}"),
            "--listen", f"/ip4/127.0.0.1/tcp/{self.ports[i]}",
            *bootstraps,
            "--payload-bytes", "8192",
            "--rate", "1",
            "--start-at", f"{start_at:.3f}",
            "--duration", f"{duration:.3f}",
            "--linger", "4",
            "--out", str(self.out(tag)),
            *extra,
        ]  # fmt: skip

    def out(self, tag: str) -> Path:
        return self.root / f"o{tag}.jsonl"


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def sent_ids(events: list[dict[str, Any]], after: float = 0.0, before: float = float("inf")) -> set[str]:
    return {e["msg_id"] for e in events if e["event"] == "sent" and after <= e["t"] <= before}


def received_ids(events: list[dict[str, Any]]) -> set[str]:
    return {e["msg_id"] for e in events if e["event"] == "recv"}


def final_status(events: list[dict[str, Any]]) -> dict[str, Any]:
    statuses = [e for e in events if e["event"] == "status"]
    assert statuses, "the node wrote no final status: it did not finish cleanly"
    return statuses[-1]


def wait_all(procs: list[subprocess.Popen[bytes]], timeout: float) -> list[int | None]:
    deadline = time.monotonic() + timeout
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    return [proc.poll() for proc in procs]


def assert_delivered(senders: dict[str, set[str]], receivers: dict[str, set[str]]) -> None:
    """Every message of every sender reached every other receiver (100 % delivery)."""
    for sender, ids in senders.items():
        assert ids, f"{sender} sent nothing"
        for receiver, got in receivers.items():
            if receiver != sender:
                missing = ids - got
                assert not missing, f"{receiver} missed {len(missing)}/{len(ids)} messages of {sender}"


def test_four_nodes_deliver_every_batch_and_a_sigkilled_node_rejoins_with_same_peer_id(
    short_tmp: Path, free_port: Callable[[], int], processes: Any
) -> None:
    swarm = Swarm.create(short_tmp, 4, free_port)
    start = time.time() + WARMUP_S
    duration = 22.0
    procs = [processes.start(swarm.args(i, str(i), start, duration), short_tmp / f"n{i}.log") for i in range(4)]

    time.sleep(max(0.0, start + 8.0 - time.time()))
    kill_at = time.time()
    procs[3].send_signal(signal.SIGKILL)  # its host process sees the IPC socket close and exits
    procs[3].wait(timeout=5)
    time.sleep(1.0)
    restarted = processes.start(
        swarm.args(3, "3b", time.time(), start + duration - time.time()), short_tmp / "n3b.log"
    )
    codes = wait_all([*procs[:3], restarted], timeout=duration + 40)
    assert codes == [0, 0, 0, 0], f"exit codes {codes}; see logs in {short_tmp}"

    ev = {tag: read_events(swarm.out(tag)) for tag in ("0", "1", "2", "3", "3b")}
    survivors = ("0", "1", "2")
    # The three nodes that stayed up delivered 100 % of each other's batches, before and after the kill.
    assert_delivered({s: sent_ids(ev[s]) for s in survivors}, {s: received_ids(ev[s]) for s in survivors})

    # Before the kill, node 3 was a full member.
    before_kill = kill_at - 1.5
    assert_delivered({"3": sent_ids(ev["3"], before=before_kill)}, {s: received_ids(ev[s]) for s in survivors})
    for s in survivors:
        assert sent_ids(ev[s], before=before_kill) <= received_ids(ev["3"]), f"node 3 missed {s} before the kill"

    # The restarted node has the same peer id and is back in the mesh within the grace period.
    ready = [e for e in ev["3b"] if e["event"] == "ready"][0]
    assert ready["peer_id"] == swarm.peer_ids[3]
    rejoined = ready["t"] + REJOIN_GRACE_S
    after = sent_ids(ev["3b"], after=rejoined)
    assert len(after) >= 5
    assert_delivered({"3b": after}, {s: received_ids(ev[s]) for s in survivors})
    for s in survivors:
        assert sent_ids(ev[s], after=rejoined) <= received_ids(ev["3b"]), f"restarted node 3 missed {s}"

    everyone = set(swarm.peer_ids)
    for tag in (*survivors, "3b"):
        status = final_status(ev[tag])
        assert not status["silo"] and status["restarts"] == 0
        # Nodes 2 and 3 only know the bootstraps: their link comes from discovery.
        connected = {p["peer_id"] for p in status["peers"]}
        assert connected == everyone - {status["peer_id"]}, f"node {tag} is not connected to every peer"
        assert sum(status["drops"].values()) == 0, f"node {tag} dropped messages: {status['drops']}"
        latencies = sorted(e["latency_ms"] for e in ev[tag] if e["event"] == "recv")
        assert latencies[len(latencies) // 2] < 250, f"node {tag} median latency {latencies[len(latencies) // 2]} ms"


# What each crafted message must be rejected (or ignored) as, by reason label.
EXPECTED_REASONS = {
    "forged_signature": "signer_mismatch",  # signed as another peer: the signer is not the origin
    "tampered_payload": "bad_signature",
    "oversize": "oversize",
    "replay": "replay",
    "garbage": "decode_error",
}


def test_adversarial_messages_are_rejected_with_their_reason_and_a_banned_peer_is_disconnected(
    short_tmp: Path, free_port: Callable[[], int], processes: Any
) -> None:
    swarm = Swarm.create(short_tmp, 4, free_port)
    start = time.time() + WARMUP_S
    duration = 9.0
    # The adversary bootstraps to nodes 0 and 1, so both have it in their mesh from the start.
    # Node 0 counts every attack without banning; node 1 keeps the default threshold and bans.
    lenient = ("--set", "score_threshold=-1000")
    extra: dict[int, tuple[str, ...]] = {0: lenient, 1: (), 2: lenient, 3: ("--adversary",)}
    procs = [
        processes.start(swarm.args(i, str(i), start, duration, *extra[i]), short_tmp / f"n{i}.log")
        for i in range(4)
    ]
    codes = wait_all(procs, timeout=duration + 40)
    assert codes == [0, 0, 0, 0], f"exit codes {codes}; see logs in {short_tmp}"
    ev = {i: read_events(swarm.out(str(i))) for i in range(4)}
    adversary = swarm.peer_ids[3]
    attacks = [e["name"] for e in ev[3] if e["event"] == "attack"]
    assert attacks == list(EXPECTED_REASONS)

    # Honest nodes keep running and delivering each other's batches.
    honest = (0, 1, 2)
    assert_delivered({str(i): sent_ids(ev[i]) for i in honest}, {str(i): received_ids(ev[i]) for i in honest})
    attack_ids = {e["msg_id"] for e in ev[3] if e["event"] == "attack"}
    for i in honest:
        status = final_status(ev[i])
        assert status["restarts"] == 0 and status["host_running"]
        assert not attack_ids & received_ids(ev[i]), f"node {i} was handed a crafted message"

    # Node 0 saw every attack from the adversary and labelled each with its reason; it still takes
    # the adversary's valid batches (its threshold is out of reach).
    status = final_status(ev[0])
    by_adversary = next(p["verdicts"] for p in status["peers"] if p["peer_id"] == adversary)
    for attack, reason in EXPECTED_REASONS.items():
        assert by_adversary.get(reason, 0) == 1, f"node 0: {attack} not counted once as {reason}: {by_adversary}"
    assert sent_ids(ev[3]) <= received_ids(ev[0]), "node 0 lost the adversary's valid batches"

    # Node 1 (default threshold) banned the adversary at its forged signature and disconnected it;
    # the adversary's later messages, relayed by others, are ignored as from a banned peer.
    status = final_status(ev[1])
    assert status["verdicts"].get("signer_mismatch", 0) == 1
    assert adversary in status["banned"]
    assert adversary not in {p["peer_id"] for p in status["peers"]}
    late = sent_ids(ev[3], after=next(e["t"] for e in ev[3] if e["event"] == "attack") + 1.0)
    assert late and not late & received_ids(ev[1])
