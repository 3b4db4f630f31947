"""DeepSpeed "universal" checkpoints: one folder per parameter with its full fp32 master
weights and Adam moments, loadable by DeepSpeed at any data-parallel size and ZeRO stage 1/2
(or 3, when written for stage 3) with ``"checkpoint": {"load_universal": true}``.

A load directory holds ``latest_universal`` naming ``<tag>_universal/``, which holds the model
states file(s) and ``zero/``::

    zero/optimizer_state.pt                 loss scaler, clip_grad, zero_stage, param_groups, ...
    zero/<param>/fp32.pt, exp_avg.pt, exp_avg_sq.pt   stage 1/2: {"cat_dim": 0, "param": T}
    zero/<param>/step.pt                    stage 1/2 only: the 0-d step tensor
                                            stage 3: each file is the bare flat tensor

What mapc writes is what ``python -m deepspeed.checkpoint.ds_to_universal
--inject_missing_state`` writes for the same source (docs/formats/deepspeed.md section 9),
without needing ``universal_checkpoint_info`` in the source and one parameter at a time.
Parameters keep the wrapped module's names (a transformers model: the ``hf`` layout).
DeepSpeed's classes are pickled and read as inert records (runtime/torchfile.py); neither
torch nor DeepSpeed is imported.
"""
from __future__ import annotations

import math
import shutil
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mapc.errors import MapcError
from mapc.runtime import torchfile
from mapc.runtime.backends import DTYPES
from mapc.runtime.fastcopy import Scratch, release
from mapc.runtime.containers import deepspeed as _ds   # its pickle globals and ModuleSource
from mapc.runtime.containers import universal_tp as _tp
from mapc.runtime.containers.zero import (LossScaler as _LOSS_SCALER, ResumePlan,
                                          model_states, partition_size, plan_resume,
                                          stage12_header, torch_size,
                                          zero_stage as _zero_stage_value, DEEPSPEED_PICKLES)
from mapc.runtime.containers.base import MAPC_JSON, Source as _BaseSource, read_record, write_json
from mapc.runtime.plan_write import (Part, PlannedWriter, SourceFacts, WritePlan, WriteRequest,
                                     ZeroFacts, make_plan, planned_tensors, stateless_targets)

LAYOUT = "hf"
SINGLE = ()
LATEST = "latest_universal"

_IN_FLIGHT = 4           # per-parameter files queued for the writer threads
_PIECE = 64 << 20        # bytes of float32 converted and written at a time (_write_f32)
_STATE_FILES = {"master": "fp32", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}


def _write_f32(w, ph, arr, places, scratch) -> None:
    """Write ``arr`` as float32 into the reserved tensor ``ph`` of TorchWriter ``w`` at
    ``places`` (universal_tp.Rule.places), ``_PIECE`` bytes of rows of its axis 0 at a time:
    one piece is cast at once (into ``scratch``, a fastcopy.Scratch reused for every piece),
    so neither a whole tensor nor a whole slice of one is ever held as float32, and the pages
    of a mapped source are let go once read (fastcopy.release). A float32 piece that is a
    range of a source file is copied in-kernel (TorchWriter.fill)."""
    if arr.size == 0:
        return
    if arr.ndim == 0:
        arr = arr.reshape(1)
    inner = math.prod(arr.shape[1:])
    per = max(1, _PIECE // (4 * inner))           # rows of axis 0 per piece
    for lo, hi, at, seg, stride in places:
        runs = inner // seg                        # runs of seg elements per row
        for r in range(lo, hi, per):
            rows = arr[r:min(hi, r + per)]
            block = scratch.materialize(rows, np.float32).reshape(-1, seg)
            w.fill(ph, (at + (r - lo) * runs * stride) * 4, block,
                   stride=stride * 4 if stride != seg else None)
            release(rows)                 # a mapped source: its pages read, not kept


# ---- finding the folder ------------------------------------------------------------------------
def _universal_dir(path: Path) -> Path | None:
    """The ``<tag>_universal`` folder: ``path`` itself, or the one ``path/latest_universal``
    names."""
    if not path.is_dir():
        return None
    if (path / "zero").is_dir() and any(path.glob("*model_states.pt")):
        return path
    latest = path / LATEST
    if latest.is_file():
        d = path / latest.read_text().strip()
        if d.is_dir() and (d / "zero").is_dir():
            return d
    return None


def detect(path: Path) -> bool:
    return _universal_dir(Path(path)) is not None


def _load(path: Path, what: str):
    if not path.is_file():
        raise MapcError(f"{path.name} ({what}) is missing", where=str(path.parent),
                        hint="copy the complete universal checkpoint (or convert it again)")
    return torchfile.load(path, DEEPSPEED_PICKLES)


# ---- reading -------------------------------------------------------------------------------------
class UniversalSource(_ds.ModuleSource):
    format = "universal"

    def __init__(self, path):
        super().__init__(path)
        self.udir = _universal_dir(self.path)
        if self.udir is None:
            raise MapcError("no DeepSpeed universal checkpoint here (no latest_universal, or "
                            "no <tag>_universal/zero/ folder)", where=str(self.path))
        if not self.record and self.udir != self.path:
            self.record = read_record(self.udir.parent)
        self.zero = self.udir / "zero"
        models = sorted(self.udir.glob("*model_states.pt"))
        main = self.udir / "mp_rank_00_model_states.pt"
        self.stage3 = not main.is_file()
        if self.stage3:
            main = self.udir / "zero_pp_rank_0_mp_rank_00_model_states.pt"
            if not main.is_file():
                raise MapcError("no model states file (mp_rank_00_model_states.pt or "
                                "zero_pp_rank_0_mp_rank_00_model_states.pt)", where=str(self.udir))
        self.model_state_files = models
        self.model_states = torchfile.load(main, DEEPSPEED_PICKLES, expect=dict)
        self.optim = _load(self.zero / "optimizer_state.pt", "the optimizer state")
        self.module = dict(self.model_states.get("module") or {})
        self.param_shapes = [dict(g) for g in self.model_states.get("param_shapes") or []]
        self.shapes: dict[str, tuple] = {}
        for g in self.param_shapes:
            for name, shape in g.items():
                self.shapes[name] = tuple(int(s) for s in shape)
        self.saved_ranks = int(self.model_states.get("dp_world_size") or 1)
        if not 1 <= self.saved_ranks <= 2**16:
            raise MapcError(f"dp_world_size {self.saved_ranks} is not a data-parallel size",
                            where=str(self.udir), hint="is the checkpoint corrupt?")
        self._find_stateless(lambda r: _ds.rank_model_states(self, self.udir, r))
        for name in self.shapes:
            if name in self.kinds:          # buffers and frozen params live in the module
                continue
            if not (self.zero / name).is_dir():
                raise MapcError(f"zero/{name}/ is missing (the model states list {name})",
                                where=str(self.udir), hint="copy the complete checkpoint")
        self.config = self.record.get("config") or \
            _ds.config_json((self.udir, self.udir.parent, self.udir.parent.parent))
        self.format_meta = self.config or {}
        self.saved_dp = self.model_states.get("dp_world_size")   # loads at any dp

    @property
    def home(self):
        return self.udir

    def _state(self, name, slot):
        f = self.zero / name / f"{_STATE_FILES[slot]}.pt"
        obj = _load(f, f"the {slot} state of {name}")
        ref = obj.get("param") if isinstance(obj, dict) else obj
        shape = self.shapes[name]
        if not isinstance(ref, torchfile.TensorRef) or ref.numel != math.prod(shape):
            got = f"{ref.numel} elements" if isinstance(ref, torchfile.TensorRef) \
                else type(ref).__name__
            raise MapcError(f"holds {got}, expected a tensor of shape {list(shape)} for {name}",
                            where=str(f), hint="the universal checkpoint is corrupt; convert "
                                               "it again")
        if ref.dtype != "float32":
            raise MapcError(f"has dtype {ref.dtype}, expected float32", where=str(f))
        try:
            return ref.read().reshape(shape)
        except (OSError, ValueError) as e:
            raise MapcError(f"cannot read the tensor data ({e})", where=str(f)) from None

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
            master = self._state(name, "master")   # stage 3 keeps empty placeholders
            want = ref.dtype if ref is not None else "float32"
            return master.astype(DTYPES[want])
        return self._state(name, slot)

    def training_state(self) -> dict:
        ms, osd = self.model_states, self.optim
        groups = []
        for pg in osd.get("param_groups") or []:
            hyper = {k: v for k, v in pg.items() if k != "params"}
            hyper["params"] = [n for s in pg.get("params", []) if isinstance(s, int)
                               and s < len(self.param_shapes) for n in self.param_shapes[s]]
            groups.append(hyper)
        step = None
        if self.stage3:
            inner = osd.get("optimizer_state_dict") or {}
            state = (inner.get("state") or {}).get(0) or {}
            if "step" in state:
                step = _scalar(state["step"])
        else:
            step = self._step()
        scaler = osd.get("loss_scaler")
        zs = osd.get("zero_stage")
        return {
            "iteration": ms.get("global_steps"),
            "global_samples": ms.get("global_samples"),
            "step": step,
            "param_groups": groups,
            "lr_scheduler": ms.get("lr_scheduler"),
            "loss_scale": getattr(scaler, "cur_scale", None) if scaler is not None else None,
            "clip_grad": osd.get("clip_grad"),
            "zero_stage": int(zs) if zs is not None else (3 if self.stage3 else 1),
            "dp_world_size": ms.get("dp_world_size"),
            "ds_config": ms.get("ds_config"),
        }

    def _step(self):
        """The optimizer step of stage 1/2: every parameter's ``step.pt`` is read (each is the
        same 0-d tensor), so a truncated or disagreeing one is refused, not skipped."""
        step, first = None, None
        for name in self.shapes:
            f = self.zero / name / "step.pt"
            if not f.is_file():
                continue
            obj = torchfile.load(f, DEEPSPEED_PICKLES)
            try:
                value = _scalar(obj)
            except (OSError, ValueError, TypeError, IndexError) as e:
                raise MapcError(f"not a step tensor ({e})", where=str(f),
                                hint="the universal checkpoint is corrupt; convert it again") \
                    from None
            if step is None:
                step, first = value, f
            elif value != step:
                raise MapcError(f"step {value:g} differs from {step:g} in {first}",
                                where=str(f), hint="the universal checkpoint is corrupt "
                                                   "(mixed from two runs?); convert it again")
        return step

    def describe_coord(self, coord):
        return self.udir.name

    def zero_facts(self) -> ZeroFacts:
        """SourceFacts.zero: the tag (the folder name without ``_universal``), the optimizer
        state, the trained parameters' shapes and the model states files carried over."""
        name = self.udir.name
        tag = name[:-len("_universal")] if name.endswith("_universal") else None
        return ZeroFacts(tag=tag, kind="stage3" if self.stage3 else None,
                         optimizer_header=self.optim, param_shapes=tuple(self.param_shapes),
                         carry_files=tuple(self.model_state_files))


def _scalar(x):
    if isinstance(x, torchfile.TensorRef):
        return float(np.asarray(x.read()).reshape(-1)[0])
    return float(x)


class ModelParallelUniversalSource(UniversalSource):
    """A universal checkpoint with ``mp_world_size`` > 1 (runtime/containers/universal_tp.py):
    mesh coordinates ``(tp, pp)``, one ``mp_rank_MM_model_states.pt`` per rank, MM = pp * tp +
    tp rank (DeepSpeed's model-parallel rank, pipeline-major). Without pipeline parallelism the
    tensors are the family's ``megatron`` layout; with DeepSpeed pipeline names in zero/
    (``<position>.<key>``, ``tied_modules.<key>``: Megatron-DeepSpeed's GPTModelPipe) its
    ``megatron_pipe`` layout. Weights come from each rank's model states, or, where a
    pipeline engine kept none there (``module`` is None), from zero/; the optimizer slots are
    cut from the full tensors in ``zero/`` by each file's own keys, as DeepSpeed's loader
    cuts them."""

    layout = _tp.LAYOUT
    module_source = False

    @property
    def needs_family(self) -> str:
        """Why generic mode cannot read it (compiler/resolve.py)."""
        if self.pp == 1:
            return f"a tensor-parallel universal checkpoint (mp_world_size {self.tp})"
        return f"a model-parallel universal checkpoint (tp {self.tp}, pp {self.pp})"

    def __init__(self, path, udir: Path, main: dict):
        _BaseSource.__init__(self, path)
        self.udir, self.zero, self.stage3 = udir, udir / "zero", False
        if not self.record and udir != self.path:
            self.record = read_record(udir.parent)
        mp = _tp.tp_of(main, udir)
        self.tp, self.pp = _tp.tp_pp_of(main, mp, str(udir / _tp.rank_file(0)))
        if any(udir.glob("mp_rank_*_*_model_states.pt")):
            raise MapcError("Megatron-style mp_rank_TT_PPP model states in a universal "
                            "checkpoint are not read", where=str(udir),
                            hint="DeepSpeed's universal checkpoints name one "
                                 "mp_rank_MM_model_states.pt per model-parallel rank")
        self.info = _tp.check_info(main.get("universal_checkpoint_info"),
                                   str(udir / _tp.rank_file(0)))
        ranks = [main]
        for m in range(1, mp):
            f = udir / _tp.rank_file(m)
            if not f.is_file():
                raise MapcError(f"{f.name} is missing (mp_world_size is {mp})",
                                where=str(udir), hint="copy the complete checkpoint")
            ms = torchfile.load(f, DEEPSPEED_PICKLES, expect=dict)
            if ms.get("mp_world_size", 1) != mp:
                raise MapcError(f"mp_world_size {ms.get('mp_world_size')!r} differs from "
                                f"{mp} in {_tp.rank_file(0)}", where=str(f),
                                hint="is the checkpoint mixed from two runs?")
            ranks.append(ms)
        self.model_state_files = [udir / _tp.rank_file(m) for m in range(mp)]
        self.modules, self.rank_shapes = [], []
        for m, ms in enumerate(ranks):
            module = dict(ms.get("module") or {})
            shapes = OrderedDict()
            for g in ms.get("param_shapes") or []:
                for n, sh in dict(g).items():
                    shapes[n] = tuple(int(d) for d in sh)
            extra = [n for n in module if n not in shapes]
            if extra:
                raise MapcError(f"module entries outside the optimizer ({extra[0]}) in a "
                                "model-parallel universal checkpoint are not read yet",
                                where=str(self.model_state_files[m]))
            first = m - m % self.tp                    # tp rank 0 of the same stage
            if m != first and list(shapes) != list(self.rank_shapes[first]):
                raise MapcError(f"{self.model_state_files[m].name} lists other parameters "
                                f"than {_tp.rank_file(first)}", where=str(udir),
                                hint="is the checkpoint mixed from two runs?")
            self.modules.append(module)
            self.rank_shapes.append(shapes)
        self.model_states = main
        self.module = self.modules[0]
        # every stage's param groups, stage by stage (each stage's engine has them all)
        self.param_shapes = []
        for m in range(0, mp, self.tp):
            for g, group in enumerate(ranks[m].get("param_shapes") or []):
                if g == len(self.param_shapes):
                    self.param_shapes.append({})
                self.param_shapes[g].update(dict(group))
        self.shapes = {}                                # every name (_step lists them)
        for shapes in self.rank_shapes:
            self.shapes.update(shapes)
        if self.pp > 1 or any(_tp.pipeline_name(n) for n in self.shapes):
            self.layout = _tp.PIPE_LAYOUT
        for name in self.shapes:
            if not (self.zero / name).is_dir():
                raise MapcError(f"zero/{name}/ is missing (the model states list {name})",
                                where=str(udir), hint="copy the complete checkpoint")
        self.optim = _load(self.zero / "optimizer_state.pt", "the optimizer state")
        self.saved_ranks = int(main.get("dp_world_size") or 1)
        self.saved_dp = main.get("dp_world_size")
        self.topology = {"tp": self.tp, "pp": self.pp}
        self.config = self.record.get("config") or \
            _ds.config_json((udir, udir.parent, udir.parent.parent))
        args = main.get("args")              # Megatron-DeepSpeed's args (a Namespace)
        self.format_meta = dict(args.items()) if hasattr(args, "items") else {}
        self.kinds, self.shared = {}, {}

    def coords(self):
        return [(("tp", t), ("pp", p)) for p in range(self.pp) for t in range(self.tp)]

    def _rank(self, coord) -> int:
        """The model-parallel rank of ``coord``: its mp_rank file's number."""
        c = dict(coord)
        return c.get("pp", 0) * self.tp + c.get("tp", 0)

    def names(self, coord=SINGLE):
        return list(self.rank_shapes[self._rank(coord)])

    def shape(self, name, coord=SINGLE):
        try:
            return self.rank_shapes[self._rank(coord)][name]
        except KeyError:
            raise MapcError(f"parameter {name} is not in {_tp.rank_file(self._rank(coord))}",
                            where=str(self.udir)) from None

    def dtype(self, name, coord=SINGLE, slot="param"):
        self.shape(name, coord)
        ref = self.modules[self._rank(coord)].get(name)
        return ref.dtype if slot == "param" and ref is not None else "float32"

    def read(self, name, coord=SINGLE, slot="param"):
        shape, m = self.shape(name, coord), self._rank(coord)
        ref = self.modules[m].get(name)
        if slot == "param" and ref is not None and tuple(ref.shape) == shape:
            return ref.map()
        arr = self._tp_state(name, "master" if slot == "param" else slot, shape,
                             dict(coord).get("tp", 0))
        return arr.astype(DTYPES[ref.dtype if ref is not None else "float32"]) \
            if slot == "param" else arr

    def _tp_state(self, name, slot, shape, t):
        f = self.zero / name / f"{_STATE_FILES[slot]}.pt"
        obj = _load(f, f"the {slot} state of {name}")
        ref = obj.get("param") if isinstance(obj, dict) else None
        n = math.prod(shape)
        if not isinstance(ref, torchfile.TensorRef) or ref.dtype != "float32" or \
                ref.numel > n * self.tp:
            got = f"{ref.numel} {ref.dtype} elements" if isinstance(ref, torchfile.TensorRef) \
                else type(ref).__name__
            raise MapcError(f"holds {got}, expected up to {self.tp} ranks of float32 "
                            f"{list(shape)} for {name}", where=str(f),
                            hint="the universal checkpoint is corrupt; convert it again")
        _tp.check_file(self.info, name, obj, str(f))
        try:                  # mapped, not read: only this rank's slice is copied out of it
            full = ref.map().reshape(tuple(ref.shape))
            return np.array(_tp.tp_slice(full, obj, shape, t, self.tp, str(f)), order="C")
        except (OSError, ValueError) as e:
            raise MapcError(f"cannot read the tensor data ({e})", where=str(f)) from None

    def _state(self, name, slot):
        raise MapcError(f"internal: {name} of a model-parallel universal checkpoint is read "
                        "per rank")

    def describe_coord(self, coord):
        return f"{self.udir.name}/{_tp.rank_file(self._rank(coord))}"

    def zero_facts(self) -> ZeroFacts:
        """As UniversalSource's, with no model states to carry over (they hold TP shards)."""
        return replace(super().zero_facts(), carry_files=())


def Source(path):                                          # noqa: N802 (the protocol's name)
    """A universal checkpoint: of a data-parallel run (UniversalSource), or of a
    model-parallel one (``mp_world_size`` > 1: ModelParallelUniversalSource)."""
    udir = _universal_dir(Path(path))
    main = udir / "mp_rank_00_model_states.pt" if udir is not None else None
    if main is not None and main.is_file():
        states = torchfile.load(main, DEEPSPEED_PICKLES, expect=dict)
        if _tp.tp_of(states, udir) > 1:
            return ModelParallelUniversalSource(path, udir, states)
    return UniversalSource(path)


# ---- writing -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _UniversalPlan:
    """A universal output's decisions: ZeRO (``resume``), the tag, the source's model states
    files carried over (empty: built), the tensors the optimizer does not hold (``kinds``:
    frozen parameters and buffers, in the module only), the tied aliases of every target
    name (``tied``), each target tensor's param group, every tensor's shape and dtype."""
    resume: ResumePlan
    tag: str
    carry: tuple
    kinds: dict
    tied: dict
    groups: dict | None
    shapes: dict
    dtypes: dict


def plan_write(program, facts: SourceFacts, request: WriteRequest) -> WritePlan:
    """``latest_universal`` and ``<tag>_universal/``: the model states (carried over from a
    DeepSpeed-family source, else built), ``zero/optimizer_state.pt`` and per parameter
    ``zero/<name>/{fp32,exp_avg,exp_avg_sq[,step]}.pt``; config.json and mapc.json."""
    slots = ("param", "master", "exp_avg", "exp_avg_sq")
    if program.target.name != LAYOUT:             # --tp: the family's megatron layout
        return _plan_write_tp(program, facts, request, slots)
    tensors = planned_tensors(program, facts, request.dtype, slots)
    for _, name, _, _ in tensors:
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise MapcError(f"parameter name {name!r} cannot be a folder name in zero/")
    # frozen parameters and buffers: in the module only (ds_to_universal writes no optimizer
    # state for them); a source that does not say has integer buffers only
    kinds = stateless_targets(program, facts, tensors)
    tied: dict[str, tuple] = {}
    for alias, target in program.target.aliases.items():
        if not alias or "/" in alias or "\0" in alias or alias in (".", ".."):
            raise MapcError(f"parameter name {alias!r} cannot be a folder name in zero/")
        tied[target] = tied.get(target, ()) + (alias,)
    notes: list[str] = []
    zf = facts.zero
    carry = tuple(zf.carry_files) if zf is not None else ()
    rs = plan_resume(facts, request, "universal",
                     {dt for _, n, _, dt in tensors if n not in kinds}, notes)
    it = facts.training.get("iteration")
    tag = f"global_step{int(it) if it is not None else 0}"
    if zf is not None and zf.tag and facts.format in ("deepspeed", "universal"):
        tag = zf.tag
    pgs = facts.training.get("param_groups") or []
    src = [list(pg.get("params") or []) for pg in pgs]
    groups = program.target_groups(src) if src else None
    detail = _UniversalPlan(rs, tag, carry, kinds, tied, groups,
                            {n: tuple(s) for _, n, s, _ in tensors},
                            {n: dt for _, n, _, dt in tensors})
    udir = f"{tag}_universal"
    files = [LATEST, MAPC_JSON, f"{udir}/zero/optimizer_state.pt"] + \
        (["config.json"] if facts.has_config else [])
    if carry:
        files += [f"{udir}/{f.name}" for f in carry]
    else:
        files += [f"{udir}/{_model_file(rs.stage, r)}"
                  for r in range(rs.dp if rs.stage == 3 else 1)]
    for _, name, _, _ in tensors:
        if rs.stage != 3:
            # ds_to_universal (stages 1/2) saves every module entry the optimizer does not
            # hold, buffers, frozen and tied names too, as zero/<name>/fp32.pt
            files += [f"{udir}/zero/{a}/fp32.pt"
                      for a in ([name] if name in kinds else []) + list(tied.get(name, ()))]
        if name in kinds:
            continue
        files += [f"{udir}/zero/{name}/{k}.pt" for k in ("fp32", "exp_avg", "exp_avg_sq")]
        if rs.stage != 3:
            files.append(f"{udir}/zero/{name}/step.pt")
    decisions = {**rs.decisions(), "tag": tag,
                 "model states": "carried over from the source" if carry else "built"}
    if kinds:
        decisions["outside the optimizer"] = {k: sum(1 for v in kinds.values() if v == k)
                                              for k in ("frozen", "buffer")}
    for key in ("source dp", "optimizer class", "training dtype"):
        decisions.pop(key)
    return make_plan("universal", files, decisions=decisions, notes=notes, slots=slots,
                     tensors=tensors, detail=detail, facts=facts,
                     parts=_parts(detail, tensors, udir, carry))


def _parts(d: _UniversalPlan, tensors, udir: str, carry) -> tuple[Part, ...]:
    """The output's independent files (runtime/workers.py): each parameter's folder in zero/
    (with its tied aliases' and, at stages 1/2, its module entry's fp32.pt), fed by that
    parameter; and the model states with zero/optimizer_state.pt, fed by the weights (none
    when the model states are carried over)."""
    stage3 = d.resume.stage == 3
    parts, module, weights = [], [], 0
    for coord, name, shape, dt in tensors:
        n = math.prod(shape)
        files = [] if stage3 else [f"{udir}/zero/{a}/fp32.pt" for a in
                                   ([name] if name in d.kinds else []) + list(d.tied.get(name, ()))]
        if name not in d.kinds:
            files += [f"{udir}/zero/{name}/{k}.pt" for k in
                      ("fp32", "exp_avg", "exp_avg_sq") + (() if stage3 else ("step",))]
        if files:
            parts.append(Part(tuple(files), frozenset({(coord, name)}), n * 4 * len(files),
                              weights_only=name in d.kinds))
        if not carry:       # at stage 3 placeholders but for buffers, in arrival order
            module.append((coord, name))
            weights += n * DTYPES[dt].itemsize if not stage3 or d.kinds.get(name) else 0
    models = [f"{udir}/{f.name}" for f in carry] if carry else \
        [f"{udir}/{_model_file(d.resume.stage, r)}" for r in range(d.resume.dp if stage3 else 1)]
    parts.append(Part((*models, f"{udir}/zero/optimizer_state.pt"), frozenset(module), weights,
                      weights_only=True))
    return tuple(parts)


def _model_file(stage, rank):
    return f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" if stage == 3 \
        else "mp_rank_00_model_states.pt"


class UniversalWriter(PlannedWriter):
    """Writes ``DST/latest_universal`` and ``DST/<tag>_universal/`` as planned; every
    parameter's files are written as soon as its tensors arrive (nothing is held across
    parameters), each float32 tensor streamed into its file a bounded piece at a time
    (_write_f32: no whole float32 copy of a tensor is made, fresh moments are holes)."""

    def __init__(self, tmpdir, program, plan):
        super().__init__(tmpdir, program, plan)
        d: _UniversalPlan = plan.detail
        self.stage, self.dp, self.fresh = d.resume.stage, d.resume.dp, d.resume.fresh
        self.step = d.resume.step
        self.facts: SourceFacts = plan.facts
        self.training = plan.facts.training
        self.have = set(plan.facts.slots)
        self.udir = self.dir / f"{d.tag}_universal"
        self.zero = self.udir / "zero"
        self.kinds, self.tied, self.groups = d.kinds, d.tied, d.groups
        self.models = None
        self.module: dict[str, object] = OrderedDict()
        self.names: list[str] = []
        self._pool = None
        self._pending: deque = deque()
        self._scratch = Scratch()

    def begin(self, tensors):
        from mapc.runtime.execute import delivery_order
        self.tensors = [(name, tuple(shape), dt) for _, name, shape, dt in tensors]
        self.dtypes = {name: dt for name, _, dt in self.tensors}
        # the index order is the order the weights arrive in one process, also in a worker
        # of a parallel run that sees only its share
        self.names = [name for _, name in delivery_order(self.program)]
        self.zero.mkdir(parents=True, exist_ok=True)    # the workers of a parallel run share it
        if not self.plan.detail.carry and self._owns_file(self._model_file(0)):
            self.models = torchfile.TorchWriter(self.udir / self._model_file(0))

    def _owns_file(self, rel: str) -> bool:
        """Whether this writer creates ``<tag>_universal/<rel>``."""
        return self.owns(f"{self.udir.name}/{rel}")

    def _owns_state(self, name: str, key: str) -> bool:
        return self._owns_file(f"zero/{name}/{'fp32' if key == 'module' else key}.pt")

    def begin_slot(self, slot, tensors):
        pass

    def _model_file(self, rank):
        return _model_file(self.stage, rank)

    def _save(self, name, key, arr):
        """Write zero/<name>/<key>.pt (a parameter's tiny step.pt) on a writer thread, while
        the next tensors are built. At most ``_IN_FLIGHT`` files are pending. The tensors
        (fp32, Adam moments, module entries) are streamed by ``_stream`` instead."""
        if not self._owns_state(name, key):
            return                                # another worker's file
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mapc-universal")
        while len(self._pending) >= _IN_FLIGHT:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._save_now, name, key, arr))

    def _drain(self):
        while self._pending:
            self._pending.popleft().result()

    def _save_now(self, name, key, arr):
        d = self.zero / name
        d.mkdir(exist_ok=True)
        with torchfile.TorchWriter(d / f"{key}.pt") as w:
            w.finish(w.add_tensor(arr))

    def _stream(self, name, key, arr, shape=None):
        """Write zero/<name>/<key>.pt now: its float32 tensor reserved at the full shape and
        ``arr`` streamed into it piece by piece (_write_f32); ``arr`` None: zeros, left as a
        hole in the file. Resident memory: one piece, whatever the tensor's size."""
        if not self._owns_state(name, key):
            return                                # another worker's file
        shape = tuple(np.shape(arr)) if shape is None else tuple(shape)
        flat = key != "module" and self.stage == 3
        d = self.zero / name
        d.mkdir(exist_ok=True)
        with torchfile.TorchWriter(d / f"{'fp32' if key == 'module' else key}.pt") as w:
            ph = w.reserve_tensor("float32", (math.prod(shape),) if flat else shape,
                                  requires_grad=key == "fp32")
            if arr is not None:
                _write_f32(w, ph, np.asarray(arr), _tp.Rule("replicated").places(shape, 0, 1),
                           self._scratch)
            w.finish({"param": ph} if key == "module" else ph if flat else
                     {"cat_dim": 0, "param": ph})

    def write(self, coord, name, arr):
        if self.models is not None:
            keep = arr if self.stage != 3 or self.kinds.get(name) == "buffer" \
                else np.zeros((0,), arr.dtype)
            self.module[name] = self.models.add_tensor(np.require(keep, requirements="C"))
        if self.stage != 3:
            # ds_to_universal (stages 1/2) saves every module entry the optimizer does not
            # hold, buffers, frozen and tied names too, as zero/<name>/fp32.pt = {"param":
            # the module tensor as float32}
            for alias in ([name] if name in self.kinds else []) + list(self.tied.get(name, ())):
                self._stream(alias, "module", arr)
        if name in self.kinds or not self._owns_state(name, "fp32"):
            return          # the model states' worker: the rest is the parameter's worker's
        if self.stage != 3:
            self._save(name, "step", np.array(self.step, dtype=np.float32))
        if "master" not in self.have:       # the weights are the master copy
            self._stream(name, "fp32", arr)
        if self.fresh:
            for slot in ("exp_avg", "exp_avg_sq"):
                self._stream(name, slot, None, np.shape(arr))

    def write_slot(self, slot, coord, name, arr):
        if name in self.kinds or (self.fresh and slot != "master"):
            return
        self._stream(name, _STATE_FILES[slot], arr)

    # -- the files that are not per parameter -------------------------------------------------
    def finish(self, record: dict):
        self._drain()
        if self._pool is not None:
            self._pool.shutdown()
        self._write_states(record)
        if not self.metadata:
            return
        (self.dir / LATEST).write_text(self.udir.name)
        if "config.json" in self.plan.files:        # generic mode may have no model config
            write_json(self.dir / "config.json", record.get("config") or {})
        write_json(self.dir / MAPC_JSON, record)

    def _write_states(self, record):
        """The model states and zero/optimizer_state.pt, by the writer that owns them."""
        if self._owns_file("zero/optimizer_state.pt"):     # with the model states
            self._write_model_states(record)
            self._write_optimizer_state()

    def _write_model_states(self, record):
        if self.plan.detail.carry:
            for f in self.plan.detail.carry:     # re-pickled from what was read, never copied
                torchfile.copy_checked(f, self.udir / f.name, DEEPSPEED_PICKLES)
        else:
            self._finish_model_states(record)

    def abort(self):
        for f in self._pending:
            f.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._pending.clear()
        self._abort_models()

    def _abort_models(self):
        if self.models is not None:
            self.models.abort()

    def _group_names(self):
        """Target names per param group, in the source's group order where the names are the
        same (DeepSpeed's flat order), else in program order."""
        n = max(self.groups.values(), default=0) + 1 if self.groups else 1
        out = [[] for _ in range(n)]
        for name in self._ordered_names():
            if name in self.kinds:
                continue
            g = self.groups.get((SINGLE, name), 0) if self.groups else 0
            out[g].append(name)
        return out

    def _ordered_names(self, src=None, names=None):
        """The written names (or ``names``), in the order of ``src`` (names) where they
        appear there."""
        if src is None:
            src = [x for pg in self.training.get("param_groups") or [] for x in
                   pg.get("params") or []]
        names = self.names if names is None else names
        pos = {x: i for i, x in enumerate(src)}
        order = {x: i for i, x in enumerate(names)}
        return sorted(names, key=lambda x: (pos.get(x, len(pos)), order[x]))

    def _module_order(self):
        """The source's own tensor order (a model's state_dict order, when names match)."""
        return self._ordered_names(list(self.facts.names))

    def _finish_model_states(self, record):
        shapes = {name: shape for name, shape, _ in self.tensors}
        groups = self._group_names()
        param_shapes = [OrderedDict((n, torch_size(shapes[n])) for n in g) for g in groups]
        steps = int(self.training.get("iteration") or 0)
        dtypes = {dt for n, dt in self.dtypes.items() if n not in self.kinds}
        ds_config = self.training.get("ds_config") or {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": self.stage},
            **({"bf16": {"enabled": True}} if dtypes == {"bfloat16"} else {}),
            **({"fp16": {"enabled": True}} if dtypes == {"float16"} else {}),
        }
        frozen = {n: shapes[n] for n in self._module_order() if self.kinds.get(n) == "frozen"}
        ms = model_states(self.module, self._module_order(), self.program.target.aliases,
                          param_shapes, self.stage,
                          scheduler=_plain(self.training.get("lr_scheduler")), steps=steps,
                          samples=int(self.training.get("global_samples") or 0), dp=self.dp,
                          ds_config=_plain(ds_config),
                          buffers=[n for n, k in self.kinds.items() if k == "buffer"],
                          frozen=frozen if self.stage != 3 else None,
                          fragments={n: self.module[n] for n in frozen})
        self.models.finish(ms)
        if self.stage == 3:       # every rank writes its own (identical) copy
            for r in range(1, self.dp):
                shutil.copyfile(self.udir / self._model_file(0), self.udir / self._model_file(r))

    def _write_optimizer_state(self):
        path = self.zero / "optimizer_state.pt"
        with torchfile.TorchWriter(path) as w:
            osd = self._source_optimizer_state(w)
            if osd is None:
                osd = self._built_optimizer_state(w)
            w.finish(osd)

    def _source_optimizer_state(self, w):
        """Rank 0's optimizer state of a DeepSpeed (or universal) source, as ds_to_universal
        keeps it."""
        zf, fmt = self.facts.zero, self.facts.format
        if zf is None or not zf.optimizer_header or fmt not in ("deepspeed", "universal"):
            return None
        first = zf.optimizer_header
        if fmt == "universal":
            return _writable(first, w)
        if zf.kind == "stage3":
            osd = _writable(first, w)
            osd["param_groups"] = osd["optimizer_state_dict"]["param_groups"]
            return osd
        drop = ("base_optimizer_state", "param_slice_mappings", "single_partition_of_fp32_groups")
        osd = _writable({k: v for k, v in first.items() if k not in drop}, w)
        osd["param_groups"] = _writable(first["base_optimizer_state"]["param_groups"], w)
        return osd

    def _built_optimizer_state(self, w):
        t = self.training
        groups = self._group_names()
        pgs = []
        for g, names in enumerate(groups):
            src = (t.get("param_groups") or [])
            hyper = {k: _plain(v) for k, v in (src[g] if g < len(src) else {}).items()
                     if k != "params"}
            if isinstance(hyper.get("betas"), list):
                hyper["betas"] = tuple(hyper["betas"])
            hyper["params"] = [g]
            pgs.append(hyper)
        scaler = _LOSS_SCALER(cur_scale=float(t.get("loss_scale") or 1.0), dynamic=False)
        clip = float(t["clip_grad"]) if t.get("clip_grad") is not None else 0.0
        shapes = {name: shape for name, shape, _ in self.tensors}
        if self.stage == 3:
            step = w.add_tensor(np.array(self.step, dtype=np.float32))
            return dict([
                ("zero_stage", _zero_stage_value(3)),
                ("loss_scaler", scaler),
                ("dynamic_loss_scale", False),
                ("overflow", False),
                ("partition_count", self.dp),
                ("optimizer_state_dict", {"state": {g: {"step": step}
                                                    for g in range(len(groups))},
                                          "param_groups": pgs}),
                ("param_groups", pgs),
            ])
        paddings = []
        for names in groups:                                   # rank 0's padding
            n = sum(math.prod(shapes[x]) for x in names)
            part = partition_size(n, self.dp)
            paddings.append(min(max(part - n, 0), part))
        out = stage12_header(paddings, [len(names) for names in groups], self.dp, self.stage,
                             clip, scaler.cur_scale)
        out["param_groups"] = pgs
        return out


def _plain(obj):
    """JSON-ish training values (mapc records, inert records) as plain Python values."""
    if isinstance(obj, torchfile.Record):
        return obj
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _writable(obj, w):
    """A pickle tree loaded by torchfile, ready for TorchWriter: tensors are copied into the
    new file, ZeroStageEnum values (read as ints) become the enum again."""
    if isinstance(obj, torchfile.TensorRef):
        return w.add_tensor(obj.map(), requires_grad=obj.requires_grad)
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, _writable_item(k, v, w)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _writable_item(k, v, w) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_writable(v, w) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_writable(v, w) for v in obj)
    return obj


def _writable_item(key, value, w):
    if key == "zero_stage" and isinstance(value, int) and not isinstance(value, bool):
        return _zero_stage_value(value)
    return _writable(value, w)


# ---- writing a model-parallel universal checkpoint ---------------------------------------------
def layout_for(topology: dict) -> str:
    """The layout of a universal output at ``topology``: the wrapped module's (``hf``); with
    tensor parallelism the family's ``megatron`` layout; with pipeline parallelism its
    ``megatron_pipe`` layout (DeepSpeed pipeline names, unique across stages as zero/ needs
    them; universal_tp.py)."""
    topology = topology or {}
    if topology.get("pp") not in (None, 1):
        return _tp.PIPE_LAYOUT
    sharded = any(topology.get(a) not in (None, 1) for a in ("tp", "ep"))
    return _tp.LAYOUT if sharded else LAYOUT


@dataclass(frozen=True)
class _TPPlan:
    """A model-parallel universal output's decisions: ZeRO (``resume``), the tag, ``tp``,
    ``pp``, every tensor's universal rule (``rules``, universal_tp.Rule by name), the
    ``universal_checkpoint_info`` written, each (coord, name)'s param group, the target
    layout's Megatron arguments (``args``)."""
    resume: ResumePlan
    tag: str
    tp: int
    pp: int
    rules: dict
    info: dict
    groups: dict | None
    args: dict


def _plan_write_tp(program, facts: SourceFacts, request: WriteRequest, slots) -> WritePlan:
    mesh = program.target.mesh
    tp, pp = int(mesh.get("tp", 1)), int(mesh.get("pp", 1))
    if any(mesh.get(a, 1) != 1 for a in mesh if a not in ("tp", "pp")):
        raise MapcError("expert-parallel universal checkpoints are not written "
                        f"(asked for {program.target.describe()})",
                        hint="convert to universal with --tp/--pp only, or to megatron or "
                             "torch_dist for expert parallelism")
    tensors = planned_tensors(program, facts, request.dtype, slots)
    kinds = stateless_targets(program, facts, tensors)
    if kinds:
        raise MapcError(f"{next(iter(kinds))} has no optimizer state ({kinds[next(iter(kinds))]}"
                        "); a model-parallel universal checkpoint of frozen parameters or "
                        "buffers is not written yet", hint="convert to universal without --tp")
    rules: dict = {}
    copies: set = set()           # a tied tensor's copy on the last stage: the same zero/ files
    for inst, _, name in program.target.placements():
        if inst.copy:
            copies.add(name)
        elif name not in rules:
            if not name or "/" in name or "\0" in name or name in (".", ".."):
                raise MapcError(f"parameter name {name!r} cannot be a folder name in zero/")
            rules[name] = _tp.rule_of(inst, name)
    if copies - set(rules):
        name = next(iter(copies - set(rules)))
        raise MapcError(f"{name} (layout {program.target.name}) is a copy under a name of its "
                        "own, which a universal checkpoint (one zero/ folder per name) cannot "
                        "hold", hint="convert to megatron for this pipeline layout")
    vocab = next((r.rows for r in rules.values() if r.kind == "vocab"), None)
    info = _tp.checkpoint_info(rules, vocab, pipeline_replicated=sorted(copies))
    notes: list[str] = []
    rs = plan_resume(facts, request, "universal", {dt for _, _, _, dt in tensors}, notes)
    if rs.stage == 3:
        raise MapcError("a ZeRO stage 3 universal checkpoint with tensor parallelism is not "
                        "written", hint="use --zero-stage 1 or 2 (DeepSpeed loads a universal "
                                        "checkpoint at any stage 1/2 and dp)")
    it = facts.training.get("iteration")
    tag = f"global_step{int(it) if it is not None else 0}"
    if facts.zero is not None and facts.zero.tag and facts.format in ("deepspeed", "universal"):
        tag = facts.zero.tag
    pgs = facts.training.get("param_groups") or []
    src = [list(pg.get("params") or []) for pg in pgs]
    groups = program.target_groups(src) if src else None
    udir = f"{tag}_universal"
    files = [LATEST, MAPC_JSON, f"{udir}/zero/optimizer_state.pt"] + \
        (["config.json"] if facts.has_config else []) + \
        [f"{udir}/{_tp.rank_file(m)}" for m in range(tp * pp)]
    for name in rules:
        files += [f"{udir}/zero/{name}/{k}.pt" for k in ("fp32", "exp_avg", "exp_avg_sq", "step")]
    decisions = {**rs.decisions(), "tag": tag, "tensor parallel": tp,
                 **({"pipeline parallel": pp} if pp > 1 else {}),
                 "layout": program.target.describe(), "model states": "built",
                 "universal rules": {k: sum(1 for r in rules.values() if r.kind == k)
                                     for k in ("replicated", "cat", "sub2", "vocab")}}
    for key in ("source dp", "optimizer class", "training dtype"):
        decisions.pop(key)
    detail = _TPPlan(rs, tag, tp, pp, rules, info, groups, dict(program.target.meta()))
    return make_plan("universal", files, decisions=decisions, notes=notes, slots=slots,
                     tensors=tensors, detail=detail, facts=facts,
                     parts=_tp_parts(tensors, rules, udir, tp, pp))


def _tp_parts(tensors, rules, udir: str, tp: int, pp: int) -> tuple[Part, ...]:
    """The independent files of a model-parallel universal output (runtime/workers.py): each
    parameter's folder in zero/, fed by every rank's slice of it (its full tensors are merged
    there), in placement order; then the model states: without pipeline stages one part per
    model-parallel rank, fed by that rank's weights (``mp_rank_00`` with
    zero/optimizer_state.pt), with them one part fed by nothing (a pipeline engine's module
    is None: the rank files hold shapes and training state only)."""
    feeds: dict = {name: [] for name in rules}
    first_stage: dict = {}
    by_rank: dict = {m: [] for m in range(tp * pp)}
    weights = dict.fromkeys(range(tp * pp), 0)
    for coord, name, shape, dt in tensors:
        c = dict(coord)
        feeds[name].append((coord, shape))
        first_stage.setdefault(name, c.get("pp", 0))
        m = c.get("pp", 0) * tp + c.get("tp", 0)
        by_rank[m].append((coord, name))
        weights[m] += math.prod(shape) * DTYPES[dt].itemsize
    parts = []
    for name, coords in feeds.items():
        n = sum(math.prod(s) for c, s in coords if dict(c).get("pp", 0) == first_stage[name])
        parts.append(Part(tuple(f"{udir}/zero/{name}/{k}.pt"
                                for k in ("fp32", "exp_avg", "exp_avg_sq", "step")),
                          frozenset((c, name) for c, _ in coords), n * 4 * 3 + 4))
    optim = f"{udir}/zero/optimizer_state.pt"
    if pp == 1:
        for m in range(tp):
            files = (f"{udir}/{_tp.rank_file(m)}",) + ((optim,) if m == 0 else ())
            parts.append(Part(files, frozenset(by_rank[m]), weights[m], weights_only=True))
    else:
        parts.append(Part((*(f"{udir}/{_tp.rank_file(m)}" for m in range(tp * pp)), optim),
                          frozenset(), 0, weights_only=True))
    return tuple(parts)


class ModelParallelUniversalWriter(UniversalWriter):
    """Writes a model-parallel universal checkpoint as planned (_TPPlan): each rank's shards
    into its ``mp_rank_MM_model_states.pt`` (MM = pp * tp + tp rank; with pipeline stages the
    module is None, as a pipeline engine saves it: the weights are in zero/ only), and every
    parameter's full tensors into zero/, each tp rank's slice written into its place as it
    arrives (where ds_to_universal's merge puts it, a bounded piece at a time: no slice and
    no merged tensor is held, _stream_slice). A tied tensor's copy on the last stage is
    written once. A worker of a parallel run (owned
    files, _tp_parts) merges only the parameters whose folders it owns and writes only the
    rank files it owns; every rank's names come from the plan, not from what arrived."""

    def __init__(self, tmpdir, program, plan):
        PlannedWriter.__init__(self, tmpdir, program, plan)
        d: _TPPlan = plan.detail
        self.stage, self.dp, self.fresh, self.step = (d.resume.stage, d.resume.dp,
                                                      d.resume.fresh, d.resume.step)
        self.tp, self.pp, self.rules = d.tp, d.pp, d.rules
        self.mp = d.tp * d.pp
        self.facts: SourceFacts = plan.facts
        self.training = plan.facts.training
        self.have = set(plan.facts.slots)
        self.udir = self.dir / f"{d.tag}_universal"
        self.zero = self.udir / "zero"
        self.kinds, self.tied, self.groups = {}, {}, None
        self._pool = None
        self._pending: deque = deque()
        self._scratch = Scratch()
        self._open: dict = {}                # (key, name) -> (TorchWriter, placeholder, ranks)
        self._saved: set = set()             # (key, name) written (a tied copy comes twice)
        self.names: list[str] = []
        self.rank_names: dict = {m: [] for m in range(self.mp)}

    def begin(self, tensors):
        from mapc.runtime.execute import delivery_order
        self.tensors = [(name, tuple(shape), dt) for _, name, shape, dt in tensors]
        self.rank_tensors = {m: [] for m in range(self.mp)}
        for coord, name, shape, dt in tensors:
            self.rank_tensors[self._rank(coord)].append((name, tuple(shape), dt))
        self.dtypes = {name: dt for name, _, dt in self.tensors}
        # each rank's names in the order one process receives their weights, also in a
        # worker of a parallel run that sees only its share
        for coord, name in delivery_order(self.program):
            self.rank_names[self._rank(coord)].append(name)
        self.names = list(self.rank_names[0])
        self.zero.mkdir(parents=True, exist_ok=True)    # the workers of a parallel run share it
        self.models = {m: torchfile.TorchWriter(self.udir / _tp.rank_file(m))
                       for m in range(self.mp) if self._owns_file(_tp.rank_file(m))}
        self.modules = {m: OrderedDict() for m in self.models}

    def _rank(self, coord) -> int:
        c = dict(coord)
        return c.get("pp", 0) * self.tp + c.get("tp", 0)

    def _stream_slice(self, key, coord, name, arr, shape=None):
        """Write this tp rank's slice of (key, name) into its place in zero/<name>/<key>.pt
        (universal_tp.Rule.places: where ds_to_universal's merge puts it), piece by piece as
        it arrives (_write_f32); ``arr`` None: zeros, left as a hole. The file's tensor is
        reserved at the first slice; the file is suspended (no descriptor) between slices
        and finished with the last, so neither the slices nor the merged tensor are ever
        held. A slice that comes again (a tied copy on another stage) is the same bytes and
        is not written twice."""
        if (key, name) in self._saved or not self._owns_state(name, key):
            return
        shape = tuple(np.shape(arr)) if shape is None else tuple(shape)
        rule, t = self.rules[name], dict(coord).get("tp", 0)
        entry = self._open.get((key, name))
        if entry is None:
            d = self.zero / name
            d.mkdir(exist_ok=True)
            w = torchfile.TorchWriter(d / f"{key}.pt")
            entry = (w, w.reserve_tensor("float32", rule.full_shape(shape, self.tp),
                                         requires_grad=key == "fp32"), set())
            self._open[(key, name)] = entry
        w, ph, got = entry
        if t in got:
            return
        got.add(t)
        if arr is not None:
            _write_f32(w, ph, np.asarray(arr), rule.places(shape, t, self.tp), self._scratch)
        if len(got) < self.tp:
            w.suspend()
            return
        del self._open[(key, name)]
        self._saved.add((key, name))
        w.finish({**rule.entries(), "param": ph})

    def write(self, coord, name, arr):
        m = self._rank(coord)
        if self.pp == 1 and m in self.models:
            self.modules[m][name] = self.models[m].add_tensor(np.require(arr,
                                                                         requirements="C"))
        if not self._owns_state(name, "fp32"):
            return                  # a rank file's worker: the folder is another worker's
        if ("step", name) not in self._saved:
            self._saved.add(("step", name))
            self._save(name, "step", np.array(self.step, dtype=np.float32))
        if "master" not in self.have:       # the weights are the master copy
            self._stream_slice("fp32", coord, name, arr)
        if self.fresh:
            for slot in ("exp_avg", "exp_avg_sq"):
                self._stream_slice(slot, coord, name, None, np.shape(arr))

    def write_slot(self, slot, coord, name, arr):
        if (self.fresh and slot != "master") or not self._owns_state(name, "fp32"):
            return
        self._stream_slice(_STATE_FILES[slot], coord, name, arr)

    def _write_states(self, record):
        """The rank files this writer owns, and zero/optimizer_state.pt if it owns it."""
        self._write_model_states(record)
        if self._owns_file("zero/optimizer_state.pt"):
            self._write_optimizer_state()

    def _write_model_states(self, record):
        if self._open:
            (key, name), (_, _, got) = next(iter(self._open.items()))
            raise MapcError(f"internal: {name} ({key}) arrived from {len(got)} of {self.tp} "
                            "ranks")
        self._finish_model_states(record)

    def _abort_models(self):
        for w in (getattr(self, "models", None) or {}).values():
            w.abort()
        for w, _, _ in getattr(self, "_open", {}).values():     # files half written
            w.abort()

    def _group_names(self, m=0):
        """Rank ``m``'s names per param group (every tp rank of a stage has the same names).
        Every rank has as many groups (some may be empty), as DeepSpeed's engine keeps the
        client optimizer's groups on every stage."""
        d: _TPPlan = self.plan.detail
        n = max(d.groups.values(), default=0) + 1 if d.groups else 1
        out = [[] for _ in range(n)]
        coord = next((c for c, _, _, _ in self.plan.tensors if self._rank(c) == m), ())
        names = sorted(self.rank_names[m], key=_tp.pipeline_position)  # the module's order
        for name in self._ordered_names(names=names):
            out[d.groups.get((coord, name), 0) if d.groups else 0].append(name)
        return out

    def _finish_model_states(self, record):
        d: _TPPlan = self.plan.detail
        steps = int(self.training.get("iteration") or 0)
        dtypes = set(self.dtypes.values())
        ds_config = self.training.get("ds_config") or {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": self.stage},
            **({"bf16": {"enabled": True}} if dtypes == {"bfloat16"} else {}),
            **({"fp16": {"enabled": True}} if dtypes == {"float16"} else {}),
        }
        args = dict(d.args, tensor_model_parallel_size=self.tp,
                    pipeline_model_parallel_size=self.pp, data_parallel_size=self.dp,
                    iteration=steps)
        for m in self.models:
            shapes = {name: shape for name, shape, _ in self.rank_tensors[m]}
            groups = self._group_names(m)
            param_shapes = [OrderedDict((n, torch_size(shapes[n])) for n in g) for g in groups]
            order = [n for g in groups for n in g] if self.pp == 1 else []
            ms = model_states(self.modules[m], order, {}, param_shapes,
                              self.stage, scheduler=_plain(self.training.get("lr_scheduler")),
                              steps=steps, samples=int(self.training.get("global_samples") or 0),
                              dp=self.dp, ds_config=_plain(ds_config))
            if self.pp > 1:
                ms["module"] = None              # a pipeline engine keeps its layers apart
            ms["mp_world_size"] = self.mp
            ms["checkpoint_parallel_dimensions"] = {"pp_degree": self.pp, "tp_degree": self.tp}
            # Megatron-DeepSpeed's client state: the universal info, args, iteration
            ms["universal_checkpoint_info"] = d.info
            ms["args"] = torchfile.Namespace(**args)
            ms["iteration"] = steps
            ms["checkpoint_version"] = 3.0
            self.models[m].finish(ms)


def Writer(tmpdir, program, plan):                          # noqa: N802 (the protocol's name)
    """The writer of ``plan``: model-parallel (ModelParallelUniversalWriter) or not."""
    cls = ModelParallelUniversalWriter if isinstance(plan.detail, _TPPlan) else UniversalWriter
    return cls(tmpdir, program, plan)
