#!/usr/bin/env bash
# Set up the environment if needed, check the built wheel works from outside the repository,
# then run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python

echo "== wheel: build, install into a fresh venv, run 'mapc compile' from outside the repo" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m build --wheel --outdir "$work/dist" . > "$work/build.log" 2>&1 || { cat "$work/build.log" >&2; exit 1; }
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet "$work"/dist/mapc-*.whl 2>&1 | grep -v "^WARNING: Location" >&2 || true
(cd "$work" && "$work/venv/bin/mapc" compile llama > "$work/compile.out" \
  && "$work/venv/bin/python" -c "import mapc.grammar, mapc.specs, mapc.compiler, mapc.runtime" \
  && ! "$work/venv/bin/python" -c "import compiler" 2>/dev/null \
  && ! "$work/venv/bin/python" -c "import runtime" 2>/dev/null) \
  || { echo "wheel check failed" >&2; cat "$work/compile.out" >&2 || true; exit 1; }
grep -q "family llama" "$work/compile.out"
echo "wheel ok: $(head -1 "$work/compile.out")" >&2

echo "== tests" >&2
exec "$PY" -m pytest tests -p no:cacheprovider "$@"
