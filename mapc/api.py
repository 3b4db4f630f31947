"""The Python API; the CLI is a thin layer over it.

    import mapc
    mapc.convert("llama-hf", "llama-megatron", to="megatron", tp=2, pp=2)
    report = mapc.verify("llama-hf", "llama-megatron")
    print(mapc.compile_spec("llama", layout="megatron", config=cfg, tp=2).pretty())
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mapc import __version__
from mapc.compiler.plan import (MAX_MESH, LayoutPlan, bind_config, check_dp, plan_layout,
                                stored_tensor)
from mapc.compiler.program import Program, compile_program
from mapc.compiler.resolve import Resolved, read_config, resolve
from mapc.compiler.spec import load_spec, spec_record
from mapc.errors import MapcError
from mapc.runtime import execute
from mapc.runtime.containers import (FORMATS, check_request, layout_of, make_writer, module,
                                     open_source, plan_write)
from mapc.runtime.containers.base import AtomicOutput, coord_key, stale_warning
from mapc.runtime.plan_write import (DTYPE_CHOICES, OPTIONS, SourceFacts, WritePlan,
                                     WriteRequest)


# ---- convert ----------------------------------------------------------------------------------
def _source_params(sets) -> dict | None:
    """--source-set values: strings are coerced to each parameter's type by plan_layout."""
    return _parse_sets(sets) if sets else None


def _parse_sets(sets) -> dict:
    if isinstance(sets, dict):
        return dict(sets)
    out = {}
    for s in sets or ():
        if "=" not in s:
            raise MapcError(f"--set {s!r} is not NAME=VALUE")
        k, v = s.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def plan_conversion(src, to: str, *, tp=None, pp=None, ep=None, config=None, set=None,
                    spec=None, source_format=None, source_set=None,
                    allow_spec_change: bool = False, vpp: int | None = None):
    """Open ``src`` and compile the program that converts it; nothing is written.

    ``vpp`` (Megatron's interleaved schedule) compiles the target at ``pp * vpp`` pipeline
    stages: virtual stage ``chunk * pp + rank`` is chunk ``chunk`` of pipeline rank ``rank``,
    which is megatron-core's layer offset (``get_transformer_layer_offset``) for even stages.
    A format of global tensors (``TOPOLOGY_PARAMS``: torch_dist) is compiled at ``pp`` as
    given: only its writer's optimizer layout sees the virtual stages."""
    if vpp is not None and vpp > 1:
        if "pp" in getattr(module(to), "TOPOLOGY_PARAMS", {}):
            vpp = None          # its writer checks pp (a layout parameter, --like may set it)
        elif (pp or 1) < 2:
            raise MapcError(f"--vpp {vpp} needs --pp of at least 2: Megatron's interleaved "
                            "schedule splits each pipeline rank's layers into chunks",
                            hint="pass --pp N, or drop --vpp")
        else:
            pp = pp * vpp
    source = open_source(src, source_format)
    try:
        res = resolve(source, spec=spec, config=config, params=_source_params(source_set),
                      allow_spec_change=allow_spec_change)
        topo = {"tp": tp, "pp": pp, "ep": ep}
        target_layout = layout_of(to, topo)
        if stored_tensor(res.spec) is not None:
            _check_stored_target(res, to, layout_of(to), topo)
        sets = _parse_sets(set)
        # a format of global tensors whose metadata records the training run's sizes takes
        # --tp/--pp as layout parameters (torch_dist: tp_size, pp_size)
        declared = {p["name"] for p in res.spec.layout(target_layout)["params"]} \
            if target_layout in res.spec.layout_names() else frozenset()
        for axis, param in getattr(module(to), "TOPOLOGY_PARAMS", {}).items():
            if topo.get(axis) is not None and param in declared:
                sets.setdefault(param, topo.pop(axis))
        # a format whose own training stack names tensors one way (NeMo 2: the Transformer
        # Engine spec) prefers that value of a layout parameter; --set overrides it
        for param, value in getattr(module(to), "LAYOUT_DEFAULTS", {}).items():
            if param in declared:
                sets.setdefault(param, value)
        try:
            target = plan_layout(res.spec, target_layout, res.env, topo, sets, vpp=vpp or 1)
        except MapcError as e:
            if vpp is None or vpp < 2:
                raise
            raise MapcError(f"--pp {pp // vpp} --vpp {vpp} is {pp} virtual pipeline stages: "
                            + e.message, where=e.where, hint=e.hint, context=e.context) from None
        return res, compile_program(res.plan, target)
    except BaseException:
        source.close()
        raise


def _check_stored_target(res, to, target_layout, topo) -> None:
    """Generic mode keeps names and shapes: refuse a target that needs the model's family
    (another layout, or sharding over tp/pp/ep) before anything is written."""
    sharded = {a: n for a, n in topo.items() if n not in (None, 1)}
    if target_layout in res.spec.layout_names() and not sharded:
        return
    what = f"{to} (layout {target_layout})" if target_layout not in res.spec.layout_names() \
        else ", ".join(f"{a}={n}" for a, n in sharded.items())
    why = res.generic or f"spec {res.spec.family}"
    raise MapcError(f"{res.source.path} is read in generic mode ({why}), which keeps every "
                    f"tensor's name and shape; {what} needs the model's family to rearrange "
                    f"them",
                    hint="pass --config CONFIG.json (the model's HF config of a shipped "
                         "family) or --spec FILE.map; without a family, convert to hf, dcp, "
                         "deepspeed or universal")


@dataclass
class Template:
    """What ``--like TEMPLATE`` takes from an existing checkpoint."""
    path: str
    format: str
    plan: LayoutPlan
    topology: dict                 # tp/pp/ep of the template's layout
    dp: int | None
    training: dict                 # the template's training state (param groups, ...)
    vpp: int | None = None         # virtual pipeline stages per rank (megatron)
    # how the template keeps megatron-core's distributed optimizer: a torch_dist sharding type
    # (dp_reshardable, fully_reshardable, ...), "distributed" (megatron: distrib_optim.pt), or
    # None (no distributed optimizer)
    optim_sharding: str | None = None


def read_template(like, *, spec=None, config=None) -> Template:
    """Open ``like`` (e.g. a checkpoint freshly initialized on the new hardware) and read its
    format, topology, layout parameters and training state; nothing of it is copied."""
    tmpl = open_source(like)
    try:
        res = resolve(tmpl, spec=spec, config=config)
        training = tmpl.training_state() or {}
        dp = getattr(tmpl, "dp", None) or training.get("dp_world_size")
        topology = {a: n for a, n in res.plan.mesh.items() if a in ("tp", "pp", "ep")}
        vpp = getattr(tmpl, "vpp", 1)
        if tmpl.format == "torch_dist":     # global tensors: only its optimizer has chunks
            vpp = getattr(getattr(tmpl, "optimizer", None), "vpp", 1)
        if vpp > 1 and "pp" in topology:    # its pp axis counts virtual stages (pp * vpp)
            topology["pp"] //= vpp
        sharding = getattr(tmpl, "sharding_type", None) or \
            ("distributed" if getattr(tmpl, "optimizer_kind", None) == "distributed" else None)
        return Template(str(like), tmpl.format, res.plan, topology, dp, training,
                        vpp if vpp > 1 else None, sharding)
    finally:
        tmpl.close()


# the distributed-optimizer sharding types a torch_dist output is written with
WRITTEN_SHARDING = ("dp_reshardable", "fully_reshardable")


def _like_settings(template: Template, to, tp, pp, ep, dp, set, vpp=None,
                   optim_sharding=None) -> tuple:
    """Target settings from a template; an explicit option that contradicts it is an error.
    A torch_dist template gives its distributed optimizer's sharding type (one mapc writes); a
    Megatron (torch format) template its data-parallel size only with the distributed
    optimizer, which that size then selects (the non-distributed one has none)."""
    tdp = template.dp
    if template.format == "megatron" and template.optim_sharding != "distributed":
        tdp = None
    sharding = template.optim_sharding if template.format == "torch_dist" and \
        template.optim_sharding in WRITTEN_SHARDING else None
    given = {"--to": (to, template.format), "--tp": (tp, template.topology.get("tp")),
             "--pp": (pp, template.topology.get("pp")), "--ep": (ep, template.topology.get("ep")),
             "--dp": (dp, tdp), "--vpp": (vpp, template.vpp or 1),
             "--optim-sharding": (optim_sharding, sharding)}
    clash = [f"{opt} {mine} (the template has {theirs})" for opt, (mine, theirs) in given.items()
             if mine is not None and theirs is not None and mine != theirs]
    if clash:
        raise MapcError(f"--like {template.path} contradicts " + ", ".join(clash),
                        hint="drop those options: --like takes them from the template")
    params = dict(template.plan.params)
    if "etp" in template.plan.mesh:     # the expert tensor parallel size, a --set (plan.py)
        params["etp"] = template.plan.mesh["etp"]
    params.update(_parse_sets(set))
    return (template.format, template.topology.get("tp"), template.topology.get("pp"),
            template.topology.get("ep"), tdp if dp is None else dp, params,
            template.vpp, optim_sharding or sharding)


def check_like(template: Template, program: Program) -> None:
    """Refuse unless the planned target has exactly the template's tensors: same names on the
    same shards with the same shapes (same model, same topology, same naming)."""
    def tensors(plan):
        return {(coord_key(c), n): inst.recipe.shape_at(c) for inst, c, n in plan.placements()}
    want, got = tensors(template.plan), tensors(program.target)
    problems = [f"{n} missing from the conversion" for (_, n) in sorted(want.keys() - got.keys())]
    problems += [f"{n} not in the template" for (_, n) in sorted(got.keys() - want.keys())]
    problems += [f"{k[1]}: template {list(want[k])}, conversion {list(got[k])}"
                 for k in sorted(want.keys() & got.keys()) if want[k] != got[k]]
    if problems:
        raise MapcError(f"the source does not match the template {template.path}: "
                        f"{len(problems)} difference(s): " + "; ".join(problems[:8])
                        + (" ..." if len(problems) > 8 else ""),
                        hint="the template must hold the same model (config) as the source")


@dataclass
class ConversionPlan:
    """Everything a conversion will do, decided before a byte is written: the resolved
    source, the compiled program, the source facts and the target format's WritePlan.
    ``mapc convert --dry-run`` prints ``program.pretty()`` and ``write.pretty()``; the real
    run executes exactly these. Call ``close()`` (or ``resolved.source.close()``) when done."""
    resolved: Resolved
    program: Program
    facts: SourceFacts
    request: WriteRequest
    write: WritePlan
    workers: int | None = 1          # processes to write with (None: the machine's default)

    def pretty(self, backend: str = "numpy") -> str:
        from mapc.runtime import workers
        world = workers.distributed_env()
        return self.program.pretty() + "\n\n" + self.write.pretty() + "\n\n" + \
            workers.describe(self.write, self.workers, world[1] if world else None, backend)

    def close(self):
        self.resolved.source.close()


def plan_convert(src, dst, to: str | None = None, *, tp: int | None = None,
                 pp: int | None = None, ep: int | None = None, dtype: str = "keep", config=None,
                 set=None, source_set=None, spec=None, source_format=None,
                 max_shard_bytes: int | None = None, dp: int | None = None,
                 with_optimizer: bool = False, like=None,
                 zero_stage: int | None = None,
                 allow_spec_change: bool = False, allow_lossy: bool = False,
                 pp_first_stage: int | None = None, pp_last_stage: int | None = None,
                 workers: int | None = 1, vpp: int | None = None,
                 optim_sharding: str | None = None,
                 quantize: str | None = None) -> ConversionPlan:
    """Plan ``convert`` (same arguments) completely, writing nothing: every check a real run
    makes before writing is made here, so a plan that succeeds is what the run will do."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise MapcError(f"--workers {workers!r} must be a positive integer")
    if zero_stage is not None and zero_stage not in (1, 2, 3):
        raise MapcError(f"--zero-stage {zero_stage} is not a ZeRO stage",
                        hint="choose 1, 2 or 3")
    if dp is not None and (not isinstance(dp, int) or not 1 <= dp <= MAX_MESH):
        raise MapcError(f"--dp {dp!r} must be a positive integer of at most {MAX_MESH}")
    if vpp is not None and (not isinstance(vpp, int) or not 1 <= vpp <= MAX_MESH):
        raise MapcError(f"--vpp {vpp!r} must be a positive integer of at most {MAX_MESH}")
    if dtype not in DTYPE_CHOICES:
        raise MapcError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
    if optim_sharding not in (None,) + WRITTEN_SHARDING:
        raise MapcError(f"--optim-sharding {optim_sharding!r} is not a sharding type mapc "
                        f"writes", hint="choose dp_reshardable or fully_reshardable")
    explicit = frozenset(k for k, v in (("dp", dp), ("zero_stage", zero_stage),
                                        ("with_optimizer", with_optimizer or None),
                                        ("max_shard_bytes", max_shard_bytes),
                                        ("pp_first_stage", pp_first_stage),
                                        ("pp_last_stage", pp_last_stage), ("vpp", vpp),
                                        ("optim_sharding", optim_sharding),
                                        ("quantize", quantize))
                         if v is not None)
    template = None
    if like is not None:
        template = read_template(like, spec=spec, config=config)
        to, tp, pp, ep, dp, set, like_vpp, optim_sharding = _like_settings(
            template, to, tp, pp, ep, dp, set, vpp, optim_sharding)
        vpp = vpp if vpp is not None else like_vpp
    if to is None:
        raise MapcError("no target format", hint="pass --to FORMAT (or --like TEMPLATE)")
    if to not in FORMATS:
        raise MapcError(f"unknown target format '{to}'", hint="known: " + ", ".join(FORMATS))
    stages = {"pp_first_stage": pp_first_stage, "pp_last_stage": pp_last_stage}
    if any(v is not None for v in stages.values()):
        # uneven pipeline stages place the layers, so they are settled before the program:
        # refused now by a format that does not take them, else set as its layout parameters
        check_request(WriteRequest(to, explicit=explicit, **stages))
        for opt, n in stages.items():
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
                raise MapcError(f"{OPTIONS[opt]} {n!r} must be a positive number of layers")
        names = getattr(module(to), "STAGE_PARAMS", {})
        set = list(set or []) + [f"{names[o]}={n}" for o, n in stages.items() if n is not None]
    if "vpp" in explicit:   # before compiling at pp * vpp stages
        check_request(WriteRequest(to, vpp=vpp, explicit=frozenset({"vpp"})))
    res, program = plan_conversion(src, to, tp=tp, pp=pp, ep=ep, config=config, set=set,
                                   spec=spec, source_format=source_format,
                                   source_set=source_set, allow_spec_change=allow_spec_change,
                                   vpp=vpp)
    try:
        if dp is not None:
            check_dp(program.target, dp)
        if template is not None:
            check_like(template, program)
        facts = SourceFacts.of(res.source, program, has_config=bool(res.config),
                               config=res.config)
        request = WriteRequest(to, dst=str(dst), dtype=DTYPE_CHOICES[dtype], dp=dp,
                               zero_stage=zero_stage, with_optimizer=with_optimizer,
                               max_shard_bytes=max_shard_bytes,
                               optim_sharding=optim_sharding,
                               like_training=template.training if template else None,
                               explicit=explicit, allow_lossy=allow_lossy, vpp=vpp,
                               quantize=quantize, **stages)
        write = plan_write(program, facts, request)
        return ConversionPlan(res, program, facts, request, write, workers)
    except BaseException:
        res.source.close()
        raise


def convert(src, dst, to: str | None = None, *, tp: int | None = None, pp: int | None = None,
            ep: int | None = None, dtype: str = "keep", config=None, set=None, force: bool = False,
            source_set=None,
            backend: str = "numpy", quiet: bool = True, spec=None, source_format=None,
            max_shard_bytes: int | None = None, dp: int | None = None,
            with_optimizer: bool = False, like=None,
            zero_stage: int | None = None, allow_spec_change: bool = False,
            allow_lossy: bool = False, pp_first_stage: int | None = None,
            pp_last_stage: int | None = None, workers: int | None = 1,
            vpp: int | None = None, optim_sharding: str | None = None,
            quantize: str | None = None) -> execute.Report:
    """Convert checkpoint ``src`` into ``dst`` in format ``to``. Returns a Report.

    ``dp`` is the data-parallel size of a training-checkpoint target (deepspeed, neox,
    universal); ``with_optimizer`` asks a weights-only format (hf) to carry the optimizer state
    too; ``like`` names a template checkpoint whose format, topology, layout parameters and
    optimizer param groups the output takes (``to``/``tp``/... may then be omitted);
    ``zero_stage`` picks the ZeRO stage of a deepspeed/universal target (default: the source's,
    else 1); ``vpp`` writes a megatron target with that many virtual pipeline stages
    (interleaved schedule) per pipeline rank; ``allow_spec_change`` reads a checkpoint mapc
    wrote with a spec other than the one its record carries (otherwise refused);
    ``allow_lossy`` writes tensors whose spec value map rounds (otherwise refused:
    mapc.runtime.values). ``pp_first_stage`` / ``pp_last_stage`` ask a megatron target for
    uneven pipeline stages (that many layers on the first / last stage, the rest split evenly
    between, as megatron-core's num_layers_in_first/last_pipeline_stage). ``workers`` is the
    number of processes that write the output's independent files (None: what the machine
    has; see mapc.runtime.workers). Under torchrun or srun every rank writes its share of the
    files. ``optim_sharding`` picks how a torch_dist target saves the distributed optimizer's
    state (``dp_reshardable``, the default, or ``fully_reshardable``). ``quantize``
    ("fp8_block", "mxfp4") writes an hf target's tensors whose rules say ``quantized KIND`` in
    that storage (fp8_block: float8_e4m3fn + float32 ``_scale_inv`` per 128 x 128 block, as
    DeepSeek-V3 ships; mxfp4: uint8 ``_blocks`` + e8m0 ``_scales`` per 32 values, as GPT-OSS
    ships); it rounds, so it is refused without ``allow_lossy`` unless the values were read from that
    storage (mapc.runtime.quantized). An option the target format does not honour is refused
    (MapcError)."""
    cp = plan_convert(src, dst, to, tp=tp, pp=pp, ep=ep, dtype=dtype, config=config, set=set,
                      source_set=source_set, spec=spec, source_format=source_format,
                      max_shard_bytes=max_shard_bytes, dp=dp, with_optimizer=with_optimizer,
                      like=like, zero_stage=zero_stage, allow_spec_change=allow_spec_change,
                      allow_lossy=allow_lossy,
                      pp_first_stage=pp_first_stage, pp_last_stage=pp_last_stage,
                      workers=workers, vpp=vpp, optim_sharding=optim_sharding,
                      quantize=quantize)
    return write_conversion(cp, src, dst, force=force, backend=backend, quiet=quiet)


def write_conversion(cp: ConversionPlan, src, dst, *, force: bool = False,
                     backend: str = "numpy", quiet: bool = True) -> execute.Report:
    """Execute a ConversionPlan into ``dst`` (atomically) and close its source: in one
    process, with ``cp.workers`` forked workers, or as one rank of torchrun/srun."""
    from mapc.runtime import workers
    res, program, plan = cp.resolved, cp.program, cp.write
    source = res.source
    pre = res.warnings + list(plan.notes)

    def record_of(report):
        report.warnings[:0] = [w for w in pre if w not in report.warnings]
        return _record(res, program, cp.request.format, src, report)

    world = workers.distributed_env()
    if world is not None:
        try:
            return workers.run_distributed(cp, src, dst, force=force, backend=backend,
                                           quiet=quiet or world[0] != 0, record_of=record_of,
                                           rank_world=world)
        finally:
            source.close()
    # torch's and jax's thread pools do not survive fork(): other backends write in one process
    n = workers.choose(plan, cp.workers, backend)[0]
    out = None
    try:
        out = AtomicOutput(dst, force=force, source=src)
        if n > 1:
            report = workers.run_forked(cp, out.tmp, n, backend=backend, quiet=quiet,
                                        record_of=record_of)
            workers.write_metadata(cp, out.tmp, record_of(report))
        else:
            writer = make_writer(cp.request.format, out.tmp, program, plan)
            try:
                report = execute.run(program, source, writer, backend=backend, plan=plan,
                                     quiet=quiet, allow_lossy=cp.request.allow_lossy)
                writer.finish(record_of(report))
            except BaseException:
                writer.abort()
                raise
        report.workers = n
        out.commit()
        report.warnings += stale_warning(out.stale)     # about DST's directory, not the record
        return report
    except BaseException as e:
        if out is not None:
            out.abort()
            if out.committed and isinstance(e, KeyboardInterrupt):
                e.mapc_written = str(dst)        # the CLI must not say "nothing was written"
        raise
    finally:
        source.close()


def _record(res: Resolved, program: Program, to: str, src, report) -> dict:
    return {
        "mapc_version": __version__,
        "format": to,
        "family": res.spec.family,
        "spec_sha256": res.spec.sha256,
        "spec": spec_record(res.spec),
        "layout": program.target.name,
        "params": program.target.params,
        "topology": program.target.mesh,
        "config": res.config,
        "source": {"path": str(Path(src).absolute()), "format": res.source.format,
                   "layout": res.plan.name, "params": res.plan.params,
                   "topology": res.plan.mesh},
        "warnings": report.warnings,
        "training": _jsonable(res.source.training_state()),
        # tensors without optimizer state (frozen parameters, buffers) and tied aliases, for
        # formats that cannot say so themselves (dcp, safetensors)
        "tensor_kinds": {n: k for (_, n), k in program.stateless_targets(res.source).items()},
        "aliases": dict(program.target.aliases),
    }


def _jsonable(obj):
    """Training scalars as JSON (inert records and tensors from pickles become plain values)."""
    if isinstance(obj, dict) or hasattr(obj, "items"):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "numpy") and getattr(obj, "shape", None) == ():
        return float(np.asarray(obj.numpy()))
    return repr(obj)


# ---- compile ------------------------------------------------------------------------------------
def compile_spec(spec, *, layout: str | None = None, config=None, tp=None, pp=None, ep=None,
                 set=None, source_layout: str | None = None):
    """The checked Spec IR (a ``Spec``), or with a config the compiled ``Program`` from
    ``source_layout`` (default ``hf``, unsharded) to ``layout`` at the given topology."""
    sp = load_spec(spec)
    if config is None:
        if layout is not None:
            sp.layout(layout)
        return sp
    env = bind_config(sp, read_config(config))
    target_name = layout or sp.layout_names()[0]
    src_name = source_layout or ("hf" if "hf" in sp.layout_names() else target_name)
    src_plan = plan_layout(sp, src_name, env)
    target = plan_layout(sp, target_name, env, {"tp": tp, "pp": pp, "ep": ep},
                         _parse_sets(set))
    return compile_program(src_plan, target)


# ---- inspect ------------------------------------------------------------------------------------
def inspect(path, *, source_format=None, spec=None, config=None) -> dict:
    """What a checkpoint holds: format, family, topology, tensors, dtypes, bytes."""
    from mapc.runtime.backends import DTYPES
    source = open_source(path, source_format)
    try:
        topology = dict(source.topology or {})
        if getattr(source, "dp", None):          # ZeRO data parallelism (container level)
            topology["dp"] = source.dp
        if getattr(source, "vpp", 1) > 1:        # pp counts virtual stages: show the ranks
            topology["pp"] //= source.vpp
            topology["vpp"] = source.vpp
        info = {"path": str(path), "format": source.format, "topology": topology,
                "family": None, "params": None, "config": None}
        if getattr(source, "saved_topology", None):   # global tensors saved by a parallel run
            info["saved_topology"] = dict(source.saved_topology)
        try:
            res = resolve(source, spec=spec, config=config)
            info.update(family=res.spec.family, params=res.plan.params,
                        config={c["name"]: res.env[c["name"]] for c in res.spec.ir["config"]},
                        warnings=res.warnings)
        except MapcError as e:
            info["unresolved"] = str(e)
        shards = []
        total = 0
        dtypes: dict[str, int] = {}
        for coord in source.coords():
            tensors = []
            for name in source.names(coord):
                shape, dt = tuple(source.shape(name, coord)), source.dtype(name, coord)
                n = DTYPES[dt].itemsize * int(np.prod(shape, dtype=np.int64))
                total += n
                dtypes[dt] = dtypes.get(dt, 0) + n
                tensors.append({"name": name, "shape": list(shape), "dtype": dt, "bytes": n})
            shards.append({"shard": source.describe_coord(coord), "tensors": tensors})
        info.update(shards=shards, tensor_count=sum(len(s["tensors"]) for s in shards),
                    bytes=total, dtypes=dtypes, training=_training_summary(source))
        return info
    finally:
        source.close()


def _training_summary(source) -> dict | None:
    """What a resumed run would get from this checkpoint: optimizer slots and scalars."""
    slots = [s for s in source.slots() if s != "param"]
    state = _jsonable(source.training_state() or {})
    if not slots and not state:
        return None
    groups = state.get("param_groups") or []
    return {"optimizer_slots": slots,
            "iteration": state.get("iteration"), "step": state.get("step"),
            "zero_stage": state.get("zero_stage"), "dp_world_size": state.get("dp_world_size"),
            "loss_scale": state.get("loss_scale"),
            "param_groups": [{k: v for k, v in g.items() if k != "params"}
                             | {"params": len(g.get("params") or [])} for g in groups]}


# ---- verify -------------------------------------------------------------------------------------
@dataclass
class VerifyResult:
    identical: bool
    compared: int
    differences: list[dict]          # {"tensor", "max_abs_diff", "dtype_a", "dtype_b"}
    warnings: list[str]


def verify(a, b, *, backend: str = "numpy", config=None, spec=None,
           quiet: bool = True, allow_spec_change: bool = False) -> VerifyResult:
    """Do checkpoints ``a`` and ``b`` (any formats and topologies) hold the same model?"""
    sa = open_source(a)
    try:
        sb = open_source(b)
    except BaseException:
        sa.close()
        raise
    try:
        ra = resolve(sa, spec=spec, config=config, allow_spec_change=allow_spec_change)
        rb = resolve(sb, spec=ra.spec, config=config, allow_spec_change=allow_spec_change)
        if ra.plan.logical.keys() != rb.plan.logical.keys() or any(
                ra.plan.logical[k].shape != rb.plan.logical[k].shape for k in ra.plan.logical):
            diff = sorted(set(ra.plan.logical) ^ set(rb.plan.logical)) or [
                k for k in ra.plan.logical if ra.plan.logical[k].shape != rb.plan.logical[k].shape]
            raise MapcError(f"{a} and {b} are different models (first difference: {diff[0]})")
        program = compile_program(ra.plan, rb.plan)
        be = execute.get_backend(backend)
        report_a, report_b = execute.Report(), execute.Report()
        diffs, compared = [], 0
        progress = execute.Progress(len(program.units), "verify", quiet)
        for unit in program.units:
            xa = execute.read_instances(unit.sources, sa, be, report_a)
            xb = execute.read_instances(unit.targets, sb, be, report_b)
            for key in unit.keys:
                na, nb = be.to_numpy(xa[key]), be.to_numpy(xb[key])
                compared += 1
                if na.dtype == nb.dtype and be.equal(xa[key], xb[key]):
                    continue
                d = float(np.max(np.abs(na.astype(np.float64) - nb.astype(np.float64)))) \
                    if na.size else 0.0
                diffs.append({"tensor": key, "max_abs_diff": d, "dtype_a": str(na.dtype),
                              "dtype_b": str(nb.dtype)})
            progress.step()
        progress.done(f"compared {compared} tensors: "
                      + ("identical" if not diffs else f"{len(diffs)} differ"))
        return VerifyResult(not diffs, compared, diffs,
                            ra.warnings + rb.warnings + report_a.warnings + report_b.warnings)
    finally:
        sa.close()
        sb.close()
