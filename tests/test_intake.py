"""Intake bounded by use: received groups are cheap candidates; only what the sampler is about to use
(+ a look-ahead) is verified, under a per-round budget; skipped work is counted; freshness is the
group's creation time (issue 11 item 1; issue 10: a 5-minute-old batch is not trained on)."""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

from swarmnode.admin.source import EventLog
from swarmnode.config import NodeConfig, SamplerConfig
from swarmnode.node.loop import Node
from swarmnode.node.network import ReceivedBatch
from swarmnode.rl.external import ExternalPool, IntakeLimits, IntakeReason, IntakeResult
from swarmnode.rl.records import RolloutGroup, ScoredGroup
from swarmnode.rl.sampler import SamplerContext, select_external
from swarmnode.tasks.presets import TaskSpec
from swarmnode.tasks.reference import TaskRef

NOW = 1_000_000.0


def _group(source: str, index: int, created_at: float = NOW, round_: int = 0, chars: int = 8) -> RolloutGroup:
    ref = TaskRef("chain_sum", "d", 1, index, "v")
    completions = tuple(f"{source}-{index}-{i}".ljust(chars, "x") for i in range(2))
    return RolloutGroup(ref, f"q{index}", completions, (True, True), "m", round_, created_at, source)


class Verifier:
    """Stands in for ExternalIntake.process: records calls, answers from a rule."""

    def __init__(self, rule=lambda g: IntakeReason.ACCEPTED, clock=None, cost_s: float = 0.0) -> None:
        self.calls: list[RolloutGroup] = []
        self.rule = rule
        self.clock = clock
        self.cost_s = cost_s

    def __call__(self, group: RolloutGroup) -> IntakeResult:
        self.calls.append(group)
        if self.clock is not None:
            self.clock[0] += self.cost_s
        reason = self.rule(group)
        if reason is IntakeReason.ACCEPTED:
            return IntakeResult(reason, ScoredGroup(group, (1.0, 0.0)))
        return IntakeResult(reason)


def _pool(limits: IntakeLimits | None = None, now: list[float] | None = None, **sampler) -> ExternalPool:
    now = now or [NOW]
    mono = [0.0]
    pool = ExternalPool(
        SamplerConfig(**sampler), clock=lambda: now[0], limits=limits, monotonic=lambda: mono[0]
    )
    pool.test_monotonic = mono  # type: ignore[attr-defined]
    return pool


def test_received_groups_are_not_verified_until_needed():
    pool = _pool()
    for i in range(100):
        assert pool.offer(_group(f"s{i % 10}", i), "peer") is None
    verifier = Verifier()
    report = pool.verify_for_use(verifier, wanted=0, rng=random.Random(0))
    assert verifier.calls == [] and report.attempted == 0 and pool.candidate_count == 100
    report = pool.verify_for_use(verifier, wanted=6, rng=random.Random(0))
    assert len(verifier.calls) == 6 and len(pool.eligible()) == 6 and pool.candidate_count == 94
    report = pool.verify_for_use(verifier, wanted=6, rng=random.Random(0))
    assert report.attempted == 0  # enough verified groups are already ready


def test_zero_variance_picks_are_replaced_within_the_attempt_limit():
    pool = _pool(IntakeLimits(max_attempts_per_round=10))
    for i in range(40):
        pool.offer(_group(f"s{i % 8}", i), "peer")
    verifier = Verifier(
        lambda g: IntakeReason.ZERO_VARIANCE if int(g.question[1:]) % 3 else IntakeReason.ACCEPTED
    )
    report = pool.verify_for_use(verifier, wanted=4, rng=random.Random(1))
    accepted = [r for _, r in report.outcomes if r.reason is IntakeReason.ACCEPTED]
    assert report.attempted <= 10 and len(verifier.calls) == report.attempted
    assert len(accepted) == len(pool.eligible()) and (len(accepted) == 4 or report.stopped_by == "attempts")
    assert Counter(r.reason for _, r in report.outcomes)[IntakeReason.ZERO_VARIANCE] >= 1


def test_round_budget_stops_verification_and_unverified_groups_are_counted_as_skipped():
    now = [NOW]
    pool = _pool(IntakeLimits(budget_s_per_round=1.0), now=now, max_age_s=60)
    for i in range(20):
        pool.offer(_group(f"s{i}", i), "peer")
    verifier = Verifier(clock=pool.test_monotonic, cost_s=0.4)  # type: ignore[attr-defined]
    report = pool.verify_for_use(verifier, wanted=10, rng=random.Random(0))
    assert report.stopped_by == "budget" and report.attempted == 3  # 0.0, 0.4, 0.8 started; 1.2 > 1.0
    assert pool.candidate_count == 17
    now[0] += 61  # nobody needed them before they went stale
    pool.verify_for_use(verifier, wanted=0, rng=random.Random(0))
    assert pool.candidate_count == 0 and pool.skipped["too_old"] == 17


def test_a_flooding_sender_gets_a_quarter_of_the_candidates_and_is_not_verified_first():
    pool = _pool(IntakeLimits(max_candidates=40))
    for i in range(1000):
        pool.offer(_group("flooder", i), "peer-f")
    pool.offer(_group("honest", 5000), "peer-h")
    assert pool.candidate_count == 11 and pool.skipped["per_source_cap"] == 990
    verifier = Verifier()
    pool.verify_for_use(verifier, wanted=2, rng=random.Random(0))
    assert {g.source for g in verifier.calls} == {"flooder", "honest"}


def test_a_sybil_swarm_behind_one_connection_gets_one_connections_share():
    """600 identities relayed over one connection (issue 10, item 5): they share one lane, so they
    hold a quarter of the candidates and get a turn per connection, not per identity."""
    pool = _pool(IntakeLimits(max_candidates=400))
    for i in range(10):
        for honest in ("h1", "h2"):
            assert pool.offer(_group(honest, i), honest, forwarder=honest) is None
    for i in range(600):
        pool.offer(_group(f"sybil{i}", 1000 + i), f"sybil{i}", forwarder="relay")
    assert pool.candidate_count == 20 + 100 and pool.skipped == {"per_connection_cap": 500}
    verifier = Verifier()
    pool.verify_for_use(verifier, wanted=9, rng=random.Random(0))
    lanes = Counter("relay" if g.source.startswith("sybil") else g.source for g in verifier.calls)
    assert lanes == {"h1": 3, "h2": 3, "relay": 3}
    # Without a forwarder the author is the lane: honest direct peers are unaffected.
    direct = _pool()
    for i in range(10):
        direct.offer(_group("h1", i), "h1")
    assert direct.candidate_count == 10 and not direct.skipped


def test_leftovers_of_one_lane_do_not_stop_the_other_lanes_being_verified():
    """The byzantine runs' sybil kept 52 % of the external slots: its groups always verify, its
    leftovers alone satisfied `wanted`, and the honest lanes' candidates were never verified. Each
    lane with candidates is now verified up to its share of `wanted` whatever the pool holds."""
    pool = _pool()
    for i in range(12):
        pool.offer(_group(f"sybil{i}", 1000 + i), f"sybil{i}", forwarder="relay")
    verifier = Verifier()
    pool.verify_for_use(verifier, wanted=12, rng=random.Random(0))
    assert len(pool.eligible()) == 12 and {p.lane for p in pool.eligible()} == {"relay"}
    for i in range(10):
        for honest in ("h1", "h2"):
            pool.offer(_group(honest, i), honest, forwarder=honest)
    for i in range(10):
        pool.offer(_group(f"sybil{100 + i}", 2000 + i), f"sybil{100 + i}", forwarder="relay")
    verifier.calls.clear()
    pool.verify_for_use(verifier, wanted=9, rng=random.Random(0))
    # share = ceil(9 / 3 lanes) = 3: the relay already holds 12, so only the honest lanes are verified
    assert Counter(g.source for g in verifier.calls) == {"h1": 3, "h2": 3}
    assert Counter(p.lane for p in pool.eligible()) == {"relay": 12, "h1": 3, "h2": 3}
    verifier.calls.clear()
    assert pool.verify_for_use(verifier, wanted=9, rng=random.Random(0)).attempted == 0


def test_a_sybil_swarm_relayed_by_honest_peers_shares_one_turn():
    """In a gossip mesh the honest peers relay the sybils' groups too, so connections alone do not
    contain them (the byzantine sybil took 87 % of the slots with lanes only). Each connected peer's
    own groups are one turn; everything relayed, over whichever connection, shares one more."""
    pool = _pool(IntakeLimits(max_candidates=400))
    for i in range(10):
        for j, honest in enumerate(("h1", "h2")):
            pool.offer(_group(honest, 100 * j + i), honest, forwarder=honest)
    for i in range(90):
        relay = ("h1", "h2", "relay")[i % 3]
        pool.offer(_group(f"sybil{i}", 1000 + i), f"sybil{i}", forwarder=relay)
    verifier = Verifier()
    pool.verify_for_use(verifier, wanted=9, rng=random.Random(0))
    turns = Counter(g.source if g.source in ("h1", "h2") else "relayed" for g in verifier.calls)
    assert turns == {"h1": 3, "h2": 3, "relayed": 3}
    relayed = [p for p in pool.eligible() if p.turn == "relayed"]
    assert len({p.lane for p in relayed}) == 3  # within the relayed turn, one per connection in turn
    assert Counter(p.turn for p in pool.eligible()) == {"h1": 3, "h2": 3, "relayed": 3}


def test_a_lane_without_candidates_leaves_its_share_to_the_others():
    pool = _pool()
    for i in range(10):
        pool.offer(_group("h1", i), "h1", forwarder="h1")
    pool.offer(_group("h2", 100), "h2", forwarder="h2")
    verifier = Verifier()
    pool.verify_for_use(verifier, wanted=6, rng=random.Random(0))
    assert Counter(p.lane for p in pool.eligible()) == {"h1": 5, "h2": 1}


def test_candidate_bytes_are_bounded():
    pool = _pool(IntakeLimits(max_candidates=1000, max_candidate_bytes=40_000))
    for i in range(100):
        pool.offer(_group(f"s{i}", i, chars=2_000), f"s{i}")  # each sender on its own connection
    assert pool.candidate_bytes <= 40_000 and pool.skipped["candidates_full"] > 0
    assert pool.offer(_group("huge", 1, chars=20_000), "peer") is IntakeReason.CANDIDATE_CAP


def test_resent_groups_are_duplicates_even_after_verification():
    pool = _pool()
    pool.offer(_group("a", 1), "peer")
    assert pool.offer(_group("a", 1), "peer") is IntakeReason.DUPLICATE
    pool.verify_for_use(Verifier(lambda g: IntakeReason.ZERO_VARIANCE), wanted=1, rng=random.Random(0))
    assert pool.offer(_group("a", 1), "other-peer") is IntakeReason.DUPLICATE


def test_a_five_minute_old_batch_is_not_trained_on():
    pool = _pool(max_age_s=120)
    assert pool.offer(_group("a", 1, created_at=NOW - 300), "peer", received_at=NOW) is IntakeReason.TOO_OLD
    pool.add(ScoredGroup(_group("b", 2, created_at=NOW - 300), (1.0, 0.0)), received_at=NOW)
    assert pool.eligible() == []
    chosen = select_external("uniform", pool.eligible(), 4, random.Random(0), SamplerContext())
    assert chosen == [] and pool.evicted["too_old"] == 1


def test_a_future_timestamp_does_not_extend_a_groups_life():
    now = [NOW]
    pool = _pool(now=now, max_age_s=120)
    assert pool.offer(_group("a", 1, created_at=NOW + 10_000), "peer", received_at=NOW) is None
    pool.add(ScoredGroup(_group("b", 2, created_at=NOW + 10_000), (1.0, 0.0)), received_at=NOW)
    now[0] += 121
    assert pool.eligible() == []
    pool.verify_for_use(Verifier(), wanted=0, rng=random.Random(0))
    assert pool.candidate_count == 0 and pool.skipped["too_old"] == 1


# -- the node's step 5 ----------------------------------------------------------------------------


class FakeNetwork:
    def __init__(self, batches):
        self.batches = batches
        self.reports: list[tuple[str, str]] = []
        self.report_msg_ids: list[str] = []

    def receive_rollouts(self):
        batches, self.batches = self.batches, []
        yield from (ReceivedBatch(*batch) for batch in batches)

    def report(self, peer: str, reason: str, msg_id: str = "") -> None:
        self.reports.append((peer, reason))
        self.report_msg_ids.append(msg_id)


def _node(network, process, external_groups: int = 2) -> Node:
    cfg = NodeConfig(sampler={"external_groups": external_groups, "local_groups": 1})
    intake = SimpleNamespace(process=process, precheck=lambda group: None)
    runtime = SimpleNamespace(network=network, intake=intake, events=EventLog())
    return Node(cfg, runtime=runtime)  # type: ignore[arg-type]


def test_node_verifies_only_what_it_will_use_and_reports_over_budget_senders():
    import time

    now = time.time()
    honest = [_group("honest", i, created_at=now) for i in range(30)]
    bomber = [_group("bomber", 100 + i, created_at=now) for i in range(3)]
    network = FakeNetwork([("peer-h", honest, 0.1, "m-honest"), ("peer-b", bomber, 0.1, "m-bomber")])
    verifier = Verifier(
        lambda g: IntakeReason.SCORING_TIMEOUT if g.source == "bomber" else IntakeReason.ACCEPTED
    )
    node = _node(network, verifier, external_groups=2)
    counters = node.take_in_external()
    wanted = 2 + node.pool.limits.lookahead
    assert counters.received == 33 and counters.accepted == wanted
    assert counters.verified == len(verifier.calls) <= wanted + 3
    assert counters.rejected["scoring_timeout"] == counters.verified - wanted
    assert network.reports == [("peer-b", "scoring_timeout")] * counters.rejected["scoring_timeout"]
    # each report names the message that carried the group, so the host can blame its forwarder
    assert set(network.report_msg_ids) == {"m-bomber"}
    metrics = counters.intake_metrics()
    assert (
        metrics["intake_verified"] == counters.verified
        and metrics["intake_candidates"] == 33 - counters.verified
    )


def test_node_with_no_external_groups_verifies_nothing():
    import time

    network = FakeNetwork(
        [("peer-h", [_group("honest", i, created_at=time.time()) for i in range(10)], 0.1, "m1")]
    )
    verifier = Verifier()
    counters = _node(network, verifier, external_groups=0).take_in_external()
    assert counters.received == 10 and verifier.calls == [] and counters.candidates == 10


def test_groups_this_node_cannot_verify_never_become_candidates():
    from dataclasses import replace

    from swarmnode.rl.external import ExternalIntake
    from swarmnode.tasks.registry import TaskRegistry

    registry = TaskRegistry("easy", eval_size=20)
    intake = ExternalIntake(registry, lambda t: [1], lambda t, d: [1], 16)
    task = registry.eval_tasks(1)[0]
    good = RolloutGroup(task.ref, task.question, ("<answer>1</answer>", "x"), (True, True), "m", 0, NOW, "a")
    assert intake.precheck(good) is None
    other_preset = replace(good, task=replace(task.ref, dataset="spiral_matrix"))
    assert intake.precheck(other_preset).reason is IntakeReason.TASK_UNKNOWN
    refusing = TaskRegistry("easy", eval_size=20, verify_extra=(TaskSpec("spiral_matrix"),))
    spiral = refusing.regenerate(replace(refusing.eval_tasks(2)[1].ref))
    assert spiral.ref.dataset == "spiral_matrix"
    group = RolloutGroup(spiral.ref, spiral.question, ("a", "b"), (True, True), "m", 0, NOW, "a")
    checked = ExternalIntake(refusing, lambda t: [1], lambda t, d: [1], 16).precheck(group)
    assert checked.reason is IntakeReason.DATASET_REFUSED and checked.reason.reported_to_network


def test_unpenalized_verdicts_reach_the_host_once_per_sender_and_round():
    import time

    from swarmnode.p2p.pipeline import Action, Reason

    for reason in IntakeReason:
        if reason.reported_to_network:  # the node's notion of "penalized" is the host's policy
            assert (Reason(reason.value).action is Action.REJECT) == reason.penalized, reason
    groups = [_group("other-preset", i, created_at=time.time()) for i in range(100)]
    network = FakeNetwork([("peer-o", groups, 0.1, "m1"), ("peer-o", groups[:5], 0.1, "m2")])
    node = _node(network, Verifier())
    node.rt.intake.precheck = lambda g: IntakeResult(IntakeReason.DATASET_REFUSED)
    counters = node.take_in_external()
    assert counters.rejected["dataset_refused"] == 105 and counters.verified == 0
    assert network.reports == [("peer-o", "dataset_refused")]


# -- properties of the candidate pool and the verified pool (hypothesis; issue 13) ------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from swarmnode.rl.external import group_bytes, group_fingerprint  # noqa: E402

SOURCES = ("a", "b", "c", "d", "e")
_offers = st.lists(
    st.tuples(st.sampled_from(SOURCES), st.integers(0, 40), st.sampled_from([4, 50, 400, 3000])),
    max_size=120,
)


def _kept_in_order(keys_and_sources: list[tuple[str, str]], source: str) -> list[str]:
    return [key for key, s in keys_and_sources if s == source]


@settings(max_examples=60, deadline=None)
@given(_offers, st.integers(1, 40), st.sampled_from([2_000, 8_000, 40_000]))
def test_candidates_stay_bounded_accounted_unique_and_lose_their_oldest_first(
    offers, max_candidates, max_bytes
):
    pool = _pool(IntakeLimits(max_candidates=max_candidates, max_candidate_bytes=max_bytes))
    per_source_count, per_source_bytes = max(1, max_candidates // 4), max_bytes // 4
    refused: Counter[IntakeReason] = Counter()
    admitted: list[
        tuple[str, str]
    ] = []  # (fingerprint, source) of every group taken as a candidate, in order
    for source, index, chars in offers:
        group = _group(source, index, chars=chars)
        key = group_fingerprint(group)
        held_before = key in pool._candidates
        reason = pool.offer(group, f"peer-{source}")
        # a duplicate exactly when the same group is held (a pushed-out candidate may come back)
        assert (reason is IntakeReason.DUPLICATE) == held_before
        if reason is None:
            admitted.append((key, source))
        else:
            refused[reason] += 1
            assert reason is IntakeReason.DUPLICATE or group_bytes(group) > per_source_bytes
        held = list(pool._candidates.values())
        assert len(held) == pool.candidate_count <= max_candidates
        assert pool.candidate_bytes == sum(c.size for c in held) <= max_bytes
        for s in SOURCES:
            mine = [c for c in held if c.source == s]
            assert len(mine) <= per_source_count and sum(c.size for c in mine) <= per_source_bytes
    # every offer is held, counted as skipped with its reason, or refused with its reason
    assert len(offers) == pool.candidate_count + sum(pool.skipped.values()) + sum(refused.values())
    assert len(admitted) == pool.candidate_count + sum(pool.skipped.values())
    # eviction, per sender or global, takes the oldest first: each sender keeps its newest admissions
    keys = [(key, c.source) for key, c in pool._candidates.items()]
    for s in SOURCES:
        kept, seen = _kept_in_order(keys, s), _kept_in_order(admitted, s)
        assert kept == seen[len(seen) - len(kept) :]
    # a held candidate is a duplicate whoever sends it again
    for candidate in list(pool._candidates.values()):
        assert pool.offer(candidate.group, "someone-else") is IntakeReason.DUPLICATE


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(SOURCES), st.integers(0, 30)), max_size=80), st.integers(1, 24))
def test_verified_pool_stays_bounded_unique_and_evicts_its_oldest(adds, pool_size):
    pool = _pool(pool_size=pool_size)
    unique: list[tuple[str, int]] = []
    for source, index in adds:
        was_held = pool.contains(_group(source, index))
        added = pool.add(ScoredGroup(_group(source, index), (1.0, 0.0)), received_at=NOW)
        assert added is not was_held  # a duplicate exactly while the same group is held
        if added:
            unique.append((source, index))
        assert len(pool) <= pool_size
        for s in SOURCES:
            assert sum(p.source == s for p in pool.eligible()) <= max(1, pool_size // 4)
    assert len(unique) == len(pool) + pool.evicted["per_source_cap"] + pool.evicted["pool_full"]
    held = [(p.source, int(p.scored.group.question[1:])) for p in pool.eligible()]
    for s in SOURCES:
        kept = [x for x in held if x[0] == s]
        mine = [x for x in unique if x[0] == s]
        assert kept == mine[len(mine) - len(kept) :]  # each sender's newest stay


# -- verification order, limits and outcomes (mutation-tested, issue 13) ----------------------------


def test_verification_takes_one_group_per_sender_in_turn_newest_first():
    pool = _pool()
    for source, count in (("a", 3), ("b", 1), ("c", 2)):
        for i in range(count):
            pool.offer(_group(source, 10 * ord(source) + i), f"peer-{source}")
    verifier = Verifier(lambda g: IntakeReason.ZERO_VARIANCE)
    report = pool.verify_for_use(verifier, wanted=1, rng=random.Random(3))
    names = [g.question for g in verifier.calls]
    first, second, third = set(names[:3]), set(names[3:5]), names[5:]
    assert first == {"q972", "q980", "q991"} and second == {"q971", "q990"} and third == ["q970"]
    assert report.attempted == 6 and report.stopped_by == "" and pool.candidate_count == 0
    assert sum(pool.skipped.values()) == 0  # verified, not skipped


def test_attempt_limit_and_budget_edges():
    pool = _pool(IntakeLimits(max_attempts_per_round=3))
    for i in range(10):
        pool.offer(_group(f"s{i}", i), "peer", msg_id=f"m{i}")
    report = pool.verify_for_use(
        Verifier(lambda g: IntakeReason.ZERO_VARIANCE), wanted=2, rng=random.Random(0)
    )
    assert (report.attempted, report.stopped_by, pool.candidate_count) == (3, "attempts", 7)
    assert [(c.origin, c.msg_id) for c, _ in report.outcomes] == [
        ("peer", f"m{c.group.question[1:]}") for c, _ in report.outcomes
    ]
    now = [NOW]
    timed = _pool(IntakeLimits(budget_s_per_round=1.0), now=now)
    for i in range(10):
        timed.offer(_group(f"s{i}", i), "peer")
    verifier = Verifier(lambda g: IntakeReason.ZERO_VARIANCE, clock=timed.test_monotonic, cost_s=0.5)  # type: ignore[attr-defined]
    report = timed.verify_for_use(verifier, wanted=5, rng=random.Random(0))
    assert (report.attempted, report.stopped_by) == (3, "budget")  # started at 0.0, 0.5 and exactly 1.0


def test_an_accepted_group_already_in_the_pool_is_a_duplicate_outcome():
    pool = _pool()
    group = _group("a", 1)
    pool.offer(group, "peer")
    pool.add(ScoredGroup(_group("a", 1), (1.0, 0.0)), received_at=NOW)
    report = pool.verify_for_use(Verifier(), wanted=5, rng=random.Random(0))
    assert [r.reason for _, r in report.outcomes] == [IntakeReason.DUPLICATE] and len(pool) == 1


def test_a_candidate_behind_its_senders_newer_round_is_skipped_as_lagging():
    pool = _pool(max_round_lag=2)
    pool.offer(_group("a", 1, round_=0), "peer")
    pool.offer(_group("a", 2, round_=5), "peer")
    pool.verify_for_use(Verifier(), wanted=0, rng=random.Random(0))
    assert pool.skipped["round_lag"] == 1 and pool.candidate_count == 1


def test_candidate_limits_are_inclusive():
    size = group_bytes(_group("a", 0))
    per_source = 2 * size  # a sender may hold exactly two groups' bytes
    pool = _pool(IntakeLimits(max_candidates=8, max_candidate_bytes=4 * per_source))
    for source in "abcd":
        for i in range(2):
            assert pool.offer(_group(source, i), source) is None
    assert pool.candidate_count == 8 and pool.candidate_bytes == 4 * per_source and not pool.skipped
    pool.offer(_group("e", 0), "e")  # one more: the oldest goes
    assert pool.candidate_count == 8 and pool.skipped == {"candidates_full": 1}


def test_a_group_of_exactly_a_senders_byte_share_is_held():
    size = group_bytes(_group("a", 0))
    assert _pool(IntakeLimits(max_candidate_bytes=4 * size)).offer(_group("a", 0), "p") is None
    assert (
        _pool(IntakeLimits(max_candidate_bytes=4 * size - 1)).offer(_group("a", 0), "p")
        is IntakeReason.CANDIDATE_CAP
    )


def test_group_bytes_counts_text_and_a_fixed_cost_per_completion():
    group = _group("a", 7, chars=30)
    assert group_bytes(group) == len(group.question) + 2 * 30 + 2 * 64


def test_freshness_limit_is_inclusive_and_times_are_kept():
    now = [NOW]
    pool = _pool(now=now, max_age_s=60)
    assert pool.offer(_group("a", 1, created_at=NOW - 60), "peer", received_at=NOW - 1) is None
    pool.verify_for_use(Verifier(), wanted=0, rng=random.Random(0))  # expiry runs: exactly 60 s old stays
    assert pool.candidate_count == 1
    report = pool.verify_for_use(Verifier(), wanted=1, rng=random.Random(0))
    ((candidate, _),) = report.outcomes
    assert (candidate.received_at, candidate.msg_id, candidate.origin) == (NOW - 1, "", "peer")
    assert [(p.received_at, p.origin) for p in pool.eligible()] == [(NOW - 1, "peer")]
    pool.add(ScoredGroup(_group("b", 2), (1.0, 0.0)), received_at=NOW - 2, origin="relay")
    assert (pool.eligible()[-1].received_at, pool.eligible()[-1].origin) == (NOW - 2, "relay")


def test_seen_memory_is_bounded_and_forgets_the_oldest():
    pool = _pool(IntakeLimits(seen_memory=2), max_age_s=60)
    old = [_group(s, i, created_at=NOW - 3600) for i, s in enumerate("abc")]
    assert [pool.offer(g, "peer") for g in old] == [IntakeReason.TOO_OLD] * 3  # remembered
    assert pool.offer(old[2], "peer") is IntakeReason.DUPLICATE
    assert pool.offer(old[1], "peer") is IntakeReason.DUPLICATE
    assert pool.offer(old[0], "peer") is IntakeReason.TOO_OLD  # forgotten: the oldest of three


def test_a_single_wanted_group_is_verified():
    pool = _pool()
    pool.offer(_group("a", 1), "peer")
    assert pool.verify_for_use(Verifier(), wanted=1, rng=random.Random(0)).attempted == 1
