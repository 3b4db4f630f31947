#!/usr/bin/env bash
# Set up the environment if needed, check the built wheel works on its own (a fresh venv with
# only its declared dependencies, run from outside the repository), then run the test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python

echo "== pip check (.venv)" >&2
"$PY" -m pip check >&2

echo "== wheel: build; install into a fresh venv with only its declared dependencies; from" \
     "outside the repository convert to every format and back, verifying each" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m build --wheel --outdir "$work/dist" . > "$work/build.log" 2>&1 || { cat "$work/build.log" >&2; exit 1; }
if grep -qiE "deprecat|is absent from" "$work/build.log"; then
  echo "wheel check failed: the build warns about its configuration:" >&2
  grep -iE -A3 "deprecat|is absent from" "$work/build.log" >&2
  exit 1
fi
whl=$(ls "$work"/dist/mapc-*.whl)
python3 -m venv "$work/venv"
VPY="$work/venv/bin/python"
"$VPY" -m pip install --quiet "$whl" > "$work/install.log" 2>&1 || { cat "$work/install.log" >&2; exit 1; }
"$VPY" -m pip check >&2
cp scripts/wheel_smoke.py "$work/"
mkdir "$work/smoke" "$work/smoke-gguf"
(cd "$work" && "$work/venv/bin/mapc" compile llama > "$work/compile.out" \
  && grep -q "family llama" "$work/compile.out" \
  && "$VPY" -c "import mapc.grammar, mapc.specs, mapc.compiler, mapc.runtime" \
  && ! "$VPY" -c "import compiler" 2>/dev/null \
  && ! "$VPY" -c "import runtime" 2>/dev/null \
  && "$VPY" wheel_smoke.py "$work/smoke" --gguf missing) \
  || { echo "wheel check failed" >&2; exit 1; }
# the one format that needs an extra, with the extra installed
"$VPY" -m pip install --quiet "$whl[gguf]" > "$work/install-gguf.log" 2>&1 \
  || { cat "$work/install-gguf.log" >&2; exit 1; }
"$VPY" -m pip check >&2
(cd "$work" && "$VPY" wheel_smoke.py "$work/smoke-gguf" --gguf installed --only gguf) \
  || { echo "wheel check (gguf extra) failed" >&2; exit 1; }

echo "== tests" >&2
exec "$PY" -m pytest tests -p no:cacheprovider "$@"
