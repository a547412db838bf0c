"""`swarmnode simulate`: run an experiment's nodes as real processes on loopback, then report.

Each (configuration, seed) is one run: N `swarmnode run` processes with their own keys, ports,
data directories and a real libp2p network (the first two nodes are the bootstraps). A run that
finished writes `done.json` and is skipped next time, so a long grid can be run in parts (even
on different days) and aggregated at the end; an interrupted run resumes from its checkpoints.
Ctrl-C stops every node cleanly (each saves a checkpoint).

Nodes are placed on the machine's GPUs by `swarmnode.sim.placement` (each process sees only its
own GPU and a share of its memory) and each node's `placement.json` records where it ran. With
`--ray ADDRESS` the same runs go to a Ray cluster instead (`swarmnode.sim.ray_launcher`); the loop,
the progress table and the report are the same.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.live import Live
from rich.table import Table

from swarmnode.config import ConfigError, parse_override
from swarmnode.identity import Identity
from swarmnode.sim.adversary import AdversaryProcess, adversary_summary, start_adversaries, stop_adversaries
from swarmnode.sim.chaos import ChaosMonkey
from swarmnode.sim.chaos import node_environment as chaos_node_environment
from swarmnode.sim.experiment import Configuration, Experiment, load_experiment, with_overrides
from swarmnode.sim.placement import (
    Gpu,
    NodePlacement,
    PlacementError,
    describe_plan,
    detect_gpus,
    placement_record,
    plan_placement,
    write_placement_record,
)
from swarmnode.sim.processes import terminate_all
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

    where: str = "local"

    def last_metrics(self) -> dict | None:
        rows = read_metrics(self.data_dir / "metrics.jsonl", tail=1)
        return rows[-1] if rows else None

    def exit_code(self) -> int | None:
        return self.proc.poll()


class NodeHandle(Protocol):
    """A running node as the progress loop sees it, wherever it runs."""

    index: int
    where: str

    def last_metrics(self) -> dict | None: ...

    def exit_code(self) -> int | None: ...


class Launcher(Protocol):
    """Starts one run's nodes and stops them; `LocalLauncher` here, `RayLauncher` on a cluster."""

    def gpus(self) -> list[Gpu]: ...

    def start(
        self,
        experiment: Experiment,
        configuration: Configuration,
        seed: int,
        directory: Path,
        placements: list[NodePlacement],
    ) -> list[Any]: ...

    def refresh(self, nodes: list[Any]) -> None: ...

    def stop(self, nodes: list[Any]) -> None: ...


def run_dir(out: Path, configuration: Configuration, seed: int) -> Path:
    return out / "runs" / configuration.slug / f"seed-{seed}"


def prepare_nodes(
    experiment: Experiment,
    configuration: Configuration,
    seed: int,
    directory: Path,
    placements: list[NodePlacement] | None = None,
) -> list[Path]:
    """Write each node's key and config file (and placement.json when placed); returns the config paths."""
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
                "min_peers_at_start": max(cfg.p2p.min_peers_at_start, min(n - 1, 2))
                if cfg.p2p.enabled
                else 0,
            }
        )
        admin = cfg.admin.model_copy(update={"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"})
        update: dict[str, Any] = {"p2p": p2p, "admin": admin}
        if placements is not None:
            update.update(placements[index].config_overrides())
            write_placement_record(
                node_dir, placement_record(placements[index], socket.gethostname(), "local")
            )
        cfg = cfg.model_copy(update=update)
        path = node_dir / "node.toml"
        # The node needs its secrets (an admin token) from this file: readable by the owner only.
        path.unlink(missing_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
            fh.write(cfg.to_toml())
        paths.append(path)
    return paths


def node_environment(threads: int = 1) -> dict[str, str]:
    """Environment of a node process: one BLAS thread pool per process, unbuffered logs."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
    }


def launch(
    config_paths: list[Path],
    placements: list[NodePlacement] | None = None,
    extra_env: dict[str, str] | None = None,
) -> list[NodeProcess]:
    procs = []
    for index, path in enumerate(config_paths):
        env = {**node_environment(), **(extra_env or {})}
        where = "local"
        if placements is not None:
            env.update(placements[index].environment())  # the node sees only its own GPU
            where = placements[index].device
        log = (path.parent / "node.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "swarmnode", "run", "--config", str(path), "--skip-preflight"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl-C in the terminal reaches the launcher only; it stops nodes itself
        )
        procs.append(NodeProcess(index, path.parent, proc, log, where))
    return procs


class LocalLauncher:
    """Every node a child process of this one, on this machine (the default)."""

    def __init__(self) -> None:
        self._gpus: list[Gpu] | None = None
        self._adversaries: list[AdversaryProcess] = []  # the current run's misbehaving peers
        self._chaos: ChaosMonkey | None = None
        self._run_dir: Path | None = None

    def gpus(self) -> list[Gpu]:
        if self._gpus is None:
            self._gpus = detect_gpus()
        return self._gpus

    def start(
        self,
        experiment: Experiment,
        configuration: Configuration,
        seed: int,
        directory: Path,
        placements: list[NodePlacement],
    ) -> list[NodeProcess]:
        paths = prepare_nodes(experiment, configuration, seed, directory, placements)
        # Adversaries (sim.adversary) and chaos (sim.chaos) of this configuration, if any.
        chaos = experiment.chaos_for(configuration)
        chaos_env = chaos_node_environment(chaos)
        nodes = launch(paths, placements, chaos_env)
        self._run_dir = directory
        self._adversaries = start_adversaries(
            experiment.adversaries_for(configuration), directory, paths, seed
        )

        def restart(node: NodeProcess) -> None:  # same config and data dir: it resumes from its checkpoint
            only = [placements[node.index]] if placements else None
            fresh = launch([paths[node.index]], only, chaos_env)[0]
            node.log.close()  # type: ignore[attr-defined]
            node.proc, node.log = fresh.proc, fresh.log

        self._chaos = None if chaos is None else ChaosMonkey(chaos, directory, restart)
        return nodes

    def refresh(self, nodes: list[NodeProcess]) -> None:
        if self._chaos is not None:  # metrics are read straight from the nodes' files
            self._chaos.tick(nodes)

    def stop(self, nodes: list[NodeProcess]) -> None:
        stop_adversaries(self._adversaries)
        stop_all(nodes)
        for p in nodes:
            p.log.close()
        if self._chaos is not None:
            self._chaos.settle()  # the restarted nodes' start lines are in their logs by now
            self._chaos.write()
        if self._adversaries and self._run_dir is not None:
            summary = adversary_summary(self._run_dir)
            (self._run_dir / "adversaries.json").write_text(json.dumps(summary, indent=1))
        self._adversaries, self._chaos = [], None


def stop_all(procs: list[NodeProcess], grace_s: float = STOP_GRACE_S) -> None:
    terminate_all([p.proc for p in procs], grace_s)


def progress_table(title: str, procs: list[NodeHandle], rounds: int) -> Table:
    table = Table(title=title, expand=False)
    for column in ("node", "where", "round", "reward", "ext used", "pool", "received", "state"):
        table.add_column(column, justify="right")
    for p in procs:
        m = p.last_metrics() or {}
        code = p.exit_code()
        state = "running" if code is None else ("done" if code == 0 else f"exit {code}")
        table.add_row(
            str(p.index),
            p.where,
            f"{m.get('round', -1) + 1}/{rounds}",
            f"{m['reward_mean']:.3f}" if "reward_mean" in m else "-",
            str(m.get("used_external", "-")),
            str(m.get("pool_size", "-")),
            str(m.get("received", "-")),
            state,
        )
    return table


def plan_for(experiment: Experiment, configuration: Configuration, gpus: list[Gpu]) -> list[NodePlacement]:
    """Where each node of this configuration runs (nodes configured for CUDA are never put on CPU)."""
    devices = {
        i: experiment.node_config(configuration, experiment.seeds[0], i, Path("/nonexistent")).device
        for i in range(experiment.nodes)
    }
    return plan_placement(experiment.placement, experiment.nodes, gpus, devices)


def run_one(
    experiment: Experiment,
    configuration: Configuration,
    seed: int,
    out: Path,
    console: Console,
    timeout_s: float,
    launcher: Launcher | None = None,
) -> bool:
    """Run one (configuration, seed); True when every node finished. Skips runs already done."""
    launcher = launcher or LocalLauncher()
    directory = run_dir(out, configuration, seed)
    if (directory / "done.json").exists():
        console.print(f"[dim]{configuration.name} seed {seed}: already done, skipping ({directory})[/]")
        return True
    directory.mkdir(parents=True, exist_ok=True)
    placements = plan_for(experiment, configuration, launcher.gpus())
    if any(p.gpu is not None for p in placements):
        console.print(describe_plan(placements))
    title = f"{experiment.name}: {configuration.name}, seed {seed}"
    started = time.monotonic()
    interrupted = False
    procs: list[Any] = []
    try:
        procs = launcher.start(experiment, configuration, seed, directory, placements)
        with Live(
            progress_table(title, procs, experiment.rounds), console=console, refresh_per_second=1
        ) as live:
            while any(p.exit_code() is None for p in procs):
                if time.monotonic() - started > timeout_s:
                    console.print(f"[red]{title}: timed out after {timeout_s:.0f} s; stopping the nodes[/]")
                    break
                time.sleep(1.0)
                launcher.refresh(procs)
                live.update(progress_table(title, procs, experiment.rounds))
    except KeyboardInterrupt:
        interrupted = True
        console.print("[yellow]stopping all nodes (each saves a checkpoint; run again to resume)...[/]")
    finally:
        launcher.stop(procs)  # on Ray this also brings each node's files back into `directory`
    codes = [p.exit_code() for p in procs]
    finished = bool(procs) and all(
        (m := p.last_metrics()) is not None and m["round"] + 1 >= experiment.rounds for p in procs
    )
    if interrupted:
        raise KeyboardInterrupt
    if not finished:
        console.print(
            f"[red]{title}: not every node finished (exit codes {codes}); logs in {directory}/node-*/node.log[/]"
        )
        return False
    (directory / "done.json").write_text(
        json.dumps(
            {
                "configuration": configuration.name,
                "seed": seed,
                "exit_codes": codes,
                "wall_s": time.monotonic() - started,
                "finished_at": time.time(),
            },
            indent=1,
        )
    )
    return True


def model_weights_problem(model_path: str) -> str | None:
    """Why the weights of `model_path` are not on this machine, or None when they are.

    A simulation starts many processes at once: they must find the weights locally (a directory or
    the Hugging Face cache) rather than each download them.
    """
    from swarmnode.policy.hardware import _hub_cache_dir
    from swarmnode.policy.loading import EMBEDDED_PREFIX

    if model_path.startswith(EMBEDDED_PREFIX):
        return None
    local = Path(model_path).expanduser()
    if local.is_dir():
        return None if (local / "config.json").is_file() else f"model weights: {local} has no config.json"
    if model_path.startswith(("/", ".", "~")):
        return f"model weights: directory {model_path} does not exist; pass a model directory with --set model.path=DIR"
    if _hub_cache_dir(model_path) is not None:
        return None
    return (
        f"model weights: {model_path} is not in the local Hugging Face cache and simulate does not download; "
        f"fetch it once with `hf download {model_path}` (where the hub is reachable; HF_HOME picks the cache) "
        "or pass a local copy with --set model.path=DIR"
    )


def preflight_experiment(
    experiment: Experiment, configurations: list[Configuration], gpus: list[Gpu], on_ray: bool = False
) -> None:
    """Fail fast, before any process starts, with ONE message listing everything this machine lacks."""
    import importlib.util

    problems: list[str] = []
    for configuration in configurations:
        try:
            plan_for(experiment, configuration, gpus)
        except PlacementError as exc:
            where = "the Ray cluster" if on_ray else "this machine"
            problems.append(f"{exc} on {where}")
            break
    configs = [
        experiment.node_config(c, experiment.seeds[0], i, Path("/nonexistent"))
        for c in configurations
        for i in range(experiment.nodes)
    ]
    if on_ray and any(experiment.adversaries_for(c) or experiment.chaos_for(c) for c in configurations):
        problems.append("adversaries and chaos run with the local launcher only; run without --ray")
    if not on_ray:  # on Ray, each worker machine needs the weights and vLLM, not this one
        for path in sorted({cfg.model.path for cfg in configs}):
            if (problem := model_weights_problem(path)) is not None:
                problems.append(problem)
        if any(cfg.model.backend == "vllm" for cfg in configs) and importlib.util.find_spec("vllm") is None:
            problems.append(
                "vLLM: not installed (model.backend = 'vllm'); install swarmnode[vllm] in a CUDA environment "
                "or use the image from docker/Dockerfile.cuda, or --set model.backend=transformers"
            )
    if problems:
        raise ConfigError(
            f"{experiment.source or experiment.name} cannot run here, nothing was started:\n  - "
            + "\n  - ".join(problems)
            + "\n  Run it where these are met (or on a Ray cluster: --ray ADDRESS); on a CPU machine, "
            "try builtin:paper-cpu (the same grid with the embedded tiny model)."
        )


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "experiment",
        nargs="?",
        default="builtin:demo",
        help="experiment TOML file or builtin:NAME (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, help="report directory (default: runs/<experiment name>)")
    parser.add_argument("--nodes", type=int, help="override the experiment's node count")
    parser.add_argument("--rounds", type=int, help="override the experiment's rounds")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the experiment's seeds")
    parser.add_argument("--only", action="append", metavar="CONFIG", help="run only these configurations")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="node config key for every node, added to the experiment's [base] "
        "(e.g. --set model.path=/models/qwen); repeatable",
    )
    parser.add_argument("--report-only", action="store_true", help="aggregate the runs already in --out")
    parser.add_argument("--run-timeout", type=float, default=3600.0, help="seconds before a run is stopped")
    parser.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run the nodes on this Ray cluster (e.g. 10.0.0.1:6379 or "
        "'auto'; needs swarmnode[ray] on every Ray node) instead of local processes",
    )
    parser.add_argument(
        "--ray-work-dir",
        metavar="DIR",
        help="node data directories on the Ray workers (default: the system temp dir, under swarmnode-ray/)",
    )


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def simulate_command(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    # Ctrl-C and SIGTERM both stop every node cleanly (a shell may start us with SIGINT ignored).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    experiment = load_experiment(args.experiment)
    overrides = dict(parse_override(item) for item in getattr(args, "overrides", []) or [])
    experiment = with_overrides(
        experiment,
        nodes=args.nodes,
        rounds=args.rounds,
        seeds=args.seeds,
        base={**experiment.base, **overrides} if overrides else None,
    )
    out = args.out or Path("runs") / experiment.name
    selected = [c for c in experiment.configurations if not args.only or c.name in args.only]
    if args.only and not selected:
        console.print(
            f"--only {args.only}: no such configuration in {[c.name for c in experiment.configurations]}"
        )
        return 2
    ray_address = getattr(args, "ray", None) or experiment.placement.ray_address
    launcher: Launcher | None = None
    if not args.report_only:
        if ray_address:
            from swarmnode.sim.ray_launcher import RayLauncher

            launcher = RayLauncher(ray_address, out, getattr(args, "ray_work_dir", None), console)
        else:
            launcher = LocalLauncher()
        try:
            preflight_experiment(experiment, selected, launcher.gpus(), on_ray=bool(ray_address))
        except BaseException:
            _close(launcher)
            raise
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(
        json.dumps(
            {
                "source": experiment.source,
                "name": experiment.name,
                "nodes": experiment.nodes,
                "rounds": experiment.rounds,
                "seeds": list(experiment.seeds),
                "base": experiment.base,
                "configurations": [
                    {
                        "name": c.name,
                        "set": c.overrides,
                        "adversaries": [asdict(a) for a in experiment.adversaries_for(c)],
                        "chaos": asdict(chaos) if (chaos := experiment.chaos_for(c)) else None,
                    }
                    for c in experiment.configurations
                ],
                "node": {str(k): v for k, v in experiment.node_overrides.items()},
                "launcher": f"ray {ray_address}" if ray_address else "local",
            },
            indent=1,
        )
    )
    ok = True
    if launcher is not None:
        total = len(selected) * len(experiment.seeds)
        console.print(
            f"[bold]{experiment.name}[/]: {experiment.nodes} nodes x {experiment.rounds} rounds, "
            f"{len(selected)} configuration(s) x {len(experiment.seeds)} seed(s) = {total} run(s) -> {out}"
            + (f" on Ray {ray_address}" if ray_address else "")
        )
        try:
            for configuration in selected:
                for seed in experiment.seeds:
                    ok &= run_one(experiment, configuration, seed, out, console, args.run_timeout, launcher)
        except KeyboardInterrupt:
            console.print(f"interrupted; finished runs are kept in {out} (run the same command to continue)")
            return 130
        finally:
            _close(launcher)
    report = build_report(out, experiment)
    console.print(f"[bold green]report:[/] {report}")
    return 0 if ok else 1


def _close(launcher: Launcher | None) -> None:
    close = getattr(launcher, "close", None)
    if callable(close):
        close()
