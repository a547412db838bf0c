"""`swarmnode simulate --ray ADDRESS`: the same runs, with each node placed on a Ray cluster.

Ray (the optional extra ``swarmnode[ray]``) is the engine RL researchers already run their
clusters with (verl, OpenRLHF and prime-rl are built on it); this module only asks it for resources
and never re-implements scheduling. Each node is one Ray actor that reserves what the node needs
(``threads`` CPUs, a GPU or a 1/k share of one, and the node's custom ``resources``); the actor
starts the ordinary ``swarmnode run`` process on its machine, so training, p2p and checkpoints are
exactly those of a local node. Nodes find each other over libp2p at the cluster's real addresses:
node 0 is placed first, listens on its machine's Ray node IP and reports its multiaddr, which node 1
gets as its bootstrap; every other node bootstraps from both, as in local runs. When the run ends
each actor sends its node's files (metrics.jsonl, resolved config, log tail) back through Ray into
the local run directory, so the report is built exactly as for a local run, and placement.json
says on which host and GPU it ran.

Every Ray node needs the same swarmnode installed (the actor checks the version). A node's data
directory stays on its worker (``--ray-work-dir``), keyed by the report directory, so rerunning
the same command resumes from checkpoints when Ray places the node on the same machine again
(pin nodes with ``resources`` to make sure).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from swarmnode import __version__
from swarmnode.config import ConfigError
from swarmnode.sim.experiment import Configuration, Experiment
from swarmnode.sim.placement import (
    Gpu,
    NodePlacement,
    PlacementError,
    placement_record,
    write_placement_record,
)

INSTALL_HINT = "Ray is not installed: pip install 'swarmnode[ray]' (on this machine and every Ray node)"
PLACE_TIMEOUT_S = 180.0  # for Ray to schedule an actor and for the actor to prepare its node
CALL_TIMEOUT_S = 60.0
STOP_GRACE_S = 60.0
# Files brought back from each worker, with the most bytes kept of each (the log keeps its tail).
COLLECTED_FILES = {
    "metrics.jsonl": 64 * 2**20,
    "config.resolved.toml": 2**20,
    "node.log": 4 * 2**20,
    "done.json": 2**20,
    "p2p/p2p-host.log": 4 * 2**20,
}


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(INSTALL_HINT) from exc
    return ray


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _read_bounded(path: Path, limit: int) -> bytes | None:
    """The file, or its last `limit` bytes when larger (a metrics file keeps its newest rows)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            if size > limit:
                fh.seek(size - limit)
                fh.readline()  # drop the partial first line
            return fh.read(limit)
    except OSError:
        return None


def _die_with_parent() -> None:
    """In the node's child process (Linux): get SIGTERM when the actor dies, so no node is orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _read_head(path: Path, limit: int) -> bytes:
    try:
        with path.open("rb") as fh:
            return fh.read(limit)
    except OSError:
        return b""


class RayNodeWorker:
    """Lives in a Ray actor on a worker machine; runs one node as a child process there."""

    def __init__(self, index: int, node_dir: str) -> None:
        self.index = index
        self.node_dir = Path(node_dir)
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path = self.node_dir / "node.toml"

    def prepare(
        self, config: dict[str, Any], bootstrap: list[str], min_peers: int, driver_version: str
    ) -> dict:
        """Write the node's key and config on this machine; return where it runs and its multiaddr."""
        import ray

        from swarmnode.config import config_from_dict
        from swarmnode.identity import Identity

        if driver_version != __version__:
            raise RuntimeError(
                f"swarmnode {__version__} on Ray node {socket.gethostname()}, {driver_version} on the driver: "
                "install the same version on every Ray node"
            )
        ip = ray.util.get_node_ip_address()
        port = _free_port(ip)
        self.node_dir.mkdir(parents=True, exist_ok=True)
        identity = Identity.load_or_create(self.node_dir / "identity.key")
        cfg = config_from_dict({**config, "data_dir": str(self.node_dir)})
        p2p = cfg.p2p.model_copy(
            update={
                "listen": [f"/ip4/{ip}/tcp/{port}"],
                "bootstrap": list(bootstrap),
                "min_peers_at_start": max(cfg.p2p.min_peers_at_start, min_peers) if cfg.p2p.enabled else 0,
            }
        )
        admin = cfg.admin.model_copy(update={"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"})
        cfg = cfg.model_copy(update={"p2p": p2p, "admin": admin})
        self.config_path.write_text(cfg.to_toml())
        return {
            "host": socket.gethostname(),
            "ip": ip,
            "multiaddr": f"/ip4/{ip}/tcp/{port}/p2p/{identity.peer_id}",
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "ray_node_id": ray.get_runtime_context().get_node_id(),
            "node_dir": str(self.node_dir),
        }

    def start(self, threads: int) -> int:
        import ray

        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "PYTHONUNBUFFERED": "1",
            # Only the GPU(s) Ray reserved for this actor; none when it reserved none.
            "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in ray.get_gpu_ids()),
        }
        with (self.node_dir / "node.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "swarmnode",
                    "run",
                    "--config",
                    str(self.config_path),
                    "--skip-preflight",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        return self.proc.pid

    def wait_listening(self, timeout_s: float) -> bool:
        """Block until the node's p2p host listens (its log says so); False if it exited or timed out."""
        log = self.node_dir / "p2p" / "p2p-host.log"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            head = _read_head(log, 64 * 1024)
            if b"listening on" in head:
                return True
            if self.proc is None or self.proc.poll() is not None:
                return False
            time.sleep(0.5)
        return False

    def log_tail(self, limit: int = 3000) -> str:
        return (_read_bounded(self.node_dir / "node.log", limit) or b"").decode(errors="replace")

    def status(self) -> dict:
        from swarmnode.sim.report import read_metrics

        rows = read_metrics(self.node_dir / "metrics.jsonl", tail=1)
        return {
            "exit_code": None if self.proc is None else self.proc.poll(),
            "last": rows[-1] if rows else None,
        }

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM (the node saves a checkpoint), then SIGKILL after `grace_s`; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def collect(self) -> dict[str, bytes]:
        """The node's result files, each bounded (see COLLECTED_FILES)."""
        files = {}
        for name, limit in COLLECTED_FILES.items():
            data = _read_bounded(self.node_dir / name, limit)
            if data is not None:
                files[name] = data
        return files


@dataclass
class RayNode:
    """The driver's view of one node running in a Ray actor."""

    index: int
    actor: Any
    local_dir: Path
    placement: NodePlacement
    threads: int
    config: dict[str, Any]  # the node's config (data dir, addresses and bootstrap are set on its worker)
    info: dict[str, Any] = field(default_factory=dict)
    where: str = "ray"
    _exit_code: int | None = None
    _last: dict | None = None
    _collected: bool = False

    def last_metrics(self) -> dict | None:
        if self._collected:
            from swarmnode.sim.report import read_metrics

            rows = read_metrics(self.local_dir / "metrics.jsonl", tail=1)
            return rows[-1] if rows else None
        return self._last

    def exit_code(self) -> int | None:
        return self._exit_code


class RayLauncher:
    """Places each node of a run as a Ray actor on the cluster at `address`."""

    def __init__(self, address: str, out: Path, work_dir: str | None, console: Console) -> None:
        self.ray = import_ray()
        self.console = console
        # Node data on the workers: one folder per report directory, so a rerun resumes.
        key = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:12]
        self.work_root = Path(work_dir or Path(tempfile.gettempdir()) / "swarmnode-ray") / key
        if not self.ray.is_initialized():
            self.ray.init(
                address=address, logging_level="WARNING", log_to_driver=False, configure_logging=False
            )
        self.address = address
        self._remote_worker = self.ray.remote(RayNodeWorker)

    def gpus(self) -> list[Gpu]:
        """One entry per GPU of the cluster: Ray decides which physical GPU each node gets."""
        total = int(self.ray.cluster_resources().get("GPU", 0))
        return [Gpu(i, "ray", "Ray GPU") for i in range(total)]

    def close(self) -> None:
        if self.ray.is_initialized():
            self.ray.shutdown()

    def _get(self, refs: Any, timeout: float, what: str) -> Any:
        try:
            return self.ray.get(refs, timeout=timeout)
        except self.ray.exceptions.RayTaskError as exc:  # the actor raised: say why, without Ray's traceback
            raise ConfigError(f"Ray: {what} failed: {exc.cause if exc.cause is not None else exc}") from None
        except self.ray.exceptions.GetTimeoutError:
            raise PlacementError(
                f"Ray: {what} did not happen within {timeout:.0f} s; the cluster offers "
                f"{self.ray.cluster_resources()} (each node needs its threads as CPUs, its GPU share and its "
                "[[node]] resources)"
            ) from None

    def start(
        self,
        experiment: Experiment,
        configuration: Configuration,
        seed: int,
        directory: Path,
        placements: list[NodePlacement],
    ) -> list[RayNode]:
        for feature in ("adversaries_for", "chaos_for"):  # these start local processes next to the nodes
            if getattr(experiment, feature, lambda _c: None)(configuration):
                raise ConfigError(
                    f"configuration {configuration.name!r} has adversaries or chaos, which run with the local "
                    "launcher only: run it without --ray"
                )
        nodes: list[RayNode] = []
        try:
            for p in placements:
                if p.gpu is not None and p.gpu.visible_id != "ray":
                    raise PlacementError(
                        f"node {p.index}: device = 'cuda:N' pins a local GPU; on Ray use nodes_per_gpu"
                    )
                cfg = experiment.node_config(configuration, seed, p.index, Path("/nonexistent"))
                cfg = cfg.model_copy(update=p.config_overrides())
                remote_dir = self.work_root / configuration.slug / f"seed-{seed}" / f"node-{p.index}"
                actor = self._remote_worker.options(
                    num_cpus=cfg.threads,
                    num_gpus=p.ray_num_gpus,
                    resources=dict(p.resources),
                    max_restarts=0,
                ).remote(p.index, str(remote_dir))
                local_dir = directory / f"node-{p.index}"
                local_dir.mkdir(parents=True, exist_ok=True)
                nodes.append(RayNode(p.index, actor, local_dir, p, cfg.threads, cfg.model_dump(mode="json")))
            # Node 0 first, then node 1 bootstrapping from it: their multiaddrs, at their machines' cluster
            # IPs, are everyone else's bootstraps (two, as in local runs: a node that knew only node 0
            # would not meet the others before round 0, and nodes wait for min(n - 1, 2) peers).
            min_peers = min(len(nodes) - 1, 2)
            bootstrap: list[str] = []
            for node in nodes[:2]:
                node.info = self._get(
                    node.actor.prepare.remote(node.config, list(bootstrap), min_peers, __version__),
                    PLACE_TIMEOUT_S,
                    f"placing node {node.index}",
                )
                bootstrap.append(node.info["multiaddr"])
            infos = self._get(
                [n.actor.prepare.remote(n.config, bootstrap, min_peers, __version__) for n in nodes[2:]],
                PLACE_TIMEOUT_S,
                "placing every node",
            )
            for node, info in zip(nodes[2:], infos, strict=True):
                node.info = info
            # All at once (starting them one by one costs a model load each before the next may
            # dial); a dial that comes too early is retried by the host, and nodes wait for peers
            # (p2p.min_peers_at_start, p2p.start_wait_s) before round 0. The bootstraps must come up.
            self._get([n.actor.start.remote(n.threads) for n in nodes], CALL_TIMEOUT_S, "starting the nodes")
            listening = self._get(
                [n.actor.wait_listening.remote(PLACE_TIMEOUT_S) for n in nodes[:2]],
                PLACE_TIMEOUT_S + 30,
                "the bootstrap nodes listening",
            )
            for node, up in zip(nodes[:2], listening, strict=True):
                if not up:
                    tail = self._get(
                        node.actor.log_tail.remote(), CALL_TIMEOUT_S, f"reading node {node.index}'s log"
                    )
                    raise ConfigError(
                        f"Ray: node {node.index} on {node.info['host']} did not start its p2p host; its log ends:\n{tail}"
                    )
            for node in nodes:
                gpus = ",".join(node.info["gpu_ids"])
                node.where = f"{node.info['host']} " + (f"cuda:{gpus}" if gpus else "cpu")
                record = placement_record(
                    node.placement,
                    node.info["host"],
                    "ray",
                    ip=node.info["ip"],
                    ray_node_id=node.info["ray_node_id"],
                    multiaddr=node.info["multiaddr"],
                    remote_dir=node.info["node_dir"],
                )
                record["device"] = f"cuda:{gpus}" if gpus else "cpu"
                record["cuda_visible_devices"] = gpus
                write_placement_record(node.local_dir, record)
            self.console.print(
                "on Ray: " + ", ".join(f"node {n.index} -> {n.where} ({n.info['ip']})" for n in nodes)
            )
        except BaseException:
            self.stop(nodes)  # no node process may outlive a run that failed to start
            raise
        return nodes

    def refresh(self, nodes: list[RayNode]) -> None:
        try:
            statuses = self.ray.get([n.actor.status.remote() for n in nodes], timeout=CALL_TIMEOUT_S)
        except self.ray.exceptions.GetTimeoutError:
            return  # a slow worker: the table shows the last known state
        except self.ray.exceptions.RayActorError:
            for node in nodes:  # an actor (or its machine) died: its node counts as failed
                if node._exit_code is None:
                    try:
                        self.ray.get(node.actor.status.remote(), timeout=CALL_TIMEOUT_S)
                    except Exception:
                        node._exit_code = -1
            return
        for node, status in zip(nodes, statuses, strict=True):
            node._exit_code = status["exit_code"]
            node._last = status["last"]

    def stop(self, nodes: list[RayNode]) -> None:
        """Stop every node, bring its files back into the local run directory, release the actors."""
        if not nodes:
            return
        codes = self._gather([n.actor.stop.remote(STOP_GRACE_S) for n in nodes], STOP_GRACE_S + 30)
        files = self._gather([n.actor.collect.remote() for n in nodes], CALL_TIMEOUT_S * 2)
        for node, code, collected in zip(nodes, codes, files, strict=True):
            node._exit_code = code if isinstance(code, int) else -1
            if isinstance(collected, dict):
                for name, data in collected.items():
                    if name in COLLECTED_FILES and isinstance(data, bytes):
                        (node.local_dir / name).parent.mkdir(parents=True, exist_ok=True)
                        (node.local_dir / name).write_bytes(data)
            node._collected = True
            self.ray.kill(node.actor)

    def _gather(self, refs: list[Any], timeout: float) -> list[Any]:
        """Each result, or None for an actor that died or did not answer in time."""
        results: list[Any] = []
        deadline = time.monotonic() + timeout
        for ref in refs:
            try:
                results.append(self.ray.get(ref, timeout=max(1.0, deadline - time.monotonic())))
            except Exception as exc:  # a dead actor or worker machine: keep what the others return
                self.console.print(f"[yellow]Ray: a node did not answer: {type(exc).__name__}[/]")
                results.append(None)
        return results
