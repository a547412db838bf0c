"""A dishonest peer for tests: publishes validly signed rollout batches whose question text does
not match the task reference (it claims an existing task but rewrites the question).

Run: python tests/forger_node.py KEY RUN_DIR DURATION_S BOOTSTRAP [BOOTSTRAP...]
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from swarmnode import wire
from swarmnode.config import P2PConfig
from swarmnode.identity import Identity
from swarmnode.p2p.client import P2PClient
from swarmnode.rl.records import RolloutGroup
from swarmnode.tasks.registry import TaskRegistry


def forged_groups(registry: TaskRegistry, rng: random.Random, round_: int) -> list[RolloutGroup]:
    groups = []
    for task in registry.sample(rng, 4):
        completions = ("<answer>1</answer>", "<answer>2</answer>", f"<answer>{task.answer}</answer>", "x")
        groups.append(
            RolloutGroup(
                task=task.ref,
                question=task.question.replace("=", "= 1 +"),  # the lie
                completions=completions,
                finished=(True,) * 4,
                model_id="forger",
                round=round_,
                created_at=time.time(),
            )
        )
    return groups


def main() -> int:
    key, run_dir, duration, *bootstrap = sys.argv[1:]
    identity = Identity.load_or_create(key)
    client = P2PClient(P2PConfig(bootstrap=bootstrap), Path(key), Path(run_dir))
    client.start()
    registry = TaskRegistry("easy", eval_size=16)
    rng = random.Random(7)
    sequencer = wire.Sequencer()
    deadline = time.monotonic() + float(duration)
    round_ = 0
    try:
        while time.monotonic() < deadline:
            payload = wire.encode_rollout_batch(
                forged_groups(registry, rng, round_),
                node_round=round_,
                sequence=sequencer.next(),
                model_id="forger",
                created_at=time.time(),
            )
            client.publish(wire.Kind.ROLLOUT_BATCH, wire.seal(identity, wire.Kind.ROLLOUT_BATCH, payload))
            round_ += 1
            time.sleep(0.3)
    finally:
        client.stop()
    print(identity.peer_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
