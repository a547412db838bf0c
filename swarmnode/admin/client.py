"""The operator CLI's side of the admin API: `swarmnode status`, `peers`, `net`, `events`.

Each command reaches a node's admin gRPC service (address: `--node`, else the discovery file in
`--data-dir`, else 127.0.0.1:7500; see swarmnode.admin.discovery) with the admin token of `--token`
or else of the environment variable SWARMNODE__ADMIN__TOKEN (the one the node reads its
admin.token from; safer than a flag, which other local users see in the process list), prints a
rich table, or JSON
with `--json` (one document; one JSON line per refresh with `--watch`), and with `--watch`
refreshes every 2 s until Ctrl-C. When no node answers it prints one line on stderr and exits 2.

Run it standalone as ``python -m swarmnode.admin.client status --json``; the `swarmnode` CLI
mounts the same subcommands with `add_admin_commands`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from swarmnode.admin.convert import from_proto
from swarmnode.admin.discovery import DEFAULT_DATA_DIR, resolve_admin_address
from swarmnode.admin.service import bearer
from swarmnode.admin.source import Event, NetworkNode, NodeStatus, PeerInfo
from swarmnode.wire.gen import admin_pb2, admin_pb2_grpc

EXIT_UNREACHABLE = 2
TOKEN_ENV = "SWARMNODE__ADMIN__TOKEN"
WATCH_INTERVAL_S = 2.0
CALL_TIMEOUT_S = 5.0


class AdminError(Exception):
    """A call to the admin service failed; the message is one line meant for the operator."""


class AdminUnreachable(AdminError):
    pass


def unreachable_message(address: str) -> str:
    return (
        f"no swarmnode admin service at {address} "
        "(is the node running? start it with `swarmnode run`, or pass --node)"
    )


class AdminClient:
    """A typed client of one node's admin service; returns the records of swarmnode.admin.source."""

    def __init__(self, address: str, token: str | None = None, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.address = address
        self._metadata = bearer(token) if token else ()
        self._timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address)
        self._stub = admin_pb2_grpc.AdminStub(self._channel)

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, timeout=self._timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def _error(self, exc: grpc.RpcError) -> AdminError:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return AdminUnreachable(unreachable_message(self.address))
        detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return AdminError(f"admin service at {self.address} refused the call: {detail}")
        if code == grpc.StatusCode.UNIMPLEMENTED:
            detail = "the service there is not a swarmnode admin API of this version"
        return AdminError(f"admin service at {self.address} failed: {detail}")

    def status(self) -> NodeStatus:
        return from_proto(self._call(self._stub.GetStatus, admin_pb2.StatusRequest()), NodeStatus)

    def peers(self) -> list[PeerInfo]:
        reply = self._call(self._stub.ListPeers, admin_pb2.PeersRequest())
        return [from_proto(p, PeerInfo) for p in reply.peers]

    def network(self) -> list[NetworkNode]:
        reply = self._call(self._stub.GetNetwork, admin_pb2.NetworkRequest())
        return [from_proto(n, NetworkNode) for n in reply.nodes]

    def events(self, cursor: int = 0, max_duration_s: float = 0.0) -> Iterator[tuple[Event, int]]:
        """(event, cursor to resume after it) pairs; the stream ends after max_duration_s."""
        if not math.isfinite(max_duration_s) or max_duration_s < 0:
            raise AdminError(
                f"the follow time must be a finite number of seconds >= 0, got {max_duration_s!r}"
            )
        request = admin_pb2.EventsRequest(cursor=cursor, max_duration_s=max_duration_s)
        try:
            stream = self._stub.StreamEvents(
                request, timeout=max_duration_s + self._timeout_s, metadata=self._metadata
            )
            for message in stream:
                yield from_proto(message, Event), message.cursor
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- rendering


def _ago(t: float, now: float) -> str:
    seconds = max(0.0, now - t)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _trend(values: list[float]) -> str:
    """The last rewards as a sparkline plus the last value, e.g. '▂▃▅▇ 0.62'."""
    if not values:
        return "-"
    bars = "▁▂▃▄▅▆▇█"
    spark = "".join(bars[min(7, max(0, int(v * 8)))] for v in values[-12:])
    return f"{spark} {values[-1]:.2f}"


def _short(peer_id: str) -> str:
    """The distinctive tail of a peer id ('12D3KooW' starts every Ed25519 one); --json has it whole."""
    return peer_id if len(peer_id) <= 16 else f"…{peer_id[-12:]}"


def render_status(status: NodeStatus) -> RenderableType:
    table = Table(title=f"swarmnode {status.name}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    mode = "[yellow]silo (training alone)[/]" if status.silo else f"swarm, {status.connected_peers} peers"
    rows = [
        ("peer id", status.peer_id),
        ("model", status.model_id),
        ("round", f"{status.round} / {status.rounds_target}"),
        ("recent rewards", _trend(status.recent_rewards)),
        ("mode", mode),
        ("p2p", status.p2p_state),
        ("listening on", "\n".join(status.listen_addrs) or "-"),
        ("uptime", _duration(status.uptime_s)),
        ("data dir", status.data_dir),
        ("config digest", status.config_digest),
        ("admin / metrics", f"{status.admin_address or '-'} / {status.metrics_address or '-'}"),
        ("version", status.version or "-"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def _ban(peer: PeerInfo, now: float) -> str:
    """'banned (bad_signature), 4m12s left' for a banned peer."""
    reason = f" ({peer.ban_reason})" if peer.ban_reason else ""
    left = f", {_duration(peer.banned_until - now)} left" if peer.banned_until > now else ""
    return f"banned{reason}{left}"


def render_peers(peers: list[PeerInfo], now: float) -> RenderableType:
    connected = [p for p in peers if not p.banned]
    banned = [p for p in peers if p.banned]
    title = f"{len(connected)} connected peers" + (f", {len(banned)} banned" if banned else "")
    table = Table(title=title, title_justify="left")
    for column in ("peer id", "addresses", "connected", "msgs in/out", "bytes in/out", "verdicts", "score"):
        table.add_column(
            column, justify="right" if column in ("msgs in/out", "bytes in/out", "score") else "left"
        )
    for p in sorted(banned, key=lambda p: p.peer_id):
        table.add_row(_short(p.peer_id), "-", Text(_ban(p, now), style="red"), "-", "-", "-", "-")
    for p in sorted(connected, key=lambda p: p.peer_id):
        verdicts = " ".join(f"{reason}={count}" for reason, count in sorted(p.verdicts.items())) or "-"
        table.add_row(
            _short(p.peer_id),
            Text("\n".join(p.addrs) or "-"),
            _ago(p.connected_since, now),
            f"{p.msgs_in}/{p.msgs_out}",
            f"{_bytes(p.bytes_in)}/{_bytes(p.bytes_out)}",
            verdicts,
            f"{p.score:.1f}",
        )
    return table


def render_network(nodes: list[NetworkNode], now: float) -> RenderableType:
    table = Table(title=f"{len(nodes)} nodes seen (from heartbeats)", title_justify="left")
    columns = ["peer id", "name", "model", "round", "reward trend", "peers", "last seen"]
    advertising = any(n.admin_address or n.metrics_address for n in nodes)
    if advertising:
        columns.append("admin / metrics")
    for column in columns:
        table.add_column(column, justify="right" if column in ("round", "peers") else "left")
    for n in sorted(nodes, key=lambda n: (n.name, n.peer_id)):
        peers = "silo" if n.silo else str(n.peers)
        row: list[RenderableType] = [
            _short(n.peer_id),
            Text(n.name),  # peer text: never read as rich markup
            Text(n.model_id),
            str(n.round),
            _trend(n.reward_trend),
            peers,
            _ago(n.last_seen, now),
        ]
        if advertising:
            row.append(Text(f"{n.admin_address or '-'} / {n.metrics_address or '-'}"))
        table.add_row(*row)
    return table


def _as_json(data: Any, indent: int | None) -> str:
    if isinstance(data, list):
        return json.dumps([dataclasses.asdict(item) for item in data], indent=indent)
    return json.dumps(dataclasses.asdict(data), indent=indent)


# ---------------------------------------------------------------- commands


def _run_view(
    fetch: Callable[[AdminClient], Any],
    render: Callable[[Any, float], RenderableType],
    node_addr: str | None,
    as_json: bool,
    watch: bool,
    token: str | None,
    data_dir: Path | None,
    watch_count: int | None,
    interval_s: float,
) -> int:
    address = resolve_admin_address(node_addr, data_dir)
    token = token or os.environ.get(TOKEN_ENV) or None
    out = Console(soft_wrap=as_json)
    err = Console(stderr=True)
    refreshes = 0
    try:
        with AdminClient(address, token) as client:
            live = Live(console=out, auto_refresh=False) if watch and not as_json else nullcontext()
            with live:
                while True:
                    data = fetch(client)
                    if as_json:
                        print(_as_json(data, indent=None if watch else 2), flush=True)
                    elif isinstance(live, Live):
                        live.update(render(data, time.time()), refresh=True)
                    else:
                        out.print(render(data, time.time()))
                    refreshes += 1
                    if not watch or (watch_count is not None and refreshes >= watch_count):
                        return 0
                    time.sleep(interval_s)
    except AdminError as exc:
        err.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        return EXIT_UNREACHABLE if isinstance(exc, AdminUnreachable) else 1
    except KeyboardInterrupt:
        return 0


def status_command(
    node_addr: str | None,
    as_json: bool = False,
    watch: bool = False,
    token: str | None = None,
    *,
    data_dir: Path | None = None,
    watch_count: int | None = None,
    interval_s: float = WATCH_INTERVAL_S,
) -> int:
    """`swarmnode status`: the node's identity, model, round, rewards, uptime, p2p state."""
    return _run_view(
        AdminClient.status,
        lambda status, now: render_status(status),
        node_addr, as_json, watch, token, data_dir, watch_count, interval_s,
    )  # fmt: skip


def peers_command(
    node_addr: str | None,
    as_json: bool = False,
    watch: bool = False,
    token: str | None = None,
    *,
    data_dir: Path | None = None,
    watch_count: int | None = None,
    interval_s: float = WATCH_INTERVAL_S,
) -> int:
    """`swarmnode peers`: connected peers with traffic, validation verdicts and scores, then banned
    peers with the reason and the time left."""
    return _run_view(
        AdminClient.peers, render_peers, node_addr, as_json, watch, token, data_dir, watch_count, interval_s
    )


def net_command(
    node_addr: str | None,
    as_json: bool = False,
    watch: bool = False,
    token: str | None = None,
    *,
    data_dir: Path | None = None,
    watch_count: int | None = None,
    interval_s: float = WATCH_INTERVAL_S,
) -> int:
    """`swarmnode net`: every node this one has heard a heartbeat from recently, with the admin and
    /metrics addresses each advertises (admin.advertise_host) for operators of several machines."""
    return _run_view(
        AdminClient.network,
        render_network,
        node_addr,
        as_json,
        watch,
        token,
        data_dir,
        watch_count,
        interval_s,
    )


def events_command(
    node_addr: str | None,
    as_json: bool = False,
    follow_s: float = 0.0,
    token: str | None = None,
    *,
    data_dir: Path | None = None,
) -> int:
    """`swarmnode events`: the node's recent events; `--follow SECONDS` keeps streaming new ones."""
    address = resolve_admin_address(node_addr, data_dir)
    token = token or os.environ.get(TOKEN_ENV) or None
    out = Console(soft_wrap=True)
    try:
        with AdminClient(address, token) as client:
            for event, _cursor in client.events(0, max_duration_s=follow_s):
                if as_json:
                    print(json.dumps(dataclasses.asdict(event)), flush=True)
                else:
                    stamp = time.strftime("%H:%M:%S", time.localtime(event.time))
                    details = " ".join(f"{k}={v}" for k, v in sorted(event.fields.items()))
                    out.print(
                        f"{stamp} [bold]{escape(event.kind)}[/] {escape(event.message)} [dim]{escape(details)}[/]"
                    )
    except AdminError as exc:
        Console(stderr=True).print(str(exc), markup=False, highlight=False, soft_wrap=True)
        return EXIT_UNREACHABLE if isinstance(exc, AdminUnreachable) else 1
    except KeyboardInterrupt:
        pass
    return 0


# ---------------------------------------------------------------- argparse wiring


def _common_options(parser: argparse.ArgumentParser, watchable: bool = True) -> None:
    parser.add_argument("--node", metavar="ADDR", help="admin address HOST:PORT of the node to query")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="find a local node's admin address in DATA_DIR/admin.json (default: %(default)s)",
    )
    parser.add_argument(
        "--token",
        help=f"admin token, when the node's admin service requires one (default: ${TOKEN_ENV}; "
        "prefer the variable: other local users can read command lines)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    if watchable:
        parser.add_argument("--watch", action="store_true", help="refresh every 2 s until Ctrl-C")
        parser.add_argument("--watch-count", type=int, default=None, help=argparse.SUPPRESS)
        parser.add_argument("--interval", type=float, default=WATCH_INTERVAL_S, help=argparse.SUPPRESS)


def _view_handler(command: Callable[..., int]) -> Callable[[argparse.Namespace], int]:
    def handle(args: argparse.Namespace) -> int:
        return command(
            args.node, args.json, args.watch, args.token,
            data_dir=args.data_dir, watch_count=args.watch_count, interval_s=args.interval,
        )  # fmt: skip

    return handle


def add_admin_commands(subparsers: Any) -> None:
    """Mount `status`, `peers`, `net` and `events` on an argparse subparsers object; each sets
    `func(args) -> exit code`."""
    for name, command, help_text in (
        ("status", status_command, "this node's identity, model, round, rewards and p2p state"),
        (
            "peers",
            peers_command,
            "connected peers (traffic, verdicts, scores) and banned ones (reason, time left)",
        ),
        ("net", net_command, "the network as seen through heartbeats: nodes, models, rounds, rewards"),
    ):
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        _common_options(parser)
        parser.set_defaults(func=_view_handler(command))
    parser = subparsers.add_parser(
        "events", help="the node's recent events", description="the node's recent events"
    )
    _common_options(parser, watchable=False)
    parser.add_argument(
        "--follow", type=float, default=0.0, metavar="SECONDS", help="keep streaming new events"
    )
    parser.set_defaults(func=lambda a: events_command(a.node, a.json, a.follow, a.token, data_dir=a.data_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m swarmnode.admin.client", description=__doc__.splitlines()[0]
    )
    add_admin_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
