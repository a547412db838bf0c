"""One node of the hivemind-DHT baseline in ``scripts/bench_gossip.py --hivemind``.

Runs with the separate ``.venv-hivemind`` python (``scripts/setup_hivemind.sh``); it does not import
swarmnode. It shares payloads the way the existing SAPO deployment does: every round each node
stores its payload in the hivemind DHT under a per-round key (its own subkey), and every node polls
``get(round_key, latest=True)`` once per ``--poll`` seconds (1 s, the deployment's period) until it
has seen every other node's entry for that round (or the round is too old). Events go to ``--out``
as JSON lines, like ``swarmnode.p2p.gossip_node``:

- ``ready``: pid, the DHT's process pid and the visible maddrs (node 0 also writes them to
  ``--maddrs-out`` for the others to bootstrap from);
- ``sent``: one per round when its store is issued (msg_id, round, bytes, publish time);
- ``stored``: when that store returns (ok, its duration, error text);
- ``recv``: the first time a poll sees another node's entry (msg_id, latency_ms = seen - publish);
- ``error``: a get that raised, or the DHT process dying (the text); ``status`` at the end (counters).

Values carry a small header (publish time, sender, round) followed by random bytes up to
``--payload-bytes``. Everything read from the DHT is bounded and type-checked.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

HEADER = struct.Struct(">dII")  # publish time, sender index, round
MAX_OPEN_ROUNDS = 12  # rounds older than this many seconds are no longer polled
GET_TIMEOUT_S = 10.0  # a get still pending after this long is given up (counted)
MAX_SUBKEYS = 4096  # bound on entries read from one key


class Events:
    def __init__(self, path: Path) -> None:
        self.out = path.open("a", buffering=1)
        self.lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> None:
        with self.lock:
            self.out.write(json.dumps({"event": event, "t": time.time(), **fields}) + "\n")


class Watchdog(threading.Thread):
    """Notices the DHT process dying, and ends this node when the main loop cannot.

    When stock hivemind's DHT process dies (it does on large values: the pipe from this process is
    read non-blocking and a message over the pipe buffer raises BlockingIOError there), the next
    ``dht.store``/``dht.get`` blocks for ever writing into the full pipe. The watchdog writes the
    error and a final ``status`` (``main_blocked``) and exits the process, so the bench never waits
    on a hung node beyond ``deadline``."""

    def __init__(self, dht: Any, events: Events, counters: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.dht, self.events, self.counters = dht, events, counters
        self.dead = threading.Event()
        self.finished = threading.Event()
        self.deadline = float("inf")

    def run(self) -> None:
        died_at = None
        while not self.finished.wait(0.25):
            if died_at is None and not self.dht.is_alive():
                died_at = time.monotonic()
                self.events.write(
                    "error", where="dht", error=f"DHT process exited (code {self.dht.exitcode})"
                )
                self.dead.set()
            if (died_at is not None and time.monotonic() - died_at > 3.0) or time.time() > self.deadline:
                if self.finished.is_set():
                    return
                self.events.write(
                    "status", **dict(self.counters), dht_died=died_at is not None, main_blocked=True
                )
                os._exit(3)


def entries(result: Any) -> list[tuple[Any, Any]]:
    """(subkey, value) pairs of a dictionary DHT value, bounded; [] for anything else."""
    if result is None:
        return []
    value = getattr(result, "value", None)
    if not isinstance(value, dict) and not hasattr(value, "items"):  # dict, or DictionaryDHTValue
        return []
    items = list(value.items())
    pairs = []
    for subkey, item in items[:MAX_SUBKEYS]:
        pairs.append((subkey, getattr(item, "value", item)))
    return pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--payload-bytes", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True, help="rounds (seconds) of publishing")
    parser.add_argument("--phase", type=float, default=0.0, help="seconds after each round tick to publish")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between gets (deployment: 1 s)")
    parser.add_argument("--linger", type=float, default=5.0, help="seconds of polling after the last round")
    parser.add_argument("--tag", default="bench", help="key prefix, unique per run")
    parser.add_argument("--initial-peer", action="append", default=[], help="bootstrap maddr (repeatable)")
    parser.add_argument("--maddrs-out", type=Path, help="write this node's visible maddrs here (JSON)")
    parser.add_argument("--start-when", type=Path, required=True, help="file holding the common start time")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--ttl", type=float, default=60.0, help="expiration of stored values, seconds")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import hivemind  # the hivemind venv only
    from hivemind.utils.timed_storage import get_dht_time

    events = Events(args.out)
    dht = hivemind.DHT(
        initial_peers=args.initial_peer or None,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        start=True,
    )
    maddrs = [str(m) for m in dht.get_visible_maddrs()]
    if args.maddrs_out is not None:
        tmp = args.maddrs_out.with_suffix(".tmp")
        tmp.write_text(json.dumps(maddrs))
        tmp.rename(args.maddrs_out)
    events.write("ready", pid=os.getpid(), dht_pid=dht.pid, maddrs=maddrs, hivemind=hivemind.__version__)
    counters = {"stores_ok": 0, "stores_failed": 0, "store_errors": 0, "gets": 0, "get_errors": 0,
                "gets_timed_out": 0, "entries_read": 0, "bad_entries": 0}  # fmt: skip
    watchdog = Watchdog(dht, events, counters)
    watchdog.start()

    began = time.monotonic()
    start_at = None
    while start_at is None:
        try:
            start_at = float(args.start_when.read_text())
        except (FileNotFoundError, ValueError):  # not written yet, or caught mid-write
            if time.monotonic() - began > args.start_timeout:
                events.write("error", where="start", error="no start time within the timeout")
                dht.shutdown()
                return 1
            time.sleep(0.1)

    rounds = int(args.duration)
    others = args.nodes - 1
    filler = os.urandom(max(0, args.payload_bytes - HEADER.size))
    seen: dict[int, set[int]] = {}  # round -> sender indices already seen
    pending_stores: list[tuple[int, float, Any]] = []
    pending_gets: dict[int, tuple[float, Any]] = {}  # round -> (issued at, future)
    next_round = 0
    next_poll = start_at + args.phase
    end_at = start_at + rounds + args.linger
    watchdog.deadline = end_at + 30.0
    dht_died = False
    while True:
        if watchdog.dead.is_set():  # stock hivemind's DHT process can die on large values: recorded
            dht_died = True
            break
        now = time.time()
        if now >= end_at and not pending_stores:
            break
        if now > end_at + 20.0:  # bound the wait for hung stores
            events.write("error", where="store", error=f"{len(pending_stores)} stores still pending at exit")
            break
        # publish: round k at start + k + phase
        if next_round < rounds and now >= start_at + next_round + args.phase:
            published = time.time()
            value = HEADER.pack(published, args.index, next_round) + filler
            future = dht.store(f"{args.tag}-round-{next_round}", subkey=args.index, value=value,
                               expiration_time=get_dht_time() + args.ttl, return_future=True)  # fmt: skip
            pending_stores.append((next_round, published, future))
            events.write("sent", msg_id=f"{args.index}:{next_round}", round=next_round, bytes=len(value),
                         published=published)  # fmt: skip
            next_round += 1
        # poll: every open round without a get in flight, once per period
        if now >= next_poll and now < end_at:
            current = int(now - start_at)
            for k in range(max(0, current - MAX_OPEN_ROUNDS), min(current, rounds - 1) + 1):
                if len(seen.get(k, ())) >= others or k in pending_gets:
                    continue
                pending_gets[k] = (now, dht.get(f"{args.tag}-round-{k}", latest=True, return_future=True))
                counters["gets"] += 1
            while next_poll <= now:
                next_poll += args.poll
        # completed stores
        still = []
        for k, published, future in pending_stores:
            if not future.done():
                still.append((k, published, future))
                continue
            error = None
            try:
                ok = bool(future.result())
            except Exception as exc:  # noqa: BLE001 - recorded, not hidden
                ok, error = False, f"{type(exc).__name__}: {exc}"[:500]
                counters["store_errors"] += 1
            counters["stores_ok" if ok else "stores_failed"] += 1
            events.write("stored", msg_id=f"{args.index}:{k}", ok=ok,
                         store_ms=round(1000.0 * (time.time() - published), 2), error=error)  # fmt: skip
        pending_stores = still
        # completed gets
        for k in list(pending_gets):
            issued, future = pending_gets[k]
            if not future.done():
                if time.time() - issued > GET_TIMEOUT_S:
                    future.cancel()
                    del pending_gets[k]
                    counters["gets_timed_out"] += 1
                continue
            del pending_gets[k]
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - recorded, not hidden
                counters["get_errors"] += 1
                events.write("error", where="get", round=k, error=f"{type(exc).__name__}: {exc}"[:500])
                continue
            drained = time.time()
            for subkey, value in entries(result):
                counters["entries_read"] += 1
                if not isinstance(value, bytes) or len(value) < HEADER.size or len(value) > 1 << 24:
                    counters["bad_entries"] += 1
                    continue
                published, sender, rnd = HEADER.unpack_from(value)
                if sender == args.index or rnd != k or sender != subkey or not 0 <= sender < args.nodes:
                    continue
                got = seen.setdefault(k, set())
                if sender in got:
                    continue
                got.add(sender)
                events.write("recv", msg_id=f"{sender}:{k}", latency_ms=1000.0 * (drained - published),
                             bytes=len(value))  # fmt: skip
        time.sleep(0.005)
    watchdog.finished.set()
    counters["stores_pending_at_exit"] = len(pending_stores)
    counters["rounds_published"] = next_round
    events.write("status", **counters, dht_died=dht_died,
                 rounds_complete=sum(1 for s in seen.values() if len(s) >= others))  # fmt: skip
    dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
