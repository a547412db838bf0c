"""`swarmnode simulate`: run an experiment's nodes as real processes on loopback, then report.

Each (configuration, seed) is one run: N `swarmnode run` processes with their own keys, ports,
data directories and a real libp2p network (the first two nodes are the bootstraps). A run that
finished writes `done.json` and is skipped next time, so a long grid can be run in parts (even
on different days) and aggregated at the end; an interrupted run resumes from its checkpoints.
Ctrl-C stops every node cleanly (each saves a checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from swarmnode.identity import Identity
from swarmnode.sim.experiment import Configuration, Experiment, load_experiment, with_overrides
from swarmnode.sim.report import build_report, read_metrics

STOP_GRACE_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class NodeProcess:
    index: int
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log: object

    def last_metrics(self) -> dict | None:
        rows = read_metrics(self.data_dir / "metrics.jsonl", tail=1)
        return rows[-1] if rows else None


def run_dir(out: Path, configuration: Configuration, seed: int) -> Path:
    return out / "runs" / configuration.slug / f"seed-{seed}"


def prepare_nodes(experiment: Experiment, configuration: Configuration, seed: int, directory: Path) -> list[Path]:
    """Write each node's key and config file; returns the config paths."""
    n = experiment.nodes
    keys = []
    ports = [free_port() for _ in range(n)]
    for index in range(n):
        node_dir = directory / f"node-{index}"
        node_dir.mkdir(parents=True, exist_ok=True)
        keys.append(Identity.load_or_create(node_dir / "identity.key"))
    bootstraps = [f"/ip4/127.0.0.1/tcp/{ports[i]}/p2p/{keys[i].peer_id}" for i in range(min(2, n))]
    paths = []
    for index in range(n):
        node_dir = directory / f"node-{index}"
        cfg = experiment.node_config(configuration, seed, index, node_dir)
        p2p = cfg.p2p.model_copy(
            update={
                "listen": [f"/ip4/127.0.0.1/tcp/{ports[index]}"],
                "bootstrap": [b for i, b in enumerate(bootstraps) if i != index],
                "min_peers_at_start": max(cfg.p2p.min_peers_at_start, min(n - 1, 2)) if cfg.p2p.enabled else 0,
            }
        )
        admin = cfg.admin.model_copy(update={"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"})
        cfg = cfg.model_copy(update={"p2p": p2p, "admin": admin})
        path = node_dir / "node.toml"
        path.write_text(cfg.to_toml())
        paths.append(path)
    return paths


def launch(config_paths: list[Path]) -> list[NodeProcess]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = []
    for index, path in enumerate(config_paths):
        log = (path.parent / "node.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "swarmnode", "run", "--config", str(path), "--skip-preflight"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,  # Ctrl-C in the terminal reaches the launcher only; it stops nodes itself
        )
        procs.append(NodeProcess(index, path.parent, proc, log))
    return procs


def stop_all(procs: list[NodeProcess], grace_s: float = STOP_GRACE_S) -> None:
    for p in procs:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait(timeout=10)


def progress_table(title: str, procs: list[NodeProcess], rounds: int) -> Table:
    table = Table(title=title, expand=False)
    for column in ("node", "round", "reward", "ext used", "pool", "received", "state"):
        table.add_column(column, justify="right")
    for p in procs:
        m = p.last_metrics() or {}
        code = p.proc.poll()
        state = "running" if code is None else ("done" if code == 0 else f"exit {code}")
        table.add_row(
            str(p.index),
            f"{m.get('round', -1) + 1}/{rounds}",
            f"{m['reward_mean']:.3f}" if "reward_mean" in m else "-",
            str(m.get("used_external", "-")),
            str(m.get("pool_size", "-")),
            str(m.get("received", "-")),
            state,
        )
    return table


def run_one(
    experiment: Experiment, configuration: Configuration, seed: int, out: Path, console: Console, timeout_s: float
) -> bool:
    """Run one (configuration, seed); True when every node finished. Skips runs already done."""
    directory = run_dir(out, configuration, seed)
    if (directory / "done.json").exists():
        console.print(f"[dim]{configuration.name} seed {seed}: already done, skipping ({directory})[/]")
        return True
    directory.mkdir(parents=True, exist_ok=True)
    procs = launch(prepare_nodes(experiment, configuration, seed, directory))
    title = f"{experiment.name}: {configuration.name}, seed {seed}"
    started = time.monotonic()
    interrupted = False
    try:
        with Live(progress_table(title, procs, experiment.rounds), console=console, refresh_per_second=1) as live:
            while any(p.proc.poll() is None for p in procs):
                if time.monotonic() - started > timeout_s:
                    console.print(f"[red]{title}: timed out after {timeout_s:.0f} s; stopping the nodes[/]")
                    break
                time.sleep(1.0)
                live.update(progress_table(title, procs, experiment.rounds))
    except KeyboardInterrupt:
        interrupted = True
        console.print("[yellow]stopping all nodes (each saves a checkpoint; run again to resume)...[/]")
    finally:
        stop_all(procs)
        for p in procs:
            p.log.close()
    codes = [p.proc.returncode for p in procs]
    finished = all(
        (m := p.last_metrics()) is not None and m["round"] + 1 >= experiment.rounds for p in procs
    )
    if interrupted:
        raise KeyboardInterrupt
    if not finished:
        console.print(f"[red]{title}: not every node finished (exit codes {codes}); logs in {directory}/node-*/node.log[/]")
        return False
    (directory / "done.json").write_text(
        json.dumps({"configuration": configuration.name, "seed": seed, "exit_codes": codes,
                    "wall_s": time.monotonic() - started, "finished_at": time.time()}, indent=1)
    )
    return True


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", nargs="?", default="builtin:demo",
                        help="experiment TOML file or builtin:NAME (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="report directory (default: runs/<experiment name>)")
    parser.add_argument("--nodes", type=int, help="override the experiment's node count")
    parser.add_argument("--rounds", type=int, help="override the experiment's rounds")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the experiment's seeds")
    parser.add_argument("--only", action="append", metavar="CONFIG", help="run only these configurations")
    parser.add_argument("--report-only", action="store_true", help="aggregate the runs already in --out")
    parser.add_argument("--run-timeout", type=float, default=3600.0, help="seconds before a run is stopped")


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def simulate_command(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    # Ctrl-C and SIGTERM both stop every node cleanly (a shell may start us with SIGINT ignored).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    experiment = with_overrides(load_experiment(args.experiment), nodes=args.nodes, rounds=args.rounds,
                                seeds=args.seeds)
    out = args.out or Path("runs") / experiment.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(json.dumps(
        {"source": experiment.source, "name": experiment.name, "nodes": experiment.nodes,
         "rounds": experiment.rounds, "seeds": list(experiment.seeds), "base": experiment.base,
         "configurations": [{"name": c.name, "set": c.overrides} for c in experiment.configurations],
         "node": {str(k): v for k, v in experiment.node_overrides.items()}}, indent=1))
    selected = [c for c in experiment.configurations if not args.only or c.name in args.only]
    if args.only and not selected:
        console.print(f"--only {args.only}: no such configuration in {[c.name for c in experiment.configurations]}")
        return 2
    ok = True
    if not args.report_only:
        total = len(selected) * len(experiment.seeds)
        console.print(f"[bold]{experiment.name}[/]: {experiment.nodes} nodes x {experiment.rounds} rounds, "
                      f"{len(selected)} configuration(s) x {len(experiment.seeds)} seed(s) = {total} run(s) -> {out}")
        try:
            for configuration in selected:
                for seed in experiment.seeds:
                    ok &= run_one(experiment, configuration, seed, out, console, args.run_timeout)
        except KeyboardInterrupt:
            console.print(f"interrupted; finished runs are kept in {out} (run the same command to continue)")
            return 130
    report = build_report(out, experiment)
    console.print(f"[bold green]report:[/] {report}")
    return 0 if ok else 1
