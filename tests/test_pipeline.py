"""Validation pipeline and peer scoring: every reason from a crafted message, counted, with its action and
who pays for it; every window and table bounded; verdicts a function of the message bytes."""

from __future__ import annotations

import logging
import os
import re
import zlib
from collections import Counter

import pytest
import zstandard

from swarmnode.config import P2PConfig
from swarmnode.identity import Identity
from swarmnode.p2p import pipeline as pipeline_module
from swarmnode.p2p.pipeline import (
    ADMIT_BURST,
    ADMIT_PER_S,
    RELAY_BYTES_FACTOR,
    RELAY_RATE_FACTOR,
    RELAY_REPORT_FACTOR,
    Action,
    Blame,
    Reason,
    ValidationPipeline,
    rule_docs,
)
from swarmnode.p2p.scoring import BanRecord, PeerScores, TokenBucket
from swarmnode.rl.records import RolloutGroup
from swarmnode.tasks.reference import TaskRef
from swarmnode.wire import (
    Kind,
    NodeHeartbeat,
    WireCaps,
    encode_heartbeat,
    encode_rollout_batch,
    message_id,
    seal,
    signing_digest,
)
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


def make_pipeline(clock: FakeClock, **kwargs: object) -> ValidationPipeline:
    scores = PeerScores(
        threshold=-20.0, ban_seconds=300.0, clock=clock, max_peers=int(kwargs.pop("max_peers", 10_000))
    )
    return ValidationPipeline(
        kwargs.pop("caps", WireCaps()),  # type: ignore[arg-type]
        rate_msgs_per_s=float(kwargs.pop("rate_msgs_per_s", 4.0)),  # type: ignore[arg-type]
        rate_bytes_per_s=float(kwargs.pop("rate_bytes_per_s", 2_000_000.0)),  # type: ignore[arg-type]
        scores=scores,
        clock=clock,
        max_peers=scores.max_peers,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
def pipeline(clock: FakeClock) -> ValidationPipeline:
    return make_pipeline(clock)


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def mallory() -> Identity:
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
    payload = encode_rollout_batch(
        [group], node_round=3, sequence=sequence, model_id="tiny-a", created_at=created_at
    )
    return seal(ident, Kind.ROLLOUT_BATCH, payload)


def tamper(data: bytes, **fields: object) -> bytes:
    msg = wire_pb2.Envelope.FromString(data)
    for name, value in fields.items():
        setattr(msg, name, value)
    return msg.SerializeToString()


def assert_verdict(
    pipeline: ValidationPipeline, data: bytes, forwarder: str, reason: Reason, kind: Kind = Kind.ROLLOUT_BATCH
):
    before = pipeline.counts[(kind, reason)]
    verdict = pipeline.validate(kind, data, forwarder)
    assert verdict.reason is reason, verdict.detail
    assert verdict.action is reason.action
    assert pipeline.counts[(kind, reason)] == before + 1
    return verdict


# -- the policy and the rules' documentation ---------------------------------------------------


def test_every_reason_has_an_action_and_a_penalty_only_when_rejecting() -> None:
    for reason in Reason:
        assert isinstance(reason.action, Action)
        assert (reason.penalty > 0) == (reason.action is Action.REJECT), reason
        assert (reason.blame is Blame.NOBODY) == (reason.action is not Action.REJECT), reason


def test_rules_are_named_and_cheap_ones_come_first(pipeline: ValidationPipeline) -> None:
    names = [rule.name for rule in pipeline.rules]
    assert names[:4] == ["banned_forwarder", "size", "relay_rate", "duplicate"]
    assert names.index("signature") < names.index("payload")  # verify before inflating anything
    assert names.index("rate") < names.index("payload")
    assert names.index("duplicate") < names.index("rate")  # duplicates spend no rate tokens


def test_every_rule_has_a_one_line_reject_or_ignore_docstring(pipeline: ValidationPipeline) -> None:
    docs = rule_docs(pipeline)
    assert len(docs) == len(pipeline.rules) >= 14
    for rule, (name, tag, condition) in zip(pipeline.rules, docs, strict=True):
        assert rule.check.__name__.startswith("_check_"), name
        assert re.fullmatch(r"\[(REJECT|IGNORE)\] [^\n]+\.", rule.check.__doc__ or ""), (
            name,
            rule.check.__doc__,
        )
        assert tag in ("REJECT", "IGNORE") and condition, name
    tags = dict((name, tag) for name, tag, _ in docs)
    # The tag says what the rule's reasons do.
    assert tags["signature"] == "REJECT" and Reason.BAD_SIGNATURE.action is Action.REJECT
    assert tags["duplicate"] == "IGNORE" and Reason.DUPLICATE.action is Action.IGNORE
    assert tags["admission"] == "IGNORE" and Reason.ADMISSION_LIMITED.action is Action.IGNORE
    # Numbers written in docstrings are the constants the code uses.
    relay = dict((name, cond) for name, _, cond in docs)["relay_rate"]
    assert f"{RELAY_RATE_FACTOR:g}x" in relay and f"{RELAY_BYTES_FACTOR:g}x" in relay
    admission = dict((name, cond) for name, _, cond in docs)["admission"]
    assert f"{ADMIT_BURST:g}" in admission and f"1 per {1 / ADMIT_PER_S:g} s" in admission


# -- content rules ---------------------------------------------------------------------------


def test_valid_batch_is_accepted_with_its_author_and_forwarder(
    pipeline: ValidationPipeline, alice: Identity
) -> None:
    verdict = assert_verdict(pipeline, batch_bytes(alice, 1), alice.peer_id, Reason.ACCEPTED)
    assert verdict.accepted and verdict.envelope is not None
    assert (verdict.author, verdict.forwarder) == (alice.peer_id, alice.peer_id)
    assert [g.source for g in verdict.message.groups] == [alice.peer_id]
    assert pipeline.scores.score(alice.peer_id) > 0
    assert pipeline.peer_counts(alice.peer_id)[Reason.ACCEPTED] == 1


def test_valid_heartbeat_is_accepted(pipeline: ValidationPipeline, alice: Identity) -> None:
    hb = NodeHeartbeat(name="a", model_id="tiny-a", node_round=1, sequence=10, created_at=NOW)
    data = seal(alice, Kind.HEARTBEAT, encode_heartbeat(hb))
    assert assert_verdict(pipeline, data, alice.peer_id, Reason.ACCEPTED, Kind.HEARTBEAT).message == hb


def test_a_genuine_envelope_forwarded_by_another_peer_is_accepted_as_its_authors(
    pipeline: ValidationPipeline, alice: Identity, mallory: Identity
) -> None:
    """Validity is a function of the bytes: who publishes a genuine envelope does not matter."""
    verdict = assert_verdict(pipeline, batch_bytes(alice, 1), mallory.peer_id, Reason.ACCEPTED)
    assert (verdict.author, verdict.forwarder) == (alice.peer_id, mallory.peer_id)
    assert pipeline.scores.score(alice.peer_id) > 0 and pipeline.scores.score(mallory.peer_id) == 0
    assert "signer_mismatch" not in {str(r) for r in Reason}


def test_a_forged_copy_has_another_id_and_cannot_get_the_genuine_one_dropped(
    pipeline: ValidationPipeline, alice: Identity, mallory: Identity
) -> None:
    genuine = batch_bytes(alice, 1)
    forged = tamper(genuine, signature=bytes(64))
    assert message_id(forged) != message_id(genuine)
    assert_verdict(pipeline, forged, mallory.peer_id, Reason.BAD_SIGNATURE)
    assert_verdict(pipeline, forged, "relay-2", Reason.BAD_SIGNATURE)  # cached by content, still counted
    assert_verdict(pipeline, genuine, alice.peer_id, Reason.ACCEPTED)


def test_bad_signature_penalizes_the_forwarder_not_the_claimed_author(
    pipeline: ValidationPipeline, alice: Identity, mallory: Identity
) -> None:
    data = tamper(batch_bytes(alice, 1), signature=bytes(64))
    verdict = assert_verdict(pipeline, data, mallory.peer_id, Reason.BAD_SIGNATURE)
    assert verdict.banned_now == (mallory.peer_id,)
    assert pipeline.scores.score(alice.peer_id) == 0 and pipeline.scores.is_banned(mallory.peer_id)
    assert not pipeline.scores.is_banned(alice.peer_id)


def test_tampered_payload_is_rejected_as_bad_signature(pipeline: ValidationPipeline, alice: Identity) -> None:
    sealed = batch_bytes(alice, 1)
    env = wire_pb2.Envelope.FromString(sealed)
    other = zstandard.ZstdCompressor().compress(
        zstandard.ZstdDecompressor().decompress(env.payload).replace(b"What is", b"Why is ")
    )
    assert_verdict(pipeline, tamper(sealed, payload=other), alice.peer_id, Reason.BAD_SIGNATURE)


def test_oversize_message_is_rejected(pipeline: ValidationPipeline, alice: Identity) -> None:
    assert_verdict(pipeline, b"\x00" * 1_000_001, alice.peer_id, Reason.OVERSIZE)
    assert pipeline.scores.score(alice.peer_id) == -Reason.OVERSIZE.penalty


def test_zip_bomb_is_rejected_as_oversize_and_blames_author_and_forwarder(
    pipeline: ValidationPipeline, alice: Identity, mallory: Identity
) -> None:
    # A schema-valid start (an unknown field 127 of 100 MB) so that only the payload cap stops it.
    bomb = zlib.compress(b"\xfa\x07\x80\xc2\xd7\x2f" + b"\x00" * 100_000_000, 9)
    assert len(bomb) < 200_000
    env = wire_pb2.Envelope(
        version=1, kind=1, compression=1, payload=bomb, signer_public_key=alice.public_key_bytes
    )
    env.signature = alice.sign(signing_digest(1, 1, 1, bomb))
    verdict = assert_verdict(pipeline, env.SerializeToString(), mallory.peer_id, Reason.OVERSIZE)
    assert verdict.author == alice.peer_id  # the signature verified: alice signed the bomb
    assert pipeline.scores.score(alice.peer_id) == pipeline.scores.score(mallory.peer_id) == -10.0


def test_random_garbage_is_a_decode_error_against_the_forwarder(
    pipeline: ValidationPipeline, alice: Identity
) -> None:
    rejected = 0
    for size in (1, 7, 100, 5000):
        verdict = pipeline.validate(Kind.ROLLOUT_BATCH, os.urandom(size), alice.peer_id + str(size))
        assert verdict.action is Action.REJECT and verdict.reason in (
            Reason.DECODE_ERROR,
            Reason.UNKNOWN_KIND,
        )
        assert pipeline.scores.score(alice.peer_id + str(size)) < 0
        rejected += 1
    total = sum(n for (k, r), n in pipeline.counts.items() if r in (Reason.DECODE_ERROR, Reason.UNKNOWN_KIND))
    assert total == rejected
    assert_verdict(pipeline, b"\xff\xff\xff\xff\xff", alice.peer_id, Reason.DECODE_ERROR)


def test_known_junk_is_rejected_again_without_reparsing_and_per_topic(
    pipeline: ValidationPipeline, alice: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = batch_bytes(alice, 1)
    assert_verdict(pipeline, data, "relay-1", Reason.UNKNOWN_KIND, Kind.HEARTBEAT)
    calls = []
    monkeypatch.setattr(pipeline_module, "open_envelope", lambda *a: calls.append(a))
    assert_verdict(pipeline, data, "relay-2", Reason.UNKNOWN_KIND, Kind.HEARTBEAT)
    assert calls == [] and pipeline.scores.score("relay-2") == -Reason.UNKNOWN_KIND.penalty
    monkeypatch.undo()
    assert_verdict(pipeline, data, alice.peer_id, Reason.ACCEPTED)  # the right topic: the same bytes are fine


def test_envelope_on_the_wrong_topic_is_rejected(pipeline: ValidationPipeline, alice: Identity) -> None:
    assert_verdict(pipeline, batch_bytes(alice, 1), alice.peer_id, Reason.UNKNOWN_KIND, Kind.HEARTBEAT)


def test_schema_cap_violation_is_rejected(pipeline: ValidationPipeline, alice: Identity) -> None:
    data = batch_bytes(alice, 1, completions=WireCaps().max_completions_per_group + 1)
    assert "completions" in assert_verdict(pipeline, data, alice.peer_id, Reason.SCHEMA_CAP).detail


# -- duplicates and replays, and our windows outliving py-libp2p's caches -----------------------


def test_duplicate_is_ignored_without_penalty(pipeline: ValidationPipeline, alice: Identity) -> None:
    data = batch_bytes(alice, 1)
    assert_verdict(pipeline, data, alice.peer_id, Reason.ACCEPTED)
    score = pipeline.scores.score(alice.peer_id)
    assert_verdict(pipeline, data, "another-relay", Reason.DUPLICATE)
    assert pipeline.scores.score(alice.peer_id) == score and pipeline.scores.score("another-relay") == 0


def test_duplicates_spend_no_rate_tokens(pipeline: ValidationPipeline, alice: Identity) -> None:
    burst = int(pipeline.rate_msgs_per_s * pipeline.burst_seconds)
    first = batch_bytes(alice, 1)
    assert_verdict(pipeline, first, alice.peer_id, Reason.ACCEPTED)
    for _ in range(3 * burst):
        assert_verdict(pipeline, first, alice.peer_id, Reason.DUPLICATE)
    for seq in range(2, burst + 1):  # the rest of the burst is still there
        assert_verdict(pipeline, batch_bytes(alice, seq), alice.peer_id, Reason.ACCEPTED)
    assert_verdict(pipeline, batch_bytes(alice, burst + 1), alice.peer_id, Reason.RATE_LIMITED)


def test_replay_after_the_library_seen_cache_expired_is_still_caught(
    pipeline: ValidationPipeline, alice: Identity, clock: FakeClock
) -> None:
    """py-libp2p forgets seen ids after 120-180 s; our windows cover the message's whole life."""
    data = batch_bytes(alice, 1_000_000)
    assert_verdict(pipeline, data, alice.peer_id, Reason.ACCEPTED)
    clock.t += 126.0
    assert_verdict(pipeline, data, "late-relay", Reason.DUPLICATE)
    clock.t += 400.0  # 526 s: still remembered
    assert_verdict(pipeline, data, "late-relay", Reason.DUPLICATE)
    assert_verdict(pipeline, batch_bytes(alice, 1_000_000, created_at=NOW + 1), "late-relay", Reason.REPLAY)
    clock.t += 200.0  # past max_age_s + max_future_s: the id is forgotten, the sequence is not
    assert_verdict(pipeline, data, "late-relay", Reason.REPLAY)
    assert pipeline.structure_sizes()["seen_ids"] == 0


def test_dedup_window_is_longer_than_every_library_cache(pipeline: ValidationPipeline) -> None:
    library_seen_ttl_max, library_validation_cache_ttl = 180.0, 300.0
    window = pipeline._seen_ids.window_s
    assert window >= 600.0 and window > max(library_seen_ttl_max, library_validation_cache_ttl)
    assert window >= pipeline.max_age_s + pipeline.max_future_s  # a forgotten id is always stale
    assert pipeline.replay_window / 1000.0 >= 600.0


def test_dedup_table_is_bounded_and_a_forgotten_id_is_caught_as_a_replay(
    clock: FakeClock, alice: Identity
) -> None:
    pipeline = make_pipeline(clock, dedup_size=8)
    messages = [batch_bytes(alice, 10_000 + i) for i in range(20)]
    for data in messages:
        assert_verdict(pipeline, data, alice.peer_id, Reason.ACCEPTED)
    assert pipeline.structure_sizes()["seen_ids"] == 8
    assert pipeline.structure_sizes()["delivered_by"] == 8
    assert_verdict(pipeline, messages[-1], alice.peer_id, Reason.DUPLICATE)
    assert_verdict(
        pipeline, messages[0], alice.peer_id, Reason.REPLAY
    )  # evicted id: the sequence window holds


def test_replayed_sequence_is_ignored(pipeline: ValidationPipeline, alice: Identity) -> None:
    assert_verdict(pipeline, batch_bytes(alice, 1_000_000), alice.peer_id, Reason.ACCEPTED)
    # Same sequence, different content (another creation time): a replay, not a duplicate.
    verdict = assert_verdict(
        pipeline, batch_bytes(alice, 1_000_000, created_at=NOW - 1), alice.peer_id, Reason.REPLAY
    )
    assert "already seen" in verdict.detail
    # Far below the highest sequence seen from this author.
    assert_verdict(pipeline, batch_bytes(alice, 1_000_000 - 700_000), alice.peer_id, Reason.REPLAY)
    # Out of order but within the window is fine (gossip reorders messages).
    assert_verdict(pipeline, batch_bytes(alice, 999_000), alice.peer_id, Reason.ACCEPTED)


def test_replays_are_tracked_per_author_whoever_forwards(
    pipeline: ValidationPipeline, alice: Identity, mallory: Identity
) -> None:
    assert_verdict(pipeline, batch_bytes(alice, 5_000), alice.peer_id, Reason.ACCEPTED)
    assert_verdict(pipeline, batch_bytes(alice, 5_000, created_at=NOW - 2), mallory.peer_id, Reason.REPLAY)


def test_replay_window_prunes_to_half_and_old_sequences_stay_replays(
    clock: FakeClock, alice: Identity
) -> None:
    pipeline = make_pipeline(clock, max_seen_per_peer=8, rate_msgs_per_s=100.0)
    for seq in range(100, 109):  # the ninth prunes the window to the newest four
        assert_verdict(pipeline, batch_bytes(alice, seq), alice.peer_id, Reason.ACCEPTED)
    (window,) = pipeline._sequences.values()
    assert window.seen == {105, 106, 107, 108} and window.floor == 104
    assert_verdict(pipeline, batch_bytes(alice, 104, created_at=NOW - 3), alice.peer_id, Reason.REPLAY)
    assert_verdict(pipeline, batch_bytes(alice, 101, created_at=NOW - 3), alice.peer_id, Reason.REPLAY)
    assert_verdict(pipeline, batch_bytes(alice, 109), alice.peer_id, Reason.ACCEPTED)


def test_sequences_are_tracked_per_kind(pipeline: ValidationPipeline, alice: Identity) -> None:
    assert_verdict(pipeline, batch_bytes(alice, 5_000), alice.peer_id, Reason.ACCEPTED)
    hb = NodeHeartbeat(name="a", model_id="m", node_round=1, sequence=5_000, created_at=NOW)
    data = seal(alice, Kind.HEARTBEAT, encode_heartbeat(hb))
    assert_verdict(pipeline, data, alice.peer_id, Reason.ACCEPTED, Kind.HEARTBEAT)


def test_restarted_node_with_time_based_sequences_is_not_a_replay(
    pipeline: ValidationPipeline, alice: Identity, clock: FakeClock
) -> None:
    from swarmnode.wire import Sequencer

    before = Sequencer(clock=clock)
    for _ in range(3):
        assert_verdict(pipeline, batch_bytes(alice, before.next()), alice.peer_id, Reason.ACCEPTED)
    clock.t += 2.0  # the node restarts two seconds later with a fresh Sequencer
    after = Sequencer(clock=clock)
    assert_verdict(
        pipeline, batch_bytes(alice, after.next(), created_at=clock.t), alice.peer_id, Reason.ACCEPTED
    )


def test_stale_and_future_messages_are_ignored(pipeline: ValidationPipeline, alice: Identity) -> None:
    assert_verdict(pipeline, batch_bytes(alice, 1, created_at=NOW - 3600), alice.peer_id, Reason.STALE)
    assert_verdict(pipeline, batch_bytes(alice, 2, created_at=NOW + 3600), alice.peer_id, Reason.STALE)
    assert pipeline.scores.score(alice.peer_id) == 0


# -- rates, quotas, relays and sybils -----------------------------------------------------------


def test_message_rate_limit_per_author(
    pipeline: ValidationPipeline, alice: Identity, clock: FakeClock
) -> None:
    burst = int(pipeline.rate_msgs_per_s * pipeline.burst_seconds)
    for seq in range(1, burst + 1):
        assert_verdict(pipeline, batch_bytes(alice, seq), alice.peer_id, Reason.ACCEPTED)
    # The same author through another relay shares the author's bucket.
    verdict = assert_verdict(pipeline, batch_bytes(alice, burst + 1), "relay", Reason.RATE_LIMITED)
    assert pipeline.scores.score("relay") == 0 and verdict.author == alice.peer_id  # the author pays
    other = Identity.generate()  # other authors have their own bucket
    assert_verdict(pipeline, batch_bytes(other, 1), other.peer_id, Reason.ACCEPTED)
    clock.t += 1.0  # refills at rate_msgs_per_s
    assert_verdict(pipeline, batch_bytes(alice, burst + 2), alice.peer_id, Reason.ACCEPTED)


def test_byte_quota_per_author(alice: Identity, clock: FakeClock) -> None:
    pipeline = ValidationPipeline(
        WireCaps(max_message_bytes=1024), rate_msgs_per_s=100.0, rate_bytes_per_s=100.0,
        scores=PeerScores(clock=clock), clock=clock, burst_seconds=1.0,
    )  # fmt: skip  # byte bucket: 1024 bytes of burst (one max-size message), 100 bytes/s after that
    messages = [batch_bytes(alice, seq) for seq in range(101, 107)]
    size = len(messages[0])
    assert all(len(m) == size for m in messages) and size < 1024
    verdicts = [pipeline.validate(Kind.ROLLOUT_BATCH, m, alice.peer_id) for m in messages]
    accepted = 1024 // size
    assert [v.reason for v in verdicts] == [Reason.ACCEPTED] * accepted + [Reason.QUOTA_EXCEEDED] * (
        6 - accepted
    )
    assert pipeline.counts[(Kind.ROLLOUT_BATCH, Reason.QUOTA_EXCEEDED)] == 6 - accepted


def test_relay_budget_per_forwarding_connection(clock: FakeClock) -> None:
    pipeline = make_pipeline(clock, rate_msgs_per_s=0.5)  # relay budget: 8 msgs/s, burst 80
    authors = [Identity.generate() for _ in range(90)]
    verdicts = [pipeline.validate(Kind.ROLLOUT_BATCH, batch_bytes(a, 1), "relay") for a in authors]
    reasons = [v.reason for v in verdicts]
    limited = reasons.count(Reason.RELAY_RATE_LIMITED)
    assert limited == 90 - int(0.5 * RELAY_RATE_FACTOR * pipeline.burst_seconds)
    assert pipeline.scores.score("relay") == -limited * Reason.RELAY_RATE_LIMITED.penalty
    assert all(pipeline.scores.score(a.peer_id) >= 0 for a in authors)


def test_sybil_authors_behind_one_connection_are_admitted_at_a_bounded_rate(
    pipeline: ValidationPipeline, clock: FakeClock, alice: Identity
) -> None:
    sybils = [Identity.generate() for _ in range(100)]
    reasons = [pipeline.validate(Kind.ROLLOUT_BATCH, batch_bytes(s, 1), "sybil-relay").reason for s in sybils]
    assert reasons.count(Reason.ACCEPTED) == int(ADMIT_BURST)
    assert reasons.count(Reason.ADMISSION_LIMITED) == 100 - int(ADMIT_BURST)
    assert pipeline.scores.score("sybil-relay") == 0  # an honest relay of a growing swarm may hit it too
    # Admitted authors are known from now on; a refill admits one more per 1 / ADMIT_PER_S seconds.
    assert_verdict(pipeline, batch_bytes(sybils[0], 2), "sybil-relay", Reason.ACCEPTED)
    assert_verdict(pipeline, batch_bytes(sybils[-1], 2), "sybil-relay", Reason.ADMISSION_LIMITED)
    clock.t += 1 / ADMIT_PER_S
    assert_verdict(pipeline, batch_bytes(sybils[-1], 3), "sybil-relay", Reason.ACCEPTED)
    # Other connections, and peers speaking for themselves, are not affected.
    assert_verdict(pipeline, batch_bytes(sybils[-2], 2), "honest-relay", Reason.ACCEPTED)
    assert_verdict(pipeline, batch_bytes(alice, 1), alice.peer_id, Reason.ACCEPTED)


# -- bans, reports, scoring ----------------------------------------------------------------------


def test_peer_below_threshold_is_banned_then_ignored_until_the_ban_expires(
    pipeline: ValidationPipeline, alice: Identity, clock: FakeClock
) -> None:
    forged = tamper(batch_bytes(alice, 1), signature=bytes(64))
    verdict = assert_verdict(pipeline, forged, alice.peer_id, Reason.BAD_SIGNATURE)
    assert verdict.banned_now == (alice.peer_id,) and pipeline.scores.is_banned(alice.peer_id)
    assert alice.peer_id in pipeline.snapshot()["banned"]
    assert_verdict(pipeline, batch_bytes(alice, 2), alice.peer_id, Reason.BANNED_PEER)  # as forwarder
    assert_verdict(pipeline, batch_bytes(alice, 3), "relay", Reason.BANNED_PEER)  # as author
    clock.t += 299.0
    assert pipeline.scores.is_banned(alice.peer_id) and pipeline.scores.ban_expired() == []
    clock.t += 2.0
    assert pipeline.scores.ban_expired() == [alice.peer_id]
    assert pipeline.scores.score(alice.peer_id) == 0.0
    assert_verdict(pipeline, batch_bytes(alice, 4, created_at=clock.t), alice.peer_id, Reason.ACCEPTED)


def test_node_reports_penalize_the_author_and_a_fraction_on_the_forwarder(
    pipeline: ValidationPipeline, alice: Identity
) -> None:
    data = batch_bytes(alice, 1)
    assert_verdict(pipeline, data, "relay", Reason.ACCEPTED)
    before = pipeline.scores.score(alice.peer_id)
    assert pipeline.report(alice.peer_id, Reason.QUESTION_MISMATCH, msg_id=message_id(data)) == ()
    assert pipeline.scores.score(alice.peer_id) == pytest.approx(before - 5.0)
    assert pipeline.scores.score("relay") == pytest.approx(-5.0 * RELAY_REPORT_FACTOR)
    # Without the message id, the forwarder that introduced the author pays.
    pipeline.report(alice.peer_id, Reason.QUESTION_MISMATCH)
    assert pipeline.scores.score("relay") == pytest.approx(-10.0 * RELAY_REPORT_FACTOR)
    assert not pipeline.report("peer-x", Reason.TASK_UNKNOWN)  # counted, not penalized
    assert pipeline.scores.score("peer-x") == 0
    assert pipeline.counts[(Kind.ROLLOUT_BATCH, Reason.QUESTION_MISMATCH)] == 2
    assert pipeline.snapshot()["counts"]["rollout_batch/task_unknown"] == 1


def test_a_self_published_liar_is_penalized_once_per_report(pipeline: ValidationPipeline) -> None:
    assert pipeline.report("peer-x", Reason.QUESTION_MISMATCH) == ()
    assert pipeline.scores.score("peer-x") == -5.0  # author and forwarder are one peer: one penalty
    results = [pipeline.report("peer-x", Reason.QUESTION_MISMATCH) for _ in range(4)]
    assert results == [(), (), (), ("peer-x",)]  # -25 < -20 on the fifth


def test_libp2p_level_drops_are_counted_against_the_forwarder(pipeline: ValidationPipeline) -> None:
    assert pipeline.record_forwarder("conn", Reason.LIBP2P_SIGNING_POLICY) == ("conn",)
    assert pipeline.peer_counts("conn")[Reason.LIBP2P_SIGNING_POLICY] == 1
    assert pipeline.record_forwarder("big", Reason.RPC_TOO_LARGE) == ()
    assert pipeline.peer_counts("big")[Reason.RPC_TOO_LARGE] == 1 and pipeline.scores.score("big") == 0


def test_scores_decay_toward_zero(clock: FakeClock) -> None:
    scores = PeerScores(threshold=-20.0, ban_seconds=60.0, clock=clock, half_life_s=10.0)
    assert not scores.penalize("p", Reason.DECODE_ERROR)
    assert scores.score("p") == -10.0
    clock.t += 10.0
    assert scores.score("p") == pytest.approx(-5.0)
    assert not scores.penalize("p", Reason.DECODE_ERROR)  # -15: still above the threshold
    assert scores.penalize("p", Reason.DECODE_ERROR)  # -25: banned by this call
    assert scores.snapshot()["p"].bans == 1


def test_no_second_penalty_or_ban_while_banned(clock: FakeClock) -> None:
    scores = PeerScores(threshold=-20.0, ban_seconds=60.0, clock=clock)
    assert scores.penalize("p", Reason.BAD_SIGNATURE)
    score = scores.score("p")
    for _ in range(5):
        assert not scores.penalize("p", Reason.BAD_SIGNATURE)
    assert scores.score("p") == score and scores.snapshot()["p"].bans == 1
    assert scores.snapshot()["p"].penalties == {"bad_signature": 6}
    assert [b.until for b in scores.ban_records()] == [NOW + 60.0]  # not extended either


def test_score_is_capped(clock: FakeClock) -> None:
    scores = PeerScores(clock=clock, accept_reward=1.0, max_score=3.0)
    for _ in range(10):
        scores.reward("p")
    assert scores.score("p") == 3.0
    assert not scores.penalize("p", Reason.DECODE_ERROR)  # 3 - 10 = -7: the cap bounds saved-up credit
    assert scores.score("p") == -7.0


def test_scores_evict_the_least_recently_seen_unbanned_peers(clock: FakeClock) -> None:
    scores = PeerScores(clock=clock, max_peers=4)
    assert scores.penalize("banned", Reason.BAD_SIGNATURE)
    for peer in ("a", "b", "c"):
        scores.reward(peer)
    scores.reward("a")  # a is recent again; b is now the oldest unbanned
    scores.reward("d")
    assert set(scores.snapshot()) == {"banned", "a", "c", "d"}
    assert scores.size() == 4 and scores.is_banned("banned")  # the oldest, but banned: kept


def test_ban_table_is_bounded_and_overflowing_bans_are_released(clock: FakeClock) -> None:
    scores = PeerScores(clock=clock, max_peers=4, max_banned=5)
    for i in range(12):
        clock.t += 1.0  # later bans end later
        assert scores.penalize(f"sybil-{i}", Reason.BAD_SIGNATURE)
    assert set(scores.banned()) == {f"sybil-{i}" for i in range(7, 12)}  # the bans ending last
    assert scores.size() <= 4 + 5
    assert set(scores.ban_expired()) == {f"sybil-{i}" for i in range(7)}
    assert scores.ban_expired() == []


def test_bans_export_and_import_keep_reason_and_expiry(clock: FakeClock) -> None:
    scores = PeerScores(clock=clock, ban_seconds=300.0)
    scores.penalize("p", Reason.BAD_SIGNATURE)
    (record,) = scores.ban_records()
    assert record == BanRecord("p", "bad_signature", NOW + 300.0, 1)
    clock.t += 100.0
    restored = PeerScores(clock=clock, ban_seconds=300.0)
    expired = BanRecord("old", "decode_error", NOW + 50.0, 1)
    assert restored.import_bans([record, expired]) == 1
    assert restored.is_banned("p") and not restored.is_banned("old")
    assert restored.ban_records() == [record]


def test_every_per_peer_structure_is_bounded(clock: FakeClock) -> None:
    pipeline = make_pipeline(clock, max_peers=16, known_invalid_size=16, admit_burst=1000.0)
    for i in range(60):
        author = Identity.generate()
        pipeline.validate(Kind.ROLLOUT_BATCH, batch_bytes(author, 1), f"relay-{i}")
        pipeline.validate(Kind.ROLLOUT_BATCH, os.urandom(64), f"junk-{i}")
        pipeline.report(f"liar-{i}", Reason.QUESTION_MISMATCH)
    sizes = pipeline.structure_sizes()
    for name in (
        "peer_counts",
        "sequences",
        "author_buckets",
        "forwarder_buckets",
        "admission",
        "introduced_by",
    ):
        assert sizes[name] <= 16, (name, sizes)
    assert sizes["known_invalid"] <= 16
    assert sizes["scores"] <= 16 + pipeline.scores.max_banned


# -- robustness ----------------------------------------------------------------------------------


def test_rejection_log_is_throttled_per_reason(
    pipeline: ValidationPipeline, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="swarmnode.p2p.pipeline")
    for i in range(5):
        pipeline.validate(Kind.ROLLOUT_BATCH, b"\xff\xff\xff\xff\xff" + bytes([i]), f"p{i}")
    pipeline.validate(Kind.ROLLOUT_BATCH, b"\x00" * 1_000_001, "big")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "decode_error" in lines[0] and "oversize" in lines[1]
    clock.t += 60.0
    pipeline.validate(Kind.ROLLOUT_BATCH, b"\xff\xff\xff\xff\xff\x09", "p9")
    assert len(caplog.records) == 3
    assert pipeline.counts[(Kind.ROLLOUT_BATCH, Reason.DECODE_ERROR)] == 6  # counted even when not logged


def test_an_exception_inside_a_rule_becomes_internal_error(
    pipeline: ValidationPipeline, alice: Identity
) -> None:
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
    assert not bucket.take(1, 0.25)  # time going backwards adds nothing


# -- scoring boundaries, counters and defaults (mutation-tested, issue 13) ------------------------


def test_a_ban_ends_exactly_at_its_until_time() -> None:
    clock = FakeClock(0.0)  # an injected clock may start at 0: nothing may assume wall-clock magnitudes
    scores = PeerScores(clock=clock, ban_seconds=0.5)
    assert not scores.is_banned("stranger")
    assert scores.penalize("p", Reason.BAD_SIGNATURE)
    clock.t = 0.25
    assert scores.is_banned("p") and scores.banned() == ["p"] and scores.ban_expired() == []
    assert [b.until for b in scores.ban_records()] == [0.5] and scores.snapshot()["p"].banned_for_s == 0.25
    clock.t = 0.5  # [until, ...): not banned any more, reported once
    assert not scores.is_banned("p") and scores.banned() == [] and scores.ban_records() == []
    assert scores.ban_expired() == ["p"] and scores.ban_expired() == []
    view = scores.snapshot()["p"]
    assert (view.score, view.banned_for_s, view.bans) == (0.0, 0.0, 1)


def test_repeat_bans_are_counted_and_each_restarts_the_score() -> None:
    clock = FakeClock()
    scores = PeerScores(clock=clock, ban_seconds=10.0)
    for n in (1, 2, 3):
        assert scores.penalize("p", Reason.BAD_SIGNATURE)
        (record,) = scores.ban_records()
        assert (record.bans, record.reason, record.until) == (n, "bad_signature", clock.t + 10.0)
        clock.t += 10.0
        assert scores.ban_expired() == ["p"] and scores.score("p") == 0.0
    assert scores.snapshot()["p"].bans == 3


def test_ban_records_end_last_first_within_the_limit() -> None:
    clock = FakeClock()
    scores = PeerScores(clock=clock, ban_seconds=100.0)
    for i, peer in enumerate(("a", "b", "c")):
        clock.t = NOW + i
        scores.penalize(peer, Reason.BAD_SIGNATURE)
    assert [r.peer_id for r in scores.ban_records()] == ["c", "b", "a"]
    assert [r.peer_id for r in scores.ban_records(limit=2)] == ["c", "b"]


def test_a_ban_released_over_the_table_size_restarts_its_peer_at_zero() -> None:
    clock = FakeClock()
    scores = PeerScores(clock=clock, max_banned=2)
    for i, peer in enumerate(("a", "b", "c")):
        clock.t = NOW + i
        assert scores.penalize(peer, Reason.BAD_SIGNATURE)
    assert sorted(scores.banned()) == ["b", "c"]
    clock.t += 5.0
    assert scores.score("a") == 0.0 and not scores.is_banned("a")
    assert scores.ban_expired() == ["a"]


def test_asking_a_score_does_not_create_a_record() -> None:
    scores = PeerScores(clock=FakeClock())
    assert scores.score("never-seen") == 0.0 and scores.size() == 0


def test_snapshot_rounds_scores_and_counts_down_the_ban() -> None:
    clock = FakeClock()
    scores = PeerScores(clock=clock, ban_seconds=300.0)
    scores.penalize("p", Reason.DECODE_ERROR, penalty=1 / 3)
    scores.penalize("banned", Reason.BAD_SIGNATURE)
    clock.t += 100.0
    snap = scores.snapshot()
    assert snap["p"].score == round(-(1 / 3) * 0.5 ** (100 / 300), 3) and snap["p"].banned_for_s == 0.0
    assert snap["banned"].banned_for_s == 200.0 and snap["banned"].penalties == {"bad_signature": 1}


def test_import_bans_skips_ended_and_already_banned_peers_and_counts_each_applied() -> None:
    clock = FakeClock()
    scores = PeerScores(clock=clock, ban_seconds=300.0, threshold=-20.0)
    records = [
        BanRecord("p", "bad_signature", NOW + 100.0, 3),
        BanRecord("q", "decode_error", NOW + 200.0, 1),
        BanRecord("p", "oversize", NOW + 250.0, 9),  # already banned by the first record: skipped
        BanRecord("ended", "decode_error", NOW, 1),  # ends now: nothing to apply
    ]
    assert scores.import_bans(records) == 2
    assert sorted(scores.banned()) == ["p", "q"]
    assert scores.score("p") == -20.0 and scores.snapshot()["p"].bans == 3
    assert [(r.peer_id, r.reason) for r in scores.ban_records()] == [
        ("q", "decode_error"),
        ("p", "bad_signature"),
    ]


def test_scoring_defaults() -> None:
    """The documented defaults: ban 300 s, half-life 300 s, +0.1 per accepted message up to 10."""
    clock = FakeClock()
    scores = PeerScores(clock=clock)
    assert (scores.threshold, scores.max_peers, scores.max_banned) == (-20.0, 10_000, 4096)
    scores.reward("good")
    assert scores.score("good") == pytest.approx(0.1)
    for _ in range(200):
        scores.reward("good")
    assert scores.score("good") == 10.0
    scores.penalize("p", Reason.DECODE_ERROR)
    clock.t += 300.0
    assert scores.score("p") == pytest.approx(-5.0)
    scores.penalize("b", Reason.BAD_SIGNATURE)
    assert [r.until for r in scores.ban_records()] == [clock.t + 300.0]


def test_peer_tables_default_bounds() -> None:
    clock = FakeClock()
    scores = PeerScores(clock=clock)
    for i in range(10_001):
        scores.reward(f"p{i}")
    assert scores.size() == 10_000 and len(scores.snapshot()) == 1000
    assert "p0" not in scores.snapshot(limit=10_000) and "p10000" in scores.snapshot()
    for i in range(4097):
        scores.penalize(f"s{i}", Reason.BAD_SIGNATURE, penalty=100.0)
    assert len(scores.banned()) == 4096


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_threshold_must_be_negative(threshold: float) -> None:
    with pytest.raises(ValueError, match="score threshold must be negative"):
        PeerScores(threshold=threshold)


@pytest.mark.parametrize(("rate", "capacity"), [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0)])
def test_token_bucket_refuses_a_non_positive_rate_or_capacity(rate: float, capacity: float) -> None:
    with pytest.raises(ValueError, match="rate > 0 and capacity > 0"):
        TokenBucket(rate=rate, capacity=capacity, now=0.0)


def test_token_bucket_with_a_fractional_capacity() -> None:
    bucket = TokenBucket(rate=1.0, capacity=0.5, now=0.0)
    assert bucket.take(0.5, 0.0) and not bucket.take(0.5, 0.0)


# -- pipeline boundaries, details and bookkeeping (mutation-tested, issue 13) ---------------------


def test_rule_names_in_order(pipeline: ValidationPipeline) -> None:
    assert [rule.name for rule in pipeline.rules] == [
        "banned_forwarder",
        "size",
        "relay_rate",
        "duplicate",
        "known_invalid",
        "envelope",
        "kind",
        "signature",
        "banned_author",
        "admission",
        "rate",
        "payload",
        "replay",
        "freshness",
    ]


def test_rule_docs_split_tag_and_condition(pipeline: ValidationPipeline) -> None:
    docs = rule_docs(pipeline)
    assert docs[1] == ("size", "REJECT", "the message is larger than max_message_bytes")

    def tricky(_c: object) -> None:
        """[IGNORE] a [nested] tag stays in the condition, as does a trailing X.

        Second line ignored."""

    def undocumented(_c: object) -> None:
        pass

    pipeline.rules[:] = [pipeline.rules[0]._replace(name="t", check=tricky)]
    pipeline.rules.append(pipeline.rules[0]._replace(name="u", check=undocumented))
    assert rule_docs(pipeline) == [
        ("t", "IGNORE", "a [nested] tag stays in the condition, as does a trailing X"),
        ("u", "", ""),
    ]


def test_pipeline_defaults(clock: FakeClock) -> None:
    """The documented windows and table sizes (docs/PROTOCOL.md "Caps and windows")."""
    p = ValidationPipeline(
        WireCaps(), rate_msgs_per_s=4.0, rate_bytes_per_s=1e6, scores=PeerScores(clock=clock)
    )
    assert (p.burst_seconds, p.replay_window, p.max_seen_per_peer) == (10.0, 600_000, 1024)
    assert (p.max_age_s, p.max_future_s, p._seen_ids.window_s, p._seen_ids.capacity) == (
        600.0,
        60.0,
        660.0,
        65_536,
    )
    assert (p._peer_counts.capacity, p._known_invalid.capacity, p.delivered_by.capacity) == (
        10_000,
        8192,
        65_536,
    )


def test_verdict_details_name_the_cause(clock: FakeClock, alice: Identity, mallory: Identity) -> None:
    pipeline = make_pipeline(clock, caps=WireCaps(max_message_bytes=4096))
    data = batch_bytes(alice, 1)
    accepted = assert_verdict(pipeline, data, alice.peer_id, Reason.ACCEPTED)
    assert accepted.detail == "" and accepted.envelope is not None and accepted.author == alice.peer_id
    dup = assert_verdict(pipeline, data, "r1", Reason.DUPLICATE)
    assert dup.detail == f"message {message_id(data).hex()[:16]} seen before"
    assert assert_verdict(pipeline, b"\x00" * 4097, "r2", Reason.OVERSIZE).detail == "4097 bytes, cap 4096"
    wrong_kind = assert_verdict(pipeline, batch_bytes(alice, 2), "r3", Reason.UNKNOWN_KIND, Kind.HEARTBEAT)
    assert wrong_kind.detail == "ROLLOUT_BATCH envelope on the HEARTBEAT topic"
    again = assert_verdict(pipeline, batch_bytes(alice, 2), "r4", Reason.UNKNOWN_KIND, Kind.HEARTBEAT)
    assert again.detail == "content rejected before"
    forged = tamper(batch_bytes(alice, 3), signature=bytes(64))
    bad = assert_verdict(pipeline, forged, "r5", Reason.BAD_SIGNATURE)
    assert bad.detail == "Ed25519 signature does not match the envelope" and bad.envelope is not None
    replay = assert_verdict(pipeline, batch_bytes(alice, 1, created_at=NOW - 1), "r6", Reason.REPLAY)
    assert replay.detail == "sequence 1 already seen" and replay.envelope is not None
    assert_verdict(pipeline, batch_bytes(alice, 700_001), "r7", Reason.ACCEPTED)
    low = assert_verdict(pipeline, batch_bytes(alice, 100_001), "r8", Reason.REPLAY)
    assert low.detail == "sequence 100001 is below the window (highest 700001)"
    stale = assert_verdict(pipeline, batch_bytes(mallory, 1, created_at=NOW - 601.4), "r9", Reason.STALE)
    assert stale.detail == "created 601 s ago, limit 600 s"
    future = assert_verdict(pipeline, batch_bytes(mallory, 2, created_at=NOW + 61.4), "r10", Reason.STALE)
    assert future.detail == "created 61 s in the future (clock skew?)"
    schema = batch_bytes(mallory, 3, completions=WireCaps().max_completions_per_group + 1)
    capped = assert_verdict(pipeline, schema, "r11", Reason.SCHEMA_CAP)
    assert capped.envelope is not None and capped.author == mallory.peer_id
    # a later copy of author-blamed content stays the author's fault, whoever relays it
    assert assert_verdict(pipeline, schema, "r12", Reason.SCHEMA_CAP).author == mallory.peer_id


def test_ban_details_for_forwarder_and_author(clock: FakeClock, alice: Identity, mallory: Identity) -> None:
    pipeline = make_pipeline(clock)
    pipeline.scores.penalize("bad-relay", Reason.BAD_SIGNATURE)
    relayed = assert_verdict(pipeline, batch_bytes(alice, 1), "bad-relay", Reason.BANNED_PEER)
    assert relayed.detail == "forwarder is banned"
    pipeline.scores.penalize(mallory.peer_id, Reason.BAD_SIGNATURE)
    authored = assert_verdict(pipeline, batch_bytes(mallory, 1), "good-relay", Reason.BANNED_PEER)
    assert authored.detail == "author is banned"


def test_rate_and_admission_details(clock: FakeClock, alice: Identity) -> None:
    pipeline = make_pipeline(clock, rate_msgs_per_s=0.1, admit_burst=1.0)
    assert_verdict(pipeline, batch_bytes(alice, 1), alice.peer_id, Reason.ACCEPTED)  # burst: max(1, 0.1 * 10)
    assert assert_verdict(pipeline, batch_bytes(alice, 2), alice.peer_id, Reason.RATE_LIMITED).detail == (
        "over 0.1 messages/s"
    )
    assert_verdict(pipeline, batch_bytes(Identity.generate(), 1), "relay", Reason.ACCEPTED)
    limited = assert_verdict(pipeline, batch_bytes(Identity.generate(), 1), "relay", Reason.ADMISSION_LIMITED)
    assert limited.detail == "forwarder introduced too many new authors"


def test_byte_burst_is_the_larger_of_one_message_and_burst_seconds_of_rate(
    clock: FakeClock, alice: Identity
) -> None:
    pipeline = ValidationPipeline(
        WireCaps(max_message_bytes=2048), rate_msgs_per_s=100.0, rate_bytes_per_s=1000.0,
        scores=PeerScores(clock=clock), clock=clock, burst_seconds=10.0,
    )  # fmt: skip  # byte burst max(2048, 1000 * 10) = 10000
    fits = 10_000 // len(batch_bytes(alice, 1))
    messages = [batch_bytes(alice, seq) for seq in range(1, fits + 2)]
    verdicts = [pipeline.validate(Kind.ROLLOUT_BATCH, m, f"r{i}") for i, m in enumerate(messages)]
    assert [v.reason for v in verdicts] == [Reason.ACCEPTED] * fits + [Reason.QUOTA_EXCEEDED]
    assert verdicts[-1].detail == "over 1000 bytes/s"


def test_relay_buckets_are_per_forwarder(clock: FakeClock) -> None:
    pipeline = make_pipeline(clock, rate_msgs_per_s=0.5, admit_burst=1000.0)  # relay burst: 80 messages
    authors = [Identity.generate() for _ in range(81)]
    for seq, relay in ((1, "relay-1"), (2, "relay-2")):  # 60 each: within each one's own budget
        reasons = [
            pipeline.validate(Kind.ROLLOUT_BATCH, batch_bytes(a, seq), relay).reason for a in authors[:60]
        ]
        assert reasons == [Reason.ACCEPTED] * 60, relay
    for author in authors[60:80]:
        assert_verdict(pipeline, batch_bytes(author, 3), "relay-1", Reason.ACCEPTED)
    limited = assert_verdict(pipeline, batch_bytes(authors[80], 3), "relay-1", Reason.RELAY_RATE_LIMITED)
    assert limited.detail == "forwarder over its relay budget"


def test_size_and_freshness_limits_are_inclusive(clock: FakeClock, alice: Identity) -> None:
    data = batch_bytes(alice, 1)
    pipeline = make_pipeline(clock, caps=WireCaps(max_message_bytes=len(data)))
    assert_verdict(pipeline, data, alice.peer_id, Reason.ACCEPTED)  # exactly at the cap
    assert_verdict(pipeline, batch_bytes(alice, 2, created_at=NOW - 600.0), alice.peer_id, Reason.ACCEPTED)
    assert_verdict(pipeline, batch_bytes(alice, 3, created_at=NOW + 60.0), alice.peer_id, Reason.ACCEPTED)


def test_an_accepted_id_is_a_duplicate_until_the_end_of_its_window(clock: FakeClock, alice: Identity) -> None:
    pipeline = make_pipeline(clock, max_age_s=1000.0)
    data = batch_bytes(alice, 1)
    assert_verdict(pipeline, data, alice.peer_id, Reason.ACCEPTED)
    clock.t += 1060.0  # exactly max_age_s + max_future_s later
    assert_verdict(pipeline, data, "late", Reason.DUPLICATE)
    clock.t += 0.5
    assert_verdict(pipeline, data, "late", Reason.REPLAY)


def test_replay_window_edges(clock: FakeClock, alice: Identity) -> None:
    pipeline = make_pipeline(clock, replay_window=10, max_seen_per_peer=4, rate_msgs_per_s=100.0)
    assert_verdict(pipeline, batch_bytes(alice, 100), alice.peer_id, Reason.ACCEPTED)
    assert_verdict(pipeline, batch_bytes(alice, 90), alice.peer_id, Reason.REPLAY)  # highest - window
    assert_verdict(pipeline, batch_bytes(alice, 91), alice.peer_id, Reason.ACCEPTED)
    for seq in (92, 93):
        assert_verdict(pipeline, batch_bytes(alice, seq), alice.peer_id, Reason.ACCEPTED)
    # the fifth sequence prunes: floor = 110 - 10 = 100 (itself not kept), only 110 is above, floor 109
    assert_verdict(pipeline, batch_bytes(alice, 110), alice.peer_id, Reason.ACCEPTED)
    (window,) = pipeline._sequences.values()
    assert (window.seen, window.floor) == ({110}, 109)
    assert_verdict(pipeline, batch_bytes(alice, 105), alice.peer_id, Reason.REPLAY)


def test_reports_blame_the_connection_that_delivered_the_message(clock: FakeClock, alice: Identity) -> None:
    pipeline = make_pipeline(clock)
    first, second = batch_bytes(alice, 1), batch_bytes(alice, 2)
    assert_verdict(pipeline, first, "relay-1", Reason.ACCEPTED)  # relay-1 introduced alice
    assert_verdict(pipeline, second, "relay-2", Reason.ACCEPTED)
    assert pipeline.delivered_by[message_id(second)] == ("relay-2", alice.peer_id)
    pipeline.report(alice.peer_id, Reason.QUESTION_MISMATCH, msg_id=message_id(second))
    assert pipeline.scores.score("relay-2") == pytest.approx(-5.0 * RELAY_REPORT_FACTOR)
    assert pipeline.scores.score("relay-1") == 0.0
    assert pipeline.peer_counts("relay-2")[Reason.QUESTION_MISMATCH] == 1
    assert pipeline.peer_counts("nobody") == Counter()


def test_delivered_by_forgets_its_oldest_entries(clock: FakeClock, alice: Identity) -> None:
    pipeline = make_pipeline(clock, dedup_size=2)
    messages = [batch_bytes(alice, seq) for seq in (1, 2, 3)]
    for data in messages:
        assert_verdict(pipeline, data, alice.peer_id, Reason.ACCEPTED)
    assert list(pipeline.delivered_by) == [message_id(messages[1]), message_id(messages[2])]


def test_counts_per_peer_add_up_and_penalties_name_the_reason(clock: FakeClock) -> None:
    pipeline = make_pipeline(clock)
    for _ in range(2):
        pipeline.record_forwarder("conn", Reason.DECODE_ERROR)
    assert pipeline.peer_counts("conn")[Reason.DECODE_ERROR] == 2
    snap = pipeline.snapshot()
    assert snap["peers"]["conn"].penalties == {"decode_error": 2}
    assert snap["counts"] == {"rollout_batch/decode_error": 2} and snap["banned"] == []


def test_non_bytes_and_unknown_kinds_are_counted_as_internal_errors(pipeline: ValidationPipeline) -> None:
    verdict = pipeline.validate(Kind.ROLLOUT_BATCH, "text", "p")  # type: ignore[arg-type]
    assert (verdict.reason, verdict.detail) == (
        Reason.INTERNAL_ERROR,
        "TypeError: message data must be bytes, got str",
    )
    assert (verdict.author, verdict.envelope, verdict.forwarder) == ("", None, "p")
    assert pipeline.counts[(Kind.ROLLOUT_BATCH, Reason.INTERNAL_ERROR)] == 1
    pipeline.validate(99, b"x", "p")  # type: ignore[arg-type]
    assert pipeline.counts[(99, Reason.INTERNAL_ERROR)] == 1
    assert pipeline.snapshot()["counts"]["99/internal_error"] == 1  # status still renders


def test_a_rule_bug_after_the_envelope_keeps_it_in_the_verdict(
    pipeline: ValidationPipeline, alice: Identity
) -> None:
    def explode(_candidate: object) -> None:
        raise RuntimeError("bug in a rule")

    pipeline.rules.append(pipeline.rules[0]._replace(name="bug", check=explode))
    verdict = assert_verdict(pipeline, batch_bytes(alice, 1), alice.peer_id, Reason.INTERNAL_ERROR)
    assert verdict.detail == "RuntimeError: bug in a rule" and verdict.envelope is not None


def test_from_config_passes_rates_ban_time_and_clock(clock: FakeClock, alice: Identity) -> None:
    cfg = P2PConfig(rate_msgs_per_s=2.0, rate_bytes_per_s=50_000.0, ban_seconds=77.0)
    pipeline = ValidationPipeline.from_config(cfg, clock=clock)
    assert (pipeline.rate_msgs_per_s, pipeline.rate_bytes_per_s) == (2.0, 50_000.0)
    assert pipeline.validate(
        Kind.ROLLOUT_BATCH, tamper(batch_bytes(alice, 1), signature=bytes(64)), "x"
    ).banned_now
    assert [r.until for r in pipeline.scores.ban_records()] == [NOW + 77.0]
    assert pipeline.validate(Kind.ROLLOUT_BATCH, batch_bytes(alice, 2), "y").accepted  # fresh by its clock


def test_relay_byte_budget_is_four_times_the_author_rate(clock: FakeClock) -> None:
    pipeline = ValidationPipeline(
        WireCaps(max_message_bytes=2048), rate_msgs_per_s=100.0, rate_bytes_per_s=1000.0,
        scores=PeerScores(clock=clock), clock=clock, burst_seconds=10.0, admit_burst=1000.0,
    )  # fmt: skip  # relay bytes: 4000/s, burst max(4 * 2048, 40000); each author: burst 10000
    authors = [Identity.generate() for _ in range(40)]
    messages = [batch_bytes(a, 1) for a in authors]
    assert 8192 < sum(map(len, messages)) < 40_000
    assert all(pipeline.validate(Kind.ROLLOUT_BATCH, m, "relay").accepted for m in messages)


def test_counts_are_labelled_by_kind_even_when_given_as_a_number(clock: FakeClock) -> None:
    pipeline = make_pipeline(clock)
    pipeline.record_forwarder("p", Reason.DECODE_ERROR, kind=int(Kind.ROLLOUT_BATCH))  # type: ignore[arg-type]
    assert pipeline.snapshot()["counts"] == {"rollout_batch/decode_error": 1}
