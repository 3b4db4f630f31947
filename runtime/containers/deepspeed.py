"""DeepSpeed ZeRO checkpoints (stages 1, 2 and 3; fp32 and bf16), read and written with
optimizer state, at any data-parallel size.

``latest`` names the tag directory ``global_stepN/`` holding the model states
(``mp_rank_00_model_states.pt``, or per rank ``zero_pp_rank_R_mp_rank_00_model_states.pt`` at
stage 3) and one optimizer file per data-parallel rank (``[bf16_]zero_pp_rank_R_mp_rank_00_
optim_states.pt``). Parameters keep the wrapped module's names (for a transformers model: the
``hf`` layout). Every parameter's fp32 master weights and Adam moments are rebuilt from the flat
per-rank partitions, each read lazily as the slices that hold it (a parameter may straddle
ranks). The partition formulas are in docs/formats/deepspeed.md. No DeepSpeed code is needed
or run: its pickled objects are read as inert records, and written back as the same classes
(torchfile records and calls), so DeepSpeed loads mapc's output natively.

A checkpoint of an engine trained with AutoTP (``tensor_parallel.autotp_size`` T; files of
``mp_rank`` 0..T-1) is T such checkpoints of the ranks' shards: AutoTPSource reads each with
DeepSpeedSource as mesh coordinate ``(tp=t)`` of the family's ``autotp`` layout, and the
writer at ``--tp T`` (``layout_for``) runs the same ZeRO partitioning once per rank.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np

from mapc.errors import MapcError
from mapc.runtime import torchfile
from mapc.runtime.backends import DTYPES
from mapc.runtime.containers.hf_trainer import module_order
from mapc.runtime.containers.base import MAPC_JSON, Source, write_json
from mapc.runtime.containers.zero import (ADAMW_DEFAULTS, DEEPSPEED_PICKLES, DEFAULT_SUB_GROUP_SIZE,
                                          OPTIM_SLOTS, ResumePlan, ZeroOptimizer, model_states,
                                          hyper as _hyper, plain as _plain, plan_resume)
from mapc.runtime.plan_write import (Part, PlannedWriter, SourceFacts, WritePlan, WriteRequest,
                                     ZeroFacts, make_plan, planned_tensors, stateless_targets)

LAYOUT = "hf"
SINGLE = ()
_MAX_ELEMENTS = 2**46        # as mapc.compiler.plan.MAX_ELEMENTS: a model's elements, bounded


_OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def _tag_dir(path: Path) -> Path | None:
    if not path.is_dir():
        return None
    if any(_OPTIM.match(p.name) for p in path.iterdir()):
        return path
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        return path / tag if (path / tag).is_dir() else None
    steps = sorted((p for p in path.glob("global_step*") if p.is_dir()),
                   key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    return steps[-1] if steps and any(_OPTIM.match(p.name) for p in steps[-1].iterdir()) \
        else None


def _optimizer_state(path: Path) -> dict:
    obj = torchfile.load(path, DEEPSPEED_PICKLES, expect=dict)
    osd = obj.get("optimizer_state_dict")
    if not isinstance(osd, dict):
        raise MapcError("not a DeepSpeed optimizer states file (no optimizer_state_dict)",
                        where=str(path))
    return osd


def detect(path: Path) -> bool:
    d = _tag_dir(path)
    return d is not None and any(_OPTIM.match(p.name) for p in d.iterdir())


def config_json(dirs):
    """The HF config.json in the first of ``dirs`` holding one, or None."""
    for d in dirs:
        f = Path(d) / "config.json"
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except ValueError as e:
                raise MapcError(f"corrupt config.json: {e}", where=str(f)) from None
    return None


class ModuleSource(Source):
    """What the deepspeed and universal readers share: one unsharded coordinate (the wrapped
    module's own names, ``hf`` layout), fp32 optimizer slots, ``self.module`` (name ->
    weight), ``self.shapes`` (name -> shape) and ``self.home`` (the folder errors name)."""

    layout = LAYOUT
    module_source = True      # SourceFacts.module_source: names() is the module's order

    def slots(self):
        return ["param", "master", "exp_avg", "exp_avg_sq"]

    def coords(self):
        return [SINGLE]

    def names(self, coord=SINGLE):
        # the module's own order (state_dict order) first: a writer keeps it
        return [n for n in self.module if n in self.shapes] + \
            [n for n in self.shapes if n not in self.module]

    def shape(self, name, coord=SINGLE):
        return self._known(name)

    def dtype(self, name, coord=SINGLE, slot="param"):
        self._known(name)
        if name in self.kinds:
            return self.extra_dtype.get(name) or self.module[name].dtype
        if slot == "param" and name in self.module:
            return self.module[name].dtype
        return "float32"

    # -- module tensors the optimizer does not hold ----------------------------------------------
    kinds: dict = {}
    shared: dict = {}
    extra_dtype: dict = {}

    def stateless(self, coord=SINGLE):
        return self.kinds

    def aliases(self):
        return self.shared

    def _find_stateless(self, rank_states):
        """Buffers (``buffer_names``) and frozen parameters (``frozen_param_shapes``, or any
        other module entry ``param_shapes`` lacks) of the module, with their real shapes;
        tied aliases (``shared_params``) are recorded, not listed. ``rank_states(r)`` loads
        data-parallel rank r's model states (stage 3 keeps a frozen parameter's partitions
        there, in ``frozen_param_fragments``)."""
        ms = self.model_states
        where = str(self.home)
        shared = _str_dict(ms.get("shared_params"), "shared_params", where)
        buffers = ms.get("buffer_names") or ()
        if not isinstance(buffers, (list, tuple)) or not all(isinstance(b, str) for b in buffers):
            raise MapcError("buffer_names is not a list of names", where=where,
                            hint="is the checkpoint corrupt?")
        frozen = {}
        for n, s in _str_dict(ms.get("frozen_param_shapes"), "frozen_param_shapes",
                              where, values=False).items():
            try:
                frozen[n] = tuple(int(d) for d in s)
            except (TypeError, ValueError):
                frozen[n] = None
            if frozen[n] is None or any(d < 0 for d in frozen[n]) or \
                    prod(frozen[n]) > _MAX_ELEMENTS:
                raise MapcError(f"frozen_param_shapes gives {n} the shape {s!r}", where=where,
                                hint="is the checkpoint corrupt?")
        self.kinds, self.extra_dtype, self._rank_states = {}, {}, rank_states
        self.shared = {a: t for a, t in shared.items() if t in self.shapes}
        buffers = set(buffers)
        for name, ref in self.module.items():
            if name in self.shapes or name in self.shared:
                continue
            self.kinds[name] = "buffer" if name in buffers else "frozen"
            self.shapes[name] = frozen.get(name, tuple(ref.shape))

    def _read_stateless(self, name):
        shape = self.shapes[name]
        ref = self.module[name]
        if tuple(ref.shape) == shape:
            return ref.map()
        # stage 3: each data-parallel rank's model states hold its partition of the flat param
        parts, n = [], prod(shape)
        for r in range(self.saved_ranks):
            frags = self._rank_states(r).get("frozen_param_fragments") or {}
            if name not in frags or not isinstance(frags[name], torchfile.TensorRef):
                raise MapcError(f"frozen parameter {name} has no frozen_param_fragments entry "
                                f"on data-parallel rank {r}", where=str(self.home),
                                hint="copy the complete checkpoint")
            parts.append(np.asarray(frags[name].map()).reshape(-1))
        flat = np.concatenate(parts)
        if flat.size < n:
            raise MapcError(f"the frozen_param_fragments of {name} hold {flat.size} elements, "
                            f"its shape {list(shape)} needs {n}", where=str(self.home))
        return np.ascontiguousarray(flat[:n]).reshape(shape)

    def _known(self, name):
        try:
            return self.shapes[name]
        except KeyError:
            raise MapcError(f"parameter {name} is not in the checkpoint",
                            where=str(self.home)) from None


def _str_dict(obj, what: str, where: str, values: bool = True) -> dict:
    """A model-states mapping of names (to names, when ``values``), checked."""
    obj = obj or {}
    if not hasattr(obj, "items"):
        raise MapcError(f"{what} is not a mapping", where=where, hint="is the checkpoint corrupt?")
    out = dict(obj.items())
    if not all(isinstance(k, str) and (not values or isinstance(v, str)) for k, v in out.items()):
        raise MapcError(f"{what} does not map names" + (" to names" if values else ""),
                        where=where, hint="is the checkpoint corrupt?")
    return out


def rank_model_states(source, folder: Path, r: int):
    """Data-parallel rank r's stage 3 model states in ``folder`` (loaded once)."""
    if r == 0:
        return source.model_states
    cache = source.__dict__.setdefault("_rank_states_cache", {})
    if r not in cache:
        f = Path(folder) / f"zero_pp_rank_{r}_mp_rank_{getattr(source, 'mp', 0):02d}_model_states.pt"
        if not f.is_file():
            raise MapcError(f"{f.name} is missing", where=str(folder),
                            hint="copy the complete checkpoint")
        cache[r] = torchfile.load(f, DEEPSPEED_PICKLES, expect=dict)
    return cache[r]


class _Piece:
    """Elements [start, stop) of one rank's flat tensor."""
    __slots__ = ("ref", "start", "stop")

    def __init__(self, ref, start, stop):
        self.ref, self.start, self.stop = ref, start, stop


class DeepSpeedSource(ModuleSource):
    format = "deepspeed"

    def __init__(self, path, mp: int = 0):
        """The checkpoint at ``path``; of a tensor-parallel (AutoTP) one, the files of
        tensor-parallel rank ``mp`` (its ``mp_rank_MM`` model states and optimizer files)."""
        super().__init__(path)
        self.mp = mp
        self.tag_dir = _tag_dir(self.path)
        if self.tag_dir is None:
            raise MapcError("no DeepSpeed checkpoint here (no 'latest' tag or "
                            "zero_pp_rank_*_optim_states.pt)", where=str(self.path))
        optim = {}
        for p in self.tag_dir.iterdir():
            m = _OPTIM.match(p.name)
            if m and int(m.group(3)) == mp:
                optim[int(m.group(2))] = p
        self.dp = len(optim)
        if sorted(optim) != list(range(self.dp)):
            raise MapcError(f"optimizer files for data-parallel ranks "
                            f"{sorted(set(range(max(optim) + 1)) - set(optim))} are missing",
                            where=str(self.tag_dir), hint="copy the complete checkpoint")
        if not optim:
            raise MapcError(f"no optimizer files of tensor-parallel rank {mp} "
                            f"(zero_pp_rank_*_mp_rank_{mp:02d}_optim_states.pt)",
                            where=str(self.tag_dir), hint="copy the complete checkpoint")
        model_file = self.tag_dir / f"mp_rank_{mp:02d}_model_states.pt"
        if not model_file.is_file():
            model_file = self.tag_dir / f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt"
        if not model_file.is_file():
            raise MapcError(f"no model states file (mp_rank_{mp:02d}_model_states.pt)",
                            where=str(self.tag_dir))
        self.model_file = model_file
        self.model_states = torchfile.load(model_file, DEEPSPEED_PICKLES, expect=dict)
        want = self.model_states.get("dp_world_size", self.dp)
        if want != self.dp:
            missing = [r for r in range(want) if r not in optim]
            raise MapcError(f"the checkpoint says dp_world_size={want} but has {self.dp} "
                            f"optimizer files"
                            + (f": data-parallel rank(s) {missing} are missing" if missing
                               else ""), where=str(self.tag_dir),
                            hint="copy the complete checkpoint (one "
                                 "zero_pp_rank_R_mp_rank_00_optim_states.pt per rank)")
        self.optim = [_optimizer_state(optim[r]) for r in range(self.dp)]
        first = self.optim[0]
        if "fp32_flat_groups" in first:
            self.kind = "stage3"
        elif "zero_stage" in first:
            self.kind = "zero"          # DeepSpeedZeroOptimizer, stages 1/2
        else:
            self.kind = "bf16"          # BF16_Optimizer: fp32 partitions keep their padding
        module, shapes = self.model_states.get("module") or {}, \
            self.model_states.get("param_shapes")
        if not isinstance(module, dict) or not isinstance(shapes, list) or \
                not all(isinstance(g, dict) for g in shapes):
            raise MapcError("not a DeepSpeed model-states file (module must be a state dict "
                            "and param_shapes a list of dicts)", where=str(model_file))
        self.module = dict(module)
        self.param_shapes = [dict(g) for g in shapes]
        self._index()
        self.saved_ranks = self.dp
        self._find_stateless(self._rank_model_states)
        self.topology = {}      # the tensors are unsharded (hf layout); dp is ZeRO's own
        self.config = self.record.get("config") or \
            config_json((self.tag_dir, self.path, self.path.parent))
        self.format_meta = self.config or {}

    @property
    def home(self):
        return self.tag_dir

    def _rank_model_states(self, r):
        return rank_model_states(self, self.tag_dir, r)

    # -- where every parameter lives --------------------------------------------------------
    def _index(self):
        self.pieces: dict[str, dict[str, list[_Piece]]] = {}
        self.shapes: dict[str, tuple] = {}
        self.group_of: dict[str, int] = {}
        dp = self.dp
        for g, shapes in enumerate(self.param_shapes):
            numels = [prod(s) for s in shapes.values()]
            if self.kind == "stage3":
                flats = {"master": [o["fp32_flat_groups"][g] for o in self.optim]}
                state = [o["optimizer_state_dict"]["state"][g] for o in self.optim]
            else:
                flats = {"master": [o["single_partition_of_fp32_groups"][g] for o in self.optim]}
                state = [o["base_optimizer_state"]["state"][g] for o in self.optim]
            flats["exp_avg"] = [s["exp_avg"] for s in state]
            flats["exp_avg_sq"] = [s["exp_avg_sq"] for s in state]
            total = sum(numels)
            part = -(-total // (2 * dp)) * (2 * dp) // dp        # stages 1/2: P_g
            off = 0
            for (name, shape), n in zip(shapes.items(), numels):
                self.shapes[name] = tuple(shape)
                self.group_of[name] = g
                slots = {}
                for slot, refs in flats.items():
                    if self.kind == "stage3":   # per-parameter partitions
                        pp = -(-n // dp)
                        slots[slot] = [_Piece(refs[r], off, off + min(pp, n - r * pp))
                                       for r in range(dp) if r * pp < n]
                    else:                       # the group flattened, cut in equal parts
                        slots[slot] = [_Piece(refs[r], max(off, r * part) - r * part,
                                              min(off + n, (r + 1) * part) - r * part)
                                       for r in range(dp)
                                       if max(off, r * part) < min(off + n, (r + 1) * part)]
                self.pieces[name] = slots
                off += -(-n // dp) if self.kind == "stage3" else n
        self._check_lengths()

    def _check_lengths(self):
        for name, slots in self.pieces.items():
            for slot, pieces in slots.items():
                for p in pieces:
                    if p.stop > prod(p.ref.shape):
                        raise MapcError(f"the {slot} partition holding {name} is too short "
                                        f"({prod(p.ref.shape)} elements, needs {p.stop}); the "
                                        f"optimizer files do not match param_shapes",
                                        where=str(self.tag_dir))

    def read(self, name, coord=SINGLE, slot="param"):
        shape = self._known(name)
        if name in self.kinds:
            if slot != "param":
                raise MapcError(f"internal: {self.kinds[name]} {name} has no {slot} state")
            return self._read_stateless(name)
        if slot == "param":
            ref = self.module.get(name)
            if ref is not None and tuple(ref.shape) == shape:
                return ref.map()
            # stage 3 keeps only empty placeholders in the module: use the master copy
            master = self.read(name, coord, "master")
            want = ref.dtype if ref is not None else "float32"
            return master.astype(DTYPES[want])
        parts = [np.asarray(p.ref.map()).reshape(-1)[p.start:p.stop] for p in
                 self.pieces[name][slot]]
        flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return np.ascontiguousarray(flat[:prod(shape)]).reshape(shape)

    def training_state(self) -> dict:
        ms = self.model_states
        first = self.optim[0]
        base = first["optimizer_state_dict"] if self.kind == "stage3" \
            else first["base_optimizer_state"]
        groups = []
        for g, pg in enumerate(base["param_groups"]):
            hyper = {k: v for k, v in pg.items() if k != "params"}
            hyper["params"] = list(self.param_shapes[g]) if g < len(self.param_shapes) else []
            groups.append(hyper)
        steps = [float(np.asarray(s["step"].map())) for s in base["state"].values()
                 if "step" in s]
        scaler = first.get("loss_scaler")
        return {
            "iteration": ms.get("global_steps"),
            "global_samples": ms.get("global_samples"),
            "step": steps[0] if steps else None,
            "param_groups": groups,
            "lr_scheduler": ms.get("lr_scheduler"),
            "loss_scale": getattr(scaler, "cur_scale", None) if scaler is not None else None,
            "clip_grad": first.get("clip_grad"),
            "zero_stage": first.get("zero_stage", 1 if self.kind == "bf16" else None),
            "dp_world_size": self.dp,
            "ds_config": ms.get("ds_config"),
        }

    def describe_coord(self, coord):
        return str(self.tag_dir.relative_to(self.path)) if self.tag_dir != self.path \
            else "global"

    def zero_facts(self) -> ZeroFacts:
        """SourceFacts.zero: the tag, optimizer class, rank 0's optimizer state, the trained
        parameters' shapes and the model states files a universal output carries over."""
        models = sorted(p for p in self.tag_dir.glob("*model_states.pt")
                        if not (p.name.startswith("layer_") and "_expert_" in p.name))
        return ZeroFacts(tag=self.tag_dir.name, kind=self.kind, optimizer_header=self.optim[0],
                         param_shapes=tuple(self.param_shapes), carry_files=tuple(models))


TP_LAYOUT = "autotp"


def layout_for(topology: dict) -> str:
    """The layout of a deepspeed output at ``topology``: the wrapped module's (``hf``), or
    with tensor parallelism the family's DeepSpeed AutoTP layout (``autotp``: the same names,
    each tp rank's shards)."""
    return TP_LAYOUT if (topology or {}).get("tp") not in (None, 1) else LAYOUT


def _mp_ranks(tag_dir: Path) -> list[int]:
    return sorted({int(m.group(3)) for m in map(_OPTIM.match, (p.name for p in
                                                               tag_dir.iterdir())) if m})


class AutoTPSource(Source):
    """A plain DeepSpeed engine checkpoint trained with AutoTP (``mp_world_size`` T > 1): mesh
    coordinates ``(tp,)`` of the family's ``autotp`` layout. Tensor-parallel rank t is an
    ordinary ZeRO checkpoint of its shards (``mp_rank_TT_model_states.pt``, or with ZeRO
    stage 3 ``zero_pp_rank_D_mp_rank_TT_model_states.pt``, and
    ``zero_pp_rank_D_mp_rank_TT_optim_states.pt``), read by DeepSpeedSource rank by rank."""

    format = "deepspeed"
    layout = TP_LAYOUT

    @property
    def needs_family(self) -> str:
        """Why generic mode cannot read it (compiler/resolve.py)."""
        return f"a DeepSpeed AutoTP checkpoint (mp_world_size {self.tp})"

    def __init__(self, path, ranks: list[int]):
        super().__init__(path)
        first = DeepSpeedSource(path, 0)
        self.tag_dir = first.tag_dir
        where = str(self.tag_dir)
        self.tp = first.model_states.get("mp_world_size", len(ranks))
        if not isinstance(self.tp, int) or self.tp < 1:
            raise MapcError(f"mp_world_size is {self.tp!r}", where=str(first.model_file),
                            hint="is the checkpoint corrupt?")
        if ranks != list(range(self.tp)):
            missing = sorted(set(range(self.tp)) - set(ranks))
            raise MapcError(f"the checkpoint says mp_world_size={self.tp} but has optimizer files "
                            f"of tensor-parallel ranks {ranks}"
                            + (f": rank(s) {missing} are missing" if missing else ""),
                            where=where, hint="copy the complete checkpoint")
        _check_default_sharding(first.model_states.get("ds_config"), str(first.model_file))
        dims = first.model_states.get("checkpoint_parallel_dimensions") or {}
        if hasattr(dims, "get") and (dims.get("pp_degree") or 1) != 1:
            raise MapcError("pipeline-parallel DeepSpeed checkpoints are not read here",
                            where=where, hint="a DeepSpeed pipeline (NeoX) checkpoint is read "
                                              "with --from neox")
        self.ranks = [first] + [DeepSpeedSource(path, t) for t in range(1, self.tp)]
        for r in self.ranks[1:]:
            # DeepSpeed records shared_params (a tied head) in tp rank 0's model states only;
            # the other ranks' modules hold the alias too
            for alias, target in first.shared.items():
                if r.kinds.get(alias) == "frozen" and target in r.shapes:
                    del r.kinds[alias], r.shapes[alias]
                    r.shared[alias] = target
        for t, r in enumerate(self.ranks):
            if t and r.kind != first.kind:
                raise MapcError(f"{r.model_file.name} is a {r.kind} checkpoint, "
                                f"{first.model_file.name} a {first.kind} one", where=where,
                                hint="is the checkpoint mixed from two runs?")
            if t and r.model_states.get("mp_world_size") != self.tp:
                raise MapcError(f"mp_world_size {r.model_states.get('mp_world_size')!r} differs "
                                f"from {self.tp} in {first.model_file.name}",
                                where=str(r.model_file), hint="is the checkpoint mixed from "
                                                              "two runs?")
            if t and (r.dp != first.dp or list(r.shapes) != list(first.shapes)):
                raise MapcError(f"{r.model_file.name} lists other parameters (or data-parallel "
                                f"ranks) than {first.model_file.name}", where=where,
                                hint="is the checkpoint mixed from two runs?")
        self.dp = first.dp
        self.model_states = first.model_states
        self.topology = {"tp": self.tp}
        self.record = first.record
        self.config = first.config
        self.format_meta = first.format_meta

    @property
    def home(self):
        return self.tag_dir

    def _rank(self, coord):
        return self.ranks[dict(coord).get("tp", 0)]

    def slots(self):
        return self.ranks[0].slots()

    def coords(self):
        return [(("tp", t),) for t in range(self.tp)]

    def names(self, coord=SINGLE):
        return self._rank(coord).names()

    def shape(self, name, coord=SINGLE):
        return self._rank(coord).shape(name)

    def dtype(self, name, coord=SINGLE, slot="param"):
        return self._rank(coord).dtype(name, slot=slot)

    def read(self, name, coord=SINGLE, slot="param"):
        return self._rank(coord).read(name, slot=slot)

    def stateless(self, coord=SINGLE):
        return self._rank(coord).stateless()

    def aliases(self):
        return self.ranks[0].aliases()

    def training_state(self) -> dict:
        return self.ranks[0].training_state()

    def describe_coord(self, coord):
        return f"{self.tag_dir.name}/{self._rank(coord).model_file.name}"

    def zero_facts(self) -> ZeroFacts:
        """As DeepSpeedSource's (rank 0's optimizer), with no model states to carry over:
        they hold tensor-parallel shards."""
        from dataclasses import replace
        return replace(self.ranks[0].zero_facts(), carry_files=())


def _check_default_sharding(ds_config, where: str) -> None:
    """The family's ``autotp`` layout is what DeepSpeed's AutoTP does by default (the model's
    tp_plan, near-even splits): refuse the settings that cut otherwise."""
    tpc = (ds_config or {}).get("tensor_parallel") if hasattr(ds_config, "get") else None
    if not hasattr(tpc, "get"):
        return
    inner = tpc.get("tp") or tpc.get("tensor_parallel") or {}
    grain = inner.get("tp_grain_size", 1) if hasattr(inner, "get") else 1
    why = ("tensor_parallel.partition_config (a custom cut)" if tpc.get("partition_config")
           else f"tensor_parallel.tp.tp_grain_size {grain} (MLP and head cut in grains)"
           if grain not in (None, 1)
           else "tensor_parallel.vocab_parallel_lm_head false (a tied head kept whole)"
           if tpc.get("vocab_parallel_lm_head") is False else None)
    if why:
        raise MapcError(f"this AutoTP checkpoint was trained with {why}; mapc reads DeepSpeed "
                        "AutoTP's default sharding only (the family spec's autotp layout)",
                        where=where, hint="convert the checkpoint with DeepSpeed's "
                                          "ds_to_universal instead")


def Source(path):                                          # noqa: N802 (the protocol's name)
    """A DeepSpeed engine checkpoint: data-parallel only (DeepSpeedSource), or with AutoTP
    tensor parallelism (optimizer files of ``mp_rank`` > 0: AutoTPSource)."""
    tag_dir = _tag_dir(Path(path))
    ranks = _mp_ranks(tag_dir) if tag_dir is not None else []
    if ranks and ranks != [0]:
        return AutoTPSource(path, ranks)
    return DeepSpeedSource(path)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _DeepSpeedPlan:
    """A deepspeed output's decisions: ZeRO (``resume``), the tag folder, the param groups'
    hyper-parameters and members (target names in DeepSpeed's flat order), the module's
    state_dict order, the shape of every tensor the optimizer holds, ZeRO-3 sub-group size,
    the scheduler and sample count of the model states; the tensors that stay in the module,
    outside the optimizer (``kinds``: frozen parameters and buffers), with their shapes."""
    resume: ResumePlan
    tag: str
    hyper: tuple
    members: tuple
    module_order: tuple
    shapes: dict
    sub_group_size: int
    scheduler: object
    samples: int
    kinds: dict
    all_shapes: dict
    tp: int = 1
    rank_shapes: tuple = ()     # with tp > 1: per tp rank, the optimizer tensors' shard shapes
    uc_info: dict | None = None     # with tp > 1: every rank's universal_checkpoint_info


def plan_write(program, facts: SourceFacts, request: WriteRequest) -> WritePlan:
    """A plain DeepSpeed engine checkpoint at ``dp`` ranks and a ZeRO stage (the request's,
    the source's, else 1): ``latest``, ``global_stepN/`` with the model states and one
    optimizer file per rank, ``ds_config.json``, config.json and mapc.json. With ``--tp T``
    (the family's ``autotp`` layout) every tensor-parallel rank has its own model states and
    optimizer files, as a DeepSpeed AutoTP engine saves them."""
    slots = ("param",) + OPTIM_SLOTS
    mesh = dict(getattr(program.target, "mesh", None) or {})
    tp = int(mesh.get("tp", 1)) if getattr(program.target, "name", LAYOUT) == TP_LAYOUT else 1
    if any(n != 1 for a, n in mesh.items() if a != "tp"):
        raise MapcError(f"a plain DeepSpeed engine checkpoint has no {program.target.describe()}",
                        hint="DeepSpeed AutoTP checkpoints take --tp only")
    tensors = planned_tensors(program, facts, request.dtype, slots)
    notes: list[str] = []
    ts = facts.training
    # frozen parameters and buffers stay in the module, outside the optimizer; a source that
    # does not say which tensors they are (plain weights) has integer buffers only
    kinds = stateless_targets(program, facts, tensors)
    if tp > 1 and kinds:
        raise MapcError(f"{next(iter(kinds))} has no optimizer state ({kinds[next(iter(kinds))]}"
                        "); AutoTP checkpoints of frozen parameters or buffers are not written "
                        "yet", hint="convert to deepspeed without --tp")
    rs = plan_resume(facts, request, "deepspeed",
                     {dt for _, n, _, dt in tensors if n not in kinds}, notes)
    rs = _autotp_config(rs, tp, notes)
    group_of, src_order, hyper = _plan_groups(program, facts, notes)
    group_of, src_order, hyper = _template_groups(program, facts, request.like_training or {},
                                                  group_of, src_order, hyper, notes)
    shapes, all_shapes = {}, {}
    rank_shapes = [{} for _ in range(tp)]
    for coord, name, shape, _ in tensors:
        t = dict(coord).get("tp", 0)
        if any(i for a, i in coord if a != "tp") or t >= tp:
            raise MapcError(f"internal: the deepspeed writer got a sharded tensor {name} "
                            f"at {coord}")
        rank_shapes[t][name] = tuple(shape)
        if t:
            continue
        all_shapes[name] = tuple(shape)
        if name not in kinds:
            shapes[name] = tuple(shape)
    placement = list(shapes)
    # Tensors the source's optimizer does not order (a source in another layout, or
    # without optimizer state) take the module's named_parameters() order, derived from
    # the spec's hf layout: DeepSpeed does not check the flat order on load.
    module_pos = {n: i for i, n in enumerate(module_order(placement))}
    inf = len(src_order) + len(all_shapes)
    order = sorted(placement, key=lambda n: (src_order.get(n, inf), module_pos[n]))
    # the module's state_dict order (every tensor, frozen ones and buffers too): a
    # DeepSpeed-style source's own, else named_parameters()
    src_pos = {n: i for i, n in enumerate(facts.names)} if facts.module_source else {}
    every = list(all_shapes)
    module_pos = {n: i for i, n in enumerate(module_order(every))}
    mod_order = sorted(every, key=lambda n: (src_pos.get(n, inf), module_pos[n]))
    group = {n: g for (_, n), g in group_of.items()}
    members = [[n for n in order if group[n] == g] for g in range(len(hyper))]
    for g, names in enumerate(members):
        if not names:
            raise MapcError(f"optimizer param group {g} has no tensor in the target",
                            where=facts.path,
                            hint="the source's param groups do not match its weights")
    sub_size = int((rs.cfg.get("zero_optimization") or {}).get("sub_group_size",
                                                               DEFAULT_SUB_GROUP_SIZE))
    samples = ts.get("global_samples")
    if samples is None:
        samples = rs.iteration * int(rs.cfg.get("train_batch_size") or 0)
    detail = _DeepSpeedPlan(rs, f"global_step{rs.iteration}", tuple(hyper),
                            tuple(tuple(m) for m in members), tuple(mod_order), shapes, sub_size,
                            ts.get("lr_scheduler") if facts.format == "deepspeed" else None,
                            int(samples), kinds, all_shapes, tp,
                            tuple(rank_shapes) if tp > 1 else (),
                            _autotp_info(program, rank_shapes, mod_order) if tp > 1 else None)
    decisions = {**rs.decisions(), "tag": detail.tag, "param groups": [len(m) for m in members]}
    if tp > 1:
        decisions["tensor parallel (AutoTP)"] = tp
    if kinds:
        decisions["outside the optimizer"] = {k: sum(1 for v in kinds.values() if v == k)
                                              for k in ("frozen", "buffer")}
    return make_plan("deepspeed", _files(detail, facts.has_config), decisions=decisions,
                     notes=notes, slots=slots, tensors=tensors, detail=detail,
                     parts=_parts(detail, tensors))


def _parts(d: _DeepSpeedPlan, tensors) -> tuple[Part, ...]:
    """The output's independent files (runtime/workers.py): each data-parallel rank's
    optimizer file, fed by the params with elements in that rank's flat partitions (every
    param at stage 3), and per tensor-parallel rank the model states (at stage 3 every
    rank's, fed only by the frozen parameters and buffers: the others are placeholders)."""
    rs = d.resume
    coord_of, weights = {}, {}
    for coord, name, shape, dt in tensors:
        t = dict(coord).get("tp", 0)
        coord_of[(t, name)] = coord
        weights[t] = weights.get(t, 0) + prod(shape) * DTYPES[dt].itemsize
    parts = []
    for t in range(d.tp):
        shapes = d.rank_shapes[t] if d.tp > 1 else d.shapes
        layout = ZeroOptimizer({}, [[(n, prod(shapes[n])) for n in names]
                                    for names in d.members], rs.dp, rs.stage, rs.kind,
                               d.sub_group_size)
        for r in range(rs.dp):      # fp32 master and two moments per element
            parts.append(Part((_optim_file(d, t, r),),
                              frozenset((coord_of[(t, n)], n) for n in layout.names_on(r)),
                              layout.rank_len * 12))
        if rs.stage == 3:
            held = frozenset((coord_of[(t, n)], n) for n in d.kinds)
            parts.append(Part(tuple(f"{d.tag}/zero_pp_rank_{r}_mp_rank_{t:02d}_model_states.pt"
                                    for r in range(rs.dp)), held,
                              sum(prod(d.all_shapes[n]) * 4 for _, n in held) * rs.dp,
                              weights_only=True))
        else:
            parts.append(Part((f"{d.tag}/mp_rank_{t:02d}_model_states.pt",),
                              frozenset((c, n) for (tt, n), c in coord_of.items() if tt == t),
                              weights.get(t, 0), weights_only=True))
    return tuple(parts)


def _optim_file(d: _DeepSpeedPlan, t: int, r: int) -> str:
    """Data-parallel rank r's optimizer file of tensor-parallel rank t."""
    prefix = "bf16_" if d.resume.dtype == "bfloat16" else ""
    return f"{d.tag}/{prefix}zero_pp_rank_{r}_mp_rank_{t:02d}_optim_states.pt"


def _files(d: _DeepSpeedPlan, config: bool = True) -> list[str]:
    rs = d.resume
    files = [_optim_file(d, t, r) for t in range(d.tp) for r in range(rs.dp)]
    if rs.stage == 3:      # every rank writes the same model states
        files += [f"{d.tag}/zero_pp_rank_{r}_mp_rank_{t:02d}_model_states.pt"
                  for t in range(d.tp) for r in range(rs.dp)]
    else:
        files += [f"{d.tag}/mp_rank_{t:02d}_model_states.pt" for t in range(d.tp)]
    return files + ["latest", "ds_config.json", MAPC_JSON] + (["config.json"] if config else [])


def _autotp_info(program, rank_shapes: list, order) -> dict:
    """The ``universal_checkpoint_info`` (version 0.4) a DeepSpeed AutoTP engine saves in
    every rank's model states: row-parallel, replicated and vocabulary patterns (one exact
    pattern per tensor) and the ``affine_map`` of every tensor, each rank's piece of the full
    tensor. Each tensor's class is read off its compiled recipe (universal_tp.rule_of); the
    vocabulary tensors, which DeepSpeed picks by name, are the layout's
    ``meta vocabulary_parameters``."""
    from mapc.runtime.containers import universal_tp
    tp = len(rank_shapes)
    rules = {}
    for inst, _, name in program.target.placements():
        if name not in rules:
            rules[name] = universal_tp.rule_of(inst, name)
    meta = dict(program.target.meta())
    vocab = set(meta.get("vocabulary_parameters") or ())
    row, replicated, maps = [], [], {}
    for name in order:
        rule, pattern = rules[name], "^" + re.escape(name) + "$"
        shard = list(rank_shapes[0][name])
        starts = [0] * tp            # each rank's first index along the cut (uneven splits)
        if rule.kind == "replicated":
            replicated.append(pattern)
            full = shard
        elif rule.kind == "cat" and (rule.dim == 0 or (rule.dim == 1 and len(shard) == 2)):
            if rule.dim == 1:
                row.append(pattern)
            cuts = [rank_shapes[t][name][rule.dim] for t in range(tp)]
            starts = [sum(cuts[:t]) for t in range(tp)]
            full = [sum(cuts) if a == rule.dim else d for a, d in enumerate(shard)]
        else:
            raise MapcError(f"{name} is cut over tp in a way DeepSpeed AutoTP does not "
                            f"describe ({rule.kind} on axis {rule.dim})",
                            hint="convert to deepspeed without --tp")
        strides = [int(prod(full[a + 1:])) for a in range(len(full))]
        ranks = {}
        for t in range(tp):
            shard = list(rank_shapes[t][name])
            dest = [int(prod(shard[a + 1:])) for a in range(len(shard))]
            if rule.kind == "replicated":
                piece = {"shape": list(full), "source": [0, strides], "dest": [0, dest],
                         "locations": list(range(tp))}
            else:
                piece = {"shape": list(shard),
                         "source": [starts[t] * strides[rule.dim], strides],
                         "dest": [0, dest], "locations": [t]}
            ranks[t] = {"shard_shape": list(shard), "pieces": [piece]}
        maps[pattern] = {"logical_shape": list(full), "ranks": ranks}
    info = {
        "universal_checkpoint_version": 0.4,
        "parameter_with_row_parallelism_patterns": sorted(row),
        "tp_replicated_parameter_patterns": sorted(replicated),
        "vocabulary_parameter_patterns": sorted("^" + re.escape(n) + "$" for n in order
                                                if n in vocab),
        "parameter_with_sub_params": [],
        "autotp_unsupported_parameter_patterns": {},
    }
    if meta.get("original_vocab_size") is not None and info["vocabulary_parameter_patterns"]:
        info["original_vocab_size"] = int(meta["original_vocab_size"])
    info["affine_map"] = {"version": 1, "params": maps}
    return info


def _autotp_config(rs: ResumePlan, tp: int, notes: list) -> ResumePlan:
    """The DeepSpeed config of a ``tp``-way AutoTP output (``tensor_parallel.autotp_size``),
    or of a tp=1 output of an AutoTP source (the setting dropped: the module is whole)."""
    from dataclasses import replace
    cfg = dict(rs.cfg)
    tpc = dict(cfg.get("tensor_parallel") or {})
    had = int(tpc.get("autotp_size") or 1)
    if tp > 1:
        cfg["tensor_parallel"] = {**tpc, "autotp_size": tp}
    elif had > 1:
        tpc.pop("autotp_size")
        if tpc:
            cfg["tensor_parallel"] = tpc
        else:
            cfg.pop("tensor_parallel")
        notes.append(f"the source trained with AutoTP (autotp_size {had}); the output holds "
                     f"the whole module, so ds_config.json has no autotp_size")
    else:
        return rs
    return replace(rs, cfg=cfg)


def _plan_groups(program, facts: SourceFacts, notes: list):
    """Each target tensor's param group (the source's groups, by name), the source's flat
    order of its names, and the groups' hyper-parameters."""
    groups = facts.training.get("param_groups") or []
    known = set(facts.names)
    src_order: dict[str, int] = {}
    if not groups:
        notes.append("the optimizer hyper-parameters in the DeepSpeed checkpoint are "
                     "torch AdamW's defaults (lr 1e-3, betas (0.9, 0.999), eps 1e-8, "
                     "weight_decay 0.01) in one param group; DeepSpeed's "
                     "load_checkpoint applies them to your optimizer")
        return ({(c, n): 0 for _, c, n in program.target.placements()}, src_order,
                [dict(ADAMW_DEFAULTS)])
    lists = []
    for g, pg in enumerate(groups):
        params = list(pg.get("params") or [])
        bad = [p for p in params if not isinstance(p, str) or p not in known]
        if bad:
            raise MapcError(f"the source's optimizer param group {g} lists "
                            f"{bad[0]!r}, which is not a tensor of the source: its "
                            f"training state cannot be mapped to the target",
                            where=facts.path,
                            hint="the optimizer state does not match the weights")
        lists.append(params)
    listed = {p for ps in lists for p in ps}
    missing = [n for n in facts.names if n not in listed and n not in facts.stateless_names]
    if missing:
        raise MapcError(f"{missing[0]} is in no optimizer param group of the source "
                        f"({len(missing)} such tensors): its training state cannot be "
                        f"mapped to the target", where=facts.path)
    for ps in lists:
        for p in ps:
            src_order.setdefault(p, len(src_order))
    return program.target_groups(lists), src_order, [_hyper(pg) for pg in groups]


def _template_groups(program, facts, tmpl: dict, group_of, src_order, hyper, notes):
    """--like: the template's param groups (target names, in its flat order) decide
    membership and order; hyper-parameters stay the source's when it has as many groups."""
    groups = tmpl.get("param_groups") or []
    if not groups:
        return group_of, src_order, hyper
    targets = {(c, n) for _, c, n in program.target.placements()}
    group_of, order = {}, {}
    for g, pg in enumerate(groups):
        for name in pg.get("params") or []:
            group_of[((), name)] = g
            order.setdefault(name, len(order))
    if set(group_of) != targets:
        odd = sorted(n for _, n in set(group_of) ^ targets)
        raise MapcError(f"the template's optimizer param groups do not list the model's "
                        f"tensors exactly (e.g. {odd[0]})",
                        hint="use a template holding the same model")
    if len(hyper) != len(groups):
        hyper = [_hyper(pg) for pg in groups]
        notes.append(f"the template has {len(groups)} param groups, the source "
                     f"{len(facts.training.get('param_groups') or []) or 'none'}: the "
                     f"template's hyper-parameters (lr, weight decay, ...) are used")
    return group_of, order, hyper


class DeepSpeedWriter(PlannedWriter):
    """Writes a plain DeepSpeed engine checkpoint as planned (``_DeepSpeedPlan``).

    Every arriving optimizer tensor (fp32 master, Adam moments) is written at once, with
    ``pwrite``, into its pieces' final places in the data-parallel ranks' ``.pt`` files, laid
    out in ``begin`` (runtime/containers/zero.py); ``finish`` adds each rank's step, pickle
    and zip directory. The module weights go straight into the model states file as they
    arrive. Resident memory: the tensor being written.
    """

    def __init__(self, tmpdir, program, plan):
        super().__init__(tmpdir, program, plan)
        self.incoming: set[str] = set()
        self.model_writer = self.zero = None
        self.ranks: list = []      # with tp > 1: per tp rank (ZeroOptimizer, TorchWriter, module)

    def _zero(self, t: int, shapes: dict) -> ZeroOptimizer:
        """Tensor-parallel rank t's ZeRO optimizer, laying out the optimizer files of the
        data-parallel ranks this writer owns (a worker of a parallel run: its own)."""
        d: _DeepSpeedPlan = self.plan.detail
        rs = d.resume
        files = {r: self.dir / _optim_file(d, t, r) for r in range(rs.dp)
                 if self.owns(_optim_file(d, t, r))}
        return ZeroOptimizer(files,
                             [[(n, prod(shapes[n])) for n in names] for names in d.members],
                             rs.dp, rs.stage, rs.kind, d.sub_group_size)

    def begin(self, tensors):
        d: _DeepSpeedPlan = self.plan.detail
        rs = d.resume
        self.tag_dir = self.dir / d.tag
        self.tag_dir.mkdir(exist_ok=True)        # the workers of a parallel run share it
        if d.tp > 1:          # AutoTP: every tp rank is a ZeRO checkpoint of its shards
            for t in range(d.tp):
                name = (f"zero_pp_rank_0_mp_rank_{t:02d}_model_states.pt" if rs.stage == 3
                        else f"mp_rank_{t:02d}_model_states.pt")
                writer = torchfile.TorchWriter(self.tag_dir / name) \
                    if self.owns(f"{d.tag}/{name}") else None
                module = {}
                if writer is not None and rs.stage == 3:  # the weights: in the optimizer files
                    empty = np.zeros((0,), DTYPES[rs.dtype])
                    module = {n: writer.add_tensor(empty) for names in d.members for n in names}
                self.ranks.append((self._zero(t, d.rank_shapes[t]), writer, module))
            self.zero, self.model_writer, self.module = self.ranks[0]
            return
        self.zero = self._zero(0, d.shapes)
        model_name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if rs.stage == 3 \
            else "mp_rank_00_model_states.pt"
        self.module = {}
        self.held = {}     # stage 3: frozen params and buffers, for every rank's model states
        if not self.owns(f"{d.tag}/{model_name}"):
            return                                # another worker writes the model states
        self.model_writer = torchfile.TorchWriter(self.tag_dir / model_name)
        if rs.stage == 3:   # the weights live in the optimizer files; the module: placeholders
            empty = np.zeros((0,), DTYPES[rs.dtype])
            for names in d.members:
                for n in names:
                    self.module[n] = self.model_writer.add_tensor(empty)

    def begin_slot(self, slot, tensors):
        self.incoming.add(slot)

    def write(self, coord, name, arr):
        if self.ranks:
            zero, writer, module = self.ranks[dict(coord).get("tp", 0)]
            if writer is not None and self.plan.detail.resume.stage != 3:
                module[name] = writer.add_tensor(np.require(arr, requirements="C"))
            if "master" not in self.incoming and zero.ranks:
                zero.scatter("master", name, np.asarray(arr).astype(np.float32))
            return
        kinds = self.plan.detail.kinds
        stage3 = self.plan.detail.resume.stage == 3
        if name in kinds:
            if self.model_writer is None:
                return
            arr = np.require(arr, requirements="C")      # keeps 0-d shapes
            if stage3:
                self.held[name] = arr
                if kinds[name] == "frozen":    # partitioned like every stage 3 param
                    arr = np.zeros((0,), arr.dtype)
            self.module[name] = self.model_writer.add_tensor(arr)
            return
        if not stage3 and self.model_writer is not None:
            self.module[name] = self.model_writer.add_tensor(np.require(arr, requirements="C"))
        if "master" not in self.incoming and self.zero.ranks:
            self.zero.scatter("master", name, np.asarray(arr).astype(np.float32))

    def write_slot(self, slot, coord, name, arr):
        zero = self.ranks[dict(coord).get("tp", 0)][0] if self.ranks else self.zero
        if zero.ranks:
            zero.scatter(slot, name, np.asarray(arr, dtype=np.float32))

    def finish(self, record: dict):
        d: _DeepSpeedPlan = self.plan.detail
        rs = d.resume
        if self.ranks:
            self._finish_autotp()
        else:
            self._finish_dp()
        if not self.metadata:
            return
        (self.dir / "latest").write_text(d.tag)
        write_json(self.dir / "ds_config.json", rs.cfg)
        if "config.json" in self.plan.files:        # generic mode may have no model config
            write_json(self.dir / "config.json", record.get("config") or {})
        write_json(self.dir / MAPC_JSON, record)

    def _finish_autotp(self):
        """Each tp rank's optimizer files and model states (DeepSpeed AutoTP's layout:
        ``mp_world_size`` T and ``checkpoint_parallel_dimensions`` tp_degree T)."""
        d: _DeepSpeedPlan = self.plan.detail
        rs = d.resume
        for t, (zero, writer, module) in enumerate(self.ranks):
            for r in sorted(zero.ranks):
                zero.write_rank(r, hyper_params=list(d.hyper),
                                step=rs.step, clip=rs.clip, scale=rs.scale, ds_config=rs.cfg)
            zero.remove()
            if writer is None:
                continue
            missing = [n for n in d.module_order if n not in module]
            if missing:
                raise MapcError(f"internal: no weights were written for {missing[0]} at tp={t}")
            ms = model_states(module, list(d.module_order), self.program.target.aliases,
                              zero.param_shapes(d.rank_shapes[t]), rs.stage,
                              scheduler=d.scheduler, steps=rs.iteration, samples=d.samples,
                              dp=rs.dp, ds_config=rs.cfg)
            if t:      # DeepSpeed records a tied head's shared_params on tp rank 0 only
                ms["shared_params"] = {}
            ms["mp_world_size"] = d.tp
            ms["checkpoint_parallel_dimensions"] = {"pp_degree": 1, "tp_degree": d.tp}
            ms["universal_checkpoint_info"] = d.uc_info
            writer.finish(ms)
            if rs.stage == 3:   # every data-parallel rank writes the same model states
                first = self.tag_dir / f"zero_pp_rank_0_mp_rank_{t:02d}_model_states.pt"
                for r in range(1, rs.dp):
                    shutil.copyfile(first, self.tag_dir /
                                    f"zero_pp_rank_{r}_mp_rank_{t:02d}_model_states.pt")

    def _finish_dp(self):
        d: _DeepSpeedPlan = self.plan.detail
        rs = d.resume
        for r in sorted(self.zero.ranks):
            self.zero.write_rank(r, hyper_params=list(d.hyper),
                                 step=rs.step, clip=rs.clip, scale=rs.scale, ds_config=rs.cfg)
        self.zero.remove()
        if self.model_writer is not None:
            self._model_states()

    def _model_states(self):
        d: _DeepSpeedPlan = self.plan.detail
        rs = d.resume
        missing = [n for n in d.module_order if n not in self.module]
        if missing:
            raise MapcError(f"internal: no weights were written for {missing[0]}")
        stage3 = rs.stage == 3
        buffers = [n for n, k in d.kinds.items() if k == "buffer"]
        frozen = {n: d.all_shapes[n] for n in d.module_order if d.kinds.get(n) == "frozen"}

        def states(writer, module, r):
            fragments = {}
            for n in frozen:
                if not stage3:
                    fragments[n] = module[n]
                    continue
                flat = self.held[n].reshape(-1)      # rank r's partition, zero-padded
                part = -(-flat.size // rs.dp)
                piece = np.zeros(part, flat.dtype)
                mine = flat[r * part:(r + 1) * part]
                piece[:mine.size] = mine
                fragments[n] = writer.add_tensor(piece)
            return model_states(module, list(d.module_order), self.program.target.aliases,
                                self.zero.param_shapes(d.shapes), rs.stage,
                                scheduler=d.scheduler, steps=rs.iteration, samples=d.samples,
                                dp=rs.dp, ds_config=rs.cfg, buffers=buffers, frozen=frozen,
                                fragments=fragments)
        self.model_writer.finish(states(self.model_writer, self.module, 0))
        if stage3:   # every rank writes the same model states, but for its frozen partitions
            first = self.tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"
            for r in range(1, rs.dp):
                path = self.tag_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"
                if not frozen:
                    shutil.copyfile(first, path)
                    continue
                with torchfile.TorchWriter(path) as w:
                    module = {n: w.add_tensor(self.held[n] if d.kinds.get(n) == "buffer"
                                              else np.zeros((0,), DTYPES[rs.dtype] if n not in
                                                            self.held else self.held[n].dtype))
                              for n in d.module_order}
                    w.finish(states(w, module, r))

    def abort(self):
        for zero, writer, _ in self.ranks[1:]:
            if writer is not None:
                writer.abort()
            zero.remove()
        if self.model_writer is not None:
            self.model_writer.abort()
        if self.zero is not None:
            self.zero.remove()


Writer = DeepSpeedWriter
