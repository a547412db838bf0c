"""Fuzz the wire decoder and the validation pipeline with mutated messages; writes bench/results/fuzz.json.

    python scripts/fuzz_wire.py                           # 100,000 inputs, seed 0
    python scripts/fuzz_wire.py --inputs 2000 --out /tmp/fuzz.json --max-seconds 120

Every input goes through both receive paths, exactly as a node runs them:
  * the decoder: ``open_envelope`` -> ``verify_envelope`` -> ``decode_message``;
  * the pipeline: ``ValidationPipeline.validate(kind_topic, data, forwarder)``, as the libp2p host
    calls it from its gossipsub validator (swarmnode/p2p/host.py).

Inputs are mutations of valid envelopes (batches with and without behaviour claims, heartbeats,
zstd, zlib and uncompressed): byte flips, truncations, splices, insertions; protobuf-aware edits of the
envelope; payload mutations (byte-level and protobuf-aware) that are compressed and re-signed by
the author so they get past the signature check and reach the payload decoder; zlib bombs around
and far beyond the payload cap, truncated and trailing zlib streams, other deflate framings;
zstd frames truncated, followed by bytes or a second frame, behind a skippable frame, without or
with a wrong content size, with large windows or a dictionary;
millions of empty repeated sub-messages; deep nesting; kind/topic mismatches; exact replays;
untouched valid messages. Generation is deterministic in ``--seed``.

Measured per input: crashes (any exception but WireError out of the decoder, any exception out of
``validate``, any ``internal_error`` verdict), the CPU time of each path (a hang is over 1 s;
CPU time because the machines this runs on are shared, wall clock is reported as well), and
memory: the process's peak resident-set growth for every input (Linux: VmHWM, reset before each
input through /proc/self/clear_refs; it sees the protobuf parser's C allocations, which
tracemalloc does not), and the tracemalloc peak for a deterministic sample plus every input that
inflates past 64 KiB or is over 64 KiB itself (tracemalloc on every input would triple the run
time). The pipeline runs with rate limits raised (``rate_*``) and is rebuilt every
``--pipeline-every`` inputs, so that bans and rate buckets do not stop mutated inputs short of the
decoder; re-signed inputs are forwarded by their own author, as a peer publishing its own message.

Bar (issue 10): >= 100,000 inputs, 0 crashes, 0 inputs over 1 s, max allocation per input <= 64 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
import traceback
import tracemalloc
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zstandard
from google.protobuf import __version__ as protobuf_version
from nacl.signing import SigningKey

from swarmnode.config import P2PConfig
from swarmnode.identity import Identity, peer_id_from_public_key
from swarmnode.p2p.pipeline import ValidationPipeline
from swarmnode.rl.records import RolloutGroup
from swarmnode.tasks.reference import TaskRef
from swarmnode.wire import (
    ENVELOPE_VERSION,
    Compression,
    Kind,
    NodeHeartbeat,
    WireCaps,
    WireError,
    decode_message,
    encode_heartbeat,
    encode_rollout_batch,
    open_envelope,
    open_payload,
    payload_cap,
    seal,
    signing_digest,
    verify_envelope,
)
from swarmnode.wire.gen import wire_pb2

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "fuzz.json"
HANG_SECONDS = 1.0
ALLOC_LIMIT_BYTES = 64 * 1024 * 1024
LARGE_BYTES = 64 * 1024  # inputs this large (or inflating past it) always get a tracemalloc measurement
WATCHDOG_SECONDS = 20  # an input still running after this is interrupted and counted as a hang
MAX_EXAMPLES = 20  # crash / hang examples kept in the report


class Watchdog(Exception):
    """Raised by SIGALRM inside an input that runs past WATCHDOG_SECONDS."""


@dataclass(frozen=True)
class Case:
    mutator: str
    kind_topic: Kind
    data: bytes
    forwarder: str
    large: bool = False  # known to inflate past LARGE_BYTES


# -- memory probes --------------------------------------------------------------------------------


class RssProbe:
    """Peak resident-set growth of this process during one input (Linux only; else disabled)."""

    def __init__(self) -> None:
        self.enabled = Path("/proc/self/clear_refs").exists()
        self._libc = ctypes.CDLL(None) if self.enabled else None
        self._baseline = 0

    @staticmethod
    def _status() -> tuple[int, int]:
        with open("/proc/self/status") as status:
            text = status.read()
        hwm = int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1))
        rss = int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1))
        return hwm * 1024, rss * 1024

    def start(self) -> None:
        if not self.enabled:
            return
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        self._baseline = self._status()[1]

    def stop(self) -> int:
        if not self.enabled:
            return 0
        hwm, rss = self._status()
        if rss > self._baseline + 4 * 1024 * 1024 and self._libc is not None:
            # Give freed heap back so that the next input's growth is measured, not hidden in reuse.
            self._libc.malloc_trim(0)
        return max(0, hwm - self._baseline)


# -- the corpus of valid messages ----------------------------------------------------------------


def _identity(rng: random.Random) -> Identity:
    return Identity(SigningKey(rng.randbytes(32)))


def _text(rng: random.Random, n: int) -> str:
    alphabet = "abcdefghij 0123456789<>/=+-*()answer\n"
    if rng.random() < 0.2:
        alphabet += "é中😀\u0000\u202e"
    return "".join(rng.choices(alphabet, k=n))


def _group(
    rng: random.Random, index: int, completions: int, chars: int, claims: bool, now: float
) -> RolloutGroup:
    return RolloutGroup(
        task=TaskRef("chain_sum", "ab12cd34ef56ab78", rng.randrange(1 << 31), index, "0.1.25"),
        question=_text(rng, rng.randrange(1, 64)),
        completions=tuple(_text(rng, rng.randrange(0, chars + 1)) for _ in range(completions)),
        finished=tuple(rng.random() < 0.5 for _ in range(completions)),
        model_id="tiny-a" if rng.random() < 0.8 else "other-model",
        round=3,
        created_at=now,
        behaviour_logprobs=tuple(-rng.random() * 50 for _ in range(completions)) if claims else None,
        behaviour_num_tokens=tuple(rng.randrange(0, 200) for _ in range(completions)) if claims else None,
    )


class Corpus:
    """Valid payloads and envelopes to mutate, and the identities that sign them."""

    def __init__(self, rng: random.Random, caps: WireCaps) -> None:
        self.caps = caps
        self.authors = [_identity(rng) for _ in range(256)]
        self.forwarders = [peer_id_from_public_key(rng.randbytes(32)) for _ in range(256)]
        self.rng = rng
        self.bombs = self._bombs()

    def batch_payload(self, now: float) -> bytes:
        rng = self.rng
        shape = rng.choice(["tiny", "typical", "wide", "long"])
        groups, completions, chars = {
            "tiny": (1, 2, 16),
            "typical": (4, 8, 120),
            "wide": (16, 16, 24),
            "long": (2, 4, 2000),
        }[shape]
        found = [_group(rng, i, completions, chars, rng.random() < 0.5, now) for i in range(groups)]
        return encode_rollout_batch(
            found,
            node_round=3,
            sequence=int(now * 1000) + rng.randrange(1000),
            model_id="tiny-a",
            created_at=now,
        )

    def heartbeat_payload(self, now: float) -> bytes:
        rng = self.rng
        n = rng.choice([0, 3, 40])
        return encode_heartbeat(
            NodeHeartbeat(
                name=f"node-{rng.randrange(100)}",
                model_id="tiny-a",
                node_round=rng.randrange(1000),
                sequence=int(now * 1000) + rng.randrange(1000),
                created_at=now,
                reward_trend=tuple(rng.random() for _ in range(n)),
                counters={f"counter_{i}": rng.randrange(10_000) for i in range(n)},
                peers=rng.randrange(10),
                software_version="0.1.0",
            )
        )

    def payload(self, kind: Kind, now: float) -> bytes:
        return self.batch_payload(now) if kind == Kind.ROLLOUT_BATCH else self.heartbeat_payload(now)

    def _bombs(self) -> list[tuple[str, bytes, int]]:
        """(name, zlib body, inflated size): built once, re-signed by a different author each use."""
        cap = payload_cap(Kind.ROLLOUT_BATCH, self.caps)
        group = wire_pb2.RolloutGroup(
            task=wire_pb2.TaskRef(dataset="chain_sum"), completions=[wire_pb2.Completion(text="a")]
        ).SerializeToString()
        # (name, prefix, pattern, repeats): prefix + pattern * repeats, compressed without materialising it
        shapes = [
            ("zeros_at_cap", b"", b"\x00", cap),
            ("zeros_over_cap", b"", b"\x00", cap + 1),
            ("zeros_16x_cap", b"", b"\x00", 16 * cap),
            ("empty_groups_at_cap", b"", b"\x2a\x00", cap // 2),
            ("empty_groups_4x_cap", b"", b"\x2a\x00", 2 * cap),
            (
                "empty_completions_in_one_group",
                _varint(5 << 3 | 2) + _varint(cap - 16),
                b"\x1a\x00",
                cap // 2 - 8,
            ),
            (
                "valid_group_then_padding",
                _len_field(5, group) + _varint(99 << 3 | 2) + _varint(cap - 64),
                b"x",
                cap - 64,
            ),
            ("unknown_field_padding", _varint(99 << 3 | 2) + _varint(cap - 16), b"\x00", cap - 16),
            ("unknown_field_16x_cap", _varint(99 << 3 | 2) + _varint(16 * cap), b"\x00", 16 * cap),
            ("many_scalar_repeats", b"", b"\x08\x01", cap // 2),
        ]
        bombs = []
        for name, prefix, pattern, repeats in shapes:
            deflate = zlib.compressobj(9)
            parts = [deflate.compress(prefix)]
            block = pattern * (1 << 20)
            for start in range(0, repeats, 1 << 20):
                parts.append(deflate.compress(block[: len(pattern) * min(1 << 20, repeats - start)]))
            parts.append(deflate.flush())
            bombs.append((name, b"".join(parts), len(prefix) + len(pattern) * repeats))
        # The largest valid batch: every group and completion cap used, 4-byte characters, just
        # under the payload cap. It decodes: the worst honest-looking allocation.
        text = "\U0001f600" * (
            (cap // (self.caps.max_groups_per_batch * self.caps.max_completions_per_group) - 24) // 4
        )
        full = wire_pb2.RolloutBatch(
            node_round=1,
            created_at_ms=int(time.time() * 1000),
            sequence=int(time.time() * 1000),
            model_id="tiny-a",
            groups=[
                wire_pb2.RolloutGroup(
                    task=wire_pb2.TaskRef(dataset="chain_sum", config_digest="d", seed=1, index=i),
                    question="q",
                    completions=[
                        wire_pb2.Completion(text=text, finished=True, behaviour_logprob=-1.0, num_tokens=9)
                        for _ in range(self.caps.max_completions_per_group)
                    ],
                )
                for i in range(self.caps.max_groups_per_batch)
            ],
        ).SerializeToString()
        assert len(full) <= cap, (len(full), cap)
        bombs.append(("largest_valid_batch", zlib.compress(full, 9), len(full)))
        return bombs


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _len_field(number: int, body: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(body)) + body


def sign_body(
    author: Identity, kind: int, compression: int, body: bytes, version: int = ENVELOPE_VERSION
) -> bytes:
    """An envelope around an already compressed body, signed by ``author`` (reaches the decoder)."""
    signature = author.sign(signing_digest(version, kind, compression, body))
    return wire_pb2.Envelope(
        version=version,
        kind=kind,
        compression=compression,
        payload=body,
        signer_public_key=author.public_key_bytes,
        signature=signature,
    ).SerializeToString()


# -- mutators ---------------------------------------------------------------------------------------


def _bytes_mutation(rng: random.Random, data: bytes, donor: bytes) -> bytes:
    """One of: flip bytes, truncate, splice with a donor, insert, delete, duplicate a range."""
    out = bytearray(data)
    op = rng.randrange(7)
    if not out:
        return rng.randbytes(rng.randrange(1, 64))
    if op == 0:
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= rng.randrange(1, 256)
    elif op == 1:
        del out[rng.randrange(len(out)) :]
    elif op == 2:
        cut = rng.randrange(len(out))
        out = out[:cut] + donor[rng.randrange(len(donor) + 1) :]
    elif op == 3:
        at = rng.randrange(len(out) + 1)
        out[at:at] = rng.randbytes(rng.randint(1, 16))
    elif op == 4:
        start = rng.randrange(len(out))
        del out[start : start + rng.randint(1, 32)]
    elif op == 5:
        start = rng.randrange(len(out))
        piece = out[start : start + rng.randint(1, 64)]
        out[start:start] = piece * rng.randint(1, 64)
    else:
        for _ in range(rng.randint(1, 4)):  # interesting values at random positions
            at = rng.randrange(len(out))
            value = rng.choice(
                [b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\xff\x0f", b"\x2a\x00", b"\x1a\x00"]
            )
            out[at : at + len(value)] = value
    return bytes(out)


class Mutators:
    """Named case generators; each returns a Case for the pipeline and the decoder."""

    def __init__(self, corpus: Corpus, rng: random.Random) -> None:
        self.corpus = corpus
        self.rng = rng
        self.last_valid: list[tuple[Kind, bytes, str]] = []
        self.table: dict[str, tuple[float, Callable[[float], Case]]] = {
            "valid": (0.04, self.valid),
            "replay": (0.03, self.replay),
            "kind_topic_mismatch": (0.02, self.kind_topic_mismatch),
            "envelope_bytes": (0.18, self.envelope_bytes),
            "envelope_fields": (0.07, self.envelope_fields),
            "payload_bytes_resigned": (0.22, self.payload_bytes_resigned),
            "payload_proto_resigned": (0.26, self.payload_proto_resigned),
            "zlib_framing": (0.06, self.zlib_framing),
            "zlib_bomb": (0.02, self.zlib_bomb),
            "zstd_framing": (0.06, self.zstd_framing),
            "deep_nesting": (0.03, self.deep_nesting),
            "random_bytes": (0.07, self.random_bytes),
        }
        self.names = list(self.table)
        self.weights = [w for w, _ in self.table.values()]

    def next(self, now: float) -> Case:
        name = self.rng.choices(self.names, self.weights)[0]
        return self.table[name][1](now)

    # helpers
    def _author(self) -> Identity:
        return self.rng.choice(self.corpus.authors)

    def _kind(self) -> Kind:
        return Kind.ROLLOUT_BATCH if self.rng.random() < 0.75 else Kind.HEARTBEAT

    def _compression(self) -> Compression:
        return self.rng.choices(list(Compression), [0.15, 0.25, 0.6])[0]  # NONE, ZLIB, ZSTD

    def _sealed(self, author: Identity, kind: Kind, payload: bytes) -> bytes:
        return seal(author, kind, payload, compression=self._compression(), max_message_bytes=1 << 30)

    def _valid(self, now: float) -> tuple[Kind, bytes, Identity]:
        kind, author = self._kind(), self._author()
        data = self._sealed(author, kind, self.corpus.payload(kind, now))
        return kind, data, author

    # generators
    def valid(self, now: float) -> Case:
        kind, data, author = self._valid(now)
        self.last_valid = (self.last_valid + [(kind, data, author.peer_id)])[-32:]
        return Case("valid", kind, data, author.peer_id)

    def replay(self, now: float) -> Case:
        if not self.last_valid:
            return self.valid(now)
        kind, data, author = self.rng.choice(self.last_valid)
        forwarder = author if self.rng.random() < 0.5 else self.rng.choice(self.corpus.forwarders)
        return Case("replay", kind, data, forwarder)

    def kind_topic_mismatch(self, now: float) -> Case:
        kind, data, author = self._valid(now)
        other = Kind.HEARTBEAT if kind == Kind.ROLLOUT_BATCH else Kind.ROLLOUT_BATCH
        return Case("kind_topic_mismatch", other, data, author.peer_id)

    def envelope_bytes(self, now: float) -> Case:
        kind, data, _ = self._valid(now)
        _, donor, _ = self._valid(now)
        mutated = _bytes_mutation(self.rng, data, donor)
        return Case("envelope_bytes", kind, mutated, self.rng.choice(self.corpus.forwarders))

    def envelope_fields(self, now: float) -> Case:
        rng = self.rng
        kind, data, author = self._valid(now)
        msg = wire_pb2.Envelope.FromString(data)
        op = rng.randrange(9)
        tail = b""
        if op == 0:
            msg.version = rng.choice([0, 2, 2**32 - 1])
        elif op == 1:
            msg.kind = rng.choice([0, 3, 2**31 - 1, -1])
        elif op == 2:
            msg.compression = rng.choice([2, 7, 2**31 - 1, -5])
        elif op == 3:
            msg.signer_public_key = rng.randbytes(rng.choice([0, 31, 33, 64]))
        elif op == 4:
            msg.signature = rng.randbytes(rng.choice([0, 63, 65, 128]))
        elif op == 5:
            msg.signature = rng.randbytes(64)  # right length, wrong signature
        elif op == 6:
            tail = _varint(rng.randrange(7, 2000) << 3 | rng.choice([0, 2])) + b"\x01\x00"  # unknown field
        elif op == 7:
            tail = b"\x08\x01"  # version written twice
        else:
            msg.signer_public_key = self._author().public_key_bytes  # another author's key
        return Case("envelope_fields", kind, msg.SerializeToString() + tail, author.peer_id)

    def payload_bytes_resigned(self, now: float) -> Case:
        kind, author = self._kind(), self._author()
        payload = self.corpus.payload(kind, now)
        mutated = _bytes_mutation(self.rng, payload, self.corpus.payload(kind, now))
        data = self._sealed(author, kind, mutated)
        return Case("payload_bytes_resigned", kind, data, author.peer_id, large=len(mutated) > LARGE_BYTES)

    def payload_proto_resigned(self, now: float) -> Case:
        kind, author = self._kind(), self._author()
        payload = self.corpus.payload(kind, now)
        mutated = (
            self._mutate_batch(wire_pb2.RolloutBatch.FromString(payload), now)
            if kind == Kind.ROLLOUT_BATCH
            else self._mutate_heartbeat(wire_pb2.Heartbeat.FromString(payload))
        )
        data = self._sealed(author, kind, mutated)
        return Case("payload_proto_resigned", kind, data, author.peer_id, large=len(mutated) > LARGE_BYTES)

    def _string(self, cap: int) -> str:
        n = self.rng.choice([0, 1, cap - 1, cap, cap + 1, 4 * cap])
        return self.rng.choice(["x", "é", "😀", "\u0000"]) * max(0, n)

    def _mutate_batch(self, batch: wire_pb2.RolloutBatch, now: float) -> bytes:
        rng, caps = self.rng, self.corpus.caps
        tail = b""
        group = rng.choice(batch.groups)
        op = rng.randrange(14)
        if op == 0:
            for _ in range(rng.choice([1, caps.max_groups_per_batch, 10_000])):
                batch.groups.add()
        elif op == 1:
            for _ in range(rng.choice([1, caps.max_completions_per_group, 10_000])):
                group.completions.add()
        elif op == 2:
            rng.choice(group.completions).text = self._string(caps.max_chars_per_completion)
        elif op == 3:
            group.question = self._string(caps.max_question_chars)
        elif op == 4:
            field = rng.choice(["dataset", "config_digest", "generator_version"])
            setattr(group.task, field, self._string(caps.max_name_chars))
        elif op == 5 and rng.random() < 0.5:
            group.ClearField("task")
        elif op == 5:
            group.task.ClearField("dataset")
        elif op == 6:
            completion = rng.choice(group.completions)
            completion.behaviour_logprob = rng.choice(
                [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-30, 3.0, -3e38, -1e-45]
            )
        elif op == 7:
            completion = rng.choice(group.completions)
            completion.num_tokens = rng.choice(
                [0, caps.max_tokens_per_completion, caps.max_tokens_per_completion + 1, 2**32 - 1]
            )
        elif op == 8:
            batch.node_round = rng.choice([0, 2**64 - 1])
            batch.sequence = rng.choice([0, 1, 2**64 - 1, int(now * 1000)])
        elif op == 9:
            batch.created_at_ms = rng.choice(
                [0, -(2**63), 2**63 - 1, int((now - 10_000) * 1000), int((now + 3600) * 1000)]
            )
        elif op == 10:
            del batch.groups[:]
        elif op == 11:
            tail = b"".join(
                _varint(rng.randrange(6, 5000) << 3 | 2) + _varint(n) + b"u" * n
                for n in (rng.randrange(0, 300) for _ in range(rng.randint(1, 12)))
            )
        elif op == 12:
            tail = rng.choice([b"\x08\x05", b"\x22\x01m", b"\x10\x01"])  # a singular field again
        else:
            batch.model_id = self._string(caps.max_name_chars)
        return batch.SerializeToString() + tail

    def _mutate_heartbeat(self, hb: wire_pb2.Heartbeat) -> bytes:
        rng, caps = self.rng, self.corpus.caps
        op = rng.randrange(6)
        tail = b""
        if op == 0:
            hb.reward_trend.extend(
                [rng.choice([float("nan"), float("inf"), 0.5])]
                * rng.choice([1, caps.max_heartbeat_entries + 1])
            )
        elif op == 1:
            for i in range(rng.choice([caps.max_heartbeat_entries, caps.max_heartbeat_entries + 1, 5000])):
                hb.counters[f"c{i}"] = i
        elif op == 2:
            hb.counters[self._string(caps.max_name_chars)] = 2**64 - 1
        elif op == 3:
            setattr(
                hb, rng.choice(["name", "model_id", "software_version"]), self._string(caps.max_name_chars)
            )
        elif op == 4:
            tail = b"\x25\x00\x00\xc0\x7f" * rng.choice([1, 300])  # unpacked NaN trend points
        else:
            tail = b"\x22\x00" * rng.choice([1, 300, 100_000])  # empty packed records
        return hb.SerializeToString() + tail

    def zlib_framing(self, now: float) -> Case:
        rng = self.rng
        kind, author = self._kind(), self._author()
        payload = self.corpus.payload(kind, now)
        body = zlib.compress(payload)
        op = rng.randrange(6)
        if op == 0:
            body = body[: rng.randrange(len(body))]  # truncated stream
        elif op == 1:
            body += rng.randbytes(rng.randint(1, 16))  # trailing bytes
        elif op == 2:
            deflate = zlib.compressobj(wbits=-15)  # raw deflate, no zlib header
            body = deflate.compress(payload) + deflate.flush()
        elif op == 3:
            gz = zlib.compressobj(wbits=31)  # gzip framing
            body = gz.compress(payload) + gz.flush()
        elif op == 4:
            deflate = zlib.compressobj(zdict=b"answer")  # preset dictionary (FDICT)
            body = deflate.compress(payload) + deflate.flush()
        else:
            body = zlib.compress(payload)[:-4] + rng.randbytes(4)  # bad Adler-32
        data = sign_body(author, kind, Compression.ZLIB, body)
        return Case("zlib_framing", kind, data, author.peer_id)

    def zstd_framing(self, now: float) -> Case:
        """Frames a receiver must refuse (or, for a small declared window, accept) whatever the payload."""
        rng = self.rng
        kind, author = self._kind(), self._author()
        payload = self.corpus.payload(kind, now)
        body = zstandard.ZstdCompressor().compress(payload)
        op = rng.randrange(8)
        if op == 0:
            body = body[: rng.randrange(len(body))]  # truncated frame
        elif op == 1:
            body += rng.choice([body, rng.randbytes(rng.randint(1, 16))])  # a second frame, trailing bytes
        elif op == 2:
            body = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"skip" + body  # skippable frame first
        elif op == 3:
            body = zstandard.ZstdCompressor(write_content_size=False).compress(payload)
        else:  # hand-built raw-block frames: stated size, window and dictionary chosen freely
            size = len(payload) + (rng.choice([-1, 1, 1 << 31]) if op == 4 else 0)
            window_log = rng.choice([10, 20, 27, 31]) if op == 5 else 23
            dict_id = rng.randint(1, 1 << 31) if op == 6 else 0
            descriptor = 0x80 | (0x03 if dict_id else 0)
            body = b"\x28\xb5\x2f\xfd" + bytes([descriptor, (window_log - 10) << 3])
            body += (dict_id.to_bytes(4, "little") if dict_id else b"") + max(0, size).to_bytes(4, "little")
            raw = payload[: (1 << 17) - 1]  # one raw block
            body += (1 | len(raw) << 3).to_bytes(3, "little") + raw
        data = sign_body(author, kind, Compression.ZSTD, body)
        return Case("zstd_framing", kind, data, author.peer_id)

    def zlib_bomb(self, now: float) -> Case:
        name, body, inflated = self.rng.choice(self.corpus.bombs)
        author = self._author()
        kind = Kind.ROLLOUT_BATCH if self.rng.random() < 0.8 else Kind.HEARTBEAT
        if self.rng.random() < 0.3:
            body = body[: len(body) // 2]
        return Case(
            f"zlib_bomb/{name}",
            kind,
            sign_body(author, kind, Compression.ZLIB, body),
            author.peer_id,
            large=True,
        )

    def deep_nesting(self, now: float) -> Case:
        rng = self.rng
        depth = rng.choice([10, 100, 1000, 20_000])
        op = rng.randrange(3)
        if op == 0:
            inner = b""
            for _ in range(depth):  # nested unknown length-delimited fields
                inner = _len_field(99, inner)
            payload = _len_field(5, _len_field(3, inner[:200_000]))
        elif op == 1:
            payload = b"\x2b" * depth + b"\x2c" * depth  # nested start/end groups (wire types 3/4)
        else:
            inner = b""
            for _ in range(min(depth, 2000)):  # groups inside completions inside groups (schema-invalid)
                inner = _len_field(5, _len_field(3, inner))
            payload = inner
        author = self._author()
        kind = self._kind()
        data = seal(author, kind, payload, max_message_bytes=1 << 30)
        return Case("deep_nesting", kind, data, author.peer_id, large=len(payload) > LARGE_BYTES)

    def random_bytes(self, now: float) -> Case:
        n = self.rng.choice([0, 1, 8, 64, 512, 4096])
        return Case(
            "random_bytes", self._kind(), self.rng.randbytes(n), self.rng.choice(self.corpus.forwarders)
        )


# -- running inputs ---------------------------------------------------------------------------------


def decode_path(case: Case, caps: WireCaps) -> tuple[str, int]:
    """The decoder path; returns (outcome, inflated size of a decoded payload, else 0) and lets
    anything but WireError escape."""
    try:
        env = open_envelope(case.data, caps)
    except WireError as err:
        return f"open:{err.reason}", 0
    signed = verify_envelope(env)  # the pipeline stops at a bad signature; the decoder runs anyway
    try:
        decode_message(env, caps)
    except WireError as err:
        return f"decode:{err.reason}", 0
    inflated = len(open_payload(env, caps))  # only to pick inputs for tracemalloc; cannot fail now
    return "decoded" if signed else "decoded_unsigned", inflated


def make_pipeline() -> ValidationPipeline:
    """The deployed pipeline (defaults), with its rate limits raised so mutations reach the decoder."""
    cfg = P2PConfig(rate_msgs_per_s=1e9, rate_bytes_per_s=1e15)
    return ValidationPipeline.from_config(cfg)


def _git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "swarmnode"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _alarm(signum: int, frame: object) -> None:
    raise Watchdog(f"input ran past {WATCHDOG_SECONDS} s")


def fuzz(
    inputs: int, seed: int, max_seconds: float, sample_every: int, pipeline_every: int, progress: bool
) -> dict:
    rng = random.Random(seed)
    caps = WireCaps.from_config(P2PConfig())
    corpus = Corpus(rng, caps)
    mutators = Mutators(corpus, rng)
    rss = RssProbe()
    pipeline = make_pipeline()
    decoder_outcomes: Counter[str] = Counter()
    verdicts: Counter[str] = Counter()
    by_mutator: Counter[str] = Counter()
    crashes: list[dict] = []
    crash_count = hang_count = 0
    hangs: list[dict] = []
    slowest = {"seconds": 0.0}
    slowest_path = {"decoder": 0.0, "pipeline": 0.0}
    max_wall, wall_over = 0.0, 0
    max_traced = {"bytes": 0}
    max_rss = {"bytes": 0}
    traced_inputs = 0
    over_limit = 0
    started = time.monotonic()
    done = 0
    previous_handler = signal.signal(signal.SIGALRM, _alarm) if hasattr(signal, "SIGALRM") else None
    try:
        for i in range(inputs):
            if time.monotonic() - started > max_seconds:
                break
            if i % pipeline_every == 0:
                pipeline = make_pipeline()
            now = time.time()
            case = mutators.next(now)
            by_mutator[case.mutator.split("/")[0]] += 1
            trace = case.large or len(case.data) > LARGE_BYTES or i % sample_every == 0
            if trace:
                tracemalloc.start()
            rss.start()
            if previous_handler is not None:
                signal.setitimer(signal.ITIMER_REAL, WATCHDOG_SECONDS)
            failure = None
            inflated = 0
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                outcome, inflated = decode_path(case, caps)
                decoder_outcomes[outcome] += 1
            except Watchdog:
                decoder_outcomes["watchdog"] += 1
            except Exception as exc:  # noqa: BLE001 - a crash is what we are counting
                failure = ("decoder", exc)
            t1, c1 = time.perf_counter(), time.thread_time()
            try:
                verdict = pipeline.validate(case.kind_topic, case.data, case.forwarder)
                verdicts[str(verdict.reason)] += 1
                if str(verdict.reason) == "internal_error":
                    failure = failure or ("pipeline internal_error", RuntimeError(verdict.detail))
            except Watchdog:
                verdicts["watchdog"] += 1
            except Exception as exc:  # noqa: BLE001
                failure = failure or ("pipeline", exc)
            finally:
                t2, c2 = time.perf_counter(), time.thread_time()
                if previous_handler is not None:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            # Each path is what one receive costs; the host runs only the pipeline.
            slowest_path["decoder"] = max(slowest_path["decoder"], c1 - c0)
            slowest_path["pipeline"] = max(slowest_path["pipeline"], c2 - c1)
            seconds = max(c1 - c0, c2 - c1)  # CPU seconds: what the input costs, whatever the load
            wall_seconds = max(t1 - t0, t2 - t1)
            max_wall = max(max_wall, wall_seconds)
            wall_over += wall_seconds > HANG_SECONDS
            grew = rss.stop()
            if trace:
                traced = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                traced_inputs += 1
                max_traced["bytes"] = max(max_traced["bytes"], traced)
            else:
                traced = 0
            if grew > max_rss["bytes"]:
                max_rss.update(bytes=grew, mutator=case.mutator, input=i)
            if max(grew, traced) > ALLOC_LIMIT_BYTES:
                over_limit += 1
            if inflated > LARGE_BYTES and not trace:
                # Not known large in advance: measure it again now that we know (decoder path only).
                tracemalloc.start()
                with contextlib.suppress(Exception):  # a crash was counted above
                    decode_path(case, caps)
                traced = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                traced_inputs += 1
                max_traced["bytes"] = max(max_traced["bytes"], traced)
                over_limit += traced > ALLOC_LIMIT_BYTES
            if seconds > slowest["seconds"]:
                slowest.update(seconds=seconds, mutator=case.mutator, input=i)
            hang_count += seconds > HANG_SECONDS
            if seconds > HANG_SECONDS and len(hangs) < MAX_EXAMPLES:
                hangs.append(
                    {
                        "input": i,
                        "mutator": case.mutator,
                        "seconds": round(seconds, 3),
                        "sha256": _sha(case.data),
                    }
                )
            if failure is not None:
                crash_count += 1
                if len(crashes) < MAX_EXAMPLES:
                    where, exc = failure
                    crashes.append(
                        {
                            "input": i,
                            "mutator": case.mutator,
                            "where": where,
                            "error": f"{type(exc).__name__}: {exc}"[:500],
                            "traceback": traceback.format_exception(exc)[-3:],
                            "data_hex_prefix": case.data[:256].hex(),
                            "sha256": _sha(case.data),
                        }
                    )
            done = i + 1
            if progress and done % 5000 == 0:
                print(
                    f"{done} inputs, {time.monotonic() - started:.0f} s, crashes {crash_count}",
                    file=sys.stderr,
                )
    finally:
        if previous_handler is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous_handler)
    elapsed = time.monotonic() - started
    max_alloc = max(max_traced["bytes"], max_rss["bytes"])
    return {
        "inputs": done,
        "requested_inputs": inputs,
        "seed": seed,
        "seconds": round(elapsed, 1),
        "crashes": crash_count,
        "crash_examples": crashes,
        "hangs_over_1s": hang_count,
        "hang_examples": hangs,
        "slowest_input": {**slowest, "seconds": round(slowest["seconds"], 4)},
        "slowest_seconds_by_path": {k: round(v, 4) for k, v in slowest_path.items()},
        "timing": "per input, the slower of its two paths (decoder; pipeline.validate) in CPU seconds of "
        "this thread (time.thread_time), so that other processes on a shared machine do not count; a hang "
        "is over 1 CPU second. Wall clock is reported too",
        "max_wall_seconds": round(max_wall, 4),
        "inputs_over_1s_wall_clock": wall_over,
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "max_allocation_bytes": max_alloc,
        "max_tracemalloc_peak_bytes": max_traced["bytes"],
        "max_rss_growth_bytes": max_rss["bytes"],
        "max_rss_growth_input": {k: v for k, v in max_rss.items() if k != "bytes"},
        "inputs_over_allocation_limit": over_limit,
        "allocation_method": {
            "rss_growth": "every input: VmHWM minus VmRSS before it, VmHWM reset through /proc/self/clear_refs "
            "(sees the protobuf parser's C allocations)"
            if rss.enabled
            else "unavailable on this platform",
            "tracemalloc": f"every {sample_every}th input, every input over {LARGE_BYTES} bytes or known to "
            f"inflate past it (zlib bombs, big payloads), and every input found to inflate past it",
            "tracemalloc_inputs": traced_inputs,
        },
        "decoder_outcomes": dict(sorted(decoder_outcomes.items())),
        "pipeline_verdicts": dict(sorted(verdicts.items())),
        "inputs_by_mutator": dict(sorted(by_mutator.items())),
        "pipeline": "ValidationPipeline.from_config(P2PConfig(rate_msgs_per_s=1e9, rate_bytes_per_s=1e15)), "
        f"rebuilt every {pipeline_every} inputs; called as the host calls it: validate(kind_topic, data, forwarder)",
        "caps": caps.__dict__,
        "bar": {
            "min_inputs": 100_000,
            "max_crashes": 0,
            "max_inputs_over_1s": 0,
            "max_allocation_bytes": ALLOC_LIMIT_BYTES,
        },
        "passes_bar": done >= 100_000
        and crash_count == 0
        and hang_count == 0
        and max_alloc <= ALLOC_LIMIT_BYTES,
        "environment": {
            "python": platform.python_version(),
            "protobuf": protobuf_version,
            "git": _git_revision(),
            "cpu_threads": os.environ.get("OMP_NUM_THREADS", ""),
        },
    }


def merge(parts: list[dict]) -> dict:
    """One report from runs with different seeds (e.g. run side by side on a shared machine)."""
    first = parts[0]
    merged = dict(first)
    summed = ("inputs", "requested_inputs", "crashes", "hangs_over_1s", "inputs_over_1s_wall_clock",
              "inputs_over_allocation_limit")  # fmt: skip
    for key in summed:
        merged[key] = sum(part[key] for part in parts)
    for key in ("max_allocation_bytes", "max_tracemalloc_peak_bytes", "max_wall_seconds"):
        merged[key] = max(part[key] for part in parts)
    for key in ("decoder_outcomes", "pipeline_verdicts", "inputs_by_mutator"):
        total: Counter[str] = Counter()
        for part in parts:
            total.update(part[key])
        merged[key] = dict(sorted(total.items()))
    biggest = max(parts, key=lambda part: part["max_rss_growth_bytes"])
    merged["max_rss_growth_bytes"] = biggest["max_rss_growth_bytes"]
    merged["max_rss_growth_input"] = {**biggest["max_rss_growth_input"], "seed": biggest["seed"]}
    slowest = max(parts, key=lambda part: part["slowest_input"]["seconds"])
    merged["slowest_input"] = {**slowest["slowest_input"], "seed": slowest["seed"]}
    merged["slowest_seconds_by_path"] = {
        path: max(part["slowest_seconds_by_path"][path] for part in parts)
        for path in first["slowest_seconds_by_path"]
    }
    for key in ("crash_examples", "hang_examples"):
        examples = [example | {"seed": part["seed"]} for part in parts for example in part[key]]
        merged[key] = examples[:MAX_EXAMPLES]
    merged["allocation_method"] = {
        **first["allocation_method"],
        "tracemalloc_inputs": sum(part["allocation_method"]["tracemalloc_inputs"] for part in parts),
    }
    merged["seconds"] = max(part["seconds"] for part in parts)
    merged["seed"] = [part["seed"] for part in parts]
    merged["runs"] = [
        {"seed": part["seed"], "inputs": part["inputs"], "seconds": part["seconds"],
         "load_average_at_end": part.get("load_average_at_end")}
        for part in parts
    ]  # fmt: skip
    merged.pop("load_average_at_end", None)
    merged["passes_bar"] = (
        merged["inputs"] >= 100_000
        and merged["crashes"] == 0
        and merged["hangs_over_1s"] == 0
        and merged["max_allocation_bytes"] <= ALLOC_LIMIT_BYTES
    )
    return merged


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop early after this long")
    parser.add_argument(
        "--sample-every", type=int, default=20, help="tracemalloc every Nth input (plus large ones)"
    )
    parser.add_argument("--pipeline-every", type=int, default=200, help="rebuild the pipeline every N inputs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--merge", type=Path, nargs="+", help="merge these reports (other seeds) into --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # rejections are counted, not logged; bugs still show
    if args.merge:
        result = merge([json.loads(path.read_text()) for path in args.merge])
    else:
        result = fuzz(
            args.inputs, args.seed, args.max_seconds, args.sample_every, args.pipeline_every, not args.quiet
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {
        k: result[k] for k in ("inputs", "crashes", "hangs_over_1s", "max_allocation_bytes", "passes_bar")
    }
    print(json.dumps(summary))
    return 0 if result["crashes"] == 0 and result["hangs_over_1s"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
