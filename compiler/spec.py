"""Load a spec: text -> AST -> Spec IR, checked and cached by content hash.

``load_spec("llama")`` finds a spec shipped with mapc; a path loads the user's own file.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mapc.compiler import check as _check
from mapc.compiler.lower import lower
from mapc.errors import MapcError
from mapc.grammar.parser import parse


@dataclass(frozen=True)
class Spec:
    """A checked spec. ``ir`` is plain JSON data (see schema/spec-ir.schema.json)."""
    ir: dict
    text: str

    @property
    def family(self) -> str:
        return self.ir["family"]

    @property
    def sha256(self) -> str:
        return self.ir["sha256"]

    def layout(self, name: str) -> dict:
        for lay in self.ir["layouts"]:
            if lay["name"] == name:
                return lay
        raise MapcError(f"spec {self.family} ({self.ir['file']}) has no layout '{name}'",
                        hint="its layouts: " + ", ".join(self.layout_names()))

    def layout_names(self) -> list[str]:
        return [lay["name"] for lay in self.ir["layouts"]]

    def to_json(self) -> str:
        return json.dumps(self.ir, indent=2)


def builtin_specs() -> dict[str, Path]:
    """Spec files shipped with mapc, by file stem."""
    root = resources.files("mapc.specs")
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".map")}


def load_spec(spec) -> Spec:
    """Load a spec by shipped family name (``"llama"``) or by path."""
    if isinstance(spec, Spec):
        return spec
    path = Path(spec)
    if not path.suffix and not path.exists():
        found = builtin_specs().get(str(spec))
        if found is None:
            raise MapcError(f"no spec named '{spec}'",
                            hint="shipped specs: " + ", ".join(sorted(builtin_specs()))
                            + "; or give the path of a .map file")
        path = found
    try:
        text = path.read_text()
    except OSError as e:
        raise MapcError(f"cannot read spec: {e.strerror}", where=str(path)) from None
    return compile_text(text, _display_name(path))


def _display_name(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        shipped = builtin_specs().get(path.stem)
        if shipped is not None and shipped.resolve() == path.resolve():
            return f"specs/{path.name}"
        return str(path)


def compile_text(text: str, file: str = "<spec>") -> Spec:
    return _compile_cached(text, file)


@functools.lru_cache(maxsize=64)
def _compile_cached(text: str, file: str) -> Spec:
    _check.SOURCES[file] = text
    sha = hashlib.sha256(text.encode()).hexdigest()
    ir = lower(parse(text, file), sha)
    _check.check(ir)
    return Spec(ir=ir, text=text)


def schema() -> dict:
    return json.loads(resources.files("mapc.compiler").joinpath(
        "schema/spec-ir.schema.json").read_text())
