"""The `swarmnode` command: `python -m swarmnode --help` is the map of features.

Each subcommand parses its flags, turns them into config overrides and hands over to the part that
does the work. Errors a user can hit end as one readable line and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from swarmnode import __version__
from swarmnode.config import NodeConfig, load_config, parse_override, without_secrets


def _run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="node config file (TOML); see configs/")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set grpo.learning_rate=1e-4 (repeatable)",
    )
    parser.add_argument("--data-dir", type=Path, help="key, checkpoints and metrics (default: swarm-data)")
    parser.add_argument("--name", help="node name shown to operators")
    parser.add_argument("--rounds", type=int, help="stop after this many rounds (resumed rounds count)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--model", help="'embedded:tiny-a', a local model directory, or a hub id")
    parser.add_argument("--tasks", help="task preset ('easy', 'paper') or a reasoning-gym dataset name")
    parser.add_argument("--local-groups", "-I", type=int, help="I: own rollout groups per round")
    parser.add_argument("--external-groups", "-J", type=int, help="J: external rollout groups per round")
    parser.add_argument("--silo", action="store_true", help="train alone: no network")
    parser.add_argument(
        "--bootstrap",
        action="append",
        metavar="MULTIADDR",
        help="bootstrap peer /ip4/H/tcp/P/p2p/ID (repeatable)",
    )
    parser.add_argument(
        "--listen", action="append", metavar="MULTIADDR", help="p2p listen address (repeatable)"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--backend", choices=["auto", "transformers", "vllm"], help="generation backend")
    parser.add_argument("--skip-preflight", action="store_true", help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    overrides: dict[str, Any] = dict(parse_override(item) for item in args.overrides)
    flag_keys = {
        "data_dir": "data_dir",
        "name": "name",
        "rounds": "rounds",
        "seed": "seed",
        "model": "model.path",
        "tasks": "tasks.preset",
        "local_groups": "sampler.local_groups",
        "external_groups": "sampler.external_groups",
        "bootstrap": "p2p.bootstrap",
        "listen": "p2p.listen",
        "device": "device",
        "backend": "model.backend",
    }
    for flag, key in flag_keys.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = str(value) if isinstance(value, Path) else value
    if getattr(args, "silo", False):
        overrides["p2p.enabled"] = False
    return load_config(args.config, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from swarmnode.node.loop import Node
    from swarmnode.node.runtime import build_runtime, stderr_console

    cfg = config_from_args(args)
    console = stderr_console()
    if not args.skip_preflight:
        from swarmnode.node.preflight import preflight_exit_code, print_preflight, run_preflight
        from swarmnode.policy.hardware import detect_hardware

        results = run_preflight(cfg, detect_hardware())
        print_preflight(results, console)
        code = preflight_exit_code(results)
        if code:
            return code
        if any(r.name == "bootstrap" and r.status != "ok" for r in results):
            console.print(
                "[yellow]no bootstrap reachable: starting anyway; the node trains alone until peers appear[/]"
            )
    return Node(cfg, build_runtime(cfg, console)).run()


def cmd_key(args: argparse.Namespace) -> int:
    from swarmnode.identity import init_key, show_key

    if args.key_command == "init":
        identity = init_key(args.path, force=args.force)
        print(f"created {args.path} (mode 0600)\npeer id {identity.peer_id}")
    else:
        print(show_key(args.path))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(without_secrets(config_from_args(args)).to_toml(), end="")  # terminals and logs keep output
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from swarmnode.sim.launcher import simulate_command

    return simulate_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarmnode",
        description="Node software for decentralized RL post-training (SAPO) over signed libp2p gossip.",
    )
    parser.add_argument("--version", action="version", version=f"swarmnode {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a node: train, share rollouts, learn from peers")
    _run_flags(run)
    run.set_defaults(func=cmd_run)

    show = sub.add_parser(
        "config", help="print the resolved config for the given flags and exit (secrets redacted)"
    )
    _run_flags(show)
    show.set_defaults(func=cmd_config)

    key = sub.add_parser("key", help="the node's Ed25519 identity (libp2p peer id and rollout signer)")
    key_sub = key.add_subparsers(dest="key_command", required=True)
    init = key_sub.add_parser("init", help="create a key file (mode 0600)")
    init.add_argument("--path", type=Path, default=Path("swarm-data/identity.key"))
    init.add_argument("--force", action="store_true", help="replace an existing key (new peer id)")
    show_key = key_sub.add_parser("show", help="print the peer id of a key file")
    show_key.add_argument("--path", type=Path, default=Path("swarm-data/identity.key"))
    key.set_defaults(func=cmd_key)

    from swarmnode.admin.client import add_admin_commands

    add_admin_commands(sub)

    from swarmnode.sim.launcher import add_simulate_arguments

    simulate = sub.add_parser("simulate", help="run N nodes locally on a real p2p network and report")
    add_simulate_arguments(simulate)
    simulate.set_defaults(func=cmd_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from swarmnode.errors import user_errors

    try:
        return int(args.func(args) or 0)
    except user_errors() as exc:
        print(f"swarmnode {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
