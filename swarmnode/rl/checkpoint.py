"""Atomic training checkpoints: model, optimizer, RNG streams, round counter and extra state.

Layout under a checkpoint root (e.g. DATA_DIR/checkpoints)::

    round-00000120/
        model/            save_pretrained (config.json, *.safetensors, ...)
        tokenizer/        optional, save_pretrained
        optimizer.pt      optimizer.state_dict() (loaded with weights_only=True)
        rng.json          python random, numpy, torch CPU and CUDA generator states
        state.json        round, extra state, and the size + sha256 of every other file

A checkpoint is written into a hidden temporary directory next to the final one, every file and
directory is fsynced, then the directory is renamed into place: a crash mid-write leaves only a
``.tmp-*`` directory, which is never taken as a checkpoint and is removed by the next save. Loading
checks every file against ``state.json``; a damaged checkpoint raises ``CheckpointError`` naming the
file, and nothing is deleted or overwritten, so the operator decides what to do with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

FORMAT_VERSION = 1
STATE_FILE = "state.json"
MODEL_DIR = "model"
TOKENIZER_DIR = "tokenizer"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.json"
_ROUND_DIR = re.compile(r"^round-(\d+)$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
# Fault injection for `simulate`'s chaos (sim.chaos, ``during_checkpoint``): hold every save open this
# many seconds after the model files are written, so a kill lands inside a half-written checkpoint.
HOLD_ENV = "SWARMNODE_CHECKPOINT_HOLD_S"
MAX_HOLD_S = 10.0


class CheckpointError(RuntimeError):
    """A checkpoint on disk is damaged or does not fit the model; the message says what to do."""


# --------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """The global random streams (python, numpy, torch CPU, every CUDA device) as JSON-able data."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state``: the streams continue where they were captured."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np.array(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        cuda_states = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]]
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])


# --------------------------------------------------------------------------- save


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every directory (deepest first), so the rename publishes durable data."""
    dirs = [root]
    for path in root.rglob("*"):
        if path.is_dir():
            dirs.append(path)
        else:
            with path.open("rb") as f:
                os.fsync(f.fileno())
    for directory in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hold_for_chaos() -> None:
    try:
        hold = float(os.environ.get(HOLD_ENV) or 0.0)
    except ValueError:
        return
    if hold > 0:
        time.sleep(min(hold, MAX_HOLD_S))


def round_dir_name(round_: int) -> str:
    return f"round-{round_:08d}"


def save_checkpoint(
    root: str | Path,
    round_: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    tokenizer: Any = None,
    extra: Mapping[str, Any] | None = None,
    keep_last: int = 3,
) -> Path:
    """Write checkpoint ``root/round-<round_>`` atomically, keep the newest ``keep_last``; return its path.

    ``model`` needs ``save_pretrained`` (any transformers model); ``extra`` must be JSON-serializable
    (sampler state, metrics summary, ...).
    """
    if round_ < 0:
        raise ValueError(f"save_checkpoint: round must be >= 0, got {round_}")
    if keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1, got {keep_last}")
    try:
        extra_json = json.loads(json.dumps(dict(extra or {})))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"save_checkpoint: extra state is not JSON-serializable ({exc}); pass plain data"
        ) from exc

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(_TMP_PREFIX + "*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)

    final = root / round_dir_name(round_)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    trash = root / f"{_TRASH_PREFIX}{final.name}-{os.getpid()}"
    try:
        tmp.mkdir()
        model.save_pretrained(tmp / MODEL_DIR)
        _hold_for_chaos()
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        (tmp / RNG_FILE).write_text(json.dumps(capture_rng_state()))
        files = {
            p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        state = {
            "format": FORMAT_VERSION,
            "round": round_,
            "created_at": time.time(),
            "extra": extra_json,
            "files": files,
        }
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        _fsync_tree(tmp)
        if final.exists():  # re-saving a round: move the old one aside only for the swap
            os.replace(final, trash)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        if trash.exists() and not final.exists():
            os.replace(trash, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(trash, ignore_errors=True)

    for old in _round_dirs(root)[:-keep_last]:
        shutil.rmtree(old[1])
    return final


# --------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint on disk. ``restore`` puts its state into a live model and optimizer."""

    path: Path
    round: int
    extra: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0

    @property
    def model_dir(self) -> Path:
        """A save_pretrained directory: ``AutoModelForCausalLM.from_pretrained(ckpt.model_dir)`` works."""
        return self.path / MODEL_DIR

    @property
    def tokenizer_dir(self) -> Path | None:
        path = self.path / TOKENIZER_DIR
        return path if path.is_dir() else None

    def restore(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        restore_rng: bool = True,
    ) -> None:
        """Load weights into ``model`` (in place), optimizer state, and the RNG streams."""
        weights: dict[str, torch.Tensor] = {}
        for shard in sorted(self.model_dir.glob("*.safetensors")):
            weights |= load_file(shard)
        try:
            result = model.load_state_dict(weights, strict=False)
        except RuntimeError as exc:  # shape mismatch: another architecture or size
            raise CheckpointError(
                f"checkpoint {self.path} does not fit this model ({exc}); start with the model it was "
                "trained from or use another checkpoint directory"
            ) from exc
        # save_pretrained stores tied weights (e.g. lm_head = embed_tokens) once; they load through the tie.
        own = model.state_dict()
        loaded = {own[name].data_ptr() for name in weights if name in own}
        missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]
        if missing or result.unexpected_keys:
            raise CheckpointError(
                f"checkpoint {self.path} does not fit this model (missing {missing[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}); start with the model it was trained from or use another "
                "checkpoint directory"
            )
        if optimizer is not None:
            opt_file = self.path / OPTIMIZER_FILE
            if not opt_file.is_file():
                raise CheckpointError(
                    f"checkpoint {self.path} has no {OPTIMIZER_FILE}; it was saved without one"
                )
            optimizer.load_state_dict(torch.load(opt_file, weights_only=True))
        if restore_rng:
            restore_rng_state(json.loads((self.path / RNG_FILE).read_text()))


def _round_dirs(root: Path) -> list[tuple[int, Path]]:
    """Published checkpoint directories, oldest first (temporary ones are not matched)."""
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        match = _ROUND_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def verify_checkpoint(path: str | Path) -> Checkpoint:
    """Check every file of one checkpoint against its state.json; raise CheckpointError if damaged."""
    path = Path(path)
    older = [p.name for _, p in _round_dirs(path.parent) if p.name < path.name]
    advice = (
        f"move {path} out of {path.parent} to resume from "
        + (f"the previous checkpoint ({older[-1]})" if older else "scratch")
        + ", or restore it from a backup"
    )
    state_file = path / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
        round_, files, extra = int(state["round"]), dict(state["files"]), dict(state["extra"])
        if state["format"] != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {path} has format {state['format']}, this swarmnode reads format "
                f"{FORMAT_VERSION}; use a matching swarmnode version or {advice}"
            )
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: {state_file} is missing or corrupt ({exc}); {advice}"
        ) from exc
    for name, meta in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {file} is missing; {advice}")
        if file.stat().st_size != meta["size"]:
            raise CheckpointError(
                f"checkpoint {path}: {file} has {file.stat().st_size} bytes, expected {meta['size']} "
                f"(truncated?); {advice}"
            )
        if _sha256(file) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {file} does not match its sha256 (corrupt); {advice}")
    return Checkpoint(path=path, round=round_, extra=extra, created_at=float(state.get("created_at", 0.0)))


def load_latest_checkpoint(root: str | Path) -> Checkpoint | None:
    """The newest checkpoint under ``root``, verified; None when there is none.

    A damaged newest checkpoint raises CheckpointError rather than silently falling back to an
    older one (which would discard training without anyone noticing).
    """
    found = _round_dirs(Path(root))
    return verify_checkpoint(found[-1][1]) if found else None
