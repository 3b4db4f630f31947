"""GPT-NeoX / DeepSpeed pipeline checkpoints (``PipelineModule`` saved by ``PipelineEngine``).

``latest`` names the tag directory ``global_stepN/``, which holds

* ``layer_{p:02d}-model_{t:02d}-model_states.pt``: the state dict of pipeline position ``p``
  (a plain ``{key: tensor}``) on tensor-parallel rank ``t``. Positions are global: the pipeline
  size decides only which stage saves which file, and layers without parameters have no file.
* ``mp_rank_{m:02d}_model_states.pt``: one per (pipeline stage, tp rank), ``m = stage * tp +
  t`` (DeepSpeed's model-parallel rank within a data-parallel replica), holding ``module:
  None``, ``global_steps``, ``dp_world_size``, ``mp_world_size`` (tp * pp), ``ds_config``,
  ``checkpoint_parallel_dimensions`` and, from NeoX's client state, ``iteration`` and
  ``args`` (a dict of a few sizes: ARGS_KEYS).
* ``zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt``: ZeRO 1/2 optimizer state per
  (data-parallel rank, model-parallel rank), read as the optimizer slots (fp32 master weights,
  Adam moments) with the ``deepspeed`` container's partition arithmetic, and written (ZeRO 1)
  at any tp, pp and dp over the layers DeepSpeed's stage partitioning gives each stage, with
  the shared ZeRO writer (runtime/containers/zero.py).

A tensor's physical name is DeepSpeed's ``PipelineModule`` state-dict key,
``"{position}.{key}"``: the spec's ``neox`` layouts say which position holds what. The reader
presents every layer file of tp rank ``t`` at mesh coordinate (tp=t, pp=0), that is it reads
any checkpoint as pipeline size 1 (the layer files do not depend on it); the writer takes
``--pp`` for the ``mp_rank`` and optimizer files and the config it writes. Nothing is
unpickled beyond inert records.
"""
from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np

from mapc.errors import MapcError
from mapc.runtime import torchfile
from mapc.runtime.containers.zero import DEEPSPEED_PICKLES
from mapc.runtime.containers.base import MAPC_JSON, RefSource, read_record, write_json
from mapc.runtime.plan_write import (PlannedWriter, SourceFacts, WritePlan, WriteRequest,
                                     make_plan, planned_tensors)

LAYOUT = "neox"
LATEST = "latest"
_LAYER = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
_MP = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")

# The "args" dict NeoX's save_ds_checkpoint stores in every mp_rank file (client state).
ARGS_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
             "make_vocab_size_divisible_by", "padded_vocab_size", "tokenizer_type",
             "model_parallel_size", "pipe_parallel_size")


def layer_file(position: int, tp_rank: int) -> str:
    return f"layer_{position:02d}-model_{tp_rank:02d}-model_states.pt"


def mp_file(stage: int, tp_rank: int, tp: int) -> str:
    return f"mp_rank_{stage * tp + tp_rank:02d}_model_states.pt"


def _tag_dir(path: Path) -> Path | None:
    if not path.is_dir():
        return None
    if any(_LAYER.match(p.name) for p in path.iterdir()):
        return path
    latest = path / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        d = path / tag
        if not d.is_dir():
            raise MapcError(f"'{LATEST}' names {tag}, which does not exist", where=str(path))
        return d
    steps = sorted((p for p in path.glob("global_step*") if p.is_dir()),
                   key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    return steps[-1] if steps else None


def detect(path: Path) -> bool:
    try:
        d = _tag_dir(path)
    except MapcError:
        return False
    return d is not None and any(_LAYER.match(p.name) for p in d.iterdir())


def _plain(obj) -> dict:
    """An args record (argparse Namespace, NeoXArgs) or dict as a plain dict."""
    if obj is None:
        return {}
    try:
        return {str(k).replace("-", "_"): v for k, v in dict(obj).items()}
    except (TypeError, ValueError):
        return {}


class NeoxSource(RefSource):
    format = "neox"
    layout = LAYOUT

    def __init__(self, path):
        super().__init__(path)
        self.tag_dir = _tag_dir(self.path)
        if self.tag_dir is None or not any(_LAYER.match(p.name) for p in
                                           self.tag_dir.iterdir()):
            raise MapcError("no NeoX / DeepSpeed pipeline checkpoint here (no "
                            "layer_XX-model_TT-model_states.pt files)", where=str(self.path))
        if not self.record and self.tag_dir == self.path:   # pointed at global_stepN/
            self.record = read_record(self.path.parent)
        layers: dict[int, dict[int, Path]] = {}
        mp: dict[int, Path] = {}
        for p in sorted(self.tag_dir.iterdir()):
            m = _LAYER.match(p.name)
            if m:
                layers.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
            m = _MP.match(p.name)
            if m:
                mp[int(m.group(1))] = p
        self.tp = max(layers) + 1
        positions = sorted({i for files in layers.values() for i in files})
        missing = [layer_file(i, t) for t in range(self.tp) for i in positions
                   if i not in layers.get(t, {})]
        if missing:
            raise MapcError(f"missing layer files: {', '.join(missing[:4])}"
                            + (" ..." if len(missing) > 4 else ""), where=str(self.tag_dir),
                            hint="copy the complete checkpoint (every tensor-parallel rank "
                                 "saves every layer)")
        self.layer_files = layers
        self.positions = positions
        self.mp_files = mp
        self.model_states = torchfile.load(mp[0], DEEPSPEED_PICKLES) if 0 in mp else {}
        if not isinstance(self.model_states, dict):
            raise MapcError("not a DeepSpeed model-states file", where=str(mp[0]))
        dims = _plain(self.model_states.get("checkpoint_parallel_dimensions"))
        mp_world = self.model_states.get("mp_world_size") or len(mp) or self.tp
        self.pipeline_stages = int(dims.get("pp_degree") or max(1, mp_world // self.tp))
        self.topology = {"tp": self.tp, "pp": 1}
        self._coords = [(("tp", t), ("pp", 0)) for t in range(self.tp)]
        self._loaded: dict = {}
        self._views = self._optimizer_views()
        if self._views:
            weights = {(t, n) for t in range(self.tp) for n in self.names(self._coords[t])}
            uncovered = weights - {(t, n) for t, v in self._views.items() for n in v}
            if uncovered:   # e.g. tied modules, which param_shapes names tied_modules.*
                self.warnings.append(f"the optimizer state does not cover "
                                     f"{sorted(uncovered)[0][1]}; only weights are read")
                self._views = {}
        self.config = self.record.get("config")
        self.format_meta = self._format_meta()

    # -- optimizer state: DeepSpeed ZeRO 1/2 partitions, one set per (stage, tp rank) ----------
    def _optimizer_views(self) -> dict:
        """tp rank -> {name: partition view} from the ``zero_pp_rank_D_mp_rank_MM`` files.

        Each model-parallel rank MM (= stage * tp + tp rank) has its own ZeRO partitions over
        the parameters its stage holds, in the order of its ``param_shapes``, whose names are
        the PipelineModule keys this reader presents. The partition arithmetic is the
        ``deepspeed`` container's. Empty when any rank lacks optimizer files."""
        from mapc.runtime.containers.deepspeed import DeepSpeedSource
        from mapc.runtime.containers.deepspeed import _optimizer_state as _ds_optimizer_state
        files: dict[int, dict[int, Path]] = {}
        for p in self.tag_dir.iterdir():
            m = _OPTIM.match(p.name)
            if m:
                files.setdefault(int(m.group(3)), {})[int(m.group(2))] = p
        if not files or sorted(files) != sorted(self.mp_files):
            return {}
        views: dict[int, dict] = {}
        for mp, by_dp in sorted(files.items()):
            dp = len(by_dp)
            if sorted(by_dp) != list(range(dp)):
                raise MapcError(f"optimizer files of mp_rank {mp:02d} for data-parallel ranks "
                                f"{sorted(set(range(max(by_dp) + 1)) - set(by_dp))} are missing",
                                where=str(self.tag_dir), hint="copy the complete checkpoint")
            states = torchfile.load(self.mp_files[mp], DEEPSPEED_PICKLES, expect=dict)
            if not states.get("param_shapes"):
                return {}
            v = DeepSpeedSource.__new__(DeepSpeedSource)
            v.tag_dir, v.dp, v.model_states, v.module = self.tag_dir, dp, states, {}
            v.param_shapes = [dict(g) for g in states["param_shapes"]]
            v.optim = [_ds_optimizer_state(by_dp[r]) for r in range(dp)]
            v.kind = "stage3" if "fp32_flat_groups" in v.optim[0] else \
                "zero" if "zero_stage" in v.optim[0] else "bf16"
            v._index()
            for name in v.shapes:
                views.setdefault(mp % self.tp, {})[name] = v
        return views

    def slots(self):
        return ["param", "master", "exp_avg", "exp_avg_sq"] if self._views else ["param"]

    def dtype(self, name, coord, slot="param"):
        return super().dtype(name, coord) if slot == "param" else "float32"

    def read(self, name, coord, slot="param"):
        if slot == "param":
            return super().read(name, coord)
        return self._views[dict(coord).get("tp", 0)][name].read(name, slot=slot)

    def _format_meta(self) -> dict:
        if self.record.get("meta"):
            return dict(self.record["meta"])
        meta = _plain(self.model_states.get("args"))
        cfg_dir = self.tag_dir.parent / "configs"
        if cfg_dir.is_dir():
            try:
                import yaml
            except ImportError:   # the YAML is optional metadata
                yaml = None
            for f in sorted(cfg_dir.glob("*.yml")) + sorted(cfg_dir.glob("*.yaml")):
                try:
                    text = f.read_text()
                    data = yaml.safe_load(text) if yaml else json.loads(text)
                except (ValueError, OSError, Exception):   # noqa: BLE001 - metadata only
                    continue
                if isinstance(data, dict):
                    meta.update(_plain(data))
        return meta

    def _state(self, key) -> dict:
        if key not in self._loaded:
            f = self.layer_files[key[0]][key[1]]
            obj = torchfile.load(f, DEEPSPEED_PICKLES)
            if not isinstance(obj, dict):
                raise MapcError("a layer file does not hold a state dict", where=str(f))
            self._loaded[key] = {k: v for k, v in obj.items()
                                 if isinstance(v, torchfile.TensorRef)}
        return self._loaded[key]

    def coords(self):
        return list(self._coords)

    def names(self, coord):
        t = dict(coord).get("tp", 0)
        return [f"{i}.{k}" for i in self.positions for k in self._state((t, i))]

    def _ref(self, name, coord):
        t = dict(coord).get("tp", 0)
        head, _, key = name.partition(".")
        try:
            return self._state((t, int(head)))[key]
        except (KeyError, ValueError):
            raise MapcError(f"tensor {name} is not in the checkpoint",
                            where=str(self.tag_dir / layer_file(int(head) if head.isdigit()
                                                                else 0, t))) from None

    def describe_coord(self, coord):
        return f"{self.tag_dir.name}/layer_*-model_{dict(coord).get('tp', 0):02d}-*"

    def training_state(self) -> dict:
        s = self.model_states
        if not s:
            return {}
        it = s.get("iteration", s.get("global_steps"))
        out = {"iteration": it, "global_samples": s.get("global_samples"),
               "dp_world_size": s.get("dp_world_size"), "ds_config": s.get("ds_config"),
               "pp_world_size": self.pipeline_stages}
        views = list({id(v): v for v in self._views.get(0, {}).values()}.values())
        if views:   # every stage's optimizer: its hyper-parameters and its parameters' names
            first = max(views, key=lambda v: len(v.param_shapes)).training_state()
            hypers = [_hyper_key(g) for g in first["param_groups"]]
            lists = [[] for _ in hypers]
            for v in views:
                # DeepSpeed drops a stage's empty groups: match the others by hyper-parameters
                for gl, group in enumerate(v.training_state()["param_groups"]):
                    h = _hyper_key(group)
                    g = hypers.index(h) if hypers.count(h) == 1 else gl
                    lists[g].extend(group["params"])
            for group, names in zip(first["param_groups"], lists):
                group["params"] = names
            out.update({k: first[k] for k in ("step", "param_groups", "lr_scheduler",
                                              "loss_scale", "clip_grad", "zero_stage")})
            out["iteration"] = it
        return out


Source = NeoxSource


def _hyper_key(group: dict) -> str:
    return repr(sorted((k, repr(v)) for k, v in group.items() if k != "params"))


def _allow_open_files(n: int) -> None:
    """Units arrive tensor by tensor across layers, so every layer file may be open at once
    (positions x tp ranks): raise the soft limit on open files up to the hard one if needed."""
    try:
        import resource
    except ImportError:   # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or n <= soft:
        return
    if hard != resource.RLIM_INFINITY and n > hard:
        raise MapcError(f"writing needs {n} open files (one per layer file) but the limit is "
                        f"{hard}", hint="raise it (ulimit -Hn) or convert with a smaller --tp")
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


# -- the pipeline stages: which layer positions each stage's PipelineModule holds --------------
# NeoX's GPT2ModelPipe layer list (the positions the spec's ``neox`` layouts use): the
# embedding, a parameter-free function, the L transformer layers, a function, the final norm,
# the head. These are the class names DeepSpeed's "type:REGEX" partitioning matches.
_PIPE_CLASSES = ("EmbeddingPipe", None, "ParallelTransformerLayerPipe", None, "NormPipe",
                 "ParallelLinearPipe")
DEFAULT_PARTITION = "type:transformer|mlp"      # NeoX's pipe_partition_method default


def layer_classes(n_layers: int) -> list:
    """The class name of every position of a NeoX pipeline of ``n_layers`` positions (None
    for the parameter-free functions)."""
    blocks = n_layers - 5
    if blocks < 1:
        raise MapcError(f"a NeoX pipeline has at least 6 layer positions, not {n_layers}")
    e, f1, b, f2, norm, head = _PIPE_CLASSES
    return [e, f1] + [b] * blocks + [f2, norm, head]


def partition_uniform(n: int, parts: int) -> list[int]:
    """Stage boundaries of ``n`` layers cut as evenly as possible, the first stages one
    larger (DeepSpeed's partition_uniform)."""
    if n <= parts:
        return [min(p, n) for p in range(parts + 1)]
    chunk, extra = divmod(n, parts)
    return [p * chunk + min(p, extra) for p in range(parts + 1)]


def partition_balanced(weights: list, parts: int) -> list[int]:
    """Stage boundaries that make the stages' weight sums as even as possible: the
    cut minimising (largest sum - smallest sum) over contiguous non-empty stages, found by
    dynamic programming over (prefix, stages); among equal costs the last cut point wins.
    This is the rule DeepSpeed's PipelineModule applies (runtime/utils.py partition_balanced),
    so mapc's stages hold what DeepSpeed's would."""
    n = len(weights)
    if n <= parts:
        return partition_uniform(n, parts)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[j][i] = (cost, largest, smallest, cut) for the first i layers in j stages
    best = [[(inf, inf, inf, 0)] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = (0, 0, inf, 0)
    for i in range(1, n + 1):
        for j in range(1, min(i, parts) + 1):
            cur = best[j][i]
            for k in range(j - 1, i):
                _, hi, lo, _ = best[j - 1][k]
                if hi == inf:
                    continue
                s = prefix[i] - prefix[k]
                top, bottom = max(hi, s), min(lo, s)
                if top - bottom <= cur[0]:
                    cur = (top - bottom, top, bottom, k)
            best[j][i] = cur
    cuts = [n]
    for j in range(parts, 0, -1):
        cuts.append(best[j][cuts[-1]][3])
    return cuts[::-1]


def stage_bounds(n_layers: int, pp: int, method: str | None) -> list[int]:
    """The first position of every stage (and n_layers last) for pipe_partition_method."""
    method = (method or DEFAULT_PARTITION).strip()
    if method.lower() == "uniform":
        return partition_uniform(n_layers, pp)
    if method.lower().startswith("type:"):
        rx = re.compile(method.split(":", 1)[1], re.IGNORECASE)
        weights = [1 if c and rx.search(c) else 0 for c in layer_classes(n_layers)]
        if any(weights):
            return partition_balanced(weights, pp)
    raise MapcError(f"pipe_partition_method {method!r} is not supported for writing optimizer "
                    f"state", hint="use 'type:transformer|mlp' (NeoX's default) or 'uniform'")


@dataclass(frozen=True)
class _NeoxPlan:
    """A neox output's decisions: the tag, the layer files' keys (``expected[(position, tp
    rank)]``), every tensor's shape by (tp rank, name), whether optimizer state is written
    (``optim``) with its ZeRO decisions (``resume``), the stage of every position, the param
    groups per model-parallel rank (``groups[m]``: lists of (name, numel); ``hyper[m]``),
    the resume config (``args``), the model states' scheduler and sample count."""
    tag: str
    tp: int
    pp: int
    expected: dict
    shapes: dict
    optim: bool
    resume: object                 # zero.ResumePlan
    stage_of: dict
    groups: dict
    hyper: dict
    args: dict
    scheduler: object
    samples: int
    meta: dict


def plan_write(program, facts: SourceFacts, request: WriteRequest) -> WritePlan:
    """Layer files by (position, tp rank), one ``mp_rank`` file per (stage, tp rank), with
    optimizer state (the source's, or fresh with --with-optimizer) one ZeRO stage-1 optimizer
    file per (data-parallel rank, model-parallel rank); ``latest``, the resume config
    ``configs/mapc_neox.yml`` and mapc.json."""
    z = _zero()
    topology = program.target.mesh
    tp, pp = topology.get("tp", 1), topology.get("pp", 1)
    meta = program.target.meta()
    optim = facts.has_moments or bool(request.with_optimizer)
    slots = ("param", "master", "exp_avg", "exp_avg_sq") if optim else ("param",)
    tensors = planned_tensors(program, facts, request.dtype, slots)
    expected: dict[tuple, list[str]] = {}
    shapes, dtypes = {}, set()
    for coord, name, shape, dt in tensors:
        head, _, key = name.partition(".")
        if not head.isdigit() or not key:
            raise MapcError(f"internal: {name!r} is not a pipeline state-dict name "
                            "('<position>.<key>')")
        t = dict(coord).get("tp", 0)
        expected.setdefault((int(head), t), []).append(key)
        shapes[(t, name)] = tuple(shape)
        dtypes.add(dt)
    notes: list[str] = []
    rs = z.plan_resume(facts, request, "neox", dtypes, notes, optim=optim,
                       config_name="the resume config (configs/mapc_neox.yml)")
    ts = facts.training
    groups = ts.get("param_groups") or []
    group_of, hyper = None, []
    if optim and groups and not rs.fresh:
        group_of = {(dict(c).get("tp", 0), n): g for (c, n), g in
                    program.target_groups([list(pg.get("params") or [])
                                           for pg in groups]).items()}
        hyper = [z.hyper(pg) for pg in groups]
    elif optim:                  # NeoX's groups, by the tensors' shapes
        wd = meta.get("weight_decay")
        wd = 0.01 if wd is None else float(wd)
        base = dict(z.ADAMW_DEFAULTS, weight_decay=wd)
        if meta.get("lr") is not None:
            base["lr"] = float(meta["lr"])
        hyper = [base] if wd == 0.0 else [base, dict(base, weight_decay=0.0)]
        notes.append(f"the optimizer param groups are NeoX's (weight decay {wd} for "
                     f"matrices, none for norms and biases) with torch AdamW's other "
                     f"defaults; NeoX's load_checkpoint applies your config's values")
        group_of = {k: 0 if len(sh) > 1 or len(hyper) == 1 else 1 for k, sh in shapes.items()}
    partition = meta.get("pipe_partition_method") or facts.format_meta.get(
        "pipe_partition_method")
    stage_of, zgroups, zhyper = {}, {}, {}
    if optim:
        n_layers = max(p for p, _ in expected) + 1
        bounds = stage_bounds(n_layers, pp, partition)
        stage_of = {p: s for s in range(pp) for p in range(bounds[s], bounds[s + 1])}
        for s in range(pp):
            for t in range(tp):
                held = [(p, key) for (p, tt), keys in sorted(expected.items())
                        if tt == t and stage_of[p] == s for key in keys]
                members = [[] for _ in hyper]
                for p, key in held:
                    name = f"{p}.{key}"
                    members[group_of[(t, name)]].append((name, prod(shapes[(t, name)])))
                if not any(members):
                    raise MapcError(f"pipeline stage {s} holds no parameters at pp={pp}",
                                    hint="use a smaller --pp")
                m = s * tp + t
                # DeepSpeed drops a stage's empty param groups before building its optimizer
                zhyper[m] = tuple(h for h, g in zip(hyper, members) if g)
                zgroups[m] = tuple(tuple(g) for g in members if g)
    iteration = rs.iteration
    samples = ts.get("global_samples")
    if samples is None:
        samples = iteration * int(rs.cfg.get("train_batch_size") or 0)
    args = _resume_args(meta, tp, pp, optim, rs, partition if optim else None, request.dst)
    tag = f"global_step{iteration}"
    detail = _NeoxPlan(tag, tp, pp, {k: tuple(v) for k, v in expected.items()}, shapes, optim,
                       rs, stage_of, zgroups, zhyper, args,
                       ts.get("lr_scheduler") if facts.format == "neox" else None,
                       int(samples), meta)
    files = [f"{tag}/{layer_file(*f)}" for f in expected]
    files += [f"{tag}/{mp_file(s, t, tp)}" for s in range(pp) for t in range(tp)]
    files += [_optim_file(detail, m, r) for m in zgroups for r in range(rs.dp)]
    files += [LATEST, "configs/mapc_neox.yml", MAPC_JSON]
    decisions = {"tag": tag, "tp": tp, "pp": pp, "dp": rs.dp,
                 "optimizer": ("fresh" if rs.fresh else "the source's") if optim else "none"}
    if optim:
        decisions.update({"zero stage": rs.stage, "step": rs.step,
                          "optimizer class": rs.kind, "training dtype": rs.dtype,
                          "pipe partition": partition or DEFAULT_PARTITION,
                          "param groups": {m: [len(g) for g in gs] for m, gs in zgroups.items()}})
    return make_plan("neox", files, decisions=decisions, notes=notes, slots=slots,
                     tensors=tensors, detail=detail, parts=_parts(detail, tensors))


def _optim_file(d: _NeoxPlan, m: int, r: int) -> str:
    """Data-parallel rank r's optimizer file of model-parallel rank m."""
    prefix = "bf16_" if d.optim and d.resume.dtype == "bfloat16" else ""   # bf16_mode
    return f"{d.tag}/{prefix}zero_pp_rank_{r}_mp_rank_{m:02d}_optim_states.pt"


def _parts(d: _NeoxPlan, tensors) -> tuple:
    """The output's independent files (runtime/workers.py): each layer file, fed by its
    weights, and each (data-parallel rank, model-parallel rank)'s optimizer file, fed by the
    params of that stage and tp rank with elements in the rank's flat partitions. The
    ``mp_rank`` model states (the param shapes only) are metadata."""
    from mapc.runtime.backends import DTYPES
    from mapc.runtime.plan_write import Part
    z = _zero()
    layers, coord_of = {}, {}
    for coord, name, shape, dt in tensors:
        t = dict(coord).get("tp", 0)
        coord_of[(t, name)] = coord
        f = (int(name.partition(".")[0]), t)
        names, size = layers.get(f, ((), 0))
        layers[f] = (names + ((coord, name),), size + prod(shape) * DTYPES[dt].itemsize)
    parts = [Part((f"{d.tag}/{layer_file(*f)}",), frozenset(names), size, weights_only=True)
             for f, (names, size) in layers.items()]
    for m, groups in d.groups.items():
        t = m % d.tp
        layout = z.ZeroOptimizer({}, list(groups), d.resume.dp, d.resume.stage,
                                 d.resume.kind)
        for r in range(d.resume.dp):    # fp32 master and two moments per element
            parts.append(Part((_optim_file(d, m, r),),
                              frozenset((coord_of[(t, n)], n) for n in layout.names_on(r)),
                              layout.rank_len * 12))
    return tuple(parts)


def _resume_args(meta, tp, pp, optim, rs, partition, dst) -> dict:
    """The NeoX config to resume with: the source's, at the new sizes, batch settings
    keeping the global batch at the new data-parallel size, loading this checkpoint."""
    args = dict(meta)
    args.update(model_parallel_size=tp, pipe_parallel_size=pp,
                no_load_optim=not optim, no_load_rng=True)
    if optim:
        args["zero_optimization"] = dict(args.get("zero_optimization") or {}, stage=rs.stage)
    if partition:
        args["pipe_partition_method"] = partition
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu",
                "gradient_accumulation_steps"):
        if rs.cfg.get(key) is not None:
            args[key] = rs.cfg[key]
    if dst:
        args.update(load=str(Path(dst).absolute()), save=str(Path(dst).absolute()))
    return args


class NeoxWriter(PlannedWriter):
    """Layer files by (position, tp rank), streamed: a file is finished as soon as its last
    tensor arrives, so only the files of the units in flight are open. With optimizer state,
    one ZeRO stage-1 optimizer per model-parallel rank (pipeline stage, tp rank) over the
    parameters that stage holds, each partitioned over ``dp`` ranks (runtime/containers/
    zero.py: written straight into their files, nothing held in memory). A weights-only source gives weights only
    (NeoX builds its own optimizer with ``no_load_optim``) unless --with-optimizer asks for a
    fresh one, as the ``megatron`` writer does."""

    def __init__(self, tmpdir, program, plan):
        super().__init__(tmpdir, program, plan)
        self.open: dict[tuple, tuple] = {}
        self.zero: dict = {}
        self.incoming: set[str] = set()

    def begin(self, tensors):
        d: _NeoxPlan = self.plan.detail
        _allow_open_files(len(d.expected) + 64)
        z = _zero()
        (self.dir / d.tag).mkdir(exist_ok=True)     # the workers of a parallel run share it
        for m, groups in d.groups.items():    # the optimizer files this writes, laid out
            files = {r: self.dir / _optim_file(d, m, r) for r in range(d.resume.dp)
                     if self.owns(_optim_file(d, m, r))}
            self.zero[m] = z.ZeroOptimizer(files, list(groups), d.resume.dp, d.resume.stage,
                                           d.resume.kind)

    def begin_slot(self, slot, tensors):
        self.incoming.add(slot)

    def _zero_of(self, coord, name):
        d: _NeoxPlan = self.plan.detail
        t = dict(coord).get("tp", 0)
        return self.zero[d.stage_of[int(name.partition(".")[0])] * d.tp + t]

    def write(self, coord, name, arr):
        d: _NeoxPlan = self.plan.detail
        head, _, key = name.partition(".")
        file = (int(head), dict(coord).get("tp", 0))
        if not self.owns(f"{d.tag}/{layer_file(*file)}"):
            if d.optim and "master" not in self.incoming:
                self._zero_of(coord, name).scatter("master", name, np.asarray(arr, np.float32))
            return                                   # another worker's layer file
        if file not in self.open:
            self.open[file] = (torchfile.TorchWriter(self.dir / d.tag / layer_file(*file)), {})
        w, values = self.open[file]
        values[key] = w.add_tensor(arr)
        if len(values) == len(d.expected[file]):
            w.finish(OrderedDict((k, values[k]) for k in d.expected[file]))
            self.open[file] = (None, values)
        if d.optim and "master" not in self.incoming:
            self._zero_of(coord, name).scatter("master", name, np.asarray(arr, np.float32))

    def write_slot(self, slot, coord, name, arr):
        zero = self._zero_of(coord, name)
        if zero.ranks:
            zero.scatter(slot, name, arr)

    def finish(self, record: dict):
        d: _NeoxPlan = self.plan.detail
        rs = d.resume
        tag_dir = self.dir / d.tag
        unfinished = [layer_file(*f) for f, (w, _) in self.open.items() if w is not None]
        owned = [f for f in d.expected if self.owns(f"{d.tag}/{layer_file(*f)}")]
        if unfinished or len(self.open) != len(owned):
            raise MapcError(f"internal: layer files left incomplete: {unfinished[:3]}")
        for stage in range(d.pp):
            for t in range(d.tp):
                m = stage * d.tp + t
                zero = self.zero.get(m)
                param_shapes = None
                if zero is not None:
                    for r in sorted(zero.ranks):
                        zero.write_rank(r,
                                        hyper_params=list(d.hyper[m]), step=rs.step,
                                        clip=rs.clip, scale=rs.scale, ds_config=rs.cfg)
                    param_shapes = zero.param_shapes(
                        {n: d.shapes[(t, n)] for f in zero.flats for n in f.names})
                    zero.remove()
                if not self.metadata:
                    continue              # the mp_rank files are the committing process's
                state = {
                    "module": None, "buffer_names": [], "optimizer": None,
                    "param_shapes": param_shapes, "frozen_param_shapes": None,
                    "shared_params": {}, "frozen_param_fragments": None,
                    "lr_scheduler": d.scheduler,
                    "data_sampler": None, "random_ltd": None, "skipped_steps": 0,
                    "global_steps": rs.iteration, "global_samples": d.samples,
                    "dp_world_size": rs.dp, "mp_world_size": d.tp * d.pp,
                    "checkpoint_parallel_dimensions": {"pp_degree": d.pp,
                                                       "tp_degree": d.tp},
                    "ds_config": rs.cfg, "ds_version": _zero().DS_VERSION,
                    "iteration": rs.iteration,
                    "args": {k: v for k, v in d.args.items() if k in ARGS_KEYS},
                }
                w = torchfile.TorchWriter(tag_dir / mp_file(stage, t, d.tp))
                w.finish(state)
        if not self.metadata:
            return
        (self.dir / LATEST).write_text(d.tag)
        configs = self.dir / "configs"
        configs.mkdir()
        # JSON is valid YAML: NeoX reads this with its YAML loader.
        (configs / "mapc_neox.yml").write_text(json.dumps(d.args, indent=2) + "\n")
        write_json(self.dir / MAPC_JSON, dict(record, meta=d.meta))

    def abort(self):
        for w, _ in self.open.values():
            if w is not None:
                w.abort()
        for z in self.zero.values():
            z.remove()


def _zero():
    from mapc.runtime.containers import zero
    return zero


Writer = NeoxWriter
