"""The generated protobuf code under swarmnode/wire/gen/ matches protos/ (run scripts/gen_protos.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_generated_protobuf_code_is_in_sync_with_the_protos() -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) generates the code")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_generated_modules_import_as_a_package() -> None:
    from swarmnode.wire.gen import wire_pb2

    assert wire_pb2.Envelope.DESCRIPTOR.full_name == "swarmnode.v1.Envelope"
    assert wire_pb2.Envelope.__module__ == "swarmnode.wire.gen.wire_pb2"


def test_check_fails_and_names_the_file_when_generated_code_drifts(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) generates the code")
    gen = tmp_path / "gen"
    script = str(REPO / "scripts" / "gen_protos.py")
    subprocess.run(
        [sys.executable, script, "--gen-dir", str(gen)], check=True, capture_output=True, timeout=120
    )
    (gen / "wire_pb2.py").write_text((gen / "wire_pb2.py").read_text() + "\n# edited by hand\n")
    (gen / "old_pb2.py").write_text("")
    result = subprocess.run(
        [sys.executable, script, "--check", "--gen-dir", str(gen)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "out of date wire_pb2.py" in result.stderr and "unexpected old_pb2.py" in result.stderr
