"""Chaos for `swarmnode simulate`: kill -9 random honest nodes, restart them, count rounds lost.

Every ``kill_every_s`` seconds the monkey picks a running honest node at random, sends SIGKILL to
its process group (the node and its libp2p host child; each node is started in its own session,
so the group holds only this simulation's processes), and restarts it at once with the same data
directory and config, so it resumes from its latest checkpoint. With ``during_checkpoint`` it waits
(bounded) until the node is writing a checkpoint (a ``checkpoints/.tmp-*`` directory exists) and
kills it then; the nodes of such a run hold every checkpoint write open ``checkpoint_hold_s`` after
the model files are written (rl.checkpoint.HOLD_ENV), so the kill reliably lands in a half-written
checkpoint instead of racing a write of a few milliseconds. Each kill records the node's rounds done before the kill (from ``metrics.jsonl``)
and, once the restarted node has logged its start line ("rounds R->N"), the round R it resumed from:
``rounds_lost = rounds_done_before - resumed_round``. The record is written to ``chaos.json`` in
the run directory.

An experiment enables it with a ``[chaos]`` table (or ``chaos = {...}`` in one configuration):

    [chaos]
    kill_every_s = 60          # seconds between kills
    max_kills = 4              # at most this many kills per run
    during_checkpoint = false  # kill while a checkpoint is being written
    checkpoint_hold_s = 0.5    # with during_checkpoint: how long each save stays half-written
    first_kill_after_s = 30    # let the swarm form first
    min_rounds_done = 1        # only kill nodes that finished this many rounds
    seed = 0
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from swarmnode.config import ConfigError
from swarmnode.rl.checkpoint import HOLD_ENV, MAX_HOLD_S

CHAOS_FILE = "chaos.json"
CHECKPOINT_WAIT_S = 120.0  # longest wait for a checkpoint write when killing during one
CHECKPOINT_POLL_S = 0.005
KILL_WAIT_S = 10.0
# The node's start line ("... | rounds 12->30"); rich may wrap it, hence the whitespace classes.
STARTED_AT = re.compile(r"\|\s+rounds\s+(\d+)\s*->\s*\d+")


@dataclass(frozen=True)
class ChaosSpec:
    kill_every_s: float = 60.0
    max_kills: int = 4
    during_checkpoint: bool = False
    checkpoint_hold_s: float = 0.5
    first_kill_after_s: float = 30.0
    min_rounds_done: int = 1  # kill only nodes that finished this many rounds (a node that trains)
    seed: int = 0


def parse_chaos(raw: Any, source: str = "") -> ChaosSpec | None:
    """Validate a ``[chaos]`` table; None when absent or empty."""
    if raw is None or raw == {}:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"experiment {source}: 'chaos' must be a table, got {raw!r}")
    known = {f for f in ChaosSpec.__dataclass_fields__}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(
            f"experiment {source}: chaos: unknown keys {sorted(unknown)} (known: {sorted(known)})"
        )
    try:
        spec = ChaosSpec(**raw)
    except TypeError as exc:
        raise ConfigError(f"experiment {source}: chaos: {exc}") from None
    if not (isinstance(spec.kill_every_s, int | float) and spec.kill_every_s > 0):
        raise ConfigError(f"experiment {source}: chaos.kill_every_s must be > 0, got {spec.kill_every_s!r}")
    if not (isinstance(spec.checkpoint_hold_s, int | float) and 0 <= spec.checkpoint_hold_s <= MAX_HOLD_S):
        raise ConfigError(
            f"experiment {source}: chaos.checkpoint_hold_s must be between 0 and {MAX_HOLD_S}, "
            f"got {spec.checkpoint_hold_s!r}"
        )
    if not isinstance(spec.max_kills, int) or spec.max_kills < 0:
        raise ConfigError(
            f"experiment {source}: chaos.max_kills must be an integer >= 0, got {spec.max_kills!r}"
        )
    return spec


def node_environment(spec: ChaosSpec | None) -> dict[str, str]:
    """Extra environment for the nodes of a run with this chaos (the checkpoint hold), else nothing."""
    if spec is None or not spec.during_checkpoint or spec.checkpoint_hold_s <= 0:
        return {}
    return {HOLD_ENV: str(spec.checkpoint_hold_s)}


def rounds_done(metrics: Path) -> int:
    """Rounds the node has finished: one past the last round in its metrics file (0 if none)."""
    if not metrics.exists():
        return 0
    last = -1
    for line in metrics.read_text().splitlines():
        try:
            last = max(last, int(json.loads(line)["round"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by the kill
    return last + 1


def resumed_round(log: Path, offset: int) -> int | None:
    """The round a node's start line after byte `offset` of its log names; None if not started yet."""
    if not log.exists():
        return None
    with log.open("rb") as fh:
        fh.seek(offset)
        match = STARTED_AT.search(fh.read().decode("utf-8", "replace"))
    return int(match.group(1)) if match else None


@dataclass
class Kill:
    node: int
    at: float
    rounds_done_before: int
    during_checkpoint: bool
    log_offset: int
    resumed_round: int | None = None
    rounds_lost: int | None = None


@dataclass
class ChaosMonkey:
    """Kills and restarts honest nodes of one run; call `tick` from the launcher's poll loop.

    `restart(node)` must start the node again with the same config (the launcher's job); `node`
    objects need ``index``, ``data_dir`` and ``proc`` (a Popen started with start_new_session).
    """

    spec: ChaosSpec
    directory: Path
    restart: Callable[[Any], None]
    started: float = field(default_factory=time.monotonic)
    kills: list[Kill] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.spec.seed)
        self.next_kill = self.started + self.spec.first_kill_after_s

    def tick(self, nodes: list[Any]) -> None:
        """Kill and restart one node when one is due; settle what earlier restarts resumed from."""
        self.settle()
        if len(self.kills) >= self.spec.max_kills or time.monotonic() < self.next_kill:
            return
        running = [
            n
            for n in nodes
            if n.proc.poll() is None
            and rounds_done(n.data_dir / "metrics.jsonl") >= self.spec.min_rounds_done
        ]
        if not running:
            return
        node = self.rng.choice(running)
        self.next_kill = time.monotonic() + self.spec.kill_every_s
        during = self.spec.during_checkpoint and self._wait_for_checkpoint_write(node)
        if node.proc.poll() is not None:
            return  # it finished while we waited
        log = node.data_dir / "node.log"
        before = rounds_done(node.data_dir / "metrics.jsonl")
        kill_group(node.proc)
        offset = log.stat().st_size if log.exists() else 0
        self.kills.append(Kill(node.index, time.time(), before, during, offset))
        self.restart(node)
        self.write()

    def settle(self) -> None:
        """Fill in resumed_round / rounds_lost for restarts whose node has logged its resume point."""
        changed = False
        for kill in self.kills:
            if kill.resumed_round is not None:
                continue
            resumed = resumed_round(self.directory / f"node-{kill.node}" / "node.log", kill.log_offset)
            if resumed is None:
                continue
            kill.resumed_round = resumed
            kill.rounds_lost = kill.rounds_done_before - resumed
            changed = True
        if changed:
            self.write()

    def _wait_for_checkpoint_write(self, node: Any) -> bool:
        """Poll (bounded) until the node writes a checkpoint; True when caught in the act."""
        checkpoints = node.data_dir / "checkpoints"
        deadline = time.monotonic() + CHECKPOINT_WAIT_S
        while time.monotonic() < deadline and node.proc.poll() is None:
            if checkpoints.is_dir() and any(p.name.startswith(".tmp-") for p in checkpoints.iterdir()):
                return True
            time.sleep(CHECKPOINT_POLL_S)
        return False

    def summary(self) -> dict[str, Any]:
        lost = [k.rounds_lost for k in self.kills if k.rounds_lost is not None]
        return {
            "spec": asdict(self.spec),
            "kills": [asdict(k) for k in self.kills],
            "restarts": len(self.kills),
            "rounds_lost_max": max(lost) if lost else None,
            "rounds_lost_total": sum(lost),
            "unsettled": sum(1 for k in self.kills if k.rounds_lost is None),
        }

    def write(self) -> None:
        tmp = self.directory / (CHAOS_FILE + ".tmp")
        tmp.write_text(json.dumps(self.summary(), indent=1))
        os.replace(tmp, self.directory / CHAOS_FILE)


def kill_group(proc: Any) -> None:
    """SIGKILL a node and its libp2p host: the process group of a child started in its own session."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=KILL_WAIT_S)
