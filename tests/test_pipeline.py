"""Validation pipeline and peer scoring: every reason from a crafted message, counted, with its action."""

from __future__ import annotations

import os
import zlib

import pytest

from swarmnode.config import P2PConfig
from swarmnode.identity import Identity
from swarmnode.p2p.pipeline import Action, Reason, ValidationPipeline
from swarmnode.p2p.scoring import PeerScores, TokenBucket
from swarmnode.rl.records import RolloutGroup
from swarmnode.tasks.reference import TaskRef
from swarmnode.wire import Kind, NodeHeartbeat, WireCaps, encode_heartbeat, encode_rollout_batch, seal
from swarmnode.wire.gen import wire_pb2

NOW = 1_700_000_000.0


class FakeClock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pipeline(clock: FakeClock) -> ValidationPipeline:
    return ValidationPipeline(
        WireCaps(),
        rate_msgs_per_s=4.0,
        rate_bytes_per_s=2_000_000.0,
        scores=PeerScores(threshold=-20.0, ban_seconds=300.0, clock=clock),
        clock=clock,
    )


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.generate()


def batch_bytes(ident: Identity, sequence: int, created_at: float = NOW, completions: int = 2) -> bytes:
    group = RolloutGroup(
        task=TaskRef("chain_sum", "d1g35t", 1, sequence % 1000, "0.1.25"),
        question="What is 1 + 2?",
        completions=tuple(f"<answer>{i}</answer>" for i in range(completions)),
        finished=(True,) * completions,
        model_id="tiny-a",
        round=3,
        created_at=created_at,
    )
    payload = encode_rollout_batch([group], node_round=3, sequence=sequence, model_id="tiny-a", created_at=created_at)
    return seal(ident, Kind.ROLLOUT_BATCH, payload)


def tamper(data: bytes, **fields: object) -> bytes:
    msg = wire_pb2.Envelope.FromString(data)
    for name, value in fields.items():
        setattr(msg, name, value)
    return msg.SerializeToString()


def assert_verdict(pipeline: ValidationPipeline, data: bytes, origin: str, reason: Reason, kind: Kind = Kind.ROLLOUT_BATCH):
    before = pipeline.counts[(kind, reason)]
    verdict = pipeline.validate(kind, data, origin)
    assert verdict.reason is reason, verdict.detail
    assert verdict.action is reason.action
    assert pipeline.counts[(kind, reason)] == before + 1
    return verdict


def test_every_reason_has_an_action_and_a_penalty_only_when_rejecting() -> None:
    for reason in Reason:
        assert isinstance(reason.action, Action)
        assert (reason.penalty > 0) == (reason.action is Action.REJECT), reason


def test_rules_are_named_and_cheap_ones_come_first(pipeline: ValidationPipeline) -> None:
    names = [rule.name for rule in pipeline.rules]
    assert names[:3] == ["banned_peer", "size", "envelope"]
    assert names.index("signature") < names.index("payload")  # verify before inflating anything
    assert names.index("rate") < names.index("payload")


def test_valid_batch_is_accepted_with_decoded_groups(pipeline: ValidationPipeline, alice: Identity) -> None:
    verdict = assert_verdict(pipeline, batch_bytes(alice, 1), alice.peer_id, Reason.ACCEPTED)
    assert verdict.accepted and verdict.envelope is not None
    assert [g.source for g in verdict.message.groups] == [alice.peer_id]
    assert pipeline.scores.score(alice.peer_id) > 0
    assert pipeline.peer_counts(alice.peer_id)[Reason.ACCEPTED] == 1


def test_valid_heartbeat_is_accepted(pipeline: ValidationPipeline, alice: Identity) -> None:
    hb = NodeHeartbeat(name="a", model_id="tiny-a", node_round=1, sequence=10, created_at=NOW)
    data = seal(alice, Kind.HEARTBEAT, encode_heartbeat(hb))
    assert assert_verdict(pipeline, data, alice.peer_id, Reason.ACCEPTED, Kind.HEARTBEAT).message == hb


def test_forged_signature_is_rejected_and_peer_penalized(pipeline: ValidationPipeline, alice: Identity) -> None:
    data = tamper(batch_bytes(alice, 1), signature=bytes(64))
    verdict = assert_verdict(pipeline, data, alice.peer_id, Reason.BAD_SIGNATURE)
    assert verdict.action is Action.REJECT
    assert pipeline.scores.score(alice.peer_id) < 0


def test_tampered_payload_is_rejected_as_bad_signature(pipeline: ValidationPipeline, alice: Identity) -> None:
    sealed = batch_bytes(alice, 1)
    env = wire_pb2.Envelope.FromString(sealed)
    other = zlib.compress(zlib.decompress(env.payload).replace(b"What is", b"Why is "))
    assert_verdict(pipeline, tamper(sealed, payload=other), alice.peer_id, Reason.BAD_SIGNATURE)


def test_signer_must_be_the_libp2p_origin(pipeline: ValidationPipeline, alice: Identity) -> None:
    mallory = Identity.generate()
    assert_verdict(pipeline, batch_bytes(alice, 1), mallory.peer_id, Reason.SIGNER_MISMATCH)
    assert pipeline.scores.score(mallory.peer_id) < 0 and pipeline.scores.score(alice.peer_id) == 0


def test_oversize_message_is_rejected(pipeline: ValidationPipeline, alice: Identity) -> None:
    assert_verdict(pipeline, b"\x00" * 1_000_001, alice.peer_id, Reason.OVERSIZE)


def test_zip_bomb_is_rejected_as_oversize(pipeline: ValidationPipeline, alice: Identity) -> None:
    bomb = zlib.compress(b"\x00" * 100_000_000, 9)
    assert len(bomb) < 200_000
    env = wire_pb2.Envelope(version=1, kind=1, compression=1, payload=bomb, signer_public_key=alice.public_key_bytes)
    from swarmnode.wire import signing_digest

    env.signature = alice.sign(signing_digest(1, 1, 1, bomb))
    assert_verdict(pipeline, env.SerializeToString(), alice.peer_id, Reason.OVERSIZE)


def test_random_garbage_is_a_decode_error(pipeline: ValidationPipeline, alice: Identity) -> None:
    rejected = 0
    for size in (1, 7, 100, 5000):
        verdict = pipeline.validate(Kind.ROLLOUT_BATCH, os.urandom(size), alice.peer_id + str(size))
        assert verdict.action is Action.REJECT and verdict.reason in (Reason.DECODE_ERROR, Reason.UNKNOWN_KIND)
        rejected += 1
    total = sum(n for (k, r), n in pipeline.counts.items() if r in (Reason.DECODE_ERROR, Reason.UNKNOWN_KIND))
    assert total == rejected
    assert_verdict(pipeline, b"\xff\xff\xff\xff\xff", alice.peer_id, Reason.DECODE_ERROR)


def test_envelope_on_the_wrong_topic_is_rejected(pipeline: ValidationPipeline, alice: Identity) -> None:
    assert_verdict(pipeline, batch_bytes(alice, 1), alice.peer_id, Reason.UNKNOWN_KIND, Kind.HEARTBEAT)


def test_schema_cap_violation_is_rejected(pipeline: ValidationPipeline, alice: Identity) -> None:
    data = batch_bytes(alice, 1, completions=WireCaps().max_completions_per_group + 1)
    assert "completions" in assert_verdict(pipeline, data, alice.peer_id, Reason.SCHEMA_CAP).detail


def test_duplicate_is_ignored_without_penalty(pipeline: ValidationPipeline, alice: Identity) -> None:
    data = batch_bytes(alice, 1)
    assert_verdict(pipeline, data, alice.peer_id, Reason.ACCEPTED)
    score = pipeline.scores.score(alice.peer_id)
    assert_verdict(pipeline, data, alice.peer_id, Reason.DUPLICATE)
    assert pipeline.scores.score(alice.peer_id) == score


def test_replayed_sequence_is_ignored(pipeline: ValidationPipeline, alice: Identity) -> None:
    assert_verdict(pipeline, batch_bytes(alice, 1_000_000), alice.peer_id, Reason.ACCEPTED)
    # Same sequence, different content (another creation time): a replay, not a duplicate.
    verdict = assert_verdict(pipeline, batch_bytes(alice, 1_000_000, created_at=NOW - 1), alice.peer_id, Reason.REPLAY)
    assert "already seen" in verdict.detail
    # Far below the highest sequence seen from this peer.
    assert_verdict(pipeline, batch_bytes(alice, 1_000_000 - 700_000), alice.peer_id, Reason.REPLAY)
    # Out of order but within the window is fine (gossip reorders messages).
    assert_verdict(pipeline, batch_bytes(alice, 999_000), alice.peer_id, Reason.ACCEPTED)


def test_sequences_are_tracked_per_kind(pipeline: ValidationPipeline, alice: Identity) -> None:
    assert_verdict(pipeline, batch_bytes(alice, 5_000), alice.peer_id, Reason.ACCEPTED)
    hb = NodeHeartbeat(name="a", model_id="m", node_round=1, sequence=5_000, created_at=NOW)
    assert_verdict(pipeline, seal(alice, Kind.HEARTBEAT, encode_heartbeat(hb)), alice.peer_id, Reason.ACCEPTED, Kind.HEARTBEAT)


def test_restarted_node_with_time_based_sequences_is_not_a_replay(
    pipeline: ValidationPipeline, alice: Identity, clock: FakeClock
) -> None:
    from swarmnode.wire import Sequencer

    before = Sequencer(clock=clock)
    for _ in range(3):
        assert_verdict(pipeline, batch_bytes(alice, before.next()), alice.peer_id, Reason.ACCEPTED)
    clock.t += 2.0  # the node restarts two seconds later with a fresh Sequencer
    after = Sequencer(clock=clock)
    assert_verdict(pipeline, batch_bytes(alice, after.next(), created_at=clock.t), alice.peer_id, Reason.ACCEPTED)


def test_stale_and_future_messages_are_ignored(pipeline: ValidationPipeline, alice: Identity) -> None:
    assert_verdict(pipeline, batch_bytes(alice, 1, created_at=NOW - 3600), alice.peer_id, Reason.STALE)
    assert_verdict(pipeline, batch_bytes(alice, 2, created_at=NOW + 3600), alice.peer_id, Reason.STALE)
    assert pipeline.scores.score(alice.peer_id) == 0


def test_message_rate_limit_per_origin(pipeline: ValidationPipeline, alice: Identity, clock: FakeClock) -> None:
    burst = int(pipeline.rate_msgs_per_s * pipeline.burst_seconds)
    for seq in range(1, burst + 1):
        assert_verdict(pipeline, batch_bytes(alice, seq), alice.peer_id, Reason.ACCEPTED)
    assert_verdict(pipeline, batch_bytes(alice, burst + 1), alice.peer_id, Reason.RATE_LIMITED)
    other = Identity.generate()  # other origins have their own bucket
    assert_verdict(pipeline, batch_bytes(other, 1), other.peer_id, Reason.ACCEPTED)
    clock.t += 1.0  # refills at rate_msgs_per_s
    assert_verdict(pipeline, batch_bytes(alice, burst + 2), alice.peer_id, Reason.ACCEPTED)


def test_byte_quota_per_origin(alice: Identity, clock: FakeClock) -> None:
    pipeline = ValidationPipeline(
        WireCaps(max_message_bytes=1024), rate_msgs_per_s=100.0, rate_bytes_per_s=100.0,
        scores=PeerScores(clock=clock), clock=clock, burst_seconds=1.0,
    )  # byte bucket: 1024 bytes of burst (one max-size message), 100 bytes/s after that
    messages = [batch_bytes(alice, seq) for seq in range(101, 107)]
    size = len(messages[0])
    assert all(len(m) == size for m in messages) and size < 1024
    verdicts = [pipeline.validate(Kind.ROLLOUT_BATCH, m, alice.peer_id) for m in messages]
    accepted = 1024 // size
    assert [v.reason for v in verdicts] == [Reason.ACCEPTED] * accepted + [Reason.QUOTA_EXCEEDED] * (6 - accepted)
    assert pipeline.counts[(Kind.ROLLOUT_BATCH, Reason.QUOTA_EXCEEDED)] == 6 - accepted


def test_peer_below_threshold_is_banned_then_ignored_until_the_ban_expires(
    pipeline: ValidationPipeline, alice: Identity, clock: FakeClock
) -> None:
    forged = tamper(batch_bytes(alice, 1), signature=bytes(64))
    verdict = assert_verdict(pipeline, forged, alice.peer_id, Reason.BAD_SIGNATURE)
    assert verdict.banned_now and pipeline.scores.is_banned(alice.peer_id)
    assert alice.peer_id in pipeline.snapshot()["banned"]
    assert_verdict(pipeline, batch_bytes(alice, 2), alice.peer_id, Reason.BANNED_PEER)
    clock.t += 299.0
    assert pipeline.scores.is_banned(alice.peer_id) and pipeline.scores.ban_expired() == []
    clock.t += 2.0
    assert pipeline.scores.ban_expired() == [alice.peer_id]
    assert pipeline.scores.score(alice.peer_id) == 0.0
    assert_verdict(pipeline, batch_bytes(alice, 3, created_at=clock.t), alice.peer_id, Reason.ACCEPTED)


def test_scores_decay_toward_zero(clock: FakeClock) -> None:
    scores = PeerScores(threshold=-20.0, ban_seconds=60.0, clock=clock, half_life_s=10.0)
    assert not scores.penalize("p", Reason.DECODE_ERROR)
    assert scores.score("p") == -10.0
    clock.t += 10.0
    assert scores.score("p") == pytest.approx(-5.0)
    assert not scores.penalize("p", Reason.DECODE_ERROR)  # -15: still above the threshold
    assert scores.penalize("p", Reason.DECODE_ERROR)  # -25: banned by this call
    assert scores.snapshot()["p"].bans == 1


def test_node_reports_count_and_penalize(pipeline: ValidationPipeline) -> None:
    assert not pipeline.report("peer-x", Reason.QUESTION_MISMATCH)
    assert not pipeline.report("peer-x", Reason.TASK_UNKNOWN)
    assert pipeline.scores.score("peer-x") == -5.0
    assert pipeline.counts[(Kind.ROLLOUT_BATCH, Reason.QUESTION_MISMATCH)] == 1
    assert pipeline.snapshot()["counts"]["rollout_batch/task_unknown"] == 1


def test_an_exception_inside_a_rule_becomes_internal_error(pipeline: ValidationPipeline, alice: Identity) -> None:
    def explode(_candidate: object) -> None:
        raise RuntimeError("bug in a rule")

    pipeline.rules.insert(3, pipeline.rules[3]._replace(check=explode))
    verdict = assert_verdict(pipeline, batch_bytes(alice, 1), alice.peer_id, Reason.INTERNAL_ERROR)
    assert "bug in a rule" in verdict.detail and pipeline.scores.score(alice.peer_id) == 0


def test_validate_never_raises_on_any_input(pipeline: ValidationPipeline) -> None:
    for data in (b"", b"\x00", bytearray(b"\x0a\x05hello"), memoryview(b"\x12\x00")):
        assert pipeline.validate(Kind.ROLLOUT_BATCH, data, "p").action is not Action.ACCEPT
    assert pipeline.validate(99, b"x", "p").reason is Reason.INTERNAL_ERROR  # type: ignore[arg-type]


def test_from_config_uses_the_p2p_section(clock: FakeClock) -> None:
    cfg = P2PConfig(max_message_bytes=2048, score_threshold=-5.0, rate_msgs_per_s=1.0)
    pipeline = ValidationPipeline.from_config(cfg, clock=clock)
    assert pipeline.caps.max_message_bytes == 2048 and pipeline.scores.threshold == -5.0
    assert pipeline.validate(Kind.HEARTBEAT, b"\x00" * 2049, "p").reason is Reason.OVERSIZE


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, capacity=4.0, now=0.0)
    assert all(bucket.take(1, 0.0) for _ in range(4)) and not bucket.take(1, 0.0)
    assert bucket.take(1, 0.5) and not bucket.take(1, 0.5)
