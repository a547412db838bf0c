#!/usr/bin/env bash
# Create .venv and install swarmnode with its test tools. Idempotent: a second run only checks.
# Torch is installed first, pinned, so the resolver never reaches for a newer (CUDA) build;
# set SWARMNODE_TORCH to pick another version that the pyproject range admits.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${SWARMNODE_TORCH:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH"
# The ray extra runs the Ray simulation test; "$TORCH" again so that nothing replaces the pinned torch.
.venv/bin/python -m pip install --quiet -e '.[dev,ray]' "$TORCH"
echo "swarmnode installed in .venv ($(.venv/bin/swarmnode --version))"
