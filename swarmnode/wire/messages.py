"""Payload messages: rollout batches and heartbeats, to and from the node's typed records.

Decoding first pre-scans the encoded bytes (swarmnode.wire.scan: counts and sizes, nothing
allocated), then parses, then checks the remaining caps (characters, values) before any record is
built, and raises WireError with the pipeline reason on the first violation. docs/PROTOCOL.md
("Payload messages") is the normative description.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

from google.protobuf.message import DecodeError, Message

from swarmnode.rl.records import RolloutGroup
from swarmnode.tasks.reference import TaskRef
from swarmnode.wire.caps import WireCaps, WireError
from swarmnode.wire.envelope import Kind
from swarmnode.wire.gen import wire_pb2
from swarmnode.wire.scan import MessageRule, heartbeat_rule, rollout_batch_rule, scan

_rollout_batch_rule = lru_cache(maxsize=8)(rollout_batch_rule)
_heartbeat_rule = lru_cache(maxsize=8)(heartbeat_rule)


@dataclass(frozen=True)
class DecodedBatch:
    """A received rollout batch; each group carries the sender as ``source`` and the batch's round/sequence."""

    node_round: int
    sequence: int
    model_id: str
    created_at: float  # sender's Unix time, seconds
    groups: list[RolloutGroup]


@dataclass(frozen=True)
class NodeHeartbeat:
    """A node's periodic status, as sent and received."""

    name: str
    model_id: str
    node_round: int
    sequence: int
    created_at: float  # Unix seconds
    reward_trend: tuple[float, ...] = ()
    counters: Mapping[str, int] = field(default_factory=dict)
    silo: bool = False
    peers: int = 0
    software_version: str = ""
    admin_address: str = ""  # HOST:PORT the sender advertises for its admin API ("" = none)
    metrics_address: str = ""  # HOST:PORT of its /metrics ("" = none)


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def encode_rollout_batch(
    groups: Sequence[RolloutGroup], *, node_round: int, sequence: int, model_id: str, created_at: float
) -> bytes:
    """Serialize one round's groups (uncompressed; ``seal`` compresses and signs)."""
    batch = wire_pb2.RolloutBatch(
        node_round=node_round, created_at_ms=_ms(created_at), sequence=sequence, model_id=model_id
    )
    for group in groups:
        if len(group.completions) != len(group.finished):
            raise ValueError(
                f"group {group.task.key()}: {len(group.completions)} completions but "
                f"{len(group.finished)} finished flags"
            )
        ref = group.task
        batch.groups.append(
            wire_pb2.RolloutGroup(
                task=wire_pb2.TaskRef(
                    dataset=ref.dataset,
                    config_digest=ref.config_digest,
                    seed=ref.seed,
                    index=ref.index,
                    generator_version=ref.generator_version,
                ),
                question=group.question,
                completions=_encode_completions(group),
                model_id="" if group.model_id == model_id else group.model_id,
            )
        )
    return batch.SerializeToString()


def _float32(value: float) -> float:
    """``value`` rounded to float32 as the wire carries it (inf when out of float32 range)."""
    try:
        return struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def _encode_completions(group: RolloutGroup) -> list[wire_pb2.Completion]:
    """Completions with the behaviour claims when the group has both; receivers reject bad values,
    so they are refused here (ValueError) rather than sent."""
    logprobs, num_tokens = group.behaviour_logprobs, group.behaviour_num_tokens
    if logprobs is None or num_tokens is None:
        return [
            wire_pb2.Completion(text=text, finished=done)
            for text, done in zip(group.completions, group.finished, strict=True)
        ]
    n = len(group.completions)
    if len(logprobs) != n or len(num_tokens) != n:
        raise ValueError(
            f"group {group.task.key()}: {n} completions but {len(logprobs)} behaviour log-probs and "
            f"{len(num_tokens)} token counts"
        )
    for logprob, tokens in zip(logprobs, num_tokens, strict=True):
        if not (math.isfinite(_float32(logprob)) and logprob <= 0.0) or not 0 <= tokens < 1 << 32:
            raise ValueError(
                f"group {group.task.key()}: behaviour log-prob {logprob!r} / token count {tokens!r} "
                f"is not a finite float32 <= 0 / a uint32"
            )
    return [
        wire_pb2.Completion(text=text, finished=done, behaviour_logprob=logprob, num_tokens=tokens)
        for text, done, logprob, tokens in zip(
            group.completions, group.finished, logprobs, num_tokens, strict=True
        )
    ]


def scan_prefix(kind: Kind, prefix: bytes | bytearray, caps: WireCaps) -> None:
    """Pre-scan the first bytes of a payload that is still being inflated; raises WireError."""
    rule = _rollout_batch_rule(caps) if kind == Kind.ROLLOUT_BATCH else _heartbeat_rule(caps)
    scan(prefix, rule, caps, partial=True)


def _parse(
    message: Message, payload: bytes | bytearray, rule: MessageRule, caps: WireCaps, what: str
) -> None:
    """Pre-scan (counts and sizes, nothing built), then parse."""
    scan(payload, rule, caps)
    try:
        message.ParseFromString(payload)
    except DecodeError as exc:
        raise WireError("decode_error", f"payload is not a {what}: {exc}") from None


def _check_chars(value: str, cap: int, what: str) -> None:
    if len(value) > cap:
        raise WireError("schema_cap", f"{what} has {len(value)} characters, cap {cap}")


def decode_rollout_batch(payload: bytes | bytearray, caps: WireCaps, source: str) -> DecodedBatch:
    """Parse an (uncompressed) RolloutBatch, check its caps and build records from ``source``."""
    batch = wire_pb2.RolloutBatch()
    _parse(batch, payload, _rollout_batch_rule(caps), caps, "RolloutBatch")
    _check_batch_caps(batch, caps)
    created_at = batch.created_at_ms / 1000.0
    groups = [
        _with_behaviour(
            RolloutGroup(
                task=TaskRef(
                    dataset=g.task.dataset,
                    config_digest=g.task.config_digest,
                    seed=g.task.seed,
                    index=g.task.index,
                    generator_version=g.task.generator_version,
                ),
                question=g.question,
                completions=tuple(c.text for c in g.completions),
                finished=tuple(c.finished for c in g.completions),
                model_id=g.model_id or batch.model_id,
                round=batch.node_round,
                created_at=created_at,
                source=source,
                sequence=batch.sequence,
            ),
            g,
        )
        for g in batch.groups
    ]
    return DecodedBatch(
        node_round=batch.node_round,
        sequence=batch.sequence,
        model_id=batch.model_id,
        created_at=created_at,
        groups=groups,
    )


def _with_behaviour(group: RolloutGroup, wire_group: wire_pb2.RolloutGroup) -> RolloutGroup:
    """``group`` with the behaviour claims when every completion carries both, else unchanged (None)."""
    completions = wire_group.completions
    if not all(c.HasField("behaviour_logprob") and c.HasField("num_tokens") for c in completions):
        return group
    return replace(
        group,
        behaviour_logprobs=tuple(c.behaviour_logprob for c in completions),
        behaviour_num_tokens=tuple(c.num_tokens for c in completions),
    )


def _check_batch_caps(batch: wire_pb2.RolloutBatch, caps: WireCaps) -> None:
    if not batch.groups:
        raise WireError("schema_cap", "batch has no groups")
    if len(batch.groups) > caps.max_groups_per_batch:
        raise WireError(
            "schema_cap", f"batch has {len(batch.groups)} groups, cap {caps.max_groups_per_batch}"
        )
    _check_chars(batch.model_id, caps.max_name_chars, "model_id")
    for i, group in enumerate(batch.groups):
        n = len(group.completions)
        if n == 0:
            raise WireError("schema_cap", f"group {i} has no completions")
        if n > caps.max_completions_per_group:
            raise WireError(
                "schema_cap", f"group {i} has {n} completions, cap {caps.max_completions_per_group}"
            )
        if not group.HasField("task") or not group.task.dataset:
            raise WireError("schema_cap", f"group {i} has no task reference")
        _check_chars(group.question, caps.max_question_chars, f"group {i} question")
        _check_chars(group.model_id, caps.max_name_chars, f"group {i} model_id")
        for name in ("dataset", "config_digest", "generator_version"):
            _check_chars(getattr(group.task, name), caps.max_name_chars, f"group {i} task.{name}")
        for j, completion in enumerate(group.completions):
            if len(completion.text) > caps.max_chars_per_completion:  # (the label only on failure)
                _check_chars(completion.text, caps.max_chars_per_completion, f"group {i} completion {j}")
            logprob = completion.behaviour_logprob
            if completion.HasField("behaviour_logprob") and not (math.isfinite(logprob) and logprob <= 0.0):
                raise WireError(
                    "schema_cap",
                    f"group {i} completion {j} behaviour_logprob {logprob} is not finite and <= 0",
                )
            if completion.num_tokens > caps.max_tokens_per_completion:
                raise WireError(
                    "schema_cap",
                    f"group {i} completion {j} declares {completion.num_tokens} tokens, "
                    f"cap {caps.max_tokens_per_completion}",
                )


def encode_heartbeat(heartbeat: NodeHeartbeat) -> bytes:
    """Serialize a heartbeat (uncompressed; ``seal`` compresses and signs)."""
    return wire_pb2.Heartbeat(
        name=heartbeat.name,
        model_id=heartbeat.model_id,
        node_round=heartbeat.node_round,
        reward_trend=list(heartbeat.reward_trend),
        counters=dict(heartbeat.counters),
        created_at_ms=_ms(heartbeat.created_at),
        sequence=heartbeat.sequence,
        silo=heartbeat.silo,
        peers=heartbeat.peers,
        software_version=heartbeat.software_version,
        admin_address=heartbeat.admin_address,
        metrics_address=heartbeat.metrics_address,
    ).SerializeToString()


def decode_heartbeat(payload: bytes | bytearray, caps: WireCaps) -> NodeHeartbeat:
    """Parse an (uncompressed) Heartbeat and check its caps."""
    hb = wire_pb2.Heartbeat()
    _parse(hb, payload, _heartbeat_rule(caps), caps, "Heartbeat")
    for name in ("name", "model_id", "software_version", "admin_address", "metrics_address"):
        _check_chars(getattr(hb, name), caps.max_name_chars, f"heartbeat {name}")
    for what, n in (("counters", len(hb.counters)), ("reward_trend points", len(hb.reward_trend))):
        if n > caps.max_heartbeat_entries:
            raise WireError("schema_cap", f"heartbeat has {n} {what}, cap {caps.max_heartbeat_entries}")
    for key in hb.counters:
        _check_chars(key, caps.max_name_chars, "heartbeat counter name")
    if not all(math.isfinite(x) for x in hb.reward_trend):
        raise WireError("schema_cap", "heartbeat reward_trend holds a non-finite value")
    return NodeHeartbeat(
        name=hb.name,
        model_id=hb.model_id,
        node_round=hb.node_round,
        sequence=hb.sequence,
        created_at=hb.created_at_ms / 1000.0,
        reward_trend=tuple(hb.reward_trend),
        counters=dict(hb.counters),
        silo=hb.silo,
        peers=hb.peers,
        software_version=hb.software_version,
        admin_address=hb.admin_address,
        metrics_address=hb.metrics_address,
    )
