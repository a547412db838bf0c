"""The node's publishing side: a batch over the node's own message cap is trimmed, never sent
oversize (receivers would penalise it) and never allowed to crash the round loop."""

from __future__ import annotations

import random

from swarmnode import wire
from swarmnode.config import NodeConfig
from swarmnode.identity import Identity
from swarmnode.node.network import SwarmNetwork
from swarmnode.rl.records import RolloutGroup
from swarmnode.tasks.reference import TaskRef


class RecordingClient:
    def __init__(self) -> None:
        self.published: list[bytes] = []

    def publish(self, kind: wire.Kind, data: bytes) -> bool:
        self.published.append(data)
        return True


def _group(i: int, rng: random.Random) -> RolloutGroup:
    # Random letters barely compress, so each group costs ~2 KB of the envelope.
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(2000))
    ref = TaskRef("chain_sum", "0" * 16, 1, i, "0.1.25")
    return RolloutGroup(ref, f"q{i}", (f"<answer>{text}</answer>", "x"), (True, False), "m", 0, 0.0)


def test_oversize_batch_is_trimmed_to_the_cap_and_counted(tmp_path):
    cfg = NodeConfig(data_dir=tmp_path, p2p={"max_message_bytes": 8192, "max_groups_per_batch": 64})
    identity = Identity.load_or_create(tmp_path / "identity.key")
    network = SwarmNetwork(cfg, identity, "m")
    network.client = RecordingClient()  # type: ignore[assignment]
    rng = random.Random(0)
    groups = [_group(i, rng) for i in range(10)]

    sent = network.publish_rollouts(groups, node_round=3)

    assert 0 < sent < 10 and network.publish_drops["oversize"] == 10 - sent
    (envelope,) = network.client.published
    assert len(envelope) <= 8192
    decoded = wire.decode_message(wire.open_envelope(envelope, network.caps), network.caps)
    # the newest groups are kept
    assert [g.task.index for g in decoded.groups] == list(range(10 - sent, 10))
