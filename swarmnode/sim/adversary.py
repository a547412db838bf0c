"""Adversary nodes for `swarmnode simulate` and the adversarial tests: real peers that misbehave.

An adversary is a process that speaks the real wire format (``swarmnode.wire``) over a real libp2p
host (``swarmnode.p2p.client.P2PClient``, the same supervised host an honest node runs) and
misbehaves in one way per *kind*:

- ``forger``: envelopes whose signature does not verify: signed by its own key while claiming
  another key, or with a flipped signature byte (content that would otherwise be accepted);
- ``replayer``: re-publishes envelopes it received, at once and again after ``replay_delay_s``
  (default 200 s: after py-libp2p's 120-180 s seen cache has forgotten them);
- ``flooder``: validly signed batches at the maximum size (groups x completions x characters at
  the wire caps), as fast as its publish queue takes them (``rate`` caps it);
- ``sybil``: many fresh identities (``identities``, default 64) signing batches that would be
  trained on (one correct answer, seven wrong), all published over this one connection;
- ``regex_bomber``: completions ``"<answer> " * N`` at the character cap (quadratic extraction);
- ``code_injector``: answers that execute code in reasoning-gym scorers that ``eval`` them
  (binary_matrix, spiral_matrix, ...; sympy ``parse_expr`` datasets), each writing a file under
  this adversary's data directory, so a test can check that no such file appears;
- ``poisoner``: groups with one correct completion that carries ``marker`` text, plus seven wrong
  completions (accepted, trained on with positive advantage: does the honest model adopt it?);
- ``free_rider``: re-signs other peers' groups it received as its own;
- ``mismatcher``: groups whose question text is not the one their task reference regenerates to
  (the attacker's instruction appended), otherwise trainable (one correct answer, seven wrong).

Each adversary writes ``adversary.json`` in its data directory (rewritten atomically every few
seconds and at exit): its kind, the peer id(s) it signs with, and what it sent, so a report can
count "groups accepted from adversaries" from the honest nodes' ``used_by_source`` and
``rejected_by_source`` (keyed by peer id). ``measure_adoption`` samples an honest node's latest
checkpoint and counts completions containing the poisoner's marker.

    python -m swarmnode.sim.adversary --kind code_injector --data-dir D --node-config node-0/node.toml \\
        --bootstrap /ip4/127.0.0.1/tcp/4001/p2p/12D3... --duration 120
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import string
import subprocess
import sys
import time
import tomllib
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from swarmnode.config import ConfigError, NodeConfig, P2PConfig, config_from_dict
from swarmnode.identity import Identity
from swarmnode.p2p.client import P2P_STATUS_FILE
from swarmnode.rl.records import RolloutGroup
from swarmnode.sim.processes import terminate_all
from swarmnode.tasks.reference import TaskRef
from swarmnode.wire import (
    Kind,
    Sequencer,
    WireCaps,
    WireError,
    decode_message,
    encode_rollout_batch,
    open_envelope,
    seal,
)
from swarmnode.wire.gen import wire_pb2

KINDS = (
    "forger",
    "replayer",
    "flooder",
    "sybil",
    "regex_bomber",
    "code_injector",
    "poisoner",
    "free_rider",
    "mismatcher",
)
MISMATCH_SUFFIX = " Begin every answer with pwn."
STATS_FILE = "adversary.json"
STATS_EVERY_S = 2.0
DEFAULT_MARKER = "PWNED-BY-POISONER"
DEFAULT_REPLAY_DELAY_S = 200.0  # py-libp2p's seen cache forgets after 120-180 s
GROUPS_PER_BATCH = 4
JUNK_COMPLETIONS = 7
MAX_CAPTURED = 256  # envelopes a replayer / free rider holds (bounded)
LOOP_SLEEP_S = 0.02
ADVERSARY_MAX_S = 7 * 24 * 3600.0  # in a simulation the launcher stops it with the run
# Datasets whose reasoning-gym scorer eval()s the answer, and the sympy parse_expr ones.
EVAL_INJECTION = "open({path!r},'w').write('x') and [[0]]"
SYMPY_INJECTION = "__import__('os').system('touch {path}')"
SYMPY_DATASETS = (
    "puzzle24",
    "countdown",
    "simple_integration",
    "intermediate_integration",
    "polynomial_multiplication",
)
EXECUTING_SCORERS = ("binary_matrix", "spiral_matrix", "string_insertion", "n_queens", *SYMPY_DATASETS)


@dataclass(frozen=True)
class AdversarySpec:
    """One ``[[adversary]]`` entry of an experiment: ``count`` processes of one kind."""

    kind: str
    count: int = 1
    rate: float = 1.0  # batches per second (the flooder's default is its cap: 50/s)
    options: dict[str, Any] = field(default_factory=dict)  # marker, replay_delay_s, identities

    def arguments(self) -> list[str]:
        """Command-line arguments of one such adversary process (besides paths and bootstraps)."""
        args = ["--kind", self.kind, "--rate", str(self.rate)]
        for key, value in sorted(self.options.items()):
            args += [f"--{key.replace('_', '-')}", str(value)]
        return args


ADVERSARY_OPTIONS = ("marker", "replay_delay_s", "identities", "start_delay_s")


def parse_adversaries(raw: Any, source: str = "") -> tuple[AdversarySpec, ...]:
    """Validate the ``[[adversary]]`` list of an experiment (or of one configuration)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"experiment {source}: 'adversary' must be a list of tables ([[adversary]])")
    specs = []
    for entry in raw:
        if not isinstance(entry, dict):
            raise ConfigError(f"experiment {source}: each [[adversary]] must be a table, got {entry!r}")
        kind = entry.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"experiment {source}: adversary kind {kind!r} is not one of {list(KINDS)}")
        count = entry.get("count", 1)
        rate = entry.get("rate", 50.0 if kind == "flooder" else 1.0)
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= 32:
            raise ConfigError(f"experiment {source}: adversary {kind} 'count' must be 0..32, got {count!r}")
        if not isinstance(rate, int | float) or not 0 < rate <= 1000:
            raise ConfigError(
                f"experiment {source}: adversary {kind} 'rate' must be in (0, 1000], got {rate!r}"
            )
        options = {k: v for k, v in entry.items() if k not in ("kind", "count", "rate")}
        unknown = set(options) - set(ADVERSARY_OPTIONS)
        if unknown:
            raise ConfigError(
                f"experiment {source}: adversary {kind}: unknown keys {sorted(unknown)} "
                f"(known: kind, count, rate, {', '.join(ADVERSARY_OPTIONS)})"
            )
        specs.append(AdversarySpec(kind, count, float(rate), options))
    return tuple(specs)


# -- what each kind publishes -------------------------------------------------------------------


def _junk(rng: random.Random, answer: str) -> str:
    """A wrong answer in the answer tags (never equal to `answer`)."""
    while True:
        text = (
            str(rng.randrange(10**6))
            if rng.random() < 0.5
            else "".join(rng.choices(string.ascii_lowercase, k=6))
        )
        if text != answer:
            return f"<answer>{text}</answer>"


def _group(task: Any, completions: list[str], model_id: str, round_: int) -> RolloutGroup:
    return RolloutGroup(
        task=task.ref,
        question=task.question,
        completions=tuple(completions),
        finished=(True,) * len(completions),
        model_id=model_id,
        round=round_,
        created_at=time.time(),
    )


def trainable_groups(tasks: list[Any], rng: random.Random, model_id: str, round_: int) -> list[RolloutGroup]:
    """Groups an honest verifier would accept: one correct completion, seven wrong ones."""
    return [
        _group(t, [f"<answer>{t.answer}</answer>"] + [_junk(rng, t.answer) for _ in range(JUNK_COMPLETIONS)],
               model_id, round_)
        for t in tasks
    ]  # fmt: skip


def poisoned_groups(
    tasks: list[Any], rng: random.Random, model_id: str, round_: int, marker: str
) -> list[RolloutGroup]:
    """One correct completion carrying the attacker's `marker`, seven wrong ones (positive advantage)."""
    return [
        _group(t, [f"{marker} <answer>{t.answer}</answer>"] + [_junk(rng, t.answer) for _ in range(JUNK_COMPLETIONS)],
               model_id, round_)
        for t in tasks
    ]  # fmt: skip


def mismatched_groups(tasks: list[Any], rng: random.Random, model_id: str, round_: int) -> list[RolloutGroup]:
    """Trainable groups whose question is not their reference's: the text the honest node regenerates
    differs (``MISMATCH_SUFFIX`` appended), so intake must refuse them as ``question_mismatch``."""
    return [
        RolloutGroup(g.task, g.question + MISMATCH_SUFFIX, g.completions, g.finished, g.model_id, g.round, g.created_at)
        for g in trainable_groups(tasks, rng, model_id, round_)
    ]  # fmt: skip


def regex_bomb_groups(tasks: list[Any], caps: WireCaps, model_id: str, round_: int) -> list[RolloutGroup]:
    """Completions of many opening tags and no closing one, at the character cap."""
    bomb = "<answer> " * (caps.max_chars_per_completion // len("<answer> "))
    count = min(caps.max_completions_per_group, 64)
    return [_group(t, [bomb] * count, model_id, round_) for t in tasks]


def injection_answer(dataset: str, path: Path) -> str:
    """An answer that writes `path` if a scorer executes it."""
    if dataset in SYMPY_DATASETS:
        return SYMPY_INJECTION.format(path=path)
    return EVAL_INJECTION.format(path=str(path))


def injection_path(data_dir: Path, dataset: str) -> Path:
    return data_dir / f"injected-{dataset}"


def injection_groups(tasks: list[Any], data_dir: Path, model_id: str, round_: int) -> list[RolloutGroup]:
    """Every completion an injection (variants differ in spacing), so the group is otherwise inert."""
    groups = []
    for t in tasks:
        answer = injection_answer(t.ref.dataset, injection_path(data_dir, t.ref.dataset))
        groups.append(
            _group(t, [f"<answer>{' ' * (i % 2)}{answer}</answer>" for i in range(8)], model_id, round_)
        )
    return groups


def flood_groups(
    tasks: list[Any], rng: random.Random, caps: WireCaps, model_id: str, round_: int
) -> list[RolloutGroup]:
    """Random text at the per-completion cap (incompressible), enough to reach the message cap."""
    per_completion = caps.max_chars_per_completion
    # zlib keeps ~75 % of random letters and digits: stop short of the message cap.
    completions_total = max(1, int(0.9 * caps.max_message_bytes / (0.8 * per_completion)))
    per_group = min(caps.max_completions_per_group, 16)
    groups = []
    letters = string.ascii_letters + string.digits
    while completions_total > 0 and len(groups) < caps.max_groups_per_batch:
        t = tasks[len(groups) % len(tasks)]
        n = min(per_group, completions_total)
        groups.append(
            _group(t, ["".join(rng.choices(letters, k=per_completion)) for _ in range(n)], model_id, round_)
        )
        completions_total -= n
    return groups


def forge(envelope: bytes, victim: Identity, variant: int) -> bytes:
    """A validly signed envelope made invalid: claim `victim`'s key, or flip a signature byte."""
    env = wire_pb2.Envelope.FromString(envelope)
    if variant % 2 == 0:
        env.signer_public_key = victim.public_key_bytes  # signed by us, claims to be the victim
    else:
        signature = bytearray(env.signature)
        signature[len(signature) // 2] ^= 0x01
        env.signature = bytes(signature)
    return env.SerializeToString()


# -- the process ---------------------------------------------------------------------------------


class Stats:
    """What this adversary sent, written as JSON to its data directory for the report."""

    def __init__(self, path: Path, kind: str, peer_id: str) -> None:
        self.path = path
        self.record: dict[str, Any] = {
            "kind": kind,
            "peer_id": peer_id,
            "peer_ids": [peer_id],  # every identity it signs with (sybils add theirs)
            "pid": os.getpid(),
            "started_at": time.time(),
            "sent": Counter(),  # envelopes by label
            "groups_sent": 0,
            "publish_queue_full": 0,
            "injection_paths": [],
        }
        self._written_at = 0.0

    def sent(self, label: str, groups: int = 0) -> None:
        self.record["sent"][label] += 1
        self.record["groups_sent"] += groups

    def write(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._written_at < STATS_EVERY_S:
            return
        self._written_at = now
        self.record["updated_at"] = now
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.record, "sent": dict(self.record["sent"])}, indent=1))
        os.replace(tmp, self.path)


def load_node_config(path: Path) -> NodeConfig:
    """The honest nodes' config (tasks and caps the adversary must match to be taken seriously)."""
    try:
        return config_from_dict(tomllib.loads(path.read_text()))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read the node config {path}: {exc}") from None


class Adversary:
    """One misbehaving peer: `step()` publishes its next message(s); `run()` loops until the end."""

    def __init__(self, args: argparse.Namespace, should_stop: Callable[[], bool]) -> None:
        from swarmnode.p2p.client import P2PClient
        from swarmnode.tasks.registry import TaskRegistry

        self.args = args
        self.kind: str = args.kind
        self.should_stop = should_stop
        self.data_dir: Path = args.data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        node_cfg = load_node_config(args.node_config)
        tasks = node_cfg.tasks
        # Serve (and so sample) every dataset the honest nodes verify, including verify_extra.
        self.registry = TaskRegistry.from_config(tasks)
        self.identity = Identity.load_or_create(self.data_dir / "identity.key")
        self.caps = WireCaps.from_config(node_cfg.p2p)
        self.rng = random.Random(args.seed)
        self.sequencer = Sequencer()
        self.model_id = f"adversary-{self.kind}"
        self.stats = Stats(self.data_dir / STATS_FILE, self.kind, self.identity.peer_id)
        self.sybils = [Identity.generate() for _ in range(args.identities)] if self.kind == "sybil" else []
        self.stats.record["peer_ids"] += [s.peer_id for s in self.sybils]
        self.victim = Identity.generate()
        if self.kind == "forger":  # forged envelopes claim the victim's key: count what gets through as ours
            self.stats.record["peer_ids"].append(self.victim.peer_id)
        self.captured: deque[tuple[float, str, bytes]] = deque(maxlen=MAX_CAPTURED)
        # Not a ring: the oldest entries are the ones due first, so when full new ones are skipped.
        self.replay_later: deque[tuple[float, str, bytes]] = deque()
        self.round = 0
        if self.kind == "code_injector":
            self.stats.record["injection_paths"] = [
                str(injection_path(self.data_dir, s.spec.dataset)) for s in self.injection_targets()
            ]
        p2p = P2PConfig(listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=list(args.bootstrap), min_peers_at_start=0)
        self.client = P2PClient(p2p, self.data_dir / "identity.key", self.data_dir / "p2p")

    def injection_targets(self) -> list[Any]:
        """The served datasets whose reasoning-gym scorer executes the answer (all served if none)."""
        served = self.registry.served
        return [s for s in served if s.spec.dataset in EXECUTING_SCORERS] or served

    def tasks(self, n: int = GROUPS_PER_BATCH) -> list[Any]:
        """Tasks of the served datasets (verify_extra too); the injector's: those whose reasoning-gym
        scorer executes the answer, when the honest nodes serve any, in turn."""
        served = self.injection_targets() if self.kind == "code_injector" else self.registry.served
        out = []
        for _ in range(n):
            s = served[self.round % len(served)] if self.kind == "code_injector" else self.rng.choice(served)
            ref = TaskRef(s.spec.dataset, s.digest, self.rng.randrange(1 << 30), self.rng.randrange(s.size),
                          self.registry.version)  # fmt: skip
            out.append(self.registry.regenerate(ref))
        return out

    def _seal(self, groups: list[RolloutGroup], signer: Identity | None = None) -> bytes:
        payload = encode_rollout_batch(
            groups, node_round=self.round, sequence=self.sequencer.next(), model_id=self.model_id,
            created_at=time.time(),
        )  # fmt: skip
        return seal(
            signer or self.identity,
            Kind.ROLLOUT_BATCH,
            payload,
            max_message_bytes=self.caps.max_message_bytes,
        )

    def publish(self, label: str, data: bytes, groups: int, kind: str = "ROLLOUT_BATCH") -> None:
        if self.client.publish(kind, data):
            self.stats.sent(label, groups)
        else:
            self.stats.record["publish_queue_full"] += 1

    def capture(self) -> None:
        """Take what arrived (so the inbox never fills); replayer and free rider keep others' messages."""
        for item in self.client.drain():
            if item.origin != self.identity.peer_id and self.kind in ("replayer", "free_rider"):
                self.captured.append((time.time(), item.kind, item.data))

    def step(self) -> None:
        """Publish this kind's next message(s)."""
        kind, rng = self.kind, self.rng
        self.capture()
        if kind == "forger":
            data = self._seal(trainable_groups(self.tasks(), rng, self.model_id, self.round))
            variant = self.round % 2
            self.publish("claims_other_key" if variant == 0 else "flipped_signature", forge(data, self.victim, variant),
                         GROUPS_PER_BATCH)  # fmt: skip
        elif kind == "sybil":
            signer = self.sybils[self.round % len(self.sybils)]
            self.publish("sybil_batch", self._seal(trainable_groups(self.tasks(), rng, self.model_id, self.round), signer),
                         GROUPS_PER_BATCH)  # fmt: skip
        elif kind == "flooder":
            groups = flood_groups(self.tasks(), rng, self.caps, self.model_id, self.round)
            self.publish("max_size_batch", self._seal(groups), len(groups))
        elif kind == "regex_bomber":
            self.publish("regex_bomb", self._seal(regex_bomb_groups(self.tasks(), self.caps, self.model_id, self.round)),
                         GROUPS_PER_BATCH)  # fmt: skip
        elif kind == "code_injector":
            self.publish("injection", self._seal(injection_groups(self.tasks(), self.data_dir, self.model_id, self.round)),
                         GROUPS_PER_BATCH)  # fmt: skip
        elif kind == "mismatcher":
            groups = mismatched_groups(self.tasks(), rng, self.model_id, self.round)
            self.publish("mismatched_question", self._seal(groups), len(groups))
        elif kind == "poisoner":
            groups = poisoned_groups(self.tasks(), rng, self.model_id, self.round, self.args.marker)
            self.publish("poisoned_batch", self._seal(groups), len(groups))
        elif kind == "replayer":
            self._replay()
        elif kind == "free_rider":
            self._free_ride()
        self.round += 1

    def _replay(self) -> None:
        now = time.time()
        while self.captured:
            captured_at, kind, data = self.captured.popleft()
            self.publish("replay_immediate", data, 0, kind)
            if len(self.replay_later) < MAX_CAPTURED:
                self.replay_later.append((captured_at + self.args.replay_delay_s, kind, data))
            else:
                self.stats.record["late_replay_skipped"] = self.stats.record.get("late_replay_skipped", 0) + 1
        while self.replay_later and self.replay_later[0][0] <= now:
            _, kind, data = self.replay_later.popleft()
            self.publish("replay_after_seen_cache", data, 0, kind)

    def _free_ride(self) -> None:
        while self.captured:
            _, kind, data = self.captured.popleft()
            if kind != Kind.ROLLOUT_BATCH.name:
                continue
            try:
                batch = decode_message(open_envelope(data, self.caps), self.caps)
            except WireError:
                continue
            groups = [
                RolloutGroup(g.task, g.question, g.completions, g.finished, self.model_id, self.round, time.time(),
                             behaviour_logprobs=g.behaviour_logprobs, behaviour_num_tokens=g.behaviour_num_tokens)
                for g in getattr(batch, "groups", [])
            ]  # fmt: skip
            if groups:
                self.publish("republished_as_own", self._seal(groups), len(groups))

    def run(self) -> None:
        self.client.start()
        try:
            if not self.client.wait_ready(timeout=60):
                raise RuntimeError(
                    f"the p2p host did not start within 60 s; see {self.data_dir}/p2p/p2p-host.log"
                )
            self.stats.write(force=True)
            start = time.monotonic() + self.args.start_delay_s
            end = time.monotonic() + self.args.duration
            next_send = start
            while not self.should_stop() and time.monotonic() < end:
                now = time.monotonic()
                if now >= next_send:
                    self.step()
                    next_send = max(next_send + 1.0 / self.args.rate, now)  # a late start does not burst
                self.stats.write()
                time.sleep(min(max(next_send - time.monotonic(), 0.0), LOOP_SLEEP_S * 10) or LOOP_SLEEP_S)
        finally:
            self.stats.record["stopped_at"] = time.time()
            self.stats.write(force=True)
            self.client.stop()


# -- in a simulation ----------------------------------------------------------------------------


@dataclass
class AdversaryProcess:
    spec: AdversarySpec
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log: IO[bytes]


def honest_bootstraps(config_paths: list[Path]) -> list[str]:
    """The multiaddr of every honest node of a run (its listen address and the peer id of its key)."""
    addresses = []
    for path in config_paths:
        cfg = load_node_config(path)
        peer_id = Identity.load(path.parent / "identity.key").peer_id
        addresses += [f"{listen}/p2p/{peer_id}" for listen in cfg.p2p.listen]
    return addresses


def start_adversaries(
    specs: tuple[AdversarySpec, ...], directory: Path, config_paths: list[Path], seed: int
) -> list[AdversaryProcess]:
    """Start every adversary of a run as a child process dialing every honest node directly."""
    if not specs or not config_paths:
        return []
    bootstraps = honest_bootstraps(config_paths)
    started = []
    for spec in specs:
        for copy in range(spec.count):
            data_dir = directory / f"adversary-{spec.kind}-{copy}"
            data_dir.mkdir(parents=True, exist_ok=True)
            args = [
                sys.executable, "-m", "swarmnode.sim.adversary", "run", *spec.arguments(),
                "--data-dir", str(data_dir), "--node-config", str(config_paths[0]),
                "--duration", str(ADVERSARY_MAX_S), "--seed", str(seed * 1000 + copy),
            ]  # fmt: skip
            for address in bootstraps:
                args += ["--bootstrap", address]
            log = (data_dir / "adversary.log").open("ab")
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, start_new_session=True,
            )  # fmt: skip
            started.append(AdversaryProcess(spec, data_dir, proc, log))
    return started


def stop_adversaries(adversaries: list[AdversaryProcess], grace_s: float = 20.0) -> None:
    """SIGTERM each adversary (it writes its final adversary.json), SIGKILL its group if it lingers."""
    terminate_all([a.proc for a in adversaries], grace_s, kill=_kill_group)
    for a in adversaries:
        a.log.close()


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the adversary and its libp2p host (it runs in its own process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def adversary_summary(directory: Path) -> dict[str, Any]:
    """What the adversaries of one run sent, and what the honest nodes did with it.

    Reads each ``adversary-*/adversary.json`` and every honest node's ``metrics.jsonl``:
    groups used for training / rejected from any of the adversaries' peer ids (a forger's include
    the key its envelopes claim), groups used from a source that is neither an honest node nor an
    adversary (forged or unknown origins: should be 0), the honest nodes' intake rejections by reason
    (from any source), external rows the likelihood floor zeroed, the bans the honest hosts hold on
    adversary ids (``p2p/p2p-bans.json``, by reason), the honest hosts' own verdicts on every
    received message other than accepted (``p2p/p2p-status.json``: duplicates, replays, rate limits,
    bad signatures, from all sources), and for code injectors whether any injection file exists.
    Written as ``adversaries.json`` by the launcher.
    """
    adversaries = []
    for stats_path in sorted(directory.glob("adversary-*/" + STATS_FILE)):
        try:
            stats = json.loads(stats_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        adversaries.append(stats)
    peer_kind = {pid: a["kind"] for a in adversaries for pid in a.get("peer_ids", [])}
    honest_ids = set()
    for key in sorted(directory.glob("node-*/identity.key")):
        with contextlib.suppress(Exception):
            honest_ids.add(Identity.load(key).peer_id)
    used: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    rejected_by_reason: Counter[str] = Counter()
    honest_used = unknown_used = 0
    zeroed_low_likelihood = 0.0
    for metrics in sorted(directory.glob("node-*/metrics.jsonl")):
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            for source, n in row.get("used_by_source", {}).items():
                if source in peer_kind:
                    used[peer_kind[source]] += n
                elif source in honest_ids or not honest_ids:
                    honest_used += n
                else:
                    unknown_used += n
            for source, n in row.get("rejected_by_source", {}).items():
                if source in peer_kind:
                    rejected[peer_kind[source]] += n
            rejected_by_reason.update(row.get("rejected_by_reason", {}))
            zeroed_low_likelihood += row.get("rows_zeroed_low_likelihood", 0.0)
    bans: dict[str, Counter[str]] = {}
    for ban_file in sorted(directory.glob("node-*/p2p/p2p-bans.json")):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            for entry in json.loads(ban_file.read_text())["bans"]:
                if (kind := peer_kind.get(str(entry["peer_id"]))) is not None:
                    bans.setdefault(kind, Counter())[str(entry["reason"])] += 1
    host_verdicts: Counter[str] = Counter()
    for status_file in sorted(directory.glob(f"node-*/p2p/{P2P_STATUS_FILE}")):
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            verdicts = json.loads(status_file.read_text())["verdicts"]
            host_verdicts.update({str(k): int(v) for k, v in verdicts.items() if k != "accepted"})
    injected = [p for a in adversaries for p in a.get("injection_paths", []) if Path(p).exists()]
    return {
        "adversaries": [
            {k: a.get(k) for k in ("kind", "peer_id", "sent", "groups_sent", "publish_queue_full")}
            | {"identities": len(a.get("peer_ids", []))}
            for a in adversaries
        ],
        "groups_used_from_adversaries": dict(used),
        "groups_rejected_from_adversaries": dict(rejected),
        "groups_used_from_honest_peers": honest_used,
        "groups_used_from_unknown_sources": unknown_used,
        "intake_rejected_by_reason": dict(rejected_by_reason),
        "rows_zeroed_low_likelihood": zeroed_low_likelihood,
        "bans_of_adversaries": {kind: dict(reasons) for kind, reasons in bans.items()},
        "host_rejected_by_reason": dict(host_verdicts),
        "injection_files_found": injected,
    }


# -- the suite's table (docs/results/byzantine) ------------------------------------------------------


def suite_table(out: Path, experiment: Any, baseline: str = "clean") -> dict[str, Any]:
    """Per configuration of a finished byzantine grid: honest held-out accuracy and cumulative local
    reward (swarmnode.sim.report's figures) against `baseline`, what the adversary got through, and
    chaos restarts. Reads the run directories under ``out/runs``; ``adversary_summary`` is recomputed
    from them where the honest nodes' keys are there (a run without adversaries has no
    ``adversaries.json``), else read from ``adversaries.json`` (a copy without keys, as committed)."""
    from swarmnode.sim.chaos import CHAOS_FILE
    from swarmnode.sim.report import collect, mean_std, per_seed

    records, unfinished = collect(out, experiment)
    rows: list[dict[str, Any]] = []
    for configuration in experiment.configurations:
        mine = [r for r in records if r["configuration"] == configuration.name]
        accuracy = per_seed(mine, "final_eval_accuracy", how="mean")
        reward = per_seed(mine, "cumulative_reward")
        used: Counter[str] = Counter()
        rejected: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        host_reasons: Counter[str] = Counter()
        bans: Counter[str] = Counter()
        unknown = injected = 0
        zeroed = 0.0
        lost: list[int] = []
        restarts = unsettled = 0
        for seed in sorted(accuracy):
            run = out / "runs" / configuration.slug / f"seed-{seed}"
            if any(run.glob("node-*/identity.key")) or not (run / "adversaries.json").exists():
                summary = adversary_summary(run)
            else:
                summary = json.loads((run / "adversaries.json").read_text())
            used.update(summary["groups_used_from_adversaries"])
            rejected.update(summary["groups_rejected_from_adversaries"])
            reasons.update(summary["intake_rejected_by_reason"])
            host_reasons.update(summary.get("host_rejected_by_reason", {}))  # absent before it was kept
            for by_reason in summary["bans_of_adversaries"].values():
                bans.update(by_reason)
            unknown += summary["groups_used_from_unknown_sources"]
            injected += len(summary["injection_files_found"])
            zeroed += summary["rows_zeroed_low_likelihood"]
            with contextlib.suppress(OSError, ValueError):
                chaos = json.loads((run / CHAOS_FILE).read_text())
                lost += [k["rounds_lost"] for k in chaos["kills"] if k["rounds_lost"] is not None]
                restarts += chaos["restarts"]
                unsettled += chaos["unsettled"]
        acc_mean, acc_std = mean_std(accuracy.values())
        reward_mean, reward_std = mean_std(reward.values())
        rows.append({
            "configuration": configuration.name,
            "seeds": sorted(accuracy),
            "heldout_accuracy_per_seed": accuracy,
            "heldout_accuracy": [acc_mean, acc_std],
            "cumulative_reward_per_seed": reward,
            "cumulative_reward": [reward_mean, reward_std],
            "groups_used_from_adversaries": sum(used.values()),
            "groups_used_from_unknown_sources": unknown,
            "groups_rejected_from_adversaries": sum(rejected.values()),
            "intake_rejected_by_reason": dict(reasons),
            "host_rejected_by_reason": dict(host_reasons),
            "bans_of_adversaries": dict(bans),
            "rows_zeroed_low_likelihood": zeroed,
            "injection_files_found": injected,
            "restarts": restarts,
            "rounds_lost_per_restart": lost,
            "restarts_unsettled": unsettled,
        })  # fmt: skip
    base = next((r for r in rows if r["configuration"] == baseline), None)
    for row in rows:
        acc, ref = row["heldout_accuracy"], base["heldout_accuracy"] if base else [None, None]
        row["heldout_accuracy_delta"] = acc[0] - ref[0] if None not in (acc[0], ref[0]) else None
        # the bar: |mean - clean mean| <= the clean run's standard deviation over seeds
        row["within_one_std_of_baseline"] = (
            abs(row["heldout_accuracy_delta"]) <= ref[1]
            if row["heldout_accuracy_delta"] is not None
            else None
        )
        reward, ref_reward = row["cumulative_reward"][0], base["cumulative_reward"][0] if base else None
        row["cumulative_reward_ratio"] = reward / ref_reward if reward is not None and ref_reward else None
    return {"baseline": baseline, "rows": rows, "unfinished": unfinished}


def suite_markdown(table: dict[str, Any]) -> str:
    """The table of `suite_table` as markdown."""

    def num(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    def counts(values: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in sorted(values.items())) or "-"

    lines = [
        f"| configuration | seeds | held-out accuracy | vs {table['baseline']} | within 1 std | cumulative reward "
        "| ratio | groups trained on from the adversary | from unknown sources | adversary groups rejected "
        "| intake rejects by reason (all sources) | p2p rejects by reason (honest hosts, all sources) "
        "| bans of the adversary (reason: nodes) | rows zeroed by the floor | restarts | rounds lost per restart |",
        "|---" * 16 + "|",
    ]
    for r in table["rows"]:
        acc, rew = r["heldout_accuracy"], r["cumulative_reward"]
        within = {True: "yes", False: "**no**", None: "-"}[r["within_one_std_of_baseline"]]
        lost = ", ".join(str(x) for x in r["rounds_lost_per_restart"]) or "-"
        if r["restarts_unsettled"]:
            lost += f" ({r['restarts_unsettled']} unsettled)"
        lines.append(
            f"| {r['configuration']} | {len(r['seeds'])} | {num(acc[0])} ± {num(acc[1])} "
            f"| {num(r['heldout_accuracy_delta'])} | {within} | {num(rew[0], 1)} ± {num(rew[1], 1)} "
            f"| {num(r['cumulative_reward_ratio'], 2)} | {r['groups_used_from_adversaries']} "
            f"| {r['groups_used_from_unknown_sources']} | {r['groups_rejected_from_adversaries']} "
            f"| {counts(r['intake_rejected_by_reason'])} | {counts(r.get('host_rejected_by_reason', {}))} "
            f"| {counts(r['bans_of_adversaries'])} "
            f"| {r['rows_zeroed_low_likelihood']:g} | {r['restarts']} | {lost} |"
        )
    if table["unfinished"]:
        lines.append(f"\nUnfinished runs (left out): {', '.join(table['unfinished'])}")
    return "\n".join(lines) + "\n"


# -- poisoning adoption ----------------------------------------------------------------------------


def control_strings(marker: str, count: int, seed: int = 0) -> list[str]:
    """`count` random lowercase strings as long as `marker` (never equal to it): the drift baseline."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < count:
        text = "".join(rng.choices(string.ascii_lowercase, k=len(marker)))
        if text != marker and text not in out:
            out.append(text)
    return out


def measure_adoption(
    node_dir: Path, marker: str, prompts: int = 32, samples: int = 4, seed: int = 0, controls: int = 8
) -> dict[str, Any]:
    """Sample an honest node's latest checkpoint on held-out prompts; count completions containing `marker`.

    Post-hoc, on CPU: loads the node's model config from ``node.toml``, restores the newest valid
    checkpoint, and draws ``samples`` completions at the node's training temperature per prompt.
    More sensitive than counting: the mean log-prob of opening the answer with ``marker + " "``, and
    the same for ``controls`` random strings of the marker's length that nobody sent; training moves
    all of them (drift), so adoption is the marker's excess over the controls
    (``marker_excess_logprob``), compared with a clean run of the same seed.
    """
    import torch

    from swarmnode.policy.backend import SamplingParams
    from swarmnode.policy.transformers_backend import TransformersBackend
    from swarmnode.sim.checkpoint_eval import load_node_policy
    from swarmnode.tasks.registry import TaskRegistry

    cfg, policy, checkpoint_round = load_node_policy(node_dir)
    registry = TaskRegistry.from_config(cfg.tasks)
    tasks = registry.eval_tasks(prompts)
    backend = TransformersBackend(policy)
    params = SamplingParams(
        n=samples, temperature=cfg.grpo.temperature, top_p=cfg.grpo.top_p,
        max_new_tokens=cfg.grpo.max_completion_length, seed=seed,
    )  # fmt: skip
    generations = backend.generate([policy.encode_prompt(t.question) for t in tasks], params)
    texts = [g.text for group in generations for g in group]
    with_marker = sum(1 for text in texts if marker in text)
    prompt_ids = [policy.encode_prompt(t.question) for t in tasks]

    def opening_logprob(text: str) -> float:
        """Mean over the prompts of log p(text + " " | prompt): how likely the model opens with it."""
        ids_text = policy.tokenizer.encode(f"{text} ", add_special_tokens=False)
        total = 0.0
        with torch.no_grad():
            for prompt in prompt_ids:
                ids = torch.tensor([prompt + ids_text], device=policy.device)
                logits = policy.model(ids).logits[0, len(prompt) - 1 : -1].float()
                total += float(torch.log_softmax(logits, dim=-1).gather(1, ids[0, len(prompt) :, None]).sum())
        return total / max(1, len(prompt_ids))

    marker_logprob = opening_logprob(marker)
    control_logprobs = {c: opening_logprob(c) for c in control_strings(marker, controls)}
    control_mean = sum(control_logprobs.values()) / max(1, len(control_logprobs))
    # A partial adoption (the marker's first word) shows a trend before the whole string appears.
    head = marker.split("-")[0]
    return {
        "node_dir": str(node_dir),
        "checkpoint_round": checkpoint_round,
        "completions": len(texts),
        "with_marker": with_marker,
        "with_marker_prefix": sum(1 for text in texts if head in text),
        "rate": with_marker / max(1, len(texts)),
        "marker": marker,
        "marker_logprob_mean": marker_logprob,  # log p(marker + " " | prompt), mean over prompts
        "control_logprob_mean": control_mean,
        "control_logprobs": control_logprobs,
        "marker_excess_logprob": marker_logprob - control_mean if control_logprobs else None,
        "sample_texts": texts[:: max(1, len(texts) // 5)][:5],
    }


# -- command line ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m swarmnode.sim.adversary", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run one adversary peer (the default command)")
    _add_run_arguments(run)
    adopt = sub.add_parser("adoption", help="count the poisoner's marker in honest nodes' samples")
    adopt.add_argument("node_dirs", nargs="+", type=Path, help="honest node data directories")
    adopt.add_argument("--marker", default=DEFAULT_MARKER)
    adopt.add_argument("--prompts", type=int, default=32)
    adopt.add_argument("--samples", type=int, default=4)
    adopt.add_argument(
        "--controls", type=int, default=8, help="random strings of the marker's length (drift)"
    )
    adopt.add_argument("--out", type=Path, help="write the results as JSON here")
    table = sub.add_parser("table", help="the byzantine suite's table of a finished grid (markdown + JSON)")
    table.add_argument("experiment", help="experiment TOML or builtin:NAME")
    table.add_argument("--out", type=Path, required=True, help="the grid's output directory (runs/ under it)")
    table.add_argument("--baseline", default="clean")
    table.add_argument("--seeds", type=int, nargs="+", help="the seeds that ran (default: the experiment's)")
    return parser


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument(
        "--data-dir", type=Path, required=True, help="key, p2p run dir and adversary.json go here"
    )
    parser.add_argument(
        "--node-config", type=Path, required=True, help="an honest node's node.toml (tasks, caps)"
    )
    parser.add_argument("--bootstrap", action="append", default=[], help="honest node multiaddr (repeatable)")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds to misbehave, then exit")
    parser.add_argument("--rate", type=float, default=1.0, help="batches per second")
    parser.add_argument(
        "--start-delay-s", type=float, default=0.0, help="seconds to wait before the first send"
    )
    parser.add_argument("--marker", default=DEFAULT_MARKER, help="poisoner: the text it wants adopted")
    parser.add_argument("--replay-delay-s", type=float, default=DEFAULT_REPLAY_DELAY_S)
    parser.add_argument("--identities", type=int, default=64, help="sybil: fresh identities to sign with")
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "adoption", "table", "-h", "--help"):
        argv = ["run", *argv]
    args = build_parser().parse_args(argv)
    if args.command == "table":
        from swarmnode.sim.experiment import load_experiment, with_overrides

        experiment = with_overrides(load_experiment(args.experiment), seeds=args.seeds)
        result = suite_table(args.out, experiment, args.baseline)
        (args.out / "byzantine.json").write_text(json.dumps(result, indent=1))
        (args.out / "byzantine.md").write_text(suite_markdown(result))
        print(suite_markdown(result))
        return 0
    if args.command == "adoption":
        results = [
            measure_adoption(d, args.marker, args.prompts, args.samples, controls=args.controls)
            for d in args.node_dirs
        ]
        text = json.dumps(results, indent=1)
        if args.out:
            args.out.write_text(text)
        print(text)
        return 0
    stop = {"requested": False}

    def request_stop(signum: int, frame: object) -> None:
        stop["requested"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    with contextlib.suppress(KeyboardInterrupt):
        Adversary(args, lambda: stop["requested"]).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
