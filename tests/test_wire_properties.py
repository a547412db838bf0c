"""Property tests of the wire format (docs/PROTOCOL.md "Payload messages", "Caps and windows").

For arbitrary valid batches and heartbeats, encode -> seal -> open -> decode returns the input.
For arbitrary batches drawn up to one past each cap, decoding accepts exactly those a plain
oracle (the caps as written in PROTOCOL.md) accepts, and rejects the rest with the reason the
oracle names. Arbitrary bytes never raise anything but WireError. Small caps keep examples small;
example counts are modest so the suite stays fast on CI.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmnode import wire
from swarmnode.identity import Identity
from swarmnode.rl.records import RolloutGroup
from swarmnode.tasks.reference import TaskRef
from swarmnode.wire import Kind, NodeHeartbeat, WireCaps, WireError, scan

CAPS = WireCaps(
    max_groups_per_batch=3,
    max_completions_per_group=3,
    max_chars_per_completion=24,
    max_question_chars=24,
    max_name_chars=12,
    max_heartbeat_entries=4,
    max_tokens_per_completion=100,
)
IDENTITY = Identity.generate()
PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

UINT64 = st.integers(0, 2**64 - 1)
# Any Unicode scalar value except surrogates (not encodable as UTF-8, so never on the wire).
CHARS = st.characters(exclude_categories=("Cs",))


def text(max_size: int, min_size: int = 0) -> st.SearchStrategy[str]:
    return st.text(CHARS, min_size=min_size, max_size=max_size)


def float32(**kwargs: object) -> st.SearchStrategy[float]:
    return st.floats(width=32, allow_nan=False, allow_infinity=False, **kwargs)


def round_trip(kind: Kind, payload: bytes, caps: WireCaps = CAPS) -> object:
    return wire.decode_message(wire.open_envelope(wire.seal(IDENTITY, kind, payload), caps), caps)


@st.composite
def groups(draw: st.DrawFn, over: int = 0) -> RolloutGroup:
    """A rollout group within CAPS; with ``over`` = 1 each size may also be one past its cap."""
    n = draw(st.integers(1 - over, CAPS.max_completions_per_group + over))
    claims = draw(st.booleans())
    return RolloutGroup(
        task=TaskRef(
            dataset=draw(text(CAPS.max_name_chars + over, min_size=1)),
            config_digest=draw(text(CAPS.max_name_chars + over)),
            seed=draw(st.integers(-(2**63), 2**63 - 1)),
            index=draw(UINT64),
            generator_version=draw(text(CAPS.max_name_chars + over)),
        ),
        question=draw(text(CAPS.max_question_chars + over)),
        completions=tuple(draw(st.lists(text(CAPS.max_chars_per_completion + over), min_size=n, max_size=n))),
        finished=tuple(draw(st.lists(st.booleans(), min_size=n, max_size=n))),
        model_id=draw(text(CAPS.max_name_chars + over, min_size=1)),
        round=0,
        created_at=0.0,
        behaviour_logprobs=tuple(draw(st.lists(float32(max_value=0.0), min_size=n, max_size=n)))
        if claims
        else None,
        behaviour_num_tokens=(
            tuple(
                draw(
                    st.lists(
                        st.integers(0, CAPS.max_tokens_per_completion + 50 * over), min_size=n, max_size=n
                    )
                )
            )
            if claims
            else None
        ),
    )


@st.composite
def batches(draw: st.DrawFn, over: int = 0) -> tuple[list[RolloutGroup], dict[str, object]]:
    header = {
        "node_round": draw(UINT64),
        "sequence": draw(UINT64),
        "model_id": draw(text(CAPS.max_name_chars + over)),
        "created_at": draw(st.integers(0, 2**45)) / 1000.0,  # whole milliseconds, as on the wire
    }
    found = draw(st.lists(groups(over), min_size=1 - over, max_size=CAPS.max_groups_per_batch + over))
    return found, header


def expected_groups(found: list[RolloutGroup], header: dict[str, object]) -> list[RolloutGroup]:
    """What a receiver builds: batch fields and the signer filled in."""
    return [
        RolloutGroup(
            **{
                **g.__dict__,
                "round": header["node_round"],
                "created_at": header["created_at"],
                "source": IDENTITY.peer_id,
                "sequence": header["sequence"],
            }
        )
        for g in found
    ]


@PROPERTY_SETTINGS
@given(batches())
def test_valid_batches_round_trip(batch: tuple[list[RolloutGroup], dict[str, object]]) -> None:
    found, header = batch
    decoded = round_trip(Kind.ROLLOUT_BATCH, wire.encode_rollout_batch(found, **header))
    assert isinstance(decoded, wire.DecodedBatch)
    assert (decoded.node_round, decoded.sequence, decoded.model_id, decoded.created_at) == (
        header["node_round"],
        header["sequence"],
        header["model_id"],
        header["created_at"],
    )
    assert decoded.groups == expected_groups(found, header)


def cap_violation(found: list[RolloutGroup], header: dict[str, object]) -> bool:
    """The caps of docs/PROTOCOL.md, written independently of the decoder."""
    names = [header["model_id"]]
    if not 1 <= len(found) <= CAPS.max_groups_per_batch:
        return True
    for g in found:
        if not 1 <= len(g.completions) <= CAPS.max_completions_per_group or not g.task.dataset:
            return True
        names += [g.model_id, g.task.dataset, g.task.config_digest, g.task.generator_version]
        if len(g.question) > CAPS.max_question_chars:
            return True
        if any(len(c) > CAPS.max_chars_per_completion for c in g.completions):
            return True
        if g.behaviour_num_tokens and max(g.behaviour_num_tokens) > CAPS.max_tokens_per_completion:
            return True
    return any(len(name) > CAPS.max_name_chars for name in names)


@PROPERTY_SETTINGS
@given(batches(over=1))
def test_batches_near_the_caps_are_accepted_exactly_when_within_them(
    batch: tuple[list[RolloutGroup], dict[str, object]],
) -> None:
    found, header = batch
    payload = wire.encode_rollout_batch(found, **header)
    if cap_violation(found, header):
        with pytest.raises(WireError) as err:
            round_trip(Kind.ROLLOUT_BATCH, payload)
        assert err.value.reason == "schema_cap", err.value
    else:
        assert round_trip(Kind.ROLLOUT_BATCH, payload).groups == expected_groups(found, header)


@PROPERTY_SETTINGS
@given(batches(), st.integers(64, 2048))
def test_payload_cap_is_checked_before_schema_caps(
    batch: tuple[list[RolloutGroup], dict[str, object]], cap: int
) -> None:
    caps = WireCaps(**{**CAPS.__dict__, "max_payload_bytes": cap})
    payload = wire.encode_rollout_batch(*batch[:1], **batch[1])
    if len(payload) > cap:
        with pytest.raises(WireError) as err:
            round_trip(Kind.ROLLOUT_BATCH, payload, caps)
        assert err.value.reason == "oversize"
    else:
        assert round_trip(Kind.ROLLOUT_BATCH, payload, caps).groups


@PROPERTY_SETTINGS
@given(
    name=text(CAPS.max_name_chars),
    model_id=text(CAPS.max_name_chars),
    software_version=text(CAPS.max_name_chars),
    node_round=UINT64,
    sequence=UINT64,
    created_ms=st.integers(0, 2**45),
    reward_trend=st.lists(float32(), max_size=CAPS.max_heartbeat_entries).map(tuple),
    counters=st.dictionaries(text(CAPS.max_name_chars), UINT64, max_size=CAPS.max_heartbeat_entries),
    silo=st.booleans(),
    peers=st.integers(0, 2**32 - 1),
    admin_address=text(CAPS.max_name_chars),
    metrics_address=text(CAPS.max_name_chars),
)
def test_valid_heartbeats_round_trip(created_ms: int, **fields: object) -> None:
    heartbeat = NodeHeartbeat(created_at=created_ms / 1000.0, **fields)
    assert round_trip(Kind.HEARTBEAT, wire.encode_heartbeat(heartbeat)) == heartbeat


@PROPERTY_SETTINGS
@given(
    name=text(CAPS.max_name_chars + 1),
    reward_trend=st.lists(st.floats(width=32), max_size=CAPS.max_heartbeat_entries + 1),
    counters=st.dictionaries(text(CAPS.max_name_chars + 1), UINT64, max_size=CAPS.max_heartbeat_entries + 1),
)
def test_heartbeats_near_the_caps_are_accepted_exactly_when_within_them(
    name: str, reward_trend: list[float], counters: dict[str, int]
) -> None:
    heartbeat = NodeHeartbeat(
        name=name,
        model_id="m",
        node_round=1,
        sequence=1,
        created_at=1.0,
        reward_trend=tuple(reward_trend),
        counters=counters,
    )
    over = (
        len(name) > CAPS.max_name_chars
        or len(reward_trend) > CAPS.max_heartbeat_entries
        or len(counters) > CAPS.max_heartbeat_entries
        or any(len(key) > CAPS.max_name_chars for key in counters)
        or not all(math.isfinite(x) for x in reward_trend)
    )
    payload = wire.encode_heartbeat(heartbeat)
    if over:
        with pytest.raises(WireError) as err:
            round_trip(Kind.HEARTBEAT, payload)
        assert err.value.reason == "schema_cap"
    else:
        assert round_trip(Kind.HEARTBEAT, payload).counters == counters


@PROPERTY_SETTINGS
@given(st.binary(max_size=512), st.sampled_from(list(Kind)))
def test_arbitrary_payload_bytes_only_ever_raise_wire_error(payload: bytes, kind: Kind) -> None:
    try:
        round_trip(kind, payload)
    except WireError as err:
        assert err.reason in {"decode_error", "schema_cap", "oversize"}


@PROPERTY_SETTINGS
@given(st.binary(max_size=256))
def test_arbitrary_envelope_bytes_only_ever_raise_wire_error(data: bytes) -> None:
    try:
        env = wire.open_envelope(data, CAPS)
    except WireError as err:
        assert err.reason in {"decode_error", "unknown_kind"}
        return
    assert env.raw == data
    try:
        wire.decode_message(env, CAPS)
    except WireError as err:
        assert err.reason in {"decode_error", "schema_cap", "oversize"}


@PROPERTY_SETTINGS
@given(batches(), st.data())
def test_a_mutated_sealed_batch_is_rejected_or_decodes(
    batch: tuple[list[RolloutGroup], dict[str, object]], data
) -> None:
    """Flip one byte of a sealed envelope: the result opens and fails verification, or fails to open
    with a WireError; it never raises anything else and never verifies as genuine."""
    sealed = bytearray(
        wire.seal(IDENTITY, Kind.ROLLOUT_BATCH, wire.encode_rollout_batch(*batch[:1], **batch[1]))
    )
    position = data.draw(st.integers(0, len(sealed) - 1))
    sealed[position] ^= data.draw(st.integers(1, 255))
    try:
        env = wire.open_envelope(bytes(sealed), CAPS)
    except WireError:
        return
    assert not wire.verify_envelope(env)


@PROPERTY_SETTINGS
@given(batches(), st.data())
def test_any_prefix_of_a_valid_payload_passes_the_partial_prescan(
    batch: tuple[list[RolloutGroup], dict[str, object]], data
) -> None:
    """The first inflated chunk is pre-scanned (docs/PROTOCOL.md "Canonical encoding and pre-scan"):
    wherever the chunk ends, a valid payload must not be rejected for being cut off."""
    payload = wire.encode_rollout_batch(*batch[:1], **batch[1])
    cut = data.draw(st.integers(0, len(payload)))
    scan.scan(payload[:cut], scan.rollout_batch_rule(CAPS), CAPS, partial=True)


def test_a_cut_off_record_still_has_its_length_checked() -> None:
    """A string whose length header is over its bound is rejected before its body has arrived."""
    too_long = CAPS.string_bytes(CAPS.max_name_chars) + 1
    assert too_long < 0x80  # a one-byte varint
    prefix = b"\x22" + bytes([too_long]) + b"m" * 10  # model_id (field 4), cut off after 10 bytes
    scan.scan(b"\x22\x05mm", scan.rollout_batch_rule(CAPS), CAPS, partial=True)
    with pytest.raises(WireError, match="model_id is 49 bytes") as err:
        scan.scan(prefix, scan.rollout_batch_rule(CAPS), CAPS, partial=True)
    assert err.value.reason == "schema_cap"
