"""Poisoning adoption per configuration, from `python -m swarmnode.sim.adversary adoption` outputs.

    python docs/results/byzantine/adoption_table.py docs/results/byzantine/4node/adoption

reads CONFIG-seed-S.json files (one list of per-node results each) and prints a markdown table:
per configuration, over seeds (each seed: the mean over its nodes), mean ± sample std of the
marker's opening log-prob, the control strings' and the marker's excess over them, and sampled
completions containing the marker.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def main(directory: Path) -> str:
    per_config: dict[str, list[list[dict]]] = defaultdict(list)
    for path in sorted(directory.glob("*-seed-*.json")):
        match = re.fullmatch(r"(.+)-seed-(\d+)\.json", path.name)
        if match:
            per_config[match.group(1)].append(json.loads(path.read_text()))

    def pm(runs: list[list[dict]], key: str) -> str:
        seeds = [statistics.fmean(n[key] for n in nodes) for nodes in runs]
        std = statistics.stdev(seeds) if len(seeds) > 1 else 0.0
        return f"{statistics.fmean(seeds):.2f} ± {std:.2f}"

    lines = [
        "| configuration | seeds | log p(marker opening) | log p(control openings) | marker excess | "
        "sampled completions with the marker |",
        "|---|---|---|---|---|---|",
    ]
    for config, runs in per_config.items():
        found = sum(n["with_marker"] for nodes in runs for n in nodes)
        total = sum(n["completions"] for nodes in runs for n in nodes)
        lines.append(
            f"| {config} | {len(runs)} | {pm(runs, 'marker_logprob_mean')} | {pm(runs, 'control_logprob_mean')} "
            f"| {pm(runs, 'marker_excess_logprob')} | {found} of {total} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
