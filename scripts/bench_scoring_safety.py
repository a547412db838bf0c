"""Cost of scoring peers' text safely: the answer-tag bomb, the scoring worker's round trip and restart.

Writes bench/results/scoring_safety.json. CPU seconds (process time), so a loaded machine changes
the numbers little. Run: ``OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_scoring_safety.py``.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from reasoning_gym.utils import extract_answer

from swarmnode.tasks.registry import TaskRegistry
from swarmnode.tasks.verify import extract_last_answer
from swarmnode.tasks.worker import ScoringWorker, WorkerLimits

BOMB = "<answer> " * 910
OUT = Path(__file__).resolve().parents[1] / "bench" / "results" / "scoring_safety.json"


def cpu(fn) -> float:  # noqa: ANN001 - any zero-argument callable
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    group = [BOMB] * 64
    old_s = cpu(lambda: [extract_answer(t) for t in group])
    new_s = cpu(lambda: [extract_last_answer(t) for t in group])

    registry = TaskRegistry("paper")
    worker = ScoringWorker(registry.rebuild_args(), WorkerLimits(cpu_s_per_group=1.0))
    wall = time.perf_counter()
    worker.start()
    start_wall_s = time.perf_counter() - wall
    tasks = registry.eval_tasks(9 * 4)
    normal = []
    for task in tasks:
        completions = [f"<think>step</think><answer>{task.answer}</answer>", "<answer>0</answer>"] * 4
        wall = time.perf_counter()
        result = worker.score(task.ref, completions)
        normal.append(time.perf_counter() - wall)
        assert result.status == "ok", result
    wall = time.perf_counter()
    bomb = worker.score(tasks[0].ref, group)
    bomb_wall_s = time.perf_counter() - wall
    wall = time.perf_counter()
    spin = worker.probe("spin")
    spin_wall_s = time.perf_counter() - wall
    worker.close()

    normal.sort()
    results = {
        "machine": platform.processor() or platform.machine(),
        "answer_tag_bomb_64_completions": {
            "reasoning_gym_extract_answer_cpu_s": round(old_s, 4),
            "linear_extract_last_answer_cpu_s": round(new_s, 6),
        },
        "worker": {
            "start_wall_s": round(start_wall_s, 3),
            "group_of_8_roundtrip_wall_s_p50": round(normal[len(normal) // 2], 5),
            "group_of_8_roundtrip_wall_s_max": round(normal[-1], 5),
            "bomb_group_status": str(bomb.status),
            "bomb_group_wall_s": round(bomb_wall_s, 4),
            "cpu_bomb_status": str(getattr(spin, "status", spin)),
            "cpu_bomb_kill_wall_s_with_1s_cpu_budget": round(spin_wall_s, 3),
        },
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
