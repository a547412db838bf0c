"""Wire format: round trips, signatures, caps, bounded decompression, no torch import."""

from __future__ import annotations

import subprocess
import sys
import zlib

import pytest

from swarmnode import wire
from swarmnode.identity import Identity
from swarmnode.p2p.pipeline import Reason
from swarmnode.rl.records import RolloutGroup
from swarmnode.tasks.reference import TaskRef
from swarmnode.wire import (
    Compression,
    Kind,
    NodeHeartbeat,
    Sequencer,
    WireCaps,
    WireError,
    decode_message,
    encode_heartbeat,
    encode_rollout_batch,
    open_envelope,
    seal,
    verify_envelope,
)
from swarmnode.wire.gen import wire_pb2

CAPS = WireCaps()


def make_group(index: int = 0, completions: tuple[str, ...] = ("<answer>3</answer>", "4"), model_id: str = "tiny-a"):
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


def test_rollout_batch_round_trips_through_a_signed_envelope(identity: Identity) -> None:
    groups = [make_group(0), make_group(1, ("a", "b", "c"), model_id="other-model")]
    payload = encode_rollout_batch(groups, node_round=7, sequence=99, model_id="tiny-a", created_at=1_700_000_000.5)
    env = open_envelope(seal(identity, Kind.ROLLOUT_BATCH, payload), CAPS)

    assert env.kind is Kind.ROLLOUT_BATCH and env.compression is Compression.ZLIB
    assert verify_envelope(env)
    assert env.signer == identity.peer_id
    batch = decode_message(env, CAPS)
    assert isinstance(batch, wire.DecodedBatch)
    assert (batch.node_round, batch.sequence, batch.model_id, batch.created_at) == (7, 99, "tiny-a", 1_700_000_000.5)
    expected = [
        RolloutGroup(**{**g.__dict__, "source": identity.peer_id, "sequence": 99}) for g in groups
    ]
    assert batch.groups == expected


def test_heartbeat_round_trips(identity: Identity) -> None:
    hb = NodeHeartbeat(
        name="node-3", model_id="tiny-a", node_round=12, sequence=5, created_at=1_700_000_001.0,
        reward_trend=(0.25, 0.5), counters={"groups_sent": 96, "rejected_replay": 1}, silo=False,
        peers=3, software_version="0.1.0",
    )
    env = open_envelope(seal(identity, Kind.HEARTBEAT, encode_heartbeat(hb)), CAPS)
    assert verify_envelope(env)
    assert decode_message(env, CAPS) == hb


def test_tampered_payload_fails_verification(identity: Identity) -> None:
    data = seal(identity, Kind.ROLLOUT_BATCH, b"payload", compression=Compression.NONE)
    msg = wire_pb2.Envelope.FromString(data)
    msg.payload = b"pAyload"
    assert not verify_envelope(open_envelope(msg.SerializeToString(), CAPS))


def test_signature_does_not_transfer_to_another_kind(identity: Identity) -> None:
    msg = wire_pb2.Envelope.FromString(seal(identity, Kind.ROLLOUT_BATCH, b"x"))
    msg.kind = wire_pb2.KIND_HEARTBEAT
    assert not verify_envelope(open_envelope(msg.SerializeToString(), CAPS))


def test_compression_shrinks_text_payloads(identity: Identity) -> None:
    groups = [make_group(i, tuple(f"<answer>{i * j}</answer> because {i} times {j}" for j in range(8))) for i in range(32)]
    payload = encode_rollout_batch(groups, node_round=1, sequence=1, model_id="tiny-a", created_at=0.0)
    sealed = seal(identity, Kind.ROLLOUT_BATCH, payload)
    assert len(sealed) < len(payload) / 3


def test_oversize_envelope_is_refused_before_parsing() -> None:
    with pytest.raises(WireError) as err:
        open_envelope(b"\x00" * (CAPS.max_message_bytes + 1), CAPS)
    assert err.value.reason == "oversize"


def test_seal_refuses_to_build_an_oversize_message(identity: Identity) -> None:
    with pytest.raises(WireError, match="fewer groups") as err:
        seal(identity, Kind.ROLLOUT_BATCH, b"x" * 5000, compression=Compression.NONE, max_message_bytes=4096)
    assert err.value.reason == "oversize"


def test_zip_bomb_is_oversize_without_inflating_it(identity: Identity) -> None:
    bomb = zlib.compress(b"\x00" * (64 * CAPS.max_payload_bytes), 9)  # ~500 MB inflated
    msg = wire_pb2.Envelope.FromString(seal(identity, Kind.ROLLOUT_BATCH, b"x"))
    msg.payload = bomb
    env = open_envelope(msg.SerializeToString(), CAPS)
    with pytest.raises(WireError) as err:
        decode_message(env, CAPS)
    assert err.value.reason == "oversize"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe garbage \x00\x01", "decode_error"),
        (wire_pb2.Envelope(version=2).SerializeToString(), "decode_error"),
        (wire_pb2.Envelope(version=1, kind=9, signer_public_key=b"k" * 32, signature=b"s" * 64).SerializeToString(), "unknown_kind"),
        (wire_pb2.Envelope(version=1, kind=1, signer_public_key=b"short", signature=b"s" * 64).SerializeToString(), "decode_error"),
    ],
)
def test_malformed_envelopes_raise_wire_errors_with_pipeline_reasons(data: bytes, reason: str) -> None:
    with pytest.raises(WireError) as err:
        open_envelope(data, CAPS)
    assert err.value.reason == reason
    assert Reason(err.value.reason).value == reason


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
def test_schema_caps_are_enforced_on_decode(identity: Identity, groups: list[RolloutGroup], what: str) -> None:
    payload = encode_rollout_batch(groups, node_round=1, sequence=1, model_id="m", created_at=0.0)
    env = open_envelope(seal(identity, Kind.ROLLOUT_BATCH, payload), CAPS)
    with pytest.raises(WireError, match=what) as err:
        decode_message(env, CAPS)
    assert err.value.reason == "schema_cap"


def test_payload_garbage_is_a_decode_error(identity: Identity) -> None:
    env = open_envelope(seal(identity, Kind.ROLLOUT_BATCH, b"\xff\xff\xff\xff not protobuf"), CAPS)
    with pytest.raises(WireError) as err:
        decode_message(env, CAPS)
    assert err.value.reason == "decode_error"


def test_sequencer_is_time_based_and_strictly_increasing() -> None:
    now = [1000.0]
    seq = Sequencer(clock=lambda: now[0])
    first, second = seq.next(), seq.next()
    assert (first, second) == (1_000_000, 1_000_001)
    restarted = Sequencer(clock=lambda: now[0] + 5.0)  # a new process five seconds later
    assert restarted.next() > second


def test_caps_come_from_the_p2p_config() -> None:
    from swarmnode.config import P2PConfig

    caps = WireCaps.from_config(P2PConfig(max_message_bytes=500_000, max_completions_per_group=16))
    assert (caps.max_message_bytes, caps.max_completions_per_group, caps.max_payload_bytes) == (500_000, 16, 4_000_000)


def test_wire_package_does_not_import_torch_or_libp2p() -> None:
    code = "import sys, swarmnode.wire; print('torch' in sys.modules, 'libp2p' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "False"]
