"""Scale bench: per-node cost against swarm size, N = 8, 16, 32 lightweight nodes on loopback.

Each node is a real ``swarmnode.p2p.gossip_node`` process with its libp2p host process (the
validation pipeline included); the stand-in trainer publishes one signed rollout batch per round
(``--groups`` groups of 8 completions, ``--payload-bytes`` sealed) at one round per ``--round-s``
seconds, rounds staggered across nodes as independent nodes' rounds are. No model runs.

Two layouts, each at every N:

- ``flat``: today's single rollout topic; every node receives every batch.
- ``sharded``: ``p2p.rollout_shards = max(1, N // --shard-size)`` (docs/DESIGN.md, "Traffic
  bounded by use"); a node publishes to and subscribes to its own shard's topic only.

Recorded per N and layout, over the publishing window: CPU per node per round (node + host
processes, from /proc), bytes the host read from and wrote to its libp2p connections per node per
round (every protocol and duplicate copy; from the start tick to the end of the linger), delivery
of what the layout routes to each node,
latency p50/p95, intake work per node per round (batches and groups accepted by the host's
pipeline), whether the trainer had its ``--use`` external groups every round, and the load average
(the machine is shared; runs under a load above the core count are pessimistic and labelled).
Writes bench/results/scale.json and bench/results/scale.png (matplotlib) and prints the ratios
N = 32 / N = 8 that the bar in issue 11 is about.

    .venv/bin/python scripts/bench_scale.py                                  # ~10 minutes
    .venv/bin/python scripts/bench_scale.py --sizes 4,8 --rounds 3 --layouts sharded --shard-size 4  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_gossip import cpu_seconds, free_port, percentile, read_jsonl  # noqa: E402

from swarmnode.identity import Identity  # noqa: E402
from swarmnode.p2p.host import shard_of  # noqa: E402

SETTLE_S = 3.0  # after every node has its rollout mesh: a few gossipsub heartbeats
LINGER_S = 6.0
MIN_MESH = 2


def wait_for_rollout_mesh(workdir: Path, n: int, want: list[int], timeout: float) -> float:
    """Bounded wait until node i reports ``want[i]`` rollout-topic mesh peers; returns seconds waited."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        ready = 0
        for i in range(n):
            peers = [e for e in read_jsonl(workdir / f"o{i}.jsonl") if e["event"] == "peers"]
            if peers and peers[-1].get("mesh_peers", {}).get("ROLLOUT_BATCH", 0) >= want[i]:
                ready += 1
        if ready == n:
            return time.monotonic() - began
        time.sleep(1.0)
    raise RuntimeError(f"not every node had its rollout mesh within {timeout:.0f} s; see {workdir}")


def run_swarm(n: int, shards: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    keys = [workdir / f"k{i}" for i in range(n)]
    ids = [Identity.load_or_create(k).peer_id for k in keys]
    shard = [shard_of(peer, shards) for peer in ids]
    ports = [free_port() for _ in range(n)]
    addr = [f"/ip4/127.0.0.1/tcp/{ports[i]}/p2p/{ids[i]}" for i in range(n)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    go = workdir / "go"
    duration = args.rounds * args.round_s
    procs = []
    for i in range(n):
        cmd = [sys.executable, "-m", "swarmnode.p2p.gossip_node", "--key", str(keys[i]),
               "--run-dir", str(workdir / f"r{i}"), "--listen", f"/ip4/127.0.0.1/tcp/{ports[i]}",
               "--payload-bytes", str(args.payload_bytes), "--groups", str(args.groups),
               "--rate", f"{1.0 / args.round_s:.6f}", "--start-when", str(go),
               "--phase", f"{args.round_s * i / n:.3f}", "--duration", f"{duration:.3f}",
               "--linger", str(LINGER_S), "--out", str(workdir / f"o{i}.jsonl"), "--seed", str(i),
               "--set", f"rollout_shards={shards}", "--start-wait", f"{args.warmup + 60:.0f}"]  # fmt: skip
        for j in [j for j in (0, 1, 2) if j != i][:2]:
            cmd += ["--bootstrap", addr[j]]
        with open(workdir / f"n{i}.log", "ab") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    members = {s: [i for i in range(n) if shard[i] == s] for s in set(shard)}
    want = [min(MIN_MESH, len(members[shard[i]]) - 1) for i in range(n)]
    try:
        waited = wait_for_rollout_mesh(workdir, n, want, args.warmup)
        node_pids = [p.pid for p in procs]
        host_pids = [e["host_pid"] for i in range(n) for e in read_jsonl(workdir / f"o{i}.jsonl")
                     if e["event"] == "ready"]  # fmt: skip
        time.sleep(SETTLE_S)
        start_at = time.time() + 1.0
        go.write_text(f"{start_at:.3f}")
        time.sleep(max(0.0, start_at - time.time()))
        load_before = os.getloadavg()
        cpu0 = cpu_seconds(node_pids + host_pids)
        time.sleep(duration)
        cpu_s = cpu_seconds(node_pids + host_pids) - cpu0
        load_after = os.getloadavg()
        for proc in procs:
            proc.wait(timeout=LINGER_S + 60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    events = {i: read_jsonl(workdir / f"o{i}.jsonl") for i in range(n)}
    sent = {i: {e["msg_id"]: e["t"] for e in ev if e["event"] == "sent"} for i, ev in events.items()}
    recv = {i: [e for e in ev if e["event"] == "recv" and "latency_ms" in e] for i, ev in events.items()}
    status = {i: next((e for e in ev if e["event"] == "status"), {}) for i, ev in events.items()}
    begin = {i: next((e for e in ev if e["event"] == "start"), {}) for i, ev in events.items()}

    def delta(key: str) -> int:
        """A host counter from the start tick to the node's final status (after the linger)."""
        return sum(status[i].get(key, 0) - begin[i].get(key, 0) for i in range(n) if status[i] and begin[i])

    expected = delivered = 0
    latencies: list[float] = []
    enough_rounds = total_rounds = 0
    for i in range(n):
        routed = {m for j in members[shard[i]] if j != i for m in sent[j]}
        got = {e["msg_id"] for e in recv[i]}
        expected += len(routed)
        delivered += len(routed & got)
        latencies += [e["latency_ms"] for e in recv[i] if e["msg_id"] in routed]
        # The stand-in trainer uses `--use` external groups per round: were there enough fresh ones?
        for k in range(2, args.rounds):  # rounds whose previous round is fully inside the publishing
            tick = start_at + args.round_s * (k + i / n)
            fresh = sum(args.groups for e in recv[i] if tick - args.round_s <= e["t"] < tick)
            enough_rounds += fresh >= args.use
            total_rounds += 1
    rounds = args.rounds
    msgs_in = delta("msgs_in")
    return {
        "nodes": n,
        "shards": shards,
        "shard_sizes": sorted(len(m) for m in members.values()),
        "mesh_wait_s": round(waited, 1),
        "rounds": rounds,
        "batches_sent": sum(len(s) for s in sent.values()),
        "deliveries_expected": expected,
        "deliveries": delivered,
        "delivery_ratio_routed": round(delivered / expected, 4) if expected else None,
        "latency_p50_ms": round(percentile(latencies, 0.50) or 0.0, 1),
        "latency_p95_ms": round(percentile(latencies, 0.95) or 0.0, 1),
        "cpu_ms_per_node_per_round": round(1000.0 * cpu_s / n / rounds, 1),
        "bytes_read_per_node_per_round": round(delta("wire_bytes_in") / n / rounds),
        "bytes_written_per_node_per_round": round(delta("wire_bytes_out") / n / rounds),
        "batches_accepted_per_node_per_round": round(msgs_in / n / rounds, 2),
        "groups_accepted_per_node_per_round": round(msgs_in * args.groups / n / rounds, 1),
        "rounds_with_enough_external_groups": round(enough_rounds / total_rounds, 4)
        if total_rounds
        else None,
        "nodes_without_status": sum(1 for s in status.values() if not s),
        "loadavg_during": [round(x, 2) for x in load_before] + [round(x, 2) for x in load_after],
    }


def plot(results: dict[str, list[dict[str, Any]]], out: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    metrics = [("cpu_ms_per_node_per_round", "CPU ms / node / round"),
               ("bytes_read_per_node_per_round", "bytes read / node / round"),
               ("groups_accepted_per_node_per_round", "groups accepted / node / round"),
               ("latency_p95_ms", "latency p95 (ms)")]  # fmt: skip
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    for ax, (key, label) in zip(axes, metrics, strict=True):
        for layout, rows in results.items():
            ok = [r for r in rows if "error" not in r]
            ax.plot([r["nodes"] for r in ok], [r[key] for r in ok], marker="o", label=layout)
        ax.set_xlabel("nodes (N)")
        ax.set_title(label, fontsize=10)
        ax.set_xticks(sorted({r["nodes"] for rows in results.values() for r in rows}))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return str(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="8,16,32", help="comma-separated swarm sizes")
    parser.add_argument("--layouts", default="flat,sharded", help="flat, sharded or both")
    parser.add_argument("--shard-size", type=int, default=8, help="sharded: nodes per shard (K = N // this)")
    parser.add_argument("--round-s", type=float, default=6.0, help="seconds per training round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds measured per run")
    parser.add_argument("--payload-bytes", type=int, default=32768, help="sealed batch size per round")
    parser.add_argument("--groups", type=int, default=8, help="rollout groups per batch")
    parser.add_argument("--use", type=int, default=4, help="external groups the trainer uses per round")
    parser.add_argument("--warmup", type=float, default=300.0, help="longest wait for start-up and meshes")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scale.json")
    parser.add_argument(
        "--reuse", type=Path, default=None, help="keep the rows (layout, N) found in this JSON"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    layouts = [x for x in args.layouts.split(",") if x]
    results: dict[str, list[dict[str, Any]]] = {layout: [] for layout in layouts}
    reused = json.loads(args.reuse.read_text())["results"] if args.reuse else {}
    for n in sizes:
        for layout in layouts:
            shards = max(1, n // args.shard_size) if layout == "sharded" else 1
            old = [r for r in reused.get(layout, []) if r.get("nodes") == n and "error" not in r]
            if old:
                results[layout].append(old[0] | {"reused_from": str(args.reuse)})
                print(f"N = {n}, {layout}: reused from {args.reuse}", flush=True)
                continue
            print(f"N = {n}, {layout} ({shards} shard(s)) ...", flush=True)
            with tempfile.TemporaryDirectory(prefix="sns-", dir="/tmp") as tmp:
                try:
                    row = run_swarm(n, shards, args, Path(tmp))
                except (RuntimeError, subprocess.TimeoutExpired) as exc:  # recorded, not hidden
                    row = {"nodes": n, "shards": shards, "error": str(exc).replace(tmp, "<tmp>"),
                           "loadavg": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip
            results[layout].append(row)
            print("  " + json.dumps(row), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"bench": "scale", "partial": True, "results": results}, indent=2))
    ratios: dict[str, dict[str, float | None]] = {}
    lo, hi = min(sizes), max(sizes)
    for layout, rows in results.items():
        by_n = {r["nodes"]: r for r in rows if "error" not in r}
        if lo not in by_n or hi not in by_n:
            ratios[layout] = {}
            continue
        ratios[layout] = {
            key: round(by_n[hi][key] / by_n[lo][key], 2) if by_n[lo][key] else None
            for key in ("cpu_ms_per_node_per_round", "bytes_read_per_node_per_round",
                        "groups_accepted_per_node_per_round")
        }  # fmt: skip
    loads = [
        x
        for rows in results.values()
        for r in rows
        for x in r.get("loadavg_during", r.get("loadavg", []))[:1]
    ]
    report = {
        "bench": "scale",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "high_load": max(loads, default=0.0) > (os.cpu_count() or 1),
        "results": results,
        f"ratios_n{hi}_over_n{lo}": ratios,
        "bar": {
            layout: {
                "cpu_and_bytes_ratio_le_1_5": bool(ratios[layout])
                and all(
                    v is not None and v <= 1.5
                    for k, v in ratios[layout].items()
                    if k != "groups_accepted_per_node_per_round"
                ),
                "delivery_routed_100": all(r.get("delivery_ratio_routed") == 1.0 for r in results[layout]),
            }
            for layout in layouts
        },
        # A run below 100 % delivery is saturated (the 2 cores could not keep up): its CPU and bytes
        # per round count only the work that got done, so its ratios understate the demand.
        "saturated_runs": {
            layout: [r["nodes"] for r in results[layout] if (r.get("delivery_ratio_routed") or 0.0) < 0.99]
            for layout in layouts
        },
    }
    for verdict in report["bar"].values():
        verdict["bar_met"] = verdict["cpu_and_bytes_ratio_le_1_5"] and verdict["delivery_routed_100"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report["plot"] = plot(results, args.out.with_suffix(".png"))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"ratios": ratios, "bar": report["bar"], "plot": report["plot"]}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
