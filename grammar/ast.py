"""The spec AST: frozen dataclasses, each carrying the position it was parsed from.

The parser builds these from the lark tree; semantic checks (mapc.compiler.check) run over them
afterwards, so every error can point at ``file:line:col``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True)
class Pos:
    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


NOWHERE = Pos("<builtin>", 0, 0)


# ---- expressions ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Num:
    value: Union[int, float]
    pos: Pos = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Str:
    value: str
    pos: Pos = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Bool:
    value: bool
    pos: Pos = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Sym:
    name: str
    pos: Pos = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Op:
    """A unary or binary operator: ``op`` is one of + - * / // % == != < <= > >= and or not neg."""
    op: str
    args: tuple["Expr", ...]
    pos: Pos = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple["Expr", ...]
    pos: Pos = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Null:
    """``null``: a config value that is present but null (see ``nullable``)."""
    pos: Pos = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Cond:
    """``then if test else other``."""
    test: "Expr"
    then: "Expr"
    other: "Expr"
    pos: Pos = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class ListExpr:
    items: tuple["Expr", ...]
    pos: Pos = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class ListFor:
    """``[body for var < count]``: the list of ``body`` at var = 0 .. count - 1."""
    body: "Expr"
    var: str
    count: "Expr"
    pos: Pos = field(default=NOWHERE, compare=False)


Expr = Union[Num, Str, Bool, Sym, Op, Call, ListExpr, Null, Cond, ListFor]


# ---- axis patterns -------------------------------------------------------------------------
@dataclass(frozen=True)
class Member:
    """One tensor's share of a concatenated factor: ``q: heads / groups``."""
    name: str
    size: Expr
    pos: Pos = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Concat:
    members: tuple[Member, ...]
    pos: Pos = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Factor:
    name: str
    pos: Pos = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Axis:
    """One tensor axis, the row-major composition of its factors (outermost first)."""
    factors: tuple[Union[Factor, Concat], ...]
    pos: Pos = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Pattern:
    axes: tuple[Axis, ...]
    pos: Pos = field(default=NOWHERE, compare=False)


# ---- declarations --------------------------------------------------------------------------
@dataclass(frozen=True)
class Let:
    name: str
    expr: Expr
    pos: Pos


@dataclass(frozen=True)
class Require:
    """``require COND "message"``: a config (or topology) for which COND is false is refused
    with the spec's own message."""
    expr: Expr
    message: str
    pos: Pos


@dataclass(frozen=True)
class Without:
    """``without GROUP "message"`` in a layout: the format has no place for the group's
    tensors; a config that gives the group any entry is refused with the message."""
    group: str
    message: str
    pos: Pos


@dataclass(frozen=True)
class Drop:
    """``drop layout NAME`` (top level) or ``drop "RULE NAME"`` (in a layout) of a derived spec."""
    name: str
    pos: Pos


@dataclass(frozen=True)
class Match:
    key: str
    values: tuple[Expr, ...]
    pos: Pos


@dataclass(frozen=True)
class ConfigEntry:
    name: str
    keys: tuple[str, ...]          # dotted config key paths, tried in order
    default: Expr | None
    pos: Pos
    nullable: bool = False         # a present null binds null instead of falling through
    absent: Expr | None = None     # the value when a checkpoint lacks what the config's implies


@dataclass(frozen=True)
class TensorDecl:
    name: str                      # e.g. "q"; inside a group the full name is "layer.q"
    group: str | None              # e.g. "layer"
    index: str | None              # the group's index variable, e.g. "i"
    count: Expr | None             # the group's size, e.g. Sym("layers")
    pattern: Pattern | None        # None for a stored tensor
    when: Expr | None
    pos: Pos
    stored: bool = False           # `NAME: *`: one tensor per stored tensor, shaped as stored
    kind: "Kind | None" = None     # in `where COND(i) { ... }`: the layers of the kind it belongs to

    @property
    def full_name(self) -> str:
        return f"{self.group}.{self.name}" if self.group else self.name


@dataclass(frozen=True)
class Kind:
    """``where COND { ... }`` (``negated``: its ``else { ... }``) inside a tensor group: the
    declarations hold only at the group indices where COND is true (false)."""
    when: Expr
    negated: bool
    pos: Pos


@dataclass(frozen=True)
class Ref:
    """A reference to a logical tensor: ``embed`` or ``layer[i].q``."""
    group: str | None
    index: str | None
    name: str
    pos: Pos

    @property
    def full_name(self) -> str:
        return f"{self.group}.{self.name}" if self.group else self.name

    def __str__(self) -> str:
        return f"{self.group}[{self.index}].{self.name}" if self.group else self.name


@dataclass(frozen=True)
class Split:
    factors: tuple[str, ...]       # one factor, or adjacent factors cut as their product
    mesh: str
    pos: Pos
    uneven: bool = False           # `unevenly`: the first ranks take one more when not divisible


@dataclass(frozen=True)
class Each:
    """One physical tensor per index of ``factor``, the index bound to ``var`` in the name."""
    factor: str
    var: str
    pos: Pos


@dataclass(frozen=True)
class Pad:
    factor: str
    multiple: Expr
    pos: Pos


@dataclass(frozen=True)
class ValueMap:
    """``value EXPR``: the physical tensor stores EXPR of the logical value ``x``, elementwise."""
    expr: Expr
    pos: Pos


@dataclass(frozen=True)
class Quantized:
    """``quantized KIND``: the physical tensor may be stored quantized (fp8_block, mxfp4)."""
    kind: str
    pos: Pos


@dataclass(frozen=True)
class Rule:
    name: str                      # physical name pattern, e.g. "model.layers.{i}.q_proj.weight"
    copy: bool                     # an explicit replica of tensors another rule already places
    refs: tuple[Ref, ...]
    as_pattern: Pattern | None     # the physical tensor's axes
    from_pattern: "Pattern | dict[str, Pattern] | None"  # the logical tensors' axes, when
                                   # they must be rearranged (per member in a fusion)
    splits: tuple[Split, ...]
    pads: tuple[Pad, ...]
    eaches: tuple[Each, ...]       # unstack factors into separately named tensors
    repeats: tuple[str, ...]       # factors that replicate (broadcast) the logical tensor
    stage: str | None              # "first" | "last" | None
    when: Expr | None
    pos: Pos
    sums: tuple[str, ...] = ()     # mesh axes whose ranks each store a share of the sum
    value: "ValueMap | None" = None  # the file stores f(x) of the logical value x
    quantized: "Quantized | None" = None  # the file may store it quantized (read dequantized)
    dtype: str | None = None       # `dtype float32`: stored in this dtype whatever --dtype asks


@dataclass(frozen=True)
class Param:
    name: str
    choices: tuple[Expr, ...]      # the first is the default; one choice means "any value"
    pos: Pos
    default: Expr | None = None    # `default EXPR`: computed from the config instead


@dataclass(frozen=True)
class Pipeline:
    group: str                     # e.g. "layer"
    index: str                     # the global index variable, e.g. "i"
    local: str | None              # the stage-local index variable, e.g. "j"
    pos: Pos
    # `first N  last M`: entries on the first / last stage (uneven pipeline), as
    # ((stage, expr, pos), ...) in the order written
    sizes: tuple = ()


@dataclass(frozen=True)
class MetaEntry:
    key: str
    expr: Expr
    pos: Pos
    when: Expr | None = None       # written only when this holds


@dataclass(frozen=True)
class Alias:
    """``alias "lm_head.weight" = embed if tied``: a second module name of a tensor."""
    name: str
    ref: "Ref"
    when: Expr | None
    pos: Pos


@dataclass(frozen=True)
class Layout:
    name: str
    mesh: tuple[str, ...]
    single: tuple[str, ...]        # mesh axes whose uncut tensors live on rank 0 only
    params: tuple[Param, ...]
    pipeline: Pipeline | None
    meta: tuple[MetaEntry, ...]
    lets: tuple[Let, ...]
    rules: tuple[Rule, ...]
    pos: Pos
    aliases: tuple[Alias, ...] = ()
    requires: tuple[Require, ...] = ()
    drops: tuple[Drop, ...] = ()       # base rules a derived spec removes
    withouts: tuple[Without, ...] = ()   # tensor groups the format has no place for


@dataclass(frozen=True)
class Spec:
    family: str
    matches: tuple[Match, ...]
    lets: tuple[Let, ...]
    config: tuple[ConfigEntry, ...]
    tensors: tuple[TensorDecl, ...]
    layouts: tuple[Layout, ...]
    file: str
    source: str                    # the spec text, for error carets
    pos: Pos
    requires: tuple[Require, ...] = ()
    extends: "Drop | None" = None      # the base spec's name (or path) and where it is named
    drop_layouts: tuple[Drop, ...] = ()
