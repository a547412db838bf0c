"""The admin gRPC server every node runs: read-only views of an `AdminSource`.

Security model: the service only reads. It binds 127.0.0.1 by default, where any local user of
the machine may query it. Bound to any other address it refuses to start without a token, and
every call must then carry the metadata ``authorization: Bearer <token>`` (checked in constant
time); a token configured on loopback is enforced as well.
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from swarmnode.admin.addresses import is_loopback, join_host_port, split_host_port
from swarmnode.admin.convert import to_proto
from swarmnode.admin.source import AdminSource
from swarmnode.config import AdminConfig, ConfigError
from swarmnode.wire.gen import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)

TOKEN_METADATA_KEY = "authorization"
MAX_STREAM_SECONDS = 300.0  # one StreamEvents call never holds a worker thread longer than this
STREAM_POLL_SECONDS = 0.5
MAX_WORKERS = 8  # concurrent calls; a stream holds one worker for its whole duration


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token`."""
    return ((TOKEN_METADATA_KEY, f"Bearer {token}"),)


class _AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, source: AdminSource, token: str | None, stop_streams: Callable[[], bool]) -> None:
        self._source = source
        self._token = token
        self._stopping = stop_streams

    def _authorize(self, context: grpc.ServicerContext) -> None:
        if self._token is None:
            return
        sent = dict(context.invocation_metadata()).get(TOKEN_METADATA_KEY, "")
        expected = f"Bearer {self._token}"
        if not hmac.compare_digest(sent.encode(), expected.encode()):
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "this admin service requires a token: pass --token (the node's admin.token)",
            )

    def GetStatus(self, request: Any, context: grpc.ServicerContext) -> admin_pb2.NodeStatus:
        self._authorize(context)
        return to_proto(self._source.status(), admin_pb2.NodeStatus)

    def ListPeers(self, request: Any, context: grpc.ServicerContext) -> admin_pb2.PeersReply:
        self._authorize(context)
        return admin_pb2.PeersReply(peers=[to_proto(p, admin_pb2.PeerInfo) for p in self._source.peers()])

    def GetNetwork(self, request: Any, context: grpc.ServicerContext) -> admin_pb2.NetworkReply:
        self._authorize(context)
        nodes = [to_proto(n, admin_pb2.NetworkNode) for n in self._source.network()]
        return admin_pb2.NetworkReply(nodes=nodes)

    def StreamEvents(self, request: Any, context: grpc.ServicerContext) -> Iterator[admin_pb2.Event]:
        self._authorize(context)
        wanted = request.max_duration_s
        if not math.isfinite(wanted) or wanted < 0:  # NaN compares false with everything: never ends
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_duration_s must be a finite number of seconds >= 0 (the server caps it at "
                f"{MAX_STREAM_SECONDS:.0f}), got {wanted!r}",
            )
        deadline = time.monotonic() + min(wanted, MAX_STREAM_SECONDS)
        cursor = request.cursor
        while True:
            events, cursor = self._source.events_since(cursor)
            for event in events:
                yield to_proto(event, admin_pb2.Event, cursor=cursor)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not context.is_active() or self._stopping():
                return
            time.sleep(min(STREAM_POLL_SECONDS, remaining))


class AdminServer:
    """The admin gRPC service of one node. `start()` binds (port 0 -> `.address` has the real
    port); `stop()` ends open streams and shuts down."""

    def __init__(self, source: AdminSource, cfg: AdminConfig, require_token: bool | None = None) -> None:
        host, port = split_host_port(cfg.listen, what="admin.listen")
        if require_token is None:
            require_token = cfg.token is not None or not is_loopback(host)
        if require_token and not cfg.token:
            raise ConfigError(
                f"admin.listen = {cfg.listen!r} is reachable from other machines, so the admin service "
                "needs a token: set admin.token (e.g. SWARMNODE__ADMIN__TOKEN=$(openssl rand -hex 16)) "
                "or listen on 127.0.0.1"
            )
        self._source = source
        self._host, self._port = host, port
        self._token = cfg.token if require_token else None
        self._server: grpc.Server | None = None
        self._stopping = False
        self.address = ""

    @property
    def requires_token(self) -> bool:
        return self._token is not None

    def start(self) -> AdminServer:
        if self._server is not None:
            raise RuntimeError("AdminServer already started")
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="admin-grpc"),
            maximum_concurrent_rpcs=MAX_WORKERS * 2,
        )
        admin_pb2_grpc.add_AdminServicer_to_server(
            _AdminServicer(self._source, self._token, lambda: self._stopping), server
        )
        wanted = join_host_port(self._host, self._port)
        try:
            port = server.add_insecure_port(wanted)
        except RuntimeError as exc:  # grpcio raises RuntimeError when it cannot bind
            raise OSError(
                f"cannot serve the admin API on {wanted}: {exc}; "
                "set admin.listen to a free address (port 0 picks one)"
            ) from exc
        server.start()
        self._server = server
        self.address = join_host_port(self._host, port)
        log.info("admin API listening on %s%s", self.address, " (token required)" if self._token else "")
        return self

    def stop(self, grace_s: float = 1.0) -> None:
        if self._server is None:
            return
        self._stopping = True
        self._server.stop(grace_s).wait(grace_s + 5)
        self._server = None

    def __enter__(self) -> AdminServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
