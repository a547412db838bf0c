"""Regenerate the Python protobuf (and gRPC) code in swarmnode/wire/gen/ from protos/.

    python scripts/gen_protos.py           # rewrite swarmnode/wire/gen/
    python scripts/gen_protos.py --check   # exit 1 when the committed code differs from the protos

Every ``protos/swarmnode/v1/*.proto`` becomes ``swarmnode/wire/gen/<name>_pb2.py`` (+ ``.pyi``);
a proto that declares a ``service`` also gets ``<name>_pb2_grpc.py``. protoc names imports after
the proto package path (``from swarmnode.v1 import wire_pb2``); they are rewritten to
``swarmnode.wire.gen`` so the generated modules import as an ordinary subpackage. The generated
code depends on the grpcio-tools version: regenerate with the version pinned in the dev extra.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
PROTO_PACKAGE_DIR = Path("swarmnode/v1")  # relative to PROTO_ROOT
GEN_DIR = REPO / "swarmnode" / "wire" / "gen"
GEN_PACKAGE = "swarmnode.wire.gen"
GEN_INIT = '"""Generated protobuf code: do not edit; run `python scripts/gen_protos.py`."""\n'

# Only import statements: the serialized descriptors also contain "swarmnode.v1" and must not change.
_PROTO_IMPORT = re.compile(r"^(from|import) swarmnode\.v1(?=[ .])", re.MULTILINE)
_MODULE_NAME = re.compile(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')swarmnode\.v1\.")
_SERVICE = re.compile(r"^\s*service\s+\w+", re.MULTILINE)


def _run_protoc(out_dir: Path) -> None:
    from grpc_tools import protoc  # imported here: only the dev extra ships grpcio-tools

    protos = sorted((PROTO_ROOT / PROTO_PACKAGE_DIR).glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / PROTO_PACKAGE_DIR}")
    include = str(Path(protoc.__file__).parent / "_proto")  # google/protobuf/*.proto
    for proto in protos:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
        ]
        if _SERVICE.search(proto.read_text()):
            args.append(f"--grpc_python_out={out_dir}")
        args.append(str(proto.relative_to(PROTO_ROOT)))
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")


def generate(target: Path) -> None:
    """Write the generated package (``__init__.py`` + modules) into ``target`` (created empty)."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp)
        _run_protoc(raw)
        target.mkdir(parents=True, exist_ok=True)
        (target / "__init__.py").write_text(GEN_INIT)
        for src in sorted((raw / PROTO_PACKAGE_DIR).iterdir()):
            text = _PROTO_IMPORT.sub(rf"\1 {GEN_PACKAGE}", src.read_text())
            text = _MODULE_NAME.sub(rf"\g<1>{GEN_PACKAGE}.", text)
            (target / src.name).write_text(text)


def _differences(expected: Path, actual: Path) -> list[str]:
    want = {p.name for p in expected.iterdir()}
    have = {p.name for p in actual.iterdir() if p.is_file()} if actual.is_dir() else set()
    problems = [f"missing {name}" for name in sorted(want - have)]
    problems += [f"unexpected {name} (no proto generates it)" for name in sorted(have - want)]
    problems += [
        f"out of date {name}"
        for name in sorted(want & have)
        if not filecmp.cmp(expected / name, actual / name, shallow=False)
    ]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when out of sync")
    parser.add_argument(
        "--gen-dir", type=Path, default=GEN_DIR, help="generated package (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    gen_dir: Path = args.gen_dir.resolve()

    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "gen"
        generate(fresh)
        problems = _differences(fresh, gen_dir)
        if args.check:
            if problems:
                print(f"{gen_dir} is out of sync with protos/:", file=sys.stderr)
                for line in problems:
                    print(f"  {line}", file=sys.stderr)
                print("run: python scripts/gen_protos.py", file=sys.stderr)
                return 1
            print("generated protobuf code is in sync")
            return 0
        for stale in gen_dir.glob("*") if gen_dir.is_dir() else []:
            if stale.is_file() and not (fresh / stale.name).exists():
                stale.unlink()
        gen_dir.mkdir(parents=True, exist_ok=True)
        for path in fresh.iterdir():
            shutil.copyfile(path, gen_dir / path.name)
        print(f"wrote {len(list(fresh.iterdir()))} files to {gen_dir}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
