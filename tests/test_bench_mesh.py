"""scripts/bench_mesh.py's measure: the longest stretch a node's rollout mesh stays below degree_low."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_bench_mesh():  # noqa: ANN201 - a module
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location("bench_mesh", SCRIPTS / "bench_mesh.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


def test_longest_below_counts_only_the_window_and_a_stretch_to_its_end() -> None:
    longest_below = load_bench_mesh().longest_below
    # below from 0 to 12 (12 s), then from 20 to the end of the window at 40 (20 s)
    timeline = [(0.0, 1), (5.0, 2), (8.0, 2), (12.0, 3), (20.0, 1), (50.0, 4)]
    assert longest_below(timeline, 3, start=0.0, end=40.0) == 20.0
    # a stretch that began before the window counts from the window's start
    assert longest_below(timeline, 3, start=10.0, end=18.0) == 2.0
    assert longest_below([(0.0, 4)], 3, start=0.0, end=60.0) == 0.0
    assert longest_below([(0.0, 0)], 3, start=0.0, end=60.0) == 60.0  # no mesh the whole window
    assert longest_below([], 3, start=0.0, end=60.0) == 0.0  # nothing known: not counted
