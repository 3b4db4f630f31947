"""Parse spec text into the AST.

The grammar lives in ``mapc.lark`` beside this file and is loaded once (LALR, cached).
Syntax errors become :class:`SpecError` with ``file:line:col``, the offending line, a caret
and what was expected.
"""
from __future__ import annotations

import dataclasses
import functools
from importlib import resources

import lark
from lark import Token, Transformer, v_args

from mapc.errors import SpecError
from mapc.grammar import ast as A

# Terminal names as a user would read them in "expected ..." messages.
_TERMINAL_WORDS = {
    "NAME": "a name", "LABEL": "a name followed by ':'", "STRING": "a quoted string",
    "NUMBER": "a number", "LBRACE": "'{'", "RBRACE": "'}'", "LPAR": "'('", "RPAR": "')'",
    "LSQB": "'['", "RSQB": "']'", "COLON": "':'", "COMMA": "','", "EQUAL": "'='",
    "DOT": "'.'", "LESSTHAN": "'<'", "VBAR": "'|'", "COMP": "a comparison",
    "ADDOP": "'+' or '-'", "MULOP": "'*', '/', '//' or '%'", "STAGE": "'first' or 'last'",
    "COPY": "'copy'", "NULLABLE": "'nullable'", "MINUS": "'-'", "$END": "end of file",
}


@functools.lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    text = resources.files("mapc.grammar").joinpath("mapc.lark").read_text()
    return lark.Lark(text, parser="lalr", propagate_positions=True, maybe_placeholders=True,
                     cache=True, start=["start", "expr_only"])


def caret(source: str, line: int, column: int) -> str:
    """The offending source line with a caret under ``column`` (both 1-based)."""
    lines = source.splitlines()
    if not 1 <= line <= len(lines):
        return ""
    text = lines[line - 1]
    return f"\n    {text}\n    {' ' * (column - 1)}^"


def _expected(tokens) -> str:
    words = sorted({_TERMINAL_WORDS.get(t, f"'{t.lower()}'" if t.isalpha() else t)
                    for t in tokens if not t.startswith("__")})
    if not words:
        return ""
    if len(words) > 8:
        words = words[:8] + ["..."]
    return "; expected " + ", ".join(words)


def parse(text: str, file: str = "<spec>") -> A.Spec:
    """Parse a spec. Raises SpecError (with position and caret) on a syntax error."""
    return _parse(text, file, "start")


def parse_expr(text: str, file: str = "<expr>") -> A.Expr:
    """Parse one expression (used for the ``{...}`` placeholders of tensor names)."""
    return _parse(text, file, "expr_only")


def _parse(text: str, file: str, start: str):
    try:
        tree = _parser().parse(text, start=start)
    except lark.exceptions.UnexpectedCharacters as e:
        raise SpecError(f"unexpected character {text[e.pos_in_stream]!r}"
                        f"{_expected(e.allowed or ())}", where=f"{file}:{e.line}:{e.column}",
                        context=caret(text, e.line, e.column)) from None
    except lark.exceptions.UnexpectedToken as e:
        got = "end of file" if e.token.type == "$END" else repr(str(e.token))
        line, col = (e.line, e.column) if e.line and e.line > 0 else _end(text)
        raise SpecError(f"unexpected {got}{_expected(e.expected)}",
                        where=f"{file}:{line}:{col}", context=caret(text, line, col)) from None
    except lark.exceptions.UnexpectedEOF as e:
        line, col = _end(text)
        raise SpecError(f"unexpected end of file{_expected(e.expected)}",
                        where=f"{file}:{line}:{col}") from None
    try:
        return _Build(file, text).transform(tree)
    except lark.exceptions.VisitError as e:  # our own SpecErrors raised while building
        if isinstance(e.orig_exc, SpecError):
            raise e.orig_exc from None
        raise


# Keywords that open a block: a spec's header (family, match, let lines) ends at the first.
_BLOCK_KEYWORDS = frozenset({"CONFIG", "TENSORS", "LAYOUT"})


def parse_header(text: str, file: str = "<spec>") -> tuple[A.Match, ...] | None:
    """The ``match`` lines of a spec's header, parsed by the spec grammar itself but only up
    to the first config/tensors/layout block (a few milliseconds, against ~0.1 s to compile
    the spec). None when the header is not valid: compiling the spec reports why."""
    try:
        ip = _parser().parse_interactive(text, start="start")
        for tok in ip.lexer_thread.lex(ip.parser_state):
            if tok.type in _BLOCK_KEYWORDS:
                break
            ip.feed_token(tok)
        tree = ip.feed_eof()
        build = _Build(file, text)
        return tuple(build.transform(c) for c in tree.children
                     if isinstance(c, lark.Tree) and c.data == "match")
    except (lark.exceptions.LarkError, SpecError):
        return None


def _end(text: str) -> tuple[int, int]:
    lines = text.splitlines() or [""]
    return len(lines), len(lines[-1]) + 1


def parse_file(path) -> A.Spec:
    from pathlib import Path
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError(f"cannot read spec: {e.strerror}", where=str(path)) from None
    return parse(text, str(path))


class _Build(Transformer):
    """Lark tree -> AST. Purely structural: no semantic checks here (see mapc.compiler.check)."""

    def __init__(self, file: str, text: str):
        super().__init__()
        self.file = file
        self.text = text

    def _pos(self, meta_or_tok) -> A.Pos:
        line = getattr(meta_or_tok, "line", 0) or 0
        col = getattr(meta_or_tok, "column", 0) or 0
        return A.Pos(self.file, line, col)

    # -- top level --
    def expr_only(self, c):
        return c[0]

    @v_args(meta=True)
    def start(self, meta, items):
        family = [i for i in items if isinstance(i, tuple) and i[0] == "family"]
        if len(family) != 1:
            where = family[1][2] if family else A.Pos(self.file, 1, 1)
            raise SpecError("a spec declares exactly one 'family NAME'" +
                            (" (found two)" if family else " (found none)") +
                            caret(self.text, where.line, where.column), where=str(where))
        config = [e for i in items if isinstance(i, list) and i and i[0] == "config" for e in i[1:]]
        tensors = [t for i in items if isinstance(i, list) and i and i[0] == "tensors"
                   for t in i[1:]]
        return A.Spec(
            family=family[0][1],
            matches=tuple(i for i in items if isinstance(i, A.Match)),
            lets=tuple(i for i in items if isinstance(i, A.Let)),
            config=tuple(config),
            tensors=tuple(tensors),
            layouts=tuple(i for i in items if isinstance(i, A.Layout)),
            file=self.file, source=self.text, pos=A.Pos(self.file, 1, 1),
            requires=tuple(i for i in items if isinstance(i, A.Require)),
            extends=self._one_extends(items),
            drop_layouts=tuple(i[1] for i in items if isinstance(i, tuple) and i[0] == "drop"))

    def _one_extends(self, items):
        found = [i[1] for i in items if isinstance(i, tuple) and i[0] == "extends"]
        if len(found) > 1:
            p = found[1].pos
            raise SpecError("a spec extends at most one base" + caret(self.text, p.line, p.column),
                            where=str(p))
        return found[0] if found else None

    @v_args(meta=True)
    def extends_decl(self, meta, c):
        return ("extends", A.Drop(str(c[0])[1:-1], self._pos(meta)))

    @v_args(meta=True)
    def drop_layout(self, meta, c):
        return ("drop", A.Drop(str(c[0]), self._pos(meta)))

    @v_args(meta=True)
    def drop_rule(self, meta, c):
        return A.Drop(str(c[0])[1:-1], self._pos(meta))

    @v_args(meta=True)
    def family(self, meta, c):
        return ("family", str(c[0]), self._pos(meta))

    @v_args(meta=True)
    def match(self, meta, c):
        return A.Match(str(c[0]), tuple(c[1:]), self._pos(meta))

    @v_args(meta=True)
    def let_decl(self, meta, c):
        return A.Let(str(c[0]), c[1], self._pos(meta))

    @v_args(meta=True)
    def require_decl(self, meta, c):
        return A.Require(c[0], str(c[1])[1:-1], self._pos(meta))

    @v_args(meta=True)
    def without_decl(self, meta, c):
        return A.Without(str(c[0]), str(c[1])[1:-1], self._pos(meta))

    def config_block(self, c):
        return ["config", *c]

    @v_args(meta=True)
    def config_entry(self, meta, c):
        *keys, nullable, default, absent = c[1:]
        return A.ConfigEntry(str(c[0]), tuple(keys), default, self._pos(meta),
                             nullable=nullable is not None, absent=absent)

    def key_path(self, c):
        return ".".join(str(t) for t in c)

    def tensors_block(self, c):
        out = ["tensors"]
        for item in c:
            out.extend(item if isinstance(item, list) else [item])
        return out

    @v_args(meta=True)
    def tensor_group(self, meta, c):
        group, index, count, *items = c
        decls = [d for x in items for d in (x if isinstance(x, list) else [x])]
        return [A.TensorDecl(d.name, str(group), str(index), count, d.pattern, d.when, d.pos,
                             stored=d.stored, kind=d.kind) for d in decls]

    @v_args(meta=True)
    def tensor_kind(self, meta, c):
        when, *decls, other = c
        kind = A.Kind(when, False, self._pos(meta))
        out = [dataclasses.replace(d, kind=kind) for d in decls]
        if other is not None:
            out += [dataclasses.replace(d, kind=A.Kind(when, True, other[0]))
                    for d in other[1]]
        return out

    @v_args(meta=True)
    def tensor_kind_else(self, meta, c):
        return (self._pos(meta), list(c))

    @v_args(meta=True)
    def tensor_decl(self, meta, c):
        return A.TensorDecl(str(c[0]), None, None, None, c[1], c[2], self._pos(meta))

    @v_args(meta=True)
    def tensor_stored(self, meta, c):
        return A.TensorDecl(str(c[0]), None, None, None, None, None, self._pos(meta),
                            stored=True)

    # -- layouts --
    @v_args(meta=True)
    def layout_block(self, meta, c):
        name, *items = c
        mesh = tuple(m for i in items if isinstance(i, tuple) and i and i[0] == "mesh"
                     for m in i[1])
        pipelines = [i for i in items if isinstance(i, A.Pipeline)]
        if len(pipelines) > 1:
            p = pipelines[1].pos
            raise SpecError(f"layout {name} declares 'pipeline' twice" +
                            caret(self.text, p.line, p.column), where=str(p))
        single = tuple(m for i in items if isinstance(i, tuple) and i and i[0] == "single"
                       for m in i[1])
        return A.Layout(
            name=str(name), mesh=mesh, single=single,
            params=tuple(i for i in items if isinstance(i, A.Param)),
            pipeline=pipelines[0] if pipelines else None,
            meta=tuple(e for i in items if isinstance(i, list) for e in i),
            lets=tuple(i for i in items if isinstance(i, A.Let)),
            rules=tuple(i for i in items if isinstance(i, A.Rule)),
            pos=self._pos(meta),
            aliases=tuple(i for i in items if isinstance(i, A.Alias)),
            requires=tuple(i for i in items if isinstance(i, A.Require)),
            drops=tuple(i for i in items if isinstance(i, A.Drop)),
            withouts=tuple(i for i in items if isinstance(i, A.Without)))

    def mesh_decl(self, c):
        return ("mesh", tuple(str(t) for t in c))

    @v_args(meta=True)
    def alias_decl(self, meta, c):
        name, ref, when = c
        return A.Alias(str(name)[1:-1], ref, when, self._pos(meta))

    def single_decl(self, c):
        return ("single", tuple(str(t) for t in c))

    @v_args(meta=True)
    def param_decl(self, meta, c):
        return A.Param(str(c[0]), tuple(c[1:-1]), self._pos(meta), default=c[-1])

    def param_default(self, c):
        return c[0]

    @v_args(meta=True)
    def pipeline_decl(self, meta, c):
        return A.Pipeline(str(c[0]), str(c[1]), str(c[2]) if c[2] is not None else None,
                          self._pos(meta), sizes=tuple(c[3:]))

    @v_args(meta=True)
    def pipeline_stage_size(self, meta, c):
        return str(c[0]), c[1], self._pos(meta)

    def meta_block(self, c):
        return list(c)

    @v_args(meta=True)
    def meta_entry(self, meta, c):
        key, value, test, other = c
        if getattr(key, "type", None) == "STRING":
            key = str(key)[1:-1]
        pos = self._pos(meta)
        if other is not None:       # KEY = A if COND else B: a conditional value
            return A.MetaEntry(key, A.Cond(test, value, other, pos), pos)
        return A.MetaEntry(key, value, pos, when=test)

    @v_args(meta=True)
    def rule(self, meta, c):
        name_tok, copy, *rest = c
        refs = tuple(x for x in rest if isinstance(x, A.Ref))
        clauses = [x for x in rest if isinstance(x, tuple)]
        pos = self._pos(meta)

        def one(kind):
            found = [x for x in clauses if x[0] == kind]
            if len(found) > 1:
                p = found[1][-1]
                raise SpecError(f"rule {name_tok} has two '{kind}' clauses" +
                                caret(self.text, p.line, p.column), where=str(p))
            return found[0][1] if found else None

        return A.Rule(
            name=str(name_tok)[1:-1], copy=copy is not None, refs=refs,
            as_pattern=one("as"), from_pattern=one("from"),
            splits=tuple(x[1] for x in clauses if x[0] == "split"),
            pads=tuple(x[1] for x in clauses if x[0] == "pad"),
            eaches=tuple(x[1] for x in clauses if x[0] == "each"),
            repeats=tuple(x[1] for x in clauses if x[0] == "repeat"),
            stage=one("on"), when=one("if"), pos=pos,
            sums=tuple(x[1] for x in clauses if x[0] == "sum"),
            value=one("value"), quantized=one("quantized"), dtype=one("dtype"))

    @v_args(meta=True)
    def dtype_clause(self, meta, c):
        return ("dtype", str(c[0]), self._pos(meta))

    @v_args(meta=True)
    def ref(self, meta, c):
        head, index, *names = c
        pos = self._pos(meta)
        if index is None and not names:
            return A.Ref(None, None, str(head), pos)
        if index is None or len(names) != 1:
            raise SpecError(f"a tensor reference is NAME or GROUP[INDEX].NAME, got "
                            f"{head}{'[' + str(index) + ']' if index else ''}"
                            f"{''.join('.' + str(n) for n in names)}"
                            + caret(self.text, pos.line, pos.column), where=str(pos))
        return A.Ref(str(head), str(index), str(names[0]), pos)

    @v_args(meta=True)
    def as_clause(self, meta, c):
        return ("as", c[0], self._pos(meta))

    @v_args(meta=True)
    def from_clause(self, meta, c):
        return ("from", c[0], self._pos(meta))

    @v_args(meta=True)
    def from_members(self, meta, c):
        return ("from", dict(c), self._pos(meta))

    def member_view(self, c):
        return (str(c[0]), c[1])

    @v_args(meta=True)
    def split_clause(self, meta, c):
        pos = self._pos(meta)
        return ("split", A.Split(tuple(c[0]), str(c[1]), pos, c[2] is not None), pos)

    def split_target(self, c):
        return [str(t) for t in c]

    @v_args(meta=True)
    def each_clause(self, meta, c):
        pos = self._pos(meta)
        return ("each", A.Each(str(c[0]), str(c[1]), pos), pos)

    @v_args(meta=True)
    def repeat_clause(self, meta, c):
        pos = self._pos(meta)
        return ("repeat", str(c[0]), pos)

    @v_args(meta=True)
    def sum_clause(self, meta, c):
        pos = self._pos(meta)
        return ("sum", str(c[0]), pos)

    @v_args(meta=True)
    def pad_clause(self, meta, c):
        pos = self._pos(meta)
        return ("pad", A.Pad(str(c[0]), c[1], pos), pos)

    @v_args(meta=True)
    def value_map(self, meta, c):
        pos = self._pos(meta)
        return ("value", A.ValueMap(c[0], pos), pos)

    @v_args(meta=True)
    def quantized(self, meta, c):
        pos = self._pos(meta)
        return ("quantized", A.Quantized(str(c[0]), pos), pos)

    @v_args(meta=True)
    def on_clause(self, meta, c):
        return ("on", str(c[0]), self._pos(meta))

    @v_args(meta=True)
    def if_clause(self, meta, c):
        return ("if", c[0], self._pos(meta))

    # -- patterns --
    @v_args(meta=True)
    def pattern(self, meta, c):
        return A.Pattern(tuple(c), self._pos(meta))

    def axis_name(self, c):
        tok = c[0]
        return A.Axis((A.Factor(str(tok), self._pos(tok)),), self._pos(tok))

    @v_args(meta=True)
    def axis_group(self, meta, c):
        return A.Axis(tuple(c), self._pos(meta))

    @v_args(meta=True)
    def axis_concat(self, meta, c):
        return A.Axis((c[0],), self._pos(meta))

    def factor_name(self, c):
        return A.Factor(str(c[0]), self._pos(c[0]))

    @v_args(meta=True)
    def concat(self, meta, c):
        return A.Concat(tuple(c), self._pos(meta))

    @v_args(meta=True)
    def concat_unit(self, meta, c):
        return A.Concat(tuple(A.Member(str(t), A.Num(1), self._pos(t)) for t in c),
                        self._pos(meta))

    @v_args(meta=True)
    def member(self, meta, c):
        return A.Member(str(c[0]), c[1], self._pos(meta))

    # -- expressions --
    def number(self, c):
        text = str(c[0])
        value = float(text) if any(ch in text for ch in ".eE") else int(text)
        return A.Num(value, self._pos(c[0]))

    def string(self, c):
        return A.Str(str(c[0])[1:-1], self._pos(c[0]))

    @v_args(meta=True)
    def true(self, meta, c):
        return A.Bool(True, self._pos(meta))

    @v_args(meta=True)
    def false(self, meta, c):
        return A.Bool(False, self._pos(meta))

    def symbol(self, c):
        return A.Sym(str(c[0]), self._pos(c[0]))

    @v_args(meta=True)
    def call(self, meta, c):
        return A.Call(str(c[0]), tuple(c[1:]), self._pos(meta))

    @v_args(meta=True)
    def null(self, meta, c):
        return A.Null(self._pos(meta))

    @v_args(meta=True)
    def cond(self, meta, c):
        then, test, other = c
        return A.Cond(test, then, other, self._pos(meta))

    @v_args(meta=True)
    def list_(self, meta, c):
        return A.ListExpr(tuple(x for x in c if x is not None), self._pos(meta))

    @v_args(meta=True)
    def list_for(self, meta, c):
        body, var, count = c
        return A.ListFor(body, str(var), count, self._pos(meta))

    @v_args(meta=True)
    def member_of(self, meta, c):
        return A.Op("in", (c[0], c[1]), self._pos(meta))

    @v_args(meta=True)
    def not_member_of(self, meta, c):
        return A.Op("not", (A.Op("in", (c[0], c[1]), self._pos(meta)),), self._pos(meta))

    @v_args(meta=True)
    def neg(self, meta, c):
        return A.Op("neg", (c[0],), self._pos(meta))

    @v_args(meta=True)
    def not_(self, meta, c):
        return A.Op("not", (c[0],), self._pos(meta))

    @v_args(meta=True)
    def or_(self, meta, c):
        return self._chain("or", c, meta)

    @v_args(meta=True)
    def and_(self, meta, c):
        return self._chain("and", c, meta)

    def _chain(self, op, c, meta):
        out = c[0]
        for x in c[1:]:
            out = A.Op(op, (out, x), self._pos(meta))
        return out

    @v_args(meta=True)
    def compare(self, meta, c):
        if len(c) == 1 or c[1] is None:
            return c[0]
        return A.Op(str(c[1]), (c[0], c[2]), self._pos(meta))

    @v_args(meta=True)
    def arith(self, meta, c):
        out = c[0]
        for i in range(1, len(c), 2):
            out = A.Op(str(c[i]), (out, c[i + 1]), self._pos(meta))
        return out


def _is_token(x) -> bool:
    return isinstance(x, Token)
