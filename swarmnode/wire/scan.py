"""A bounded pre-scan of protobuf wire format: counts and sizes checked before anything is parsed.

A protobuf parser allocates an object per sub-message it meets, so a payload of 4 million empty
``RolloutGroup`` records (8 MB, which zlib packs into 8 KB) costs hundreds of MB inside the parser
before any cap could look at the result. ``scan`` walks the encoded bytes instead, builds nothing,
and raises WireError at the first field that breaks the message's schema or a cap: a repeated
field over its count cap, a string over its byte bound, a singular field that occurs twice, too
many unknown fields, a wrong wire type, a truncated record. Its work is bounded by the caps (it
stops at the first excess), not by the input. Only a payload that passes is handed to
``ParseFromString``, whose allocation is then bounded by the caps too.

The rules mirror protos/swarmnode/v1/wire.proto; docs/PROTOCOL.md ("Canonical encoding and
pre-scan") states them for other implementations.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from swarmnode.wire.caps import WireCaps, WireError

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
_WIDTH = {I64: 8, I32: 4}
_MAX_VARINT_BYTES = 10
_MAX_FIELD_NUMBER = (1 << 29) - 1


@dataclass(frozen=True)
class FieldRule:
    """What one field number may hold: its wire type, how often it may occur, how long it may be."""

    name: str
    wire_type: int
    max_count: int = 1  # 1 = singular: a second occurrence is malformed (canonical encoders never emit it)
    max_bytes: int | None = None  # length-delimited fields: longest allowed body
    message: MessageRule | None = None  # length-delimited sub-message to scan recursively
    packed: bool = False  # repeated fixed-width scalar that may also arrive packed (wire type 2)


@dataclass(frozen=True)
class MessageRule:
    name: str
    fields: Mapping[int, FieldRule] = field(default_factory=dict)


class _Stop(Exception):
    """A partial scan reached the end of the bytes available so far."""


def _varint(buf: memoryview, pos: int, end: int, where: str) -> tuple[int, int]:
    available = min(end, len(buf))
    value = shift = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= available:
            if available < end:
                raise _Stop
            raise WireError("decode_error", f"{where}: truncated varint")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos + i + 1
        shift += 7
    raise WireError("decode_error", f"{where}: varint longer than {_MAX_VARINT_BYTES} bytes")


def scan(
    data: bytes | bytearray | memoryview, rule: MessageRule, caps: WireCaps, *, partial: bool = False
) -> None:
    """Check ``data`` (an encoded ``rule.name``) against its schema and caps; raises WireError.

    ``partial``: ``data`` is only a prefix of the message (the first chunk of a payload still being
    inflated); check what it holds and stop quietly where it ends. Every check that needs only a
    record's key and length (counts, byte bounds) still applies to a record cut off by the end.
    """
    buf = memoryview(data)
    with contextlib.suppress(_Stop):
        _scan(buf, 0, sys.maxsize if partial else len(buf), rule, rule.name, caps.max_unknown_fields)


def _scan(buf: memoryview, pos: int, end: int, rule: MessageRule, where: str, max_unknown: int) -> None:
    """Scan one message occupying buf[pos:end]; ``end`` beyond ``len(buf)`` only in a partial scan."""
    counts: dict[int, int] = {}
    unknown = 0
    available = min(end, len(buf))
    while pos < end:
        if pos >= len(buf):
            raise _Stop
        # One-byte varints (every key of these schemas, most counts) inline; the rest via _varint.
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _varint(buf, pos, end, where)
        number, wire_type = key >> 3, key & 7
        if not 0 < number <= _MAX_FIELD_NUMBER or wire_type in (SGROUP, EGROUP) or wire_type > I32:
            raise WireError("decode_error", f"{where}: invalid field key {key}")
        length = 0
        if wire_type == VARINT:
            if pos < available and buf[pos] < 0x80:
                pos += 1
            else:
                _, pos = _varint(buf, pos, end, where)
            body = pos
        elif wire_type == LEN:
            if pos < available and buf[pos] < 0x80:
                length, body = buf[pos], pos + 1
            else:
                length, body = _varint(buf, pos, end, where)
            pos = body + length
        else:
            body = pos
            pos += _WIDTH[wire_type]
        if pos > end:
            raise WireError("decode_error", f"{where}: field {number} runs past the end of the message")
        spec = rule.fields.get(number)
        if spec is None:
            unknown += 1
            if unknown > max_unknown:
                raise WireError("schema_cap", f"{where} has more than {max_unknown} unknown fields")
        else:
            _check_field(spec, counts, number, wire_type, length, where)
            if spec.message is not None:
                _scan(buf, body, pos, spec.message, f"{where}.{spec.name}[{counts[number] - 1}]", max_unknown)
        if pos > len(buf):
            raise _Stop  # a partial scan: the rest of this record has not arrived


def _check_field(
    spec: FieldRule, counts: dict[int, int], number: int, wire_type: int, length: int, where: str
) -> None:
    """Wire type, occurrence count and byte bound of one record of a known field."""
    if spec.packed and wire_type == LEN:
        width = _WIDTH[spec.wire_type]
        if length % width:
            raise WireError(
                "decode_error", f"{where}.{spec.name}: packed length {length} is not a multiple of {width}"
            )
        occurrences = max(1, length // width)  # an empty packed record still costs a visit
    elif wire_type != spec.wire_type:
        raise WireError(
            "decode_error", f"{where}.{spec.name}: wire type {wire_type}, expected {spec.wire_type}"
        )
    else:
        occurrences = 1
    seen = counts[number] = counts.get(number, 0) + occurrences
    if seen > spec.max_count:
        if spec.max_count == 1:
            raise WireError("decode_error", f"{where}.{spec.name} occurs more than once")
        raise WireError(
            "schema_cap", f"{where} has more than {spec.max_count} {spec.name}, cap {spec.max_count}"
        )
    if spec.max_bytes is not None and length > spec.max_bytes:
        raise WireError(
            "schema_cap", f"{where}.{spec.name} is {length} bytes, over the {spec.max_bytes}-byte bound"
        )


def _string(name: str, chars: int, caps: WireCaps) -> FieldRule:
    return FieldRule(name, LEN, max_bytes=caps.string_bytes(chars))


def rollout_batch_rule(caps: WireCaps) -> MessageRule:
    """The scan schema of swarmnode.v1.RolloutBatch under ``caps``."""
    name = caps.max_name_chars
    task = MessageRule(
        "task",
        {
            1: _string("dataset", name, caps),
            2: _string("config_digest", name, caps),
            3: FieldRule("seed", VARINT),
            4: FieldRule("index", VARINT),
            5: _string("generator_version", name, caps),
        },
    )
    completion = MessageRule(
        "completion",
        {
            1: _string("text", caps.max_chars_per_completion, caps),
            2: FieldRule("finished", VARINT),
            3: FieldRule("behaviour_logprob", I32),
            4: FieldRule("num_tokens", VARINT),
        },
    )
    group = MessageRule(
        "group",
        {
            1: FieldRule("task", LEN, message=task),
            2: _string("question", caps.max_question_chars, caps),
            3: FieldRule("completions", LEN, max_count=caps.max_completions_per_group, message=completion),
            4: _string("model_id", name, caps),
        },
    )
    return MessageRule(
        "RolloutBatch",
        {
            1: FieldRule("node_round", VARINT),
            2: FieldRule("created_at_ms", VARINT),
            3: FieldRule("sequence", VARINT),
            4: _string("model_id", name, caps),
            5: FieldRule("groups", LEN, max_count=caps.max_groups_per_batch, message=group),
        },
    )


def heartbeat_rule(caps: WireCaps) -> MessageRule:
    """The scan schema of swarmnode.v1.Heartbeat under ``caps``."""
    name = caps.max_name_chars
    entries = caps.max_heartbeat_entries
    counter = MessageRule("counter", {1: _string("key", name, caps), 2: FieldRule("value", VARINT)})
    return MessageRule(
        "Heartbeat",
        {
            1: _string("name", name, caps),
            2: _string("model_id", name, caps),
            3: FieldRule("node_round", VARINT),
            4: FieldRule("reward_trend points", I32, max_count=entries, packed=True),
            5: FieldRule("counters", LEN, max_count=entries, message=counter),
            6: FieldRule("created_at_ms", VARINT),
            7: FieldRule("sequence", VARINT),
            8: FieldRule("silo", VARINT),
            9: FieldRule("peers", VARINT),
            10: _string("software_version", name, caps),
            11: _string("admin_address", name, caps),
            12: _string("metrics_address", name, caps),
        },
    )
