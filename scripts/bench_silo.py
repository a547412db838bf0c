"""Benchmark: does one node, alone, really improve the embedded model with RL on this CPU?

Measures held-out greedy accuracy (n=200, the registry's held-out split) of the embedded model
before RL and after a fixed CPU budget of GRPO rounds (process CPU time, 1 thread), plus
generation tokens/s and train step time. Writes bench/results/silo.json.

    python scripts/bench_silo.py                     # 600 s CPU budget (the issue's bar: +10 points)
    python scripts/bench_silo.py --budget-s 60       # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from swarmnode.config import config_from_dict, parse_override, set_dotted  # noqa: E402
from swarmnode.node.loop import Node  # noqa: E402
from swarmnode.node.runtime import build_runtime, stderr_console  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "silo.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=600.0, help="CPU seconds of RL rounds")
    parser.add_argument("--model", default="embedded:tiny-a")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every-s", type=float, default=120.0, help="CPU seconds between curve points")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    console = stderr_console()
    with tempfile.TemporaryDirectory(prefix="bench-silo-") as tmp:
        tree: dict = {
            "data_dir": tmp,
            "seed": args.seed,
            "rounds": 10**9,
            "model": {"path": args.model},
            "p2p": {"enabled": False},
            "tasks": {"preset": "easy", "eval_size": 200},
            "admin": {"metrics_listen": None},
        }
        for item in args.overrides:
            set_dotted(tree, *parse_override(item))
        cfg = config_from_dict(tree)
        rt = build_runtime(cfg, console)
        node = Node(cfg, rt)
        try:
            before = rt.evaluate()
            console.print(f"held-out greedy accuracy before RL: {before:.3f}")
            curve = [{"cpu_s": 0.0, "round": 0, "accuracy": before}]
            rows = []
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            next_eval = args.eval_every_s
            round_index = 0
            while (cpu := time.process_time() - cpu_start) < args.budget_s:
                rows.append(node.run_round(round_index))
                round_index += 1
                if cpu >= next_eval:
                    curve.append({"cpu_s": cpu, "round": round_index, "accuracy": rt.evaluate()})
                    console.print(
                        f"  {cpu:6.0f} CPU s, round {round_index}: accuracy {curve[-1]['accuracy']:.3f}"
                    )
                    next_eval += args.eval_every_s
            cpu_used, wall_used = time.process_time() - cpu_start, time.perf_counter() - wall_start
            after = rt.evaluate()
            curve.append({"cpu_s": cpu_used, "round": round_index, "accuracy": after})
        finally:
            rt.close()
    result = {
        "benchmark": "silo",
        "model": args.model,
        "tasks": cfg.tasks.preset,
        "eval_size": cfg.tasks.eval_size,
        "grpo": cfg.grpo.model_dump(),
        "sampler": {"local_groups": cfg.sampler.local_groups},
        "budget_cpu_s": args.budget_s,
        "cpu_s": round(cpu_used, 1),
        "wall_s": round(wall_used, 1),
        "rounds": round_index,
        "accuracy_before": before,
        "accuracy_after": after,
        "accuracy_gain_points": round(100 * (after - before), 1),
        "bar_gain_points": 10.0,
        "bar_met": 100 * (after - before) >= 10.0,
        "generation_tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rows),
        "train_step_s_median": statistics.median(r["step_seconds"] for r in rows),
        "round_s_median": statistics.median(r["round_seconds"] for r in rows),
        "reward_mean_first_10": statistics.fmean(r["reward_mean"] for r in rows[:10]),
        "reward_mean_last_10": statistics.fmean(r["reward_mean"] for r in rows[-10:]),
        "curve": curve,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "threads": 1},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    console.print(
        f"accuracy {before:.3f} -> {after:.3f} ({result['accuracy_gain_points']:+.1f} points) "
        f"in {round_index} rounds, {cpu_used:.0f} CPU s; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
