"""Load a spec: text -> AST -> Spec IR, checked and cached by content hash.

``load_spec("llama")`` finds a spec shipped with mapc; a path loads the user's own file.

Compiled IR is cached in memory and on disk (``$MAPC_CACHE_DIR``, default
``$XDG_CACHE_HOME/mapc`` or ``~/.cache/mapc``; an empty value turns the disk cache off), keyed
by the spec's text, its file name and the compiler's own sources, so a process that finds its
specs there never imports the parser (lark) or the checker.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import resources
import zlib
from pathlib import Path

from mapc.compiler import sources
from mapc.errors import MapcError, SpecError


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
    default_expr: object = None     # ``default EXPR``: computed from the config (IR)

    def as_ir(self) -> dict:
        out = {"name": self.name, "choices": list(self.choices), "default": self.default,
               "at": self.at}
        if self.default_expr is not None:
            out["default_expr"] = self.default_expr
        return out


@dataclass(frozen=True)
class MetaEntry:
    """``meta { KEY = expr }`` of a layout: a format metadata key and its expression (IR)."""
    key: str
    expr: object
    at: str
    when: object = None            # ``KEY = expr if COND``: written only when COND holds


@dataclass(frozen=True)
class Spec:
    """A checked spec. ``ir`` is plain JSON data (see schema/spec-ir.schema.json)."""
    ir: dict
    text: str
    bases: tuple = ()                  # (name, file, text) of the specs it extends, nearest first

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
        return tuple(LayoutParam(p["name"], tuple(p["choices"]), p["default"], p["at"],
                                 p.get("default_expr"))
                     for p in self.layout(layout)["params"])

    def layout_meta(self, layout: str) -> tuple[MetaEntry, ...]:
        return tuple(MetaEntry(m["key"], m["expr"], m["at"], m.get("when"))
                     for m in self.layout(layout)["meta"])

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


# ---- the spec carried in an output's record -------------------------------------------------------
def spec_record(spec: Spec) -> dict:
    """What an output's record keeps of the spec that wrote it: enough to read it back with
    exactly that spec (the text, compressed: GGUF keeps the record in a 16 KiB header slot)."""
    return {"family": spec.family, "file": spec.ir["file"], "sha256": spec.sha256,
            "text_zlib_base64": _pack(spec.text),
            "bases": [{"name": n, "file": f, "text_zlib_base64": _pack(t)}
                      for n, f, t in spec.bases]}


def _pack(text: str) -> str:
    return base64.b64encode(zlib.compress(text.encode(), 9)).decode()


def _unpack(data: str) -> str:
    return zlib.decompress(base64.b64decode(data)).decode()


def spec_sha256(text: str, bases=()) -> str:
    """A spec's identity: its text's sha256, or with bases that of all their texts."""
    if not bases:
        return hashlib.sha256(text.encode()).hexdigest()
    return hashlib.sha256("\0".join([text] + [t for _, _, t in bases]).encode()).hexdigest()


def recorded_sha256(record: dict) -> str | None:
    """The sha256 of the spec that wrote a checkpoint, if its record says."""
    s = record.get("spec")
    return s.get("sha256") if isinstance(s, dict) else record.get("spec_sha256")


def spec_from_record(record: dict, where: str) -> Spec | None:
    """The spec a record carries (None for records written before mapc kept it)."""
    s = record.get("spec")
    if not isinstance(s, dict) or "text_zlib_base64" not in s:
        return None
    try:
        text = _unpack(s["text_zlib_base64"])
        bases = tuple((b["name"], b["file"], _unpack(b["text_zlib_base64"]))
                      for b in s.get("bases", ()))
    except (ValueError, KeyError, TypeError, zlib.error, UnicodeDecodeError):
        raise MapcError("the spec recorded in mapc's record cannot be decoded", where=where,
                        hint="pass --spec FILE.map with the spec that wrote it") from None
    if spec_sha256(text, bases) != s.get("sha256"):
        raise MapcError("the spec recorded in mapc's record does not match its sha256 (the "
                        "record was edited or damaged)", where=where,
                        hint="pass --spec FILE.map with the spec that wrote it, and "
                             "--allow-spec-change")
    return compile_text(text, str(s.get("file") or f"{s.get('family', 'recorded')}.map"), bases)


def compile_text(text: str, file: str = "<spec>", bases: tuple = ()) -> Spec:
    """Compile spec text. ``bases`` ((name, file, text), ...) supply the specs it extends (as a
    record keeps them); without them an ``extends`` is looked up as a shipped spec or a file."""
    if not bases:       # read the bases now, so that the cache below sees their texts too
        bases = _base_chain(text, file, (file,))
    return _compile_cached(text, file, tuple(tuple(b) for b in bases))


_EXTENDS = re.compile(r'^[ \t]*extends[ \t]+"([^"\n]*)"', re.M)


def _base_chain(text: str, file: str, seen: tuple) -> tuple:
    """(name, file, text) of the specs ``text`` extends, nearest first, as found on disk (the
    parser reports what this quick look misses, and cycles)."""
    m = _EXTENDS.search(text)
    if m is None:
        return ()
    try:
        base_file, base_text = _find_base(m.group(1), file, None, text)
    except SpecError:
        return ()          # reported, with its position, when the spec is compiled
    if base_file in seen:
        return ()
    return ((m.group(1), base_file, base_text),) + _base_chain(base_text, base_file,
                                                               seen + (base_file,))


@functools.lru_cache(maxsize=64)
def _compile_cached(text: str, file: str, bases: tuple) -> Spec:
    sources.register(file, text)     # for carets in later errors, cached or not
    # A spec that extends another is compiled from its bases' texts too, which its own text
    # does not pin down: only a spec that names no base is kept in the on-disk cache.
    cacheable = not bases and "extends" not in text
    ir = _disk_get("ir", text, file) if cacheable else None
    if ir is not None:
        return Spec(ir=ir, text=text, bases=())
    from mapc.compiler import check as _check      # the parser and checker load only here
    from mapc.compiler.lower import lower
    from mapc.grammar.parser import parse
    chain: list[tuple[str, str, str]] = []
    tree = _with_bases(parse(text, file), file, {b[0]: b for b in bases}, chain, (file,))
    ir = lower(tree, spec_sha256(text, chain))
    _check.check(ir)
    if cacheable and not chain:
        _disk_put("ir", text, file, ir)
    return Spec(ir=ir, text=text, bases=tuple(chain))


def _with_bases(tree, file: str, given: dict, chain: list, seen: tuple):
    """``tree`` merged with the chain of specs it extends (compiler/extend.py)."""
    from mapc.compiler.extend import merge
    from mapc.grammar.parser import caret, parse
    if tree.extends is None:
        return tree
    name, pos = tree.extends.name, tree.extends.pos
    if name in given:
        _, base_file, base_text = given[name]
    else:
        base_file, base_text = _find_base(name, file, pos, tree.source)
    if base_file in seen:
        raise SpecError(f"extends {name!r}: a cycle ({' -> '.join(seen + (base_file,))})",
                        where=str(pos), context=caret(tree.source, pos.line, pos.column))
    sources.register(base_file, base_text)
    chain.append((name, base_file, base_text))
    base = _with_bases(parse(base_text, base_file), base_file, given, chain, seen + (base_file,))
    return merge(base, tree)


def _find_base(name: str, file: str, pos, source: str) -> tuple[str, str]:
    """A base named in ``extends``: a shipped spec (``"llama"``) or a .map file, relative to
    the extending spec's directory."""
    path = Path(name)
    if not path.suffix and "/" not in name:
        found = builtin_specs().get(name)
        if found is not None:
            return f"specs/{found.name}", found.read_text()
    else:
        where = Path(file).parent / path if not path.is_absolute() else path
        try:
            return str(where), where.read_text()
        except OSError:
            pass
    from mapc.grammar.parser import caret
    raise SpecError(f"extends {name!r}: no shipped spec or spec file of that name",
                    where=str(pos), context=caret(source, pos.line, pos.column) if pos else "",
                    hint="shipped specs: " + ", ".join(sorted(builtin_specs())))


def match_rules(text: str, file: str = "<spec>") -> tuple[MatchRule, ...] | None:
    """A spec's ``match`` lines read by the real parser from the spec's header only (what
    precedes its first config/tensors/layout block), without compiling it: None when the header
    does not parse (the compiler then reports the error). Cached by content hash."""
    return _match_rules_cached(hashlib.sha256(text.encode()).hexdigest(), text, file)


@functools.lru_cache(maxsize=64)
def _match_rules_cached(sha: str, text: str, file: str):
    found = _disk_get("match", text, file)
    if found is None:
        from mapc.compiler.lower import value_ir
        from mapc.grammar.parser import parse_header
        matches = parse_header(text, file)
        found = {"rules": None if matches is None else
                 [[m.key, [value_ir(v) for v in m.values], str(m.pos)] for m in matches]}
        _disk_put("match", text, file, found)
    if found["rules"] is None:
        return None
    return tuple(MatchRule(k, tuple(v), at) for k, v, at in found["rules"])


# ---- the on-disk cache of compiled specs ----------------------------------------------------------
# The compiler's own sources are part of every key, so editing the grammar or a pass invalidates
# what an older compiler stored; a corrupt or unreadable entry is recompiled, and a cache that
# cannot be written (read-only home) is skipped silently.
_COMPILER_FILES = (("mapc.grammar", ("mapc.lark", "parser.py", "ast.py")),
                   ("mapc.compiler", ("lower.py", "check.py", "expr.py", "spec.py", "extend.py",
                                      "sources.py", "metakeys.py")))


def _cache_dir() -> Path | None:
    d = os.environ.get("MAPC_CACHE_DIR")
    if d is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "mapc")
    return Path(d) / "specs" if d else None


@functools.lru_cache(maxsize=1)
def _compiler_fingerprint() -> str:
    h = hashlib.sha256()
    for package, names in _COMPILER_FILES:
        root = resources.files(package)
        for name in names:
            h.update(name.encode() + b"\0" + root.joinpath(name).read_bytes() + b"\0")
    return h.hexdigest()


def _cache_path(kind: str, text: str, file: str) -> Path | None:
    d = _cache_dir()
    if d is None:
        return None
    key = hashlib.sha256("\0".join((kind, _compiler_fingerprint(), file, text)).encode())
    return d / f"{kind}-{key.hexdigest()}.json"


def _disk_get(kind: str, text: str, file: str):
    path = _cache_path(kind, text, file)
    if path is None:
        return None
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _disk_put(kind: str, text: str, file: str, value) -> None:
    path = _cache_path(kind, text, file)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(value, f, separators=(",", ":"))
            os.replace(tmp, path)      # readers see the whole entry or none
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


def schema() -> dict:
    return json.loads(resources.files("mapc.compiler").joinpath(
        "schema/spec-ir.schema.json").read_text())
