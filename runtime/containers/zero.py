"""One DeepSpeed ZeRO optimizer, written: the flat param groups of one model-parallel rank's
parameters, partitioned over the data-parallel ranks.

Shared by every writer of DeepSpeed optimizer files: ``deepspeed`` (one model-parallel rank),
``neox`` (one per pipeline stage and tensor-parallel rank) and ``universal`` (the stage 1/2
header of its ``optimizer_state.pt``). The partition formulas are in
docs/formats/deepspeed.md. Each data-parallel rank's optimizer ``.pt`` is laid out as soon as
the partitioning is known (every flat tensor's zip member reserved at its final offset), and
every arriving optimizer tensor (fp32 master, Adam moments) is written at once, with
``pwrite``, into its pieces' places in the ranks' files: each optimizer byte is written once,
never read back (the CRC-32 of each flat tensor is combined from its pieces'). Padding is left
as holes, which read as zeros. Resident memory: the tensor being scattered. A process of a
parallel run lays out the files of the ranks it writes only.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mapc.runtime import torchfile

DS_VERSION = "0.19.8"       # the DeepSpeed version whose files mapc writes (and was tested with)
ZERO_STAGE_ENUM = ("deepspeed.runtime.zero.config", "ZeroStageEnum")
OPTIM_SLOTS = ("master", "exp_avg", "exp_avg_sq")
DEFAULT_SUB_GROUP_SIZE = 1_000_000_000
# torch.optim.AdamW's param_group keys and defaults (torch 2.x), for groups a source lacks
ADAMW_DEFAULTS = {"weight_decay": 0.01, "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8,
                  "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                  "differentiable": False, "fused": None, "decoupled_weight_decay": True}

LossScaler = torchfile.record_type("deepspeed.runtime.fp16.loss_scaler", "LossScaler")
FragmentAddress = torchfile.record_type("deepspeed.utils.tensor_fragment", "fragment_address")


def _zero_stage_value(value=0, *rest):
    """ZeroStageEnum is an int enum: its plain value is all a reader needs."""
    if type(value) is not int:
        raise TypeError(f"ZeroStageEnum of a {type(value).__name__}")
    return value


#: What DeepSpeed's pickles (and those of the frameworks built on it: NeoX, universal
#: checkpoints) may name, besides the core torch/numpy globals.
DEEPSPEED_PICKLES = torchfile.allow_list(
    "DeepSpeed", LossScaler, FragmentAddress,
    {".".join(ZERO_STAGE_ENUM): _zero_stage_value})


def zero_stage(stage: int) -> torchfile.Call:
    """Pickled as DeepSpeed's ``ZeroStageEnum(stage)``."""
    return torchfile.Call(*ZERO_STAGE_ENUM, (int(stage),))


def torch_size(shape) -> torchfile.Call:
    """Pickled as ``torch.Size(shape)``, as DeepSpeed records ``param_shapes``."""
    return torchfile.Call("torch", "Size", (tuple(int(d) for d in shape),))


def hyper(group) -> dict:
    """A torch AdamW param group's hyper-parameters (no params), completed with its defaults."""
    out = {k: v for k, v in dict(group).items() if k != "params"}
    for k, v in ADAMW_DEFAULTS.items():
        out.setdefault(k, v)
    if isinstance(out.get("betas"), list):
        out["betas"] = tuple(out["betas"])
    return out


def partition_size(total: int, dp: int) -> int:
    """P_g: each rank's share of a stage 1/2 group of ``total`` elements (DeepSpeed aligns the
    flattened group to 2 * dp elements: nccl_start_alignment_factor 2)."""
    align = 2 * dp
    return -(-total // align) * align // dp


def stage12_header(paddings, counts, dp: int, stage: int, clip: float, scale: float) -> dict:
    """The entries of a stage 1/2 ``optimizer_state_dict`` (DeepSpeedZeroOptimizer) before its
    per-rank tensors; ``counts`` the number of params per group."""
    return {"loss_scaler": LossScaler(cur_scale=float(scale), dynamic=False),
            "dynamic_loss_scale": False, "overflow": False, "clip_grad": float(clip),
            "zero_stage": zero_stage(stage), "group_paddings": list(paddings),
            "param_alignment_paddings": [[0] * n for n in counts],
            "partition_count": [dp] * len(counts), "ds_version": DS_VERSION}


TRAINING_DTYPES = {"float32": "fp32", "bfloat16": "bf16"}


def training_config(cfg: dict, has_settings: bool, src_dp: int, dp: int, stage: int, dtype: str,
                    notes: list, where: str = "ds_config.json") -> tuple[dict, str]:
    """The DeepSpeed config to resume with at ``dp`` ranks (batch settings kept, ZeRO stage,
    bf16 or fp32), and the ZeRO optimizer kind DeepSpeed builds from it ("zero", "bf16" or
    "stage3"). ``cfg`` is modified; what changed is appended to ``notes``, which call the
    written config ``where``."""
    from mapc.errors import MapcError
    from mapc.runtime.resume import rebatch
    if not has_settings:
        cfg.update({"train_batch_size": dp, "train_micro_batch_size_per_gpu": 1,
                    "gradient_accumulation_steps": 1,
                    "zero_optimization": {"stage": stage},
                    "zero_allow_untested_optimizer": True})
        notes.append(f"the source carries no DeepSpeed config: {where} is a minimal "
                     f"one (ZeRO stage {stage}, {TRAINING_DTYPES[dtype]}, micro "
                     f"batch 1 per GPU, no accumulation); edit it before resuming")
    else:
        cfg, batch_notes = rebatch(cfg, src_dp, dp)
        notes.extend(batch_notes)
        cfg.setdefault("zero_optimization", {})["stage"] = stage
    for key in ("fp16",):
        if (cfg.get(key) or {}).get("enabled"):
            raise MapcError("fp16 DeepSpeed training keeps a dynamic loss scaler that mapc "
                            "does not write", hint="pass --dtype bf16 or --dtype fp32")
    was_bf16 = bool((cfg.get("bf16") or cfg.get("bfloat16") or {}).get("enabled"))
    is_bf16 = dtype == "bfloat16"
    if is_bf16:
        cfg.pop("bfloat16", None)
        cfg.setdefault("bf16", {})["enabled"] = True
    else:
        for key in ("bf16", "bfloat16"):
            if key in cfg:
                cfg[key] = dict(cfg[key], enabled=False)
    if has_settings and was_bf16 != is_bf16:
        notes.append(f"the training dtype changes from {'bf16' if was_bf16 else 'fp32'} to "
                     f"{TRAINING_DTYPES[dtype]} (the weights written are "
                     f"{dtype}); {where} says so")
    ckpt = cfg.get("checkpoint")
    if isinstance(ckpt, dict) and ckpt.get("load_universal"):
        cfg["checkpoint"] = {k: v for k, v in ckpt.items() if k != "load_universal"} or None
        if cfg["checkpoint"] is None:
            del cfg["checkpoint"]
        notes.append(f"{where} drops checkpoint.load_universal: the output is a native "
                     f"checkpoint")
    accum = str((cfg.get("data_types") or {}).get("grad_accum_dtype", "")).lower()
    kind = "stage3" if stage == 3 else (
        "bf16" if is_bf16 and stage == 1 and accum in ("fp32", "float32") else "zero")
    return cfg, kind


def model_states(module: dict, order, aliases: dict, param_shapes: list, stage: int, *,
                 scheduler, steps: int, samples: int, dp: int, ds_config: dict,
                 buffers=(), frozen=None, fragments=None) -> dict:
    """A DeepSpeed engine's model states file (``mp_rank_00_model_states.pt``, or every rank's
    at stage 3), keys in DeepSpeed's order. ``module`` maps names to tensors (placeholders);
    ``aliases`` (the spec's tied-weight names) are listed again, as the module's state_dict
    does, and recorded in ``shared_params``. ``buffers`` names the module's buffers;
    ``frozen`` maps the parameters no optimizer holds to their shapes and ``fragments`` to
    their values (this rank's partition at stage 3), which DeepSpeed saves at stages 2 and 3."""
    mod = OrderedDict((n, module[n]) for n in order)
    mod.update((a, module[t]) for a, t in aliases.items())
    frozen = frozen or {}
    return {
        "module": mod,
        "buffer_names": [n for n in order if n in set(buffers)],
        "optimizer": None,
        "param_shapes": param_shapes,
        "frozen_param_shapes": OrderedDict((n, torch_size(s)) for n, s in frozen.items())
        if stage >= 2 else None,
        "shared_params": dict(aliases),
        "frozen_param_fragments": OrderedDict((n, (fragments or {})[n]) for n in frozen)
        if stage >= 2 else None,
        "lr_scheduler": scheduler,
        "data_sampler": None,
        "random_ltd": None,
        "skipped_steps": 0,
        "global_steps": steps,
        "global_samples": int(samples),
        "dp_world_size": dp,
        "mp_world_size": 1,
        "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1},
        "ds_config": ds_config,
        "ds_version": DS_VERSION,
    }


def plain(obj):
    """A config from a pickle (records, tuples) as JSON-able plain values."""
    if isinstance(obj, dict) or hasattr(obj, "items"):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


@dataclass(frozen=True)
class ResumePlan:
    """The ZeRO decisions of one output of the DeepSpeed family (deepspeed, universal, neox),
    all made by :func:`plan_resume`: ZeRO ``stage``, data-parallel sizes (``src_dp``, ``dp``),
    whether the optimizer is ``fresh`` (the source has no Adam moments), the optimizer
    ``step``, the ``iteration``, the DeepSpeed config written (``cfg``, rebatched for ``dp``;
    ``has_settings``: the source had one), the optimizer class DeepSpeed builds from it
    (``kind``), gradient clipping and loss scale (``clip``, ``scale``), and the one training
    ``dtype`` of the weights."""
    target: str
    stage: int
    dp: int
    src_dp: int
    fresh: bool
    step: float
    iteration: int
    cfg: dict
    has_settings: bool
    kind: str | None
    clip: float
    scale: float
    dtype: str | None

    def decisions(self) -> dict:
        return {"zero stage": self.stage, "dp": self.dp, "source dp": self.src_dp,
                "optimizer": "fresh" if self.fresh else "the source's",
                "step": self.step, "iteration": self.iteration,
                "optimizer class": self.kind, "training dtype": self.dtype}


_WHAT = {"deepspeed": "DeepSpeed", "neox": "neox", "universal": "universal"}


def plan_resume(facts, request, target: str, dtypes, notes: list, *, optim: bool = True,
                config_name: str = "ds_config.json") -> ResumePlan:
    """Every ZeRO decision of a ``target`` output ("deepspeed", "universal" or "neox") from
    the source facts and the request; what the user should know is appended to ``notes``
    (the plan's own list). ``dtypes``: the set of dtypes of the weights to write; ``optim``:
    whether the output carries optimizer state at all (a weights-only neox output does not).
    Raises MapcError for what DeepSpeed cannot train."""
    import json
    from mapc.errors import MapcError
    ts = facts.training
    mine = notes if optim else []
    src_dp = ts.get("dp_world_size") or 1
    if isinstance(src_dp, float) and src_dp.is_integer():
        src_dp = int(src_dp)
    if not isinstance(src_dp, (int, np.integer)) or not 1 <= src_dp <= 2**16:
        raise MapcError(f"the source's dp_world_size {src_dp!r} is not a data-parallel size",
                        where=str(facts.path), hint="is the checkpoint corrupt?")
    src_dp = int(src_dp)
    dp = request.dp or src_dp
    cfg = ts.get("ds_config")
    has_settings = isinstance(cfg, dict) and bool(cfg)
    cfg = json.loads(json.dumps(plain(cfg))) if has_settings else {}
    src_stage = ts.get("zero_stage")
    if src_stage is None:
        src_stage = (cfg.get("zero_optimization") or {}).get("stage")
    src_stage = None if src_stage is None else int(src_stage)
    fresh = not facts.has_moments
    step = ts.get("step")
    if target == "universal":
        if fresh:
            mine.append("the source has no optimizer state: the universal checkpoint gets fp32 "
                        "master weights = the weights, zero Adam moments and step 0 (training "
                        "resumes with a fresh optimizer)")
        elif step is None:
            mine.append("the source does not record the optimizer step; wrote step 0 "
                        "(Adam's bias correction restarts)")
    elif fresh:
        mine.append(f"the source has no optimizer state: the {_WHAT[target]} checkpoint gets a "
                    f"fresh optimizer (fp32 master = the weights, zero Adam moments, step 0)")
    step = float(step) if step is not None and not fresh else 0.0
    stage = _stage(target, facts, request, src_stage, fresh, dp, mine)
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else None
    kind = None
    if target != "universal" and optim:
        if dtype not in TRAINING_DTYPES:
            what = "module" if target == "deepspeed" else "pipeline"
            raise MapcError(f"a DeepSpeed {what} is trained in one dtype, fp32 or bf16; the "
                            f"weights to write are {', '.join(sorted(dtypes)) or 'none'}",
                            hint="pass --dtype fp32 or --dtype bf16")
        cfg, kind = training_config(cfg, has_settings, src_dp, dp, stage, dtype, mine,
                                    config_name)
    clip = ts.get("clip_grad") if not fresh else None
    if clip is None:
        clip = float(cfg.get("gradient_clipping", 1.0))
    scale = ts.get("loss_scale") if not fresh else None
    if optim and not fresh and "master" not in facts.slots and dtype != "float32" and \
            target != "universal":
        mine.append(f"the source has no fp32 master weights: they are the {dtype} weights "
                    f"upcast to fp32")
    return ResumePlan(target, stage, dp, src_dp, fresh, step, int(ts.get("iteration") or 0),
                      cfg, has_settings, kind, float(clip),
                      1.0 if scale is None else float(scale), dtype)


def _stage(target, facts, request, src_stage, fresh, dp, notes) -> int:
    """The ZeRO stage of the output: --zero-stage, else the source's, else 1 (noted)."""
    from mapc.errors import MapcError
    asked = request.zero_stage
    if target == "neox":
        if asked is not None and asked != 1:
            raise MapcError(f"--to neox does not take --zero-stage {asked}: DeepSpeed pipelines "
                            f"train with ZeRO stage 0 or 1, and neox output is written at "
                            f"stage 1", hint="drop --zero-stage (or pass --zero-stage 1)")
        stage = asked if asked is not None else src_stage
        if stage is not None and stage > 1:
            raise MapcError(f"the source trained with ZeRO stage {stage}; DeepSpeed pipelines "
                            f"train with ZeRO stage 0 or 1", where=facts.path)
        if (stage is None and not fresh) or stage == 0:
            notes.append(f"the source carries {'no' if stage is None else 'a stage 0'} "
                         f"ZeRO optimizer: the neox checkpoint gets ZeRO stage 1 "
                         f"optimizer files at dp={dp}")
        return 1
    stage = asked if asked is not None else src_stage
    if target == "universal":
        stage = stage or 1
        carried = facts.zero is not None and facts.zero.carry_files
        if carried and src_stage and src_stage != stage and (stage == 3) != (src_stage == 3):
            raise MapcError(f"the source is a ZeRO stage {src_stage} checkpoint; a universal "
                            f"checkpoint for stage {stage} needs other model states files",
                            hint="convert it without a ZeRO stage option")
        return int(stage)
    if stage is None:
        notes.append(f"the source carries no DeepSpeed ZeRO stage: writing ZeRO stage 1 "
                     f"at dp={dp}")
        stage = 1
    if stage not in (1, 2, 3):
        raise MapcError(f"ZeRO stage {stage} has no partitioned optimizer state to write",
                        hint="DeepSpeed checkpoints are written at ZeRO stage 1, 2 or 3")
    return int(stage)


class Flat:
    """One flat optimizer tensor per rank: a ZeRO 1/2 param group, or a stage-3 sub-group.

    ``length`` elements on every rank; ``base`` its offset in the rank's scratch file;
    ``at[name] = offset``: the param's offset in the group's flattened order (stages 1/2) or
    in every rank's partition (stage 3)."""

    def __init__(self, group, names, numels, dp, stage3):
        self.group, self.names, self.numels = group, names, numels
        self.numel_of = dict(zip(names, numels))
        self.total = sum(numels)
        self.at = {}
        off = 0
        for name, n in zip(names, numels):
            self.at[name] = off
            off += -(-n // dp) if stage3 else n
        self.length = off if stage3 else partition_size(self.total, dp)   # F_s or P_g
        self.base = 0

    def pieces(self, name, dp, stage3):
        """(rank, element range in the flattened param, offset in the rank's flat tensor)."""
        n = self.numel_of[name]
        off = self.at[name]
        if stage3:
            part = -(-n // dp)
            for r in range(dp):
                lo, hi = r * part, min(n, (r + 1) * part)
                if lo < hi:
                    yield r, lo, hi, off
        else:
            P = self.length
            for r in range(dp):
                lo, hi = max(off, r * P), min(off + n, (r + 1) * P)
                if lo < hi:
                    yield r, lo - off, hi - off, lo - r * P

    def padding(self, r):
        """Padding elements inside rank r's partition (stages 1/2)."""
        return max(0, min(self.length, (r + 1) * self.length - self.total))


class ZeroOptimizer:
    """The ZeRO optimizer of one model-parallel rank.

    ``groups``: per param group, the ``(name, numel)`` of its params in DeepSpeed's flat
    order. ``kind``: "zero" (DeepSpeedZeroOptimizer, stages 1/2), "bf16" (BF16_Optimizer) or
    "stage3". Call :meth:`scatter` for every param and slot, then :meth:`write_rank` per
    data-parallel rank; :meth:`remove` deletes what is left unfinished (after a failure).

    ``files``: data-parallel rank -> the path of its optimizer ``.pt``, for the ranks this
    process writes (a worker of a parallel run, runtime/workers.py: its own; none: the flat
    layout alone, which gives the model states' param_shapes and the workers' parts). Each
    file is laid out at once (torchfile.TorchWriter.reserve_tensor: every flat tensor's zip
    member, its size known from the partitioning) and every arriving optimizer tensor's
    pieces are written straight into their place in it, each optimizer byte once; the CRC-32
    of a flat tensor is combined from its pieces' at :meth:`write_rank`. Between calls no file
    is open. Resident memory: the tensor being scattered."""

    def __init__(self, files, groups, dp: int, stage: int, kind: str,
                 sub_group_size: int = DEFAULT_SUB_GROUP_SIZE):
        self.dp, self.stage, self.kind = dp, stage, kind
        files = dict(files or {})
        self.ranks = frozenset(files)
        stage3 = stage == 3
        self.flats: list[Flat] = []
        self.subgroups: list[list[int]] = []
        for g, members in enumerate(groups):
            names = [n for n, _ in members]
            numels = [k for _, k in members]
            if not stage3:
                self.subgroups.append([len(self.flats)])
                self.flats.append(Flat(g, names, numels, dp, False))
                continue
            mine, cur, run = [], [], 0          # stage 3: cut into sub-groups
            for i, k in enumerate(numels):
                cur.append(i)
                run += -(-k // dp)
                if run >= sub_group_size or i == len(names) - 1:
                    mine.append(len(self.flats))
                    self.flats.append(Flat(g, [names[j] for j in cur],
                                           [numels[j] for j in cur], dp, True))
                    cur, run = [], 0
            self.subgroups.append(mine)
        self.flat_of = {n: f for f in self.flats for n in f.names}
        self.index = {id(f): i for i, f in enumerate(self.flats)}
        base = 0
        for f in self.flats:
            f.base = base
            base += f.length
        self.rank_len = base
        self.writers: dict = {}     # rank -> (TorchWriter, per flat {slot or "step": placeholder})
        try:
            for r in sorted(self.ranks):
                self.writers[r] = self._lay_out(Path(files[r]), r)
        except BaseException:
            self.remove()
            raise

    def _lay_out(self, path: Path, r: int):
        """Rank r's optimizer file with its flat tensors' members in place (in the order
        ``_optim_state`` names them), their bytes to come."""
        w = torchfile.TorchWriter(path)
        members = []
        for f in self.flats:
            keep = f.length - f.padding(r) if self.kind == "zero" else f.length
            members.append({"step": w.reserve_tensor("float32", ()),
                            "exp_avg": w.reserve_tensor("float32", (f.length,)),
                            "exp_avg_sq": w.reserve_tensor("float32", (f.length,)),
                            "master": w.reserve_tensor("float32", (keep,), requires_grad=True)})
        w.suspend()
        return w, members

    def scatter(self, slot, name, arr):
        """Write every rank's piece of ``name`` in ``slot`` into its place in that rank's
        file. Files are opened per piece, so a writer with many model-parallel and
        data-parallel ranks holds no descriptors. Only the pieces of the ranks this process
        writes (``ranks``) are written."""
        if not self.ranks:
            return
        flat = np.asarray(arr, dtype=np.float32).reshape(-1)
        f = self.flat_of[name]
        i = self.index[id(f)]
        for r, lo, hi, at in f.pieces(name, self.dp, self.stage == 3):
            if r in self.writers:
                w, members = self.writers[r]
                w.fill(members[i][slot], at * 4, flat[lo:hi])

    def remove(self):
        """Abort (delete) the optimizer files not yet written."""
        for w, _ in self.writers.values():
            w.abort()
        self.writers = {}

    def names_on(self, r: int) -> frozenset:
        """The params with elements in data-parallel rank r's partitions: what rank r's
        optimizer file is fed by (at stage 3, every param)."""
        return frozenset(n for f in self.flats for n in f.names
                         if any(rr == r for rr, *_ in f.pieces(n, self.dp, self.stage == 3)))

    def param_shapes(self, shapes: dict) -> list:
        """The model states' ``param_shapes``: per flat group (a stage 3 sub-group), name ->
        torch.Size."""
        return [OrderedDict((n, torch_size(shapes[n])) for n in f.names) for f in self.flats]

    def write_rank(self, r: int, *, hyper_params, step, clip, scale, ds_config):
        """Data-parallel rank r's optimizer file, its flat tensors all scattered: the step,
        the pickle and the zip directory."""
        w, members = self.writers.pop(r)
        try:
            for m in members:
                w.fill(m["step"], 0, np.array(float(step), np.float32))
            osd = self._optim_state(members, r, hyper_params, float(clip), float(scale))
            w.finish({"optimizer_state_dict": osd, "ds_config": ds_config,
                      "ds_version": DS_VERSION})
        except BaseException:
            w.abort()
            raise

    def _optim_state(self, members, r, hyper_params, clip, scale):
        dp, ngroups = self.dp, len(self.subgroups)
        state = {s: {k: m[k] for k in ("step", "exp_avg", "exp_avg_sq")}
                 for s, m in enumerate(members)}
        fp32 = [m["master"] for m in members]
        param_groups = [dict(hyper_params[g], params=list(self.subgroups[g]))
                        for g in range(ngroups)]
        torch_state = {"state": state, "param_groups": param_groups}
        if self.kind == "stage3":
            return {"zero_stage": zero_stage(3),
                    "loss_scaler": LossScaler(cur_scale=scale, dynamic=False),
                    "dynamic_loss_scale": False, "overflow": False,
                    "partition_count": dp, "optimizer_state_dict": torch_state,
                    "fp32_flat_groups": fp32}
        mappings = []
        for f in self.flats:
            m = OrderedDict()
            for name in f.names:
                for rr, lo, hi, at in f.pieces(name, dp, False):
                    if rr == r:
                        m[name] = FragmentAddress(numel=hi - lo, start=at)
            mappings.append(m)
        if self.kind == "bf16":
            return {"clip_grad": clip, "base_optimizer_state": torch_state,
                    "single_partition_of_fp32_groups": fp32,
                    "group_paddings": [(f.length * dp - f.total) if r == dp - 1 else 0
                                       for f in self.flats],
                    "partition_count": [dp] * ngroups, "ds_version": DS_VERSION,
                    "param_slice_mappings": mappings}
        out = stage12_header([f.padding(r) for f in self.flats],
                             [len(f.names) for f in self.flats], dp, self.stage, clip, scale)
        out.update(base_optimizer_state=torch_state, single_partition_of_fp32_groups=fp32,
                   param_slice_mappings=mappings)
        # DeepSpeed's own key order
        order = ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad",
                 "base_optimizer_state", "single_partition_of_fp32_groups", "zero_stage",
                 "group_paddings", "param_alignment_paddings", "partition_count",
                 "ds_version", "param_slice_mappings")
        return {k: out[k] for k in order}

