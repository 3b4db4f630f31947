"""The write protocol: every format plans its output purely, then an I/O-only writer executes
the plan (as torch.distributed.checkpoint's SavePlanner / StorageWriter split the work).

    facts   = SourceFacts.of(source, program)                  # read once from the source
    request = WriteRequest("deepspeed", dp=4, zero_stage=3)    # what the user asked for
    plan    = containers.plan_write(program, facts, request)   # pure: decisions, files, notes
    writer  = containers.make_writer(tmpdir, program, plan)    # I/O only
    execute.run(program, source, writer, plan=plan)

``plan_write(program, facts, request) -> WritePlan`` of a container module takes every
decision the output needs (ZeRO stage, data-parallel size, param groups, fresh optimizer or
not, optimizer step, shard files, tag names, which optimizer slots are stored), lists every
file the output will hold and every note the user should read, and raises
:class:`~mapc.errors.MapcError` for anything it cannot write. It reads no file and writes none,
so ``mapc convert --dry-run`` prints exactly what the real run then does, and golden tests
compare plans as text. The writer (``Writer(tmpdir, program, plan)``) decides nothing: it
creates the planned files, in the order the tensors arrive, and nothing else.

A writer needs from the source only its :class:`SourceFacts`: a documented object built once
before planning (slots, training state, tensor names and dtypes, and for the DeepSpeed family
its ZeRO facts and the files a conversion carries over). No writer reaches into a source
container's private fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mapc.errors import MapcError

MOMENTS = ("exp_avg", "exp_avg_sq")

# --dtype choices -> the numpy dtype name of the cast (None: keep). Here, not in mapc.api, so
# that `mapc convert --help` imports no numpy.
DTYPE_CHOICES = {"keep": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# Request options a format may honour, with the CLI spelling used in errors. The dtype cast
# (--dtype) is honoured by every format (a format that cannot store a dtype says so).
OPTIONS = {
    "dp": "--dp",
    "zero_stage": "--zero-stage",
    "with_optimizer": "--with-optimizer",
    "max_shard_bytes": "max_shard_bytes",
    "pp_first_stage": "--pp-first-stage",
    "pp_last_stage": "--pp-last-stage",
    "vpp": "--vpp",
    "optim_sharding": "--optim-sharding",
    "quantize": "--quantize",
}


@dataclass(frozen=True)
class WriteRequest:
    """What the user asked of the output, beyond the program (format, layout, topology).

    ``explicit`` names the options the user set (``OPTIONS`` keys): those a format does not
    honour are refused. Options that ``--like`` derived from a template are not in it."""
    format: str
    dst: str = ""
    dtype: str | None = None                 # numpy dtype name of a cast, None: keep
    dp: int | None = None
    zero_stage: int | None = None
    with_optimizer: bool = False
    max_shard_bytes: int | None = None
    # virtual pipeline stages per pipeline rank (Megatron's interleaved schedule): the program
    # is compiled at pp * vpp stages, virtual stage s = chunk * pp + pipeline rank
    vpp: int | None = None
    optim_sharding: str | None = None        # torch_dist: dp_reshardable | fully_reshardable
    like_training: dict | None = None        # --like: the template's training state
    pp_first_stage: int | None = None        # uneven pipeline: layers on the first stage
    pp_last_stage: int | None = None         # ... and on the last (megatron-core's rule)
    explicit: frozenset = frozenset()
    allow_lossy: bool = False                # --allow-lossy: value maps may round (every format)
    # --quantize KIND: write the rules that say `quantized KIND` in that storage (lossy unless
    # their values were read from it: mapc.runtime.quantized)
    quantize: str | None = None

    def refuse_unhonoured(self, honours, takers: dict[str, list[str]]) -> None:
        """One-line MapcError for the first explicit option the format does not honour."""
        for opt in OPTIONS:
            if opt in self.explicit and opt not in honours:
                value = getattr(self, opt)
                shown = OPTIONS[opt] + ("" if isinstance(value, bool) else f" {value}")
                others = ", ".join(takers.get(opt, [])) or "none"
                raise MapcError(f"--to {self.format} does not take {shown}: {self.format} "
                                f"output has no such setting",
                                hint=f"drop {OPTIONS[opt]}; it is taken by: {others}")


@dataclass(frozen=True)
class ZeroFacts:
    """What a DeepSpeed-family source (deepspeed, universal, neox) tells a writer about its
    ZeRO optimizer, beyond the training state.

    ``tag``: the checkpoint's tag folder name (``global_step10``); ``kind``: the optimizer
    class ("zero" for stages 1/2, "bf16", "stage3"); ``optimizer_header``: rank 0's optimizer
    state as loaded (inert records and lazy tensor references; a universal writer keeps its
    scalars and groups); ``param_shapes``: the model states' per-group parameter shapes (the
    trained parameters); ``carry_files``: model states files a universal output takes over as
    they are (as ds_to_universal does)."""
    tag: str | None = None
    kind: str | None = None
    optimizer_header: object = None
    param_shapes: tuple = ()
    carry_files: tuple[Path, ...] = ()


@dataclass(frozen=True)
class SourceFacts:
    """Everything a format's planner and writer may know of the source, read once.

    ``slots``: the optimizer slots the source holds (``param`` always); ``training``: its
    training state (``Source.training_state()``: iteration, step, param groups, ZeRO stage,
    dp_world_size, ds_config, scheduler, loss scale, ...); ``names``: its physical tensor
    names in its own order (a model's state-dict order); ``module_source``: the source is a
    DeepSpeed-style module checkpoint whose tensor order is the module's; ``dtypes[slot]``: the
    stored dtype of every logical tensor in slots ``param`` and ``master``; ``format_meta``:
    the source format's metadata; ``zero``: ZeroFacts of a DeepSpeed-family source.

    ``stateless_keys``: the logical tensors without optimizer state (frozen parameters and
    buffers, ``Source.stateless``), with their kind (``"frozen"`` or ``"buffer"``);
    ``stateless_names``: the source's physical names of those; ``has_config``: the conversion
    has a model config to write as config.json (generic mode may have none); ``config``: that
    config (HF keys), or None."""
    path: str
    format: str
    slots: tuple[str, ...]
    training: dict
    names: tuple[str, ...]
    dtypes: dict
    format_meta: dict = field(default_factory=dict)
    module_source: bool = False
    zero: ZeroFacts | None = None
    stateless_keys: dict = field(default_factory=dict)
    stateless_names: frozenset = frozenset()
    has_config: bool = True
    config: dict | None = None
    # logical tensors read dequantized from quantized storage (mapc.runtime.quantized), with
    # the storage kind ("fp8_block", "mxfp4")
    quantized: dict = field(default_factory=dict)

    @classmethod
    def of(cls, source, program, *, has_config: bool = True,
           config: dict | None = None) -> SourceFacts:
        slots = tuple(source.slots())
        stateless = {c: dict(source.stateless(c)) for c in source.coords()}
        dtypes = {}
        for slot in ("param", "master"):
            if slot not in slots:
                continue
            by_key = {}
            for inst in program.source.instances:
                _, coord, name = inst.shards[0]
                # frozen parameters and buffers have no master copy: their stored dtype
                dt = source.dtype(name, coord) if slot == "param" or \
                    name in stateless.get(coord, ()) else source.dtype(name, coord, slot=slot)
                for key in inst.members.values():
                    by_key.setdefault(key, dt)
            dtypes[slot] = by_key
        names = tuple(n for c in source.coords() for n in source.names(c))
        kind_of = getattr(source, "kind", None)     # a QuantizedView's
        quantized = {}
        for inst in program.source.instances if callable(kind_of) else ():
            for _, coord, name in inst.shards:
                kind = kind_of(name, coord)
                if kind is not None:
                    quantized.update({key: kind for key in inst.members.values()})
        return cls(path=str(source.path), format=source.format, slots=slots,
                   training=dict(source.training_state() or {}), names=names, dtypes=dtypes,
                   format_meta=dict(getattr(source, "format_meta", None) or {}),
                   module_source=bool(getattr(source, "module_source", False)),
                   zero=source.zero_facts() if hasattr(source, "zero_facts") else None,
                   stateless_keys=program.stateless_keys(source),
                   stateless_names=frozenset(n for kinds in stateless.values() for n in kinds),
                   has_config=has_config, config=dict(config) if config else None,
                   quantized=quantized)

    @property
    def has_moments(self) -> bool:
        return set(MOMENTS) <= set(self.slots)


def weights_slot(writer_slots, source_slots) -> str:
    """The source slot the output's weights come from: the fp32 master copy when the source
    has one and the output keeps no master slot of its own, else the weights."""
    extra = [s for s in writer_slots if s != "param" and s in source_slots]
    return "master" if "master" in source_slots and "master" not in extra else "param"


FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def planned_tensors(program, facts: SourceFacts, dtype: str | None, writer_slots) -> tuple:
    """(coord, name, shard shape, dtype) of every target tensor, in placement order: the
    cast dtype, else the dtype of the source slot the weights come from. The cast applies to
    floating tensors; integer ones (buffers such as step counters) keep their dtype."""
    src = facts.dtypes[weights_slot(writer_slots, facts.slots)]
    out = []
    for inst, coord, name in program.target.placements():
        have = src[next(iter(inst.members.values()))]
        out.append((coord, name, tuple(inst.recipe.shape_at(coord)), cast_dtype(inst, have, dtype)))
    return tuple(out)


def cast_dtype(inst, have: str, dtype: str | None, widen: bool = True) -> str:
    """The stored dtype of a target tensor the source holds as ``have``: a rule's own
    ``dtype NAME`` (megatron-core's fp32 expert_bias), else the cast dtype, else ``have`` -- but
    with ``widen``, a value-mapped tensor (``value 1 + x``) of 16-bit floats as float32, since
    the map of a bfloat16 or float16 value needs more bits to be exact (mapc.runtime.values).
    Only floating tensors are cast; integer ones (step counters, ...) keep their dtype."""
    if have not in FLOAT_DTYPES:
        return have
    if inst.rule.get("dtype") or dtype:
        return inst.rule.get("dtype") or dtype
    mapped = widen and getattr(inst, "value", None) is not None
    return "float32" if mapped and have in ("bfloat16", "float16") else have


def stateless_targets(program, facts: SourceFacts, tensors=()) -> dict[str, str]:
    """Target tensors that have no optimizer state, by name, with their kind: those whose
    logical tensors the source says are frozen parameters or buffers, and every non-floating
    tensor of ``tensors`` (planned_tensors; a source that does not say which tensors are
    buffers, e.g. plain weights, has integer ones only)."""
    keys = facts.stateless_keys
    out = {name: keys[next(iter(inst.members.values()))]
           for inst, _, name in (program.target.placements() if keys else ())
           if inst.members and all(k in keys for k in inst.members.values())}
    out.update({name: "buffer" for _, name, _, dt in tensors if dt not in FLOAT_DTYPES})
    return out


@dataclass(frozen=True)
class WritePlan:
    """A format's complete plan of one output; see the module docstring.

    ``files``: every file of the output, relative POSIX paths, sorted (a single-file output,
    e.g. a ``.nemo`` tar, lists its one name as ``.``); ``decisions``: the choices made, by name
    (printed, golden-tested); ``notes``: what the user should know (reported as warnings);
    ``slots``: the optimizer slots the writer stores besides ``param``; ``tensors``: the
    planned (coord, name, shape, dtype) of every target tensor; ``detail``: the format's own
    data for its writer (not printed)."""
    format: str
    files: tuple[str, ...]
    decisions: dict
    notes: tuple[str, ...]
    slots: tuple[str, ...]
    tensors: tuple
    detail: object = None
    facts: SourceFacts | None = None
    parts: tuple = ()
    serial: str | None = None
    quantized: dict = field(default_factory=dict)

    def pretty(self) -> str:
        lines = [f"write plan {self.format}:"]
        if self.decisions:
            lines.append("  decisions:")
            lines += [f"    {k}: {_show(v)}" for k, v in self.decisions.items()]
        lines.append(f"  slots: {', '.join(self.slots)}")
        lines.append(f"  files ({len(self.files)}):")
        lines += [f"    {f}" for f in self.files]
        if self.notes:
            lines.append("  notes:")
            lines += [f"    {n}" for n in self.notes]
        return "\n".join(lines)


def _show(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return repr(v)
    return repr(v) if not isinstance(v, str) else v


def make_plan(fmt: str, files, *, decisions=None, notes=(), slots=("param",), tensors=(),
              detail=None, facts: SourceFacts | None = None, parts=(),
              serial: str | None = None, quantized=None) -> WritePlan:
    """A WritePlan with its files sorted and de-duplicated."""
    return WritePlan(fmt, tuple(sorted(set(files))), dict(decisions or {}), tuple(notes),
                     tuple(slots), tuple(tensors), detail, facts, tuple(parts), serial,
                     dict(quantized or {}))


@dataclass(frozen=True)
class Part:
    """Files of an output that one worker writes alone: ``tensors`` are the (coord, name) of
    the planned tensors they hold (with their optimizer slots, unless ``weights_only``: the
    files hold the weights alone, e.g. a ZeRO checkpoint's model states, and the worker
    reads no optimizer slot for them), ``bytes`` what they weigh."""
    files: tuple[str, ...]
    tensors: frozenset
    bytes: int
    weights_only: bool = False


def parts_by_file(tensors, file_of, slots=("param",), extra_files=None) -> tuple[Part, ...]:
    """One Part per data file: ``file_of(coord, name)`` names the file a planned tensor (and
    its optimizer slots in ``slots``) goes to; ``extra_files(file)`` lists more files that
    belong with it (e.g. per-tensor files of the same rank). In the order the files first
    appear in ``tensors``."""
    from math import prod
    from mapc.runtime.backends import DTYPES
    n_slots = len([s for s in slots if s != "param"])
    groups: dict = {}
    for coord, name, shape, dt in tensors:
        f = file_of(coord, name)
        names, size = groups.get(f, (set(), 0))
        n = prod(shape)
        names.add((coord, name))
        groups[f] = (names, size + n * DTYPES[dt].itemsize + n * 4 * n_slots)
    return tuple(Part((f, *(extra_files(f) if extra_files else ())), frozenset(names), size)
                 for f, (names, size) in groups.items())


class PlannedWriter:
    """Base of the I/O-only writers: executes ``plan`` (its ``detail`` holds the format's
    decisions) in the fresh temporary directory ``tmpdir``; creates nothing before ``begin``.

    ``begin(tensors)`` receives the planned tensors, ``write(coord, name, arr)`` every weight,
    ``begin_slot(slot, tensors)`` / ``write_slot(slot, coord, name, arr)`` the optimizer slots
    in ``plan.slots``, ``finish(record)`` the ``mapc.json`` record (with the source's training
    state in ``record["training"]``); ``abort()`` releases what is open (AtomicOutput removes
    the directory)."""

    # False when write()/write_slot() are done with the array when they return (its bytes
    # written or copied): the executor then builds every shard in one reused buffer.
    keeps_arrays: bool = True
    # True when write()/write_slot() also take runtime.fastcopy.FileBytes (a tensor that is
    # ranges of source files), copying them in-kernel.
    takes_ranges: bool = False

    # The files this writer creates (None: all of the plan's), and whether it writes the
    # metadata files (those in no Part). A worker of a parallel run owns the files of its
    # Parts and writes no metadata; the process that commits then writes the metadata with a
    # writer that owns no data file. ``begin`` always receives every planned tensor; write()
    # and write_slot() only those of owned files. Only formats whose plans have ``parts``
    # are run so.
    owned: frozenset | None = None
    metadata: bool = True

    def __init__(self, tmpdir, program, plan: WritePlan):
        self.dir = Path(tmpdir)
        self.program = program
        self.plan = plan
        self.slots = plan.slots

    def owns(self, file: str) -> bool:
        """Whether this writer creates ``file`` (a path of ``plan.files``)."""
        return self.owned is None or file in self.owned

    def begin(self, tensors):
        raise NotImplementedError

    def write(self, coord, name, arr):
        raise NotImplementedError

    def begin_slot(self, slot, tensors):
        pass

    def write_slot(self, slot, coord, name, arr):
        raise NotImplementedError

    def finish(self, record: dict):
        raise NotImplementedError

    def abort(self):
        pass
