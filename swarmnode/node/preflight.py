"""Start-up checks: everything a volunteer can get wrong, found before the first round.

``run_preflight(cfg, hw)`` runs each check and returns its ``CheckResult``: ``ok``, ``warn`` (the
node continues, e.g. an unreachable bootstrap means training alone in silo until peers appear) or
``fail``. A failure is ``fatal`` when continuing makes no sense (no writable data dir, unusable key,
model that cannot load, port taken, disk too small); ``preflight_exit_code`` is non-zero only then.
Run it before the node takes the identity lock: the key check tries that lock itself.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.table import Table

from swarmnode.config import ConfigError, NodeConfig
from swarmnode.identity import Identity, IdentityError, IdentityLock
from swarmnode.policy.hardware import Hardware, choose_runtime, estimate_model_bytes
from swarmnode.policy.loading import EMBEDDED_PREFIX, ModelLoadError, resolve_model_path

Status = Literal["ok", "warn", "fail"]
EXIT_PREFLIGHT_FAILED = 2
BOOTSTRAP_TIMEOUT_S = 2.0
MAX_BOOTSTRAPS_PROBED = 16
# Checkpoints keep the weights and Adam's two moments (~3x the weights), plus a margin for logs.
CHECKPOINT_FACTOR = 3
DISK_MARGIN_BYTES = 256 * 2**20


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    message: str
    fatal: bool = False


def _ok(name: str, message: str) -> CheckResult:
    return CheckResult(name, "ok", message)


def _warn(name: str, message: str) -> CheckResult:
    return CheckResult(name, "warn", message)


def _fail(name: str, message: str) -> CheckResult:
    return CheckResult(name, "fail", message, fatal=True)


def check_data_dir(data_dir: Path) -> CheckResult:
    name = "data dir"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / f".preflight-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return _fail(
            name,
            f"cannot write to {data_dir} ({exc.strerror or exc}): choose a writable --data-dir, or fix its "
            f"owner/permissions (in Docker, mount a volume at /data owned by uid 10001)",
        )
    return _ok(name, f"{data_dir.resolve()} is writable")


def check_key_file(key_path: Path) -> CheckResult:
    name = "identity key"
    if not key_path.exists():
        parent = next((p for p in [key_path.parent, *key_path.parent.parents] if p.exists()), Path("/"))
        if not os.access(parent, os.W_OK | os.X_OK):
            return _fail(
                name, f"{key_path} does not exist and {parent} is not writable: choose another p2p.key_path"
            )
        return _ok(name, f"{key_path} will be created on first start (keep it: it is this node's identity)")
    try:
        identity = Identity.load(key_path)
        with IdentityLock(key_path):
            pass
    except (IdentityError, OSError) as exc:
        return _fail(name, str(exc))
    return _ok(name, f"{key_path} loads as peer {identity.peer_id}")


def check_model(model_path: str) -> CheckResult:
    name = "model"
    try:
        source, _ = resolve_model_path(model_path)
    except ModelLoadError as exc:
        return _fail(name, str(exc))
    if model_path.startswith(EMBEDDED_PREFIX):
        return _ok(name, f"{model_path} ships with swarmnode")
    local = Path(source)
    if local.is_dir():
        if not (local / "config.json").is_file():
            return _fail(
                name, f"{local} has no config.json: point model.path at a Hugging Face model directory"
            )
        return _ok(name, f"local model directory {local}")
    # A hub id: fine when cached; otherwise it is downloaded at start, which needs the hub.
    if _in_hub_cache(source):
        return _ok(name, f"{source} is in the local Hugging Face cache")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return _fail(
            name,
            f"{source} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: download it first "
            f"(`huggingface-cli download {source}`) or pass a local directory as model.path",
        )
    size = estimate_model_bytes(source)
    about = f" (about {size / 2**30:.1f} GiB)" if size else ""
    return _warn(
        name,
        f"{source} is not cached: it will be downloaded from the hub at start{about}; without hub access "
        f"pass a local directory as model.path",
    )


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # no huggingface_hub, or an id it rejects
        return False


def parse_tcp_multiaddr(addr: str) -> tuple[str, int]:
    """``/ip4/H/tcp/P[/p2p/ID]`` (also ip6, dns, dns4, dns6) -> (host, port); ValueError otherwise."""
    parts = addr.strip("/").split("/")
    if len(parts) < 4 or parts[0] not in ("ip4", "ip6", "dns", "dns4", "dns6") or parts[2] != "tcp":
        raise ValueError(f"{addr!r} is not a TCP multiaddr like /ip4/203.0.113.7/tcp/4001/p2p/<peer id>")
    try:
        port = int(parts[3])
    except ValueError:
        raise ValueError(f"{addr!r}: port {parts[3]!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{addr!r}: port {port} is out of range")
    return parts[1], port


def _port_free(host: str, port: int) -> OSError | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like a server would; ignores TIME_WAIT
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc
    return None


def check_listen_ports(cfg: NodeConfig) -> list[CheckResult]:
    """The p2p listen multiaddrs and the admin and metrics addresses; port 0 is always fine."""
    results: list[CheckResult] = []
    targets: list[tuple[str, str, int, str]] = []  # (check name, address as written, port, host)
    if cfg.p2p.enabled:
        for addr in cfg.p2p.listen:
            try:
                host, port = parse_tcp_multiaddr(addr)
                targets.append(("p2p listen", addr, port, host))
            except ValueError as exc:
                results.append(_fail("p2p listen", f"{exc}; fix p2p.listen (flag --listen)"))
    for key, value in (
        ("admin.listen", cfg.admin.listen),
        ("admin.metrics_listen", cfg.admin.metrics_listen),
    ):
        if value is None:
            continue
        host, _, port_text = value.rpartition(":")
        if not port_text.isdigit() or not host:
            results.append(_fail(key, f"{key} = {value!r} is not HOST:PORT, e.g. 127.0.0.1:7070"))
            continue
        targets.append((key, value, int(port_text), host.strip("[]")))
    for name, written, port, host in targets:
        if port == 0:
            results.append(_ok(name, f"{written}: the system picks a free port"))
            continue
        error = _port_free(host, port)
        if error is None:
            results.append(_ok(name, f"{written} is free"))
        elif error.errno == 98 or "in use" in str(error).lower():
            results.append(
                _fail(
                    name,
                    f"port {port} on {host} is already in use (another swarmnode?): stop that process "
                    f"or choose another port for {written}",
                )
            )
        else:
            results.append(
                _fail(
                    name,
                    f"cannot listen on {written}: {error.strerror or error}; use an address of this machine",
                )
            )
    return results


def check_admin_exposure(cfg: NodeConfig) -> CheckResult:
    """Who can reach the admin API and /metrics. The config already refused an exposed admin API
    without a token (at load, before anything starts); this says what was chosen."""
    from swarmnode.admin.addresses import is_loopback, split_host_port

    name = "admin exposure"
    admin_host, _ = split_host_port(cfg.admin.listen, "admin.listen")
    metrics = cfg.admin.metrics_listen
    metrics_host = split_host_port(metrics, "admin.metrics_listen")[0] if metrics else None
    exposed = [
        a for a, h in ((cfg.admin.listen, admin_host), (metrics, metrics_host)) if h and not is_loopback(h)
    ]
    if metrics and metrics_host and not is_loopback(metrics_host) and cfg.admin.metrics_public:
        return _warn(
            name,
            f"/metrics on {metrics} is served without a token (admin.metrics_public = true): "
            "restrict that port with a firewall or the container's port mapping",
        )
    advertise = cfg.admin.advertise_host
    if advertise and not is_loopback(advertise) and is_loopback(admin_host):
        return _warn(
            name,
            f"admin.advertise_host = {advertise!r} but admin.listen = {cfg.admin.listen!r} is loopback: "
            "other hosts cannot reach what this node advertises; listen on an address they reach "
            "(with admin.token)",
        )
    if exposed:
        return _ok(name, f"{', '.join(exposed)} reachable from other machines; calls need the admin token")
    return _ok(name, "admin API and /metrics on loopback only")


def _tcp_reachable(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection opens within ``timeout``, else the reason."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


def check_bootstrap(cfg: NodeConfig, timeout: float = BOOTSTRAP_TIMEOUT_S) -> CheckResult:
    name = "bootstrap"
    if not cfg.p2p.enabled:
        return _ok(name, "p2p disabled: training alone (silo) by config")
    if not cfg.p2p.bootstrap:
        return _warn(
            name, "no bootstrap configured: training alone (silo) until a peer dials in; pass --bootstrap"
        )
    reachable, problems = [], []
    deadline = time.monotonic() + timeout * 2
    for addr in cfg.p2p.bootstrap[:MAX_BOOTSTRAPS_PROBED]:
        try:
            host, port = parse_tcp_multiaddr(addr)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if "/p2p/" not in addr:
            problems.append(f"{addr} lacks /p2p/<peer id>: ask the bootstrap's operator for its full address")
            continue
        left = deadline - time.monotonic()
        reason = (
            _tcp_reachable(host, port, min(timeout, left)) if left > 0 else "not probed (time budget spent)"
        )
        if reason is None:
            reachable.append(addr)
        else:
            problems.append(f"{host}:{port} unreachable ({reason})")
    if reachable:
        extra = f"; {len(problems)} not: " + "; ".join(problems) if problems else ""
        return _ok(name, f"{len(reachable)} of {len(cfg.p2p.bootstrap)} reachable{extra}")
    return _warn(
        name,
        "no bootstrap reachable ("
        + "; ".join(problems)
        + "): the node trains alone (silo) and keeps retrying; "
        "check the address and that its port is open",
    )


def check_disk_space(
    data_dir: Path, model_path: str, usage: Callable[[Path], tuple[int, int, int]] = shutil.disk_usage
) -> CheckResult:
    name = "disk space"
    model_bytes = estimate_model_bytes(model_path)
    existing = next((p for p in [data_dir, *data_dir.parents] if p.exists()), Path("/"))
    free = usage(existing)[2]
    if model_bytes is None:
        return _ok(name, f"{free / 2**30:.1f} GiB free at {existing} (model size unknown)")
    need = model_bytes * CHECKPOINT_FACTOR + DISK_MARGIN_BYTES
    msg = f"{free / 2**30:.1f} GiB free at {existing}; checkpoints need about {need / 2**30:.1f} GiB"
    if free < need:
        return _fail(name, f"{msg}: free space or choose a --data-dir on a larger disk")
    if free < 2 * need:
        return _warn(name, f"{msg}: little room to spare")
    return _ok(name, msg)


def check_runtime(cfg: NodeConfig, hw: Hardware) -> CheckResult:
    name = "hardware"
    try:
        choice = choose_runtime(hw, cfg)
    except ConfigError as exc:
        return _fail(name, str(exc))
    return _ok(name, f"{choice.device}, {choice.dtype}, {choice.backend} backend, {choice.threads} thread(s)")


def run_preflight(cfg: NodeConfig, hw: Hardware) -> list[CheckResult]:
    """Run every start-up check, cheap ones first, and return all results (never raises)."""
    results = [check_data_dir(cfg.data_dir), check_key_file(cfg.key_path), check_runtime(cfg, hw)]
    results.append(check_model(cfg.model.path))
    results.extend(check_listen_ports(cfg))
    results.append(check_admin_exposure(cfg))
    results.append(check_disk_space(cfg.data_dir, cfg.model.path))
    results.append(check_bootstrap(cfg))
    return results


def preflight_exit_code(results: list[CheckResult]) -> int:
    """Non-zero only when a fatal check failed: warnings never stop a node."""
    return EXIT_PREFLIGHT_FAILED if any(r.fatal for r in results) else 0


def print_preflight(results: list[CheckResult], console: Console | None = None) -> None:
    """A table of the checks; failures say what to do."""
    console = console or Console(stderr=True)
    style = {"ok": "green", "warn": "yellow", "fail": "bold red"}
    table = Table(title="preflight", show_header=False, box=None, padding=(0, 1))
    for r in results:
        table.add_row(f"[{style[r.status]}]{r.status}[/]", r.name, r.message)
    console.print(table)
    if preflight_exit_code(results):
        console.print("[bold red]cannot start:[/] fix the failed checks above")
