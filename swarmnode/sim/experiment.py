"""Experiment files for `swarmnode simulate`: N nodes, configurations to compare, seeds.

An experiment is TOML:

    name = "paper-cpu"
    nodes = 8
    rounds = 150
    seeds = [0, 1, 2]

    [base]                      # node config keys applied to every node of every run
    "tasks.preset" = "easy"

    [[configuration]]           # compared side by side in the report
    name = "4/4"
    set = { "sampler.local_groups" = 4, "sampler.external_groups" = 4 }

    [[node]]                    # per-node overrides by index (model, I/J, tasks, seed, ...)
    index = 1
    set = { "model.path" = "embedded:tiny-b" }

Task mixes can be written inline instead of naming a preset (dataset, config, weight), for every
node in `[base]` or per node (specialties). A node verifies and evaluates on its `verify_extra`
tasks without sampling them, so it can score peers' groups of a task it does not practise:

    [base]
    "tasks.mix" = [{ dataset = "chain_sum", config = { min_digits = 2, max_digits = 2 } }]

    [[node]]
    index = 0
    set = { "tasks.mix" = [{ dataset = "chain_sum" }],
            "tasks.verify_extra" = [{ dataset = "basic_arithmetic", weight = 1.0 }] }

Adversary peers (`swarmnode.sim.adversary`, extra processes besides the `nodes` honest ones) and
chaos (`swarmnode.sim.chaos`) are set for every configuration, or per configuration
(`adversary = [{ kind = "poisoner", count = 2 }]`, `chaos = { kill_every_s = 60 }`):

    [[adversary]]
    kind = "forger"             # forger, replayer, flooder, sybil, regex_bomber, code_injector,
    count = 2                   # poisoner, free_rider
    [chaos]
    kill_every_s = 60

Keys are the dotted names of `swarmnode.config.NodeConfig`; every node config is validated before
any process starts, so a typo fails at once with the key named.
"""

from __future__ import annotations

import importlib.resources
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarmnode.config import ConfigError, NodeConfig, config_from_dict, set_dotted
from swarmnode.sim.adversary import AdversarySpec, parse_adversaries
from swarmnode.sim.chaos import ChaosSpec, parse_chaos
from swarmnode.sim.placement import PlacementSpec, parse_placement

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class Configuration:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    # Adversary processes and chaos of this configuration (None: the experiment's; sim.adversary, sim.chaos)
    adversaries: tuple[AdversarySpec, ...] | None = None
    chaos: ChaosSpec | None = None

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.name).strip("-") or "config"


@dataclass(frozen=True)
class Experiment:
    name: str
    nodes: int
    rounds: int
    seeds: tuple[int, ...]
    base: dict[str, Any]
    configurations: tuple[Configuration, ...]
    node_overrides: dict[int, dict[str, Any]]
    source: str = ""
    placement: PlacementSpec = field(default_factory=PlacementSpec)  # GPUs, memory shares, Ray
    adversaries: tuple[AdversarySpec, ...] = ()  # [[adversary]]: extra misbehaving peers (sim.adversary)
    chaos: ChaosSpec | None = None  # [chaos]: kill -9 and restart honest nodes (sim.chaos)

    def adversaries_for(self, configuration: Configuration) -> tuple[AdversarySpec, ...]:
        return self.adversaries if configuration.adversaries is None else configuration.adversaries

    def chaos_for(self, configuration: Configuration) -> ChaosSpec | None:
        return self.chaos if configuration.chaos is None else configuration.chaos

    def node_config(self, configuration: Configuration, seed: int, index: int, data_dir: Path) -> NodeConfig:
        """The full, validated config of one node of one run."""
        tree: dict[str, Any] = {}
        layers = [
            {"rounds": self.rounds, "seed": seed * 1000 + index, "name": f"node-{index}"},
            self.base,
            configuration.overrides,
            self.node_overrides.get(index, {}),
            {"data_dir": str(data_dir)},
        ]
        for layer in layers:
            for key, value in layer.items():
                set_dotted(tree, key, value)
        try:
            return config_from_dict(tree)
        except ConfigError as exc:
            raise ConfigError(
                f"experiment {self.name}, configuration {configuration.name!r}, node {index}: {exc}"
            ) from None


def builtin_experiments() -> list[str]:
    root = importlib.resources.files("swarmnode.sim") / "experiments"
    return sorted(p.name.removesuffix(".toml") for p in root.iterdir() if p.name.endswith(".toml"))


def load_experiment(path_or_name: str) -> Experiment:
    """Load `builtin:<name>` (shipped with the package) or a TOML file."""
    if path_or_name.startswith(BUILTIN_PREFIX):
        name = path_or_name[len(BUILTIN_PREFIX) :]
        resource = importlib.resources.files("swarmnode.sim") / "experiments" / f"{name}.toml"
        if not resource.is_file():
            raise ConfigError(f"no built-in experiment {name!r}; available: {builtin_experiments()}")
        text, source = resource.read_text(), path_or_name
    else:
        path = Path(path_or_name)
        if not path.is_file():
            raise ConfigError(
                f"experiment file {path} does not exist (built-ins: "
                + ", ".join(BUILTIN_PREFIX + n for n in builtin_experiments())
                + ")"
            )
        text, source = path.read_text(), str(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"experiment {source} is not valid TOML: {exc}") from None
    return parse_experiment(raw, source)


def parse_experiment(raw: dict[str, Any], source: str = "") -> Experiment:
    def need(key: str, kind: type, default: Any = None) -> Any:
        value = raw.get(key, default)
        if value is None or not isinstance(value, kind) or isinstance(value, bool) and kind is int:
            raise ConfigError(f"experiment {source}: '{key}' must be {kind.__name__}, got {value!r}")
        return value

    nodes = need("nodes", int)
    if not 1 <= nodes <= 32:
        raise ConfigError(f"experiment {source}: 'nodes' must be between 1 and 32, got {nodes}")
    seeds = tuple(need("seeds", list, [0]))
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"experiment {source}: 'seeds' must be a non-empty list of integers")
    configurations = tuple(
        Configuration(
            str(c["name"]),
            dict(c.get("set", {})),
            parse_adversaries(c["adversary"], source) if "adversary" in c else None,
            parse_chaos(c.get("chaos"), source),
        )
        for c in raw.get("configuration", [])
    ) or (Configuration("default"),)
    if len({c.slug for c in configurations}) != len(configurations):
        raise ConfigError(f"experiment {source}: configuration names must be distinct")
    node_overrides: dict[int, dict[str, Any]] = {}
    for entry in raw.get("node", []):
        index = entry.get("index")
        if not isinstance(index, int) or not 0 <= index < nodes:
            raise ConfigError(f"experiment {source}: [[node]] index must be in 0..{nodes - 1}, got {index!r}")
        node_overrides[index] = dict(entry.get("set", {}))
    unknown = set(raw) - {
        "name",
        "nodes",
        "rounds",
        "seeds",
        "base",
        "configuration",
        "node",
        "description",
        "placement",
        "adversary",
        "chaos",
    }
    if unknown:
        raise ConfigError(f"experiment {source}: unknown keys {sorted(unknown)}")
    experiment = Experiment(
        name=str(raw.get("name", "experiment")),
        nodes=nodes,
        rounds=need("rounds", int),
        seeds=seeds,
        base=dict(raw.get("base", {})),
        configurations=configurations,
        node_overrides=node_overrides,
        source=source,
        placement=parse_placement(raw.get("placement", {}), raw.get("node", []), nodes, source),
        adversaries=parse_adversaries(raw.get("adversary"), source),
        chaos=parse_chaos(raw.get("chaos"), source),
    )
    for configuration in configurations:  # fail before any process starts
        for index in range(nodes):
            experiment.node_config(configuration, seeds[0], index, Path("/nonexistent"))
    return experiment


def with_overrides(experiment: Experiment, **changes: Any) -> Experiment:
    """A copy with nodes/rounds/seeds replaced (command-line flags beat the file)."""
    values = {k: v for k, v in changes.items() if v is not None}
    if "seeds" in values:
        values["seeds"] = tuple(values["seeds"])
    return Experiment(**{**experiment.__dict__, **values})
