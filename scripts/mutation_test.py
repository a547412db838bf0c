#!/usr/bin/env python3
"""Mutation-test the core modules with mutmut and write bench/results/mutation.json.

Each module is mutated in its own scratch copy of the repository (outside the working tree, so
mutmut's ``mutants/`` directory never appears in git status), and every mutant runs only the test
files focused on that module, so a module takes minutes instead of the whole suite per mutant.

Install the tool first (it is an optional extra that ``scripts/setup.sh`` does not install):

    .venv/bin/pip install -e '.[mutation]'

Examples:

    .venv/bin/python scripts/mutation_test.py                      # all modules, default budget
    .venv/bin/python scripts/mutation_test.py --modules swarmnode/p2p/scoring.py --budget-s 600

Results from earlier runs of modules not named on the command line are kept in the JSON file.
Not part of CI's default path: it takes tens of minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "mutation.json"

# Module -> the test files that exercise it. Smallest modules first: a run that hits its time
# budget still leaves numbers for the cheap ones.
FOCUSED_TESTS: dict[str, list[str]] = {
    "swarmnode/rl/sampler.py": ["tests/test_sampler.py"],
    "swarmnode/wire/caps.py": ["tests/test_wire.py"],
    "swarmnode/p2p/scoring.py": ["tests/test_pipeline.py"],
    "swarmnode/sim/report.py": ["tests/test_report.py"],
    "swarmnode/rl/grpo.py": ["tests/test_grpo.py"],
    "swarmnode/rl/external.py": ["tests/test_external.py"],
    "swarmnode/wire/messages.py": ["tests/test_wire.py"],
    "swarmnode/p2p/pipeline.py": ["tests/test_pipeline.py"],
}

# mutmut exit-code status names folded into the four numbers the report keeps.
KILLED_STATUSES = {"killed", "caught by type check"}
SURVIVED_STATUSES = {"survived"}
TIMEOUT_STATUSES = {"timeout"}


def _require_mutmut() -> None:
    try:
        import mutmut  # noqa: F401
    except ImportError:
        sys.exit(
            "mutmut is not installed in this interpreter. Install the optional extra with\n"
            f"  {sys.executable} -m pip install -e '.[mutation]'\nand run this script again."
        )


def _mutmut_config(module: str, tests: list[str]) -> str:
    """The [tool.mutmut] table that restricts mutation to one module and its focused tests."""
    quoted_tests = ", ".join(json.dumps(t) for t in [*tests, "-p", "no:cacheprovider"])
    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["swarmnode"]\n'
        f"only_mutate = [{json.dumps(module)}]\n"
        f"pytest_add_cli_args_test_selection = [{quoted_tests}]\n"
        # Several test files are not pure unit tests; a generous multiplier keeps a slow shared
        # machine from calling ordinary mutants timeouts.
        "timeout_multiplier = 20.0\n"
        "use_git_change_detection = false\n"
    )


def _prepare_scratch(module: str, tests: list[str], scratch: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    shutil.copytree(REPO_ROOT / "swarmnode", scratch / "swarmnode", ignore=ignore)
    shutil.copytree(REPO_ROOT / "tests", scratch / "tests", ignore=ignore)
    pyproject = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    (scratch / "pyproject.toml").write_text(pyproject + _mutmut_config(module, tests), encoding="utf-8")


def _diff_for(mutant_name: str, scratch: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "mutmut", "show", mutant_name],
        cwd=scratch,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.stdout.strip() or proc.stderr.strip()[-500:]


def _collect(module: str, scratch: Path, env: dict[str, str]) -> dict[str, Any]:
    from mutmut.stats import status_by_exit_code

    meta_path = scratch / "mutants" / (module + ".meta")
    if not meta_path.exists():
        return {"status": "no results (mutmut produced no .meta file; see output_tail)"}
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    exit_codes: dict[str, int | None] = meta.get("exit_code_by_key", {})
    counts = {"killed": 0, "survived": 0, "timeout": 0, "no_tests": 0, "not_checked": 0, "other": 0}
    survivors: list[dict[str, str]] = []
    for name, code in sorted(exit_codes.items()):
        status = status_by_exit_code[code]
        if status in KILLED_STATUSES:
            counts["killed"] += 1
        elif status in SURVIVED_STATUSES:
            counts["survived"] += 1
            survivors.append({"mutant": name, "diff": _diff_for(name, scratch, env)})
        elif status in TIMEOUT_STATUSES:
            counts["timeout"] += 1
        elif status == "no tests":
            counts["no_tests"] += 1
            survivors.append({"mutant": name, "diff": _diff_for(name, scratch, env), "why": "no tests"})
        elif status == "not checked":
            counts["not_checked"] += 1
        else:
            counts["other"] += 1
    checked = counts["killed"] + counts["survived"] + counts["timeout"] + counts["no_tests"]
    # Timeouts count as detected (mutmut's own convention); untested mutants count as survivors.
    score = (counts["killed"] + counts["timeout"]) / checked if checked else None
    return {
        "status": "complete" if counts["not_checked"] == 0 else "partial (time budget)",
        "mutants": len(exit_codes),
        **counts,
        "score": None if score is None else round(score, 4),
        "surviving_mutants": survivors,
    }


def run_module(module: str, tests: list[str], budget_s: float, max_children: int) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="swarmnode-mutation-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children)]
    started = time.monotonic()
    output_tail = ""
    timed_out = False
    proc: subprocess.Popen[str] | None = None
    try:
        _prepare_scratch(module, tests, scratch)
        proc = subprocess.Popen(  # noqa: SIM115 -- killed in the finally below on any exit
            command,
            cwd=scratch,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # Own process group, so the budget stops mutmut's forked mutant workers too.
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=budget_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
        output_tail = (out or "")[-1500:]
        result = _collect(module, scratch, env)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        shutil.rmtree(scratch, ignore_errors=True)
    result.update(
        {
            "tests": tests,
            "command": " ".join(["mutmut", "run", "--max-children", str(max_children)])
            + f"  (only_mutate={module}, tests={' '.join(tests)}; via scripts/mutation_test.py)",
            "wall_s": round(time.monotonic() - started, 1),
            "hit_time_budget": timed_out,
        }
    )
    if result.get("status", "").startswith("no results"):
        if timed_out:
            result["status"] = "not run (time): budget spent before mutmut recorded any mutant"
        result["output_tail"] = output_tail
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modules", nargs="*", default=list(FOCUSED_TESTS), help="modules to mutate")
    parser.add_argument("--budget-s", type=float, default=900.0, help="time budget per module, seconds")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--total-budget-s", type=float, default=None, help="start no module after this many seconds"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    _require_mutmut()
    # SIGTERM unwinds like Ctrl-C, so the scratch copy and mutmut's workers are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run_started = time.monotonic()

    unknown = [m for m in args.modules if m not in FOCUSED_TESTS]
    if unknown:
        parser.error(f"no focused tests known for {unknown}; add them to FOCUSED_TESTS in {__file__}")

    report: dict[str, Any] = {}
    if args.output.exists():
        report = json.loads(args.output.read_text(encoding="utf-8"))
    modules: dict[str, Any] = report.get("modules", {})
    for module in FOCUSED_TESTS:
        modules.setdefault(module, {"status": "not run (time)", "tests": FOCUSED_TESTS[module]})

    from importlib.metadata import version

    for module in args.modules:
        if args.total_budget_s is not None and time.monotonic() - run_started > args.total_budget_s:
            print(f"[mutation] {module}: not run (total time budget spent)", flush=True)
            continue
        print(f"[mutation] {module} (tests: {' '.join(FOCUSED_TESTS[module])})", flush=True)
        modules[module] = run_module(module, FOCUSED_TESTS[module], args.budget_s, args.max_children)
        modules[module]["finished_at"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        summary = {k: modules[module].get(k) for k in ("mutants", "killed", "survived", "timeout", "score")}
        print(f"[mutation] {module}: {summary}", flush=True)
        report = {
            "tool": f"mutmut {version('mutmut')}",
            "script": "scripts/mutation_test.py",
            "score_definition": "(killed + timeout) / (killed + survived + timeout + no_tests)",
            "modules": modules,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
