"""mapc with only its declared dependencies: detecting and reading every format imports none
of the optional packages (torch, gguf, jax, transformers), and a format that needs an extra says
so in one line naming it. (scripts/test.sh checks the built wheel itself in a fresh venv; this is
the quick guard in the suite, with the optional packages hidden from a subprocess.)"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import mapc
from mapc.runtime.containers import FORMATS
from tests.conftest import llama_config, write_random_hf

OPTIONAL = ("torch", "gguf", "jax", "jaxlib", "transformers", "deepspeed", "megatron")

# Run in a fresh interpreter: the optional packages fail to import, as if not installed.
HIDE = f"""
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Hide())
"""

PROBE = HIDE + """
import json
from mapc.cli.main import main
from mapc.runtime.containers import detect_format
paths = json.loads(sys.argv[1])
out = {}
for fmt, path in paths.items():
    import io, contextlib
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["inspect", path])
    out[fmt] = [detect_format(path), code, err.getvalue()]
out["_imported"] = sorted(m for m in sys.modules if m.split(".")[0] in %r)
print(json.dumps(out))
""" % (OPTIONAL,)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("standalone")
    src = write_random_hf(root / "hf", llama_config(hidden=32, layers=2, heads=4, groups=2,
                                                   ffn=48, vocab=64))
    paths = {"hf": str(src)}
    for fmt in FORMATS:
        if fmt != "hf":
            mapc.convert(src, root / fmt, to=fmt)
            paths[fmt] = str(root / fmt)
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(paths)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_is_detected_without_optional_packages(outputs, fmt):
    detected, code, err = outputs[fmt]
    assert detected == fmt
    if fmt == "gguf":        # the one format whose reader needs an extra: one line naming it
        assert code == 1 and err.count("\n") == 1 and "pip install 'mapc[gguf]'" in err
    else:
        assert code == 0, err


def test_no_optional_package_was_imported(outputs):
    assert outputs["_imported"] == []


def test_missing_backend_names_its_extra():
    r = subprocess.run([sys.executable, "-c", HIDE + """
from mapc.runtime.backends import get_backend
from mapc.errors import MapcError
try:
    get_backend("jax")
except MapcError as e:
    print(e)
"""], capture_output=True, text=True, timeout=120)
    assert "pip install 'mapc[jax]'" in r.stdout, r.stderr
