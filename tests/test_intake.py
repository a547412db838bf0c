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


def test_candidate_bytes_are_bounded():
    pool = _pool(IntakeLimits(max_candidates=1000, max_candidate_bytes=40_000))
    for i in range(100):
        pool.offer(_group(f"s{i}", i, chars=2_000), "peer")
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
        yield from batches

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
