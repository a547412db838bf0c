"""Preflight: each failing check says what to do, and only fatal failures stop the node."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import pytest
from rich.console import Console

from swarmnode.config import AdminConfig, ConfigError, NodeConfig, config_from_dict, load_config
from swarmnode.identity import IdentityLock, init_key
from swarmnode.node import preflight
from swarmnode.node.preflight import (
    CheckResult,
    check_admin_exposure,
    check_bootstrap,
    check_data_dir,
    check_disk_space,
    check_key_file,
    check_listen_ports,
    check_model,
    check_runtime,
    parse_tcp_multiaddr,
    preflight_exit_code,
    print_preflight,
    run_preflight,
)
from swarmnode.policy.hardware import Hardware
from swarmnode.policy.loading import embedded_models

CPU = Hardware("cpu", None, 0.0, 2, 8.0, vllm_available=False, bf16_supported=False)
PEER = "12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"\0" * 4096)
    return d


def node_cfg(tmp_path: Path, model_dir: Path, **tree: object) -> NodeConfig:
    base: dict = {"data_dir": str(tmp_path / "data"), "model": {"path": str(model_dir)}}
    base.update(tree)
    return config_from_dict(base)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_healthy_config_passes_every_check_and_exits_zero(tmp_path: Path, model_dir: Path) -> None:
    cfg = node_cfg(tmp_path, model_dir, p2p={"enabled": False})
    results = run_preflight(cfg, CPU)
    assert {r.name for r in results} >= {
        "data dir",
        "identity key",
        "hardware",
        "model",
        "disk space",
        "bootstrap",
    }
    assert [r for r in results if r.status != "ok"] == []
    assert preflight_exit_code(results) == 0


def test_unwritable_data_dir_is_fatal(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    result = check_data_dir(tmp_path / "a-file" / "data")
    assert (result.status, result.fatal) == ("fail", True)
    assert "choose a writable --data-dir" in result.message


def test_missing_key_is_fine_when_it_can_be_created(tmp_path: Path) -> None:
    result = check_key_file(tmp_path / "new" / "identity.key")
    assert result.status == "ok" and "will be created" in result.message


def test_missing_key_under_an_unusable_parent_is_fatal(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    result = check_key_file(tmp_path / "a-file" / "identity.key")
    assert result.fatal and "choose another p2p.key_path" in result.message


def test_existing_key_reports_its_peer_id(tmp_path: Path) -> None:
    identity = init_key(tmp_path / "identity.key")
    result = check_key_file(tmp_path / "identity.key")
    assert result.status == "ok" and identity.peer_id in result.message


def test_key_readable_by_others_is_fatal_with_chmod_hint(tmp_path: Path) -> None:
    init_key(tmp_path / "identity.key")
    os.chmod(tmp_path / "identity.key", 0o644)
    result = check_key_file(tmp_path / "identity.key")
    assert result.fatal and "chmod 600" in result.message


def test_corrupt_key_is_fatal_and_says_how_to_recover(tmp_path: Path) -> None:
    key = tmp_path / "identity.key"
    key.write_bytes(b"garbage")
    key.chmod(0o600)
    result = check_key_file(key)
    assert result.fatal and "swarmnode key init" in result.message


def test_key_held_by_a_running_node_is_fatal(tmp_path: Path) -> None:
    key = tmp_path / "identity.key"
    init_key(key)
    with IdentityLock(key):
        result = check_key_file(key)
    assert result.fatal and "in use" in result.message


def test_model_checks_cover_local_dirs_embedded_names_and_hub_ids(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert check_model(str(model_dir)).status == "ok"
    (model_dir / "config.json").unlink()
    no_config = check_model(str(model_dir))
    assert no_config.fatal and "no config.json" in no_config.message
    missing = check_model(str(tmp_path / "nowhere"))
    assert missing.fatal and "does not exist" in missing.message
    unknown = check_model("embedded:no-such-model")
    assert unknown.fatal and "no embedded model" in unknown.message
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub = check_model("example-org/Made-Up-0.5B-Instruct")
    assert (hub.status, hub.fatal) == ("warn", False) and "downloaded from the hub" in hub.message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = check_model("example-org/Made-Up-0.5B-Instruct")
    assert offline.fatal and "huggingface-cli download" in offline.message


def test_port_in_use_is_fatal_and_port_zero_is_always_fine(tmp_path: Path, model_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = node_cfg(
            tmp_path,
            model_dir,
            p2p={"listen": [f"/ip4/127.0.0.1/tcp/{port}", "/ip4/127.0.0.1/tcp/0"]},
            admin={"listen": "127.0.0.1:0", "metrics_listen": None},
        )
        results = check_listen_ports(cfg)
    taken, zero, admin = results
    assert taken.fatal and f"port {port} on 127.0.0.1 is already in use" in taken.message
    assert zero.status == "ok" and admin.status == "ok"


def test_malformed_listen_addresses_are_fatal(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"admin\.listen: expected HOST:PORT"):
        node_cfg(tmp_path, model_dir, admin={"listen": "nonsense"})  # refused at load already
    cfg = node_cfg(tmp_path, model_dir, p2p={"listen": ["/ip4/127.0.0.1/udp/9"]})
    unchecked = AdminConfig.model_construct(listen="nonsense", metrics_listen="127.0.0.1:0", token=None)
    cfg = cfg.model_copy(update={"admin": unchecked})  # a config built around validation
    bad_p2p, bad_admin, _metrics = check_listen_ports(cfg)
    assert bad_p2p.fatal and "--listen" in bad_p2p.message
    assert bad_admin.fatal and "HOST:PORT" in bad_admin.message


def test_parse_tcp_multiaddr() -> None:
    assert parse_tcp_multiaddr(f"/ip4/10.0.0.2/tcp/4001/p2p/{PEER}") == ("10.0.0.2", 4001)
    assert parse_tcp_multiaddr("/dns4/bootstrap/tcp/4001") == ("bootstrap", 4001)
    for bad in ("/ip4/1.2.3.4/udp/1", "/ip4/1.2.3.4/tcp/x", "/ip4/1.2.3.4/tcp/70000", "hello"):
        with pytest.raises(ValueError):
            parse_tcp_multiaddr(bad)


def test_reachable_bootstrap_is_ok(tmp_path: Path, model_dir: Path) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        cfg = node_cfg(tmp_path, model_dir, p2p={"bootstrap": [f"/ip4/127.0.0.1/tcp/{port}/p2p/{PEER}"]})
        result = check_bootstrap(cfg, timeout=1.0)
    assert result.status == "ok" and "1 of 1 reachable" in result.message


def test_unreachable_or_incomplete_bootstrap_warns_and_continues_in_silo(
    tmp_path: Path, model_dir: Path
) -> None:
    port = free_port()  # nothing listens there any more
    cfg = node_cfg(
        tmp_path,
        model_dir,
        p2p={"bootstrap": [f"/ip4/127.0.0.1/tcp/{port}/p2p/{PEER}", "/ip4/127.0.0.1/tcp/4001"]},
    )
    result = check_bootstrap(cfg, timeout=0.5)
    assert (result.status, result.fatal) == ("warn", False)
    assert "silo" in result.message and f"127.0.0.1:{port} unreachable" in result.message
    assert "lacks /p2p/<peer id>" in result.message
    alone = check_bootstrap(node_cfg(tmp_path, model_dir))
    assert alone.status == "warn" and "--bootstrap" in alone.message


def test_too_little_disk_is_fatal_and_little_room_warns(tmp_path: Path) -> None:
    gib = 2**30
    short = check_disk_space(tmp_path, "example-org/Made-Up-7B", usage=lambda p: (0, 0, 2 * gib))
    assert short.fatal and "larger disk" in short.message
    tight = check_disk_space(tmp_path, "example-org/Made-Up-1B", usage=lambda p: (0, 0, 10 * gib))
    assert (tight.status, tight.fatal) == ("warn", False)
    plenty = check_disk_space(tmp_path, "example-org/Made-Up-1B", usage=lambda p: (0, 0, 100 * gib))
    assert plenty.status == "ok"


def test_impossible_hardware_request_is_fatal(tmp_path: Path, model_dir: Path) -> None:
    result = check_runtime(node_cfg(tmp_path, model_dir, device="cuda"), CPU)
    assert result.fatal and "no CUDA device" in result.message


def test_exit_code_is_nonzero_only_for_fatal_failures() -> None:
    warn = CheckResult("bootstrap", "warn", "silo")
    assert preflight_exit_code([CheckResult("a", "ok", ""), warn]) == 0
    assert (
        preflight_exit_code([warn, CheckResult("model", "fail", "x", fatal=True)])
        == preflight.EXIT_PREFLIGHT_FAILED
    )


def test_failures_are_printed_with_their_message(tmp_path: Path) -> None:
    out = io.StringIO()
    print_preflight(
        [CheckResult("model", "fail", "no config.json here", fatal=True)], Console(file=out, width=200)
    )
    text = out.getvalue()
    assert "no config.json here" in text and "cannot start" in text


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("*.toml")))
def test_presets_load_and_pass_preflight_on_the_embedded_model(preset: str, tmp_path: Path) -> None:
    """The paper preset's code paths, run here on the embedded model instead of the hub model."""
    if "tiny-a" not in embedded_models():
        pytest.skip("embedded model tiny-a not built yet (scripts/build_tiny_models.py)")
    cfg = load_config(
        REPO / "configs" / preset,
        overrides={
            "model.path": "embedded:tiny-a",
            "data_dir": str(tmp_path),
            "p2p.listen": ["/ip4/127.0.0.1/tcp/0"],
        },
        environ={},
    )
    results = run_preflight(cfg, CPU)
    assert preflight_exit_code(results) == 0, [r for r in results if r.fatal]


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("*.toml")))
def test_presets_are_valid_configs(preset: str) -> None:
    cfg = load_config(REPO / "configs" / preset, environ={})
    assert cfg.grpo.num_generations == 8
    if preset.startswith("paper"):
        assert (cfg.model.path, cfg.tasks.preset) == ("Qwen/Qwen2.5-0.5B-Instruct", "paper")
        assert (cfg.sampler.local_groups, cfg.sampler.external_groups) == (4, 4)
        assert (cfg.grpo.epsilon, cfg.grpo.epsilon_high, cfg.grpo.beta) == (0.2, 0.28, 0.0)


TOKEN = "0123456789abcdef0123456789abcdef"


def test_admin_exposure_says_who_can_reach_the_admin_api_and_metrics(tmp_path: Path, model_dir: Path) -> None:
    local = check_admin_exposure(node_cfg(tmp_path, model_dir))
    assert (local.status, local.message) == ("ok", "admin API and /metrics on loopback only")
    guarded = check_admin_exposure(
        node_cfg(
            tmp_path,
            model_dir,
            admin={"listen": "0.0.0.0:7500", "metrics_listen": "0.0.0.0:9100", "token": TOKEN},
        )
    )
    assert guarded.status == "ok"
    assert (
        guarded.message
        == "0.0.0.0:7500, 0.0.0.0:9100 reachable from other machines; calls need the admin token"
    )
    public = check_admin_exposure(
        node_cfg(tmp_path, model_dir, admin={"metrics_listen": "0.0.0.0:9100", "metrics_public": True})
    )
    assert public.status == "warn" and not public.fatal and "served without a token" in public.message
    unreachable = check_admin_exposure(node_cfg(tmp_path, model_dir, admin={"advertise_host": "203.0.113.7"}))
    assert (
        unreachable.status == "warn"
        and "other hosts cannot reach what this node advertises" in unreachable.message
    )
    assert "admin exposure" in {
        r.name for r in run_preflight(node_cfg(tmp_path, model_dir, p2p={"enabled": False}), CPU)
    }
