"""Adversaries and chaos in `swarmnode simulate`, on loopback with the embedded tiny model.

A real run (2 honest nodes + a forger, a code injector and a regex bomber, each a real libp2p peer
started by the launcher from the experiment's ``[[adversary]]`` tables): the honest nodes finish,
train on 0 groups from any adversary, reject the injector's and bomber's groups for their reason,
ban the forger for its bad signatures, and no file appears from the injected code. A chaos run:
one node is killed with SIGKILL while it writes a checkpoint, restarted, and loses <= 1 round.
"""

import io
import json
import time
from pathlib import Path

import pytest
from rich.console import Console

from swarmnode.config import ConfigError
from swarmnode.identity import Identity
from swarmnode.rl.checkpoint import HOLD_ENV
from swarmnode.sim.adversary import (
    AdversarySpec,
    forge,
    injection_answer,
    parse_adversaries,
    regex_bomb_groups,
)
from swarmnode.sim.chaos import node_environment as chaos_node_environment
from swarmnode.sim.chaos import parse_chaos
from swarmnode.sim.experiment import parse_experiment
from swarmnode.sim.launcher import run_dir, run_one
from swarmnode.wire import Kind, WireCaps, open_envelope, seal, verify_envelope

ROUNDS = 12
TINY = {
    "sampler.local_groups": 2,
    "sampler.external_groups": 2,
    "grpo.num_generations": 4,
    "tasks.eval_size": 4,
    "eval_every": 0,
    "admin.heartbeat_interval": 2.0,
}


def _run(tmp_path: Path, raw: dict, timeout_s: float = 420.0) -> tuple[bool, Path]:
    experiment = parse_experiment(raw, "test")
    configuration = experiment.configurations[0]
    ok = run_one(experiment, configuration, 0, tmp_path, Console(file=io.StringIO()), timeout_s)
    return ok, run_dir(tmp_path, configuration, 0)


def _rows(directory: Path, index: int) -> list[dict]:
    return [
        json.loads(line) for line in (directory / f"node-{index}" / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    root = tmp_path_factory.mktemp("adversary")
    raw = {
        "name": "attacked",
        "nodes": 2,
        "rounds": ROUNDS,
        "base": {
            **TINY,
            "checkpoint_every": ROUNDS,
            # chain_sum to train on; binary_matrix (whose reasoning-gym scorer eval()s the answer) is
            # verified on peers' text only: the code injector's target.
            "tasks.mix": [{"dataset": "chain_sum", "config": {"min_digits": 1, "max_digits": 1}}],
            "tasks.verify_extra": [{"dataset": "binary_matrix"}],
            # wait for the other honest node and the three adversaries before round 0
            "p2p.min_peers_at_start": 4,
        },
        # Forger last in the list but on its own connection: its ban must not hide the others' groups.
        "adversary": [
            {"kind": "code_injector", "rate": 2.0},
            {"kind": "regex_bomber", "rate": 1.0},
            {"kind": "forger", "rate": 2.0},
        ],
    }
    ok, directory = _run(root, raw)
    return ok, directory


@pytest.mark.integration
def test_honest_nodes_finish_and_train_on_nothing_from_adversaries(attacked):
    ok, directory = attacked
    logs = [(directory / f"node-{i}" / "node.log").read_text()[-3000:] for i in range(2)]
    assert ok, logs
    summary = json.loads((directory / "adversaries.json").read_text())
    kinds = {a["kind"]: a for a in summary["adversaries"]}
    assert set(kinds) == {"code_injector", "regex_bomber", "forger"}
    assert all(sum(a["sent"].values()) > 0 for a in kinds.values()), kinds
    assert summary["groups_used_from_adversaries"] == {}
    assert summary["groups_used_from_honest_peers"] > 0  # the swarm itself still worked
    for index in range(2):
        rows = _rows(directory, index)
        assert [r["round"] for r in rows] == list(range(ROUNDS))
        adversary_ids = {a["peer_id"] for a in kinds.values()}
        assert not adversary_ids & {peer for r in rows for peer in r["used_by_source"]}


@pytest.mark.integration
def test_injected_code_never_runs_and_its_groups_are_rejected(attacked):
    _, directory = attacked
    summary = json.loads((directory / "adversaries.json").read_text())
    stats = json.loads(next(directory.glob("adversary-code_injector-*/adversary.json")).read_text())
    assert stats["injection_paths"] and all("binary_matrix" in p for p in stats["injection_paths"])
    assert summary["injection_files_found"] == []
    assert not any(Path(p).exists() for p in stats["injection_paths"])
    # The honest nodes did score the injector's groups (so its text reached the scoring step) and
    # rejected them: outside binary_matrix's answer grammar, every completion scores 0.
    assert summary["groups_rejected_from_adversaries"].get("code_injector", 0) > 0
    rejected_reasons = {
        reason for i in range(2) for r in _rows(directory, i) for reason in r["rejected_by_reason"]
    }
    assert "zero_variance" in rejected_reasons


@pytest.mark.integration
def test_regex_bomb_groups_are_rejected(attacked):
    _, directory = attacked
    summary = json.loads((directory / "adversaries.json").read_text())
    assert summary["groups_rejected_from_adversaries"].get("regex_bomber", 0) > 0


@pytest.mark.integration
def test_forger_is_banned_for_bad_signatures(attacked):
    _, directory = attacked
    forger = json.loads(next(directory.glob("adversary-forger-*/adversary.json")).read_text())
    assert forger["sent"].get("claims_other_key", 0) > 0
    # the hosts' own verdicts outlive the run (p2p/p2p-status.json, written when each node stops)
    summary = json.loads((directory / "adversaries.json").read_text())
    assert summary["host_rejected_by_reason"].get("bad_signature", 0) > 0, summary["host_rejected_by_reason"]
    for index in range(2):
        bans = json.loads((directory / f"node-{index}" / "p2p" / "p2p-bans.json").read_text())["bans"]
        reasons = {b["peer_id"]: b["reason"] for b in bans}
        assert reasons.get(forger["peer_id"]) == "bad_signature", bans


@pytest.mark.integration
def test_chaos_kill_during_checkpoint_restarts_and_loses_at_most_one_round(tmp_path: Path):
    raw = {
        "name": "chaos",
        "nodes": 2,
        "rounds": ROUNDS,
        "base": {**TINY, "sampler.external_groups": 1, "checkpoint_every": 1},
        "chaos": {
            "kill_every_s": 1.0,
            "max_kills": 1,
            "during_checkpoint": True,
            "first_kill_after_s": 0.0,
            "min_rounds_done": 3,
        },
    }
    ok, directory = _run(tmp_path, raw)
    logs = [(directory / f"node-{i}" / "node.log").read_text()[-3000:] for i in range(2)]
    assert ok, logs
    chaos = json.loads((directory / "chaos.json").read_text())
    assert chaos["restarts"] == 1 and chaos["unsettled"] == 0, chaos
    kill = chaos["kills"][0]
    assert kill["during_checkpoint"], kill  # caught writing a checkpoint (a .tmp-* directory existed)
    assert kill["rounds_done_before"] >= 3
    assert 0 <= kill["rounds_lost"] <= 1, kill
    rows = _rows(directory, kill["node"])
    assert [r["round"] for r in rows] == list(range(ROUNDS))  # the curve continues after the restart
    assert "resumed from" in (directory / f"node-{kill['node']}" / "node.log").read_text()


# -- unit checks of the crafted messages and the experiment sections (no processes) --------------


def test_forged_envelopes_fail_signature_verification():
    me, victim = Identity.generate(), Identity.generate()
    genuine = seal(me, Kind.ROLLOUT_BATCH, b"\x08\x01")
    caps = WireCaps()
    assert verify_envelope(open_envelope(genuine, caps))
    for variant in (0, 1):
        forged = open_envelope(forge(genuine, victim, variant), caps)
        assert not verify_envelope(forged)
    assert open_envelope(forge(genuine, victim, 0), caps).signer == victim.peer_id  # claims the victim


def test_attack_payloads_are_what_the_issue_describes(tmp_path: Path):
    assert "open(" in injection_answer("binary_matrix", tmp_path / "x") and "[[0]]" in injection_answer(
        "binary_matrix", tmp_path / "x"
    )
    assert "__import__" in injection_answer("puzzle24", tmp_path / "x")

    class _Task:
        class ref:  # noqa: N801 - a stand-in TaskRef
            dataset = "chain_sum"

        question = "1 + 1 = ?"

    caps = WireCaps()
    (group,) = regex_bomb_groups([_Task], caps, "m", 0)  # type: ignore[list-item]
    assert len(group.completions) == 64
    assert all(c.startswith("<answer> <answer> ") and "</answer>" not in c for c in group.completions)
    assert len(group.completions[0]) <= caps.max_chars_per_completion


def test_experiment_sections_are_validated():
    assert parse_adversaries([{"kind": "poisoner", "count": 2, "marker": "M"}]) == (
        AdversarySpec("poisoner", 2, 1.0, {"marker": "M"}),
    )
    with pytest.raises(ConfigError, match="adversary kind 'nope'"):
        parse_adversaries([{"kind": "nope"}])
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_adversaries([{"kind": "sybil", "identites": 3}])
    with pytest.raises(ConfigError, match="chaos: unknown keys"):
        parse_chaos({"kill_every": 3})
    with pytest.raises(ConfigError, match="kill_every_s must be > 0"):
        parse_chaos({"kill_every_s": 0})
    with pytest.raises(ConfigError, match="checkpoint_hold_s must be between 0 and 10"):
        parse_chaos({"during_checkpoint": True, "checkpoint_hold_s": 60})
    # Only a run that kills during checkpoints slows its nodes' saves down.
    assert chaos_node_environment(parse_chaos({"during_checkpoint": True})) == {HOLD_ENV: "0.5"}
    assert chaos_node_environment(parse_chaos({"during_checkpoint": False})) == {}
    assert chaos_node_environment(None) == {}
    experiment = parse_experiment(
        {
            "nodes": 2,
            "rounds": 1,
            "adversary": [{"kind": "forger", "count": 2}],
            "configuration": [{"name": "clean", "adversary": []}, {"name": "default"}],
        }
    )
    clean, default = experiment.configurations
    assert experiment.adversaries_for(clean) == ()
    assert experiment.adversaries_for(default) == (AdversarySpec("forger", 2, 1.0, {}),)


# -- each kind's messages, offline: the adversary's real step() with a recording network stub --------


class _RecordingClient:
    """Stands in for the P2PClient (isolates what an adversary publishes from the network)."""

    def __init__(self, incoming: list | None = None) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.incoming = list(incoming or [])

    def publish(self, kind: str, data: bytes) -> bool:
        self.published.append((kind, data))
        return True

    def drain(self) -> list:
        items, self.incoming = self.incoming, []
        return items


def _adversary(tmp_path: Path, kind: str, **options: object):
    from swarmnode.config import config_from_dict
    from swarmnode.sim.adversary import Adversary, build_parser

    node_toml = tmp_path / "node.toml"
    if not node_toml.exists():
        cfg = config_from_dict(
            {"tasks": {"mix": [{"dataset": "chain_sum"}], "verify_extra": [{"dataset": "binary_matrix"}]}}
        )
        node_toml.write_text(cfg.to_toml())
    argv = ["run", "--kind", kind, "--data-dir", str(tmp_path / kind), "--node-config", str(node_toml)]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    adversary = Adversary(build_parser().parse_args(argv), lambda: False)
    adversary.client = _RecordingClient()  # type: ignore[assignment]
    return adversary


def _groups(data: bytes):
    from swarmnode.wire import decode_message

    env = open_envelope(data, WireCaps())
    return env, decode_message(env, WireCaps()).groups


def test_each_kind_publishes_its_attack(tmp_path: Path):
    from swarmnode.config import P2PConfig
    from swarmnode.p2p.client import Received
    from swarmnode.p2p.pipeline import ValidationPipeline

    forger = _adversary(tmp_path, "forger")
    for _ in range(4):
        forger.step()
    # A fresh pipeline per message: the first bad signature bans the forger's connection at once.
    verdicts = {
        ValidationPipeline.from_config(P2PConfig())
        .validate(Kind.ROLLOUT_BATCH, d, forger.identity.peer_id)
        .reason
        for _, d in forger.client.published
    }
    assert verdicts == {"bad_signature"}
    assert forger.stats.record["sent"] == {"claims_other_key": 2, "flipped_signature": 2}

    injector = _adversary(tmp_path, "code_injector")
    injector.step()
    _, groups = _groups(injector.client.published[0][1])
    assert {g.task.dataset for g in groups} == {"binary_matrix"}  # the dataset whose scorer eval()s
    assert all("open(" in c and "[[0]]" in c for g in groups for c in g.completions)

    poisoner = _adversary(tmp_path, "poisoner", marker="pwn")
    poisoner.step()
    _, groups = _groups(poisoner.client.published[0][1])
    for group in groups:
        assert group.completions[0].startswith("pwn <answer>") and len(group.completions) == 8
        assert sum("pwn" in c for c in group.completions) == 1

    mismatcher = _adversary(tmp_path, "mismatcher")
    mismatcher.step()
    _, groups = _groups(mismatcher.client.published[0][1])
    for group in groups:  # the text is not what the reference regenerates to; the answers are right for it
        task = mismatcher.registry.regenerate(group.task)
        assert group.question != task.question and group.question.startswith(task.question)
        assert group.completions[0] == f"<answer>{task.answer}</answer>"

    sybil = _adversary(tmp_path, "sybil", identities=5)
    for _ in range(5):
        sybil.step()
    signers = {open_envelope(d, WireCaps()).signer for _, d in sybil.client.published}
    assert len(signers) == 5 and sybil.identity.peer_id not in signers
    assert signers <= set(sybil.stats.record["peer_ids"])

    flooder = _adversary(tmp_path, "flooder")
    flooder.step()
    ((_, flood),) = flooder.client.published
    assert WireCaps().max_message_bytes // 2 < len(flood) <= WireCaps().max_message_bytes

    # Replayer and free rider work on what they receive: an honest peer's batch.
    honest = forger.client.published and seal(
        Identity.generate(), Kind.ROLLOUT_BATCH, _honest_payload(poisoner)
    )
    received = Received("ROLLOUT_BATCH", honest, "12D3KooWhonest", "00", 0.0)
    replayer = _adversary(tmp_path, "replayer", replay_delay_s=0)
    replayer.client.incoming = [received]
    replayer.step()
    replayer.step()
    assert [d for _, d in replayer.client.published] == [honest, honest]
    assert replayer.stats.record["sent"] == {"replay_immediate": 1, "replay_after_seen_cache": 1}
    rider = _adversary(tmp_path, "free_rider")
    rider.client.incoming = [received]
    rider.step()
    ((_, republished),) = rider.client.published
    env, groups = _groups(republished)
    assert env.signer == rider.identity.peer_id
    assert [g.completions for g in groups] == [g.completions for g in _groups(honest)[1]]


def _honest_payload(adversary) -> bytes:
    from swarmnode.sim.adversary import trainable_groups
    from swarmnode.wire import encode_rollout_batch

    groups = trainable_groups(adversary.tasks(2), adversary.rng, "honest", 0)
    return encode_rollout_batch(groups, node_round=0, sequence=1, model_id="honest", created_at=time.time())


def _write_node(run: Path, index: int, rows: list[dict], bans: list[dict] | None = None) -> str:
    node = run / f"node-{index}"
    (node / "p2p").mkdir(parents=True)
    peer_id = Identity.load_or_create(node / "identity.key").peer_id
    (node / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if bans is not None:
        (node / "p2p" / "p2p-bans.json").write_text(json.dumps({"version": 1, "bans": bans}))
    return peer_id


def test_summary_counts_forged_and_unknown_sources_rejections_floor_and_bans(tmp_path: Path):
    from swarmnode.sim.adversary import adversary_summary

    forger = _adversary(tmp_path, "forger")
    forger.stats.write(force=True)
    # the key its envelopes claim is one of its ids: anything trained on under it is counted as the forger's
    assert forger.victim.peer_id in forger.stats.record["peer_ids"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "adversary-forger-0").symlink_to(forger.data_dir)
    other = Identity.generate().peer_id
    rows = [{"round": 0, "used_by_source": {"HONEST": 3, forger.victim.peer_id: 1, "12D3KooWunknown": 2},
             "rejected_by_source": {forger.identity.peer_id: 4},
             "rejected_by_reason": {"zero_variance": 4}, "rows_zeroed_low_likelihood": 2.0}]  # fmt: skip
    honest = _write_node(run, 1, [])
    rows[0]["used_by_source"][honest] = rows[0]["used_by_source"].pop("HONEST")
    _write_node(run, 0, rows, bans=[
        {"peer_id": forger.identity.peer_id, "reason": "bad_signature", "until": 1e12, "bans": 1},
        {"peer_id": other, "reason": "rate_limited", "until": 1e12, "bans": 1},
    ])  # fmt: skip
    status = {"verdicts": {"accepted": 9, "duplicate": 5, "replay": 2}, "drops": {}}
    (run / "node-0" / "p2p" / "p2p-status.json").write_text(json.dumps(status))
    (run / "node-1" / "p2p" / "p2p-status.json").write_text(json.dumps({"verdicts": {"replay": 1}}))
    summary = adversary_summary(run)
    assert summary["host_rejected_by_reason"] == {"duplicate": 5, "replay": 3}  # accepted left out
    assert summary["groups_used_from_adversaries"] == {"forger": 1}
    assert summary["groups_used_from_honest_peers"] == 3
    assert summary["groups_used_from_unknown_sources"] == 2
    assert summary["groups_rejected_from_adversaries"] == {"forger": 4}
    assert summary["intake_rejected_by_reason"] == {"zero_variance": 4}
    assert summary["rows_zeroed_low_likelihood"] == 2.0
    assert summary["bans_of_adversaries"] == {"forger": {"bad_signature": 1}}  # not the other peer's ban


def test_suite_table_compares_each_configuration_with_the_clean_run(tmp_path: Path):
    from swarmnode.sim.adversary import control_strings, suite_markdown, suite_table

    raw = {"name": "t", "nodes": 1, "rounds": 2, "seeds": [0, 1],
           "configuration": [{"name": "clean"}, {"name": "chaos", "chaos": {"kill_every_s": 5}}]}  # fmt: skip
    experiment = parse_experiment(raw, "test")
    accuracy = {("clean", 0): 0.30, ("clean", 1): 0.40, ("chaos", 0): 0.20, ("chaos", 1): 0.22}
    for (name, seed), acc in accuracy.items():
        run = tmp_path / "runs" / name / f"seed-{seed}"
        rows = [{"round": 0, "reward_mean": 0.5}, {"round": 1, "reward_mean": 1.0, "eval_accuracy": acc}]
        _write_node(run, 0, rows)
        (run / "done.json").write_text("{}")
        if name == "chaos":
            kills = [{"rounds_lost": seed}, {"rounds_lost": None}]
            (run / "chaos.json").write_text(json.dumps({"kills": kills, "restarts": 2, "unsettled": 1}))
    table = suite_table(tmp_path, experiment)
    clean, chaos = table["rows"]
    assert clean["heldout_accuracy"][0] == pytest.approx(0.35)
    assert clean["heldout_accuracy"][1] == pytest.approx(0.0707107, rel=1e-5)  # sample std over seeds
    assert chaos["heldout_accuracy_delta"] == pytest.approx(-0.14)
    assert (clean["within_one_std_of_baseline"], chaos["within_one_std_of_baseline"]) == (True, False)
    assert chaos["cumulative_reward_ratio"] == pytest.approx(1.0)
    assert chaos["restarts"] == 4 and chaos["restarts_unsettled"] == 2
    assert chaos["rounds_lost_per_restart"] == [0, 1]
    assert "| chaos | 2 | 0.210 ± 0.014 | -0.140 | **no** |" in suite_markdown(table)
    controls = control_strings("pwn", 8)
    assert len(set(controls)) == 8 and "pwn" not in controls and {len(c) for c in controls} == {3}
