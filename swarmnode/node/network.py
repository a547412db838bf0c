"""The node's view of the swarm: signed rollout batches and heartbeats over the p2p client.

Wraps `P2PClient` (the supervised libp2p host process) with the wire format: seals outgoing
batches with the node's identity, opens incoming envelopes and turns them into `RolloutGroup`s
tagged with their authenticated sender, feeds heartbeats into the network view. Never blocks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from swarmnode import wire
from swarmnode.admin.network_view import NetworkView
from swarmnode.config import NodeConfig
from swarmnode.identity import Identity
from swarmnode.p2p.client import P2P_STATUS_FILE, P2PClient
from swarmnode.p2p.ipc import P2PStatus
from swarmnode.rl.records import RolloutGroup

log = logging.getLogger(__name__)


class ReceivedBatch(NamedTuple):
    """A rollout batch a peer sent, as the round loop takes it in."""

    origin: str  # the envelope's author (its verified signer)
    groups: list[RolloutGroup]
    latency_s: float  # gossip latency: receive time minus the batch's creation time
    msg_id: str  # content id of the message
    forwarder: str = ""  # the connected peer that delivered it (the lane intake shares are kept by)


class SwarmNetwork:
    def __init__(self, cfg: NodeConfig, identity: Identity, model_id: str) -> None:
        self.cfg = cfg
        self.identity = identity
        self.model_id = model_id
        self.caps = wire.WireCaps.from_config(cfg.p2p)
        self.client = P2PClient(cfg.p2p, cfg.key_path, Path(cfg.data_dir) / "p2p")
        self.view = NetworkView(expire_s=max(3 * cfg.admin.heartbeat_interval, 30.0))
        self.decode_errors: Counter[str] = Counter()
        self.publish_drops: Counter[str] = Counter()  # own groups not published, by reason
        self.rollout_sequence = wire.Sequencer()
        self.heartbeat_sequence = wire.Sequencer()
        # Peers rate-limit every origin (p2p.rate_msgs_per_s); a node whose rounds are faster than
        # half that rate merges several rounds' groups into one batch instead of being banned.
        self.min_publish_interval_s = 2.0 / cfg.p2p.rate_msgs_per_s
        self._pending: list[RolloutGroup] = []
        self._last_publish = -float("inf")

    def start(self) -> None:
        self.client.start()

    def close(self) -> None:
        self.save_status()
        self.client.stop()

    def save_status(self) -> None:
        """Write the host's last verdict, drop and work counts (not its peer lists) next to its ban
        file, so a finished run keeps what the p2p layer rejected (duplicates, replays, rate limits)
        and not only what reached the round loop."""
        status = dataclasses.asdict(self.client.status())
        for bulky in ("peers", "banned_peers", "banned"):
            status.pop(bulky, None)
        path = self.client.run_dir / P2P_STATUS_FILE
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(status, default=str))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not save the p2p status to %s: %s", path, exc)

    def publish_rollouts(self, groups: list[RolloutGroup], node_round: int) -> int:
        """Queue this round's groups and publish them as one signed batch when the rate allows;
        returns the number of groups handed to the host now."""
        self._pending = (self._pending + groups)[-self.cfg.p2p.max_groups_per_batch :]
        now = time.monotonic()
        if now - self._last_publish < self.min_publish_interval_s:
            return 0
        batch, self._pending = self._pending, []
        self._last_publish = now
        sealed, count = self._seal_batch(batch, node_round)
        return count if sealed is not None and self.client.publish(wire.Kind.ROLLOUT_BATCH, sealed) else 0

    def _seal_batch(self, batch: list[RolloutGroup], node_round: int) -> tuple[bytes | None, int]:
        """One signed batch under this node's own message cap. Receivers would reject (and penalise)
        an oversize batch, so the oldest groups are dropped until it fits, and counted."""
        while batch:
            payload = wire.encode_rollout_batch(
                batch,
                node_round=node_round,
                sequence=self.rollout_sequence.next(),
                model_id=self.model_id,
                created_at=time.time(),
            )
            try:
                sealed = wire.seal(
                    self.identity,
                    wire.Kind.ROLLOUT_BATCH,
                    payload,
                    max_message_bytes=self.caps.max_message_bytes,
                )
                return sealed, len(batch)
            except wire.WireError as exc:
                if str(exc.reason) != "oversize":
                    raise
                dropped = max(1, len(batch) // 2)
                self.publish_drops["oversize"] += dropped
                log.warning(
                    "batch over the message cap (%s); dropping its %d oldest groups", exc.detail, dropped
                )
                batch = batch[dropped:]
        return None, 0

    def publish_heartbeat(self, beat: wire.NodeHeartbeat) -> bool:
        # The host never delivers our own messages back: put ourselves in the view directly.
        self.view.observe(beat, self.identity.peer_id, time.time())
        payload = wire.encode_heartbeat(beat)
        sealed = wire.seal(
            self.identity, wire.Kind.HEARTBEAT, payload, max_message_bytes=self.caps.max_message_bytes
        )
        return self.client.publish(wire.Kind.HEARTBEAT, sealed)

    def receive_rollouts(self) -> Iterator[ReceivedBatch]:
        """Each rollout batch that arrived; heartbeats go to the view. The message id lets a later
        verdict on a group blame the connection that delivered it (``report(..., msg_id=...)``)."""
        for item in self.client.drain(self.cfg.p2p.receive_queue):
            try:
                message = wire.decode_message(wire.open_envelope(item.data, self.caps), self.caps)
            except wire.WireError as exc:
                # The host's pipeline already decoded it once; reaching here means a version skew.
                self.decode_errors[str(exc.reason)] += 1
                log.warning("dropping message from %s: %s", item.origin, exc)
                continue
            if isinstance(message, wire.NodeHeartbeat):
                self.view.observe(message, item.origin, item.received_at)
                continue
            batch = message
            latency = max(0.0, item.received_at - batch.created_at)
            yield ReceivedBatch(item.origin, batch.groups, latency, item.msg_id, item.forwarder)

    def report(self, peer_id: str, reason: str, msg_id: str = "") -> None:
        """Tell the host a group from ``peer_id`` failed the node's own checks; with the message id
        the host also blames the exact connection that forwarded it."""
        self.client.report(peer_id, reason, msg_id=msg_id)

    def status(self) -> P2PStatus:
        return self.client.status()

    def is_silo(self) -> bool:
        return self.client.status().silo
