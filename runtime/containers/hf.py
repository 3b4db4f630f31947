"""HuggingFace checkpoints: ``config.json`` + safetensors (one file, or shards with
``model.safetensors.index.json``); ``pytorch_model*.bin`` is read too. Output is what
transformers' ``save_pretrained`` writes, loadable by ``from_pretrained``.

A transformers ``Trainer`` checkpoint (``checkpoint-N/`` with ``optimizer.pt``,
``scheduler.pt``, ``trainer_state.json``) is read with its optimizer state (slots ``master``,
``exp_avg``, ``exp_avg_sq``) and training state; with ``with_optimizer`` the writer writes one.
How Trainer numbers and groups parameters is in hf_trainer.py.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import numpy as np

from mapc.errors import MapcError
from mapc.runtime import torchfile
from mapc.runtime.containers import hf_trainer as trainer
from mapc.runtime.backends import DTYPES
from mapc.runtime.containers.base import MAPC_JSON, Source, write_json
from mapc.runtime.plan_write import (MOMENTS, Part, PlannedWriter, SourceFacts, WritePlan,
                                     WriteRequest, make_plan, parts_by_file, planned_tensors)
from mapc.runtime.safetensors_io import SafetensorsFile, SafetensorsWriter

SINGLE = ()
DEFAULT_SHARD_BYTES = 5 * 10**9
LAYOUT = "hf"
PICKLES = torchfile.allow_list("HF / Trainer")


def detect(path: Path) -> bool:
    # safetensors files alone (a module's state dict saved without a model config) are read
    # too, in generic mode; a .bin needs its config.json beside it
    return path.is_dir() and (any(path.glob("*.safetensors")) or (
        (path / "config.json").is_file() and any(path.glob("pytorch_model*.bin"))))


def plan_write(program, facts: SourceFacts, request: WriteRequest) -> WritePlan:
    """safetensors shards of at most ``max_shard_bytes`` (5 GB), their index when there are
    several, config.json and mapc.json; with ``--with-optimizer`` also Trainer's files."""
    from mapc.runtime import quantized as quant
    quant.check_request(request)                 # --quantize: before the Trainer export
    export, notes = None, []
    if request.with_optimizer:
        export, notes = plan_trainer_export(program, facts)
    slots = ("param",) + MOMENTS if export else ("param",)
    tensors = planned_tensors(program, facts, request.dtype, slots)
    # --quantize KIND: a quantized tensor is stored as its values and their scales (fp8_block:
    # NAME, NAME_scale_inv; mxfp4: NAME_blocks, NAME_scales), the scales kept in its file
    q = quant.plan_quantized(program, facts, request, tensors)
    tensors, quantized, notes, companions = q.tensors, q.quantized, notes + q.notes, q.companions
    limit = request.max_shard_bytes or DEFAULT_SHARD_BYTES
    groups, size, total = [[]], 0, 0
    for coord, name, shape, dt in tensors:
        n = DTYPES[dt].itemsize * math.prod(shape)
        if groups[-1] and size + n > limit and name not in companions:
            groups.append([])
            size = 0
        groups[-1].append((name, shape, dt))
        size += n
        total += n
    names = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    shards = tuple(zip(names, (tuple(g) for g in groups)))
    # config.json's dtype: that of the tensors (the quantized ones' is quantization_config's)
    dtypes = {dt for coord, name, _, dt in tensors if name not in q.stored}
    detail = _HFPlan(shards, total, next(iter(dtypes)) if len(dtypes) == 1 else None, export,
                     q.config)
    files = [*names, MAPC_JSON] + (["config.json"] if facts.has_config else []) + \
        (["model.safetensors.index.json"] if len(shards) > 1 else [])
    decisions = {"shards": len(shards), "max_shard_bytes": limit,
                 "config dtype": detail.config_dtype, **q.decisions}
    if export is not None:
        files += [trainer.OPTIMIZER, trainer.SCHEDULER, trainer.TRAINER_STATE]
        decisions.update({"optimizer": "Trainer AdamW export", "step": export.step,
                          "global_step": export.global_step,
                          "param groups": [len(g) for g in export.groups]})
    # each shard file holds its own tensors (their weights); Trainer's optimizer.pt, with
    # scheduler.pt and trainer_state.json, is fed by every tensor's moments
    file_of = {name: fname for fname, group in shards for name, _, _ in group}
    parts = parts_by_file(tensors, lambda _, n: file_of[n])
    if export is not None:
        parts = tuple(replace(p, weights_only=True) for p in parts) + (Part(
            (trainer.OPTIMIZER, trainer.SCHEDULER, trainer.TRAINER_STATE),
            frozenset((c, n) for c, n, _, _ in tensors),
            sum(4 * len(MOMENTS) * math.prod(s) for _, _, s, _ in tensors)),)
    return make_plan("hf", files, decisions=decisions, notes=notes, slots=slots,
                     tensors=tensors, detail=detail, parts=parts, quantized=quantized)


@dataclass(frozen=True)
class _HFPlan:
    shards: tuple                    # (file name, ((name, shape, dtype), ...)), in order
    total: int                       # bytes of all tensors (the index's total_size)
    config_dtype: str | None         # config.json "dtype" when every tensor has one dtype
    export: object = None            # _TrainerPlan with --with-optimizer
    quantization_config: dict | None = None   # config.json's, with --quantize


def _index_shards(index: Path) -> list[str]:
    """The shard files ``model.safetensors.index.json`` names, each a plain file name inside
    the checkpoint (an absolute path or ``..`` would read another model's tensors)."""
    where = str(index)
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise MapcError(f"cannot read the shard index: {e}", where=where,
                        hint="re-copy it, or delete it to read every *.safetensors file") \
            from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise MapcError("the shard index has no weight_map object of file names", where=where,
                        hint="re-copy it, or delete it to read every *.safetensors file")
    for f in sorted(set(weight_map.values())):
        p = PurePosixPath(f)
        if not f or p.is_absolute() or "\\" in f or any(part in ("..", "") for part in
                                                         f.split("/")):
            raise MapcError(f"the shard index names {f!r}, which is not a file of this "
                            "checkpoint", where=where,
                            hint="an index may only name shard files beside it")
    return sorted(set(weight_map.values()))


class HFSource(Source):
    format = "hf"
    layout = "hf"

    def __init__(self, path):
        super().__init__(path)
        cfg = self.path / "config.json"
        try:
            self.config = json.loads(cfg.read_text()) if cfg.exists() else None
        except (OSError, ValueError) as e:
            raise MapcError(f"cannot read config.json: {e}", where=str(self.path)) from None
        if self.config is not None and not isinstance(self.config, dict):
            raise MapcError(f"config.json is a JSON {type(self.config).__name__}, not an object",
                            where=str(self.path), hint="pass the model's config with --config")
        self.format_meta = self.config or {}
        self.where: dict[str, object] = {}
        st = sorted(self.path.glob("*.safetensors"))
        if st:
            index = self.path / "model.safetensors.index.json"
            if index.is_file():
                wanted = _index_shards(index)
                missing = [f for f in wanted if not (self.path / f).is_file()]
                if missing:
                    raise MapcError(f"shard {missing[0]} listed in the index is missing",
                                    where=str(self.path))
                st = [self.path / f for f in wanted]
            for f in st:
                sf = SafetensorsFile(f)
                for name in sf.keys():
                    self.where[name] = sf
        else:
            from mapc.runtime import torchfile
            for f in sorted(self.path.glob("pytorch_model*.bin")):
                state = torchfile.load(f, PICKLES)
                if not isinstance(state, dict):
                    raise MapcError("expected a state dict", where=str(f))
                for name, ref in state.items():
                    self.where[name] = ref
        # a Trainer checkpoint: optimizer indices get their names in bind_plan (after resolve)
        self.trainer = _TrainerFiles(self.path) if (self.path / trainer.OPTIMIZER).is_file() \
            else None
        self.opt_index: dict[str, int] | None = None
        self.module: _ModuleMoments | None = None     # optimizer numbered by other names

    def bind_plan(self, plan):
        """Name the optimizer's parameter indices with the resolved hf plan: Trainer numbers
        them in its two groups' order (hf_trainer.trainer_groups); shapes are checked.

        The module Trainer stepped may name its parameters differently from the files it
        saved (transformers 5 merges some tensors in memory and splits them again in
        ``save_pretrained``). A spec says so with a layout parameter choosing the names: when
        the plan of the weights does not number the optimizer, the plans of the layout's other
        parameter choices are tried, and the one whose parameter list fits optimizer.pt
        numbers it; each stored tensor's moments are then cut from its parameters' moments
        by the compiled program between the two plans (:class:`_ModuleMoments`)."""
        if self.trainer is None:
            return
        from mapc.compiler.plan import stored_tensor
        if stored_tensor(plan.spec) is not None:                  # generic mode: no spec
            registered = trainer.registered_parameters(self.config, str(self.path))
            self.opt_index = self.trainer.index(trainer.trainer_groups(plan, registered),
                                                self.shape)
            return
        groups = trainer.trainer_groups(plan)
        if self.trainer.fits(groups, self.shape):
            self.opt_index = self.trainer.index(groups, self.shape)
            return
        tried = []
        for other in trainer.other_name_plans(plan):
            shapes = {n: tuple(inst.recipe.shard_shape) for inst, _, n in other.placements()}
            theirs = trainer.trainer_groups(other)
            tried.append((other, theirs))
            if self.trainer.fits(theirs, shapes.__getitem__):
                index = self.trainer.index(theirs, shapes.__getitem__)
                self.module = _ModuleMoments(self, other, plan, index)
                self.opt_index = self.module.index_of_stored()
                return
        self.trainer.index(groups, self.shape, tried)                    # refuses

    def coords(self):
        return [SINGLE]

    def names(self, coord=SINGLE):
        return list(self.where)

    def _get(self, name):
        try:
            return self.where[name]
        except KeyError:
            raise MapcError(f"tensor {name} is not in the checkpoint", where=str(self.path)) \
                from None

    def shape(self, name, coord=SINGLE):
        x = self._get(name)
        return x.shape(name) if isinstance(x, SafetensorsFile) else tuple(x.shape)

    def slots(self):
        return ["param", "master", "exp_avg", "exp_avg_sq"] if self.trainer else ["param"]

    def dtype(self, name, coord=SINGLE, slot="param"):
        if slot == "master":
            return "float32"
        if slot != "param":
            return self._moment(name, slot).dtype
        x = self._get(name)
        return x.dtype(name) if isinstance(x, SafetensorsFile) else x.dtype

    def read(self, name, coord=SINGLE, slot="param"):
        if slot not in ("param", "master"):
            return self._moment(name, slot).map()
        x = self._get(name)
        arr = x.read(name) if isinstance(x, SafetensorsFile) else x.map()
        # Trainer steps the model's own parameters: they are the master copy
        return arr if slot == "param" or arr.dtype == np.float32 else arr.astype(np.float32)

    def _moment(self, name, slot):
        if self.trainer is None or self.opt_index is None:
            raise MapcError(f"internal: no optimizer index for {name} (bind_plan not called)",
                            where=str(self.path))
        self._get(name)
        if self.module is not None:
            return self.module.moment(name, slot)
        return self.trainer.moment(self.opt_index[name], slot, name)

    def training_state(self) -> dict:
        if self.trainer is None:
            return {}
        if self.module is not None:
            return self.trainer.training_state({}, self.module.stored_groups())
        names = {i: n for n, i in (self.opt_index or {}).items()}
        return self.trainer.training_state(names)


class _TrainerFiles:
    """optimizer.pt, scheduler.pt and trainer_state.json of a Trainer checkpoint, read through
    torchfile's allow-list (training_args.bin, a pickled TrainingArguments, is never opened)."""

    def __init__(self, path: Path):
        self.path = path
        f = path / trainer.OPTIMIZER
        self.optim = torchfile.load(f, PICKLES)
        if not (isinstance(self.optim, dict) and isinstance(self.optim.get("state"), dict)
                and isinstance(self.optim.get("param_groups"), list)):
            raise MapcError("optimizer.pt is not a torch optimizer state dict (state, "
                            "param_groups)", where=str(f))
        s = path / trainer.SCHEDULER
        self.scheduler = torchfile.load(s, PICKLES) if s.is_file() else None
        ts = path / trainer.TRAINER_STATE
        try:
            self.state = json.loads(ts.read_text()) if ts.is_file() else None
        except (OSError, ValueError) as e:
            raise MapcError(f"cannot read {trainer.TRAINER_STATE}: {e}", where=str(ts)) from None

    def _groups_wanted(self, groups):
        have = [list(g.get("params") or []) for g in self.optim["param_groups"]]
        want, start = [], 0
        for g in groups:
            want.append(list(range(start, start + len(g))))
            start += len(g)
        return have, want

    def fits(self, groups: list[list[str]], shape_of) -> bool:
        """Whether optimizer.pt numbers ``groups`` (Trainer's, by name): the same group
        sizes, and every state of the shape of its parameter."""
        have, want = self._groups_wanted(groups)
        if have != want:
            return False
        for i, name in enumerate(groups[0] + groups[1]):
            st = self.optim["state"].get(i)
            if not isinstance(st, dict):
                return False
            for slot in ("exp_avg", "exp_avg_sq"):
                ref = st.get(slot)
                if ref is None or tuple(ref.shape) != tuple(shape_of(name)):
                    return False
        return True

    def index(self, groups: list[list[str]], shape_of, tried=()) -> dict[str, int]:
        """{parameter name: optimizer index}, checking optimizer.pt has Trainer's groups.
        ``tried``: (plan, groups) of other parameter namings that did not fit either."""
        where = str(self.path / trainer.OPTIMIZER)
        have, want = self._groups_wanted(groups)
        if have != want:
            also = "".join(f", or {[len(g) for g in theirs]} named as {other.describe()}"
                           for other, theirs in tried)
            raise MapcError(f"optimizer.pt has param groups of {[len(g) for g in have]} "
                            f"parameters; transformers' Trainer groups this model as "
                            f"{[len(g) for g in groups]} (weight decay / no decay{also})",
                            where=where,
                            hint="mapc reads Trainer checkpoints made by Trainer.create_optimizer;"
                                 " a custom optimizer grouping is not supported")
        out = {n: i for i, n in enumerate(groups[0] + groups[1])}
        for name, i in out.items():
            st = self.optim["state"].get(i)
            if st is None:
                raise MapcError(f"optimizer.pt has no state for parameter {i} ({name})",
                                where=where, hint="was the checkpoint saved before any step?")
            for slot in ("exp_avg", "exp_avg_sq"):
                ref = st.get(slot)
                if ref is None or tuple(ref.shape) != tuple(shape_of(name)):
                    raise MapcError(f"optimizer.pt state {i} {slot} has shape "
                                    f"{None if ref is None else list(ref.shape)}, but parameter "
                                    f"{i} ({name}) is {list(shape_of(name))}", where=where,
                                    hint="the optimizer does not follow the model's parameter "
                                         "order")
        return out

    def moment(self, index: int, slot: str, name: str):
        return self.optim["state"][index][slot]

    def training_state(self, names: dict[int, str], stored_groups=None) -> dict:
        """``names``: optimizer index -> parameter name; ``stored_groups`` (an optimizer
        numbered by the module's own names): each group's stored tensor names instead."""
        steps = [st.get("step") for st in self.optim["state"].values()
                 if st.get("step") is not None]
        step = float(np.asarray(steps[0].map() if hasattr(steps[0], "map") else steps[0])) \
            if steps else None
        groups = []
        for k, g in enumerate(self.optim["param_groups"]):
            hyper = {k: v for k, v in g.items() if k != "params"}
            hyper["params"] = list(stored_groups[k]) if stored_groups is not None else \
                [names.get(i, str(i)) for i in g.get("params") or []]
            groups.append(hyper)
        gs = (self.state or {}).get("global_step")
        return {
            "iteration": int(gs) if gs is not None else (int(step) if step is not None else None),
            "global_samples": None,
            "step": step,
            "param_groups": groups,
            "lr_scheduler": self.scheduler,
            "loss_scale": None,
            "clip_grad": None,
            "zero_stage": None,
            "dp_world_size": None,
            "ds_config": None,
            "trainer_state": self.state,
        }


class _ModuleMoments:
    """Moments of a Trainer checkpoint whose optimizer is numbered by the module's own
    parameters (plan ``module``) while its files store the weights under other names (plan
    ``stored``, the one resolve found): the compiled program ``module -> stored`` rebuilds
    the logical tensors of a stored tensor's unit from the module parameters' moments and cuts
    the stored tensor from them, as a conversion cuts weights (e.g. one merged
    ``[experts, 2 * ffn, hidden]`` moment into per-expert gate and up moments)."""

    def __init__(self, src: "HFSource", module, stored, index: dict[str, int]):
        from mapc.compiler.program import compile_program
        self.src, self.index = src, index
        self.targets = {}
        for unit in compile_program(module, stored).units:
            for inst in unit.targets:
                for rc, _, name in inst.shards:
                    self.targets[name] = (unit, inst, rc)
        self.module_groups = [set(g) for g in trainer.trainer_groups(module)]
        self.stored_order = trainer.trainer_groups(stored)

    def index_of_stored(self) -> dict[str, int]:
        return dict(self.index)

    def read(self, name, coord=SINGLE, slot="param"):         # the program's source reader
        return self.src.trainer.moment(self.index[name], slot, name).map()

    def moment(self, name: str, slot: str):
        return _Cut(self, name, slot)

    def cut(self, name: str, slot: str) -> np.ndarray:
        from mapc.runtime import execute
        unit, inst, rc = self.targets[name]
        be = execute.get_backend("numpy")
        report = execute.Report()
        logical = execute.read_instances(unit.sources, self, be, report, False, slot)
        members = {m: logical[k] for m, k in inst.members.items()}
        return np.ascontiguousarray(be.to_numpy(inst.recipe.shard(be, members, dict(rc))))

    def stored_groups(self) -> list[list[str]]:
        """Each optimizer group's stored tensors (in Trainer order): a stored tensor is in the
        group of the module parameters it is cut from (refused if they are in two)."""
        out = [[] for _ in self.module_groups]
        for name in self.stored_order[0] + self.stored_order[1]:
            unit, inst, _ = self.targets[name]
            keys = set(inst.members.values())
            sources = {n for s in unit.sources if keys & set(s.members.values())
                       for _, _, n in s.shards}
            groups = {g for g, names in enumerate(self.module_groups) if names & sources}
            if len(groups) != 1:
                raise MapcError(f"{name} is cut from parameters in optimizer groups "
                                f"{sorted(groups)}; its moments have no one group",
                                where=str(self.src.path / trainer.OPTIMIZER))
            out[groups.pop()].append(name)
        return out


class _Cut:
    """One stored tensor's moment, cut on ``map()`` (dtype: its parameters' moments')."""

    def __init__(self, module: _ModuleMoments, name: str, slot: str):
        self.module, self.name, self.slot = module, name, slot
        unit, _, _ = module.targets[name]
        first = unit.sources[0].shards[0][2]
        self.dtype = module.src.trainer.moment(module.index[first], slot, first).dtype

    def map(self):
        return self.module.cut(self.name, self.slot)


@dataclass(frozen=True)
class _TrainerPlan:
    """What ``--with-optimizer`` writes: Trainer's two groups (parameter names, decay first)
    with their hyper-parameters, the optimizer step, the scheduler (None: a constant one at
    the groups' learning rates), trainer_state.json (None: a minimal one)."""
    groups: tuple
    hyper: tuple
    step: float
    global_step: int
    scheduler: object
    trainer_state: object
    train_batch_size: int
    # the module's own parameters numbered instead of the stored tensors (their moments cut
    # from the stored tensors' by this program, stored -> module naming), else None
    module: object = field(default=None, compare=False, hash=False)

    @property
    def order(self) -> list[str]:
        return list(self.groups[0]) + list(self.groups[1])


def plan_trainer_export(program, facts: SourceFacts):
    """The decisions of a Trainer export (optimizer.pt, scheduler.pt, trainer_state.json as
    ``Trainer._save_checkpoint`` writes them, so ``Trainer.train(resume_from_checkpoint=DIR)``
    continues the run) and their notes."""
    where = facts.path
    lacking = [s for s in MOMENTS if s not in facts.slots]
    if lacking:
        raise MapcError(f"--with-optimizer: {facts.path} ({facts.format}) holds no optimizer "
                        f"state (no {' or '.join(lacking)})",
                        hint="convert a training checkpoint (deepspeed, dcp with optimizer, "
                             "an hf Trainer checkpoint), or drop --with-optimizer")
    from mapc.compiler.plan import stored_tensor
    registered = trainer.registered_parameters(facts.config, where) \
        if stored_tensor(program.target.spec) is not None else None   # generic mode: no spec
    numbered, module, notes = program.target, None, []
    if registered is None:
        other = trainer.module_naming(program.target, facts.config)
        if other is not None:     # the model's class steps parameters of another naming
            from mapc.compiler.program import compile_program
            numbered, module = other, compile_program(program.target, other)
            notes.append(f"optimizer.pt numbers the model class's own parameters, named as "
                         f"{other.describe()} (model.safetensors keeps "
                         f"{program.target.describe()})")
    groups = trainer.trainer_groups(numbered, registered)
    training = facts.training
    src_groups = training.get("param_groups") or []
    if not src_groups:
        raise MapcError("--with-optimizer: the source states no optimizer param groups "
                        "(lr, betas, eps, weight_decay)", where=where,
                        hint="convert from the training checkpoint itself, or from mapc's "
                             "conversion of it (its mapc.json keeps them)")
    for g in src_groups:
        lacking = [k for k in trainer.REQUIRED_HYPER if k not in g]
        if lacking:
            raise MapcError(f"--with-optimizer: a source param group lacks "
                            f"{', '.join(lacking)}", where=where)
    if training.get("step") is None:
        raise MapcError("--with-optimizer: the source does not state the optimizer step",
                        where=where)
    step = float(training["step"])
    it = training.get("iteration")
    global_step = int(it) if it is not None else int(step)
    from mapc.compiler.program import compile_program
    numbering = program if module is None else compile_program(program.source, numbered)
    group_of = {name: g for (_, name), g in
                numbering.target_groups([list(g.get("params") or []) for g in
                                         src_groups]).items()}
    hypers = []
    for k, names in enumerate(groups):
        used = sorted({group_of[n] for n in names}) or [0]
        hyper = trainer.hyper_of(src_groups[used[0]])
        for other in used[1:]:
            if not trainer.same_hyper(hyper, trainer.hyper_of(src_groups[other])):
                raise MapcError(
                    f"--with-optimizer: Trainer's {'decay' if k == 0 else 'no-decay'} group "
                    f"takes parameters from source groups {used} whose hyper-parameters "
                    f"differ ({_diff(hyper, trainer.hyper_of(src_groups[other]))}); one "
                    f"Trainer group cannot hold both", where=where,
                    hint="Trainer groups parameters by weight decay (hf_trainer.py)")
        if not names and k == 1:
            hyper["weight_decay"] = 0.0
        hypers.append(hyper)
    sched = training.get("lr_scheduler")
    if not (trainer.is_torch_scheduler(sched) and len(sched["base_lrs"]) == len(groups)):
        if sched is not None:
            notes.append("the source's LR scheduler state is not a torch scheduler of "
                         "Trainer's two groups; scheduler.pt holds a constant schedule at the "
                         "current learning rate (resume with lr_scheduler_type='constant' or "
                         "set the schedule)")
        sched = None
    plan = _TrainerPlan(tuple(tuple(g) for g in groups), tuple(hypers), step, global_step,
                        sched, training.get("trainer_state"), trainer.micro_batch(training),
                        module)
    return plan, notes


class TrainerExport:
    """Writes a _TrainerPlan: moments stream into optimizer.pt as they arrive; the state
    dict's structure is pickled at the end."""

    def __init__(self, tmpdir, plan: _TrainerPlan):
        self.dir = Path(tmpdir)
        self.plan = plan
        self.moments: dict[str, dict] = {}
        self.writer = None
        self.held: dict[tuple, np.ndarray] = {}     # (slot, stored name): awaiting its unit
        self.unit_of = {}
        if plan.module is not None:
            for unit in plan.module.units:
                for inst in unit.sources:
                    for _, _, name in inst.shards:
                        self.unit_of[name] = unit

    def begin_slot(self, slot, tensors):
        if self.writer is None:
            self.writer = torchfile.TorchWriter(self.dir / trainer.OPTIMIZER)

    def write(self, slot, name, arr):
        if self.plan.module is None:
            self.moments.setdefault(name, {})[slot] = self.writer.add_tensor(
                np.require(arr, requirements="C"))
            return
        # the module's parameters are cut from the stored tensors once a unit's are all here
        self.held[(slot, name)] = np.array(arr)
        unit = self.unit_of[name]
        stored = [n for inst in unit.sources for _, _, n in inst.shards]
        if all((slot, n) in self.held for n in stored):
            self._cut(slot, unit)
            for n in stored:
                del self.held[(slot, n)]

    def read(self, name, coord=SINGLE, slot="param"):       # the cut's source reader
        return self.held[(slot, name)]

    def _cut(self, slot, unit):
        from mapc.runtime import execute
        be = execute.get_backend("numpy")
        logical = execute.read_instances(unit.sources, self, be, execute.Report(), False, slot)
        for inst in unit.targets:
            members = {m: logical[k] for m, k in inst.members.items()}
            for rc, _, name in inst.shards:
                arr = be.to_numpy(inst.recipe.shard(be, members, dict(rc)))
                self.moments.setdefault(name, {})[slot] = self.writer.add_tensor(
                    np.ascontiguousarray(arr))

    def finish(self, record: dict):
        plan = self.plan
        state = {}
        for i, name in enumerate(plan.order):
            got = self.moments.get(name, {})
            if set(got) != {"exp_avg", "exp_avg_sq"}:
                raise MapcError(f"internal: the optimizer state of {name} was not written")
            state[i] = {"step": self.writer.add_tensor(np.asarray(plan.step, np.float32)),
                        "exp_avg": got["exp_avg"], "exp_avg_sq": got["exp_avg_sq"]}
        groups, start = [], 0
        for hyper, names in zip(plan.hyper, plan.groups):
            groups.append({**hyper, "params": list(range(start, start + len(names)))})
            start += len(names)
        self.writer.finish({"state": state, "param_groups": groups})
        sched = plan.scheduler
        if sched is None:
            sched = trainer.constant_scheduler([float(h["lr"]) for h in plan.hyper],
                                               plan.global_step)
        w = torchfile.TorchWriter(self.dir / trainer.SCHEDULER)
        w.finish(sched)
        state_json = plan.trainer_state if isinstance(plan.trainer_state, dict) else \
            trainer.trainer_state(plan.global_step, plan.train_batch_size)
        write_json(self.dir / trainer.TRAINER_STATE, state_json)

    def abort(self):
        if self.writer is not None:
            self.writer.abort()


def _diff(a: dict, b: dict) -> str:
    keys = [k for k in dict.fromkeys([*a, *b]) if not trainer.same_hyper({k: a.get(k)},
                                                                          {k: b.get(k)})]
    return ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:3])


class HFWriter(PlannedWriter):
    """Executes an hf WritePlan: one SafetensorsWriter per planned shard, opened in begin."""
    keeps_arrays = False    # every array is written before write() returns
    takes_ranges = True     # FileBytes: its bytes are copied from the source files

    def begin(self, tensors):
        d: _HFPlan = self.plan.detail
        self.writers, self.file_of = {}, {}
        self.export = TrainerExport(self.dir, d.export) if d.export is not None else None
        for fname, group in d.shards:
            if self.owns(fname):
                self.writers[fname] = SafetensorsWriter(self.dir / fname, list(group),
                                                        {"format": "pt"})
            for name, _, _ in group:
                self.file_of[name] = fname

    def _exports(self) -> bool:
        """Whether this writer writes Trainer's files (a worker of a parallel run may not)."""
        return self.export is not None and self.owns(trainer.OPTIMIZER)

    def begin_slot(self, slot, tensors):
        if self._exports():
            self.export.begin_slot(slot, tensors)

    def write_slot(self, slot, coord, name, arr):
        self.export.write(slot, name, arr)

    def write(self, coord, name, arr):
        w = self.writers.get(self.file_of[name])
        if w is not None:               # else the optimizer's worker, given every weight
            w.write(name, arr)

    def finish(self, record: dict):
        d: _HFPlan = self.plan.detail
        for w in self.writers.values():
            w.close()
        if self._exports():
            self.export.finish(record)
        if not self.metadata:
            return
        if len(d.shards) > 1:
            write_json(self.dir / "model.safetensors.index.json",
                       {"metadata": {"total_size": d.total}, "weight_map": self.file_of})
        if "config.json" in self.plan.files:    # generic mode may have no model config
            config = dict(record["config"])
            if d.config_dtype is not None:
                config["dtype"] = d.config_dtype
            if d.quantization_config is not None:
                config["quantization_config"] = d.quantization_config
            write_json(self.dir / "config.json", config)
        write_json(self.dir / MAPC_JSON, record)

    def abort(self):
        if getattr(self, "export", None) is not None:
            self.export.abort()


Writer = HFWriter
Source = HFSource
