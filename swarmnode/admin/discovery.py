"""The discovery file through which `swarmnode status` finds a local node's admin service.

A running node writes ``DATA_DIR/admin.json``::

    {"admin": "127.0.0.1:41234", "metrics": "127.0.0.1:41235", "pid": 1234, "peer_id": "12D3...",
     "written_at": 1700000000.0}

(the admin service listens on port 0 by default, so the port is only known once it runs). The CLI
resolves the node's admin address in this order: ``--node ADDR``, then the discovery file in
``--data-dir`` (default ``swarm-data``, the node's default data dir), then ``127.0.0.1:7500``.
The file holds no secret (never the token).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

DISCOVERY_FILE = "admin.json"
DEFAULT_DATA_DIR = Path("swarm-data")
DEFAULT_ADMIN_ADDRESS = "127.0.0.1:7500"


def write_discovery_file(
    data_dir: Path, admin_address: str, metrics_address: str | None, peer_id: str = ""
) -> Path:
    """Atomically write DATA_DIR/admin.json (a reader never sees half a file)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / DISCOVERY_FILE
    tmp = path.with_suffix(".json.tmp")
    record = {
        "admin": admin_address,
        "metrics": metrics_address,
        "pid": os.getpid(),
        "peer_id": peer_id,
        "written_at": time.time(),
    }
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def remove_discovery_file(data_dir: Path) -> None:
    """Remove the file at shutdown, but only if it is still this process's."""
    record = read_discovery_file(data_dir)
    if record is not None and record.get("pid") == os.getpid():
        (data_dir / DISCOVERY_FILE).unlink(missing_ok=True)


def read_discovery_file(data_dir: Path) -> dict[str, Any] | None:
    """The discovery record, or None when the file is missing or unreadable."""
    try:
        record = json.loads((data_dir / DISCOVERY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("admin"), str) else None


def resolve_admin_address(node: str | None, data_dir: Path | None = None) -> str:
    """--node wins, then DATA_DIR/admin.json, then the default address."""
    if node:
        return node
    record = read_discovery_file(data_dir or DEFAULT_DATA_DIR)
    return record["admin"] if record else DEFAULT_ADMIN_ADDRESS
