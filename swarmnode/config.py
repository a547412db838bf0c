"""The node's one typed, validated configuration.

Sources, later ones winning: defaults < TOML file < environment (``SWARMNODE__SECTION__KEY``)
< command-line overrides (``--set section.key=value`` and the dedicated flags). Field names follow
TRL's ``GRPOConfig`` where the concept is the same. Nothing else in the package reads configuration
from files or the environment.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

ENV_PREFIX = "SWARMNODE__"


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and what was expected."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    path: str = Field(
        "embedded:tiny-a",
        description="'embedded:<name>' for a built-in tiny model, a local directory, or a hub id",
    )
    id: str | None = Field(None, description="model id announced to peers (defaults to the path's name)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    backend: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="generation backend; 'auto' picks vLLM on CUDA when it is installed"
    )
    gpu_memory_utilization: float = Field(
        0.35, gt=0.0, le=1.0, description="vLLM's share of the node's GPU memory (times gpu_memory_fraction)"
    )
    system_prompt: str | None = Field(
        None, description="system message for chat templates; None uses the model's default"
    )


class TaskMixEntry(_Section):
    """One dataset of an inline task mix: reasoning-gym name, config overrides (no seed), weight."""

    dataset: str
    config: dict[str, Any] = Field(default_factory=dict)
    weight: float = Field(1.0, gt=0.0)


class TaskConfig(_Section):
    preset: str = Field("easy", description="task mix: 'easy', 'paper', or a single reasoning-gym dataset")
    mix: list[TaskMixEntry] = Field(
        default_factory=list, description="inline task mix to sample (replaces preset when non-empty)"
    )
    verify_extra: list[TaskMixEntry] = Field(
        default_factory=list,
        description="tasks this node verifies (peers' groups) and evaluates on but does not sample itself",
    )
    partial_credit: bool = Field(False, description="reward = reasoning-gym score instead of score == 1")
    eval_size: int = Field(200, ge=1, description="held-out questions for greedy accuracy")


class GRPOConfig(_Section):
    num_generations: int = Field(8, ge=2, description="completions per question (G)")
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_completion_length: int = Field(12, ge=1, description="max new tokens per completion")
    learning_rate: float = Field(1e-4, gt=0.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.99, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    epsilon: float = Field(0.2, ge=0.0, description="lower clip range of the importance ratio")
    epsilon_high: float = Field(0.28, ge=0.0, description="upper clip range of the importance ratio")
    beta: float = Field(0.0, ge=0.0, description="KL coefficient to the reference model (0 = no reference)")
    num_iterations: int = Field(1, ge=1, description="passes over each round's batch")
    minibatches: int = Field(1, ge=1, description="optimizer steps per pass")
    max_grad_norm: float = Field(1.0, gt=0.0)
    micro_batch_size: int = Field(
        0, ge=0, description="sequences per forward/backward pass; 0 = sized from the logits memory"
    )
    scale_rewards: bool = Field(True, description="divide advantages by the group's reward std")
    external_loss_share: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="share of the loss given to external groups; None = their share of the groups (J / (I + J))",
    )
    max_source_loss_share: float = Field(
        0.5, gt=0.0, le=1.0, description="most of the loss one sender's groups may weigh in an update"
    )
    off_policy: Literal["none", "positive_only", "importance", "topr"] = Field(
        "positive_only",
        description="external completions: 'none' (as on-policy, the paper), 'positive_only' (negative "
        "advantages get zero weight), 'importance' (truncated sequence importance weight from the "
        "sender's declared behaviour log-prob), 'topr' (positives 1, negatives truncated weight)",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute each layer's activations in backward: far less memory for ~30 % more compute",
    )
    importance_cap: float = Field(
        1.0, gt=0.0, le=100.0, description="truncation of the importance weight pi_local / pi_sender"
    )
    external_logprob_floor: float | None = Field(
        -5.0,
        lt=0.0,
        allow_inf_nan=False,
        description="poisoning defence ('off' disables it): an external completion whose log-prob under "
        "this node's policy, summed over its tokens and divided by max_completion_length, is below this "
        "many nats per token gets zero weight (metric rows_zeroed_low_likelihood); the default -5 lies "
        "below every peer sample of the embedded models measured and above every planted completion "
        "(docs/results/byzantine/README.md); see docs/DESIGN.md",
    )

    @field_validator("external_logprob_floor", mode="before")
    @classmethod
    def _floor_off(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() == "off" else value

    @field_serializer("external_logprob_floor", when_used="json")
    def _floor_written(self, value: float | None) -> float | str:
        return "off" if value is None else value  # reloads as off, not as the default


class SamplerConfig(_Section):
    local_groups: int = Field(8, ge=0, description="I: own rollout groups per round")
    external_groups: int = Field(0, ge=0, description="J: external rollout groups per round")
    strategy: Literal["uniform", "variance", "difficulty"] = Field(
        "uniform", description="external selection strategy (swarmnode.rl.sampler.STRATEGIES)"
    )
    per_source_cap: int = Field(0, ge=0, description="max external groups per sender per round (0 = no cap)")
    max_age_s: float = Field(120.0, gt=0.0, description="drop external groups older than this")
    max_round_lag: int = Field(
        20, ge=0, description="drop groups made more than this many rounds before ours"
    )
    pool_size: int = Field(512, ge=1, description="external groups kept in the pool")

    @model_validator(mode="after")
    def _some_groups(self) -> SamplerConfig:
        if self.local_groups + self.external_groups == 0:
            raise ValueError("local_groups + external_groups must be at least 1")
        return self


class P2PConfig(_Section):
    enabled: bool = Field(True, description="join a swarm; False trains alone (silo)")
    listen: list[str] = Field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    announce: list[str] = Field(default_factory=list, description="addresses to announce instead of listen")
    bootstrap: list[str] = Field(default_factory=list, description="multiaddrs with /p2p/<peer id>")
    key_path: str | None = Field(
        None, description="Ed25519 identity key file (default DATA_DIR/identity.key)"
    )
    degree: int = Field(4, ge=1)
    degree_low: int = Field(3, ge=1)
    degree_high: int = Field(
        5,
        ge=1,
        description="mesh peers above this are pruned, and the host dials until it has this many "
        "connections; 6 cost 1.2x the duplicate copies per delivery of 5 in the gossip bench (N = 8)",
    )
    heartbeat_interval: float = Field(1.0, gt=0.0, description="gossipsub heartbeat, seconds")
    idontwant_min_bytes: int = Field(
        16384,
        ge=0,
        description="on the first copy of a message at least this large, tell the other mesh peers "
        "not to send it (gossipsub v1.2 IDONTWANT; 0: never). Measured in scripts/bench_gossip.py",
    )
    prune_backoff_s: int = Field(
        15,
        ge=1,
        le=3600,
        description="after a mesh peer prunes us (or we prune it), neither grafts the other for this long "
        "(sent in each PRUNE). The spec's 60 s left nodes below degree_low for a minute or more at N = 10 "
        "(10 of 40 node-runs); 15 s bounded the longest stretch at 30 s (scripts/bench_mesh.py)",
    )
    max_message_bytes: int = Field(1_000_000, ge=1024, le=1_048_000)
    max_groups_per_batch: int = Field(64, ge=1)
    max_completions_per_group: int = Field(64, ge=1)
    max_chars_per_completion: int = Field(8192, ge=1)
    max_question_chars: int = Field(16384, ge=1)
    rate_msgs_per_s: float = Field(4.0, gt=0.0, description="per-origin sustained message rate")
    rate_bytes_per_s: float = Field(2_000_000.0, gt=0.0, description="per-origin sustained byte rate")
    score_threshold: float = Field(-20.0, description="peers scoring below this are disconnected")
    ban_seconds: float = Field(300.0, ge=0.0, description="how long a disconnected peer is ignored")
    receive_queue: int = Field(1024, ge=1, description="bounded queue of accepted messages")
    publish_zero_variance: bool = Field(
        False,
        description="also publish own groups whose rewards are all equal (receivers verify and drop "
        "them as zero_variance: no learning signal, only traffic and verification work)",
    )
    rollout_shards: int = Field(
        1,
        ge=1,
        le=4096,
        description="rollout topic shards (docs/DESIGN.md, traffic bounded by use): a node publishes and "
        "subscribes to shard sha256(peer id) mod this only; 1 = one topic for all, as in protocol v1",
    )
    min_peers_at_start: int = Field(
        0, ge=0, description="wait for this many peers before round 0 (simulations start in step)"
    )
    start_wait_s: float = Field(60.0, ge=0.0, description="longest wait for min_peers_at_start")

    @model_validator(mode="after")
    def _degrees_ordered(self) -> P2PConfig:
        if not self.degree_low <= self.degree <= self.degree_high:
            raise ValueError("expected degree_low <= degree <= degree_high")
        return self


ADMIN_TOKEN_MIN_CHARS = 16  # the floor; `openssl rand -hex 16` gives 32 characters (128 bits)
REDACTED = "(redacted: set it with SWARMNODE__ADMIN__TOKEN)"


class AdminConfig(_Section):
    listen: str = Field("127.0.0.1:0", description="admin gRPC address (port 0 = pick a free port)")
    token: str | None = Field(
        None,
        repr=False,
        description=f"bearer token (>= {ADMIN_TOKEN_MIN_CHARS} printable characters); required when "
        "listen or metrics_listen is not a loopback address; never written to config.resolved.toml",
    )
    metrics_listen: str | None = Field("127.0.0.1:0", description="Prometheus /metrics address; None = off")
    metrics_public: bool = Field(
        False,
        description="serve /metrics without a token on a non-loopback metrics_listen (a private network, or a "
        "container port published only to its host); otherwise /metrics there requires the admin token",
    )
    advertise_host: str | None = Field(
        None,
        description="host name or IP other operators reach this node at; when set, heartbeats advertise "
        "HOST:admin port and HOST:metrics port so `swarmnode net` elsewhere lists them (None = advertise nothing)",
    )
    heartbeat_interval: float = Field(30.0, gt=0.0, description="network-view heartbeat period, seconds")

    @field_validator("token")
    @classmethod
    def _strong_token(cls, token: str | None) -> str | None:
        if token is None:
            return None
        if token == REDACTED:
            raise ValueError(
                "holds the placeholder written to config.resolved.toml; set the real token "
                "(SWARMNODE__ADMIN__TOKEN=...) or remove the key"
            )
        if len(token) < ADMIN_TOKEN_MIN_CHARS or not all("!" <= ch <= "~" for ch in token):
            raise ValueError(
                f"must be at least {ADMIN_TOKEN_MIN_CHARS} printable ASCII characters without spaces "
                f"(got {len(token)} characters); generate one with `openssl rand -hex 16`"
            )
        return token

    @field_validator("advertise_host")
    @classmethod
    def _plain_host(cls, host: str | None) -> str | None:
        if host is not None and not _HOST_PATTERN.fullmatch(host):
            raise ValueError("expected a host name or IP address such as node7.example.org or 203.0.113.7")
        return None if host is None else host.strip("[]")

    @model_validator(mode="after")
    def _exposure_needs_a_token(self) -> AdminConfig:
        # Checked here, at config load, so a node refuses before it loads a model (not after).
        from swarmnode.admin.addresses import is_loopback, split_host_port

        host, _ = split_host_port(self.listen, "admin.listen")
        if not is_loopback(host) and self.token is None:
            raise ValueError(
                f"admin.listen = {self.listen!r} is reachable from other machines, so the admin API needs "
                "a token: set admin.token (e.g. SWARMNODE__ADMIN__TOKEN=$(openssl rand -hex 16)) or listen "
                "on 127.0.0.1"
            )
        if self.metrics_listen is not None:
            host, _ = split_host_port(self.metrics_listen, "admin.metrics_listen")
            if not is_loopback(host) and not self.metrics_public and self.token is None:
                raise ValueError(
                    f"admin.metrics_listen = {self.metrics_listen!r} is reachable from other machines: set "
                    "admin.token (Prometheus then sends it as a bearer token), or set admin.metrics_public = "
                    "true to serve /metrics to anyone who can reach that address, or listen on 127.0.0.1"
                )
        return self


_HOST_PATTERN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.\-]{0,251}[A-Za-z0-9])?|\[?[0-9A-Fa-f:.]{2,45}\]?")


def without_secrets(cfg: NodeConfig) -> NodeConfig:
    """A copy of `cfg` whose secrets (the admin token) are replaced by a placeholder, for files and digests."""
    if cfg.admin.token is None:
        return cfg
    return cfg.model_copy(update={"admin": cfg.admin.model_copy(update={"token": REDACTED})})


class NodeConfig(_Section):
    name: str = Field("node", description="human-readable node name")
    data_dir: Path = Field(Path("swarm-data"), description="key, checkpoints, metrics")
    seed: int = 0
    rounds: int = Field(100, ge=0, description="stop after this many rounds (counting resumed ones)")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    gpu_memory_fraction: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="share of the GPU's memory this node may use (simulate sets it "
        "when nodes share a GPU); training state and vLLM size themselves from it",
    )
    threads: int = Field(1, ge=1, description="torch threads; 1 is fastest for tiny models on shared CPUs")
    checkpoint_every: int = Field(10, ge=1, description="rounds between checkpoints")
    eval_every: int = Field(0, ge=0, description="rounds between held-out evaluations (0 = never)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    tasks: TaskConfig = Field(default_factory=TaskConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    p2p: P2PConfig = Field(default_factory=P2PConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)

    @property
    def key_path(self) -> Path:
        return Path(self.p2p.key_path) if self.p2p.key_path else self.data_dir / "identity.key"

    def to_toml(self) -> str:
        """The resolved config as TOML (written next to checkpoints so a run can be reproduced)."""
        return _to_toml(self.model_dump(mode="json"))


def _describe_error(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(config)"
    got = err.get("input")
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if isinstance(got, Mapping) or key.endswith("token"):  # never echo a secret into logs
        return f"{key}: {msg}"
    return f"{key}: {msg} (got {got!r})"


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(t, "grpo.beta", 0.1)`` sets ``t["grpo"]["beta"]``, creating sections on the way."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _parse_scalar(text: str) -> Any:
    """Parse a command-line or environment value: JSON if it parses (numbers, bools, lists), else text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_override(item: str) -> tuple[str, Any]:
    """``'grpo.learning_rate=1e-4'`` -> ``('grpo.learning_rate', 1e-4)``."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. grpo.learning_rate=1e-4")
    key, value = item.split("=", 1)
    return key.strip(), _parse_scalar(value)


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``SWARMNODE__GRPO__LEARNING_RATE=1e-4`` -> ``{'grpo.learning_rate': 1e-4}``."""
    out: dict[str, Any] = {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            key = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            out[key] = _parse_scalar(value)
    return out


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> NodeConfig:
    """Build the resolved config; raises ConfigError naming each wrong key."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    merged = dict(env_overrides(os.environ if environ is None else environ))
    merged.update(overrides or {})
    for key, value in merged.items():
        set_dotted(tree, key, value)
    return config_from_dict(tree)


def config_from_dict(tree: Mapping[str, Any]) -> NodeConfig:
    try:
        return NodeConfig.model_validate(tree)
    except ValidationError as exc:
        lines = [_describe_error(e) for e in exc.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # inline table, e.g. an entry of tasks.mix
        items = (f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items() if v is not None)
        return "{" + ", ".join(items) + "}"
    return json.dumps(str(value))


def _to_toml(tree: Mapping[str, Any], prefix: str = "") -> str:
    scalars = [
        f"{k} = {_toml_value(v)}" for k, v in tree.items() if not isinstance(v, dict) and v is not None
    ]
    unset = [f"# {k} = (unset)" for k, v in tree.items() if v is None]
    blocks = [
        f"\n[{prefix}{k}]\n" + _to_toml(v, f"{prefix}{k}.") for k, v in tree.items() if isinstance(v, dict)
    ]
    return "\n".join(scalars + unset) + "\n" + "".join(blocks)
