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
from mapc.compiler.lower import lower, value_ir
from mapc.errors import MapcError
from mapc.grammar.parser import parse, parse_header


@dataclass(frozen=True)
class MatchRule:
    """``match KEY: v1, v2``: the spec describes a model whose config has KEY in the values."""
    key: str
    values: tuple
    at: str

    def admits(self, config: dict) -> bool:
        return config.get(self.key) in self.values

    def excludes(self, config: dict) -> bool:
        """True only when the config states KEY with another value (absent: undecided)."""
        return self.key in config and config[self.key] not in self.values


@dataclass(frozen=True)
class ConfigSymbol:
    """A config symbol: its name, the config keys it is read from, its default (expr IR)."""
    name: str
    keys: tuple[str, ...]
    default: object
    at: str

    @property
    def boolean_default(self) -> bool | None:
        """The default of a boolean symbol (``default true``), else None."""
        d = self.default
        return d[1] if d is not None and d[0] == "bool" else None


@dataclass(frozen=True)
class LayoutParam:
    """``param NAME = default | other | ...`` of a layout (default first)."""
    name: str
    choices: tuple
    default: object
    at: str

    def as_ir(self) -> dict:
        return {"name": self.name, "choices": list(self.choices), "default": self.default,
                "at": self.at}


@dataclass(frozen=True)
class MetaEntry:
    """``meta { KEY = expr }`` of a layout: a format metadata key and its expression (IR)."""
    key: str
    expr: object
    at: str


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

    # -- typed views of the IR (the IR itself stays plain JSON data) --
    def matches(self) -> tuple[MatchRule, ...]:
        return tuple(MatchRule(m["key"], tuple(m["values"]), m["at"]) for m in self.ir["match"])

    def config_symbols(self) -> tuple[ConfigSymbol, ...]:
        return tuple(ConfigSymbol(c["name"], tuple(c["keys"]), c["default"], c["at"])
                     for c in self.ir["config"])

    def layout_params(self, layout: str) -> tuple[LayoutParam, ...]:
        return tuple(LayoutParam(p["name"], tuple(p["choices"]), p["default"], p["at"])
                     for p in self.layout(layout)["params"])

    def layout_meta(self, layout: str) -> tuple[MetaEntry, ...]:
        return tuple(MetaEntry(m["key"], m["expr"], m["at"]) for m in self.layout(layout)["meta"])

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


def match_rules(text: str, file: str = "<spec>") -> tuple[MatchRule, ...] | None:
    """A spec's ``match`` lines read by the real parser from the spec's header only (what
    precedes its first config/tensors/layout block), without compiling it: None when the header
    does not parse (the compiler then reports the error). Cached by content hash."""
    return _match_rules_cached(hashlib.sha256(text.encode()).hexdigest(), text, file)


@functools.lru_cache(maxsize=64)
def _match_rules_cached(sha: str, text: str, file: str):
    matches = parse_header(text, file)
    if matches is None:
        return None
    return tuple(MatchRule(m.key, tuple(value_ir(v) for v in m.values), str(m.pos))
                 for m in matches)


def schema() -> dict:
    return json.loads(resources.files("mapc.compiler").joinpath(
        "schema/spec-ir.schema.json").read_text())
