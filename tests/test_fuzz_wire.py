"""A short run of scripts/fuzz_wire.py (2,000 mutated inputs): no crash, bounded memory, real coverage.

The full run (100,000 inputs, bench/results/fuzz.json) is `python scripts/fuzz_wire.py`. Time per
input is recorded there, never asserted here (a shared CI machine makes durations meaningless).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_wire.py"


@pytest.fixture(scope="module")
def fuzz_wire() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_wire", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_wire"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result(fuzz_wire: ModuleType) -> dict:
    return fuzz_wire.fuzz(
        inputs=2000, seed=7, max_seconds=900, sample_every=20, pipeline_every=500, progress=False
    )


def test_no_input_crashes_the_decoder_or_the_pipeline(result: dict) -> None:
    assert result["inputs"] == 2000
    assert result["crashes"] == 0, result["crash_examples"]


def test_no_input_allocates_more_than_64_mb(result: dict) -> None:
    assert result["inputs_over_allocation_limit"] == 0
    assert 0 < result["max_allocation_bytes"] <= 64 * 1024 * 1024
    assert result["allocation_method"]["tracemalloc_inputs"] >= 2000 // 20


def test_mutations_reach_every_stage_of_the_pipeline(result: dict) -> None:
    """Re-signed payload mutations get past the signature to the decoder; valid ones are accepted."""
    verdicts = result["pipeline_verdicts"]
    for reason in ("accepted", "decode_error", "schema_cap", "oversize", "bad_signature", "unknown_kind"):
        assert verdicts.get(reason, 0) > 0, (reason, verdicts)
    outcomes = result["decoder_outcomes"]
    for outcome in (
        "decoded",
        "decode:schema_cap",
        "decode:decode_error",
        "decode:oversize",
        "open:decode_error",
    ):
        assert outcomes.get(outcome, 0) > 0, (outcome, outcomes)
    assert set(result["inputs_by_mutator"]) >= {
        "zlib_bomb",
        "payload_proto_resigned",
        "envelope_bytes",
        "deep_nesting",
    }


def test_the_report_is_written_as_json(fuzz_wire: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    assert fuzz_wire.main(["--inputs", "50", "--out", str(out), "--quiet", "--seed", "3"]) == 0
    report = json.loads(out.read_text())
    assert report["inputs"] == 50 and report["crashes"] == 0
    assert report["passes_bar"] is False  # 50 inputs are not the 100,000 the bar asks for


def test_reports_of_runs_with_other_seeds_merge(fuzz_wire: ModuleType, result: dict) -> None:
    other = {**result, "seed": 8, "crashes": 1, "max_allocation_bytes": result["max_allocation_bytes"] + 1}
    merged = fuzz_wire.merge([result, other])
    assert merged["inputs"] == 2 * result["inputs"] and merged["crashes"] == 1
    assert merged["max_allocation_bytes"] == result["max_allocation_bytes"] + 1
    assert merged["pipeline_verdicts"]["accepted"] == 2 * result["pipeline_verdicts"]["accepted"]
    assert [run["seed"] for run in merged["runs"]] == [7, 8]
    assert merged["passes_bar"] is False
