"""The network view: what every node knows about the swarm, built from signed heartbeats alone.

There is no central server. Every node periodically gossips a small signed heartbeat (built with
`heartbeat_from_status`, encoded and signed by swarmnode.wire) on the heartbeat topic. Heartbeats
go through the same validation pipeline as rollouts (size, decode, signature bound to the libp2p
origin, replay, rate), so the `origin` handed to `NetworkView.observe` is authenticated. A node
that stays silent for `expire_s` drops out of the view.

A heartbeat may advertise where its operator reaches the node's admin API and /metrics
(admin.advertise_host): that is what `swarmnode net` shows to an operator of several machines.
Those addresses are claims of the signer, kept only when they are a plain HOST:PORT.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping

from swarmnode.admin.source import NetworkNode, NodeStatus
from swarmnode.wire import NodeHeartbeat

TREND_POINTS = 16  # reward-trend points per heartbeat
MAX_COUNTERS = 64  # counters per heartbeat (the wire cap is larger; stay well below it)


def heartbeat_from_status(
    status: NodeStatus,
    counters: Mapping[str, int],
    sequence: int,
    created_at: float | None = None,
    *,
    admin_address: str = "",
    metrics_address: str = "",
) -> NodeHeartbeat:
    """This node's heartbeat: identity-free fields from its status plus its counters (the sender's
    identity is the envelope's signature), and the admin and /metrics addresses it chose to
    advertise ("" = none). Encode with `swarmnode.wire.encode_heartbeat`."""
    kept = sorted(counters.items())[:MAX_COUNTERS]
    return NodeHeartbeat(
        name=status.name,
        model_id=status.model_id,
        node_round=status.round,
        sequence=sequence,
        created_at=time.time() if created_at is None else created_at,
        reward_trend=tuple(float(r) for r in status.recent_rewards[-TREND_POINTS:]),
        counters={name: max(0, int(value)) for name, value in kept},
        silo=status.silo,
        peers=status.connected_peers,
        software_version=status.version,
        admin_address=admin_address,
        metrics_address=metrics_address,
    )


def advertised_address(claim: str) -> str:
    """A peer's advertised HOST:PORT when it is one, else "" (peer text shown to operators: a
    plain host name or IP and a port, nothing a terminal or a table could interpret)."""
    return claim if _ADVERTISED.fullmatch(claim) else ""


_ADVERTISED = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.\-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\]):[0-9]{1,5}"
)


class NetworkView:
    """The latest heartbeat of each node heard within `expire_s`. Thread-safe."""

    def __init__(self, expire_s: float = 90.0, max_nodes: int = 4096) -> None:
        if expire_s <= 0:
            raise ValueError(f"NetworkView expire_s must be positive, got {expire_s}")
        self.expire_s = expire_s
        self.max_nodes = max_nodes
        self._latest: dict[str, tuple[NodeHeartbeat, float]] = {}  # origin -> (heartbeat, received_at)
        self._lock = threading.Lock()

    def observe(self, heartbeat: NodeHeartbeat, origin: str, received_at: float) -> bool:
        """Record a validated heartbeat from `origin`. Returns False (and keeps the newer one) for a
        heartbeat older than the one already held from that origin."""
        with self._lock:
            held = self._latest.get(origin)
            if held is not None and heartbeat.sequence <= held[0].sequence:
                return False
            if held is None and len(self._latest) >= self.max_nodes:
                stalest = min(self._latest, key=lambda peer: self._latest[peer][1])
                del self._latest[stalest]
            self._latest[origin] = (heartbeat, received_at)
            return True

    def nodes(self, now: float | None = None) -> list[NetworkNode]:
        """Nodes heard within `expire_s` of `now`, by peer id; silent ones are forgotten."""
        now = time.time() if now is None else now
        with self._lock:
            for peer in [p for p, (_, seen) in self._latest.items() if now - seen > self.expire_s]:
                del self._latest[peer]
            held = sorted(self._latest.items())
        return [
            NetworkNode(
                peer_id=peer,
                name=beat.name,
                model_id=beat.model_id,
                round=beat.node_round,
                reward_trend=list(beat.reward_trend),
                last_seen=seen,
                counters=dict(beat.counters),
                silo=beat.silo,
                peers=beat.peers,
                version=beat.software_version,
                admin_address=advertised_address(beat.admin_address),
                metrics_address=advertised_address(beat.metrics_address),
            )
            for peer, (beat, seen) in held
        ]

    def __len__(self) -> int:
        with self._lock:
            return len(self._latest)
