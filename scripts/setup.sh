#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
# Idempotent: does nothing when the pinned requirements have not changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MAPC_VENV:-.venv}
TORCH_VERSION=2.13.0
stamp_src=$(cat pyproject.toml requirements/dev.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$VENV/.mapc-stamp" ] && [ "$(cat "$VENV/.mapc-stamp")" = "$stamp_src" ]; then
  exit 0
fi
echo "mapc: setting up $VENV (first run takes a few minutes)" >&2
python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned torch pulls several GB of CUDA wheels.
"$PY" -m pip install --quiet "torch==$TORCH_VERSION"
"$PY" -m pip install --quiet -r requirements/dev.txt "torch==$TORCH_VERSION"
"$PY" -m pip install --quiet -e . "torch==$TORCH_VERSION"
"$PY" -m pip check >/dev/null || { "$PY" -m pip check >&2 || true; }
echo "$stamp_src" > "$VENV/.mapc-stamp"
