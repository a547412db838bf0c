"""A gossip-only node process for the p2p tests and the gossip bench.

It runs the real network side (P2PClient -> supervised libp2p host), publishes signed rollout
batches of a given size at a given rate, drains what arrives, and writes JSON lines:
``ready`` (peer id, addresses), ``peers`` (connected and mesh peers, while waiting for
``--start-when``; a start file holding a Unix time sets the common start tick), ``sent`` (sequence, message id, time), ``recv`` (origin, sequence,
message id, latency), ``attack`` (adversary mode: what was sent) and a final ``status``.

    python -m swarmnode.p2p.gossip_node --key K --run-dir D --listen /ip4/127.0.0.1/tcp/4001 \\
        --bootstrap /ip4/127.0.0.1/tcp/4002/p2p/12D3... --payload-bytes 8192 --rate 1 \\
        --duration 30 --out results.jsonl

``--adversary`` publishes, besides its valid batches, one of each crafted bad message: a forged
signature, a tampered payload, an oversize envelope, a reused sequence number (its first batch's), random bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import string
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from swarmnode.config import P2PConfig, parse_override
from swarmnode.identity import Identity, IdentityLock
from swarmnode.p2p.client import P2PClient, Received
from swarmnode.rl.records import RolloutGroup
from swarmnode.tasks.reference import TaskRef
from swarmnode.wire import (
    Kind,
    WireCaps,
    WireError,
    decode_rollout_batch,
    encode_rollout_batch,
    message_id,
    open_envelope,
    open_payload,
    seal,
)
from swarmnode.wire.gen import wire_pb2

BENCH_TASK = TaskRef("bench", "0" * 16, 0, 0, "0")
COMPLETIONS_PER_GROUP = 8
MAX_COMPLETION_CHARS = 8000
ATTACK_AFTER_SENDS = 2  # let the mesh settle so every neighbour sees every attack
STOP_CHECK_S = 0.1  # longest wait in the loop, so SIGTERM/SIGINT stop it promptly
START_WAIT_S = 180.0  # longest wait for --start-when
ATTACKS = ("forged_signature", "tampered_payload", "oversize", "replay", "garbage")
_LETTERS = (string.ascii_letters + string.digits).encode()
_BYTE_TO_LETTER = bytes(_LETTERS[b % len(_LETTERS)] for b in range(256))


def random_text(rng: random.Random, chars: int) -> str:
    """``chars`` random letters and digits (about 6 bits each, so zlib cannot shrink them away).

    A byte table, not ``rng.choices``: the bench's stand-in trainer must not spend the CPU that the
    gossip stack is measured on (choices took ~0.5 ms per 8 KB batch, 2-3 % of the CPU per delivery).
    """
    return rng.randbytes(chars).translate(_BYTE_TO_LETTER).decode("ascii")


class BatchMaker:
    """Signed rollout-batch envelopes of about ``payload_bytes`` bytes (random text, so zlib cannot shrink it away)."""

    def __init__(self, identity: Identity, payload_bytes: int, seed: int, groups: int = 1) -> None:
        self.identity = identity
        self.groups = max(1, groups)
        self.rng = random.Random(seed)
        self.model_id = f"gossip-{identity.peer_id[-6:]}"
        # Calibrate text length to the sealed size once: zlib on random letters keeps ~60 %.
        probe = self.payload(sequence=0, chars=max(256, payload_bytes))
        ratio = len(probe) / max(256, payload_bytes)
        self.chars = max(64, int(payload_bytes / ratio))

    def batch(self, sequence: int, chars: int | None = None, created_at: float | None = None) -> bytes:
        chars = (self.chars if chars is None else chars) // self.groups
        # Stay under the default cap of 8192 characters per completion by adding completions.
        count = max(COMPLETIONS_PER_GROUP, -(-chars // MAX_COMPLETION_CHARS))
        per_completion = max(1, chars // count)
        groups = [
            RolloutGroup(
                task=BENCH_TASK,
                question="bench question",
                completions=tuple(random_text(self.rng, per_completion) for _ in range(count)),
                finished=(True,) * count,
                model_id=self.model_id,
                round=sequence,
                created_at=time.time(),
            )
            for _ in range(self.groups)
        ]
        return encode_rollout_batch(
            groups,
            node_round=sequence,
            sequence=sequence,
            model_id=self.model_id,
            created_at=time.time() if created_at is None else created_at,
        )

    def payload(self, sequence: int, chars: int | None = None) -> bytes:
        return seal(self.identity, Kind.ROLLOUT_BATCH, self.batch(sequence, chars), max_message_bytes=1 << 30)


def craft_attack(
    name: str,
    maker: BatchMaker,
    last_sequence: int,
    rng: random.Random,
    max_message_bytes: int = 1_000_000,
    old_sequence: int | None = None,
) -> bytes:
    """One crafted bad message; ``last_sequence`` is the sequence number this node used last.

    The replay reuses ``old_sequence`` (default ``last_sequence``): one whose batch went out
    seconds ago. A batch reusing the number of one sent a moment before races it, and a peer that
    happens to validate the copy first keeps it and drops the genuine one as the replay (nothing
    can tell which of two batches signed with one number is the genuine one).
    """
    if name == "forged_signature":  # claims to be signed by another peer's key, which never signed it
        env = wire_pb2.Envelope.FromString(maker.payload(last_sequence + 1))
        env.signer_public_key = Identity.generate().public_key_bytes
        return env.SerializeToString()
    if name == "tampered_payload":  # validly signed, then one payload byte changed
        env = wire_pb2.Envelope.FromString(maker.payload(last_sequence + 2))
        body = bytearray(env.payload)
        body[len(body) // 2] ^= 0x01
        env.payload = bytes(body)
        return env.SerializeToString()
    if name == "oversize":  # over the message cap (peers share this node's config), under libp2p's limit
        env = wire_pb2.Envelope.FromString(maker.payload(last_sequence + 3))
        env.payload = env.payload + rng.randbytes(max_message_bytes + 10_000 - len(env.payload))
        return env.SerializeToString()
    if name == "replay":  # a fresh, validly signed batch reusing an old sequence number
        replayed = last_sequence if old_sequence is None else old_sequence
        return seal(maker.identity, Kind.ROLLOUT_BATCH, maker.batch(replayed, created_at=time.time()))
    if name == "garbage":
        return rng.randbytes(4096)
    raise ValueError(f"unknown attack {name!r}; expected one of {ATTACKS}")


class JsonLines:
    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def write(self, event: str, **fields: Any) -> None:
        self.out.write(json.dumps({"event": event, "t": time.time(), **fields}) + "\n")
        self.out.flush()


def record_received(items: list[Received], caps: WireCaps, log: JsonLines) -> None:
    """One ``recv`` event per item; its latency runs from the batch's creation to its arrival in this process."""
    for item in items:
        fields: dict[str, Any] = {"origin": item.origin, "forwarder": item.forwarder, "msg_id": item.msg_id,
                                  "kind": item.kind,
                                  "bytes": len(item.data), "received_at": item.received_at}  # fmt: skip
        try:
            env = open_envelope(item.data, caps)
            batch = decode_rollout_batch(open_payload(env, caps), caps, source=env.signer)
            fields |= {"sequence": batch.sequence, "sent_at": batch.created_at,
                       "latency_ms": 1000.0 * (item.arrived_at - batch.created_at)}  # fmt: skip
        except WireError as exc:  # the host accepted it, so this would be a pipeline gap
            fields["decode_error"] = str(exc)
        log.write("recv", **fields)


def wait_for_start_file(
    path: Path,
    client: P2PClient,
    log: JsonLines,
    should_stop: Callable[[], bool],
    timeout: float = START_WAIT_S,
) -> None:
    """Until ``path`` exists, receive and write a ``peers`` event each time the connected or mesh set changes.

    Tests start publishing on an event (every node saw its peers), not on a guessed warm-up time.
    """
    deadline = time.monotonic() + timeout
    last: tuple[list[str], list[str], dict[str, int]] | None = None
    while not path.exists():
        if should_stop() or time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout:.0f} s; not publishing")
        status = client.status()
        now = (
            sorted(p.peer_id for p in status.peers),
            sorted(p.peer_id for p in status.peers if p.in_mesh),
            status.mesh_peers,
        )
        if now != last:
            log.write("peers", connected=now[0], mesh=now[1], mesh_peers=now[2])
            last = now
        time.sleep(STOP_CHECK_S)


def start_time_from_file(path: Path) -> float:
    """The Unix time written in the start file (so that all nodes share one tick), else now."""
    try:
        return float(path.read_text().strip()[:32])
    except (OSError, ValueError):
        return time.time()


def run(args: argparse.Namespace, log: JsonLines, should_stop: Callable[[], bool]) -> None:
    overrides = dict(parse_override(item) for item in args.set)
    cfg = P2PConfig(**{"listen": args.listen, "bootstrap": args.bootstrap, **overrides})
    caps = WireCaps.from_config(cfg)
    identity = Identity.load_or_create(args.key)
    with IdentityLock(args.key):
        client = P2PClient(cfg, args.key, args.run_dir)
        client.start()
        try:
            if not client.wait_ready(timeout=60):
                raise RuntimeError(f"the p2p host did not start within 60 s; see {args.run_dir}/p2p-host.log")
            status = client.status()
            log.write("ready", peer_id=status.peer_id, listen_addrs=list(status.listen_addrs),
                      pid=os.getpid(), host_pid=client.host_pid)  # fmt: skip
            maker = BatchMaker(identity, args.payload_bytes, seed=args.seed, groups=args.groups)
            rng = random.Random(args.seed)
            start = args.start_at or time.time()
            if args.start_when is not None:
                wait_for_start_file(args.start_when, client, log, should_stop, timeout=args.start_wait)
                start = start_time_from_file(args.start_when) + args.phase
            status = client.status()  # counters at the start, so benches can take window deltas
            log.write("start", start=start, msgs_in=status.msgs_in, wire_bytes_in=status.wire_bytes_in,
                      wire_bytes_out=status.wire_bytes_out)  # fmt: skip
            end = start + args.duration
            next_send, sequence, sent, first_sequence = start, 0, 0, None
            attacks = list(ATTACKS) if args.adversary else []
            while not should_stop() and time.time() < end + args.linger:
                now = time.time()
                if args.stop_when is not None and now < end and args.stop_when.exists():
                    end = now  # stop publishing; keep receiving for the linger time
                if now >= next_send and now < end:
                    sequence = max(sequence + 1, int(now * 1000))
                    data = maker.payload(sequence)
                    ok = client.publish(Kind.ROLLOUT_BATCH, data)
                    log.write(
                        "sent", sequence=sequence, msg_id=message_id(data).hex(), bytes=len(data), queued=ok
                    )
                    sent += 1
                    first_sequence = sequence if first_sequence is None else first_sequence
                    if attacks and sent > ATTACK_AFTER_SENDS:
                        name = attacks.pop(0)
                        bad = craft_attack(name, maker, sequence, rng, cfg.max_message_bytes, first_sequence)
                        client.publish(Kind.ROLLOUT_BATCH, bad)
                        log.write("attack", name=name, msg_id=message_id(bad).hex(), bytes=len(bad))
                    next_send = max(next_send + 1.0 / args.rate, now)  # a late start does not burst
                # Wait until the next send (bounded so a stop request is seen soon): woken by the
                # first delivery, or, with --drain-every, draining at that cadence as a trainer
                # drains once per round (the host and the client's reader still take each message
                # as it comes; its latency is stamped on arrival in this process).
                wake_at = next_send if next_send < end else end + args.linger
                wait = min(
                    max(wake_at - time.time(), 0.0),
                    STOP_CHECK_S if args.drain_every <= 0 else args.drain_every,
                )
                if args.drain_every > 0:
                    time.sleep(wait)
                    items = client.drain()
                else:
                    items = client.drain(timeout=wait) if wait > 0 else client.drain()
                record_received(items, caps, log)
            status = client.status()
            log.write("status", **asdict(status))
        finally:
            client.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--key", type=Path, required=True, help="identity key file (created if missing)")
    parser.add_argument("--run-dir", type=Path, required=True, help="IPC socket and host log go here")
    parser.add_argument("--listen", action="append", default=[], help="multiaddr to listen on (repeatable)")
    parser.add_argument("--bootstrap", action="append", default=[], help="bootstrap multiaddr (repeatable)")
    parser.add_argument("--payload-bytes", type=int, default=8192, help="sealed envelope size to publish")
    parser.add_argument("--groups", type=int, default=1, help="rollout groups per batch")
    parser.add_argument("--rate", type=float, default=1.0, help="batches per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of publishing")
    parser.add_argument("--start-at", type=float, default=0.0, help="Unix time to start publishing (0 = now)")
    parser.add_argument(
        "--stop-when", type=Path, default=None, help="stop publishing once this file exists (then linger)"
    )
    parser.add_argument(
        "--start-when",
        type=Path,
        default=None,
        help="start publishing once this file exists (writes peers events)",
    )
    parser.add_argument(
        "--start-wait", type=float, default=START_WAIT_S, help="longest wait for --start-when (seconds)"
    )
    parser.add_argument(
        "--phase",
        type=float,
        default=0.0,
        help="with --start-when: seconds after the start file's time (a Unix time, else now) to start",
    )
    parser.add_argument(
        "--linger", type=float, default=3.0, help="seconds to keep receiving after the last send"
    )
    parser.add_argument(
        "--set", action="append", default=[], help="P2PConfig override KEY=VALUE (repeatable)"
    )
    parser.add_argument(
        "--drain-every",
        type=float,
        default=0.0,
        help="seconds between drains of what arrived (0: wake on each delivery)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--adversary", action="store_true", help="also publish one of each crafted bad message"
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON lines output")
    args = parser.parse_args(argv)
    if not args.listen:
        args.listen = ["/ip4/127.0.0.1/tcp/0"]

    stop = {"requested": False}

    def request_stop(signum: int, frame: object) -> None:
        stop["requested"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    with open(args.out, "a") as out:
        run(args, JsonLines(out), lambda: stop["requested"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
