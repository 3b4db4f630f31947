"""megatron-core distributed checkpoints: Megatron-LM's ``--ckpt-format torch_dist``.

A root holds ``latest_checkpointed_iteration.txt`` (an iteration or ``release``) and
``iter_NNNNNNN/`` (or ``release/``); the iteration directory holds what megatron-core's
``dist_checkpointing.save`` writes with its ``torch_dist`` backend:

* ``metadata.json``: ``{"sharded_backend": "torch_dist", "sharded_backend_version": 1,
  "common_backend": "torch", ...}``;
* a torch.distributed.checkpoint directory: ``.metadata`` (a pickled DCP ``Metadata``) and
  ``__R_K.distcp`` data files, each chunk a ``torch.save`` archive at an offset recorded in
  ``.metadata`` (which file holds a chunk depends on which rank saved it);
* ``common.pt``: everything that is not a sharded tensor: ``args`` (Megatron-LM's
  ``argparse.Namespace``), ``iteration``, ``checkpoint_version``, ``opt_param_scheduler``,
  ``content_metadata`` (``singleton_local_shards``, the optimizer's sharding type, ...).

The tensors are **global**: the same whatever TP/PP saved them. A TransformerBlock's layers are
**stacked** on a leading axis of all its layers (global layer numbers, across pipeline stages):
``decoder.layers.self_attention.linear_qkv.weight`` is ``[layers, (nh+2ng)*hd, H]``. The spec
names layer ``i``'s slab of such a tensor ``NAME[i]`` (``"NAME[{i}]"`` in a layout), and this
container presents every stacked tensor as those slabs, each read on its own from the chunks
that hold it (megatron-core saves one chunk per layer and tensor-parallel rank), so no stacked
tensor is ever materialized whole. Which keys are stacked is megatron-core's rule: the ones
under a ``layers.`` prefix not followed by a layer number. ``..._extra_state`` entries are
pickled objects (bytes entries in ``.metadata``), not weights.

The distributed optimizer's ``dp_reshardable`` state (flat fp32 buckets per model-parallel
rank, ``optimizer.distributed.*``) is read as the slots ``master``/``exp_avg``/``exp_avg_sq`` of
the global tensors: where each parameter sits is derived from the spec's megatron layout
(:mod:`mapc.runtime.containers.distopt`) once resolve has matched the spec (``bind_plan``).

Everything is read without torch: ``.metadata`` and the chunks through the ``dcp`` container's
restricted readers, ``common.pt`` through mapc's restricted unpickler.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mapc.errors import MapcError
from mapc.runtime import torchfile
from mapc.runtime.containers import dcp
from mapc.runtime.containers.megatron import ENUM_GLOBALS, TRACKER, tracked_iteration
from mapc.runtime.backends import dtype_name
from mapc.runtime.containers.base import MAPC_JSON, Source, write_json
from mapc.runtime.plan_write import (PlannedWriter, SourceFacts, WritePlan, WriteRequest,
                                     cast_dtype, make_plan, planned_tensors)

LAYOUT = "torch_dist"
METADATA_JSON = "metadata.json"
COMMON = "common.pt"
SINGLE = ()
PICKLES = torchfile.allow_list("megatron-core torch_dist", ENUM_GLOBALS)
# a key of megatron-core's stacked layers: "<block>.layers.<not a layer number>..."
_STACKED = re.compile(r"(?:^|\.)layers\.(?!\d+(?:\.|$))")
# the local spec's norms (plain torch modules, no _extra_state): input_layernorm,
# pre_mlp_layernorm, MTP's enorm/hnorm/final_layernorm, ...
_NORM = re.compile(r"norm\.weight$")
# a key of a layer megatron-core keeps unstacked (non-homogeneous layers, e.g. dense and MoE)
_NUMBERED = re.compile(r"(?:^|\.)layers\.\d+\.")
_SLAB = re.compile(r"^(.*)\[(\d+)\]$")


def _backend(d: Path) -> str | None:
    """The ``sharded_backend`` named by ``d/metadata.json``, or None if there is none."""
    f = d / METADATA_JSON
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise MapcError(f"cannot read {METADATA_JSON}: {e}", where=str(f),
                        hint="re-copy the checkpoint") from None
    backend = meta.get("sharded_backend") if isinstance(meta, dict) else None
    return backend if isinstance(backend, str) else None


def iteration_dir(path: Path) -> Path:
    """The directory holding the distributed checkpoint: PATH itself, or the one the tracker
    names, or the newest ``iter_*`` / ``release``."""
    path = Path(path)
    if (path / METADATA_JSON).is_file():
        return path
    tracked = tracked_iteration(path, hint="copy the complete checkpoint")
    if tracked is not None:
        return tracked
    iters = sorted(p for p in path.iterdir() if p.is_dir() and (p / METADATA_JSON).is_file()
                   and (p.name == "release" or p.name.startswith("iter_")))
    if iters:
        return iters[-1]
    raise MapcError(f"no distributed checkpoint here (no {METADATA_JSON}, no {TRACKER})",
                    where=str(path))


def detect(path: Path) -> bool:
    if not path.is_dir():
        return False
    try:
        return _backend(iteration_dir(path)) is not None
    except (MapcError, OSError, ValueError):
        return False


# --tp/--pp of a torch_dist target are the training run's sizes, which only the layout's
# parameters see (the tensors are global): mapc.api passes them as these parameters.
TOPOLOGY_PARAMS = {"tp": "tp_size", "pp": "pp_size", "ep": "ep_size"}
DATA = "__0_0.distcp"
BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
           "common_backend": "torch", "common_backend_version": 1}
# what Megatron-LM records as content_metadata for a model saved with its default flags
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                    "distrib_optim_sharding_type": "dp_reshardable"}


def _iteration_name(iteration) -> str:
    return f"iter_{iteration:07d}" if isinstance(iteration, int) else "release"


def plan_write(program, facts: SourceFacts, request: WriteRequest) -> WritePlan:
    """The tracker, one iteration directory (the source's iteration, else ``release``) with
    ``metadata.json``, ``common.pt``, ``.metadata`` and one data file, and mapc.json. A source
    with Adam moments gets megatron-core's distributed optimizer state (``dp_reshardable``) at
    ``--dp`` (default: the source's data-parallel size): see :class:`_OptimizerPlan`."""
    iteration = facts.training.get("iteration")
    iteration = int(iteration) if isinstance(iteration, (int, np.integer)) else None
    optimizer = None
    slots = ("param",)
    decisions = {}
    notes = []
    if facts.has_moments:
        optimizer = _plan_optimizer(program, facts, request)
        slots = ("param", "master", "exp_avg", "exp_avg_sq")
        iteration = iteration or 0
        decisions = {"optimizer": f"distributed ({optimizer.kind}), the source's state",
                     "dp": optimizer.dp}
        if optimizer.vpp > 1:
            decisions["vpp"] = optimizer.vpp
        if optimizer.kind == "dp_reshardable":
            decisions |= {"transformer_impl": optimizer.impl, "buckets": optimizer.describe()}
            chunks = f", vpp={optimizer.vpp} (one DDP per model chunk)" \
                if optimizer.vpp > 1 else ""
            notes.append(f"the distributed optimizer's state is laid out for dp={optimizer.dp}"
                         f"{chunks}, transformer_impl={optimizer.impl} (megatron-core's "
                         f"parameter order), one DDP bucket per rank (no "
                         f"--overlap-grad-reduce): resume with those")
    else:
        for opt, key, what in (("--dp", "dp", "data-parallel size"),
                               ("--vpp", "vpp", "virtual pipeline size"),
                               ("--optim-sharding", "optim_sharding", "sharding type")):
            value = getattr(request, key)
            if value is not None and key in request.explicit:   # not taken from --like
                raise MapcError(f"{opt} {value} sets the distributed optimizer's {what}, but "
                                f"the source has no optimizer state",
                                hint=f"drop {opt} (the weights are global: any data-parallel "
                                     f"size and virtual pipeline loads them)")
    sub = _iteration_name(iteration)
    tensors = planned_tensors(program, facts, request.dtype, slots)
    files = [TRACKER, MAPC_JSON] + [f"{sub}/{f}" for f in (METADATA_JSON, COMMON, dcp.METADATA,
                                                           DATA)]
    decisions = {"iteration directory": sub, "data file": DATA,
                 "optimizer": "none (weights only)"} | decisions
    return make_plan("torch_dist", files, decisions=decisions, notes=notes, slots=slots,
                     tensors=tensors,
                     detail=(dict(program.target.meta()), iteration, optimizer, facts.training),
                     serial="one .distcp data file holds every tensor")


@dataclass(frozen=True)
class _OptimizerPlan:
    """The distributed optimizer a torch_dist output carries: ``layouts`` (distopt.RankLayout
    per megatron mesh coordinate at the output's TP/PP and ``dp``), ``cut``: the program
    torch_dist -> megatron that cuts each global slot tensor into the ranks' local tensors;
    ``masters_from_weights``: the source has no fp32 master (its weights are fp32 masters);
    ``impl``: the transformer_impl whose parameter order the layout follows; ``vpp``: model
    chunks per pipeline rank (``layouts`` then has one RankLayout per chunk, its buffers at
    ``gbuf0`` of its rank's optimizer)."""
    dp: int
    impl: str
    layouts: dict
    cut: object
    masters_from_weights: bool
    dtype: str
    kind: str = "dp_reshardable"
    vpp: int = 1
    edp: int | None = None          # the expert data-parallel size (a ChainedOptimizer's)
    etp: int | None = None          # ... and expert tensor-parallel size
    experts: tuple = ()             # (name, ndim) of its expert parameters (megatron's)

    def by_group(self) -> dict[tuple, list]:
        """{(chain, dp_group_idx): its DDP buffers in gbuf_idx order} (a virtual pipeline's
        chunks' buffers one after another); chain None: one optimizer, 0/1: a MoE model's
        ChainedOptimizer's dense and expert ones."""
        out: dict[tuple, list] = {}
        for lay in sorted(self.layouts.values(), key=lambda x: (str(x.chain), x.group,
                                                                 x.gbuf0)):
            out.setdefault((lay.chain, lay.group), []).extend(lay.buffers)
        return out

    @property
    def chained(self) -> bool:
        return self.edp is not None

    def describe(self) -> str:
        return ", ".join(f"{_prefix(ch)}dp_group_idx_{g}: " + ", ".join(
            f"{[b.numel_unpadded for b in buf.buckets]}"
            + (f" ({buf.pair[0]})" if len(bufs) > 1 else "") for buf in bufs)
            for (ch, g), bufs in sorted(self.by_group().items(), key=lambda x: str(x[0])))


def _plan_optimizer(program, facts: SourceFacts, request: WriteRequest) -> _OptimizerPlan:
    from mapc.compiler.plan import plan_layout
    from mapc.compiler.program import compile_program
    from mapc.runtime.containers import distopt
    target = program.target
    spec = target.spec
    if "megatron" not in spec.layout_names():
        raise MapcError(f"spec {spec.family} has no megatron layout, from which mapc derives "
                        f"where megatron-core's distributed optimizer keeps each parameter",
                        hint="add the family's megatron layout to its spec, or convert to "
                             "another format")
    dp = request.dp or int(facts.training.get("dp_world_size") or 1)
    impl = str(facts.format_meta.get("transformer_impl") or "transformer_engine")
    takes = {p.name for p in spec.layout_params("megatron")}
    params = {k: v for k, v in (("vocab_multiple", target.params.get("vocab_multiple")),
                                ("naming", "local" if impl == "local" else "te"))
              if k in takes and v is not None}
    tp, pp = int(target.params.get("tp_size", 1)), int(target.params.get("pp_size", 1))
    topology = {"tp": tp, "pp": pp}
    ep = int(target.params.get("ep_size", 1))
    if ep > 1:      # megatron-core's expert groups: ep, and etp (--set etp=N, default tp)
        topology["ep"] = ep
        if int(target.params.get("etp") or 0) > 0:
            topology["etp"] = int(target.params["etp"])
    vpp = request.vpp or 1
    if vpp > 1 and pp < 2:
        raise MapcError(f"--vpp {vpp} needs --pp of at least 2: Megatron's interleaved "
                        "schedule splits each pipeline rank's layers into chunks",
                        hint="pass --pp N, or drop --vpp")
    # with a virtual pipeline the megatron plan's pp axis counts virtual stages (chunk v of
    # pipeline rank p is stage v * pp + p), each chunk a DDP of its own (distopt.rank_layouts)
    try:
        mplan = plan_layout(spec, "megatron", target.env, dict(topology, pp=pp * vpp), params,
                            vpp=vpp)
    except MapcError as e:
        if vpp == 1:
            raise
        raise MapcError(f"--pp {pp} --vpp {vpp} is {pp * vpp} virtual pipeline stages: "
                        + e.message, where=e.where, hint=e.hint, context=e.context) from None
    # each parameter's training dtype: the cast one, else the source's (not widened for a
    # value map); megatron-core's DDP gives every dtype a buffer of its own
    have = facts.dtypes["param"]

    def dtype_of(inst):
        return cast_dtype(inst, have[next(iter(inst.members.values()))], request.dtype,
                          widen=False)
    layouts = distopt.chained_layouts(mplan, dp, {}, dtype_of, vpp=vpp)
    edp = etp = None
    experts: tuple = ()
    if any(lay.chain is not None for lay in layouts.values()):
        m = mplan.mesh
        etp = m.get("etp", m["tp"])
        edp = m["tp"] * dp // (etp * m["ep"])
        # the expert parameters (megatron names, local ndim), for their param groups
        cut = distopt.expert_instances(mplan)
        experts = tuple(sorted({(name, len(inst.recipe.shape_at(coord)))
                                for inst, coord, name in mplan.placements()
                                if id(inst) in cut}))
    pairs = sorted({buf.pair for lay in layouts.values() for buf in lay.buffers})
    dtype = pairs[0][0]
    for bad, _ in pairs:
        if bad not in ("bfloat16", "float32"):
            raise MapcError(f"mapc writes megatron-core's distributed optimizer for bf16 or "
                            f"fp32 parameters, not {bad} (fp16 needs its grad scaler, not "
                            f"written)", hint="pass --dtype bf16 (or fp32)")
    kind = request.optim_sharding or "dp_reshardable"
    if kind == "fully_reshardable":     # global tensors: no bucket layout, nothing to cut
        return _OptimizerPlan(dp, impl, {}, None, "master" not in facts.slots, dtype, kind,
                              vpp, edp, etp, experts)
    return _OptimizerPlan(dp, impl, layouts, compile_program(target, mplan),
                          "master" not in facts.slots, dtype, kind, vpp, edp, etp, experts)


class TorchDistSource(Source):
    format = "torch_dist"
    layout = "torch_dist"
    # a prefix every model key carries (NeMo 2's "module."), stripped on reading
    key_prefix = ""
    # how to re-save an optimizer state of a sharding type mapc does not read
    RESAVE_HINT = ("re-save it with distrib_optim_sharding_type dp_reshardable (Megatron-LM's "
                   "default), or without the optimizer")

    def _find_iter_dir(self) -> Path:
        return iteration_dir(self.path)

    def __init__(self, path):
        super().__init__(path)
        if not self.path.is_dir():
            raise MapcError("a torch_dist checkpoint is a directory", where=str(self.path))
        self.iter_dir = self._find_iter_dir()
        backend = _backend(self.iter_dir)
        if backend != "torch_dist":
            raise MapcError(f"this distributed checkpoint uses the {backend!r} backend; mapc "
                            f"reads torch_dist only", where=str(self.iter_dir / METADATA_JSON),
                            hint="re-save it with Megatron-LM --ckpt-format torch_dist")
        common = self._common()
        args = common.get("args")
        self.args = args.to_dict() if isinstance(args, torchfile.Record) else \
            dict(args) if isinstance(args, dict) else {}
        self.iteration = common.get("iteration")
        self.checkpoint_version = common.get("checkpoint_version")
        self.content_metadata = common.get("content_metadata") or {}
        if not isinstance(self.content_metadata, dict):
            self.content_metadata = {}
        if self.content_metadata.get("singleton_local_shards"):
            raise MapcError("this checkpoint was saved with singleton_local_shards (one key "
                            "per layer, fc1 split into weight_w/weight_v), which mapc does not "
                            "read yet", where=str(self.iter_dir / COMMON),
                            hint="re-save it without singleton_local_shards")
        self.format_meta = dict(self.args)
        self.config = self.record.get("config")
        md = dcp.read_metadata(self.iter_dir)
        self.entries = dcp.index_tensors(self.iter_dir, md)
        self.objects = {k: v for k, v in md.get("state_dict_metadata").items()
                        if k not in self.entries}
        self.storage = {index.get("fqn"): info for index, info in
                        (md.get("storage_data") or {}).items() if index.get("offset") is None}
        self.tensors: dict[str, tuple] = {}     # name -> (entry key, slab index or None)
        self.optimizer = None                    # _DpReshardable once bind_plan derived it
        for key, entry in self.entries.items():
            if is_optimizer_key(key) or key.startswith("rng_state"):
                continue                         # optimizer state: see bind_plan
            if not key.startswith(self.key_prefix):
                continue
            name = key[len(self.key_prefix):]
            shape = entry[0]
            if _STACKED.search(name) and shape:
                for k in range(shape[0]):
                    self.tensors[f"{name}[{k}]"] = (key, k)
            else:
                self.tensors[name] = (key, None)
        self.sharding_type = None
        if any(map(is_optimizer_key, self.entries)) or any(map(is_optimizer_key, self.objects)):
            self.sharding_type = _sharding_type(common.get("optimizer")) or \
                self.content_metadata.get("distrib_optim_sharding_type") or "unknown"
            if self.sharding_type not in SHARDING_TYPES:
                raise MapcError(f"the distributed optimizer's state is saved as "
                                f"{self.sharding_type!r}, which mapc does not read (it reads "
                                f"{', '.join(SHARDING_TYPES)})", where=str(self.iter_dir / COMMON),
                                hint=self.RESAVE_HINT)
        self.scheduler = common.get("opt_param_scheduler")

    def bind_plan(self, plan):
        """Called by resolve with the matched torch_dist plan: derive where the distributed
        optimizer keeps every parameter (runtime/containers/distopt.py) from the spec's
        megatron layout at the saved TP/PP."""
        self.optimizer = None
        if self.sharding_type == "dp_reshardable":
            self.optimizer = _DpReshardable(self, plan)
        elif self.sharding_type == "fully_reshardable":
            self.optimizer = _FullyReshardable(self, self._common())
        elif self.sharding_type == "dp_zero_gather_scatter":
            self.optimizer = _DpZeroGatherScatter(self, plan)

    def read_object(self, key: str):
        """A ShardedObject megatron-core saved (``KEY/shard_0_1``, stored as ``[object]``),
        restricted-unpickled."""
        fqn = key if key in self.objects else f"{key}/shard_0_1"
        info = self.storage.get(fqn)
        if fqn not in self.objects or info is None:
            raise MapcError(f"no {key} in the checkpoint", where=str(self.iter_dir),
                            hint="copy the complete checkpoint")
        rel = Path(str(info.get("relative_path")))
        if rel.is_absolute() or ".." in rel.parts:
            raise MapcError(f"storage path '{rel}' of {key} leaves the checkpoint",
                            where=str(self.iter_dir / dcp.METADATA))
        obj = dcp.load_torch_at(self.iter_dir / rel, int(info.get("offset")),
                                int(info.get("length")), key, PICKLES)
        if not isinstance(obj, list) or len(obj) != 1:   # megatron-core saves [object]
            raise MapcError(f"{key} holds a {type(obj).__name__}, not megatron-core's "
                            f"[object]", where=str(self.iter_dir / rel))
        return obj[0]

    def _common(self) -> dict:
        f = self.iter_dir / COMMON
        if not f.is_file():
            raise MapcError(f"no {COMMON} (megatron-core's non-tensor state: args, "
                            f"iteration)", where=str(self.iter_dir),
                            hint="copy the complete checkpoint")
        obj = torchfile.load(f, PICKLES)
        if not isinstance(obj, dict):
            raise MapcError(f"{COMMON} holds a {type(obj).__name__}, not a dict",
                            where=str(f))
        return obj

    @property
    def saved_topology(self) -> dict:
        """The TP/PP the training run saved at (args); the tensors do not depend on it."""
        return {"tp": int(self.args.get("tensor_model_parallel_size") or 1),
                "pp": int(self.args.get("pipeline_model_parallel_size") or 1)}

    @property
    def saved_vpp(self) -> int:
        """The training run's model chunks per pipeline rank (args), which only the
        distributed optimizer's buffers depend on (one DDP per chunk)."""
        return int(self.args.get("virtual_pipeline_model_parallel_size") or 1)

    def coords(self):
        return [SINGLE]

    def names(self, coord=SINGLE):
        return list(self.tensors)

    def _get(self, name):
        try:
            key, index = self.tensors[name]
        except KeyError:
            raise MapcError(f"tensor {name} is not in the checkpoint",
                            where=str(self.iter_dir)) from None
        return key, index, self.entries[key]

    def shape(self, name, coord=SINGLE):
        _, index, (shape, _, _) = self._get(name)
        return tuple(shape[1:]) if index is not None else tuple(shape)

    def slots(self):
        return ["param", "master", "exp_avg", "exp_avg_sq"] if self.optimizer else ["param"]

    def dtype(self, name, coord=SINGLE, slot="param"):
        if slot != "param":
            self._get(name)
            return "float32"
        return self._get(name)[2][1]

    def read(self, name, coord=SINGLE, slot="param"):
        if slot != "param":
            if self.optimizer is None:
                raise MapcError(f"no optimizer state in the checkpoint ({slot} of {name})",
                                where=str(self.iter_dir))
            return self.optimizer.read(name, slot)
        key, index, entry = self._get(name)
        return dcp.read_entry(key, entry, index)

    def training_state(self):
        out = dict(self.record.get("training") or {})
        if isinstance(self.iteration, int):
            out.setdefault("iteration", self.iteration)
        if self.optimizer is not None:
            out.update(self.optimizer.training_state())
        return out

    def describe_coord(self, coord):
        t = self.saved_topology
        return f"{self.iter_dir.name} (global tensors, saved at tp={t['tp']}, pp={t['pp']})"


Source = TorchDistSource


# --------------------------------------------------------------------------------------
# the distributed optimizer's state
# --------------------------------------------------------------------------------------
SHARDING_TYPES = ("dp_reshardable", "fully_reshardable", "dp_zero_gather_scatter")
# megatron-core's ChainedOptimizer (a MoE model's dense and expert optimizers) prefixes each
# optimizer's keys with "chained_<index>." (not for fully_reshardable, whose keys are the model's)
_CHAINED = re.compile(r"^chained_(\d+)\.(?=optimizer\.)")
_BUCKET = re.compile(r"^(?:chained_(\d+)\.)?optimizer\.distributed\.dp_group_idx_(\d+)\."
                     r"gbuf_idx_(\d+)\.dtype_\((torch\.\w+), (torch\.\w+)\)\.bucket_idx_(\d+)"
                     r"\.(param|exp_avg|exp_avg_sq)$")
_OPTIM = "{prefix}optimizer.distributed.dp_group_idx_{g}.{what}"


def is_optimizer_key(key: str) -> bool:
    """Whether ``key`` is megatron-core's (Chained)DistributedOptimizer's, not the model's."""
    return key.startswith("optimizer.") or bool(_CHAINED.match(key))


def _prefix(chain: int | None) -> str:
    return "" if chain is None else f"chained_{chain}."


def _sharding_type(opt) -> str | None:
    """The ``param_state_sharding_type`` common.pt's ``optimizer`` entry names: one
    DistributedOptimizer's ``{param_state_sharding_type: ...}``, or a ChainedOptimizer's
    ``{0: {...}, 1: {...}}`` (all of one type)."""
    if not isinstance(opt, dict):
        return None
    if "param_state_sharding_type" in opt or not opt:
        return opt.get("param_state_sharding_type")
    kinds = {o.get("param_state_sharding_type") if isinstance(o, dict) else None
             for o in opt.values()}
    return kinds.pop() if len(kinds) == 1 else "mixed " + "/".join(sorted(map(str, kinds)))


def read_range(name: str, entry, start: int, stop: int) -> np.ndarray:
    """Elements ``[start, stop)`` of the flat (1-D) tensor ``name`` (an ``index_tensors``
    entry), read from only the chunks that overlap them."""
    shape, dtype, chunks = entry
    if len(shape) != 1 or not 0 <= start <= stop <= shape[0]:
        raise MapcError(f"internal: range {start}..{stop} of {name} {list(shape)}")
    out = np.empty(stop - start, torchfile.DTYPES[dtype])
    filled = 0
    for c in chunks:
        lo, hi = max(start, c.offsets[0]), min(stop, c.offsets[0] + c.sizes[0])
        if lo < hi:
            data = dcp.chunk_ref(name, c, dtype).map()
            out[lo - start:hi - start] = data[lo - c.offsets[0]:hi - c.offsets[0]]
            filled += hi - lo
    if filled != stop - start:
        raise MapcError(f"the chunks of {name} do not cover elements {start}..{stop}",
                        hint="the checkpoint is incomplete; copy it again")
    return out


class _RankView:
    """The distributed optimizer's state as per-rank tensors of the spec's megatron layout,
    for mapc.runtime.execute.read_instances (``read(name, coord, slot=...)``)."""

    def __init__(self, opt):
        self.opt = opt

    def read(self, name, coord, slot="param"):
        return self.opt.read_rank(name, coord, slot)

    def stateless(self, coord):
        return {}


class _Optimizer:
    """What both sharding types share: the masters check, the training state."""
    src: TorchDistSource

    def read(self, name: str, slot: str) -> np.ndarray:
        raise NotImplementedError

    def _masters_disagree(self) -> str | None:
        """The first 1-D tensor (norms, biases: small) whose fp32 master, read where the
        optimizer's layout puts it, does not round to its stored weight; None if all agree."""
        from mapc.runtime.backends import DTYPES
        for name in self.src.tensors:
            if len(self.src.shape(name)) != 1:
                continue
            weight = np.asarray(self.src.read(name))
            master = self.read(name, "master")
            if master.shape != weight.shape or not np.array_equal(
                    master.astype(DTYPES[self.src.dtype(name)]).view(np.uint8),
                    weight.view(np.uint8)):
                return f"{name} differs"
        return None

    def _groups(self):
        """(megatron-core's param groups, its grad scaler state or None)."""
        raise NotImplementedError

    def training_state(self) -> dict:
        """Step, param groups (with the torch_dist names each holds, by megatron-core's
        default weight-decay rule), grad scaler and scheduler."""
        from mapc.runtime.containers.megatron import _no_weight_decay, _scalar
        groups, scaler = self._groups()
        if not isinstance(groups, list) or not groups or \
                not all(isinstance(g, dict) for g in groups):
            raise MapcError("the distributed optimizer's state has no param_groups",
                            where=str(self.src.iter_dir))
        names = list(self.src.tensors)
        no_wd = [n for n in names if _no_weight_decay(n, len(self.src.shape(n)))]
        wd = [n for n in names if n not in set(no_wd)]
        zero = [float(g.get("wd_mult", 1.0)) == 0.0 for g in groups]
        if len(groups) > 2 or len(set(zero)) != len(groups):
            raise MapcError(f"the distributed optimizer's {len(groups)} parameter groups "
                            f"(wd_mult {[g.get('wd_mult') for g in groups]}) do not follow "
                            f"megatron-core's default grouping", where=str(self.src.iter_dir),
                            hint="mapc reads Megatron optimizers with megatron-core's default "
                                 "parameter groups only")
        out_groups = []
        for g, z in zip(groups, zero):
            hyper = {k: v for k, v in g.items() if k not in ("params", "step")}
            hyper["params"] = no_wd if z else wd
            out_groups.append(hyper)
        step = groups[0].get("step")
        scaler = {k: _scalar(v) for k, v in scaler.items()} if isinstance(scaler, dict) else None
        return {"iteration": self.src.iteration,
                "global_samples": self.src.args.get("consumed_train_samples"),
                "step": float(step) if step is not None else None,
                "param_groups": out_groups,
                "lr_scheduler": self.src.scheduler,
                "loss_scale": scaler.get("scale") if scaler else None,
                "grad_scaler": scaler,
                "clip_grad": self.src.args.get("clip_grad"),
                "zero_stage": None,
                "dp_world_size": self.dp}


class _FullyReshardable(_Optimizer):
    """megatron-core's ``fully_reshardable`` state: ``optimizer.state.{param,exp_avg,
    exp_avg_sq}.<model key>``, each at its parameter's global shape and sharding (stacked
    layers too), param groups in ``common.pt``. megatron-core 0.16.1 saves wrong values after
    the first bucket when an earlier bucket has end padding; the masters check (every 1-D
    tensor's master rounds to its weight) refuses such a checkpoint instead of carrying it."""

    def __init__(self, src: TorchDistSource, common: dict):
        self.src = src
        self.common = common
        tp, pp = src.saved_topology["tp"], src.saved_topology["pp"]
        world = int(src.args.get("world_size") or 0)
        self.dp = int(src.args.get("data_parallel_size") or 0) or max(1, world // (tp * pp))
        where = str(src.iter_dir / dcp.METADATA)
        want = {f"optimizer.state.{slot}.{key}" for key, _ in src.tensors.values()
                for slot in ("param", "exp_avg", "exp_avg_sq")}
        have = {k for k in src.entries if k.startswith("optimizer.")}
        if want != have:
            odd = sorted(want - have) or sorted(have - want)
            what = "lacks" if want - have else "has the unexpected"
            raise MapcError(f"the fully_reshardable optimizer state {what} {odd[0]}"
                            + (f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""),
                            where=where, hint="copy the complete checkpoint")
        for key, _ in set(src.tensors.values()):
            for slot in ("param", "exp_avg", "exp_avg_sq"):
                shape, dtype, _ = src.entries[f"optimizer.state.{slot}.{key}"]
                if shape != src.entries[key][0] or dtype != "float32":
                    raise MapcError(f"optimizer.state.{slot}.{key} is {dtype}{list(shape)}, "
                                    f"its parameter {list(src.entries[key][0])} (fp32 "
                                    f"expected)", where=where)
        bad = self._masters_disagree()
        if bad is not None:
            raise MapcError(f"the fully_reshardable optimizer state's fp32 masters do not "
                            f"round to the stored weights ({bad}); megatron-core 0.16.1 saves "
                            f"wrong values for parameters after the first DDP bucket when an "
                            f"earlier bucket has end padding", where=str(src.iter_dir),
                            hint="re-save with dp_reshardable (Megatron-LM's default), or "
                                 "with one bucket (no --overlap-grad-reduce)")

    def read(self, name: str, slot: str) -> np.ndarray:
        if slot not in ("master", "exp_avg", "exp_avg_sq"):
            raise MapcError(f"unknown optimizer slot {slot!r}")
        key, index = self.src.tensors[name]
        okey = f"optimizer.state.{'param' if slot == 'master' else slot}.{key}"
        return dcp.read_entry(okey, self.src.entries[okey], index)

    def _groups(self):
        opt = self.common.get("optimizer")
        if isinstance(opt, dict) and 0 in opt:      # a ChainedOptimizer's: the dense one's
            opt = opt[0]
        inner = opt.get("optimizer") if isinstance(opt, dict) else None
        groups = inner.get("param_groups") if isinstance(inner, dict) else None
        return groups, opt.get("grad_scaler") if isinstance(opt, dict) else None


class _DpReshardable(_Optimizer):
    """Where megatron-core's DistributedOptimizer (``dp_reshardable``) keeps each parameter.

    Every model-parallel rank (``dp_group_idx`` = tp_rank + tp * pp_rank) stores one flat
    fp32 tensor per DDP bucket and slot; the parameters in it are the spec's megatron layout
    at the saved TP/PP (local or Transformer Engine names, by ``args.transformer_impl``), laid
    out as runtime/containers/distopt.py derives. With expert parallelism (args'
    ``expert_model_parallel_size`` > 1) megatron-core's ChainedOptimizer saved two optimizers,
    ``chained_0.`` (dense) and ``chained_1.`` (experts, per expert rank), derived alike.
    A slot of a torch_dist tensor (a global slab) is rebuilt from the per-rank slot tensors
    with the program megatron -> torch_dist, one unit at a time, as a conversion rebuilds
    weights."""

    def __init__(self, src: TorchDistSource, plan):
        from mapc.compiler.plan import plan_layout
        self.src = src
        where = str(src.iter_dir)
        args = src.args
        tp, pp = src.saved_topology["tp"], src.saved_topology["pp"]
        world = int(args.get("world_size") or 0)
        self.dp = int(args.get("data_parallel_size") or 0) or max(1, world // (tp * pp))
        self.vpp = src.saved_vpp
        topology = {"tp": tp, "pp": pp * self.vpp}
        ep = int(args.get("expert_model_parallel_size") or 1)
        etp = args.get("expert_tensor_parallel_size")
        if ep > 1:
            topology["ep"] = ep
        if isinstance(etp, int) and ep > 1:
            topology["etp"] = etp
        keys = self._keys(where)
        spec = plan.spec
        if "megatron" not in spec.layout_names():
            raise MapcError(f"spec {spec.family} has no megatron layout, from which mapc "
                            f"derives where the distributed optimizer keeps each parameter",
                            where=where, hint="add the family's megatron layout to its spec")
        # the local spec and Transformer Engine's order a layer's parameters differently:
        # Megatron-LM's args say which one trained (transformer_impl); without it both are
        # tried, and the one whose fp32 masters round to the stored weights is taken
        impl = args.get("transformer_impl")
        takes = {p.name for p in spec.layout_params("megatron")}
        namings = [None] if "naming" not in takes else \
            ["local"] if impl == "local" else ["te"] if impl is not None else ["local", "te"]
        failures = []
        for naming in namings:
            params = {k: v for k, v in (("vocab_multiple", plan.params.get("vocab_multiple")),
                                        ("naming", naming)) if k in takes and v is not None}
            mplan = plan_layout(spec, "megatron", plan.env, topology, params)
            self._derive(mplan, plan, keys, tp, pp, args, where)
            bad = self._masters_disagree()
            if bad is None:
                if impl is None and naming is not None:   # the order found: carried on
                    src.format_meta.setdefault("transformer_impl", "local" if naming == "local"
                                               else "transformer_engine")
                break
            failures.append(f"{bad} with the {naming or 'megatron'} layout")
        else:
            raise MapcError(f"the distributed optimizer's fp32 masters do not round to the "
                            f"stored weights ({'; '.join(failures)}): mapc cannot tell where "
                            f"it keeps each parameter", where=where,
                            hint="the checkpoint was trained with settings mapc does not "
                                 "derive; save it with distrib_optim_sharding_type "
                                 "fully_reshardable, or without the optimizer")

    def _keys(self, where: str) -> dict[tuple, dict]:
        """{(chain, dp_group_idx, gbuf_idx, bucket_idx): {slot: what _slice reads}}: the bucket
        tensors ``[chained_C.]optimizer.distributed.dp_group_idx_I.gbuf_idx_G.dtype_(P, G).
        bucket_idx_B.{param,exp_avg,exp_avg_sq}`` (chain None: one optimizer, no prefix)."""
        keys: dict[tuple, dict] = {}
        self.pairs: dict[tuple, tuple] = {}      # (chain, dp_group_idx, gbuf_idx) -> dtypes
        for key in self.src.entries:
            if not is_optimizer_key(key):
                continue
            m = _BUCKET.match(key)
            if not m:
                raise MapcError(f"unexpected distributed-optimizer tensor {key}",
                                where=str(self.src.iter_dir / dcp.METADATA),
                                hint="mapc reads megatron-core's dp_reshardable layout of a "
                                     "DistributedOptimizer or of a ChainedOptimizer of them")
            chain = int(m.group(1)) if m.group(1) is not None else None
            g, b, k = int(m.group(2)), int(m.group(3)), int(m.group(6))
            keys.setdefault((chain, g, b, k), {})[m.group(7)] = key
            self.pairs[(chain, g, b)] = tuple(x[len("torch."):] for x in (m.group(4),
                                                                          m.group(5)))
        return keys

    def _check_bucket(self, g: int, k: int, buckets, slots: dict, where: str) -> None:
        """Refuse a stored bucket ``k`` of dp_group_idx ``g`` whose size is not the derived."""
        bucket = buckets[k]
        for key in slots.values():
            if self.src.entries[key][0] != (bucket.numel_unpadded,):
                raise MapcError(f"{key} holds {list(self.src.entries[key][0])} elements, its "
                                f"bucket {bucket.numel_unpadded}", where=where)

    def _slice(self, key, start: int, numel: int) -> np.ndarray:
        """Elements ``[start, start + numel)`` of the stored bucket slot ``key``."""
        return read_range(key, self.src.entries[key], start, start + numel)

    def _derive(self, mplan, plan, keys, tp, pp, args, where):
        from mapc.compiler.program import compile_program
        from mapc.runtime.containers import distopt
        self.where: dict[tuple, tuple] = {}
        used = set()
        # each parameter's dtype, as stored: megatron-core's DDP gives every dtype a buffer
        stored = {k: self.src.dtype(name) for inst, _, name in plan.placements()
                  for k in inst.members.values()}
        layouts = distopt.chained_layouts(
            mplan, self.dp, args, lambda inst: stored.get(next(iter(inst.members.values()))),
            vpp=self.vpp)
        chains = sorted({ch for ch, _, _, _ in keys}, key=str)
        want_chains = sorted({ch for _, ch in layouts}, key=str)
        if chains != want_chains:
            def name(chs):
                return "one optimizer" if chs == [None] else \
                    f"a ChainedOptimizer of {len(chs)} ({', '.join(_prefix(c) for c in chs)})"
            raise MapcError(f"the checkpoint holds the state of {name(chains)}; the model at "
                            f"ep={mplan.mesh.get('ep', 1)} has {name(want_chains)} (megatron-"
                            f"core chains an optimizer of the expert parameters when ep > 1)",
                            where=where, hint="the args' expert_model_parallel_size is not the "
                                              "one the checkpoint was saved at")
        pairs: dict[tuple, list] = {}       # (chain, dp_group_idx) -> its buffers' dtype pairs
        for lay in sorted(layouts.values(), key=lambda x: x.gbuf0):
            pairs.setdefault((lay.chain, lay.group), []).extend(buf.pair for buf in lay.buffers)
        for (ch, g), want in pairs.items():
            gbufs = sorted({b for cc, gg, b, _ in keys if (cc, gg) == (ch, g)})
            if gbufs != list(range(len(want))) or \
                    any(self._pair(ch, g, b) not in (None, pair) for b, pair in enumerate(want)):
                raise MapcError(f"the distributed optimizer of {_prefix(ch)}dp_group_idx_{g} "
                                f"has the DDP buffers {[self._pair(ch, g, b) for b in gbufs]}; "
                                f"the model's parameter dtypes and chunks give {want}",
                                where=where,
                                hint="the checkpoint was trained with settings mapc does not "
                                     "derive; save it with distrib_optim_sharding_type "
                                     "fully_reshardable")
        owner = {}      # (tp, pp) -> the mesh coordinate whose dense parameters were derived
        for (coord, chain), lay in layouts.items():
            c = dict(coord)
            g = lay.group
            if chain != 1:
                owner.setdefault((c.get("tp", 0), c.get("pp", 0)), coord)
            what = f"{lay.prefix}dp_group_idx_{g} (" + ", ".join(
                f"{a}={c.get(a, 0) % pp if a == 'pp' else c.get(a, 0)}"
                for a in (("tp", "pp") if chain != 1 else ("ep", "etp", "pp"))) + ")"
            several = len(pairs[(chain, g)]) > 1
            for b, buf in enumerate(lay.buffers, lay.gbuf0):
                bwhat = f"{what} gbuf_idx_{b}" if several else what
                distopt.check_buckets(buf.buckets,
                                      self._stored_sizes(chain, g, b, buf.buckets, where),
                                      where, bwhat)
                for k, bucket in enumerate(buf.buckets):
                    slots = keys.get((chain, g, b, k), {})
                    lacks = sorted({"param", "exp_avg", "exp_avg_sq"} - set(slots))
                    if lacks:
                        raise MapcError(f"bucket {k} of {bwhat} lacks {lacks}", where=where,
                                        hint="copy the complete checkpoint")
                    self._check_bucket(g, k, buf.buckets, slots, where)
                    used.add((chain, g, b, k))
            for name, b, k, start, numel in lay.places():
                self.where[(coord, name)] = (keys[(chain, g, b, k)], start, numel,
                                             lay.shapes[name])
        # the dense parameters' copies at the other expert ranks of a (tp, pp) rank
        for inst, coord, name in mplan.placements():
            if (coord, name) not in self.where:
                c = dict(coord)
                self.where[(coord, name)] = self.where[(owner[(c.get("tp", 0),
                                                               c.get("pp", 0))], name)]
        if set(keys) != used:
            extra = sorted(set(keys) - used, key=str)[0]
            raise MapcError(f"the checkpoint holds distributed-optimizer buckets the model's "
                            f"{len(layouts)} model-parallel ranks do not have ({_prefix(extra[0])}"
                            f"dp_group_idx_{extra[1]} bucket {extra[3]})", where=where,
                            hint="the optimizer state does not belong to this model")
        self.chains = want_chains
        self.view = _RankView(self)
        self.program = compile_program(mplan, plan)
        self.targets: dict[str, tuple] = {}
        for unit in self.program.units:
            for inst in unit.targets:
                for rc, copies in inst.by_recipe_coord().items():
                    for _, name in copies:
                        self.targets[name] = (unit, inst, rc)

    def _pair(self, chain, g: int, b: int):
        """The (param dtype, grad dtype) names of buffer ``b`` of dp_group_idx ``g`` of
        optimizer ``chain``, as its keys say."""
        return self.pairs.get((chain, g, b))

    def _stored_sizes(self, chain, g: int, b: int, buckets, where: str) -> list:
        """The bucket sizes megatron-core stored for buffer ``b`` of dp_group_idx ``g``."""
        obj = self.src.read_object(_OPTIM.format(prefix=_prefix(chain), g=g,
                                                 what="per_bucket_numel_unpadded"))
        try:
            (sizes,) = obj[b].values()
            return [int(n) for n in sizes]
        except (TypeError, ValueError, KeyError, IndexError, AttributeError):
            raise MapcError(f"per_bucket_numel_unpadded of {_prefix(chain)}dp_group_idx_{g} is "
                            f"{obj!r}, not megatron-core's [{{(param dtype, grad dtype): "
                            f"[numel, ...]}}]", where=where) from None

    def read_rank(self, name, coord, slot) -> np.ndarray:
        """Slot ``slot`` of the megatron-layout tensor ``name`` of rank ``coord``."""
        try:
            keys, start, numel, shape = self.where[(coord, name)]
        except KeyError:
            raise MapcError(f"internal: no distributed-optimizer place for {name} at "
                            f"{coord}") from None
        key = keys[{"master": "param", "param": "param"}.get(slot, slot)]
        return self._slice(key, start, numel).reshape(shape)

    def read(self, name: str, slot: str) -> np.ndarray:
        """Slot ``slot`` of the torch_dist tensor ``name`` (fp32)."""
        from mapc.runtime import execute
        if slot not in ("master", "exp_avg", "exp_avg_sq"):
            raise MapcError(f"unknown optimizer slot {slot!r}")
        unit, inst, rc = self.targets[name]
        be = execute.get_backend("numpy")
        report = execute.Report()
        logical = execute.read_instances(unit.sources, self.view, be, report, True, slot)
        for w in report.warnings:
            if "padding of" not in w and w not in self.src.warnings:
                self.src.warnings.append(w)
        members = {m: logical[k] for m, k in inst.members.items()}
        return np.ascontiguousarray(be.to_numpy(inst.recipe.shard(be, members, dict(rc))))

    def _groups(self):
        """The dense (or only) optimizer's param groups and grad scaler; a ChainedOptimizer's
        expert optimizer must have taken as many steps."""
        prefix = _prefix(self.chains[0])
        inner = self.src.read_object(_OPTIM.format(prefix=prefix, g=0, what="optimizer"))
        key = _OPTIM.format(prefix=prefix, g=0, what="grad_scaler")
        scaler = self.src.read_object(key) if f"{key}/shard_0_1" in self.src.objects else None
        groups = inner.get("param_groups") if isinstance(inner, dict) else None
        for chain in self.chains[1:]:
            other = self.src.read_object(_OPTIM.format(prefix=_prefix(chain), g=0,
                                                       what="optimizer"))
            steps = {g.get("step") for g in (other.get("param_groups") or [])} \
                if isinstance(other, dict) else {None}
            want = {g.get("step") for g in groups or []}
            if steps != want:
                raise MapcError(f"the expert optimizer ({_prefix(chain)}) has taken "
                                f"{sorted(map(str, steps))} steps, the dense one "
                                f"{sorted(map(str, want))}", where=str(self.src.iter_dir),
                                hint="megatron-core's ChainedOptimizer steps both alike: the "
                                     "checkpoint is inconsistent")
        return groups, scaler


class _DpZeroGatherScatter(_DpReshardable):
    """megatron-core's deprecated ``dp_zero_gather_scatter`` state: per model-parallel rank one
    object ``optimizer.distributed.dp_group_idx_I.param_state`` (DP rank 0 gathered it,
    ``get_parameter_state_dp_zero``), the layout of Megatron-LM's legacy ``distrib_optim.pt``:
    ``{"buckets_coalesced": True, gbuf_idx: {(param dtype, grad dtype): {"param", "exp_avg",
    "exp_avg_sq": flat fp32, "numel_unpadded"}}}`` for every DDP buffer of the rank's optimizer
    (gbuf_idx 0, 1, ...: a virtual pipeline's chunks one after another, each chunk's dtypes,
    e.g. bf16 weights and fp32 norms), each flat tensor the buffer's buckets without their end
    padding, one after another. The parameters' places are derived as for dp_reshardable (same
    checks: the buffers' dtype pairs, every 1-D master); no bucket sizes are stored, so each
    buffer's total is checked instead. The flat tensors are mapped from the file, not read
    whole."""

    SLOTS = ("param", "exp_avg", "exp_avg_sq")

    def _keys(self, where: str) -> dict[tuple, dict]:
        """Bucket 0 of every stored buffer (``_stored_sizes`` adds the others once the buckets
        are derived); the buffers' flat tensors and dtype pairs, read from the objects, of one
        optimizer or of each of a ChainedOptimizer's (``chained_C.`` prefixes)."""
        from mapc.runtime.containers.distopt import coalesced_buffers
        if any(map(is_optimizer_key, self.src.entries)):
            raise MapcError(f"unexpected distributed-optimizer tensor "
                            f"{next(k for k in self.src.entries if is_optimizer_key(k))} "
                            f"in a dp_zero_gather_scatter checkpoint", where=where)
        self.states: dict[tuple, dict] = {}     # (chain, dp_group_idx, gbuf_idx) -> {slot: flat}
        self.offsets: dict[tuple, int] = {}     # (chain, dp_group_idx, gbuf_idx, bucket) -> start
        self.pairs: dict[tuple, tuple] = {}
        self.keys: dict[tuple, dict] = {}
        for obj in self.src.objects:
            m = re.match(r"^(?:chained_(\d+)\.)?optimizer\.distributed\.dp_group_idx_(\d+)"
                         r"\.param_state(?:/shard_0_1)?$", obj)
            if not m:
                continue
            chain = int(m.group(1)) if m.group(1) is not None else None
            g = int(m.group(2))
            state = self.src.read_object(_OPTIM.format(prefix=_prefix(chain), g=g,
                                                       what="param_state"))
            for b, (pair, flats) in enumerate(coalesced_buffers(
                    state, f"the dp_zero_gather_scatter state of {_prefix(chain)}"
                           f"dp_group_idx_{g}", where)):
                self.states[(chain, g, b)] = flats
                self.pairs[(chain, g, b)] = pair
                self.keys[(chain, g, b, 0)] = {s: (chain, g, b, 0, s) for s in self.SLOTS}
        return self.keys

    def _stored_sizes(self, chain, g: int, b: int, buckets, where: str) -> list:
        """The derived buckets of buffer ``b`` (no sizes are stored), checked by the buffer's
        stored total (and later by the masters)."""
        from mapc.runtime.containers.distopt import check_total
        check_total(self.states[(chain, g, b)]["param"], buckets,
                    f"buffer {b} of the dp_zero_gather_scatter state of {_prefix(chain)}"
                    f"dp_group_idx_{g}", where)
        off = 0
        for k, bucket in enumerate(buckets):
            self.keys[(chain, g, b, k)] = {s: (chain, g, b, k, s) for s in self.SLOTS}
            self.offsets[(chain, g, b, k)] = off
            off += bucket.numel_unpadded
        return [x.numel_unpadded for x in buckets]

    def _check_bucket(self, g: int, k: int, buckets, slots: dict, where: str) -> None:
        pass                               # _stored_sizes checked the buffer's total

    def _slice(self, key, start: int, numel: int) -> np.ndarray:
        chain, g, b, k, slot = key
        off = self.offsets[(chain, g, b, k)] + start
        return np.array(self.states[(chain, g, b)][slot].map()[off:off + numel])

# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------
# megatron-core's SequentialMLP shards its local experts under "<prefix>experts.experts." on a
# second global axis (after the layers'); its TopKRouter has no _extra_state, nor have the
# local spec's attention norms (qk_layernorm's q/k, MLA's q/kv: plain torch norms) and the
# norms inside a row-parallel linear (Megatron-Bridge's post_layernorm of linear_proj / fc2)
_EXPERTS = re.compile(r"(?:^|\.)experts\.experts\.")
_NO_EXTRA_STATE = re.compile(
    r"(?:^|\.)(?:router|self_attention\.(?:q|k|kv)_layernorm|post_layernorm)\.weight$")


def stacked(fqn: str) -> bool:
    """Whether ``fqn`` is a key of megatron-core's stacked layers (see the module docstring)."""
    return bool(_STACKED.search(fqn))


def _extra_state_keys(fqn: str, shape: tuple) -> list[str]:
    """The ``_extra_state`` ShardedObject keys megatron-core's loader asks for beside a stacked
    ``<module>.weight``: ``<module>._extra_state/shard_{offset}_{global shape}``, one per layer
    (``shard_i_L``) or, for SequentialMLP experts, per layer and expert (``shard_i.e_L.E``);
    beside a numbered layer's ``layers.<n>.<module>.weight`` one (``shard_0_1``) or one per
    expert (``shard_e_E``)."""
    if not fqn.endswith(".weight") or _NO_EXTRA_STATE.search(fqn):
        return []
    module = fqn[:-len(".weight")]
    if not _STACKED.search(fqn):
        # a layer of its own (megatron-core's non-homogeneous layers: "layers.<n>."): one
        # object, or one per expert on SequentialMLP's global experts axis
        if not _NUMBERED.search(fqn) or _NORM.search(fqn):
            return []
        if _EXPERTS.search(fqn) and shape:
            return [f"{module}._extra_state/shard_{e}_{shape[0]}" for e in range(shape[0])]
        return [f"{module}._extra_state/shard_0_1"]
    if _EXPERTS.search(fqn) and len(shape) >= 2:
        return [f"{module}._extra_state/shard_{i}.{e}_{shape[0]}.{shape[1]}"
                for i in range(shape[0]) for e in range(shape[1])]
    return [f"{module}._extra_state/shard_{i}_{shape[0]}" for i in range(shape[0])]


class TorchDistWriter(PlannedWriter):
    """Writes what Megatron-LM's ``--load`` reads for ``--ckpt-format torch_dist``, streaming and
    without torch: the tracker, ``iter_NNNNNNN/`` (``release/`` without an iteration) with
    ``metadata.json``, ``common.pt`` (args, iteration, checkpoint_version, content_metadata) and
    one DCP data file. Every tensor and every slab ``NAME[i]`` of a stacked tensor is appended
    to it as its own chunk the moment it arrives (a slab as the chunk ``[i:i+1, ...]`` of
    ``NAME``), so memory stays at one tensor. Each stacked ``<module>.weight`` gets the
    ``<module>._extra_state/shard_{i}_{L}`` objects megatron-core's loader asks for (megatron-core
    saves ``[None]`` there for its local-spec layers). ``.metadata`` is written at the end.

    With an optimizer (plan detail ``_OptimizerPlan``) every global tensor's ``master`` /
    ``exp_avg`` / ``exp_avg_sq`` is cut into the ranks' local tensors (the plan's program
    torch_dist -> megatron) and each is appended as a chunk of its rank's flat bucket at the
    parameter's place; ``finish`` adds the alignment gaps (zeros) and the objects
    megatron-core's DistributedOptimizer loads (param groups, bucket sizes)."""

    key_prefix = ""     # prepended to every model key (NeMo 2: "module.")

    def __init__(self, tmpdir, program, plan):
        super().__init__(tmpdir, program, plan)
        args, iteration, optimizer, training = plan.detail
        self.args = dict(args)
        self.iteration = iteration
        self.sub = self._subdir()
        self.tensors: dict[str, list] = {}       # fqn -> [global shape, dtype, chunks]
        self.objects: dict[str, tuple] = {}
        self.expected: dict[str, tuple] = {}     # physical name -> (fqn, slab index or None)
        self.file = None
        self.opt: _OptimizerPlan | None = optimizer
        self.training = training
        self.fully = optimizer is not None and optimizer.kind == "fully_reshardable"
        if optimizer is not None and not self.fully:
            self.cut_unit = {}                   # torch_dist name -> unit of the cut program
            for unit in optimizer.cut.units:
                for inst in unit.sources:
                    for _, _, name in inst.shards:
                        self.cut_unit[name] = unit
            # a dense parameter has one place per (tp, pp) rank: its copies at the other
            # expert ranks have none (distopt.chained_layouts)
            self.place = {(coord, name): ((lay.chain, lay.group), b, k, start, numel)
                          for (coord, _), lay in optimizer.layouts.items()
                          for name, b, k, start, numel in lay.places()}
            self.pending: dict[tuple, dict] = {}
            self.pairs = {((lay.chain, lay.group), b): buf.pair
                          for lay in optimizer.layouts.values()
                          for b, buf in enumerate(lay.buffers, lay.gbuf0)}

    def _bucket_key(self, group: tuple, gbuf: int, bucket: int, slot: str) -> str:
        """``group`` is (chain, dp_group_idx)."""
        pair = ", ".join(f"torch.{x}" for x in self.pairs[(group, gbuf)])
        return (f"{_prefix(group[0])}optimizer.distributed.dp_group_idx_{group[1]}.gbuf_idx_"
                f"{gbuf}.dtype_({pair}).bucket_idx_{bucket}."
                f"{'param' if slot == 'master' else slot}")

    def _subdir(self) -> str:
        return _iteration_name(self.iteration)

    def begin(self, tensors):
        stacked: dict[str, dict] = {}
        pre = self.key_prefix
        for _, name, shape, dtype in tensors:
            m = _SLAB.match(name)
            if m:
                stacked.setdefault(pre + m.group(1), {})[int(m.group(2))] = (tuple(shape), dtype)
                self.expected[name] = (pre + m.group(1), int(m.group(2)))
            else:
                self.tensors[pre + name] = [tuple(shape), dtype, []]
                self.expected[name] = (pre + name, None)
        for fqn, slabs in stacked.items():
            n = len(slabs)
            if sorted(slabs) != list(range(n)) or len(set(slabs.values())) != 1:
                raise MapcError(f"internal: the slabs of {fqn} are not layers 0..{n - 1} of "
                                f"one shape and dtype")
            shape, dtype = slabs[0]
            self.tensors[fqn] = [(n,) + shape, dtype, []]
        if self.fully:      # optimizer.state.<slot>.<fqn>: each weight's shape and chunks
            for fqn, (shape, _, _) in list(self.tensors.items()):
                for slot in ("param", "exp_avg", "exp_avg_sq"):
                    self.tensors[f"optimizer.state.{slot}.{fqn}"] = [shape, "float32", []]
        if self.opt is not None:
            for lay in self.opt.layouts.values():
                for b, buf in enumerate(lay.buffers, lay.gbuf0):
                    for k, bucket in enumerate(buf.buckets):
                        for slot in ("master", "exp_avg", "exp_avg_sq"):
                            self.tensors[self._bucket_key((lay.chain, lay.group), b, k,
                                                          slot)] = \
                                [(bucket.numel_unpadded,), "float32", []]
        (self.dir / self.sub).mkdir(parents=True)
        self.file = open(self.dir / self.sub / DATA, "wb")

    def _append(self, obj=None, array=None) -> tuple[int, int]:
        """(offset, length) of one item's ``torch.save`` archive, as DCP stores each, written
        at the end of the data file."""
        return torchfile.append_archive(self.file, self.dir / self.sub / DATA, obj, array)

    def write(self, coord, name, arr):
        fqn, index = self.expected[name]
        entry = self.tensors[fqn]
        if dtype_name(arr.dtype) != entry[1]:
            raise MapcError(f"internal: {name} arrived as {dtype_name(arr.dtype)}, planned "
                            f"{entry[1]}")
        arr = np.asarray(arr)
        if index is None:
            offsets, chunk = (0,) * arr.ndim, arr
        else:
            offsets, chunk = (index,) + (0,) * arr.ndim, arr[None]
        entry[2].append((offsets, tuple(chunk.shape)) + self._append(array=chunk))
        if self.opt is not None and self.opt.masters_from_weights and \
                entry[1] in ("float32", "bfloat16", "float16"):
            self._slot("master", name, np.asarray(arr, np.float32))

    def write_slot(self, slot, coord, name, arr):
        self._slot(slot, name, np.asarray(arr))

    def _slot(self, slot, name, arr):
        """Slot ``slot`` of the global tensor ``name``: once every global tensor of its unit
        of the cut program has arrived, cut them into the ranks' local tensors and append each
        as the chunk of its rank's bucket at the parameter's place."""
        from mapc.runtime import execute
        if self.fully:
            fqn, index = self.expected[name]
            arr = np.asarray(arr, np.float32)
            offsets, chunk = ((0,) * arr.ndim, arr) if index is None else \
                ((index,) + (0,) * arr.ndim, arr[None])
            key = f"optimizer.state.{'param' if slot == 'master' else slot}.{fqn}"
            self.tensors[key][2].append((offsets, tuple(chunk.shape)) +
                                        self._append(array=chunk))
            return
        unit = self.cut_unit[name]
        got = self.pending.setdefault((slot, id(unit)), {})
        got[name] = arr
        if len(got) < sum(len(inst.shards) for inst in unit.sources):
            return
        del self.pending[(slot, id(unit))]
        be = execute.get_backend("numpy")
        logical = execute.read_instances(unit.sources, _Served(got), be, execute.Report(),
                                         False)
        for inst in unit.targets:
            members = {m: logical[k] for m, k in inst.members.items()}
            for rc, copies in inst.by_recipe_coord().items():
                local = np.ascontiguousarray(be.to_numpy(inst.recipe.shard(be, members,
                                                                           dict(rc))),
                                             dtype=np.float32).reshape(-1)
                for coord, mname in copies:
                    if (coord, mname) not in self.place:
                        continue            # a dense parameter's copy at another expert rank
                    group, b, k, start, numel = self.place[(coord, mname)]
                    if local.size != numel:
                        raise MapcError(f"internal: {mname} has {local.size} elements, its "
                                        f"place in the bucket {numel}")
                    self._flat_chunk(self._bucket_key(group, b, k, slot), start, local)

    def _flat_chunk(self, key, start, flat):
        self.tensors[key][2].append(((start,), (flat.size,)) +
                                    self._append(array=flat))

    def _object(self, key, obj):
        """A ShardedObject as megatron-core stores it: ``[object]`` at ``KEY/shard_0_1``."""
        self.objects[f"{key}/shard_0_1"] = self._append(obj=[obj])

    def _param_groups(self, chain: int | None = None) -> list[dict]:
        """The param groups of optimizer ``chain``: a ChainedOptimizer's expert one (1) has
        megatron-core's groups of the expert parameters (``is_expert_parallel``)."""
        from mapc.runtime.containers.distopt import expert_groups, param_groups
        groups = param_groups(self.training)
        return expert_groups(groups, self.opt.experts) if chain == 1 else groups

    def _optimizer_objects(self):
        """The alignment gaps of every bucket (zeros), and per model-parallel rank the
        objects megatron-core's DistributedOptimizer loads: its param groups (with the step)
        and the bucket sizes (padded for the output's dp, and unpadded)."""
        import math

        from mapc.runtime.containers.distopt import _pad
        for group, buffers in sorted(self.opt.by_group().items(), key=lambda x: str(x[0])):
            groups = self._param_groups(group[0])
            # bucket ends padded for the expert data-parallel size in the expert optimizer
            divisor = math.lcm(self.opt.edp if group[0] == 1 else self.opt.dp, 128)
            for b, buf in enumerate(buffers):
                for k, bucket in enumerate(buf.buckets):
                    for start, n in _gaps(bucket):
                        for slot in ("master", "exp_avg", "exp_avg_sq"):
                            self._flat_chunk(self._bucket_key(group, b, k, slot), start,
                                             np.zeros(n, np.float32))
            pairs = [tuple(torchfile.TorchDType(x) for x in buf.pair) for buf in buffers]
            base = f"{_prefix(group[0])}optimizer.distributed.dp_group_idx_{group[1]}"
            self._object(f"{base}.optimizer", {"param_groups": groups})
            self._object(f"{base}.per_bucket_numel", [
                {pair: [_pad(x.numel_unpadded, divisor) for x in buf.buckets]}
                for pair, buf in zip(pairs, buffers)])
            self._object(f"{base}.per_bucket_numel_unpadded", [
                {pair: [x.numel_unpadded for x in buf.buckets]}
                for pair, buf in zip(pairs, buffers)])

    def finish(self, record: dict):
        if self.opt is not None:
            if not self.fully and self.pending:
                raise MapcError("internal: optimizer state of "
                                f"{sorted(n for g in self.pending.values() for n in g)[:3]} "
                                f"arrived without the rest of its unit")
            if not self.fully:
                self._optimizer_objects()
        for fqn, (shape, _, chunks) in self.tensors.items():
            if sum(int(np.prod(z)) for _, z, _, _ in chunks) != int(np.prod(shape)):
                raise MapcError(f"internal: {fqn} was not written completely")
            if not fqn.startswith("optimizer."):
                for key in self._extra_state_keys(fqn, shape):
                    self.objects.setdefault(key, self._append(obj=[None]))
        self.file.close()
        d = self.dir / self.sub
        dcp.write_chunked_metadata(d / dcp.METADATA, {k: tuple(v) for k, v in
                                                      self.tensors.items()},
                                   self.objects, DATA)
        write_json(d / METADATA_JSON, BACKEND)
        w = torchfile.TorchWriter(d / COMMON)
        w.finish(self._common())
        self._finish_root(record)

    def _extra_state_keys(self, fqn: str, shape: tuple) -> list[str]:
        return _extra_state_keys(fqn, shape)

    def _common(self) -> dict:
        args = dict(self.args, ckpt_format="torch_dist",
                    iteration=self.iteration or 0)
        common = {"args": torchfile.Namespace(**args), "checkpoint_version": 3.0,
                  "iteration": self.iteration or 0, "content_metadata": dict(CONTENT_METADATA)}
        if self.opt is not None:
            args.update(use_distributed_optimizer=True, data_parallel_size=self.opt.dp,
                        transformer_impl=self.opt.impl)
            if self.opt.vpp > 1:        # what the reader derives the chunks' buffers from
                layers = args.get("num_layers")
                pp = int(args.get("pipeline_model_parallel_size") or 1)
                args.update(virtual_pipeline_model_parallel_size=self.opt.vpp,
                            num_layers_per_virtual_pipeline_stage=(
                                layers // (pp * self.opt.vpp) if isinstance(layers, int)
                                else None))
            if self.opt.chained:
                args.update(expert_tensor_parallel_size=self.opt.etp)
            common["args"] = torchfile.Namespace(**args)
            # a ChainedOptimizer's common state: one entry per optimizer, by index
            chains = (0, 1) if self.opt.chained else (None,)
            per = {}
            for chain in chains:
                per[chain] = {"param_state_sharding_type": self.opt.kind}
                if self.fully:
                    per[chain]["optimizer"] = {"param_groups": self._param_groups(chain)}
            common["optimizer"] = per if self.opt.chained else per[None]
            common["content_metadata"]["distrib_optim_sharding_type"] = self.opt.kind
            scheduler = self.training.get("lr_scheduler")
            if isinstance(scheduler, dict) and "num_steps" in scheduler:
                common["opt_param_scheduler"] = scheduler
        return common

    def _finish_root(self, record: dict):
        (self.dir / TRACKER).write_text(str(self.iteration) if self.iteration is not None
                                        else "release")
        write_json(self.dir / MAPC_JSON, record)

    def abort(self):
        if self.file is not None and not self.file.closed:
            self.file.close()


class _Served:
    """Arrived global tensors served to mapc.runtime.execute.read_instances."""

    def __init__(self, arrays: dict):
        self.arrays = arrays

    def read(self, name, coord=SINGLE, slot="param"):
        return self.arrays[name]


def _gaps(bucket):
    from mapc.runtime.containers.distopt import gaps
    return gaps(bucket)


Writer = TorchDistWriter
