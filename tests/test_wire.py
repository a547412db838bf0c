"""Wire format: round trips, signatures, caps, bounded decompression, no torch import.

Each test checks a rule of docs/PROTOCOL.md; docstrings name the section.
"""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
import typing
import zlib
from pathlib import Path

import pytest
import zstandard
from google.protobuf.descriptor import FieldDescriptor

from swarmnode import wire
from swarmnode.identity import Identity
from swarmnode.p2p.pipeline import Action, Reason
from swarmnode.rl.records import RolloutGroup
from swarmnode.tasks.reference import TaskRef
from swarmnode.wire import (
    Compression,
    Envelope,
    Kind,
    NodeHeartbeat,
    Sequencer,
    WireCaps,
    WireError,
    decode_message,
    encode_heartbeat,
    encode_rollout_batch,
    open_envelope,
    scan,
    seal,
    verify_envelope,
)
from swarmnode.wire.gen import wire_pb2

CAPS = WireCaps()
VALID_BATCH = wire_pb2.RolloutBatch(
    groups=[
        wire_pb2.RolloutGroup(
            task=wire_pb2.TaskRef(dataset="d"), completions=[wire_pb2.Completion(text="x" * 900)]
        )
    ]
).SerializeToString()
EMPTY_GROUPS_BOMB = b"\x2a\x00" * (CAPS.max_payload_bytes // 2 - 16)  # ~4M empty RolloutGroup records


def make_group(
    index: int = 0, completions: tuple[str, ...] = ("<answer>3</answer>", "4"), model_id: str = "tiny-a"
):
    return RolloutGroup(
        task=TaskRef("chain_sum", "d1g35t", 42, index, "0.1.25"),
        question=f"What is 1 + 2? (#{index})",
        completions=completions,
        finished=tuple(i % 2 == 0 for i in range(len(completions))),
        model_id=model_id,
        round=7,
        created_at=1_700_000_000.5,
    )


@pytest.fixture(scope="module")
def identity() -> Identity:
    return Identity.generate()


@pytest.mark.parametrize("compression", [None, Compression.ZLIB, Compression.NONE])
def test_rollout_batch_round_trips_through_a_signed_envelope(
    identity: Identity, compression: Compression | None
) -> None:
    """docs/PROTOCOL.md "Payload messages": a group's empty model_id means the batch's. Senders
    compress with zstd; receivers read all three codes."""
    groups = [make_group(0), make_group(1, ("a", "b", "c"), model_id="other-model")]
    payload = encode_rollout_batch(
        groups, node_round=7, sequence=99, model_id="tiny-a", created_at=1_700_000_000.5
    )
    sealed = seal(
        identity, Kind.ROLLOUT_BATCH, payload, **({} if compression is None else {"compression": compression})
    )
    env = open_envelope(sealed, CAPS)

    assert env.kind is Kind.ROLLOUT_BATCH and env.compression is (
        Compression.ZSTD if compression is None else compression
    )
    assert verify_envelope(env)
    assert env.signer == identity.peer_id
    batch = decode_message(env, CAPS)
    assert isinstance(batch, wire.DecodedBatch)
    assert (batch.node_round, batch.sequence, batch.model_id, batch.created_at) == (
        7,
        99,
        "tiny-a",
        1_700_000_000.5,
    )
    expected = [RolloutGroup(**{**g.__dict__, "source": identity.peer_id, "sequence": 99}) for g in groups]
    assert batch.groups == expected


def test_heartbeat_round_trips(identity: Identity) -> None:
    """docs/PROTOCOL.md "Payload messages" (Heartbeat)."""
    hb = NodeHeartbeat(
        name="node-3",
        model_id="tiny-a",
        node_round=12,
        sequence=5,
        created_at=1_700_000_001.0,
        reward_trend=(0.25, 0.5),
        counters={"groups_sent": 96, "rejected_replay": 1},
        silo=False,
        peers=3,
        software_version="0.1.0",
    )
    env = open_envelope(seal(identity, Kind.HEARTBEAT, encode_heartbeat(hb)), CAPS)
    assert verify_envelope(env)
    assert decode_message(env, CAPS) == hb


def test_tampered_payload_fails_verification(identity: Identity) -> None:
    """docs/PROTOCOL.md "Signing digest": the signature covers sha256 of the payload as carried."""
    data = seal(identity, Kind.ROLLOUT_BATCH, b"payload", compression=Compression.NONE)
    msg = wire_pb2.Envelope.FromString(data)
    msg.payload = b"pAyload"
    assert not verify_envelope(open_envelope(msg.SerializeToString(), CAPS))


def test_signature_does_not_transfer_to_another_kind(identity: Identity) -> None:
    """docs/PROTOCOL.md "Signing digest": the kind is in the digest."""
    msg = wire_pb2.Envelope.FromString(seal(identity, Kind.ROLLOUT_BATCH, b"x"))
    msg.kind = wire_pb2.KIND_HEARTBEAT
    assert not verify_envelope(open_envelope(msg.SerializeToString(), CAPS))


def test_compression_shrinks_text_payloads(identity: Identity) -> None:
    groups = [
        make_group(i, tuple(f"<answer>{i * j}</answer> because {i} times {j}" for j in range(8)))
        for i in range(32)
    ]
    payload = encode_rollout_batch(groups, node_round=1, sequence=1, model_id="tiny-a", created_at=0.0)
    sealed = seal(identity, Kind.ROLLOUT_BATCH, payload)
    assert len(sealed) < len(payload) / 3


def test_oversize_envelope_is_refused_before_parsing() -> None:
    """docs/PROTOCOL.md "Envelope", step 1."""
    with pytest.raises(WireError) as err:
        open_envelope(b"\x00" * (CAPS.max_message_bytes + 1), CAPS)
    assert err.value.reason == "oversize"


def test_seal_refuses_to_build_an_oversize_message(identity: Identity) -> None:
    with pytest.raises(WireError, match="fewer groups") as err:
        seal(identity, Kind.ROLLOUT_BATCH, b"x" * 5000, compression=Compression.NONE, max_message_bytes=4096)
    assert err.value.reason == "oversize"


def zlib_stream(prefix: bytes, zeros: int) -> bytes:
    """zlib of ``prefix`` + ``zeros`` zero bytes, compressed a megabyte at a time (never materialised)."""
    deflate = zlib.compressobj(9)
    parts = [deflate.compress(prefix)]
    block = b"\x00" * (1 << 20)
    for start in range(0, zeros, len(block)):
        parts.append(deflate.compress(block[: min(len(block), zeros - start)]))
    return b"".join(parts) + deflate.flush()


def unknown_field_header(body_bytes: int) -> bytes:
    """The key and length of an unknown length-delimited field (number 127): a schema-valid start."""
    return b"\xfa\x07" + _varint(body_bytes)


def test_seal_refuses_a_payload_receivers_would_find_oversize(identity: Identity) -> None:
    """An honest sender never sends what receivers penalise: here, a heartbeat whose payload
    compresses under the message cap but inflates past the heartbeat payload cap."""
    payload = (
        encode_heartbeat(NodeHeartbeat(name="n", model_id="m", node_round=1, sequence=1, created_at=0.0))
        + unknown_field_header(wire.payload_cap(Kind.HEARTBEAT, CAPS))
        + b"\x00" * wire.payload_cap(Kind.HEARTBEAT, CAPS)
    )
    with pytest.raises(WireError, match="send fewer groups") as err:
        seal(identity, Kind.HEARTBEAT, payload)
    assert err.value.reason == "oversize"
    assert len(zlib.compress(payload)) < CAPS.max_message_bytes  # only the payload cap catches it


def decode_failure_and_peak(env: Envelope, match: str | None = None) -> tuple[WireError, int]:
    """The WireError ``decode_message`` raises on ``env``, and the peak Python allocation meanwhile."""
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match=match) as err:
            decode_message(env, CAPS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return err.value, peak


def test_zip_bomb_is_oversize_without_inflating_it(identity: Identity) -> None:
    """docs/PROTOCOL.md "Caps and windows": ~500 MB of inflation is cut off one byte past the cap."""
    zeros = 64 * CAPS.max_payload_bytes
    bomb = zlib_stream(unknown_field_header(zeros), zeros)
    env = open_envelope(seal_body(identity, Kind.ROLLOUT_BATCH, bomb), CAPS)
    error, peak = decode_failure_and_peak(env, match="inflates beyond")
    assert error.reason == "oversize"
    assert peak < 1.5 * CAPS.max_payload_bytes  # one growing buffer, never the 512 MB


@pytest.mark.parametrize("compression", [Compression.ZSTD, Compression.ZLIB])
def test_bomb_whose_first_records_break_the_schema_costs_one_chunk(
    identity: Identity, compression: Compression
) -> None:
    """docs/PROTOCOL.md "Canonical encoding and pre-scan": the first inflated chunk is pre-scanned
    before the rest is inflated, so an 8 MB bomb of empty groups or of zeros costs ~256 KiB."""
    for payload, reason in (
        (EMPTY_GROUPS_BOMB, "schema_cap"),
        (b"\x00" * CAPS.max_payload_bytes, "decode_error"),
    ):
        env = open_envelope(seal(identity, Kind.ROLLOUT_BATCH, payload, compression=compression), CAPS)
        error, peak = decode_failure_and_peak(env)
        assert error.reason == reason
        assert peak < 1_000_000


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe garbage \x00\x01", "decode_error"),
        (wire_pb2.Envelope(version=2).SerializeToString(), "decode_error"),
        (
            wire_pb2.Envelope(
                version=1, kind=9, signer_public_key=b"k" * 32, signature=b"s" * 64
            ).SerializeToString(),
            "unknown_kind",
        ),
        (
            wire_pb2.Envelope(
                version=1, kind=1, signer_public_key=b"short", signature=b"s" * 64
            ).SerializeToString(),
            "decode_error",
        ),
    ],
)
def test_malformed_envelopes_raise_wire_errors_with_pipeline_reasons(data: bytes, reason: str) -> None:
    """docs/PROTOCOL.md "Envelope"."""
    with pytest.raises(WireError) as err:
        open_envelope(data, CAPS)
    assert err.value.reason == reason


def test_every_wire_failure_is_a_penalised_pipeline_reason() -> None:
    """docs/PROTOCOL.md "Validation rules and penalties": malformed bytes are REJECT, never IGNORE."""
    failures = typing.get_args(wire.WireFailure)
    assert set(failures) == {"oversize", "decode_error", "unknown_kind", "schema_cap"}
    for failure in failures:
        assert Reason(failure).action is Action.REJECT
        assert Reason(failure).penalty > 0


@pytest.mark.parametrize(
    ("groups", "what"),
    [
        ([make_group(i) for i in range(CAPS.max_groups_per_batch + 1)], "groups"),
        ([make_group(0, tuple("x" for _ in range(CAPS.max_completions_per_group + 1)))], "completions"),
        ([make_group(0, ("x" * (CAPS.max_chars_per_completion + 1),))], "characters"),
        ([make_group(0, ())], "no completions"),
        ([], "no groups"),
    ],
)
def test_schema_caps_are_enforced_on_decode(
    identity: Identity, groups: list[RolloutGroup], what: str
) -> None:
    """docs/PROTOCOL.md "Caps and windows"."""
    payload = encode_rollout_batch(groups, node_round=1, sequence=1, model_id="m", created_at=0.0)
    env = open_envelope(seal(identity, Kind.ROLLOUT_BATCH, payload), CAPS)
    with pytest.raises(WireError, match=what) as err:
        decode_message(env, CAPS)
    assert err.value.reason == "schema_cap"


def test_payload_garbage_is_a_decode_error(identity: Identity) -> None:
    """docs/PROTOCOL.md "Canonical encoding and pre-scan"."""
    env = open_envelope(seal(identity, Kind.ROLLOUT_BATCH, b"\xff\xff\xff\xff not protobuf"), CAPS)
    with pytest.raises(WireError) as err:
        decode_message(env, CAPS)
    assert err.value.reason == "decode_error"


def test_sequencer_is_time_based_and_strictly_increasing() -> None:
    """docs/PROTOCOL.md "Payload messages": sequence numbers are max(previous + 1, Unix ms)."""
    now = [1000.0]
    seq = Sequencer(clock=lambda: now[0])
    first, second = seq.next(), seq.next()
    assert (first, second) == (1_000_000, 1_000_001)
    restarted = Sequencer(clock=lambda: now[0] + 5.0)  # a new process five seconds later
    assert restarted.next() > second


def test_caps_come_from_the_p2p_config() -> None:
    from swarmnode.config import P2PConfig

    caps = WireCaps.from_config(P2PConfig(max_message_bytes=500_000, max_completions_per_group=16))
    assert (caps.max_message_bytes, caps.max_completions_per_group, caps.max_payload_bytes) == (
        500_000,
        16,
        4_000_000,
    )


def test_wire_package_does_not_import_torch_or_libp2p() -> None:
    code = "import sys, swarmnode.wire; print('torch' in sys.modules, 'libp2p' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "False"]


# -- helpers for hand-built messages ------------------------------------------------------------


def seal_body(
    identity: Identity, kind: Kind, body: bytes, compression: int = wire_pb2.COMPRESSION_ZLIB
) -> bytes:
    """An envelope around an already compressed ``body``, correctly signed: the bytes an attacker
    with a key can send, so that the test reaches the payload decoder."""
    signature = identity.sign(wire.signing_digest(wire.ENVELOPE_VERSION, kind, compression, body))
    return wire_pb2.Envelope(
        version=wire.ENVELOPE_VERSION,
        kind=int(kind),
        compression=compression,
        payload=body,
        signer_public_key=identity.public_key_bytes,
        signature=signature,
    ).SerializeToString()


def decode_payload(identity: Identity, kind: Kind, payload: bytes, caps: WireCaps = CAPS):
    return decode_message(open_envelope(seal(identity, kind, payload), caps), caps)


def batch_pb(*groups: wire_pb2.RolloutGroup) -> wire_pb2.RolloutBatch:
    return wire_pb2.RolloutBatch(
        node_round=1, created_at_ms=1000, sequence=5, model_id="m", groups=list(groups)
    )


def group_pb(**overrides) -> wire_pb2.RolloutGroup:
    fields = {
        "task": wire_pb2.TaskRef(
            dataset="chain_sum", config_digest="d", seed=1, index=2, generator_version="0.1.25"
        ),
        "question": "q",
        "completions": [wire_pb2.Completion(text="a", finished=True)],
    }
    fields.update(overrides)
    return wire_pb2.RolloutGroup(**fields)


def assert_rejected(
    identity: Identity, kind: Kind, payload: bytes, reason: str, match: str, caps: WireCaps = CAPS
):
    with pytest.raises(WireError, match=match) as err:
        decode_payload(identity, kind, payload, caps)
    assert err.value.reason == reason


# -- behaviour log-probs (Completion fields 3 and 4) ---------------------------------------------


def with_behaviour(group: RolloutGroup, logprobs, num_tokens) -> RolloutGroup:
    return RolloutGroup(
        **{**group.__dict__, "behaviour_logprobs": logprobs, "behaviour_num_tokens": num_tokens}
    )


def test_behaviour_logprobs_round_trip(identity: Identity) -> None:
    """docs/PROTOCOL.md "Payload messages": Completion.behaviour_logprob / num_tokens, float32 on the wire."""
    group = with_behaviour(make_group(0, ("a", "b", "c")), (-1.5, -0.25, 0.0), (3, 1, 0))
    plain = make_group(1)
    payload = encode_rollout_batch(
        [group, plain], node_round=7, sequence=1, model_id="tiny-a", created_at=0.0
    )
    batch = decode_payload(identity, Kind.ROLLOUT_BATCH, payload)
    assert batch.groups[0].behaviour_logprobs == (-1.5, -0.25, 0.0)
    assert batch.groups[0].behaviour_num_tokens == (3, 1, 0)
    assert batch.groups[1].behaviour_logprobs is None and batch.groups[1].behaviour_num_tokens is None


def test_a_group_where_some_completions_lack_the_claim_decodes_with_none(identity: Identity) -> None:
    """docs/PROTOCOL.md "Payload messages": the claim counts only when every completion carries both fields."""
    completions = [
        wire_pb2.Completion(text="a", behaviour_logprob=-1.0, num_tokens=2),
        wire_pb2.Completion(text="b", behaviour_logprob=-2.0),  # no num_tokens
    ]
    batch = decode_payload(
        identity, Kind.ROLLOUT_BATCH, batch_pb(group_pb(completions=completions)).SerializeToString()
    )
    assert len(batch.groups[0].completions) == 2
    assert (batch.groups[0].behaviour_logprobs, batch.groups[0].behaviour_num_tokens) == (None, None)


@pytest.mark.parametrize(
    ("completion", "match"),
    [
        (wire_pb2.Completion(text="a", behaviour_logprob=float("nan"), num_tokens=1), "behaviour_logprob"),
        (wire_pb2.Completion(text="a", behaviour_logprob=float("-inf"), num_tokens=1), "behaviour_logprob"),
        (wire_pb2.Completion(text="a", behaviour_logprob=0.5, num_tokens=1), "behaviour_logprob"),
        (wire_pb2.Completion(text="a", behaviour_logprob=float("inf")), "behaviour_logprob"),
        (
            wire_pb2.Completion(
                text="a", behaviour_logprob=-1.0, num_tokens=CAPS.max_tokens_per_completion + 1
            ),
            "tokens",
        ),
        (wire_pb2.Completion(text="a", num_tokens=CAPS.max_tokens_per_completion + 1), "tokens"),
    ],
)
def test_bad_behaviour_claims_are_schema_cap(identity: Identity, completion, match: str) -> None:
    """docs/PROTOCOL.md "Caps and windows": finite logprob <= 0, num_tokens <= max_tokens_per_completion."""
    payload = batch_pb(group_pb(completions=[completion])).SerializeToString()
    assert_rejected(identity, Kind.ROLLOUT_BATCH, payload, "schema_cap", match)


def test_token_count_at_the_cap_is_accepted(identity: Identity) -> None:
    completion = wire_pb2.Completion(
        text="a", behaviour_logprob=-1.0, num_tokens=CAPS.max_tokens_per_completion
    )
    batch = decode_payload(
        identity, Kind.ROLLOUT_BATCH, batch_pb(group_pb(completions=[completion])).SerializeToString()
    )
    assert batch.groups[0].behaviour_num_tokens == (CAPS.max_tokens_per_completion,)


@pytest.mark.parametrize(
    ("logprobs", "num_tokens"),
    [((0.5,), (1,)), ((float("nan"),), (1,)), ((-1e39,), (1,)), ((-1.0, -2.0), (1,)), ((-1.0,), (-1,))],
)
def test_encoder_refuses_claims_receivers_would_reject(logprobs, num_tokens) -> None:
    group = with_behaviour(make_group(0, ("a",)), logprobs, num_tokens)
    with pytest.raises(ValueError, match="behaviour"):
        encode_rollout_batch([group], node_round=1, sequence=1, model_id="m", created_at=0.0)


# -- allocation before caps (issue 10, item 6) ---------------------------------------------------


def test_inflating_envelope_of_empty_groups_is_rejected_before_the_parser_allocates(
    identity: Identity,
) -> None:
    """docs/PROTOCOL.md "Canonical encoding and pre-scan": an 8 KB envelope inflating to millions of
    empty sub-messages is a schema_cap with Python-level allocation about one payload, not two."""
    data = seal(identity, Kind.ROLLOUT_BATCH, EMPTY_GROUPS_BOMB)
    assert len(data) < 10_000
    error, peak = decode_failure_and_peak(open_envelope(data, CAPS), match="more than 64 groups")
    assert error.reason == "schema_cap"
    assert peak < 1.25 * CAPS.max_payload_bytes  # the old code held two copies (16 MB)


_RSS_PROBE = """
import re
from swarmnode.identity import Identity
from swarmnode.wire import Kind, WireCaps, WireError, decode_message, open_envelope, seal

def peak_rss_kib():  # this process's own high-water mark (ru_maxrss would include the parent's)
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1))

caps = WireCaps()
ident = Identity.generate()
small = open_envelope(seal(ident, Kind.ROLLOUT_BATCH, b"\\x2a\\x00" * 65), caps)
bomb = open_envelope(seal(ident, Kind.ROLLOUT_BATCH, b"\\x2a\\x00" * (caps.max_payload_bytes // 2 - 16)), caps)
for env in (small, bomb):  # the first one warms up lazy imports and the parser
    before = peak_rss_kib()
    try:
        decode_message(env, caps)
    except WireError as exc:
        reason = exc.reason
print(reason, peak_rss_kib() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from Linux /proc")
def test_inflating_envelope_costs_little_native_memory(identity: Identity) -> None:
    """The protobuf parser's own (C) allocations are invisible to tracemalloc: measure the peak
    resident memory of a fresh process instead. The old code grew it by ~310 MB."""
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    reason, grew_kib = out.stdout.split()
    assert reason == "schema_cap"
    assert int(grew_kib) < 64 * 1024, f"peak RSS grew by {int(grew_kib) // 1024} MB"


def test_empty_completions_bomb_inside_one_group_is_capped(identity: Identity) -> None:
    """docs/PROTOCOL.md "Canonical encoding and pre-scan": counts are checked at every nesting level."""
    group = group_pb().SerializeToString() + b"\x1a\x00" * 100_000
    payload = b"\x2a" + _varint(len(group)) + group
    assert_rejected(identity, Kind.ROLLOUT_BATCH, payload, "schema_cap", "more than 64 completions")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_payload_caps_are_derived_per_kind() -> None:
    """docs/PROTOCOL.md "Caps and windows": a heartbeat may inflate to far less than a batch."""
    assert wire.payload_cap(Kind.ROLLOUT_BATCH, CAPS) == CAPS.max_payload_bytes
    assert wire.payload_cap(Kind.HEARTBEAT, CAPS) < 400_000
    small = WireCaps(max_groups_per_batch=1, max_completions_per_group=1, max_chars_per_completion=10)
    assert wire.payload_cap(Kind.ROLLOUT_BATCH, small) < 200_000


def test_heartbeat_payload_over_its_derived_cap_is_oversize(identity: Identity) -> None:
    zeros = wire.payload_cap(Kind.HEARTBEAT, CAPS)
    body = zlib_stream(unknown_field_header(zeros), zeros)
    with pytest.raises(WireError, match="HEARTBEAT payload inflates") as err:
        decode_message(open_envelope(seal_body(identity, Kind.HEARTBEAT, body), CAPS), CAPS)
    assert err.value.reason == "oversize"


def test_payload_at_exactly_the_cap_inflates(identity: Identity) -> None:
    """The cap is inclusive; one byte more is oversize."""
    caps = WireCaps(max_payload_bytes=4096)
    padded = bytes(range(256)) * 16  # open_payload only inflates: the bytes need not parse
    env = open_envelope(seal_body(identity, Kind.HEARTBEAT, zlib.compress(padded)), caps)
    assert wire.open_payload(env, caps) == padded
    env = open_envelope(seal_body(identity, Kind.HEARTBEAT, zlib.compress(padded + b"\x00")), caps)
    with pytest.raises(WireError) as err:
        wire.open_payload(env, caps)
    assert err.value.reason == "oversize"


# -- issue 13: each wire rule has a test that fails when the rule is removed ------------------


@pytest.mark.parametrize(
    ("heartbeat", "match"),
    [
        (wire_pb2.Heartbeat(name="n" * (CAPS.max_name_chars + 1)), "heartbeat name"),
        (wire_pb2.Heartbeat(model_id="m" * (CAPS.max_name_chars + 1)), "heartbeat model_id"),
        (wire_pb2.Heartbeat(software_version="v" * (CAPS.max_name_chars + 1)), "heartbeat software_version"),
        (
            wire_pb2.Heartbeat(counters={f"c{i}": i for i in range(CAPS.max_heartbeat_entries + 1)}),
            "counters",
        ),
        (wire_pb2.Heartbeat(reward_trend=[0.5] * (CAPS.max_heartbeat_entries + 1)), "reward_trend"),
        (wire_pb2.Heartbeat(counters={"k" * (CAPS.max_name_chars + 1): 1}), "counter name"),
        (wire_pb2.Heartbeat(reward_trend=[0.5, float("nan")]), "non-finite"),
        (wire_pb2.Heartbeat(reward_trend=[float("inf")]), "non-finite"),
    ],
)
def test_heartbeat_caps(identity: Identity, heartbeat: wire_pb2.Heartbeat, match: str) -> None:
    """docs/PROTOCOL.md "Caps and windows" (heartbeat rows)."""
    assert_rejected(identity, Kind.HEARTBEAT, heartbeat.SerializeToString(), "schema_cap", match)


def test_heartbeat_at_its_caps_is_accepted(identity: Identity) -> None:
    n = CAPS.max_heartbeat_entries
    hb = wire_pb2.Heartbeat(
        name="n" * CAPS.max_name_chars, counters={f"c{i:03d}": i for i in range(n)}, reward_trend=[0.5] * n
    )
    decoded = decode_payload(identity, Kind.HEARTBEAT, hb.SerializeToString())
    assert len(decoded.counters) == n and len(decoded.reward_trend) == n


def test_empty_packed_records_count_against_the_entry_cap(identity: Identity) -> None:
    """docs/PROTOCOL.md "Canonical encoding and pre-scan": an empty packed record counts as one,
    so a payload of 100,000 of them is not walked record by record."""
    empty_records = b"\x22\x00" * (CAPS.max_heartbeat_entries + 1)
    assert_rejected(identity, Kind.HEARTBEAT, empty_records, "schema_cap", "reward_trend")
    assert decode_payload(identity, Kind.HEARTBEAT, b"\x22\x00" * 3).reward_trend == ()


def test_unpacked_reward_trend_is_read_like_packed(identity: Identity) -> None:
    """docs/PROTOCOL.md "Canonical encoding and pre-scan": repeated floats may be packed or not."""
    unpacked = b"".join(
        b"\x25" + wire_pb2.Heartbeat(reward_trend=[x]).SerializeToString()[-4:] for x in (0.25, 0.5)
    )
    assert decode_payload(identity, Kind.HEARTBEAT, unpacked).reward_trend == (0.25, 0.5)


@pytest.mark.parametrize(
    ("group", "match"),
    [
        (group_pb(task=None), "no task reference"),
        (group_pb(task=wire_pb2.TaskRef(config_digest="d")), "no task reference"),
        (group_pb(question="q" * (CAPS.max_question_chars + 1)), "question"),
        (group_pb(model_id="m" * (CAPS.max_name_chars + 1)), "model_id"),
        (group_pb(task=wire_pb2.TaskRef(dataset="d" * (CAPS.max_name_chars + 1))), "task.dataset"),
        (
            group_pb(task=wire_pb2.TaskRef(dataset="d", config_digest="c" * (CAPS.max_name_chars + 1))),
            "config_digest",
        ),
        (
            group_pb(task=wire_pb2.TaskRef(dataset="d", generator_version="v" * (CAPS.max_name_chars + 1))),
            "generator_version",
        ),
    ],
)
def test_group_field_caps(identity: Identity, group: wire_pb2.RolloutGroup, match: str) -> None:
    """docs/PROTOCOL.md "Caps and windows" (rollout batch rows)."""
    assert_rejected(identity, Kind.ROLLOUT_BATCH, batch_pb(group).SerializeToString(), "schema_cap", match)


def test_batch_model_id_cap(identity: Identity) -> None:
    payload = wire_pb2.RolloutBatch(
        model_id="m" * (CAPS.max_name_chars + 1), groups=[group_pb()]
    ).SerializeToString()
    assert_rejected(identity, Kind.ROLLOUT_BATCH, payload, "schema_cap", "model_id")


def test_multibyte_text_is_capped_in_characters_not_bytes(identity: Identity) -> None:
    """A cap counts Unicode characters: 8192 four-byte characters fit, 8193 do not."""
    at_cap = group_pb(completions=[wire_pb2.Completion(text="\U0001f600" * CAPS.max_chars_per_completion)])
    assert decode_payload(identity, Kind.ROLLOUT_BATCH, batch_pb(at_cap).SerializeToString()).groups
    over = group_pb(
        completions=[wire_pb2.Completion(text="\U0001f600" * (CAPS.max_chars_per_completion + 1))]
    )
    assert_rejected(
        identity, Kind.ROLLOUT_BATCH, batch_pb(over).SerializeToString(), "schema_cap", "completion"
    )
    ascii_over = group_pb(completions=[wire_pb2.Completion(text="x" * (CAPS.max_chars_per_completion + 1))])
    assert_rejected(
        identity, Kind.ROLLOUT_BATCH, batch_pb(ascii_over).SerializeToString(), "schema_cap", "completion 0"
    )


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (zlib.compress(VALID_BATCH)[:-6], "truncated"),
        (zlib.compress(VALID_BATCH) + b"trailing", "trailing"),
        (b"\x78\x9c\xff\xff\xff", "bad zlib"),
        (zlib.compress(VALID_BATCH, 9)[:1], "truncated"),
    ],
)
def test_broken_zlib_is_a_decode_error(identity: Identity, body: bytes, match: str) -> None:
    """docs/PROTOCOL.md "Envelope": a zlib payload is exactly one complete RFC 1950 stream."""
    env = open_envelope(seal_body(identity, Kind.ROLLOUT_BATCH, body), CAPS)
    with pytest.raises(WireError, match=match) as err:
        decode_message(env, CAPS)
    assert err.value.reason == "decode_error"


def test_uncompressed_payload_over_the_cap_is_oversize(identity: Identity) -> None:
    caps = WireCaps(max_payload_bytes=1000)
    env = open_envelope(
        seal(identity, Kind.ROLLOUT_BATCH, b"\x00" * 1001, compression=Compression.NONE), caps
    )
    with pytest.raises(WireError, match="payload 1001 bytes") as err:
        decode_message(env, caps)
    assert err.value.reason == "oversize"
    env = open_envelope(
        seal(
            identity,
            Kind.ROLLOUT_BATCH,
            batch_pb(group_pb()).SerializeToString(),
            compression=Compression.NONE,
        ),
        caps,
    )
    assert decode_message(env, caps).groups[0].question == "q"


def _envelope_fields(identity: Identity, **overrides) -> bytes:
    fields = {
        "version": 1,
        "kind": wire_pb2.KIND_ROLLOUT_BATCH,
        "compression": wire_pb2.COMPRESSION_ZLIB,
        "payload": b"p",
        "signer_public_key": identity.public_key_bytes,
        "signature": b"s" * 64,
    }
    fields.update(overrides)
    return wire_pb2.Envelope(**fields).SerializeToString()


@pytest.mark.parametrize(
    ("overrides", "reason", "match"),
    [
        ({"compression": 7}, "decode_error", "unknown compression 7"),
        ({"signature": b"s" * 63}, "decode_error", "signature is 63 bytes"),
        ({"signature": b"s" * 65}, "decode_error", "signature is 65 bytes"),
        ({"signature": b""}, "decode_error", "signature is 0 bytes"),
        ({"signer_public_key": b"k" * 33}, "decode_error", "signer key is 33 bytes"),
        ({"version": 0}, "decode_error", "version 0"),
        ({"kind": 0}, "unknown_kind", "kind 0"),
    ],
)
def test_envelope_field_rules(identity: Identity, overrides: dict, reason: str, match: str) -> None:
    """docs/PROTOCOL.md "Envelope"."""
    with pytest.raises(WireError, match=match) as err:
        open_envelope(_envelope_fields(identity, **overrides), CAPS)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    "mutate",
    [
        lambda data: data + b"\x38\x01",  # unknown field 7
        lambda data: data + b"\x08\x01",  # version repeated
        lambda data: (
            b"\x10\x01" + data[2:] if data[:2] == b"\x08\x01" else data + b"?"
        ),  # fields out of order
        lambda data: b"\x18\x00" + data,  # default-valued compression written out
    ],
    ids=["unknown-field", "repeated-field", "out-of-order", "default-written"],
)
def test_non_canonical_envelope_encodings_are_rejected(identity: Identity, mutate) -> None:
    """docs/PROTOCOL.md "Message id": one envelope has exactly one encoding, so one id."""
    data = seal(
        identity, Kind.ROLLOUT_BATCH, batch_pb(group_pb()).SerializeToString(), compression=Compression.NONE
    )
    assert open_envelope(data, CAPS).raw == data
    with pytest.raises(WireError, match="canonical|decode") as err:
        open_envelope(mutate(data), CAPS)
    assert err.value.reason == "decode_error"


def test_out_of_order_envelope_is_rejected(identity: Identity) -> None:
    data = seal(identity, Kind.ROLLOUT_BATCH, b"x", compression=Compression.NONE)
    msg = wire_pb2.Envelope.FromString(data)
    swapped = (
        wire_pb2.Envelope(kind=msg.kind).SerializeToString()
        + wire_pb2.Envelope(version=msg.version).SerializeToString()
        + data[4:]
    )
    assert wire_pb2.Envelope.FromString(swapped) == msg  # a lenient parser sees the same message
    with pytest.raises(WireError, match="canonical") as err:
        open_envelope(swapped, CAPS)
    assert err.value.reason == "decode_error"


@pytest.mark.parametrize(
    ("payload", "reason", "match"),
    [
        (
            batch_pb(group_pb()).SerializeToString() + b"\x08\x02",
            "decode_error",
            "node_round occurs more than once",
        ),
        (b"\x2a\x05\x0a\x03\x0a\x01", "decode_error", "runs past the end"),
        (b"\x0b\x00", "decode_error", "invalid field key"),
        (b"\x00\x00", "decode_error", "invalid field key"),
        (b"\x0a\x01x", "decode_error", "wire type 2, expected 0"),
        (b"\x08" + b"\xff" * 11, "decode_error", "varint longer"),
        (b"\x08\xff", "decode_error", "truncated varint"),
        (
            b"".join(b"\xf8\x01" + bytes([i]) for i in range(CAPS.max_unknown_fields + 1)),
            "schema_cap",
            "unknown fields",
        ),
        (b"\x2a\x85\x80\x80\x80\x10", "decode_error", "runs past the end"),
    ],
)
def test_payload_wire_format_rules(identity: Identity, payload: bytes, reason: str, match: str) -> None:
    """docs/PROTOCOL.md "Canonical encoding and pre-scan"."""
    assert_rejected(identity, Kind.ROLLOUT_BATCH, payload, reason, match)


def test_a_newer_senders_unknown_fields_are_tolerated(identity: Identity) -> None:
    """docs/PROTOCOL.md "Canonical encoding and pre-scan": up to max_unknown_fields per message."""
    completion = wire_pb2.Completion(text="a").SerializeToString() + b"\x4a\x03new"  # field 9, a string
    group = group_pb(completions=[]).SerializeToString() + b"\x1a" + _varint(len(completion)) + completion
    payload = (
        batch_pb().SerializeToString() + b"\x2a" + _varint(len(group)) + group + b"\xa0\x06\x01"
    )  # field 100
    batch = decode_payload(identity, Kind.ROLLOUT_BATCH, payload)
    assert batch.groups[0].completions == ("a",)


@pytest.mark.parametrize(
    ("message", "rule"),
    [
        (wire_pb2.RolloutBatch, scan.rollout_batch_rule(CAPS)),
        (wire_pb2.Heartbeat, scan.heartbeat_rule(CAPS)),
    ],
)
def test_prescan_rules_cover_every_field_of_the_proto(message, rule: scan.MessageRule) -> None:
    """The pre-scan must know every field the proto declares (a field it does not know counts as
    unknown and escapes its byte bound): adding a field to wire.proto without a scan rule fails here."""
    descriptor_types = {
        FieldDescriptor.TYPE_STRING: scan.LEN,
        FieldDescriptor.TYPE_BYTES: scan.LEN,
        FieldDescriptor.TYPE_MESSAGE: scan.LEN,
        FieldDescriptor.TYPE_FLOAT: scan.I32,
    }

    def compare(descriptor, rule: scan.MessageRule, where: str) -> None:
        assert set(rule.fields) == {f.number for f in descriptor.fields}, where
        for f in descriptor.fields:
            spec = rule.fields[f.number]
            assert spec.wire_type == descriptor_types.get(f.type, scan.VARINT), f"{where}.{f.name}"
            assert (spec.max_count > 1) == f.is_repeated, f"{where}.{f.name}"
            if f.type == FieldDescriptor.TYPE_STRING:
                assert spec.max_bytes is not None, f"{where}.{f.name} has no byte bound"
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                compare(f.message_type, spec.message, f"{where}.{f.name}")

    compare(message.DESCRIPTOR, rule, message.DESCRIPTOR.name)


def test_every_config_cap_reaches_the_wire_caps() -> None:
    """docs/PROTOCOL.md "Caps and windows": each p2p cap key sets its wire cap (non-default values, so
    a dropped or swapped field shows); the payload cap is 8x the message cap, the token cap 4 per char."""
    from swarmnode.config import P2PConfig

    cfg = P2PConfig(
        max_message_bytes=300_000,
        max_groups_per_batch=5,
        max_completions_per_group=6,
        max_chars_per_completion=700,
        max_question_chars=800,
    )
    assert WireCaps.from_config(cfg) == WireCaps(
        max_message_bytes=300_000,
        max_groups_per_batch=5,
        max_completions_per_group=6,
        max_chars_per_completion=700,
        max_question_chars=800,
        max_payload_bytes=2_400_000,
        max_tokens_per_completion=2_800,
    )


def test_wire_error_keeps_reason_and_detail_apart() -> None:
    err = WireError("schema_cap", "3 groups > 2")
    assert (err.reason, err.detail, str(err)) == ("schema_cap", "3 groups > 2", "schema_cap: 3 groups > 2")


# -- payload caps at their boundaries, with reasons and details (mutation-tested, issue 13) ---------

from dataclasses import replace as _replace  # noqa: E402

from swarmnode.wire.messages import decode_heartbeat, decode_rollout_batch, scan_prefix  # noqa: E402

SMALL = WireCaps(max_groups_per_batch=2, max_completions_per_group=2, max_heartbeat_entries=2)


def _batch(groups: list[RolloutGroup], model_id: str = "tiny-a") -> bytes:
    return encode_rollout_batch(groups, node_round=7, sequence=9, model_id=model_id, created_at=1.5)


def _schema_cap(call, detail: str) -> None:
    with pytest.raises(WireError) as err:
        call()
    assert (err.value.reason, err.value.detail) == ("schema_cap", detail)


def test_batch_caps_are_inclusive_and_name_what_broke() -> None:
    two = [make_group(0, ("a", "b")), make_group(1, ("c", "d"))]
    assert len(decode_rollout_batch(_batch(two), SMALL, "p").groups) == 2  # exactly at both caps
    # one over: the pre-scan counts them before anything is built
    over = _batch([*two, make_group(2)])
    _schema_cap(lambda: decode_rollout_batch(over, SMALL, "p"), "RolloutBatch has more than 2 groups, cap 2")
    three = _batch([make_group(0, ("a", "b", "c"))])
    _schema_cap(
        lambda: decode_rollout_batch(three, SMALL, "p"),
        "RolloutBatch.groups[0] has more than 2 completions, cap 2",
    )
    _schema_cap(lambda: decode_rollout_batch(_batch([]), SMALL, "p"), "batch has no groups")
    long_id = "m" * (SMALL.max_name_chars + 1)
    _schema_cap(
        lambda: decode_rollout_batch(_batch(two, model_id=long_id), SMALL, "p"),
        f"model_id has {len(long_id)} characters, cap {SMALL.max_name_chars}",
    )


@pytest.mark.parametrize("message", ["RolloutBatch", "Heartbeat"])
def test_a_payload_the_prescan_passes_but_protobuf_refuses_is_a_decode_error(message: str) -> None:
    field = getattr(wire_pb2, message).DESCRIPTOR.fields_by_name["model_id"].number
    payload = bytes([field << 3 | 2, 1, 0xFF])  # a string field that is not UTF-8
    with pytest.raises(WireError) as err:
        if message == "RolloutBatch":
            decode_rollout_batch(payload, CAPS, "p")
        else:
            decode_heartbeat(payload, CAPS)
    assert err.value.reason == "decode_error"
    assert (
        err.value.detail
        == f"payload is not a {message}: Error parsing message with type 'swarmnode.v1.{message}'"
    )


def test_heartbeat_caps_name_what_broke() -> None:
    hb = NodeHeartbeat(name="a", model_id="m", node_round=1, sequence=2, created_at=3.0)
    ok = _replace(hb, counters={"x": 1, "y": 2}, reward_trend=(0.5, 0.25))
    assert decode_heartbeat(encode_heartbeat(ok), SMALL).counters == {"x": 1, "y": 2}
    many = _replace(hb, counters={"x": 1, "y": 2, "z": 3})
    _schema_cap(
        lambda: decode_heartbeat(encode_heartbeat(many), SMALL), "Heartbeat has more than 2 counters, cap 2"
    )
    name = "n" * (CAPS.max_name_chars + 1)
    _schema_cap(
        lambda: decode_heartbeat(encode_heartbeat(_replace(hb, counters={name: 1})), CAPS),
        f"heartbeat counter name has {len(name)} characters, cap {CAPS.max_name_chars}",
    )
    nan = _replace(hb, reward_trend=(float("nan"),))
    _schema_cap(
        lambda: decode_heartbeat(encode_heartbeat(nan), CAPS),
        "heartbeat reward_trend holds a non-finite value",
    )


def test_heartbeat_round_trips_every_field() -> None:
    hb = NodeHeartbeat(
        name="node-3", model_id="m", node_round=11, sequence=12, created_at=13.25, reward_trend=(0.5,),
        counters={"accepted": 4}, silo=True, peers=5, software_version="1.2.3",
        admin_address="127.0.0.1:9000", metrics_address="127.0.0.1:9100",
    )  # fmt: skip
    assert decode_heartbeat(encode_heartbeat(hb), CAPS) == hb


def test_batch_round_trips_claims_and_per_group_model_ids() -> None:
    claimed = _replace(
        make_group(0), behaviour_logprobs=(-1.5, -0.25), behaviour_num_tokens=(3, (1 << 32) - 1)
    )
    other_model = make_group(1, model_id="tiny-b")
    caps = WireCaps(max_tokens_per_completion=(1 << 32) - 1)
    decoded = decode_rollout_batch(_batch([claimed, other_model]), caps, "peer").groups
    assert decoded[0] == _replace(claimed, source="peer", sequence=9, created_at=1.5)
    assert decoded[1].model_id == "tiny-b" and decoded[1].behaviour_logprobs is None
    wire_groups = wire_pb2.RolloutBatch.FromString(_batch([claimed, other_model])).groups
    assert [g.model_id for g in wire_groups] == ["", "tiny-b"]  # the batch's model id is not repeated
    half = _replace(make_group(2), behaviour_logprobs=(-1.0, -1.0))  # token counts missing: no claim sent
    assert not any(
        c.HasField("behaviour_logprob")
        for c in wire_pb2.RolloutBatch.FromString(_batch([half])).groups[0].completions
    )


def test_encoder_refuses_a_token_count_past_uint32_and_mismatched_flags() -> None:
    too_many = _replace(make_group(0), behaviour_logprobs=(-1.0, -1.0), behaviour_num_tokens=(1, 1 << 32))
    with pytest.raises(ValueError, match="is not a finite float32 <= 0 / a uint32"):
        _batch([too_many])
    with pytest.raises(ValueError, match=r"2 completions but 1 finished flags"):
        _batch([_replace(make_group(0), finished=(True,))])


def test_prefix_scan_uses_the_kinds_rules() -> None:
    heartbeat = encode_heartbeat(
        NodeHeartbeat(name="a", model_id="m", node_round=1, sequence=2, created_at=3.0)
    )
    scan_prefix(Kind.HEARTBEAT, heartbeat[:10], CAPS)  # a heartbeat's fields are fine for heartbeats
    with pytest.raises(WireError):
        scan_prefix(Kind.ROLLOUT_BATCH, heartbeat[:10], CAPS)


def _rule_table(rule: scan.MessageRule) -> dict:
    return {
        "name": rule.name,
        "fields": {
            n: (f.name, f.wire_type, f.max_count, f.max_bytes, f.packed, f.message and _rule_table(f.message))
            for n, f in rule.fields.items()
        },
    }


def test_prescan_rules_state_each_fields_bound_under_the_caps() -> None:
    """docs/PROTOCOL.md "Canonical encoding and pre-scan": every bound, under caps with distinct values
    so a bound taken from the wrong cap shows (strings: 4 bytes per character)."""
    caps = WireCaps(
        max_name_chars=11, max_chars_per_completion=13, max_question_chars=17,
        max_completions_per_group=3, max_groups_per_batch=5, max_heartbeat_entries=7,
    )  # fmt: skip
    V, L, F = scan.VARINT, scan.LEN, scan.I32
    name = 44
    task = {"name": "task", "fields": {
        1: ("dataset", L, 1, name, False, None), 2: ("config_digest", L, 1, name, False, None),
        3: ("seed", V, 1, None, False, None), 4: ("index", V, 1, None, False, None),
        5: ("generator_version", L, 1, name, False, None),
    }}  # fmt: skip
    completion = {"name": "completion", "fields": {
        1: ("text", L, 1, 52, False, None), 2: ("finished", V, 1, None, False, None),
        3: ("behaviour_logprob", F, 1, None, False, None), 4: ("num_tokens", V, 1, None, False, None),
    }}  # fmt: skip
    group = {"name": "group", "fields": {
        1: ("task", L, 1, None, False, task), 2: ("question", L, 1, 68, False, None),
        3: ("completions", L, 3, None, False, completion), 4: ("model_id", L, 1, name, False, None),
    }}  # fmt: skip
    assert _rule_table(scan.rollout_batch_rule(caps)) == {"name": "RolloutBatch", "fields": {
        1: ("node_round", V, 1, None, False, None), 2: ("created_at_ms", V, 1, None, False, None),
        3: ("sequence", V, 1, None, False, None), 4: ("model_id", L, 1, name, False, None),
        5: ("groups", L, 5, None, False, group),
    }}  # fmt: skip
    counter = {
        "name": "counter",
        "fields": {1: ("key", L, 1, name, False, None), 2: ("value", V, 1, None, False, None)},
    }
    assert _rule_table(scan.heartbeat_rule(caps)) == {"name": "Heartbeat", "fields": {
        1: ("name", L, 1, name, False, None), 2: ("model_id", L, 1, name, False, None),
        3: ("node_round", V, 1, None, False, None), 4: ("reward_trend points", F, 7, None, True, None),
        5: ("counters", L, 7, None, False, counter), 6: ("created_at_ms", V, 1, None, False, None),
        7: ("sequence", V, 1, None, False, None), 8: ("silo", V, 1, None, False, None),
        9: ("peers", V, 1, None, False, None), 10: ("software_version", L, 1, name, False, None),
        11: ("admin_address", L, 1, name, False, None), 12: ("metrics_address", L, 1, name, False, None),
    }}  # fmt: skip


# -- the pre-scan's rules one by one, on a small schema (mutation-tested, issue 13) ------------------

_SUB = scan.MessageRule("S", {1: scan.FieldRule("x", scan.VARINT)})
_TINY = scan.MessageRule(
    "M",
    {
        1: scan.FieldRule("v", scan.VARINT),
        2: scan.FieldRule("s", scan.LEN, max_bytes=3),
        3: scan.FieldRule("r", scan.LEN, max_count=2),
        4: scan.FieldRule("f", scan.I32, max_count=2, packed=True),
        5: scan.FieldRule("sub", scan.LEN, message=_SUB),
        6: scan.FieldRule("d", scan.I64),
    },
)
_ONE_UNKNOWN = WireCaps(max_unknown_fields=1)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x08" + b"\xff" * 9 + b"\x01",  # a 10-byte varint: the longest allowed
        b"\x12\x03abc",  # exactly the byte bound
        b"\x1a\x00" * 2,  # exactly the count cap
        b"\x22\x08" + bytes(8),  # packed: 2 values
        (b"\x22\x04" + bytes(4)) * 2,  # two packed records of one value each
        b"\x25" + bytes(4) + b"\x25" + bytes(4),  # unpacked: 2 values
        b"\x31" + bytes(8),  # a 64-bit field
        b"\x38\x01",  # one unknown field is allowed here
        bytes([0xF8, 0xFF, 0xFF, 0xFF, 0x0F, 0x00]),  # the highest field number (unknown)
        b"\x2a\x02\x08\x01",  # a sub-message
    ],
)
def test_prescan_accepts_what_the_rules_allow(data: bytes) -> None:
    scan.scan(data, _TINY, _ONE_UNKNOWN)


@pytest.mark.parametrize(
    ("data", "reason", "detail"),
    [
        (b"\x08", "decode_error", "M: truncated varint"),
        (b"\x80", "decode_error", "M: truncated varint"),  # in the key
        (b"\x12\x80", "decode_error", "M: truncated varint"),  # in the length
        (b"\x08" + b"\xff" * 10, "decode_error", "M: varint longer than 10 bytes"),
        (b"\x00\x00", "decode_error", "M: invalid field key 0"),
        (b"\x0b", "decode_error", "M: invalid field key 11"),  # start group
        (b"\x0c", "decode_error", "M: invalid field key 12"),  # end group
        (b"\x0e", "decode_error", "M: invalid field key 14"),  # wire type 6
        (bytes([0x80, 0x80, 0x80, 0x80, 0x10]), "decode_error", f"M: invalid field key {1 << 32}"),
        (b"\x12\x05ab", "decode_error", "M: field 2 runs past the end of the message"),
        (b"\x31" + bytes(7), "decode_error", "M: field 6 runs past the end of the message"),
        (b"\x38\x01\x40\x01", "schema_cap", "M has more than 1 unknown fields"),
        (b"\x0a\x00", "decode_error", "M.v: wire type 2, expected 0"),
        (b"\x08\x01\x08\x02", "decode_error", "M.v occurs more than once"),
        (b"\x1a\x00" * 3, "schema_cap", "M has more than 2 r, cap 2"),
        (b"\x12\x04abcd", "schema_cap", "M.s is 4 bytes, over the 3-byte bound"),
        (b"\x22\x0c" + bytes(12), "schema_cap", "M has more than 2 f, cap 2"),
        (b"\x22\x00" * 3, "schema_cap", "M has more than 2 f, cap 2"),  # an empty packed record counts
        (b"\x22\x03abc", "decode_error", "M.f: packed length 3 is not a multiple of 4"),
        (b"\x2a\x02\x0a\x00", "decode_error", "M.sub[0].x: wire type 2, expected 0"),
        (b"\x2a\x00\x2a\x00", "decode_error", "M.sub occurs more than once"),
    ],
)
def test_prescan_refuses_each_broken_rule_with_its_reason(data: bytes, reason: str, detail: str) -> None:
    with pytest.raises(WireError) as err:
        scan.scan(data, _TINY, _ONE_UNKNOWN)
    assert (err.value.reason, err.value.detail) == (reason, detail)


def test_a_partial_prescan_stops_quietly_where_the_bytes_end() -> None:
    for prefix in (b"\x08", b"\x08\xff", b"\x12\x03a", b"\x2a\x02\x08", b"\x31\x00"):
        scan.scan(prefix, _TINY, _ONE_UNKNOWN, partial=True)
        with pytest.raises(WireError):
            scan.scan(prefix, _TINY, _ONE_UNKNOWN)
    with pytest.raises(WireError, match="M.s is 4 bytes"):
        scan.scan(b"\x12\x04a", _TINY, _ONE_UNKNOWN, partial=True)  # the length alone breaks the bound


# -- envelope limits at their boundaries (mutation-tested, issue 13) ---------------------------------


def test_message_id_is_the_sha256_of_the_envelope_bytes(identity: Identity) -> None:
    import hashlib

    data = seal(identity, Kind.HEARTBEAT, b"")
    assert wire.message_id(data) == hashlib.sha256(data).digest() == open_envelope(data, CAPS).message_id


def test_envelope_size_limits_are_inclusive(identity: Identity) -> None:
    data = seal(identity, Kind.HEARTBEAT, b"")
    assert open_envelope(data, WireCaps(max_message_bytes=len(data))).raw == data
    assert seal(identity, Kind.HEARTBEAT, b"", max_message_bytes=len(data)) == data
    with pytest.raises(WireError):
        seal(identity, Kind.HEARTBEAT, b"", max_message_bytes=len(data) - 1)


def test_seal_applies_the_receivers_payload_cap_of_8x_the_message_cap(identity: Identity) -> None:
    """A batch's derived cap is far larger than 8 x 1024: the 8x cap decides (and zeros compress)."""
    assert len(seal(identity, Kind.ROLLOUT_BATCH, bytes(8 * 1024), max_message_bytes=1024)) < 1024
    with pytest.raises(WireError) as err:
        seal(identity, Kind.ROLLOUT_BATCH, bytes(8 * 1024 + 1), max_message_bytes=1024)
    assert err.value.reason == "oversize" and "8193 bytes, over the 8192-byte cap" in err.value.detail


def test_an_uncompressed_payload_of_exactly_the_cap_is_accepted(identity: Identity) -> None:
    caps = WireCaps(max_payload_bytes=100)
    body = bytes(100)
    env = open_envelope(seal_body(identity, Kind.HEARTBEAT, body, wire_pb2.COMPRESSION_NONE), caps)
    assert wire.open_payload(env, caps) == body


def test_a_multi_chunk_payload_inflates_whole_and_only_its_first_chunk_is_prechecked(
    identity: Identity,
) -> None:
    payload = bytes(range(256)) * 3000  # 768,000 bytes: three inflate chunks
    env = open_envelope(seal_body(identity, Kind.ROLLOUT_BATCH, zlib.compress(payload)), CAPS)
    assert wire.open_payload(env, CAPS) == payload  # no pre-check given
    seen: list[int] = []
    assert wire.open_payload(env, CAPS, check_prefix=lambda out: seen.append(len(out))) == payload
    assert seen == [256 * 1024]


def zstd_frame(
    data: bytes, window_log: int = 10, content_size: int | None = None, dict_id: int = 0, magic: bytes = b""
) -> bytes:
    """A hand-built zstd frame (RFC 8878) holding ``data`` in one raw block: what an attacker can
    write, with any window, stated content size and dictionary id (``magic`` overrides the magic)."""
    descriptor = 0x80 | (0x03 if dict_id else 0)  # 4-byte content size, a window descriptor
    header = (magic or bytes.fromhex("28b52ffd")) + bytes([descriptor, (window_log - 10) << 3])
    header += dict_id.to_bytes(4, "little") if dict_id else b""
    header += (len(data) if content_size is None else content_size).to_bytes(4, "little")
    return header + (1 | len(data) << 3).to_bytes(3, "little") + data  # last block, raw


ZSTD_VALID = zstandard.ZstdCompressor().compress(VALID_BATCH)


@pytest.mark.parametrize(
    ("body", "reason", "match"),
    [
        (ZSTD_VALID[:-3], "decode_error", "bad zstd payload"),  # truncated
        (ZSTD_VALID + b"x", "decode_error", "unused data"),
        (ZSTD_VALID + ZSTD_VALID, "decode_error", "unused data"),  # a second frame
        (
            b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"skip" + ZSTD_VALID,
            "decode_error",
            "start with",
        ),
        (
            zstandard.ZstdCompressor(write_content_size=False).compress(VALID_BATCH),
            "decode_error",
            "content size",
        ),
        (zstd_frame(b"", content_size=0) + b"junk", "decode_error", "content size"),
        (zstd_frame(VALID_BATCH, dict_id=7), "decode_error", "dictionary 7"),
        (zstd_frame(VALID_BATCH, content_size=len(VALID_BATCH) + 1), "decode_error", "bad zstd payload"),
        (zstd_frame(VALID_BATCH, magic=b"\x28\xb5\x2f\xfe"), "decode_error", "start with"),
        (b"\x28\xb5\x2f\xfd", "decode_error", "frame header"),
        (zstd_frame(b"x", content_size=CAPS.max_payload_bytes + 1), "oversize", "over its"),
    ],
)
def test_zstd_payload_rules(identity: Identity, body: bytes, reason: str, match: str) -> None:
    """docs/PROTOCOL.md "Envelope", step 5: one zstd frame stating its content size (1 to the cap),
    no dictionary, nothing after it."""
    env = open_envelope(seal_body(identity, Kind.ROLLOUT_BATCH, body, wire_pb2.COMPRESSION_ZSTD), CAPS)
    with pytest.raises(WireError, match=match) as err:
        decode_message(env, CAPS)
    assert err.value.reason == reason


def test_zstd_bomb_over_the_cap_is_refused_from_its_header(identity: Identity) -> None:
    """A 20-byte frame stating 4 GB: refused before any allocation, whatever the blocks hold."""
    env = open_envelope(
        seal_body(
            identity,
            Kind.ROLLOUT_BATCH,
            zstd_frame(b"x", content_size=(1 << 32) - 1),
            wire_pb2.COMPRESSION_ZSTD,
        ),
        CAPS,
    )
    error, peak = decode_failure_and_peak(env, match="over its")
    assert error.reason == "oversize"
    assert peak < 100_000


def test_zstd_window_is_bounded_by_the_payload_cap(identity: Identity) -> None:
    """A frame may not make the receiver reserve a window larger than the kind's cap (rounded up
    to a power of two): here 4 KiB. The same bytes with a 4 KiB window decompress."""
    caps = WireCaps(max_payload_bytes=4096)
    data = bytes(range(256)) * 12
    for window_log, ok in ((12, True), (20, False)):
        body = zstd_frame(data, window_log=window_log)
        env = open_envelope(seal_body(identity, Kind.HEARTBEAT, body, wire_pb2.COMPRESSION_ZSTD), caps)
        if ok:
            assert wire.open_payload(env, caps) == data
        else:
            with pytest.raises(WireError, match="zstd window of 1048576 bytes, over 4096") as err:
                wire.open_payload(env, caps)
            assert err.value.reason == "decode_error"


def test_zstd_payload_at_exactly_the_cap_decompresses(identity: Identity) -> None:
    caps = WireCaps(max_payload_bytes=4096)
    padded = bytes(range(256)) * 16
    for data, ok in ((padded, True), (padded + b"\x00", False)):
        body = zstd_frame(data, window_log=12)
        env = open_envelope(seal_body(identity, Kind.HEARTBEAT, body, wire_pb2.COMPRESSION_ZSTD), caps)
        if ok:
            assert wire.open_payload(env, caps) == data
        else:
            with pytest.raises(WireError, match="over its 4096-byte cap") as err:
                wire.open_payload(env, caps)
            assert err.value.reason == "oversize"


def test_a_multi_chunk_zstd_payload_decompresses_whole_and_only_its_first_chunk_is_prechecked(
    identity: Identity,
) -> None:
    payload = bytes(range(256)) * 3000
    env = open_envelope(seal(identity, Kind.ROLLOUT_BATCH, payload), CAPS)
    assert env.compression is Compression.ZSTD
    seen: list[bytes] = []
    assert wire.open_payload(env, CAPS, check_prefix=lambda out: seen.append(bytes(out))) == payload
    assert seen == [payload[: 256 * 1024]]


def test_an_empty_payload_is_sealed_uncompressed(identity: Identity) -> None:
    """Receivers refuse a zstd frame of no content, so the sender does not make one."""
    env = open_envelope(seal(identity, Kind.HEARTBEAT, b""), CAPS)
    assert env.compression is Compression.NONE and env.payload == b""
    assert wire.open_payload(env, CAPS) == b""


def test_sequences_start_at_the_clock_or_one() -> None:
    assert Sequencer(clock=lambda: 0.0).next() == 1
