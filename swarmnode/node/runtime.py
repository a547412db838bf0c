"""Everything a node holds while it runs, built from the config: the parts the round loop wires.

`build_runtime` says what it is doing at each step (start-up is where users wait and wonder),
resolves hardware, loads the policy, the task registry and the trainer, starts the p2p host process
and the admin service. `NodeRuntime` also owns the side effects around a round: checkpoints,
metrics, heartbeats, progress display, clean shutdown.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from swarmnode import __version__
from swarmnode.admin.metrics import NodeMetrics
from swarmnode.admin.source import EventLog, NetworkNode, NodeStatus, PeerInfo
from swarmnode.config import AdminConfig, NodeConfig, without_secrets

if TYPE_CHECKING:
    from swarmnode.admin.metrics import MetricsServer
    from swarmnode.node.loop import Node
    from swarmnode.node.network import SwarmNetwork

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class NodeRuntime:
    cfg: NodeConfig
    console: Console
    policy: Any
    backend: Any
    registry: Any
    trainer: Any
    intake: Any
    network: SwarmNetwork | None
    identity: Any
    lock: Any
    events: EventLog = field(default_factory=EventLog)
    metrics: NodeMetrics = field(default_factory=NodeMetrics)
    admin: Any = None
    metrics_server: Any = None
    started_at: float = field(default_factory=time.time)
    last_heartbeat: float = 0.0
    round: int = 0
    recent_rewards: list[float] = field(default_factory=list)

    @functools.cached_property
    def config_digest(self) -> str:
        """Short digest of the resolved config, to compare nodes at a glance."""
        return hashlib.sha256(without_secrets(self.cfg).to_toml().encode()).hexdigest()[:12]

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.cfg.data_dir / "checkpoints"

    def resume(self, node: Node) -> int:
        from swarmnode.rl.checkpoint import load_latest_checkpoint

        ckpt = load_latest_checkpoint(self.checkpoint_dir)
        if ckpt is None:
            return 0
        ckpt.restore(self.policy.model, self.trainer.optimizer)
        node.load_state_dict(ckpt.extra.get("node", {"round": ckpt.round}))
        self.backend.sync_weights()
        self.console.print(f"resumed from {ckpt.path} (round {ckpt.round})")
        self.events.emit("resumed", f"resumed from round {ckpt.round}", path=str(ckpt.path))
        return ckpt.round

    def save(self, node: Node) -> None:
        from swarmnode.rl.checkpoint import save_checkpoint

        path = save_checkpoint(
            self.checkpoint_dir,
            node.round,
            self.policy.model,
            self.trainer.optimizer,
            extra={"node": node.state_dict(), "model_id": self.policy.model_id},
        )
        self.events.emit("checkpoint", f"checkpoint at round {node.round}", path=str(path))

    def evaluate(self) -> float:
        from swarmnode.policy.evaluate import greedy_accuracy

        return greedy_accuracy(
            self.policy,
            self.backend,
            self.registry,
            self.cfg.tasks.eval_size,
            max_new_tokens=self.cfg.grpo.max_completion_length,
        )

    # -- around each round ---------------------------------------------------------------------
    def announce_start(self, start_round: int) -> None:
        mode = "silo (p2p disabled)" if self.network is None else "swarm"
        tasks = self.cfg.tasks
        task_names = "+".join(entry.dataset for entry in tasks.mix) if tasks.mix else tasks.preset
        self.console.print(
            f"[bold]node {self.cfg.name}[/] peer id {self.identity.peer_id} | model {self.policy.model_id} | "
            f"tasks {task_names} | I/J {self.cfg.sampler.local_groups}/{self.cfg.sampler.external_groups} "
            f"| {mode} | rounds {start_round}->{self.cfg.rounds}"
        )
        self.events.emit("started", f"started at round {start_round}")

    def wait_for_peers(self, should_stop: Callable[[], bool]) -> None:
        """Before round 0, wait (bounded) for p2p.min_peers_at_start peers in our gossip mesh so a
        swarm starts in step. A connected peer is not enough: gossipsub only delivers to mesh peers,
        which it grafts at its next heartbeat, and a fast node could finish its rounds before."""
        wanted = self.cfg.p2p.min_peers_at_start
        if self.network is None or wanted == 0:
            return
        deadline = time.monotonic() + self.cfg.p2p.start_wait_s
        with self.console.status(
            f"waiting for {wanted} peer(s) in the gossip mesh (at most {self.cfg.p2p.start_wait_s:.0f} s)..."
        ):
            while time.monotonic() < deadline and not should_stop():
                peers = self.network.status().peers
                in_mesh = sum(1 for peer in peers if peer.in_mesh)
                if in_mesh >= wanted:
                    self.console.print(f"{len(peers)} peer(s) connected, {in_mesh} in the gossip mesh")
                    return
                time.sleep(0.2)
        self.console.print(
            f"[yellow]fewer than {wanted} peer(s) after {self.cfg.p2p.start_wait_s:.0f} s; starting anyway[/]"
        )

    def after_round(self, node: Node, metrics: dict[str, Any]) -> None:
        self.round = node.round
        self.recent_rewards = list(node.recent_rewards)
        self.metrics.record_round(metrics)
        if self.network is not None:
            self.metrics.update_p2p(self.network.status())
            now = time.time()
            if now - self.last_heartbeat >= self.cfg.admin.heartbeat_interval:
                self.last_heartbeat = now
                self.publish_heartbeat()

    def publish_heartbeat(self) -> None:
        from swarmnode.admin.network_view import heartbeat_from_status

        assert self.network is not None
        admin_address, metrics_address = advertised_addresses(self)
        beat = heartbeat_from_status(
            RuntimeAdminSource(self).status(),
            self.counters(),
            self.network.heartbeat_sequence.next(),
            admin_address=admin_address,
            metrics_address=metrics_address,
        )
        self.network.publish_heartbeat(beat)

    def counters(self) -> dict[str, int]:
        if self.network is None:
            return {}
        p2p = self.network.status()
        return {
            "msgs_in": p2p.msgs_in,
            "msgs_out": p2p.msgs_out,
            **{f"verdict_{k}": v for k, v in p2p.verdicts.items()},
        }

    @contextlib.contextmanager
    def progress(self, start_round: int, total: int) -> Iterator[Callable[[dict[str, Any]], None]]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if not self.console.is_terminal:

            def log_line(m: dict[str, Any]) -> None:
                self.console.print(round_summary(m), highlight=False)

            yield log_line
            return
        bar = Progress(
            TextColumn("[bold]round"),
            MofNCompleteColumn(),
            BarColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=self.console,
            transient=False,
        )
        with bar:
            task = bar.add_task("", total=total, completed=start_round)

            def update(m: dict[str, Any]) -> None:
                bar.update(task, completed=m["round"] + 1, description=round_summary(m))

            yield update

    def close(self) -> None:
        from swarmnode.admin.discovery import remove_discovery_file

        if self.intake is not None:
            self.intake.close()  # the scoring worker process
        if self.network is not None:
            self.network.close()
        if self.admin is not None:
            self.admin.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        remove_discovery_file(self.cfg.data_dir)
        if self.lock is not None:
            self.lock.release()


class RuntimeAdminSource:
    """The admin service's read-only view of a running node (`swarmnode.admin.source.AdminSource`)."""

    def __init__(self, rt: NodeRuntime) -> None:
        self.rt = rt

    def status(self) -> NodeStatus:
        rt = self.rt
        p2p = rt.network.status() if rt.network is not None else None
        return NodeStatus(
            name=rt.cfg.name,
            peer_id=rt.identity.peer_id,
            model_id=rt.policy.model_id,
            round=rt.round,
            rounds_target=rt.cfg.rounds,
            recent_rewards=list(rt.recent_rewards),
            uptime_s=time.time() - rt.started_at,
            silo=p2p is None or p2p.silo,
            p2p_state="disabled" if p2p is None else ("running" if p2p.host_running else "restarting"),
            listen_addrs=list(p2p.listen_addrs) if p2p else [],
            data_dir=str(rt.cfg.data_dir),
            started_at=rt.started_at,
            config_digest=rt.config_digest,
            version=__version__,
            connected_peers=len(p2p.peers) if p2p else 0,
            admin_address=rt.admin.address if rt.admin else "",
            metrics_address=rt.metrics_server.url if rt.metrics_server else "",
        )

    def peers(self) -> list[PeerInfo]:
        rt = self.rt
        if rt.network is None:
            return []
        p2p = rt.network.status()
        return [
            PeerInfo(
                peer_id=p.peer_id,
                addrs=list(p.addrs),
                connected_since=p.connected_since,
                msgs_in=p.msgs_in,
                msgs_out=p.msgs_out,
                bytes_in=p.bytes_in,
                bytes_out=p.bytes_out,
                verdicts=dict(p.verdicts),
                score=p.score,
            )
            for p in p2p.peers
        ] + banned_peers(p2p)

    def network(self) -> list[NetworkNode]:
        rt = self.rt
        return [] if rt.network is None else rt.network.view.nodes(time.time())

    def events_since(self, cursor: int):  # noqa: ANN201 - AdminSource signature
        rt = self.rt
        return rt.events.events_since(cursor)


def banned_peers(p2p: Any) -> list[PeerInfo]:
    """The p2p snapshot's banned peers as `PeerInfo` rows (`banned=True`) with the reason and the
    time the ban ends (`P2PStatus.banned_peers`); bare peer ids (`P2PStatus.banned`) when a host
    reports no records."""
    records = getattr(p2p, "banned_peers", ()) or ()
    if records:
        return [
            PeerInfo(b.peer_id, [], 0.0, 0, 0, 0, 0, {}, 0.0, True, b.reason, b.expires_at) for b in records
        ]
    return [PeerInfo(peer, [], 0.0, 0, 0, 0, 0, {}, 0.0, True) for peer in getattr(p2p, "banned", ()) or ()]


def round_summary(m: dict[str, Any]) -> str:
    ext = m.get("used_external", 0)
    parts = [
        f"r{m['round']}",
        f"reward {m['reward_mean']:.3f}",
        f"zero-std {m['frac_zero_std']:.2f}",
        f"ext {ext} (pool {m.get('pool_size', 0)}, recv {m.get('received', 0)})",
        f"{m.get('tokens_per_s', 0):.0f} tok/s",
        f"step {m.get('step_seconds', 0):.2f}s",
    ]
    if "eval_accuracy" in m:
        parts.append(f"eval {m['eval_accuracy']:.3f}")
    if m.get("silo"):
        parts.append("silo")
    return " | ".join(parts)


def build_runtime(cfg: NodeConfig, console: Console | None = None) -> NodeRuntime:
    """Set up every part of a node; each step says what it does. Raises with actionable messages."""
    console = console or stderr_console()
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1" if cfg.model.path.startswith("embedded:") else "0")
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # our own status lines say what is loading
    from swarmnode.identity import Identity, IdentityLock
    from swarmnode.policy.hardware import choose_runtime, detect_hardware, limit_gpu_memory
    from swarmnode.policy.loading import load_policy
    from swarmnode.rl.external import ExternalIntake
    from swarmnode.rl.grpo import GRPOTrainer
    from swarmnode.tasks.registry import TaskRegistry
    from swarmnode.tasks.verify import completion_char_budget

    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    resolved = write_resolved_config(cfg)
    console.print(f"resolved config written to {resolved}")

    identity = Identity.load_or_create(cfg.key_path)
    lock = IdentityLock(cfg.key_path).acquire()
    try:
        choice = choose_runtime(detect_hardware(), cfg)
        limit_gpu_memory(choice)  # a node sharing a GPU stays within its gpu_memory_fraction
        torch.set_num_threads(choice.threads)
        seed_everything(cfg.seed)
        console.print(
            f"runtime: {choice.device}, {choice.dtype}, {choice.backend} backend, {choice.threads} thread(s)"
        )
        with console.status(f"loading model {cfg.model.path} ..."):
            policy = load_policy(cfg.model.model_copy(update={"dtype": choice.dtype}), choice.device)
        backend = make_backend(policy, cfg, choice.backend)
        with console.status(f"preparing tasks '{cfg.tasks.preset}' ..."):
            registry = TaskRegistry.from_config(cfg.tasks)
        ref_model = None
        if cfg.grpo.beta > 0:
            ref_model = load_policy(
                cfg.model.model_copy(update={"dtype": choice.dtype}), choice.device
            ).model.eval()
        trainer = GRPOTrainer(
            policy.model, cfg.grpo, policy.pad_token_id, ref_model=ref_model, device=choice.device
        )
        registry.max_completion_chars = completion_char_budget(cfg.grpo.max_completion_length)
        worker = (
            start_scoring_worker(registry, console, cfg.sampler.external_groups > 0)
            if cfg.p2p.enabled
            else None
        )
        intake = ExternalIntake(
            registry,
            policy.encode_prompt,
            policy.encode_completion,
            max_completion_tokens=4 * cfg.grpo.max_completion_length,
            worker=worker,
        )
        rt = NodeRuntime(
            cfg=cfg,
            console=console,
            policy=policy,
            backend=backend,
            registry=registry,
            trainer=trainer,
            intake=intake,
            network=None,
            identity=identity,
            lock=lock,
        )
        rt.metrics.set_identity(identity.peer_id, cfg.name, policy.model_id)
        if cfg.p2p.enabled:
            from swarmnode.node.network import SwarmNetwork

            rt.network = SwarmNetwork(cfg, identity, policy.model_id)
            rt.network.start()
            rt.metrics.track_network_view(rt.network.view)
            console.print(
                "p2p host process started"
                + (
                    f"; bootstrapping from {len(cfg.p2p.bootstrap)} address(es)"
                    if cfg.p2p.bootstrap
                    else "; no bootstrap addresses: waiting for peers to dial in (training alone until then)"
                )
            )
        start_admin(rt)
        return rt
    except BaseException:
        lock.release()
        raise


def write_resolved_config(cfg: NodeConfig) -> Path:
    """DATA_DIR/config.resolved.toml, to reproduce the run: secrets redacted, mode 0600, written
    atomically (an older 0644 copy is replaced, not rewritten in place)."""
    path = cfg.data_dir / "config.resolved.toml"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(without_secrets(cfg).to_toml())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def start_scoring_worker(registry: Any, console: Console, start_now: bool = True) -> Any:
    """The isolated process that scores peers' text (tasks.worker); says which datasets it refuses.
    With `start_now` False (a node that takes no external groups) it starts on first use."""
    from swarmnode.tasks.worker import ScoringWorker

    refused = registry.refused_for_foreign_text()
    if refused:
        console.print(
            f"[yellow]peers' groups of {', '.join(refused)} are refused[/]: their reasoning-gym scorers "
            "are not safe on foreign text (see docs/SCORING_SAFETY.md); this node still trains on its own"
        )
    worker = ScoringWorker(registry.rebuild_args())
    if start_now:
        with console.status("starting the scoring worker for peers' completions ..."):
            worker.start()
    return worker


def make_backend(policy: Any, cfg: NodeConfig, backend: str) -> Any:
    if backend == "vllm":
        from swarmnode.policy.hardware import vllm_memory_utilization
        from swarmnode.policy.vllm_backend import VLLMBackend

        return VLLMBackend(policy, gpu_memory_utilization=vllm_memory_utilization(cfg), seed=cfg.seed)
    from swarmnode.policy.transformers_backend import TransformersBackend

    return TransformersBackend(policy)


def start_admin(rt: NodeRuntime) -> None:
    from swarmnode.admin.discovery import write_discovery_file
    from swarmnode.admin.service import AdminServer

    admin_cfg = rt.cfg.admin
    rt.admin = AdminServer(RuntimeAdminSource(rt), admin_cfg).start()
    if admin_cfg.metrics_listen:
        rt.metrics_server = serve_metrics(rt.metrics, admin_cfg)
    write_discovery_file(
        rt.cfg.data_dir,
        rt.admin.address,
        rt.metrics_server.url if rt.metrics_server else None,
        rt.identity.peer_id,
    )
    rt.console.print(
        f"admin API on {rt.admin.address}"
        + (f", metrics on {rt.metrics_server.url}" if rt.metrics_server else "")
    )


def serve_metrics(metrics: NodeMetrics, admin_cfg: AdminConfig) -> MetricsServer:
    """/metrics on admin.metrics_listen: open on loopback; elsewhere behind the admin token unless
    admin.metrics_public, which the node announces as a warning (see swarmnode.admin.metrics)."""
    from swarmnode.admin.addresses import is_loopback, split_host_port

    assert admin_cfg.metrics_listen is not None
    host, _ = split_host_port(admin_cfg.metrics_listen, what="admin.metrics_listen")
    public = not is_loopback(host)
    token = admin_cfg.token if public and not admin_cfg.metrics_public else None
    server = metrics.serve(admin_cfg.metrics_listen, token=token)
    if public and token is None:
        warning = (
            f"/metrics on {server.address} is served without a token to anyone who can reach it "
            "(admin.metrics_public = true): restrict that port with a firewall or container port mapping"
        )
        log.warning(warning)  # the CLI's logging prints warnings on stderr; log collectors keep it
    return server


def advertised_addresses(rt: NodeRuntime) -> tuple[str, str]:
    """(admin, metrics) HOST:PORT this node advertises in heartbeats: admin.advertise_host with the
    bound ports, or nothing when advertise_host is unset (the default: nothing is announced)."""
    host = rt.cfg.admin.advertise_host
    if host is None:
        return "", ""
    from swarmnode.admin.addresses import join_host_port, split_host_port

    def on_host(address: str, what: str) -> str:
        return join_host_port(host, split_host_port(address, what)[1]) if address else ""

    admin = on_host(rt.admin.address if rt.admin else "", "admin address")
    metrics = on_host(rt.metrics_server.address if rt.metrics_server else "", "metrics address")
    return admin, metrics


def stderr_console() -> Console:
    """Rich on a terminal; long unwrapped lines in logs (simulations, docker)."""
    return Console(stderr=True, soft_wrap=not sys.stderr.isatty())
