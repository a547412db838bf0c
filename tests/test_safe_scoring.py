"""Peer text never reaches code that executes it, extraction is linear, and foreign text is scored
in an isolated worker without key material, under CPU and memory limits (issue 10, items 1-2)."""

from __future__ import annotations

import inspect
import os
import random
import string
from pathlib import Path

import pytest
import reasoning_gym.factory
from reasoning_gym.dataset import ProceduralDataset
from reasoning_gym.utils import extract_answer as reasoning_gym_extract_answer

from swarmnode.p2p.pipeline import Action, Reason
from swarmnode.rl.external import ExternalIntake, IntakeReason
from swarmnode.rl.records import RolloutGroup
from swarmnode.tasks import safety, verify
from swarmnode.tasks.presets import PAPER_DATASETS, TaskSpec
from swarmnode.tasks.registry import RefusedForForeignTextError, TaskRegistry
from swarmnode.tasks.safety import DEFAULT_SCORER_DATASETS, PolicyKind, foreign_text_policy
from swarmnode.tasks.verify import extract_last_answer
from swarmnode.tasks.worker import ScoreStatus, ScoringWorker, WorkerLimits, WorkerScore

BOMB = "<answer> " * 910  # 8,190 characters; reasoning-gym's extraction is quadratic on it


def _rce(path: Path) -> str:
    return f"<answer>open('{path}','w').write('pwned') and [[0]]</answer>"


def _group(task, completions: list[str], source: str = "peerA") -> RolloutGroup:
    return RolloutGroup(
        task=task.ref, question=task.question, completions=tuple(completions),
        finished=(True,) * len(completions), model_id="m", round=0, created_at=0.0, source=source,
    )  # fmt: skip


def _intake(registry: TaskRegistry, worker: ScoringWorker | None = None) -> ExternalIntake:
    return ExternalIntake(registry, lambda t: [1], lambda t, d: [1], 16, worker=worker)


def _gold(task) -> str:
    return task.metadata["example_answer"] if task.ref.dataset == "propositional_logic" else task.answer


# -- the audit table -----------------------------------------------------------------------------


def test_policy_table_matches_the_installed_reasoning_gym() -> None:
    datasets = reasoning_gym.factory.DATASETS
    default = {n for n, (cls, _) in datasets.items() if cls.score_answer is ProceduralDataset.score_answer}
    assert default == set(DEFAULT_SCORER_DATASETS)
    for name, (cls, _) in datasets.items():
        source = inspect.getsource(cls.score_answer) if name not in default else ""
        executes = any(call in source for call in ("eval(", "exec(", "parse_expr", "sympify", "pickle"))
        policy = foreign_text_policy(name)
        if executes:  # never reached with peer text: refused, or scored by a safe replacement
            assert policy.refused or policy.scorer is not None, name
        if policy.kind is PolicyKind.GRAMMAR:
            assert policy.has_grammar, name


def test_paper_and_easy_datasets_stay_open_to_peers_behind_a_grammar() -> None:
    for name in (*PAPER_DATASETS, "chain_sum", "basic_arithmetic"):
        assert not foreign_text_policy(name).refused, name
    assert TaskRegistry("paper").refused_for_foreign_text() == []
    for name in ("spiral_matrix", "string_insertion", "n_queens", "puzzle24", "countdown", "codeio"):
        assert foreign_text_policy(name).refused, name  # eval / sympy parse_expr / not audited


@pytest.mark.parametrize("dataset", PAPER_DATASETS)
def test_grammar_gated_scores_equal_reasoning_gyms_on_normal_answers(dataset: str) -> None:
    registry = TaskRegistry("paper")
    rg_score = reasoning_gym.factory.get_score_answer_fn(dataset)
    tasks = [t for t in registry.eval_tasks(9 * 4) if t.ref.dataset == dataset]
    for task in tasks:
        gold = _gold(task)
        assert (
            rg_score(gold, task.entry()) != 1.0
            or registry.score(task, f"<answer>{gold}</answer>", foreign=True) == 1.0
        )
        # Elsewhere the grammar may be stricter than reasoning-gym (it ignores junk after a \\frac{a}{b}),
        # never more lenient.
        for answer in (gold + "0", " " + gold, "0", "Monday", "1/2", "(P ∨ Q)", "1 0\n0 1", "-1.5e3"):
            expected = 1.0 if rg_score(answer.strip(), task.entry()) == 1.0 else 0.0
            assert registry.score(task, f"<answer>{answer}</answer>", foreign=True) <= expected, (
                task.ref,
                answer,
            )


# -- extraction ----------------------------------------------------------------------------------


def test_linear_extraction_equals_reasoning_gyms_on_normal_and_odd_inputs() -> None:
    cases = [
        "<answer>42</answer>", "x <answer> 4 </answer> y", "<answer>1</answer><answer>2</answer>",
        "<answer><answer>3</answer>", "<answer>\n5\n</answer>", "no tags", "<answer>open", "</answer><answer>",
        "<answer></answer>", "<answer> </answer>", "<answer>a</answer> <answer>b", "<answer>  x  y </answer>",
    ]  # fmt: skip
    rng = random.Random(0)
    pieces = ["<answer>", "</answer>", " ", "\n", "a", "7", "<", ">", "/", "answer"]
    cases += ["".join(rng.choice(pieces) for _ in range(rng.randrange(12))) for _ in range(3000)]
    for text in cases:
        assert extract_last_answer(text) == reasoning_gym_extract_answer(text), repr(text)


class _CountingText(str):
    """A str that counts the searches made on it (extraction may only scan it about once)."""

    finds = 0

    def find(self, *args: object) -> int:  # type: ignore[override]
        type(self).finds += 1
        return super().find(*args)  # type: ignore[arg-type]


def test_answer_tag_bomb_costs_two_searches() -> None:
    _CountingText.finds = 0
    assert extract_last_answer(_CountingText(BOMB)) is None
    assert _CountingText.finds == 2  # the opening tag, then one failed search for a closing tag
    _CountingText.finds = 0
    text = _CountingText("<answer>1</answer> " * 100)
    assert extract_last_answer(text) == "1" and _CountingText.finds == 201


def test_completion_longer_than_the_budget_is_never_read(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(verify, "extract_last_answer", lambda text: calls.append(text) or "1")
    assert verify.score_completion(lambda a, e: 1.0, {"answer": "1"}, "x" * 2000, max_chars=1024) == 0.0
    assert calls == []
    assert verify.completion_char_budget(12) == 1024 and verify.completion_char_budget(512) == 16384


# -- remote code execution -----------------------------------------------------------------------


def test_binary_matrix_eval_payload_writes_nothing_and_scores_zero(tmp_path: Path) -> None:
    registry = TaskRegistry("binary_matrix")
    task = registry.eval_tasks(1)[0]
    target = tmp_path / "pwned"
    assert registry.score(task, _rce(target), foreign=True) == 0.0
    assert registry.score(task, _rce(target)) == 0.0  # our own text goes through the grammar too
    result = _intake(registry).process(_group(task, [_rce(target), f"<answer>{task.answer}</answer>"]))
    assert result.reason is IntakeReason.ACCEPTED and result.scored.rewards == (0.0, 1.0)
    assert not target.exists()


def test_datasets_that_execute_answers_are_refused_for_peers(tmp_path: Path) -> None:
    registry = TaskRegistry("spiral_matrix")
    assert registry.refused_for_foreign_text() == ["spiral_matrix"]
    task = registry.eval_tasks(1)[0]
    target = tmp_path / "pwned"
    result = _intake(registry).process(_group(task, [_rce(target), f"<answer>{task.answer}</answer>"]))
    assert result.reason is IntakeReason.DATASET_REFUSED
    with pytest.raises(RefusedForForeignTextError):
        registry.score(task, _rce(target), foreign=True)
    assert not target.exists()


def test_propositional_logic_atom_bomb_never_reaches_the_truth_table(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = TaskRegistry("propositional_logic")
    task = registry.eval_tasks(1)[0]
    dataset_cls, _ = reasoning_gym.factory.DATASETS["propositional_logic"]
    widest = []
    original = dataset_cls._generate_assignments

    def spy(self, variables):  # each distinct atom doubles the table; refuse to build a wide one
        widest.append(len(variables))
        assert len(variables) <= len(task.metadata["variables"]), f"{len(variables)} atoms reached the scorer"
        return original(self, variables)

    monkeypatch.setattr(dataset_cls, "_generate_assignments", spy)
    bomb = " ∧ ".join("P" * k for k in range(1, 25))  # 24 distinct atoms: 2**24 assignments
    for answer in (bomb, "P1 ∧ P2 ∧ P3", "(P)(Q) ∧ (P)(P)", "(" * 40 + "P" + ")" * 40):
        assert registry.score(task, f"<answer>{answer}</answer>", foreign=True) == 0.0
    assert registry.score(task, f"<answer>{task.metadata['example_answer']}</answer>", foreign=True) == 1.0
    assert widest and max(widest) <= len(task.metadata["variables"])


def test_safety_grammars_accept_the_golds_they_must() -> None:
    registry = TaskRegistry("paper")
    for task in registry.eval_tasks(9 * 10):
        policy = foreign_text_policy(task.ref.dataset)
        assert policy.accepts(_gold(task), task.entry()), (task.ref.dataset, _gold(task))
    assert not safety.FOREIGN_TEXT_POLICY["chain_sum"].accepts("9" * 5000, {"answer": "1"})


# -- the isolated worker -------------------------------------------------------------------------


@pytest.fixture()
def worker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    # Secrets the node process may hold: an admin token in its environment, an open key file.
    monkeypatch.setenv("SWARMNODE__ADMIN__TOKEN", "s3cret-admin-token-0123456789")
    key = tmp_path / "identity.key"
    key.write_bytes(os.urandom(32))
    key_fd = os.open(key, os.O_RDONLY)
    os.set_inheritable(key_fd, True)  # even an inheritable descriptor must not reach the worker
    registry = TaskRegistry("binary_matrix")
    handle = ScoringWorker(registry.rebuild_args(), WorkerLimits(cpu_s_per_group=1.0, wall_s_per_group=60.0))
    handle.key_path = key  # type: ignore[attr-defined]
    handle.registry = registry  # type: ignore[attr-defined]
    yield handle
    handle.close()
    os.close(key_fd)


def test_worker_holds_no_key_material_and_cannot_write_files(worker: ScoringWorker) -> None:
    me = worker.probe("self")
    assert isinstance(me, dict)
    assert not any(k.startswith("SWARMNODE") for k in me["environ"]), me["environ"]
    assert "s3cret-admin-token-0123456789" not in str(me["environ"])
    assert set(me["environ"]) <= {"PATH", "LANG", "LC_ALL", "TZ", "HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE",
                                  "PYTHONPATH", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"}  # fmt: skip
    assert me["cwd"] != os.getcwd() and Path(me["cwd"]).name.startswith("swarmnode-scorer-")
    assert me["can_write_files"] is False
    assert worker.probe("memory") == {"allocated": 0}  # RLIMIT_AS: a 2 GiB allocation fails in the worker
    open_files = [os.readlink(f"/proc/{worker.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{worker.pid}/fd")]
    assert str(worker.key_path) not in open_files  # type: ignore[attr-defined]
    assert len(open_files) <= 8, open_files


def test_rce_payload_in_the_worker_writes_nothing(worker: ScoringWorker, tmp_path: Path) -> None:
    registry = worker.registry  # type: ignore[attr-defined]
    task = registry.eval_tasks(1)[0]
    target = tmp_path / "pwned-by-worker"
    result = _intake(registry, worker).process(
        _group(task, [_rce(target), f"<answer>{task.answer}</answer>"])
    )
    assert result.reason is IntakeReason.ACCEPTED and result.scored.rewards == (0.0, 1.0)
    assert not target.exists()


def test_cpu_bomb_kills_the_worker_and_a_fresh_one_scores_the_next_group(worker: ScoringWorker) -> None:
    registry = worker.registry  # type: ignore[attr-defined]
    task = registry.eval_tasks(1)[0]
    worker.start()
    first_pid = worker.pid
    bomb = worker.probe("spin")
    assert isinstance(bomb, WorkerScore) and bomb.status is ScoreStatus.OVER_BUDGET, bomb
    assert worker.counts["over_budget"] == 1 and worker.pid is None
    after = worker.score(task.ref, [f"<answer>{task.answer}</answer>", "<answer>0</answer>"])
    assert after.status is ScoreStatus.OK and after.rewards == (1.0, 0.0)
    assert worker.counts["started"] == 2 and worker.pid != first_pid


def test_answer_tag_bomb_group_is_scored_within_the_cpu_budget(worker: ScoringWorker) -> None:
    """64 completions of the bomb cost reasoning-gym's extraction 5-20 s of CPU: over the worker's
    1 s budget (scoring_timeout). The linear extraction scores them all inside it."""
    registry = worker.registry  # type: ignore[attr-defined]
    registry.max_completion_chars = 16_384  # read the whole bomb: the extraction itself must be linear
    worker.registry_args["max_completion_chars"] = 16_384
    task = registry.eval_tasks(1)[0]
    completions = [BOMB] * 63 + [f"<answer>{task.answer}</answer>"]
    result = _intake(registry, worker).process(_group(task, completions))
    assert result.reason is IntakeReason.ACCEPTED, result.detail
    assert result.scored.rewards == (0.0,) * 63 + (1.0,)
    assert worker.counts["over_budget"] == 0


def test_scoring_timeout_is_penalized_by_the_host() -> None:
    assert IntakeReason.SCORING_TIMEOUT.reported_to_network
    assert Reason(IntakeReason.SCORING_TIMEOUT.value).action is Action.REJECT
    assert Reason(IntakeReason.DATASET_REFUSED.value).action is Action.IGNORE


def test_refused_dataset_names_are_plain_identifiers() -> None:
    # They are printed at node start; keep them printable names.
    assert all(set(n) <= set(string.ascii_lowercase + "_0123456789") for n in safety.FOREIGN_TEXT_POLICY)


def test_node_start_names_the_refused_datasets_of_its_preset() -> None:
    from rich.console import Console

    from swarmnode.node.runtime import start_scoring_worker

    console = Console(record=True, width=200)
    registry = TaskRegistry("easy-mix")
    start_scoring_worker(registry, console, start_now=False)
    assert console.export_text() == ""  # nothing refused: nothing to say
    mixed = TaskRegistry("paper", verify_extra=(TaskSpec("n_queens"), TaskSpec("puzzle24")))
    worker = start_scoring_worker(mixed, console, start_now=False)
    lines = [line for line in console.export_text().splitlines() if "refused" in line]
    assert len(lines) == 1 and "n_queens, puzzle24 are refused" in lines[0]
    assert worker.pid is None  # a node with J = 0 starts it on first use


def test_a_worker_that_cannot_start_fails_groups_fast_without_blaming_senders() -> None:
    args = TaskRegistry("easy").rebuild_args()
    args["preset"], args["specs"] = "no_such_preset", []
    broken = ScoringWorker(args)
    try:
        with pytest.raises(RuntimeError, match="swarmnode.tasks.worker"):
            broken.start()
        ref = TaskRegistry("easy").eval_tasks(1)[0].ref
        for _ in range(3):  # within start_retry_s: no new process per group
            assert broken.score(ref, ["<answer>1</answer>"]).status is ScoreStatus.ERROR
        assert broken.counts["started"] == 1
    finally:
        broken.close()
