"""Mesh health: how long each node's rollout mesh stays below ``degree_low`` in an idle swarm.

N ``swarmnode.p2p.gossip_node`` processes (real hosts, loopback) join through three bootstraps and
never publish; each writes a ``peers`` event whenever its connected or mesh set changes. After a
settling time, the bench takes every node's longest stretch with a rollout mesh below
``degree_low`` within the observation window (a stretch that lasts the whole window is the
window's length). A node with too small a mesh still receives batches by IHAVE/IWANT gossip, later
and with an extra round trip; one with no mesh at all forwards nothing.

Found while hunting the gossip bench's rare "mesh did not form" failures: py-libp2p 0.8.1 prunes
an oversubscribed mesh by lowest score (a peer that just grafted has the lowest), replaces a mesh
peer by any non-mesh peer scoring 0.1 higher, and each prune forbids a graft between the two for
``prune_back_off`` (60 s). A node pruned by every peer it has then sits without a full mesh for a
minute or more (docs/RESULTS.md, "Mesh health").

    .venv/bin/python scripts/bench_mesh.py --nodes 10 --runs 3
    .venv/bin/python scripts/bench_mesh.py --set degree=3 --set degree_low=3 --set degree_high=3
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_gossip import free_port, read_jsonl  # noqa: E402

from swarmnode.config import P2PConfig, parse_override  # noqa: E402
from swarmnode.identity import Identity  # noqa: E402

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0


def longest_below(timeline: list[tuple[float, int]], low: int, start: float, end: float) -> float:
    """Longest stretch of [start, end] during which the mesh size (set at each ``(t, size)``) is below ``low``.

    Before the first entry the size is unknown and not counted.
    """
    longest, below_since = 0.0, None
    for t, size in [*sorted(timeline), (end, None)]:
        t = min(max(t, start), end)
        if below_since is not None and (size is None or size >= low):
            longest = max(longest, t - below_since)
            below_since = None
        if size is not None and size < low and below_since is None:
            below_since = t
    return longest


def run_swarm(n: int, settle: float, window: float, sets: list[str], workdir: Path) -> dict[str, Any]:
    keys = [workdir / f"k{i}" for i in range(n)]
    ids = [Identity.load_or_create(k).peer_id for k in keys]
    ports = [free_port() for _ in range(n)]
    addrs = [f"/ip4/127.0.0.1/tcp/{ports[i]}/p2p/{ids[i]}" for i in range(n)]
    procs: list[subprocess.Popen[bytes]] = []
    for i in range(n):
        cmd = [sys.executable, "-m", "swarmnode.p2p.gossip_node", "--key", str(keys[i]),
               "--run-dir", str(workdir / f"r{i}"), "--listen", f"/ip4/127.0.0.1/tcp/{ports[i]}",
               "--start-when", str(workdir / "never"), "--start-wait", str(READY_TIMEOUT_S + settle + window + 60),
               "--out", str(workdir / f"o{i}.jsonl")]  # fmt: skip
        for bootstrap in [addrs[j] for j in (0, 1, 2) if j != i][:2]:
            cmd += ["--bootstrap", bootstrap]
        for item in sets:
            cmd += ["--set", item]
        with open(workdir / f"n{i}.log", "ab") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        ready: list[float] = []
        while time.monotonic() < deadline:
            ready = [
                e["t"] for i in range(n) for e in read_jsonl(workdir / f"o{i}.jsonl") if e["event"] == "ready"
            ]
            if len(ready) == n:
                break
            time.sleep(0.5)
        if len(ready) < n:
            raise RuntimeError(
                f"only {len(ready)} of {n} hosts started within {READY_TIMEOUT_S:.0f} s; see {workdir}"
            )
        start = max(ready) + settle
        time.sleep(max(0.0, start + window - time.time()))
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
    low = P2PConfig(**dict(parse_override(item) for item in sets)).degree_low
    below, final = [], []
    for i in range(n):
        peers = [e for e in read_jsonl(workdir / f"o{i}.jsonl") if e["event"] == "peers"]
        timeline = [(e["t"], e["mesh_peers"].get("ROLLOUT_BATCH", 0)) for e in peers]
        below.append(round(longest_below(timeline, low, start, start + window), 1))
        final.append(timeline[-1][1] if timeline else 0)
    return {
        "longest_below_low_s": below,
        "nodes_below_low_half_the_window": sum(1 for b in below if b >= window / 2),
        "final_mesh_sizes": final,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds after the last host started")
    parser.add_argument("--window", type=float, default=60.0, help="seconds observed after settling")
    parser.add_argument(
        "--set", action="append", default=[], help="P2PConfig override KEY=VALUE (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "mesh_health.json")
    args = parser.parse_args()
    runs = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="snm-", dir="/tmp") as tmp:
            result = run_swarm(args.nodes, args.settle, args.window, args.set, Path(tmp))
        print(f"run {run + 1}: {json.dumps(result)}", flush=True)
        runs.append(result)
    stuck = [r["nodes_below_low_half_the_window"] for r in runs]
    report = {
        "command": " ".join(["scripts/bench_mesh.py", *sys.argv[1:]]),
        "nodes": args.nodes,
        "settle_s": args.settle,
        "window_s": args.window,
        "overrides": args.set,
        "runs": runs,
        "runs_with_a_node_below_low_half_the_window": sum(1 for s in stuck if s),
        "node_runs_below_low_half_the_window": f"{sum(stuck)} of {args.nodes * args.runs}",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
