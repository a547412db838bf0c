#!/usr/bin/env bash
# Optional extra for `scripts/bench_gossip.py --hivemind`: a separate venv with stock hivemind 1.1.12
# (it bundles the Go p2pd daemon), the approach the existing SAPO deployment uses for sharing
# rollouts. Kept apart from .venv so hivemind's pins never touch the project's dependencies.
#   scripts/setup_hivemind.sh            # creates .venv-hivemind in the repository root
# HIVEMIND_WHEEL=/path/to/hivemind-1.1.12-*.whl uses a local wheel instead of the index.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv-hivemind"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -m venv "$VENV"  # no --system-site-packages: nothing leaks in from elsewhere
PIP=("$VENV/bin/python" -m pip install --no-input)
CONSTRAINT="$(mktemp)"
trap 'rm -f "$CONSTRAINT"' EXIT
echo "torch==2.13.0" >"$CONSTRAINT"  # the project's torch; pip must never pull another one
"${PIP[@]}" -c "$CONSTRAINT" "torch==2.13.0"
"${PIP[@]}" -c "$CONSTRAINT" "${HIVEMIND_WHEEL:-hivemind==1.1.12}"
"$VENV/bin/python" -c "import hivemind, torch; print('hivemind', hivemind.__version__, 'torch', torch.__version__)"
