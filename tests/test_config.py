"""Config: defaults, file + env + CLI overrides, errors that name the key and what was expected."""

from pathlib import Path

import pytest

from swarmnode.config import ConfigError, NodeConfig, config_from_dict, load_config, parse_override


def test_defaults_use_the_names_the_field_knows():
    cfg = NodeConfig()
    assert cfg.grpo.num_generations == 8
    assert (cfg.grpo.epsilon, cfg.grpo.epsilon_high, cfg.grpo.beta) == (0.2, 0.28, 0.0)
    assert cfg.model.path == "embedded:tiny-a"


def test_file_env_and_cli_overrides_layer_in_order(tmp_path: Path):
    path = tmp_path / "node.toml"
    path.write_text("seed = 3\n[grpo]\nlearning_rate = 0.001\nnum_generations = 4\n")
    env = {"SWARMNODE__GRPO__NUM_GENERATIONS": "6", "SWARMNODE__SEED": "5", "UNRELATED": "x"}
    cfg = load_config(path, overrides={"seed": 7}, environ=env)
    assert cfg.grpo.learning_rate == 0.001
    assert cfg.grpo.num_generations == 6  # env beats file
    assert cfg.seed == 7  # CLI beats env


def test_wrong_value_names_key_and_expectation():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"grpo": {"epsilon": "wide"}})
    assert "grpo.epsilon" in str(err.value)
    assert "number" in str(err.value)


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"grpo\.learnin_rate: unknown key"):
        config_from_dict({"grpo": {"learnin_rate": 1e-4}})


def test_out_of_range_and_cross_field_checks():
    with pytest.raises(ConfigError, match="grpo.num_generations"):
        config_from_dict({"grpo": {"num_generations": 1}})
    with pytest.raises(ConfigError, match="degree_low <= degree <= degree_high"):
        config_from_dict({"p2p": {"degree": 9}})
    with pytest.raises(ConfigError, match="local_groups \\+ external_groups"):
        config_from_dict({"sampler": {"local_groups": 0, "external_groups": 0}})


def test_missing_or_malformed_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[grpo\nlearning_rate = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, environ={})


def test_override_parsing():
    assert parse_override("grpo.learning_rate=1e-4") == ("grpo.learning_rate", 1e-4)
    assert parse_override("p2p.enabled=false") == ("p2p.enabled", False)
    assert parse_override('p2p.bootstrap=["/ip4/1.2.3.4/tcp/1"]')[1] == ["/ip4/1.2.3.4/tcp/1"]
    assert parse_override("name=alice") == ("name", "alice")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("grpo.learning_rate")


def test_resolved_config_round_trips_through_toml(tmp_path: Path):
    cfg = config_from_dict({"seed": 9, "p2p": {"bootstrap": ["/ip4/127.0.0.1/tcp/4001/p2p/X"]}})
    path = tmp_path / "resolved.toml"
    path.write_text(cfg.to_toml())
    again = load_config(path, environ={})
    assert again == cfg


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("sampler.strategy", "varience", "'uniform', 'variance' or 'difficulty'"),
        ("grpo.off_policy", "trust_peers", "'none', 'positive_only', 'importance' or 'topr'"),
        ("model.backend", "tensorrt", "'auto', 'transformers' or 'vllm'"),
        ("model.dtype", "fp8", "'auto', 'float32', 'bfloat16' or 'float16'"),
        ("device", "tpu", "'auto', 'cpu', 'cuda' or 'mps'"),
    ],
)
def test_choices_are_validated_at_load_time_naming_the_key_and_allowed_values(key, value, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(overrides={key: value}, environ={})
    message = str(err.value)
    assert f"{key}: " in message and allowed in message and repr(value) in message


def test_loss_weighting_settings_have_checked_ranges():
    cfg = NodeConfig()
    assert (cfg.grpo.off_policy, cfg.grpo.external_loss_share, cfg.grpo.max_source_loss_share) == (
        "positive_only",
        None,
        0.5,
    )
    for key, value in [
        ("grpo.external_loss_share", 1.5),
        ("grpo.max_source_loss_share", 0.0),
        ("grpo.importance_cap", 0.0),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(overrides={key: value}, environ={})
