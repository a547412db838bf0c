"""Where each node of a simulation runs: which GPU, how much of its memory, which Ray resources.

An experiment's optional ``[placement]`` table and the per-node keys of ``[[node]]`` say how nodes
are spread over the GPUs of the machine (or of a Ray cluster):

    [placement]
    strategy = "round-robin"   # "auto" (default: round-robin when GPUs are found, else CPU),
                               # "round-robin" (node i -> GPU i mod n), "pack" (fill GPU 0, then 1, ...),
                               # or "cpu" (no node sees a GPU)
    gpus = 8                   # how many GPUs to use (an int), which ones ([0, 2, 3]), or "all" (default)
    nodes_per_gpu = 1          # at most this many nodes share one GPU (default: as many as needed)
    memory_headroom = 0.05     # share of each GPU's memory left to no node (CUDA context, fragmentation)
    ray_address = "auto"       # run on this Ray cluster instead of local processes (--ray beats it)

    [[node]]
    index = 3
    device = "cuda:1"          # pin this node: "cpu" or "cuda:N" (N counts the GPUs this machine shows)
    memory_fraction = 0.3      # its share of that GPU's memory (default: an equal share, see below)
    resources = { node_b = 1 } # Ray custom resources the node needs (pins it to Ray nodes offering them)

``plan_placement`` is a pure function of that spec and a list of GPUs, so it is unit-tested with
faked hardware. Memory: when k nodes share a GPU, each node without an explicit fraction gets an
equal part of what the explicit ones and the headroom leave, so never more than (1 - headroom) / k;
the node's trainer and its vLLM engine size themselves from that share (``gpu_memory_fraction``).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarmnode.config import ConfigError

STRATEGIES = ("auto", "round-robin", "pack", "cpu")
DEFAULT_MEMORY_HEADROOM = 0.05
PLACEMENT_FILE = "placement.json"
_DEVICE_PATTERN = re.compile(r"cpu|cuda:(\d{1,3})")


class PlacementError(ConfigError):
    """The requested placement does not fit the hardware; the message says what is missing."""


@dataclass(frozen=True)
class Gpu:
    ordinal: int  # position among the GPUs the launcher sees (cuda:N in an experiment file)
    visible_id: str  # the CUDA_VISIBLE_DEVICES entry that shows a child process only this GPU
    name: str = "GPU"
    memory_gb: float = 0.0


@dataclass(frozen=True)
class NodeRequest:
    """What one [[node]] entry asks for beyond its config keys."""

    device: str | None = None  # "cpu" or "cuda:N"
    memory_fraction: float | None = None
    resources: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PlacementSpec:
    strategy: str = "auto"
    gpus: int | tuple[int, ...] | None = None  # None: every GPU found
    nodes_per_gpu: int | None = None  # None: as many as it takes to place every node
    memory_headroom: float = DEFAULT_MEMORY_HEADROOM
    ray_address: str | None = None
    nodes: dict[int, NodeRequest] = field(default_factory=dict)

    @property
    def wants_gpus(self) -> bool:
        """True when the experiment asks for GPUs itself (then finding none is an error, not CPU)."""
        return (
            self.strategy in ("round-robin", "pack")
            or self.gpus is not None
            or any((r.device or "").startswith("cuda") for r in self.nodes.values())
        )


@dataclass(frozen=True)
class NodePlacement:
    index: int
    gpu: Gpu | None  # None: the node runs on CPU and sees no GPU
    sharing: int  # nodes placed on the same GPU (1 on CPU)
    memory_fraction: float  # this node's share of the GPU's memory (1.0 on CPU)
    resources: dict[str, float] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "cpu" if self.gpu is None else f"cuda:{self.gpu.ordinal}"

    @property
    def ray_num_gpus(self) -> float:
        """GPUs to ask Ray for: a 1/k share when k nodes share one (Ray then packs at most k on it)."""
        return 0.0 if self.gpu is None else 1.0 / self.sharing

    def environment(self) -> dict[str, str]:
        """Environment of the node process: it sees only its own GPU (none on CPU)."""
        return {"CUDA_VISIBLE_DEVICES": "" if self.gpu is None else self.gpu.visible_id}

    def config_overrides(self) -> dict[str, Any]:
        """Node config keys the placement decides (the process sees its GPU as cuda:0)."""
        if self.gpu is None:
            return {}
        return {"device": "cuda", "gpu_memory_fraction": round(self.memory_fraction, 4)}


def parse_placement(raw: Any, node_entries: Any, nodes: int, source: str = "") -> PlacementSpec:
    """The ``[placement]`` table and the placement keys of ``[[node]]``; errors name the key."""
    where = f"experiment {source}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: [placement] must be a table")
    unknown = set(raw) - {"strategy", "gpus", "nodes_per_gpu", "memory_headroom", "ray_address"}
    if unknown:
        raise ConfigError(f"{where}: unknown [placement] keys {sorted(unknown)}")
    strategy = raw.get("strategy", "auto")
    if strategy not in STRATEGIES:
        raise ConfigError(f"{where}: placement.strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    gpus = raw.get("gpus", "all")
    if gpus == "all":
        gpus = None
    elif isinstance(gpus, list) and gpus and all(_is_int(g) and g >= 0 for g in gpus):
        if len(set(gpus)) != len(gpus):
            raise ConfigError(f"{where}: placement.gpus lists a GPU twice: {gpus}")
        gpus = tuple(gpus)
    elif not (_is_int(gpus) and gpus >= 1):
        raise ConfigError(
            f"{where}: placement.gpus must be 'all', a count >= 1 or a list of GPU numbers, got {gpus!r}"
        )
    nodes_per_gpu = raw.get("nodes_per_gpu")
    if nodes_per_gpu is not None and not (_is_int(nodes_per_gpu) and nodes_per_gpu >= 1):
        raise ConfigError(f"{where}: placement.nodes_per_gpu must be an integer >= 1, got {nodes_per_gpu!r}")
    headroom = raw.get("memory_headroom", DEFAULT_MEMORY_HEADROOM)
    if not isinstance(headroom, int | float) or isinstance(headroom, bool) or not 0.0 <= headroom < 0.5:
        raise ConfigError(f"{where}: placement.memory_headroom must be in [0, 0.5), got {headroom!r}")
    ray_address = raw.get("ray_address")
    if ray_address is not None and (not isinstance(ray_address, str) or not ray_address):
        raise ConfigError(f"{where}: placement.ray_address must be a non-empty string, got {ray_address!r}")
    requests: dict[int, NodeRequest] = {}
    for entry in node_entries or []:
        index = entry.get("index") if isinstance(entry, dict) else None
        if not _is_int(index) or not 0 <= index < nodes:
            continue  # the experiment parser reports a bad index
        extra = set(entry) - {"index", "set", "device", "memory_fraction", "resources"}
        if extra:
            raise ConfigError(f"{where}: [[node]] index {index}: unknown keys {sorted(extra)}")
        device = entry.get("device")
        if device is not None and (not isinstance(device, str) or not _DEVICE_PATTERN.fullmatch(device)):
            raise ConfigError(
                f"{where}: [[node]] index {index}: device must be 'cpu' or 'cuda:N', got {device!r}"
            )
        fraction = entry.get("memory_fraction")
        if fraction is not None and (
            not isinstance(fraction, int | float) or isinstance(fraction, bool) or not 0.0 < fraction <= 1.0
        ):
            raise ConfigError(
                f"{where}: [[node]] index {index}: memory_fraction must be in (0, 1], got {fraction!r}"
            )
        resources = entry.get("resources", {})
        if not isinstance(resources, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) and v > 0
            for k, v in resources.items()
        ):
            raise ConfigError(
                f"{where}: [[node]] index {index}: resources must map resource names to positive numbers, "
                f"got {resources!r}"
            )
        if device or fraction is not None or resources:
            requests[index] = NodeRequest(
                device,
                None if fraction is None else float(fraction),
                {k: float(v) for k, v in resources.items()},
            )
    return PlacementSpec(strategy, gpus, nodes_per_gpu, float(headroom), ray_address, requests)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _usable_gpus(spec: PlacementSpec, found: list[Gpu]) -> list[Gpu]:
    if spec.gpus is None:
        return list(found)
    if isinstance(spec.gpus, int):
        if spec.gpus > len(found):
            raise PlacementError(f"GPUs: need {spec.gpus} (placement.gpus = {spec.gpus}), found {len(found)}")
        return list(found[: spec.gpus])
    by_ordinal = {g.ordinal: g for g in found}
    missing = [g for g in spec.gpus if g not in by_ordinal]
    if missing:
        raise PlacementError(
            f"GPUs: placement.gpus names GPU(s) {missing}, but this machine shows {len(found)} "
            f"(numbered 0..{len(found) - 1})"
            if found
            else f"GPUs: placement.gpus names GPU(s) {missing}, found 0"
        )
    return [by_ordinal[g] for g in spec.gpus]


def plan_placement(
    spec: PlacementSpec, nodes: int, found: list[Gpu], config_devices: dict[int, str] | None = None
) -> list[NodePlacement]:
    """Assign each node a GPU (or CPU) and a memory share; raises PlacementError naming what is missing.

    ``found`` are the GPUs the launcher sees (or, on Ray, one entry per GPU of the cluster);
    ``config_devices`` the ``device`` key of each node's config, so that a node configured for CUDA is
    never silently put on CPU.
    """
    config_devices = config_devices or {}
    pinned = {i: r.device for i, r in spec.nodes.items() if r.device and i < nodes}
    strategy = spec.strategy
    if strategy == "auto":
        strategy = "round-robin" if found or spec.wants_gpus else "cpu"
    pool = _usable_gpus(spec, found) if strategy != "cpu" else []
    free = [i for i in range(nodes) if i not in pinned]
    assigned: dict[int, Gpu | None] = {}
    if strategy == "cpu":
        assigned.update(dict.fromkeys(free))
    elif free:
        per_gpu = spec.nodes_per_gpu or math.ceil(len(free) / max(1, len(pool)))
        need = math.ceil(len(free) / per_gpu)
        if need > len(pool):
            raise PlacementError(
                f"GPUs: need {need} ({len(free)} node(s), {per_gpu} per GPU), found {len(pool)}"
                + (f" of {len(found)} allowed by placement.gpus" if len(pool) != len(found) else "")
            )
        for position, index in enumerate(free):
            slot = position % len(pool) if strategy == "round-robin" else position // per_gpu
            assigned[index] = pool[slot]
    by_ordinal = {g.ordinal: g for g in found}
    for index, device in sorted(pinned.items()):
        if device == "cpu":
            assigned[index] = None
            continue
        ordinal = int(device.split(":", 1)[1])
        if ordinal not in by_ordinal:
            raise PlacementError(
                f"GPUs: node {index} is pinned to {device}, but this machine shows {len(found)} GPU(s)"
            )
        assigned[index] = by_ordinal[ordinal]
    for index, gpu in sorted(assigned.items()):
        if gpu is None and config_devices.get(index) == "cuda":
            raise PlacementError(
                f"GPUs: node {index} sets device = 'cuda' but is placed on CPU ({len(found)} GPU(s) found, "
                f"placement.strategy = {spec.strategy!r})"
            )
    return _share_memory(spec, nodes, assigned)


def _share_memory(spec: PlacementSpec, nodes: int, assigned: dict[int, Gpu | None]) -> list[NodePlacement]:
    on_gpu: dict[int, list[int]] = {}
    for index, gpu in assigned.items():
        if gpu is not None:
            on_gpu.setdefault(gpu.ordinal, []).append(index)
    fractions: dict[int, float] = {}
    for ordinal, members in on_gpu.items():
        explicit = {i: spec.nodes[i].memory_fraction for i in members if i in spec.nodes}
        explicit = {i: f for i, f in explicit.items() if f is not None}
        budget = 1.0 - spec.memory_headroom
        taken = sum(explicit.values())
        if taken > 1.0 + 1e-9:
            raise PlacementError(
                f"GPU memory: nodes {sorted(explicit)} on cuda:{ordinal} ask for {taken:.2f} of its memory "
                "(memory_fraction adds up to more than 1); lower their memory_fraction"
            )
        rest = [i for i in members if i not in explicit]
        if rest:
            share = (budget - taken) / len(rest)
            if share <= 0.01:
                raise PlacementError(
                    f"GPU memory: cuda:{ordinal} has nothing left for nodes {rest} after the explicit "
                    f"memory_fraction of nodes {sorted(explicit)} and {spec.memory_headroom:.2f} headroom"
                )
            fractions.update(dict.fromkeys(rest, share))
        fractions.update(explicit)
    placements = []
    for index in range(nodes):
        gpu = assigned[index]
        request = spec.nodes.get(index, NodeRequest())
        if gpu is None and request.memory_fraction is not None:
            raise PlacementError(
                f"node {index} sets memory_fraction but runs on CPU; pin it with device = 'cuda:N'"
            )
        placements.append(
            NodePlacement(
                index=index,
                gpu=gpu,
                sharing=1 if gpu is None else len(on_gpu[gpu.ordinal]),
                memory_fraction=1.0 if gpu is None else fractions[index],
                resources=dict(request.resources),
            )
        )
    return placements


def detect_gpus() -> list[Gpu]:
    """The CUDA GPUs this process sees, in CUDA order, keeping the launcher's own CUDA_VISIBLE_DEVICES.

    A node process started with ``CUDA_VISIBLE_DEVICES=<visible_id>`` sees exactly that GPU.
    Only queries device properties (no CUDA context, no memory taken on any GPU).
    """
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    inherited = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    gpus = []
    for ordinal in range(count):
        props = torch.cuda.get_device_properties(ordinal)
        visible = inherited[ordinal] if ordinal < len(inherited) else str(ordinal)
        gpus.append(Gpu(ordinal, visible, props.name, round(props.total_memory / 2**30, 1)))
    return gpus


def describe_plan(placements: list[NodePlacement]) -> str:
    """One line for the console: which node runs where."""
    parts = []
    for p in placements:
        if p.gpu is None:
            parts.append(f"{p.index}:cpu")
        else:
            parts.append(f"{p.index}:{p.device} ({p.memory_fraction:.0%})")
    return "placement " + ", ".join(parts)


def write_placement_record(node_dir: Path, record: dict[str, Any]) -> None:
    (node_dir / PLACEMENT_FILE).write_text(json.dumps(record, indent=1))


def placement_record(p: NodePlacement, host: str, launcher: str, **extra: Any) -> dict[str, Any]:
    """What ``placement.json`` says about where a node ran (read back by the report)."""
    return {
        "host": host,
        "device": p.device,
        "gpu_name": p.gpu.name if p.gpu else None,
        "cuda_visible_devices": p.environment()["CUDA_VISIBLE_DEVICES"],
        "sharing": p.sharing,
        "memory_fraction": round(p.memory_fraction, 4),
        "launcher": launcher,
        **extra,
    }


def where_node_ran(node_dir: Path) -> str:
    """'host device' from a node's placement.json ('?' for runs made before placements were recorded)."""
    try:
        record = json.loads((node_dir / PLACEMENT_FILE).read_text())
    except (OSError, ValueError):
        return "?"
    if not isinstance(record, dict):
        return "?"
    host = str(record.get("host", "?"))
    if record.get("ip"):  # Ray nodes: the cluster address tells machines (or loopback test nodes) apart
        host += f"/{record['ip']}"
    where = f"{host} {record.get('device', '?')}"
    fraction = record.get("memory_fraction")
    if record.get("device", "cpu") != "cpu" and isinstance(fraction, int | float) and fraction < 1.0:
        where += f" ({fraction:.0%} mem)"
    return where
