"""Megatron-core's distributed optimizer: where each parameter's fp32 master and Adam moments
sit in its flat, data-parallel-sharded buffers.

megatron-core's ``DistributedDataParallel`` puts every trained parameter of a model-parallel
rank (one tensor-parallel x pipeline rank) into one flat buffer per (param dtype, grad dtype),
and its ``DistributedOptimizer`` keeps fp32 ``param`` (master), ``exp_avg`` and ``exp_avg_sq``
in the same layout, each data-parallel rank owning a contiguous 1/dp of every bucket. Nothing
in a checkpoint maps a parameter to its offset: the layout is derived here exactly as
megatron-core 0.16.1's ``_ParamAndGradBuffer`` builds it (``param_and_grad_buffer.py``):

* parameters in **reverse** ``named_parameters`` order (megatron-core's module registration
  order, :func:`mapc.runtime.containers.megatron.module_order`);
* each parameter starts on a **64-element** boundary (gaps are kept in the buffer);
* a bucket closes when it holds at least ``bucket_size`` elements (``bucket_size`` is None, one
  bucket, without ``--overlap-grad-reduce`` and on every pipeline stage after the first); a
  parameter shared between the first and last pipeline stage (tied embeddings with pp > 1,
  ``shared_embedding``) gets a bucket of its own;
* each bucket's end is padded to a multiple of ``lcm(dp, 128)`` (``lcm(dp, 128, 2**16)`` with
  ``pad_buckets_for_high_nccl_busbw``); the next bucket starts there.

Parameters of several dtypes (fp32 norms beside bf16 weights) get one buffer each, per (param
dtype, grad dtype), in the order their dtypes first appear in ``named_parameters`` (its
``gbuf_idx``), each bucketed as above; a virtual pipeline's model chunks have a DDP each, their
buffers one after another in the rank's optimizer (:func:`rank_layouts`).

A mixture-of-experts model trained with expert parallelism (ep > 1) has two optimizers,
megatron-core's ChainedOptimizer (``get_megatron_optimizer``): ``chained_0`` over the dense
parameters (DDP's ``buffers``, sharded over the data-parallel group) and ``chained_1`` over the
expert parameters (those megatron-core marks ``allreduce=False``: cut over ep, the spec's ``split
experts over ep``; DDP's ``expert_parallel_buffers``, sharded over the expert data-parallel
group of ``tp * dp / (etp * ep)`` ranks, so its buckets' ends are padded for that size). The
dense optimizer's ``dp_group_idx`` is tp_rank + tp * pp_rank, the expert one's its rank in the
expert tensor x expert x pipeline group, etp_rank + etp * (ep_rank + ep * pp_rank)
(:func:`chained_layouts`). At ep = 1 megatron-core marks no parameter as expert: one optimizer.

Checkpoints keep each bucket without its end padding (``numel_unpadded`` elements), so a
parameter's place inside a bucket's stored tensor is its offset from the bucket's start, which
does not depend on dp. The derivation is checked against the ``per_bucket_numel_unpadded``
megatron-core stores beside the buckets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from mapc.errors import MapcError

ALIGN = 64                       # elements: every parameter starts 128-byte aligned
SLOT_KEYS = {"master": "param", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
DEFAULT_BUCKET = 40_000_000      # megatron-core's bucket_size default: max(40M, 1M * dp)


@dataclass(frozen=True)
class Bucket:
    """One DDP bucket: ``params`` are (name, start inside the bucket, numel), in buffer order;
    ``numel_unpadded`` is its stored size; ``numel`` its size in the buffer (end padded)."""
    params: tuple
    numel_unpadded: int
    numel: int


def bucket_size(args: dict, dp: int, pp_rank: int) -> int | None:
    """The ``bucket_size`` megatron-core's DDP uses for a rank: None (one bucket) without
    overlap_grad_reduce and on pipeline stages after the first; else --ddp-bucket-size or
    ``max(40M, 1M * dp)``."""
    if not args.get("overlap_grad_reduce") or pp_rank > 0:
        return None
    size = args.get("ddp_bucket_size")
    return int(size) if size else max(DEFAULT_BUCKET, 1_000_000 * dp)


def _pad(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


def ddp_buckets(params, dp: int, size: int | None, *, high_busbw: bool = False) -> list[Bucket]:
    """The buckets of one DDP buffer: ``params`` are (name, numel, shared_embedding) in
    ``named_parameters`` order (one dtype pair)."""
    divisor = math.lcm(dp, 128, 2 ** 16) if high_busbw else math.lcm(dp, 128)
    buckets: list[Bucket] = []
    start = 0                   # buffer offset of the open bucket
    pos = 0                     # next free buffer offset
    members: list = []
    end = 0

    def close(param_end: int) -> int:
        nonlocal start, members
        padded = _pad(param_end, divisor)
        buckets.append(Bucket(tuple(members), param_end - start, padded - start))
        start, members = padded, []
        return padded

    for name, numel, shared in reversed(list(params)):
        pos = _pad(pos, ALIGN)
        if shared and members:
            pos = close(pos)
        end = pos + numel
        members.append((name, pos - start, numel))
        if (size is not None and end - start >= size) or shared:
            pos = close(end)
        else:
            pos = end
    if members:
        close(end)
    return buckets


def check_buckets(buckets: list[Bucket], stored_unpadded, where: str, what: str) -> None:
    """Refuse a derivation that does not give the bucket sizes megatron-core stored."""
    derived = [b.numel_unpadded for b in buckets]
    if list(stored_unpadded) != derived:
        raise MapcError(f"the distributed optimizer's buckets of {what} hold "
                        f"{list(stored_unpadded)} elements, but megatron-core's bucket layout "
                        f"of the model's parameters gives {derived}", where=where,
                        hint="the checkpoint was trained with settings mapc does not derive "
                             "(other or frozen parameters, another bucket size); save it with "
                             "distrib_optim_sharding_type fully_reshardable, or without the "
                             "optimizer")


@dataclass(frozen=True)
class Buffer:
    """One DDP buffer: its (param dtype, grad dtype) names (``("bfloat16", "float32")``) and
    its buckets."""
    pair: tuple
    buckets: tuple


@dataclass(frozen=True)
class RankLayout:
    """One model-parallel rank's distributed-optimizer layout: ``group`` is its
    ``dp_group_idx`` (tp_rank + tp * pp_rank), ``buffers`` its DDP buffers in ``gbuf_idx``
    order, ``shapes`` its parameters' local shapes by name; with a virtual pipeline it is one
    model chunk's, whose buffers follow the earlier chunks' ``gbuf0`` buffers of the rank."""
    group: int
    buffers: tuple
    shapes: dict
    gbuf0: int = 0
    chain: int | None = None        # its index in a ChainedOptimizer (0 dense, 1 experts)

    @property
    def prefix(self) -> str:
        """What megatron-core's ChainedOptimizer prepends to its optimizers' keys."""
        return "" if self.chain is None else f"chained_{self.chain}."

    @property
    def buckets(self) -> tuple:
        """The buckets of the rank's one buffer (the legacy ``distrib_optim.pt`` writer's)."""
        if len(self.buffers) != 1:
            raise MapcError(f"dp_group_idx_{self.group} has {len(self.buffers)} DDP buffers "
                            f"({', '.join(str(b.pair) for b in self.buffers)}); mapc writes "
                            f"several for torch_dist only", hint="pass --dtype bf16 (one "
                            "buffer), or convert to torch_dist")
        return self.buffers[0].buckets

    def places(self):
        """(name, gbuf index, bucket index, start inside the bucket, numel) of every
        parameter."""
        for b, buffer in enumerate(self.buffers):
            for k, bucket in enumerate(buffer.buckets):
                for name, start, numel in bucket.params:
                    yield name, self.gbuf0 + b, k, start, numel


def rank_layouts(mplan, dp: int, args: dict, dtype_of=None, default: str = "bfloat16",
                 vpp: int = 1) -> dict[tuple, RankLayout]:
    """The layout of every mesh coordinate of ``mplan`` (a megatron LayoutPlan at the run's
    TP/PP): its parameters are the plan's tensors on that rank, in megatron-core's
    ``named_parameters`` order; a tensor whose logical tensor another instance also holds on
    another pipeline stage (the tied embedding's copy, pp > 1) is a shared embedding.
    ``dtype_of(instance)`` is a parameter's dtype name (default ``default``): as megatron-core's
    DDP does, the parameters of each (param dtype, grad dtype) get a buffer of their own, the
    buffers in the order their dtypes first appear in ``named_parameters`` (grads are fp32:
    Megatron-LM reduces bf16 runs' grads in fp32). With ``vpp`` > 1 ``mplan``'s pp axis counts
    virtual stages (stage v * pp + p is chunk v of pipeline rank p): every chunk has a DDP of
    its own (one bucket after chunk 0: Megatron-LM disables bucketing there), its buffers
    after the earlier chunks' in the rank's one optimizer. One optimizer: see
    :func:`chained_layouts` for expert parallelism."""
    out = _layouts(mplan, dp, args, dtype_of, default, vpp, None)
    return {coord: lay for (coord, _), lay in out.items()}


def expert_instances(mplan) -> set:
    """The ids of the instances megatron-core trains as expert parameters: at ep > 1, those the
    spec cuts over ep (not copied over it)."""
    if mplan.mesh.get("ep", 1) < 2:
        return set()
    return {id(inst) for inst in mplan.instances if "ep" not in dict(inst.replicated)}


def chained_layouts(mplan, dp: int, args: dict, dtype_of=None, default: str = "bfloat16",
                    vpp: int = 1) -> dict[tuple, RankLayout]:
    """{(coord, chain): RankLayout} of every optimizer of every rank: as :func:`rank_layouts`
    (chain None) without expert parallelism; with it, megatron-core's ChainedOptimizer: chain 0
    the dense parameters of each (tp, pp) rank (once, at its first mesh coordinate: the dense
    parameters are copied over ep), chain 1 the expert parameters of each (ep, etp, pp) rank,
    bucket ends padded for the expert data-parallel size ``tp * dp / (etp * ep)``."""
    experts = expert_instances(mplan)
    if not experts:
        return _layouts(mplan, dp, args, dtype_of, default, vpp, None)
    tp, ep = mplan.mesh.get("tp", 1), mplan.mesh.get("ep", 1)
    etp = mplan.mesh.get("etp", tp)
    if (tp * dp) % (etp * ep):
        raise MapcError(f"tp={tp} x dp={dp} ranks per pipeline stage do not divide into "
                        f"expert groups of etp={etp} x ep={ep}: megatron-core needs the "
                        f"expert data-parallel size tp * dp / (etp * ep) to be a whole number",
                        hint=f"choose --dp a multiple of {(etp * ep) // math.gcd(etp * ep, tp)}")
    if vpp > 1:
        raise MapcError("mapc writes an expert-parallel model's distributed optimizer without "
                        "a virtual pipeline", hint="drop --vpp, or pass --ep 1")
    edp = tp * dp // (etp * ep)
    return _layouts(mplan, dp, args, dtype_of, default, vpp, lambda inst: id(inst) in experts,
                    edp)


def _layouts(mplan, dp, args, dtype_of, default, vpp, is_expert, edp=None) -> dict:
    """{(coord, chain): RankLayout}; ``is_expert`` None: one optimizer (chain None)."""
    from mapc.runtime.containers.megatron import module_order
    tp, pp = mplan.mesh.get("tp", 1), mplan.mesh.get("pp", 1)
    ep, etp = mplan.mesh.get("ep", 1), mplan.mesh.get("etp", tp)
    users: dict[str, int] = {}
    for inst in mplan.instances:
        for key in set(inst.members.values()):
            users[key] = users.get(key, 0) + 1
    per_rank: dict[tuple, dict] = {}
    for inst, coord, name in mplan.placements():
        per_rank.setdefault(coord, {})[name] = inst
    high = bool(args.get("ddp_pad_buckets_for_high_nccl_busbw"))
    out = {}
    phys = max(1, pp // vpp)
    nbufs: dict[tuple, int] = {}
    chains = (None,) if is_expert is None else (0, 1)
    for coord, insts in sorted(per_rank.items(),
                               key=lambda x: dict(x[0]).get("pp", 0) // phys):
        c = dict(coord)
        t, p = c.get("tp", 0), c.get("pp", 0) % phys
        chunk = c.get("pp", 0) // phys
        for chain in chains:
            if chain == 1:
                group, size_dp = c.get("etp", 0) + etp * (c.get("ep", 0) + ep * p), edp
            else:
                group, size_dp = t + tp * p, dp
            if (chain, group, chunk) in nbufs:
                continue            # the dense parameters' copy at another ep rank
            mine = [n for n in insts if is_expert is None or is_expert(insts[n]) == (chain == 1)]
            shapes = {n: tuple(insts[n].recipe.shape_at(coord)) for n in mine}
            by_pair: dict[tuple, list] = {}
            for n in module_order(mine):
                dtype = (dtype_of(insts[n]) if dtype_of is not None else None) or default
                by_pair.setdefault((dtype, "float32"), []).append(
                    (n, math.prod(shapes[n]),
                     pp > 1 and any(users[k] > 1 for k in insts[n].members.values())))
            # megatron-core's DDP sizes the buckets of both by the data-parallel size
            size = bucket_size(args, dp, p) if chunk == 0 else None
            buffers = tuple(Buffer(pair, tuple(ddp_buckets(params, size_dp, size,
                                                           high_busbw=high)))
                            for pair, params in by_pair.items())
            gbuf0 = sum(n for (ch, g, _), n in nbufs.items() if (ch, g) == (chain, group))
            out[(coord, chain)] = RankLayout(group, buffers, shapes, gbuf0, chain)
            nbufs[(chain, group, chunk)] = len(buffers)
    return out


def gaps(bucket: Bucket):
    """(start, length) of the alignment gaps inside a bucket's stored tensor."""
    pos = 0
    for _, start, numel in bucket.params:
        if start > pos:
            yield pos, start - pos
        pos = start + numel
    if bucket.numel_unpadded > pos:
        yield pos, bucket.numel_unpadded - pos


def coalesced_buffers(obj, what: str, where: str) -> list[tuple]:
    """The buffers of megatron-core's gathered distributed-optimizer state (legacy
    ``distrib_optim.pt``, ``get_parameter_state_dp_zero``; torch_dist's
    ``dp_zero_gather_scatter`` objects): ``{"buckets_coalesced": True, gbuf_idx: {(param dtype,
    grad dtype): {"param", "exp_avg", "exp_avg_sq": flat fp32, "numel_unpadded"}}}`` for
    gbuf_idx 0, 1, ... (one buffer per model chunk and dtype pair): ``[((param dtype, grad
    dtype) names, {slot: TensorRef}), ...]`` in gbuf_idx order. ``what`` names it in errors."""
    from mapc.runtime import torchfile
    shape = "megatron-core's {'buckets_coalesced': True, gbuf_idx: {(param dtype, grad " \
        "dtype): {param, exp_avg, exp_avg_sq}}}"
    out = []
    try:
        if obj.get("buckets_coalesced") is not True:
            raise ValueError("not buckets_coalesced (an older per-bucket layout)")
        gbufs = [k for k in obj if k != "buckets_coalesced"]
        if not gbufs or sorted(gbufs, key=str) != sorted(range(len(gbufs)), key=str):
            raise ValueError(f"its buffers are {gbufs}, not 0..N-1")
        for g in range(len(gbufs)):
            ((pair, per_dtype),) = obj[g].items()
            names = tuple(str(getattr(x, "name", x)).removeprefix("torch.") for x in pair)
            out.append((names, {s: per_dtype[s] for s in ("param", "exp_avg", "exp_avg_sq")}))
    except (AttributeError, TypeError, KeyError, ValueError) as e:
        raise MapcError(f"{what} is not {shape} ({e})", where=where) from None
    for g, (_, slots) in enumerate(out):
        for s, t in slots.items():
            if not isinstance(t, torchfile.TensorRef) or t.dtype != "float32" or t.ndim != 1 \
                    or tuple(t.shape) != tuple(slots["param"].shape):
                raise MapcError(f"{what}: {s} of buffer {g} is "
                                f"{getattr(t, 'dtype', type(t).__name__)}"
                                f"{list(getattr(t, 'shape', ()))}, not a flat fp32 tensor of "
                                f"the buffer's size", where=where)
    return out


def check_total(flat, buckets, what: str, where: str) -> None:
    """Refuse a stored flat buffer (``what``: a gathered state's, :func:`coalesced_buffers`)
    whose size is not its derived buckets' total without their end padding."""
    total = sum(b.numel_unpadded for b in buckets)
    if tuple(flat.shape) != (total,):
        raise MapcError(f"{what} holds {list(flat.shape)} elements, but megatron-core's bucket "
                        f"layout of the rank's parameters gives {total}", where=where,
                        hint="the checkpoint was trained with settings mapc does not derive "
                             "(other or frozen parameters, another bucket size); convert the "
                             "weights only")


def param_groups(training: dict) -> list[dict]:
    """megatron-core's two default param groups (the source's hyper-parameters, from
    ``training["param_groups"]``) with the Adam step, as its ``DistributedOptimizer.state_dict``
    holds them (no ``params``: the distributed optimizer's state is not indexed by them).
    megatron-core's loader matches groups by (wd_mult, lr_mult, is_expert_parallel,
    is_decoupled_lr), so both default groups are always there."""
    from mapc.runtime.containers.megatron import _megatron_groups
    groups = _megatron_groups(training.get("param_groups") or [{}])
    for wd in (1.0, 0.0):
        if not any(float(g["wd_mult"]) == wd for g in groups):
            groups.append(dict(groups[0], wd_mult=wd))
    step = float(training.get("step") or 0)
    return [dict(g, step=step) for g in groups]


def expert_groups(groups: list[dict], experts) -> list[dict]:
    """The param groups of a ChainedOptimizer's expert optimizer: megatron-core keeps the
    groups its expert parameters fall into (by its default weight-decay rule: no weight decay
    for biases and 1-D tensors), marked ``is_expert_parallel``. ``groups`` are the dense
    optimizer's (:func:`param_groups`), ``experts`` the expert parameters' (name, ndim)."""
    from mapc.runtime.containers.megatron import _no_weight_decay
    wds = {0.0 if _no_weight_decay(n, ndim) else 1.0 for n, ndim in experts} or {1.0}
    return [dict(g, is_expert_parallel=True) for g in groups if float(g["wd_mult"]) in wds]


def legacy_state(buffers) -> dict:
    """What megatron-core's ``DistributedOptimizer.save_parameter_state`` writes into
    Megatron-LM's ``distrib_optim.pt`` for one model-parallel rank: ``{"buckets_coalesced":
    True, gbuf_idx: {(param dtype, grad dtype): {"param", "exp_avg", "exp_avg_sq": flat fp32
    (every bucket of the buffer without its end padding, one after another),
    "numel_unpadded": total}}}``. ``buffers`` are (pair, {slot: placeholder}, total) in
    gbuf_idx order (a virtual pipeline's chunks one after another, each chunk's dtypes)."""
    out: dict = {"buckets_coalesced": True}
    for g, (pair, flats, total) in enumerate(buffers):
        out[g] = {pair: {"param": flats["master"], "exp_avg": flats["exp_avg"],
                         "exp_avg_sq": flats["exp_avg_sq"], "numel_unpadded": int(total)}}
    return out
