"""Prometheus metrics of one node, and the /metrics HTTP endpoint that serves them.

`NodeMetrics` owns its own `CollectorRegistry` (several nodes can live in one test process).
The node feeds it from two places:
- `record_round(metrics)` once per round, with the round's metrics dict (see `ROUND_KEYS`);
- `update_p2p(snapshot)` whenever it polls the p2p client: the snapshot's counters are monotonic
  totals since the p2p process started, so this turns them into increments (and treats a total
  that went down, after a p2p process restart, as a fresh start from zero).

`MetricsServer` serves /metrics. On loopback (the default, 127.0.0.1) it needs no token, like the
admin API. Elsewhere the config requires a choice (swarmnode.config.AdminConfig): every scrape
carries the admin token as a bearer token (Prometheus: ``authorization: {credentials: ...}``), or
`admin.metrics_public = true` serves it to anyone who reaches the address, and the node warns.
"""

from __future__ import annotations

import hmac
import math
import socket
import threading
from collections.abc import Callable, Mapping, Sequence, Sized
from socketserver import ThreadingMixIn
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from swarmnode.admin.addresses import join_host_port, split_host_port

# Keys `record_round` understands; others (trainer diagnostics) are ignored.
ROUND_KEYS = (
    "round",  # int: the round just finished
    "reward_mean",  # float: mean reward of the local groups generated this round
    "reward_mean_external",  # float: mean reward (local verifier) of the external groups trained on
    "generated_tokens",  # int: tokens generated this round
    "tokens_per_s",  # float: generation throughput this round
    "step_seconds",  # float: wall time of the GRPO update
    "published",  # int: rollout groups published
    "received",  # int: rollout groups received from peers
    "accepted",  # int: received groups that entered the external pool
    "rejected_by_reason",  # Mapping[str, int]: received groups dropped, by reason
    "used_local",  # int: local groups trained on
    "used_external",  # int: external groups trained on
    "gossip_latency_s",  # Iterable[float]: creation-to-receipt delay of each received group
    "loss",  # float
    "clip_fraction",  # float
)

REWARD_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class P2PSnapshot(Protocol):
    """The fields of `swarmnode.p2p.ipc.P2PStatus` that `update_p2p` reads (totals since start)."""

    peers: Sequence[object]
    msgs_in: int
    msgs_out: int
    bytes_in: int
    bytes_out: int
    verdicts: Mapping[str, int]  # received messages by validation verdict reason
    drops: Mapping[str, int]  # messages dropped, by place
    restarts: int


class NodeMetrics:
    """Counters, gauges and histograms of one node, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.info = Gauge(
            "swarmnode_node_info",
            "Identity of this node (value 1)",
            ["peer_id", "name", "model_id"],
            registry=r,
        )
        self.rounds = Counter("swarmnode_rounds", "Training rounds completed", registry=r)
        self.round = Gauge("swarmnode_round", "Current round number", registry=r)
        self.reward = Histogram(
            "swarmnode_round_reward",
            "Mean reward of a round's groups",
            ["source"],
            buckets=REWARD_BUCKETS,
            registry=r,
        )
        self.reward_last = Gauge(
            "swarmnode_reward_mean", "Mean reward of the last round", ["source"], registry=r
        )
        self.rollouts_published = Counter(
            "swarmnode_rollouts_published", "Rollout groups published", registry=r
        )
        self.rollouts_received = Counter("swarmnode_rollouts_received", "Rollout groups received", registry=r)
        self.rollouts_accepted = Counter(
            "swarmnode_rollouts_accepted", "Received rollout groups accepted into the pool", registry=r
        )
        self.rollouts_rejected = Counter(
            "swarmnode_rollouts_rejected",
            "Received rollout groups rejected, by reason",
            ["reason"],
            registry=r,
        )
        self.rollouts_used = Counter(
            "swarmnode_rollouts_used", "Rollout groups trained on, by source", ["source"], registry=r
        )
        self.generated_tokens = Counter("swarmnode_generated_tokens", "Tokens generated", registry=r)
        self.tokens_per_s = Gauge(
            "swarmnode_generation_tokens_per_second", "Generation throughput, last round", registry=r
        )
        self.step_seconds = Histogram(
            "swarmnode_train_step_seconds", "Wall time of one GRPO update", buckets=STEP_BUCKETS, registry=r
        )
        self.gossip_latency = Histogram(
            "swarmnode_gossip_latency_seconds",
            "Delay between a rollout group's creation and its receipt",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.train = Gauge("swarmnode_train", "Trainer diagnostics of the last round", ["metric"], registry=r)
        self.peers = Gauge("swarmnode_peers", "Connected peers", registry=r)
        self.network_nodes = Gauge(
            "swarmnode_network_nodes", "Nodes in the network view (heartbeats)", registry=r
        )
        self.p2p_messages = Counter(
            "swarmnode_p2p_messages", "Gossip messages, by direction", ["direction"], registry=r
        )
        self.p2p_bytes = Counter(
            "swarmnode_p2p_bytes", "Gossip bytes, by direction", ["direction"], registry=r
        )
        self.p2p_verdicts = Counter(
            "swarmnode_p2p_verdicts",
            "Received messages (rollouts and heartbeats) by validation verdict reason",
            ["reason"],
            registry=r,
        )
        self.p2p_drops = Counter("swarmnode_p2p_drops", "Messages dropped, by place", ["place"], registry=r)
        self.p2p_restarts = Gauge("swarmnode_p2p_restarts", "Restarts of the libp2p host process", registry=r)
        self._last_totals: dict[tuple[str, ...], int] = {}
        self._lock = threading.Lock()

    def set_identity(self, peer_id: str, name: str, model_id: str) -> None:
        self.info.clear()
        self.info.labels(peer_id=peer_id, name=name, model_id=model_id).set(1)

    def track_network_view(self, view: Sized) -> None:
        """Report the size of the network view (nodes heard from) at every scrape."""
        self.network_nodes.set_function(lambda: len(view))

    def record_round(self, metrics: Mapping[str, Any]) -> None:
        """Record one finished round. Missing keys are skipped; NaN values are not recorded."""
        self.rounds.inc()
        if "round" in metrics:
            self.round.set(metrics["round"])
        for key, source in (("reward_mean", "local"), ("reward_mean_external", "external")):
            value = _number(metrics.get(key))
            if value is not None:
                self.reward.labels(source=source).observe(value)
                self.reward_last.labels(source=source).set(value)
        if _number(metrics.get("generated_tokens")) is not None:
            self.generated_tokens.inc(metrics["generated_tokens"])
        if _number(metrics.get("tokens_per_s")) is not None:
            self.tokens_per_s.set(metrics["tokens_per_s"])
        if _number(metrics.get("step_seconds")) is not None:
            self.step_seconds.observe(metrics["step_seconds"])
        for key, counter in (
            ("published", self.rollouts_published),
            ("received", self.rollouts_received),
            ("accepted", self.rollouts_accepted),
        ):
            if metrics.get(key):
                counter.inc(metrics[key])
        for reason, count in (metrics.get("rejected_by_reason") or {}).items():
            self.rollouts_rejected.labels(reason=reason).inc(count)
        for key, source in (("used_local", "local"), ("used_external", "external")):
            if metrics.get(key):
                self.rollouts_used.labels(source=source).inc(metrics[key])
        for latency in metrics.get("gossip_latency_s") or ():
            self.gossip_latency.observe(max(0.0, latency))
        for key in ("loss", "clip_fraction"):
            value = _number(metrics.get(key))
            if value is not None:
                self.train.labels(metric=key).set(value)

    def update_p2p(self, snapshot: P2PSnapshot) -> None:
        """Bring the p2p counters up to the snapshot's totals (see module docstring)."""
        self.peers.set(len(snapshot.peers))
        self.p2p_restarts.set(snapshot.restarts)
        with self._lock:
            for direction, msgs, nbytes in (
                ("in", snapshot.msgs_in, snapshot.bytes_in),
                ("out", snapshot.msgs_out, snapshot.bytes_out),
            ):
                self._advance(self.p2p_messages.labels(direction=direction), ("msgs", direction), msgs)
                self._advance(self.p2p_bytes.labels(direction=direction), ("bytes", direction), nbytes)
            for reason, total in snapshot.verdicts.items():
                self._advance(self.p2p_verdicts.labels(reason=reason), ("verdict", reason), total)
            for place, total in snapshot.drops.items():
                self._advance(self.p2p_drops.labels(place=place), ("drop", place), total)

    def _advance(self, counter: Counter, key: tuple[str, ...], total: int) -> None:
        last = self._last_totals.get(key, 0)
        delta = total - last if total >= last else total  # a smaller total: the p2p process restarted
        if delta > 0:
            counter.inc(delta)
        self._last_totals[key] = total

    def serve(self, address: str, token: str | None = None) -> MetricsServer:
        """Serve /metrics over HTTP at 'host:port' (port 0 picks a free port; see `.address`).
        With `token`, every scrape must send ``Authorization: Bearer <token>``."""
        return MetricsServer(self.registry, address, token)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Scrapes are frequent; access lines would drown the node's log."""


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up shutdown


def _bearer_app(app: Callable[..., Any], token: str) -> Callable[..., Any]:
    """`app` behind a bearer-token check, compared in constant time (Prometheus: `authorization:`)."""
    expected = f"Bearer {token}".encode()

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        sent = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
        if not hmac.compare_digest(sent, expected):
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="swarmnode"')],
            )
            return [b"this /metrics endpoint requires the node's admin token as a bearer token\n"]
        return app(environ, start_response)

    return guarded


class MetricsServer:
    """A running /metrics endpoint; `stop()` shuts it down."""

    def __init__(self, registry: CollectorRegistry, address: str, token: str | None = None) -> None:
        host, port = split_host_port(address, what="admin.metrics_listen")
        app = make_wsgi_app(registry)
        self.requires_token = token is not None
        if token is not None:
            app = _bearer_app(app, token)
        server_class = type(
            "_MetricsHTTPServer",
            (_ThreadingWSGIServer,),
            {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET},
        )
        try:
            self._server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        except OSError as exc:
            raise OSError(
                f"cannot serve /metrics on {address}: {exc.strerror or exc}; "
                "set admin.metrics_listen to a free address (port 0 picks one) or None to turn it off"
            ) from exc
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        self.address = join_host_port(host, self._server.server_port)

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)
