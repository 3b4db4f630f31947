#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
# Idempotent: does nothing when the pinned requirements have not changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MAPC_VENV:-.venv}
TORCH_VERSION=2.13.0
DEEPSPEED_VERSION=0.19.8
stamp_src=$(cat pyproject.toml requirements/dev.txt requirements/nemo.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$VENV/.mapc-stamp" ] && [ "$(cat "$VENV/.mapc-stamp")" = "$stamp_src" ]; then
  exit 0
fi
echo "mapc: setting up $VENV (first run takes a few minutes)" >&2
python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned torch pulls several GB of CUDA wheels.
"$PY" -m pip install --quiet "torch==$TORCH_VERSION"
# py-cpuinfo2 (an older pytest-benchmark's dependency) ships the same `cpuinfo` module as the
# pinned py-cpuinfo: remove it first, or its uninstall would later delete py-cpuinfo's files.
"$PY" -m pip uninstall --quiet --yes py-cpuinfo2 2>/dev/null || true
"$PY" -m pip install --quiet -r requirements/dev.txt "torch==$TORCH_VERSION"
# DeepSpeed (ground truth for ZeRO checkpoints, tests/groundtruth/) after torch: its setup.py
# imports torch (hence no build isolation), --no-deps keeps pip from resolving torch again (a
# CUDA build); its runtime requirements are pinned in requirements/dev.txt. DS_BUILD_OPS=0:
# no C++ ops are prebuilt (none is needed on CPU with a torch optimizer).
DS_BUILD_OPS=0 "$PY" -m pip install --quiet --no-deps --no-build-isolation "deepspeed==$DEEPSPEED_VERSION"
"$PY" -m pip install --quiet -e . "torch==$TORCH_VERSION"
"$PY" -m pip check >&2
# NeMo 2 (ground truth for the nemo2 format, tests/groundtruth/nemo_real.py): pinned, no
# dependencies resolved (torch, megatron-core, transformers are the venv's), into $VENV/nemo
# apart from site-packages (its wheel ships a top-level `tests` package). ~240 MB, ~10 s.
rm -rf "$VENV/nemo"
"$PY" -m pip install --quiet --no-deps --target "$VENV/nemo" -r requirements/nemo.txt
echo "$stamp_src" > "$VENV/.mapc-stamp"
