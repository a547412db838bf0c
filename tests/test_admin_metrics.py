"""Prometheus metrics: round and p2p recording, and a real scrape of the /metrics endpoint."""

from __future__ import annotations

import json
import math
import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from swarmnode.admin.metrics import NodeMetrics
from swarmnode.p2p.ipc import P2PStatus, PeerStatus

REPO = Path(__file__).resolve().parent.parent

ROUND = {
    "round": 3,
    "reward_mean": 0.5,
    "reward_mean_external": 0.25,
    "generated_tokens": 640,
    "tokens_per_s": 4200.0,
    "step_seconds": 0.45,
    "published": 8,
    "received": 12,
    "accepted": 9,
    "rejected_by_reason": {"task_mismatch": 2, "stale": 1},
    "used_local": 4,
    "used_external": 4,
    "gossip_latency_s": [0.02, 0.08, 1.5],
    "loss": -0.01,
    "clip_fraction": 0.1,
    "eval_accuracy": None,  # keys outside ROUND_KEYS are ignored
}


def samples(metrics: NodeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape of the text format, keyed by (name, sorted labels)."""
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def p2p_status(msgs_in: int, verdicts: dict[str, int], peers: int = 2) -> P2PStatus:
    return P2PStatus(
        peers=tuple(PeerStatus(peer_id=f"p{i}", connected_since=0.0) for i in range(peers)),
        msgs_in=msgs_in,
        bytes_in=msgs_in * 1000,
        msgs_out=5,
        bytes_out=5000,
        verdicts=verdicts,
        drops={"queue_full": 1},
        restarts=0,
    )


def test_round_metrics_land_in_counters_gauges_and_histograms() -> None:
    metrics = NodeMetrics()
    metrics.record_round(ROUND)
    metrics.record_round({**ROUND, "round": 4, "reward_mean_external": None, "gossip_latency_s": []})
    s = samples(metrics)
    assert s[("swarmnode_rounds_total", ())] == 2
    assert s[("swarmnode_round", ())] == 4
    assert s[("swarmnode_rollouts_published_total", ())] == 16
    assert s[("swarmnode_rollouts_received_total", ())] == 24
    assert s[("swarmnode_rollouts_accepted_total", ())] == 18
    assert s[("swarmnode_rollouts_rejected_total", (("reason", "task_mismatch"),))] == 4
    assert s[("swarmnode_rollouts_used_total", (("source", "external"),))] == 8
    assert s[("swarmnode_round_reward_count", (("source", "local"),))] == 2
    assert s[("swarmnode_round_reward_count", (("source", "external"),))] == 1  # None is not recorded
    assert s[("swarmnode_gossip_latency_seconds_count", ())] == 3
    assert s[("swarmnode_gossip_latency_seconds_bucket", (("le", "0.1"),))] == 2
    assert s[("swarmnode_train_step_seconds_sum", ())] == pytest.approx(0.9)
    assert s[("swarmnode_generation_tokens_per_second", ())] == 4200.0
    assert s[("swarmnode_generated_tokens_total", ())] == 1280
    assert s[("swarmnode_train", (("metric", "clip_fraction"),))] == 0.1


def test_p2p_totals_become_increments_and_survive_a_host_restart() -> None:
    metrics = NodeMetrics()
    metrics.update_p2p(p2p_status(10, {"accepted": 8, "bad_signature": 2}))
    metrics.update_p2p(p2p_status(15, {"accepted": 12, "bad_signature": 3}))
    s = samples(metrics)
    assert s[("swarmnode_p2p_messages_total", (("direction", "in"),))] == 15
    assert s[("swarmnode_p2p_verdicts_total", (("reason", "bad_signature"),))] == 3
    # An unchanged total is not counted twice.
    assert s[("swarmnode_p2p_messages_total", (("direction", "out"),))] == 5
    # The host process restarted: its totals start again from zero.
    metrics.update_p2p(p2p_status(4, {"accepted": 4}, peers=1))
    s = samples(metrics)
    assert s[("swarmnode_p2p_messages_total", (("direction", "in"),))] == 19
    assert s[("swarmnode_p2p_verdicts_total", (("reason", "accepted"),))] == 16
    assert s[("swarmnode_peers", ())] == 1
    assert s[("swarmnode_p2p_drops_total", (("place", "queue_full"),))] == 1


def test_nan_values_are_skipped_not_recorded() -> None:
    metrics = NodeMetrics()
    metrics.record_round({"round": 1, "reward_mean": math.nan, "step_seconds": math.nan})
    s = samples(metrics)
    assert s.get(("swarmnode_round_reward_count", (("source", "local"),)), 0) == 0
    assert s[("swarmnode_train_step_seconds_count", ())] == 0


def test_metrics_endpoint_scrape_parses_and_has_the_issue_counters() -> None:
    metrics = NodeMetrics()
    metrics.set_identity("12D3KooWAlpha", "alpha", "embedded:tiny-a")
    metrics.record_round(ROUND)
    metrics.update_p2p(p2p_status(10, {"accepted": 8, "bad_signature": 2}))
    server = metrics.serve("127.0.0.1:0")
    try:
        assert not server.address.endswith(":0")
        with urllib.request.urlopen(server.url, timeout=10) as response:
            text = response.read().decode()
    finally:
        server.stop()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "swarmnode_rounds",
        "swarmnode_rollouts_published",
        "swarmnode_rollouts_received",
        "swarmnode_rollouts_accepted",
        "swarmnode_rollouts_rejected",
        "swarmnode_p2p_verdicts",
    ):
        assert families[name].type == "counter", name
    for name in (
        "swarmnode_round_reward",
        "swarmnode_gossip_latency_seconds",
        "swarmnode_train_step_seconds",
    ):
        assert families[name].type == "histogram", name
    for name in ("swarmnode_peers", "swarmnode_generation_tokens_per_second", "swarmnode_round"):
        assert families[name].type == "gauge", name
    [info] = families["swarmnode_node_info"].samples
    assert info.labels == {"peer_id": "12D3KooWAlpha", "name": "alpha", "model_id": "embedded:tiny-a"}


def test_metrics_server_on_a_busy_port_says_what_to_change() -> None:
    metrics = NodeMetrics()
    first = metrics.serve("127.0.0.1:0")
    try:
        with pytest.raises(OSError, match="admin.metrics_listen"):
            metrics.serve(first.address)
    finally:
        first.stop()


def test_grafana_dashboard_queries_only_metrics_the_node_exports() -> None:
    dashboard = json.loads((REPO / "docker" / "grafana" / "swarmnode-dashboard.json").read_text())
    metrics = NodeMetrics()
    metrics.set_identity("12D3KooWAlpha", "alpha", "embedded:tiny-a")
    metrics.record_round(ROUND)
    metrics.update_p2p(p2p_status(10, {"accepted": 8}))
    exported = {name for name, _labels in samples(metrics)}
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    referenced = {name for q in queries for name in re.findall(r"\bswarmnode_[a-z0-9_]+", q)}
    assert len(queries) >= 15 and len(referenced) >= 15
    assert referenced <= exported, f"dashboard queries unknown metrics: {sorted(referenced - exported)}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_network_view_size_is_reported_at_scrape_time() -> None:
    from swarmnode.admin.network_view import NetworkView
    from swarmnode.wire import NodeHeartbeat

    metrics, view = NodeMetrics(), NetworkView(expire_s=30)
    metrics.track_network_view(view)
    assert samples(metrics)[("swarmnode_network_nodes", ())] == 0
    view.observe(NodeHeartbeat("a", "m", 1, 1, 0.0), "peerA", received_at=0.0)
    assert samples(metrics)[("swarmnode_network_nodes", ())] == 1


def test_grafana_dashboard_works_for_many_targets_on_many_hosts() -> None:
    """Every query selects by the job and instance variables (one series per node's /metrics target,
    whatever host it is on) and nothing names a host or port."""
    text = (REPO / "docker" / "grafana" / "swarmnode-dashboard.json").read_text()
    dashboard = json.loads(text)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["job"]["definition"] == "label_values(swarmnode_node_info, job)"
    assert variables["instance"]["definition"] == 'label_values(swarmnode_node_info{job=~"$job"}, instance)'
    assert variables["instance"]["multi"] and variables["instance"]["includeAll"]
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for query in queries:
        selectors = re.findall(r"\bswarmnode_[a-z0-9_]+(\{[^}]*\})?", query)
        assert selectors and all(sel == '{job=~"$job", instance=~"$instance"}' for sel in selectors), query
    assert not re.search(r"localhost|127\.0\.0\.1|:9100\b|:7500\b", text)
