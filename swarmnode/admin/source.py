"""What the admin service shows, and the boundary the node implements to feed it.

The node owns the live state; the admin side only reads snapshots through `AdminSource`. Every
record here is a small frozen dataclass that crosses three boundaries unchanged: node -> gRPC
server (converted to protobuf), gRPC client -> CLI (converted back), CLI -> `--json` output
(`dataclasses.asdict`). `EventLog` is a ready-made thread-safe ring buffer the node can use to
implement `AdminSource.events_since`.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class NodeStatus:
    """One node's own state, as `swarmnode status` shows it."""

    name: str
    peer_id: str
    model_id: str
    round: int
    rounds_target: int
    recent_rewards: list[float]  # mean reward of each of the last rounds, oldest first
    uptime_s: float
    silo: bool  # True when training alone (p2p disabled, or no peer connected)
    p2p_state: str  # e.g. "disabled", "starting", "running", "restarting", "stopped"
    listen_addrs: list[str]
    data_dir: str
    started_at: float  # unix time
    config_digest: str  # digest of the resolved config, to compare nodes at a glance
    version: str = ""
    connected_peers: int = 0
    admin_address: str = ""
    metrics_address: str = ""


@dataclass(frozen=True)
class PeerInfo:
    """One peer, as `swarmnode peers` shows it: a connected one, or a banned one (`banned`)."""

    peer_id: str
    addrs: list[str]
    connected_since: float  # unix time
    msgs_in: int
    msgs_out: int
    bytes_in: int
    bytes_out: int
    verdicts: dict[str, int]  # validation verdicts on this peer's messages, by reason ("accepted", ...)
    score: float
    banned: bool = False  # banned for bad messages: disconnected, not redialed, messages ignored
    ban_reason: str = ""  # the verdict that banned it ("" when the p2p host did not say)
    banned_until: float = 0.0  # unix time the ban ends (0 when the p2p host did not say)


@dataclass(frozen=True)
class NetworkNode:
    """One node of the network view, built from the signed heartbeats this node received."""

    peer_id: str
    name: str
    model_id: str
    round: int
    reward_trend: list[float]  # its recent mean rewards, oldest first
    last_seen: float  # unix time this node last received its heartbeat
    counters: dict[str, int] = field(default_factory=dict)
    silo: bool = False
    peers: int = 0  # its connected peers
    version: str = ""  # its swarmnode version
    admin_address: str = ""  # HOST:PORT it advertises for its admin API ("" = none; a claim)
    metrics_address: str = ""  # HOST:PORT it advertises for /metrics ("" = none; a claim)


@dataclass(frozen=True)
class Event:
    """Something that happened at the node (peer joined, round done, message rejected, ...)."""

    time: float
    kind: str
    message: str
    fields: dict[str, str] = field(default_factory=dict)


class AdminSource(Protocol):
    """What the node exposes to the admin service. Every method is cheap, thread-safe and
    non-blocking: it is called from gRPC worker threads while the round loop runs."""

    def status(self) -> NodeStatus: ...

    def peers(self) -> list[PeerInfo]: ...

    def network(self) -> list[NetworkNode]: ...

    def events_since(self, cursor: int) -> tuple[list[Event], int]:
        """Events after `cursor` (0 = everything still held) and the cursor to pass next time."""
        ...


class EventLog:
    """A bounded, thread-safe event buffer with monotonically increasing cursors.

    Cursor n means "I have seen the first n events ever emitted". Events that fell out of the
    buffer are simply gone; a reader that lags more than `capacity` events skips them.
    """

    def __init__(self, capacity: int = 1000) -> None:
        if capacity < 1:
            raise ValueError(f"EventLog capacity must be at least 1, got {capacity}")
        self._events: deque[tuple[int, Event]] = deque(maxlen=capacity)
        self._counter = itertools.count(1)
        self._last = 0
        self._lock = threading.Lock()

    def emit(self, kind: str, message: str, **fields: object) -> Event:
        event = Event(
            time=time.time(), kind=kind, message=message, fields={k: str(v) for k, v in fields.items()}
        )
        with self._lock:
            self._last = next(self._counter)
            self._events.append((self._last, event))
        return event

    def events_since(self, cursor: int) -> tuple[list[Event], int]:
        with self._lock:
            return [event for number, event in self._events if number > cursor], self._last
