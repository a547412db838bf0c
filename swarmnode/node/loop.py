"""The node's round loop: the numbered steps of SAPO (docs: SAPO.md), wired from the parts.

One round:
  1. sample I local questions                        (tasks)
  2. generate G completions per question             (policy backend)
  3. score them with the local verifier               (tasks)
  4. publish them as one signed batch                 (wire + p2p; skipped in silo)
  5. take in what peers sent: regenerate, check, re-score, re-tokenize, pool   (rl.external)
  6. pick J external groups                           (rl.sampler)
  7. GRPO update on I local + J external groups       (rl.grpo)
  8. metrics line, heartbeat, checkpoint              (admin, rl.checkpoint)
The network never blocks the loop: the libp2p host lives in its own process and step 5 only takes
what has already arrived.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarmnode.config import NodeConfig
from swarmnode.node.runtime import NodeRuntime, build_runtime
from swarmnode.policy.backend import SamplingParams
from swarmnode.rl.external import ExternalPool, IntakeReason, IntakeResult
from swarmnode.rl.records import RolloutGroup, ScoredGroup
from swarmnode.rl.sampler import SamplerContext, select_external


@dataclass
class RoundCounters:
    """What happened to received groups since the last round, by outcome."""

    received: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # by reason
    rejected_sources: Counter[str] = field(default_factory=Counter)  # by sender peer id
    latencies: list[float] = field(default_factory=list)
    verified: int = 0  # candidates verified (regenerated + scored) this round, whatever the outcome
    skipped: Counter[str] = field(default_factory=Counter)  # candidates dropped unverified, by reason
    candidates: int = 0  # unverified candidates held after this round's intake
    verify_stopped_by: str = ""  # "attempts" / "budget" when the round's verification limit was hit
    reported: set[tuple[str, str]] = field(default_factory=set)  # (origin, reason) told to the host

    def intake_metrics(self) -> dict[str, Any]:
        """The round-metrics fields of bounded intake (docs/DESIGN.md "Metrics of a round")."""
        return {
            "intake_verified": self.verified,
            "intake_skipped": sum(self.skipped.values()),
            "intake_skipped_by_reason": dict(self.skipped),
            "intake_candidates": self.candidates,
            "intake_stopped_by": self.verify_stopped_by,
        }


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps so a round is never cut in half."""

    def __init__(self) -> None:
        self.stopping = False
        self.signal_name = ""

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.stopping:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stopping = True
        self.signal_name = signal.Signals(signum).name


class Node:
    def __init__(self, cfg: NodeConfig, runtime: NodeRuntime | None = None) -> None:
        self.cfg = cfg
        self.rt = runtime or build_runtime(cfg)
        self.pool = ExternalPool(cfg.sampler)
        self.rng = random.Random(cfg.seed)
        # Verification order has its own stream, so the sampler's draws stay as they were.
        self.intake_rng = random.Random(cfg.seed + 1)
        self._skipped_so_far: Counter[str] = Counter()
        self.stop = StopFlag()
        self.recent_rewards: deque[float] = deque(maxlen=50)
        self.round = 0

    # -- one round ------------------------------------------------------------------------
    def generate_local(self, round_index: int) -> tuple[list[ScoredGroup], dict[str, float]]:
        cfg, rt = self.cfg, self.rt
        tasks = rt.registry.sample(self.rng, cfg.sampler.local_groups)
        prompts = [rt.policy.encode_prompt(t.question) for t in tasks]
        params = SamplingParams(
            n=cfg.grpo.num_generations,
            temperature=cfg.grpo.temperature,
            top_p=cfg.grpo.top_p,
            max_new_tokens=cfg.grpo.max_completion_length,
            seed=cfg.seed * 1_000_003 + round_index,
        )
        start = time.perf_counter()
        generations = rt.backend.generate(prompts, params) if prompts else []
        gen_seconds = time.perf_counter() - start
        now = time.time()
        scored = []
        for task, prompt, gens in zip(tasks, prompts, generations, strict=True):
            group = RolloutGroup(
                task=task.ref,
                question=task.question,
                completions=tuple(g.text for g in gens),
                finished=tuple(g.finished for g in gens),
                model_id=rt.policy.model_id,
                round=round_index,
                created_at=now,
                # the behaviour log-prob of each completion, for receivers' off-policy weights
                behaviour_logprobs=None
                if any(g.logprob is None for g in gens)
                else tuple(float(g.logprob) for g in gens),  # type: ignore[arg-type]
                behaviour_num_tokens=tuple(len(g.token_ids) for g in gens),
            )
            rewards = tuple(rt.registry.score(task, g.text) for g in gens)
            scored.append(ScoredGroup(group, rewards, tuple(prompt), tuple(g.token_ids for g in gens)))
        tokens = sum(len(g.token_ids) for gens in generations for g in gens)
        return scored, {
            "gen_seconds": gen_seconds,
            "generated_tokens": tokens,
            "tokens_per_s": tokens / max(gen_seconds, 1e-9),
        }

    def take_in_external(self) -> RoundCounters:
        """Step 5: hold what peers sent as cheap candidates, then verify (regenerate, check, score in
        the isolated worker, re-tokenize) only as many as the sampler is about to use plus a small
        look-ahead, within the round's intake budget (rl.external)."""
        counters = RoundCounters()
        if self.rt.network is None:
            return counters
        for batch in self.rt.network.receive_rollouts():
            counters.latencies.append(batch.latency_s)
            received_at = time.time()
            for group in batch.groups:
                counters.received += 1
                refused = self.rt.intake.precheck(group)
                if refused is None:
                    dropped = self.pool.offer(group, batch.origin, received_at, batch.msg_id, batch.forwarder)
                    refused = None if dropped is None else IntakeResult(dropped)
                if refused is not None:
                    self._count_rejection(counters, batch.origin, refused, batch.msg_id)
        wanted = self.cfg.sampler.external_groups
        if wanted > 0:
            wanted += self.pool.limits.lookahead
        report = self.pool.verify_for_use(self.rt.intake.process, wanted, self.intake_rng)
        counters.verified = report.attempted
        counters.verify_stopped_by = report.stopped_by
        for candidate, result in report.outcomes:
            if result.reason is IntakeReason.ACCEPTED:
                counters.accepted += 1
            else:
                self._count_rejection(counters, candidate.origin, result, candidate.msg_id)
        counters.skipped = self.pool.skipped - self._skipped_so_far
        self._skipped_so_far = Counter(self.pool.skipped)
        counters.candidates = self.pool.candidate_count
        return counters

    def _count_rejection(
        self, counters: RoundCounters, origin: str, result: IntakeResult, msg_id: str = ""
    ) -> None:
        assert self.rt.network is not None
        counters.rejected[result.reason.value] += 1
        counters.rejected_sources[origin] += 1
        if not result.reason.reported_to_network:
            return
        # Penalized verdicts come from verification (a few per round) and are all reported; the
        # unpenalized ones (task_unknown, dataset_refused) may hit every received group, so the host
        # hears of each at most once per sender and round.
        first = (origin, result.reason.value) not in counters.reported
        if result.reason.penalized or first:
            counters.reported.add((origin, result.reason.value))
            self.rt.network.report(origin, result.reason.value, msg_id)
        if first:
            self.rt.events.emit("rejected", f"group from {origin[:16]}: {result.reason}", peer=origin)

    def run_round(self, round_index: int) -> dict[str, Any]:
        cfg, rt = self.cfg, self.rt
        round_start = time.perf_counter()
        local, gen_stats = self.generate_local(round_index)
        published = 0
        # Groups without reward variance carry no signal for anyone: receivers verify and drop them
        # (zero_variance), so they are not sent unless p2p.publish_zero_variance asks for it.
        shared = [s.group for s in local if cfg.p2p.publish_zero_variance or s.reward_std > 0]
        if rt.network is not None and local:
            published = rt.network.publish_rollouts(shared, node_round=round_index)
        intake = self.take_in_external()
        local_rewards = [r for s in local for r in s.rewards]
        pass_rate = sum(local_rewards) / len(local_rewards) if local_rewards else 0.0
        chosen = select_external(
            cfg.sampler.strategy,
            self.pool.eligible(),
            cfg.sampler.external_groups,
            self.rng,
            SamplerContext(local_pass_rate=pass_rate, per_source_cap=cfg.sampler.per_source_cap),
        )
        self.pool.take(chosen)
        external = [p.scored for p in chosen]
        train_stats = rt.trainer.step(local + external) if local or external else {}
        # The trainer's reward and zero-std figures cover the whole batch (local + external);
        # the round's headline figures below are the node's own rollouts.
        train_stats = {
            f"batch_{k}" if k in ("reward_mean", "frac_zero_std") else k: v for k, v in train_stats.items()
        }
        rt.backend.sync_weights()
        ext_rewards = [r for s in external for r in s.rewards]
        metrics: dict[str, Any] = {
            "round": round_index,
            "time": time.time(),
            "reward_mean": pass_rate,
            "reward_mean_external": sum(ext_rewards) / len(ext_rewards) if ext_rewards else None,
            "frac_zero_std": (sum(1 for s in local if s.reward_std == 0) / len(local)) if local else 0.0,
            **gen_stats,
            "published": published,
            "unpublished_zero_variance": len(local) - len(shared) if rt.network is not None else 0,
            "received": intake.received,
            "accepted": intake.accepted,
            "rejected_by_reason": dict(intake.rejected),
            **intake.intake_metrics(),
            "gossip_latency_s": intake.latencies,
            "pool_size": len(self.pool),
            "used_local": len(local),
            "used_external": len(external),
            "used_by_source": dict(Counter(s.group.source for s in external)),
            "rejected_by_source": dict(intake.rejected_sources),
            "silo": rt.network is None or rt.network.is_silo(),
            **train_stats,
            "round_seconds": time.perf_counter() - round_start,
        }
        self.recent_rewards.append(pass_rate)
        return metrics

    # -- the whole run -----------------------------------------------------------------------
    def run(self) -> int:
        cfg, rt = self.cfg, self.rt
        self.stop.install()
        start_round = rt.resume(self)
        metrics_path = cfg.data_dir / "metrics.jsonl"
        truncate_metrics(metrics_path, start_round)
        rt.announce_start(start_round)
        if start_round == 0:
            rt.wait_for_peers(lambda: self.stop.stopping)
        last_saved = start_round
        try:
            with rt.progress(start_round, cfg.rounds) as progress:
                for round_index in range(start_round, cfg.rounds):
                    if self.stop.stopping:
                        break
                    metrics = self.run_round(round_index)
                    self.round = round_index + 1
                    if cfg.eval_every and (self.round % cfg.eval_every == 0 or self.round == cfg.rounds):
                        metrics["eval_accuracy"] = rt.evaluate()
                    append_jsonl(metrics_path, metrics)
                    rt.after_round(self, metrics)
                    progress(metrics)
                    if self.round % cfg.checkpoint_every == 0 or self.round == cfg.rounds:
                        rt.save(self)
                        last_saved = self.round
        except KeyboardInterrupt:
            rt.console.print("[yellow]interrupted twice: stopping without finishing the round[/]")
        finally:
            if self.round > last_saved:
                rt.save(self)
            rt.close()
        if self.stop.stopping:
            rt.console.print(
                f"stopped by {self.stop.signal_name} after round {self.round}; checkpoint saved in "
                f"{cfg.data_dir / 'checkpoints'} (run the same command to resume)"
            )
        return 0

    # -- checkpointed state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "sampler_rng": self.rng.getstate(),
            "recent_rewards": list(self.recent_rewards),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round = int(state["round"])
        if "sampler_rng" in state:
            version, internal, gauss = state["sampler_rng"]
            self.rng.setstate((version, tuple(internal), gauss))
        self.recent_rewards.extend(state.get("recent_rewards", []))


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record, default=float) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def truncate_metrics(path: Path, start_round: int) -> None:
    """On resume, drop lines written after the checkpoint we resume from, so the curve continues."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["round"] < start_round:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by a crash
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
