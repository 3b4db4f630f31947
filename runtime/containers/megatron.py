"""Megatron-LM checkpoints in the ``torch`` format.

``latest_checkpointed_iteration.txt`` (an iteration number or ``release``) and
``iter_0000100/`` or ``release/`` holding ``mp_rank_TT[_PPP]/model_optim_rng.pt`` (the
``_PPP`` suffix only when pp > 1). Each file is a dict with ``model`` (megatron-core names,
flat; legacy models nest ``language_model`` -> ``embedding``/``encoder``/``output_layer``),
``args`` (an argparse.Namespace), ``checkpoint_version``, ``iteration``. Files are read and
written with mapc's own torch-file code: no pickled code runs and torch is not required.

Optimizer state (the non-distributed optimizer, ``optimizer`` key, plus ``opt_param_scheduler``)
holds each rank's shards, so it moves with the same program as the weights. Its layout is what
megatron-core's ``optimizer.state_dict()`` gives: for fp32 training (``FP32Optimizer``) the torch
Adam state dict itself, ``{"state": {index: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups":
[...]}``; for bf16/fp16 (``Float16OptimizerWithFloat16Params``) ``{"optimizer": that dict,
["grad_scaler": {...},] "fp32_from_fp16_params": [[fp32 master per 16-bit param] per group]}``.
Parameter ``index`` counts the rank's parameters group by group, each group in the model's
``named_parameters`` order (megatron-core's module registration order, ``MODULE_ORDER``), the
groups in megatron-core's ``_get_param_groups`` order. Weight decay is skipped (``wd_mult`` 0)
for 1-D parameters and biases, megatron-core's default rule.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from math import lcm
from pathlib import Path

import numpy as np

from mapc.errors import MapcError
from mapc.runtime import torchfile
from mapc.runtime.plan_write import (PlannedWriter, SourceFacts, WritePlan, WriteRequest,
                                     cast_dtype, make_plan, parts_by_file,
                                     planned_tensors)
from mapc.runtime.containers.base import (MAPC_JSON, RefSource, coord_key, rank_grid,
                                          write_json)

LAYOUT = "megatron"
# --pp-first-stage / --pp-last-stage (uneven pipeline stages, megatron-core's
# num_layers_in_first/last_pipeline_stage) set these parameters of the megatron layout
STAGE_PARAMS = {"pp_first_stage": "first_stage_layers", "pp_last_stage": "last_stage_layers"}
# Enums Megatron-LM pickles inside ``args`` (attention_backend, model_type, fp8_recipe,
# cuda_graph_scope, ...). Each is read as an inert ``Call`` of its class on its value, so it is
# written back exactly as it came; megatron is never imported.
MEGATRON_ENUMS = [("megatron.core.enums", n) for n in ("ModelType", "Fp8Recipe", "Fp4Recipe")] \
    + [("megatron.core.transformer.enums", n) for n in (
        "ModelType", "LayerType", "AttnType", "AttnMaskType", "AttnBackend", "CudaGraphScope")]


def _enum(module: str, name: str):
    def member(value=None, *rest):
        if rest or not isinstance(value, (int, str)):
            raise MapcError(f"unexpected {module}.{name}({value!r}) in the pickle")
        return torchfile.Call(module, name, (value,))
    member.__name__ = name
    return member


ENUM_GLOBALS = {f"{m}.{n}": _enum(m, n) for m, n in MEGATRON_ENUMS}
PICKLES = torchfile.allow_list("Megatron-LM", ENUM_GLOBALS)
TRACKER = "latest_checkpointed_iteration.txt"
FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


def tracked_iteration(path: Path, hint: str | None = None) -> Path | None:
    """The iteration directory Megatron-LM's ``latest_checkpointed_iteration.txt`` in ``path``
    names (``iter_NNNNNNN`` or ``release``), or None without a tracker (also read by the
    torch_dist container)."""
    tracker = path / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    sub = "release" if text == "release" else f"iter_{int(text):07d}" \
        if text.isdigit() else None
    if sub is None:
        raise MapcError(f"{TRACKER} holds {text!r}, not an iteration or 'release'",
                        where=str(path))
    if not (path / sub).is_dir():
        raise MapcError(f"{TRACKER} names {sub}, which does not exist", where=str(path),
                        hint=hint)
    return path / sub


def _iteration_dir(path: Path) -> Path:
    """The directory holding mp_rank_* folders: PATH itself, or the one the tracker names."""
    if any(_RANK_DIR.match(p.name) for p in path.iterdir() if p.is_dir()):
        return path
    tracked = tracked_iteration(path)
    if tracked is not None:
        return tracked
    iters = sorted(p for p in path.iterdir() if p.is_dir() and
                   (p.name == "release" or p.name.startswith("iter_")))
    if iters:
        return iters[-1]
    raise MapcError("no Megatron checkpoint here (no mp_rank_* folders, no "
                    f"{TRACKER})", where=str(path))


def detect(path: Path) -> bool:
    if not path.is_dir():
        return False
    if (path / TRACKER).is_file():
        return True
    try:
        d = _iteration_dir(path)
    except MapcError:
        return False
    return any((p / FILE).is_file() for p in d.iterdir() if _RANK_DIR.match(p.name))


def flatten(obj, prefix="") -> dict:
    out = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def nest(names_values) -> OrderedDict:
    """Megatron's state-dict nesting: legacy models nest modules, megatron-core is flat."""
    out: OrderedDict = OrderedDict()
    for name, value in names_values:
        parts = name.split(".")
        if parts[0] == "language_model" and len(parts) > 2 and parts[1] in ("encoder", "decoder"):
            path = parts[:2] + [".".join(parts[2:])]
        elif parts[0] in ("language_model", "word_embeddings_for_head"):
            path = parts
        else:
            path = [name]
        cur = out
        for p in path[:-1]:
            cur = cur.setdefault(p, OrderedDict())
        cur[path[-1]] = value
    return out


class MegatronSource(RefSource):
    format = "megatron"
    layout = "megatron"

    def __init__(self, path):
        super().__init__(path)
        self.iter_dir = _iteration_dir(self.path)
        found = {}
        for p in sorted(self.iter_dir.iterdir()):
            m = _RANK_DIR.match(p.name)
            if m and (p / FILE).is_file():
                found[tuple(int(g) if g else None for g in m.groups())] = p / FILE
        if not found:
            raise MapcError(f"no mp_rank_*/{FILE} files", where=str(self.iter_dir))
        first_file = next(iter(found.values()))
        args = torchfile.load(first_file, PICKLES, expect=dict).get("args")
        args = dict(args) if args is not None else {}
        # One suffix is the pipeline rank when pp > 1, else the expert rank (Megatron's naming).
        one_is_pp = (args.get("pipeline_model_parallel_size") or 1) > 1 or \
            (args.get("expert_model_parallel_size") or 1) == 1
        ranks = {}
        for (t, a, b), f in found.items():
            if b is not None:
                ranks[(t, a, b)] = f
            elif a is not None:
                ranks[(t, a, 0) if one_is_pp else (t, 0, a)] = f
            else:
                ranks[(t, 0, 0)] = f
        etp = args.get("expert_tensor_parallel_size")
        sizes = {axis: args.get(key) for axis, key in (
            ("tp", "tensor_model_parallel_size"), ("pp", "pipeline_model_parallel_size"),
            ("ep", "expert_model_parallel_size")) if isinstance(args.get(key), int)}
        self.topology, self.files, self._coords = rank_grid(
            ranks, rank_dir, str(self.iter_dir), etp if isinstance(etp, int) else None, sizes)
        self._loaded: dict = {}
        self._files_loaded: dict = {}
        self._chunk: dict = {}
        self.vpp = 1
        self._virtual_stages(args)
        first = self._load(self._coords[0])
        args = first.get("args")
        self.format_meta = dict(args) if args is not None else {}
        self.iteration = first.get("iteration")
        self.checkpoint_version = first.get("checkpoint_version")
        self.config = self.record.get("config")
        self._optim: dict = {}
        opt = first.get("optimizer")
        if isinstance(opt, (list, tuple)):
            raise MapcError("this checkpoint holds a chained optimizer (one per expert/dense "
                            "parameter set); mapc reads the optimizer state of a single "
                            "non-distributed optimizer only", where=str(self._file(self._coords[0])),
                            hint="convert the weights only from a checkpoint saved without "
                            "optimizer state, or open an issue with the file")
        self.optimizer_kind = _optimizer_kind(opt)
        self._distopt = None                     # _LegacyDistributed once bind_plan derived it
        if self.optimizer_kind == "distributed" and not all(
                (f.parent / DISTRIB_OPTIM).is_file() for f in self.files.values()):
            self.warnings.append(f"the optimizer state of Megatron's distributed optimizer "
                                 f"lives in {DISTRIB_OPTIM} files beside each rank's "
                                 f"model_optim_rng.pt, which are missing here: weights only")

    def bind_plan(self, plan):
        """Called by resolve with the matched megatron plan: with the distributed optimizer,
        derive where each parameter sits in every rank's distrib_optim.pt."""
        self._distopt = None
        if self.optimizer_kind == "distributed" and all(
                (f.parent / DISTRIB_OPTIM).is_file() for f in self.files.values()):
            self._distopt = _LegacyDistributed(self, plan)

    def _virtual_stages(self, args):
        """Megatron-LM's interleaved schedule saves ``model0``, ``model1``, ... (one model chunk
        per virtual stage) in every rank file. Chunk v of pipeline rank p is virtual stage
        ``v * pp + p``, which is how the compiler sees it: the pp axis counts virtual stages
        (megatron-core's layer offset of chunk v on rank p is (v * pp + p) * layers / (pp * vpp)
        when the stages are even; with uneven first/last stages each chunk is an uneven
        pipeline of layers / vpp layers, compiler/plan.py pipeline_stages)."""
        f = self.files[coord_key(self._coords[0])]
        chunks = _chunk_keys(self._load_file(f), f)
        vpp = len(chunks) if chunks != ["model"] else 1
        said = args.get("virtual_pipeline_model_parallel_size")
        if said not in (None, vpp) and not (said == 1 and vpp == 1):
            raise MapcError(f"args.virtual_pipeline_model_parallel_size is {said}, but the file "
                            f"holds {len(chunks)} model chunk(s) ({', '.join(chunks)})",
                            where=str(f), hint="the checkpoint is inconsistent; re-save it")
        if vpp == 1:
            return
        pp = self.topology["pp"]
        files, coords = {}, []
        for coord in self._coords:
            c = dict(coord)
            for v in range(vpp):
                vc = tuple((a, v * pp + i if a == "pp" else i) for a, i in coord)
                files[coord_key(vc)] = self.files[coord_key(coord)]
                self._chunk[coord_key(vc)] = v
                coords.append(((v * pp + c["pp"], c.get("ep", 0), c["tp"]), vc))
        self.files = files
        self._coords = [vc for _, vc in sorted(coords)]
        self.vpp = vpp
        self.topology = dict(self.topology, pp=pp * vpp)

    def _file(self, coord):
        return self.files[coord_key(coord)]

    def _load_file(self, f):
        """A rank file with ``_tensors``: every model chunk's tensors (names prefixed
        ``model{v}.`` when the file holds several chunks) and ``_chunks``: each chunk's."""
        if f not in self._files_loaded:
            obj = torchfile.load(f, PICKLES)
            keys = _chunk_keys(obj, f)
            chunks = []
            for key in keys:
                model = obj[key]
                if not hasattr(model, "items"):
                    raise MapcError(f"the '{key}' entry is a {type(model).__name__}, not a "
                                    "state dict", where=str(f))
                chunks.append({k: v for k, v in flatten(model).items()
                               if not k.endswith("_extra_state")
                               and isinstance(v, torchfile.TensorRef)})
            obj = dict(obj)
            obj["_chunks"] = chunks
            obj["_tensors"] = chunks[0] if len(chunks) == 1 else \
                {f"{key}.{n}": ref for key, c in zip(keys, chunks) for n, ref in c.items()}
            self._files_loaded[f] = obj
        return self._files_loaded[f]

    def _load(self, coord):
        """The rank file of ``coord`` with ``_tensors`` of its model chunk."""
        key = coord_key(coord)
        if key not in self._loaded:
            obj = self._load_file(self.files[key])
            self._loaded[key] = dict(obj, _tensors=obj["_chunks"][self._chunk.get(key, 0)])
        return self._loaded[key]

    def coords(self):
        return list(self._coords)

    def names(self, coord):
        return list(self._load(coord)["_tensors"])

    def _ref(self, name, coord):
        try:
            return self._load(coord)["_tensors"][name]
        except KeyError:
            raise MapcError(f"tensor {name} is not in the checkpoint",
                            where=str(self._file(coord))) from None

    def describe_coord(self, coord):
        where = str(self._file(coord).relative_to(self.path))
        return where + (f" model{self._chunk[coord_key(coord)]}" if self.vpp > 1 else "")

    # -- optimizer state ----------------------------------------------------------------------
    def slots(self):
        if self._distopt is not None:
            return ["param", "master", "exp_avg", "exp_avg_sq"]
        if self.optimizer_kind in ("fp32", "mixed") and self._optim_of(self._coords[0])["state"]:
            return ["param", "master", "exp_avg", "exp_avg_sq"]
        return ["param"]

    def _optim_of(self, coord):
        """{"state": {name: {slot: TensorRef}}, "groups": [[names]], "hyper": [...]} of a rank."""
        key = coord_key(coord)
        if key not in self._optim:
            f = self._file(coord)
            if self.vpp == 1:
                self._optim[key] = _index_optimizer(self._load(coord), self.optimizer_kind, f)
            else:   # one optimizer per rank file, over all its chunks (model{v}.NAME)
                if f not in self._optim:
                    self._optim[f] = _index_optimizer(self._load_file(f), self.optimizer_kind, f)
                whole, prefix = self._optim[f], f"model{self._chunk[key]}."
                self._optim[key] = {
                    "state": {n.removeprefix(prefix): st for n, st in whole["state"].items()
                              if n.startswith(prefix)},
                    "groups": [[n.removeprefix(prefix) for n in g if n.startswith(prefix)]
                               for g in whole["groups"]]}
        return self._optim[key]

    def dtype(self, name, coord, slot="param"):
        if slot == "param":
            return self._ref(name, coord).dtype
        if self._distopt is not None:
            return "float32"
        return self._slot_ref(name, coord, slot).dtype

    def read(self, name, coord, slot="param"):
        if slot == "param":
            return self._ref(name, coord).map()
        if self._distopt is not None:
            return self._distopt.read(name, coord, slot)
        return self._slot_ref(name, coord, slot).map()

    def _slot_ref(self, name, coord, slot):
        if slot not in ("master", "exp_avg", "exp_avg_sq"):
            raise MapcError(f"unknown optimizer slot {slot!r}")
        state = self._optim_of(coord)["state"]
        if name not in state:
            raise MapcError(f"no optimizer state for {name}", where=str(self._file(coord)))
        ref = state[name].get(slot)
        if slot == "master" and ref is None:   # fp32 parameters are their own master copy
            ref = self._ref(name, coord)
        if ref is None:
            raise MapcError(f"no {slot} for {name} in the optimizer state",
                            where=str(self._file(coord)))
        return ref

    def training_state(self) -> dict:
        if self._distopt is not None:
            return self._distopt.training_state()
        if self.optimizer_kind not in ("fp32", "mixed"):
            return {"iteration": self.iteration} if self.iteration is not None else {}
        first = self._load(self._coords[0])
        opt = first["optimizer"]
        inner = opt["optimizer"] if self.optimizer_kind == "mixed" else opt
        names: list[list[str]] = [[] for _ in inner["param_groups"]]
        for coord in self._coords:
            for g, group in enumerate(self._optim_of(coord)["groups"]):
                names[g] += [n for n in group if n not in names[g]]
        groups = []
        for g, pg in enumerate(inner["param_groups"]):
            hyper = {k: v for k, v in pg.items() if k != "params"}
            hyper["params"] = names[g]
            groups.append(hyper)
        steps = [st["step"] for st in inner["state"].values() if "step" in st]
        scaler = opt.get("grad_scaler") if self.optimizer_kind == "mixed" else None
        scaler = {k: _scalar(v) for k, v in scaler.items()} if scaler else None
        return {
            "iteration": self.iteration,
            "global_samples": self.format_meta.get("consumed_train_samples"),
            "step": _scalar(steps[0]) if steps else None,
            "param_groups": groups,
            "lr_scheduler": first.get("opt_param_scheduler"),
            "loss_scale": scaler.get("scale") if scaler else None,
            "grad_scaler": scaler,
            "clip_grad": self.format_meta.get("clip_grad"),
            "zero_stage": None,
            "dp_world_size": self.format_meta.get("data_parallel_size"),
        }


# megatron-core's module registration order (GPTModel, TransformerBlock, TransformerLayer,
# SelfAttention, MLP/MoE, TE linears; legacy ParallelTransformer): siblings are registered, and
# named_parameters() yields them, in this order. Unknown names keep their place after known ones.
MODULE_ORDER = {n: i for i, n in enumerate((
    "language_model", "embedding", "word_embeddings", "position_embeddings", "encoder",
    "decoder", "layers", "input_layernorm", "input_norm", "self_attention", "linear_proj",
    "linear_qkv", "query_key_value", "dense", "q_layernorm", "k_layernorm",
    "pre_cross_attn_layernorm", "cross_attention", "pre_mlp_layernorm",
    "post_attention_layernorm", "post_attention_norm", "mlp", "router", "linear_fc1",
    "linear_fc2", "dense_h_to_4h", "dense_4h_to_h", "experts", "local_experts",
    "shared_experts", "final_layernorm", "final_norm", "output_layer", "layer_norm_weight",
    "layer_norm_bias", "weight", "bias"))}


def module_order(names) -> list[str]:
    """``names`` in megatron-core's ``named_parameters`` order (the order of optimizer indices).
    A leading ``model{v}.`` (a virtual-pipeline chunk) sorts by chunk first: megatron-core's
    ``_get_param_groups`` walks the model chunks in order."""
    first = {}
    for n in names:
        for part in n.split("."):
            first.setdefault(part, len(first))

    def key(name):
        parts = name.split(".")
        head = [(-1, int(parts[0][5:]), 0)] if _CHUNK.match(parts[0]) else []
        return head + [(0, int(p), 0) if p.isdigit() else
                       (1, MODULE_ORDER[p], 0) if p in MODULE_ORDER else (2, 0, first[p])
                       for p in parts[len(head):]]
    return sorted(names, key=key)


_CHUNK = re.compile(r"^model\d+$")


def _chunk_keys(obj, where) -> list[str]:
    """``["model"]``, or ``["model0", "model1", ...]`` of a virtual-pipeline rank file."""
    if not isinstance(obj, dict):
        raise MapcError("not a Megatron checkpoint file (not a dict)", where=str(where))
    if "model" in obj:
        return ["model"]
    n = sum(1 for k in obj if isinstance(k, str) and _CHUNK.match(k))
    keys = [f"model{v}" for v in range(n)]
    if not n or any(k not in obj for k in keys):
        raise MapcError("not a Megatron checkpoint file (no 'model' entry" +
                        (f"; model chunks {sorted(k for k in obj if _CHUNK.match(str(k)))} are "
                         f"not model0..model{n - 1}" if n else "") + ")", where=str(where))
    return keys


def _no_weight_decay(name: str, ndim: int) -> bool:
    """megatron-core's default rule (get_standard_config_overrides): wd_mult 0 for 1-D
    parameters and biases."""
    return ndim == 1 or name.endswith(".bias")


def _scalar(v):
    if isinstance(v, torchfile.TensorRef):
        return float(np.asarray(v.numpy()).reshape(-1)[0])
    return v


DISTRIB_OPTIM = "distrib_optim.pt"


class _LegacyDistributed:
    """Megatron-LM's torch format with the distributed optimizer: beside each rank's
    model_optim_rng.pt (whose ``optimizer`` holds only the param groups, with the step) a
    ``distrib_optim.pt`` that DP rank 0 gathered (``DistributedOptimizer.save_parameter_state``):
    ``{"buckets_coalesced": True, gbuf_idx: {(param dtype, grad dtype): {"param", "exp_avg",
    "exp_avg_sq": flat fp32, "numel_unpadded"}}}``, one entry per DDP buffer (per parameter
    dtype and, with a virtual pipeline, per model chunk, the chunks' buffers one after
    another), each the buffer's buckets without their end padding one after another. Where
    each parameter sits is derived as megatron-core's DDP lays the buffers out
    (runtime/containers/distopt.py) from the matched megatron plan and the stored dtypes; the
    buffers' dtypes and sizes and every 1-D parameter's fp32 master (it must round to the
    stored weight) check the derivation before anything is read. The flat tensors are mapped,
    not read whole."""

    def __init__(self, src, plan):
        from mapc.runtime.containers import distopt
        self.src = src
        args = src.format_meta
        tp, pp = src.topology.get("tp", 1), src.topology.get("pp", 1) // src.vpp
        world = int(args.get("world_size") or 0)
        self.dp = int(args.get("data_parallel_size") or 0) or max(1, world // (tp * pp))
        # each parameter's dtype as stored: megatron-core's DDP gives every dtype a buffer
        stored = {k: src.dtype(name, coord) for inst, coord, name in plan.placements()
                  for k in inst.members.values()}
        layouts = distopt.rank_layouts(
            plan, self.dp, args, lambda inst: stored.get(next(iter(inst.members.values()))),
            vpp=src.vpp)
        self.place: dict[tuple, tuple] = {}     # (coord_key, name) -> (state, start, numel)
        states: dict = {}                        # rank file -> its buffers
        for coord, lay in sorted(layouts.items(), key=lambda x: x[1].gbuf0):
            key = coord_key(coord)
            f = src.files[key].parent / DISTRIB_OPTIM
            if f not in states:
                states[f] = distopt.coalesced_buffers(torchfile.load(f, PICKLES),
                                                      DISTRIB_OPTIM, str(f))
                want = [buf.pair for lay2 in sorted(
                    (x for c, x in layouts.items() if src.files[coord_key(c)] == src.files[key]),
                    key=lambda x: x.gbuf0) for buf in lay2.buffers]
                have = [pair for pair, _ in states[f]]
                if have != want:
                    raise MapcError(f"the distributed optimizer holds the DDP buffers {have}, "
                                    f"but the model's parameter dtypes and chunks give {want}",
                                    where=str(f), hint="the checkpoint was trained with "
                                    "settings mapc does not derive; convert the weights only")
            for b, buf in enumerate(lay.buffers, lay.gbuf0):
                state = states[f][b][1]
                distopt.check_total(state["param"], buf.buckets,
                                    f"the distributed optimizer's buffer {b}", str(f))
                off = 0
                for bucket in buf.buckets:
                    for name, start, numel in bucket.params:
                        self.place[(key, name)] = (state, off + start, numel)
                    off += bucket.numel_unpadded
        for coord in src.coords():
            for name in src.names(coord):
                if len(src.shape(name, coord)) != 1:
                    continue
                weight = np.asarray(src.read(name, coord))
                master = self.read(name, coord, "master")
                from mapc.runtime.backends import DTYPES
                if not np.array_equal(master.astype(DTYPES[src.dtype(name, coord)])
                                      .view(np.uint8), weight.view(np.uint8)):
                    raise MapcError(f"the distributed optimizer's fp32 master of {name} does "
                                    f"not round to the stored weight: mapc cannot tell where "
                                    f"it keeps each parameter", where=str(
                                        src.files[coord_key(coord)].parent / DISTRIB_OPTIM),
                                    hint="convert the weights only")

    def read(self, name, coord, slot) -> np.ndarray:
        if slot not in ("master", "exp_avg", "exp_avg_sq"):
            raise MapcError(f"unknown optimizer slot {slot!r}")
        try:
            state, start, numel = self.place[(coord_key(coord), name)]
        except KeyError:
            raise MapcError(f"no distributed-optimizer state for {name}",
                            where=self.src.describe_coord(coord)) from None
        flat = state["param" if slot == "master" else slot].map()
        return np.array(flat[start:start + numel]).reshape(self.src.shape(name, coord))

    def training_state(self) -> dict:
        """Step, param groups (by megatron-core's default weight-decay rule), grad scaler and
        scheduler, from model_optim_rng.pt's optimizer state dict."""
        src = self.src
        first = src._load(src.coords()[0])
        opt = first.get("optimizer")
        inner = opt.get("optimizer") if hasattr(opt, "get") else None
        groups = inner.get("param_groups") if hasattr(inner, "get") else None
        where = str(src._file(src.coords()[0]))
        if not isinstance(groups, list) or not groups or \
                not all(isinstance(g, dict) for g in groups):
            raise MapcError("the distributed optimizer's state has no param_groups", where=where)
        zero = [float(g.get("wd_mult", 1.0)) == 0.0 for g in groups]
        if len(groups) > 2 or len(set(zero)) != len(groups):
            raise MapcError(f"the distributed optimizer's {len(groups)} parameter groups do not "
                            f"follow megatron-core's default grouping", where=where,
                            hint="mapc reads Megatron optimizers with megatron-core's default "
                                 "parameter groups only")
        names = []
        for coord in src.coords():
            names += [n for n in src.names(coord) if n not in names]
        shapes = {n: len(src.shape(n, c)) for c in src.coords() for n in src.names(c)}
        no_wd = [n for n in names if _no_weight_decay(n, shapes[n])]
        wd = [n for n in names if n not in set(no_wd)]
        out_groups = []
        for g, z in zip(groups, zero):
            hyper = {k: v for k, v in g.items() if k not in ("params", "step")}
            hyper["params"] = no_wd if z else wd
            out_groups.append(hyper)
        step = groups[0].get("step")
        scaler = opt.get("grad_scaler")
        scaler = {k: _scalar(v) for k, v in scaler.items()} if isinstance(scaler, dict) else None
        return {"iteration": src.iteration,
                "global_samples": src.format_meta.get("consumed_train_samples"),
                "step": float(_scalar(step)) if step is not None else None,
                "param_groups": out_groups,
                "lr_scheduler": first.get("opt_param_scheduler"),
                "loss_scale": scaler.get("scale") if scaler else None,
                "grad_scaler": scaler,
                "clip_grad": src.format_meta.get("clip_grad"),
                "zero_stage": None,
                "dp_world_size": self.dp}


def _optimizer_kind(opt) -> str | None:
    if opt is None:
        return None
    if not hasattr(opt, "get"):
        raise MapcError(f"the 'optimizer' entry is a {type(opt).__name__}, not a state dict")
    if "fp32_from_fp16_params" in opt or "fp32_from_fp16" in opt:
        return "mixed"
    if "state" in opt and "param_groups" in opt:
        return "fp32"
    return "distributed"


def _index_optimizer(obj, kind, where) -> dict:
    """Name every parameter index of one rank's optimizer and check it against the model."""
    opt = obj["optimizer"]
    inner = opt["optimizer"] if kind == "mixed" else opt
    masters = (opt.get("fp32_from_fp16_params") or opt.get("fp32_from_fp16") or []) \
        if kind == "mixed" else None
    model = obj["_tensors"]
    params = module_order(list(model))
    pgroups = inner["param_groups"]
    sizes = [len(g["params"]) for g in pgroups]
    if sum(sizes) != len(params):
        raise MapcError(f"the optimizer holds {sum(sizes)} parameters in {len(sizes)} groups "
                        f"{sizes}, but the model on this rank has {len(params)}",
                        where=str(where), hint="the optimizer state does not belong to this "
                        "model (or the file is corrupt); convert the weights from a checkpoint "
                        "saved without optimizer state")
    if len(pgroups) == 1:
        groups = [params]
    else:
        no_wd = [n for n in params if _no_weight_decay(n, len(model[n].shape))]
        wd = [n for n in params if n not in set(no_wd)]
        mult = [g.get("wd_mult", 1.0 if g.get("weight_decay", 0) else 0.0) for g in pgroups]
        nonempty = [g for g, size in enumerate(sizes) if size]
        groups = [[] for _ in pgroups]
        for g in nonempty:
            groups[g] = wd if mult[g] else no_wd
        if len(nonempty) > 2 or [len(groups[g]) for g in range(len(pgroups))] != sizes or \
                len({mult[g] == 0 for g in nonempty}) != len(nonempty):
            raise MapcError(f"the optimizer's {len(pgroups)} parameter groups {sizes} (wd_mult "
                            f"{mult}) do not follow megatron-core's default grouping (weight "
                            f"decay on all but 1-D parameters and biases: {len(wd)} + "
                            f"{len(no_wd)})", where=str(where),
                            hint="mapc reads Megatron optimizers with megatron-core's default "
                            "parameter groups only")
    index = {}
    i = 0
    for g, names in enumerate(groups):
        got = [int(x) for x in pgroups[g]["params"]]
        for j, name in enumerate(names):
            index[name] = (got[j] if j < len(got) else i, g, j)
            i += 1
    state = {}
    for g, names in enumerate(groups):
        fp16 = [n for n in names if model[n].dtype in ("float16", "bfloat16")]
        if masters is not None and len(masters[g] if g < len(masters) else []) != len(fp16):
            raise MapcError(f"fp32_from_fp16_params group {g} holds "
                            f"{len(masters[g]) if g < len(masters) else 0} master copies for "
                            f"{len(fp16)} 16-bit parameters", where=str(where))
        for name in names:
            st = dict(inner["state"].get(index[name][0]) or {})
            slots = {k: st[k] for k in ("exp_avg", "exp_avg_sq") if k in st}
            if masters is not None and name in fp16:
                slots["master"] = masters[g][fp16.index(name)]
            for slot, ref in slots.items():
                if not isinstance(ref, torchfile.TensorRef) or \
                        tuple(ref.shape) != tuple(model[name].shape):
                    raise MapcError(f"the {slot} of {name} (optimizer index {index[name][0]}) "
                                    f"has shape {getattr(ref, 'shape', None)}, the parameter "
                                    f"{tuple(model[name].shape)}", where=str(where),
                                    hint="the optimizer state does not match the model")
            state[name] = slots
    if inner["state"] and any(not state[n] for n in params):
        missing = [n for n in params if not state[n]]
        raise MapcError(f"no optimizer state for {len(missing)} parameters, e.g. {missing[0]}",
                        where=str(where))
    return {"state": state if inner["state"] else {}, "groups": groups}


def rank_dir(coord, pp: int, ep: int = 1) -> str:
    c = dict(coord)
    return (f"mp_rank_{c.get('tp', 0):02d}" + (f"_{c.get('pp', 0):03d}" if pp > 1 else "")
            + (f"_{c.get('ep', 0):03d}" if ep > 1 else ""))


class MegatronWriter(PlannedWriter):
    """Writes ``model_optim_rng.pt`` per rank, streaming each tensor into its file.

    With an optimizer (plan detail ``kind`` "fp32" or "mixed") it also stores the optimizer
    state as megatron-core's non-distributed optimizer saves it (see the module docstring):
    moments from the ``exp_avg``/``exp_avg_sq`` slots (and fp32 masters from ``master`` when
    "mixed"), the step, param groups and scheduler from ``record["training"]``, each tensor's
    group from ``groups`` ({(coord, name): source group index}, Program.target_groups).
    Without moments from the source (``fresh``), a fresh optimizer is written: no state,
    masters = weights."""
    keeps_arrays = False    # every array is written before write() returns
    takes_ranges = True     # FileBytes: its bytes are copied from the source files

    def __init__(self, tmpdir, program, plan):
        super().__init__(tmpdir, program, plan)
        topology, opt = program.target.mesh, plan.detail
        self.vpp = opt.vpp
        self.tp, self.pp = topology.get("tp", 1), topology.get("pp", 1) // opt.vpp
        self.ep = topology.get("ep", 1)
        self.etp = topology.get("etp")      # megatron-core's expert tensor parallel size
        self.args = program.target.meta()
        self.iteration = opt.iteration
        self.optimizer = opt.kind
        self.groups = opt.groups or {}
        self.fresh = opt.fresh
        self.default_training = opt.training or {}
        self.writers = {}             # rank file coord -> (TorchWriter, {(coord, name): ref})
        self.order = {}
        self.dtypes = {}
        self.slot_data: dict = {}     # (coord, name) -> {slot: placeholder}
        self.dist = opt if opt.dp else None
        # distributed: rank file coord -> (its distrib_optim.pt TorchWriter, per DDP buffer in
        # gbuf_idx order its (param dtype, grad dtype), {slot: reserved placeholder} and
        # numel_unpadded); (coord, name) -> (rank, gbuf, start, numel)
        self.flats: dict = {}
        self.place: dict = {}
        if self.dist:
            self.args = dict(opt.args)

    def begin(self, tensors):
        for coord, name, shape, dt in tensors:
            self.order.setdefault(coord, []).append(name)
            self.dtypes[(coord, name)] = dt
        if self.optimizer:   # optimizer indices follow megatron-core's parameter order
            for coord in self.order:
                self.order[coord] = module_order(self.order[coord])
        self.sub = _subdir(self.iteration, self.optimizer)
        for coord in self.order:
            rank = self._rank_file(coord)[0]
            if rank in self.writers:
                continue
            rel = f"{self.sub}/{rank_dir(rank, self.pp, self.ep)}"
            if not self.owns(f"{rel}/{FILE}"):
                continue                          # another worker's rank
            d = self.dir / rel
            d.mkdir(parents=True, exist_ok=True)
            self.writers[rank] = (torchfile.TorchWriter(d / FILE), {})
        if self.dist:
            self._begin_distributed()

    def _begin_distributed(self):
        """Every owned rank's ``distrib_optim.pt`` laid out at once: per DDP buffer (gbuf_idx
        order) the zip members of its flat fp32 ``param``/``exp_avg``/``exp_avg_sq`` (its
        buckets without end padding, one after another) reserved at their final offsets
        (torchfile.TorchWriter.reserve_tensor), and each parameter's place in them. Every
        arriving master or moment is written straight there (:meth:`_flat`); the alignment
        gaps are never written (holes, which read as zeros). A virtual pipeline's chunks are
        the rank's buffers one after another."""
        for coord, lay in sorted(self.dist.layouts.items(), key=lambda x: x[1].gbuf0):
            rank = self._rank_file(coord)[0]
            if rank not in self.writers:
                continue
            if rank not in self.flats:
                self.flats[rank] = (torchfile.TorchWriter(
                    self.writers[rank][0].path.parent / DISTRIB_OPTIM), [])
            w, buffers = self.flats[rank]
            for b, buf in enumerate(lay.buffers, lay.gbuf0):
                if b != len(buffers):
                    raise MapcError(f"internal: buffer {b} of dp_group_idx_{lay.group} planned "
                                    f"after {len(buffers)}")
                total = sum(x.numel_unpadded for x in buf.buckets)
                buffers.append((buf.pair, {slot: w.reserve_tensor("float32", (total,))
                                           for slot in ("master", "exp_avg", "exp_avg_sq")},
                                total))
                off = 0
                for bucket in buf.buckets:
                    for name, start, numel in bucket.params:
                        self.place[(coord, name)] = (rank, b, off + start, numel)
                    off += bucket.numel_unpadded
        for w, _ in self.flats.values():
            w.suspend()     # reopened per piece: no descriptor held per rank in between

    def _flat(self, slot, coord, name, arr):
        rank, b, start, numel = self.place[(coord, name)]
        flat = np.asarray(arr, dtype=np.float32).reshape(-1)
        if flat.size != numel:
            raise MapcError(f"internal: {name} has {flat.size} elements, its place in the "
                            f"distributed optimizer's buffer {numel}")
        w, buffers = self.flats[rank]
        w.fill(buffers[b][1][slot], start * 4, flat)

    def _rank_file(self, coord):
        """(rank file coord, model chunk) of a program coord: with virtual pipeline stages the
        program's pp axis counts them, stage s = chunk * pp + pipeline rank."""
        if self.vpp == 1:
            return coord, None
        s = dict(coord).get("pp", 0)
        return tuple((a, s % self.pp if a == "pp" else i) for a, i in coord), s // self.pp

    def write(self, coord, name, arr):
        w, placeholders = self.writers[self._rank_file(coord)[0]]
        placeholders[(coord, name)] = w.add_tensor(arr)
        if self.dist:
            if self.dist.masters_from_weights:
                self._flat("master", coord, name, arr)
            return
        if self.fresh and self.optimizer == "mixed" and self._is16(coord, name):
            self.slot_data.setdefault((coord, name), {})["master"] = \
                w.add_tensor(np.asarray(arr, dtype=np.float32))

    def write_slot(self, slot, coord, name, arr):
        if self.dist:
            self._flat(slot, coord, name, arr)
            return
        w, _ = self.writers[self._rank_file(coord)[0]]
        self.slot_data.setdefault((coord, name), {})[slot] = w.add_tensor(arr)

    def _is16(self, coord, name):
        return self.dtypes[(coord, name)] in ("float16", "bfloat16")

    def _optimizer_dict(self, entries, training, w):
        """megatron-core's optimizer.state_dict() for one rank file: ``entries`` are its
        (coord, name) in parameter order (model chunk by model chunk)."""
        hyper = _megatron_groups(training.get("param_groups") or [{}])
        order = sorted(range(len(hyper)), key=lambda g: _group_sort_key(hyper[g]))
        members = {g: [] for g in range(len(hyper))}
        for entry in entries:
            g = self.groups.get(entry, 0)
            members[g if g < len(hyper) else 0].append(entry)
        step = training.get("step")
        state, groups, masters, i = {}, [], [], 0
        for g in order:
            idx = []
            for coord, name in members[g]:
                slots = self.slot_data.get((coord, name), {})
                if not self.fresh:
                    st = {}
                    if step is not None:
                        st["step"] = w.add_tensor(np.asarray(step, dtype=np.float32))
                    st["exp_avg"] = slots["exp_avg"]
                    st["exp_avg_sq"] = slots["exp_avg_sq"]
                    state[i] = st
                idx.append(i)
                i += 1
            groups.append({**hyper[g], "params": idx})
            masters.append([self.slot_data[e]["master"] for e in members[g] if self._is16(*e)])
        inner = {"state": state, "param_groups": groups}
        if self.optimizer == "fp32":
            return inner
        out = {"optimizer": inner}
        scaler = training.get("grad_scaler")
        if scaler or (training.get("loss_scale") is not None and
                      any(self.dtypes[e] == "float16" for e in entries)):
            scaler = dict(scaler or {"scale": training["loss_scale"]})
            out["grad_scaler"] = {
                "scale": w.add_tensor(np.asarray([scaler["scale"]], dtype=np.float32)),
                "growth_tracker": int(scaler.get("growth_tracker", 0)),
                "hysteresis_tracker": int(scaler.get("hysteresis_tracker", 2))}
        out["fp32_from_fp16_params"] = masters
        return out

    def finish(self, record: dict):
        training = record.get("training") or {}
        if not training.get("param_groups"):
            training = self.default_training
        chunks: dict = {}    # rank file coord -> {chunk: program coord}
        for coord in self.order:
            rank, v = self._rank_file(coord)
            chunks.setdefault(rank, {})[v] = coord
        for coord, (w, placeholders) in self.writers.items():
            c = dict(coord)
            args = dict(self.args)
            args.update(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                        expert_model_parallel_size=self.ep, rank=0,
                        world_size=self.tp * self.pp * self.ep)
            if self.vpp > 1:
                args.update(virtual_pipeline_model_parallel_size=self.vpp,
                            num_layers_per_virtual_pipeline_stage=(
                                args["num_layers"] // (self.pp * self.vpp)
                                if isinstance(args.get("num_layers"), int) else None))
                if any(args.get(k) for k in ("num_layers_in_first_pipeline_stage",
                                             "num_layers_in_last_pipeline_stage")):
                    # uneven stages: Megatron-LM takes the chunks per rank, not the layers
                    # per chunk (which differ between stages)
                    args.update(num_layers_per_virtual_pipeline_stage=None,
                                num_virtual_stages_per_pipeline_rank=self.vpp)
            if self.etp is not None:    # the smallest world of that grid
                args.update(expert_tensor_parallel_size=self.etp,
                            world_size=self.pp * lcm(self.tp, self.etp * self.ep))
            if self.dist:
                args["world_size"] *= self.dist.dp
            obj = {
                "args": torchfile.Namespace(**args),
                "checkpoint_version": 3.0,
                "iteration": int(self.iteration or 0),
            }
            entries = []
            for v, vc in sorted(chunks[coord].items(), key=lambda x: x[0] or 0):
                obj["model" if v is None else f"model{v}"] = \
                    nest((n, placeholders[(vc, n)]) for n in self.order[vc])
                entries += [(vc, n) for n in self.order[vc]]
            if self.dist:     # DistributedOptimizer.state_dict(): param groups with the step
                from mapc.runtime.containers.distopt import param_groups
                obj["optimizer"] = {"optimizer": {"param_groups": param_groups(training)}}
                self._write_distrib_optim(coord)
            elif self.optimizer:
                obj["optimizer"] = self._optimizer_dict(entries, training, w)
            if self.optimizer:
                sched = training.get("lr_scheduler")
                if isinstance(sched, dict) and "num_steps" in sched and "max_lr" in sched:
                    obj["opt_param_scheduler"] = dict(sched)
            obj["mapc"] = {"tp_rank": c.get("tp", 0), "pp_rank": c.get("pp", 0),
                           "ep_rank": c.get("ep", 0)} | \
                ({"etp_rank": c.get("etp", 0)} if self.etp is not None else {})
            w.finish(obj)
        if not self.metadata:
            return
        (self.dir / TRACKER).write_text(self.sub.removeprefix("iter_").lstrip("0") or "0"
                                        if self.sub != "release" else "release")
        write_json(self.dir / MAPC_JSON, record)

    def _write_distrib_optim(self, coord):
        """The rank's ``distrib_optim.pt``, its buffers all written: the pickle and the zip
        directory (each member's CRC-32 combined from its pieces')."""
        from mapc.runtime.containers.distopt import legacy_state
        w, buffers = self.flats.pop(coord)
        try:
            w.finish(legacy_state([(tuple(torchfile.TorchDType(x) for x in pair), placeholders,
                                    total) for pair, placeholders, total in buffers]))
        except BaseException:
            w.abort()
            raise

    def abort(self):
        for w, _ in self.writers.values():
            w.abort()
        for w, _ in self.flats.values():
            w.abort()
        self.flats = {}


# torch.optim.AdamW's param-group defaults, as megatron-core's state_dict() shows them
_ADAMW_DEFAULTS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                   "differentiable": False, "fused": None, "decoupled_weight_decay": True}


def _megatron_groups(source_groups) -> list[dict]:
    """Megatron param-group hyper-parameters (key order as megatron-core builds them) from a
    source's groups: Megatron groups keep theirs; others get wd_mult 0 where weight decay is 0."""
    out = []
    for sg in source_groups:
        sg = {k: v for k, v in sg.items() if k != "params"}
        lr = sg.get("lr", 0.0)
        g = {"is_expert_parallel": sg.pop("is_expert_parallel", False),
             "default_config": sg.pop("default_config", True),
             "wd_mult": sg.pop("wd_mult", 0.0 if not sg.get("weight_decay", 0.0) else 1.0),
             "lr_mult": sg.pop("lr_mult", 1.0),
             "is_decoupled_lr": sg.pop("is_decoupled_lr", False),
             "max_lr": sg.pop("max_lr", lr), "min_lr": sg.pop("min_lr", 0.0)}
        for k in ("lr", "betas", "eps", "weight_decay"):
            if k in sg:
                g[k] = sg.pop(k)
        for k, v in _ADAMW_DEFAULTS.items():
            g[k] = sg.pop(k, v)
        g.update((k, v) for k, v in sg.items() if k not in ("bias_correction", "initial_lr"))
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        out.append(g)
    return out


def _group_sort_key(g):
    """megatron-core orders groups by their override tuple, the group without overrides first."""
    overrides = tuple((k, g[k]) for k, default in (("wd_mult", 1.0), ("lr_mult", 1.0),
                                                   ("is_decoupled_lr", False))
                      if g.get(k, default) != default)
    return (bool(overrides) or g.get("is_expert_parallel", False), overrides)


Source = MegatronSource


def plan_write(program, facts: SourceFacts, request: WriteRequest) -> WritePlan:
    """``model_optim_rng.pt`` per rank under ``release/`` (weights only) or ``iter_N/`` (with
    optimizer state: the source's, or fresh with --with-optimizer), the tracker file and
    mapc.json."""
    have = facts.slots
    if request.dp is not None and "dp" in request.explicit and "exp_avg" not in have:
        raise MapcError(f"--dp {request.dp} sets the data-parallel size of megatron-core's "
                        f"distributed optimizer, but the source has no optimizer state",
                        hint="drop --dp (the weights load at any data-parallel size)")
    training = facts.training if "exp_avg" in have else {}
    want = "exp_avg" in have or request.with_optimizer
    mesh, meta = program.target.mesh, program.target.meta()
    if not want:
        opt = _MegatronOptimizer(None, None, {}, False, {})
        slots = ("param",)
    else:
        dtype = request.dtype
        if dtype is None:   # the weights' dtype as the program writes them (the source's)
            first = next(iter(program.source.instances[0].members.values()))
            dtype = facts.dtypes["param"][first]
        kind = "mixed" if dtype in ("float16", "bfloat16") else "fp32"
        fresh = "exp_avg" not in have
        if fresh:   # megatron-core's default groups; hyper-parameters from the args, or AdamW's
            hyper = {"lr": meta.get("lr", 1e-3), "betas": (meta.get("adam_beta1", 0.9),
                                                           meta.get("adam_beta2", 0.999)),
                     "eps": meta.get("adam_eps", 1e-8)}
            training = {"param_groups": [dict(hyper, weight_decay=meta.get("weight_decay", 0.01)),
                                         dict(hyper, weight_decay=0.0)]}
            groups = {(coord, name): int(_no_weight_decay(name, len(inst.recipe.shard_shape)))
                      for inst, coord, name in program.target.placements()}
        else:
            groups = program.target_groups([g.get("params", []) for g in
                                            training.get("param_groups", [])])
        opt = _MegatronOptimizer(training.get("iteration") or 0, kind, groups, fresh, training)
        slots = ("param", "exp_avg", "exp_avg_sq") + (("master",) if kind == "mixed" else ()) \
            if not fresh else ("param",)
        if _distributed(facts, request) and not (fresh and "dp" not in request.explicit):
            opt, slots = _plan_distributed(program, facts, request, opt, dtype)
    tensors = planned_tensors(program, facts, request.dtype, slots)
    vpp = request.vpp or 1
    tp, pp, ep = mesh.get("tp", 1), mesh.get("pp", 1) // vpp, mesh.get("ep", 1)
    if vpp > 1:
        if mesh.get("pp", 1) % vpp:
            raise MapcError(f"the program has {mesh.get('pp', 1)} pipeline stages, which "
                            f"--vpp {vpp} does not divide")
        opt = replace(opt, vpp=vpp)
    sub = _subdir(opt.iteration, opt.kind)
    coords = sorted({coord for coord, *_ in tensors}, key=lambda c: tuple(i for _, i in c))
    files = [f"{sub}/{rank_dir(_physical(c, pp), pp, ep)}/{FILE}" for c in coords]
    extra = (lambda f: (f.replace(FILE, DISTRIB_OPTIM),)) if opt.dp else None
    files += [g for f in files for g in (extra(f) if extra else ())] + [TRACKER, MAPC_JSON]
    origin = "fresh" if opt.fresh else "the source's"
    decisions = {"folder": sub, "tp": tp, "pp": pp, "ep": ep} | \
        ({"etp": mesh["etp"]} if "etp" in mesh else {})
    if vpp > 1:
        decisions["vpp"] = vpp
        decisions["chunks"] = (f"model0..model{vpp - 1} per rank file; chunk v of pipeline "
                               f"rank p holds virtual stage v * {pp} + p")
    decisions["optimizer"] = f"{origin} ({opt.kind})" if opt.kind else "none"
    if opt.dp:
        decisions["optimizer"] = f"{origin}, megatron-core's distributed optimizer " \
            f"({DISTRIB_OPTIM} beside every rank's {FILE})"
        bufs: dict = {}
        for lay in sorted(opt.layouts.values(), key=lambda x: (x.group, x.gbuf0)):
            bufs.setdefault(lay.group, []).extend(lay.buffers)
        decisions |= {"dp": opt.dp, "buckets": ", ".join(
            f"dp_group_idx_{g}: " + ", ".join(
                f"{[b.numel_unpadded for b in buf.buckets]}"
                + (f" ({buf.pair[0]})" if len(buffers) > 1 else "") for buf in buffers)
            for g, buffers in sorted(bufs.items()))}
    # every rank's file is written from its own tensors (all its model chunks): rank files
    # are independent parts
    parts = parts_by_file(tensors, lambda c, _: f"{sub}/{rank_dir(_physical(c, pp), pp, ep)}"
                          f"/{FILE}", slots, extra)
    buckets = "the DDP buckets of the args written" if (opt.args or {}).get(
        "overlap_grad_reduce") else "one DDP bucket per rank (no --overlap-grad-reduce)"
    notes = [f"megatron-core's distributed optimizer state is laid out for dp={opt.dp}, "
             f"{buckets}: resume with those"] if opt.dp else []
    return make_plan("megatron", files, decisions=decisions, notes=notes, slots=slots,
                     tensors=tensors, detail=opt, parts=parts)


@dataclass(frozen=True)
class _MegatronOptimizer:
    """The optimizer a megatron output carries: ``kind`` None (weights only), "fp32" or
    "mixed"; ``groups`` {(coord, name): source group}; ``fresh``: no moments from the source
    (masters = weights); ``training``: the param groups (and step, scheduler) to write when
    the record's training state has none."""
    iteration: int | None
    kind: str | None
    groups: dict
    fresh: bool
    training: dict
    vpp: int = 1            # model chunks per rank file (virtual pipeline stages per rank)
    # megatron-core's distributed optimizer (distrib_optim.pt per rank): its data-parallel
    # size (None: the non-distributed optimizer), every rank's DDP layout (distopt.RankLayout
    # by program coord), the args it was derived with, and whether the fp32 masters are the
    # weights themselves (the source keeps no master copy)
    dp: int | None = None
    layouts: dict | None = None
    args: dict | None = None
    masters_from_weights: bool = False


def _distributed(facts, request) -> bool:
    """Whether a megatron output with optimizer state carries megatron-core's distributed
    optimizer: asked with --dp, or kept from a Megatron source that has one."""
    return request.dp is not None or (
        facts.format == "megatron" and bool(facts.format_meta.get("use_distributed_optimizer")))


def _plan_distributed(program, facts, request, opt, dtype):
    """(the optimizer plan, the slots) of megatron-core's distributed optimizer at --dp (default:
    the source's data-parallel size): each rank's buckets derived as megatron-core's DDP lays
    them out (runtime/containers/distopt.py) with the args the output records."""
    from mapc.runtime.containers import distopt
    if opt.fresh:
        raise MapcError("megatron-core's distributed optimizer is written from the source's "
                        "Adam state, and the source has none", hint="drop --dp (a fresh "
                        "non-distributed optimizer is written with --with-optimizer)")
    if dtype not in ("bfloat16", "float32"):
        raise MapcError(f"mapc writes megatron-core's distributed optimizer for bf16 or fp32 "
                        f"parameters, not {dtype} (fp16 needs its grad scaler, not written)",
                        hint="pass --dtype bf16 (or fp32)")
    mesh = program.target.mesh
    if mesh.get("ep", 1) > 1:
        raise MapcError("mapc writes megatron-core's distributed optimizer (distrib_optim.pt) "
                        "without expert parallelism (expert buffers apart)",
                        hint="drop --ep, or write --to torch_dist")
    dp = request.dp or int(facts.training.get("dp_world_size") or 1)
    args = dict(program.target.meta(), use_distributed_optimizer=True, data_parallel_size=dp)
    have = facts.dtypes["param"]
    # one buffer per (param dtype, grad dtype) and model chunk, as megatron-core's DDP
    layouts = distopt.rank_layouts(program.target, dp, args, lambda inst: cast_dtype(
        inst, have[next(iter(inst.members.values()))], request.dtype, widen=False), dtype,
        vpp=request.vpp or 1)
    for pair in {buf.pair for lay in layouts.values() for buf in lay.buffers}:
        if pair[0] not in ("bfloat16", "float32"):
            raise MapcError(f"mapc writes megatron-core's distributed optimizer for bf16 or "
                            f"fp32 parameters, not {pair[0]}", hint="pass --dtype bf16 (or fp32)")
    slots = ("param", "exp_avg", "exp_avg_sq") + \
        (("master",) if opt.kind == "mixed" and "master" in facts.slots else ())
    return replace(opt, dp=dp, layouts=layouts, args=args,
                   masters_from_weights="master" not in slots), slots


def _physical(coord, pp: int):
    """The rank file coord of a program coord whose pp axis counts virtual stages."""
    return tuple((a, i % pp if a == "pp" else i) for a, i in coord)


def _subdir(iteration, optimizer) -> str:
    return "release" if iteration is None and not optimizer else \
        f"iter_{int(iteration or 0):07d}"


Writer = MegatronWriter
