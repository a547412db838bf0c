"""Run (or only collect) builtin experiments and publish them under docs/results/.

For each experiment: `swarmnode simulate builtin:NAME --out runs/NAME` (finished runs are skipped,
so this resumes), then copy the report, plots, aggregates and every node's metrics.jsonl, resolved
config and done.json (as node_metrics.tar.gz) to docs/results/NAME/, and update the experiment's
entry in docs/results/summary.json (per configuration: seeds, cumulative local reward mean/std,
final held-out accuracy mean/std, ratio to the baseline, the paper-like batch metric).

    .venv/bin/python scripts/publish_results.py long-4node mixed-strength          # run + publish
    .venv/bin/python scripts/publish_results.py long-4node --collect-only           # publish what ran
    .venv/bin/python scripts/publish_results.py long-4node --runs /tmp/runs --collect-only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
PUBLISHED = (
    "report.md",
    "results.json",
    "per_node.csv",
    "experiment.json",
    "reward_curves.png",
    "cumulative_reward.png",
    "heldout_accuracy.png",
)
NODE_FILES = ("metrics.jsonl", "config.resolved.toml")


def publish(name: str, out: Path) -> dict:
    target = RESULTS / name
    target.mkdir(parents=True, exist_ok=True)
    for file in PUBLISHED:
        if (out / file).exists():
            shutil.copy2(out / file, target / file)
    with tarfile.open(target / "node_metrics.tar.gz", "w:gz") as tar:
        for path in sorted((out / "runs").rglob("*")):
            if path.name in NODE_FILES or path.name == "done.json":
                tar.add(path, arcname=str(path.relative_to(out)))
    entry = json.loads((out / "results.json").read_text())["summary_entry"]
    entry["regenerate"] = f".venv/bin/swarmnode simulate builtin:{name} --out runs/{name}"
    resolved = next((out / "runs").rglob("config.resolved.toml"), None)
    if resolved is not None:  # which mixed update produced these numbers
        grpo = tomllib.loads(resolved.read_text()).get("grpo", {})
        entry["trainer"] = {
            k: grpo.get(k) for k in ("off_policy", "external_loss_share", "max_source_loss_share")
        }
    summary_path = RESULTS / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary[name] = entry
    summary_path.write_text(json.dumps(dict(sorted(summary.items())), indent=1) + "\n")
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+", help="builtin experiment names")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="where runs/NAME live")
    parser.add_argument("--collect-only", action="store_true", help="rebuild the report from existing runs")
    args = parser.parse_args()
    for name in args.experiments:
        out = args.runs / name
        command = [sys.executable, "-m", "swarmnode", "simulate", f"builtin:{name}", "--out", str(out)]
        if args.collect_only:
            command.append("--report-only")
        code = subprocess.call(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if code not in (0, 1):  # 1: some run did not finish; publish what did, marked partial
            return code
        entry = publish(name, out)
        print(f"{name}: published to {RESULTS / name} (unfinished: {entry['unfinished_runs'] or 'none'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
