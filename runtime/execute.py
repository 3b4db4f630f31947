"""Execute a program: stream units from a source reader into a target writer.

Readers and writers are the containers' (mapc.runtime.containers); they know files, the
program knows tensors. Each unit is read, rebuilt and written before the next is touched.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from mapc.compiler.program import Program
from mapc.errors import MapcError
from mapc.runtime.backends import DTYPES, bytes_equal, dtype_name, get_backend
from mapc.runtime.plan_write import cast_dtype, weights_slot


# Slots that a `sum over` tensor stores as shares. Adam's moments are not: every share sees
# the same gradient (that of the sum), so each rank's moments are those of the whole tensor.
SUMMED_SLOTS = ("param", "master")


@dataclass
class Report:
    tensors_written: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    workers: int = 1                 # processes that wrote the output (ranks under torchrun)
    # --quantize: kind -> [tensors, elements, elements rounded, largest change]
    quantized: dict = field(default_factory=dict)
    peak_rss: int = 0                # the largest peak resident memory (bytes) of the worker
    #                                  processes or ranks that wrote it (0: not measured)


class Progress:
    """Progress on stderr: done / total, throughput and time left.

    On a terminal one line is redrawn (at most 10 times a second); otherwise (a log file,
    Slurm, torchrun) a plain line is printed every ``every`` seconds, so a long conversion
    shows it is alive. ``quiet`` silences both. ``unit="B"`` counts bytes (shown in decimal
    GB/MB, as disks are sold), anything else counts items."""

    def __init__(self, total: int, label: str, quiet: bool = False, *, unit: str = "",
                 every: float = 10.0, stream=None, detail=None):
        self.total, self.label, self.unit, self.n = max(total, 1), label, unit, 0
        self.detail = detail        # () -> str appended to each line (e.g. per worker)
        self.enabled = not quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = 0.1 if self.tty else every
        self.start = self.last = time.monotonic()

    def step(self, n: int = 1):
        self.n += n
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.every or
                             (self.tty and self.n >= self.total)):
            self.last = now
            self._show(now)

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        frac = min(self.n / self.total, 1.0)
        rate = self.n / elapsed
        left = (self.total - self.n) / rate if rate > 0 and self.n < self.total else 0.0
        if self.unit == "B":
            done = f"{fmt_bytes(self.n)} / {fmt_bytes(self.total)}"
            speed = f"{fmt_bytes(rate)}/s"
        else:
            done = f"{self.n}/{self.total}"
            speed = f"{rate:.1f}/s"
        return (f"{self.label} {done} {100 * frac:3.0f}% {speed} "
                f"elapsed {fmt_seconds(elapsed)} left {fmt_seconds(left)}"
                + (f" [{self.detail()}]" if self.detail is not None else ""))

    def _show(self, now):
        text = self.line(now)
        if self.tty:
            frac = min(self.n / self.total, 1.0)
            self.stream.write(f"\r\033[K[{'#' * int(20 * frac):<20}] {text}")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self, summary: str | None = None):
        """Clear the bar; print ``summary`` (terminals only; callers report the result)."""
        if self.enabled and self.tty:
            self.stream.write("\r\033[K" + (summary + "\n" if summary else ""))
            self.stream.flush()


def fmt_bytes(n: float) -> str:
    """Decimal units: 1 GB = 1e9 bytes."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_seconds(t: float) -> str:
    t = int(round(t))
    return f"{t // 3600}:{t // 60 % 60:02d}:{t % 60:02d}" if t >= 3600 else \
        f"{t // 60}:{t % 60:02d}"


def peak_rss_bytes() -> int:
    """The peak resident memory of this process and of its finished children (Linux counts
    ru_maxrss in KiB), the larger of the two."""
    import resource
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) * 1024


def delivery_order(program: Program) -> list[tuple]:
    """The (coord, name) of every target tensor in the order :func:`run` writes their weights
    (unit by unit). A writer that orders an index by arrival computes it from this, so that
    a worker of a parallel run, which sees only its share, writes the same index."""
    return [(coord, name) for unit in program.units for inst in unit.targets
            for copies in inst.by_recipe_coord().values() for coord, name in copies]


def planned_bytes(program: Program, dtypes: dict, extra_slots: int,
                  stateless: frozenset = frozenset(), only=None,
                  weights_only: frozenset = frozenset(), stored: dict | None = None) -> int:
    """Bytes the writer will receive: every placement in its dtype (or ``stored[(coord,
    name)]`` bytes, a quantized tensor's), plus each optimizer slot in float32 (none for
    frozen parameters and buffers, the ``stateless`` logical tensors); with ``only``, just
    those target (coord, name), and of those in ``weights_only`` just the weights."""
    from math import prod
    from mapc.runtime.backends import DTYPES
    total = 0
    for inst, coord, name in program.target.placements():
        if only is not None and (coord, name) not in only:
            continue
        n = prod(inst.recipe.shape_at(coord))
        slots = 0 if all(k in stateless for k in inst.members.values()) or \
            (coord, name) in weights_only else extra_slots
        weights = (stored or {}).get((coord, name))
        total += (n * DTYPES[dtypes[(coord, name)]].itemsize if weights is None else weights) \
            + n * 4 * slots
    return total


class _LazyBackend:
    """The numpy backend for the pipelined path. A gather's stacks are lazy (``Stack``: the
    pieces stay views of the source files) and made in an Arena only when an op needs the
    bytes; a shard's final concatenation is left to the ShardBuilder, which decides where the
    bytes go (file ranges, or one of its reused buffers)."""

    def __init__(self, arena):
        self.arena, self.builder = arena, None
        self.be = get_backend("numpy")

    def bind(self, builder):
        self.builder = builder
        return self

    def __getattr__(self, name):
        return getattr(self.be, name)

    def _real(self, x):
        from mapc.runtime.fastcopy import Concat, Stack
        if isinstance(x, (Stack, Concat)):
            return x.fill(self.arena.take(x.shape, x.dtype))
        return x

    def stack(self, xs, axis):
        from mapc.runtime.fastcopy import Stack
        lazy = Stack.of(xs, axis)
        if lazy is not None:
            return lazy
        xs = [self._real(x) for x in xs]
        shape = list(xs[0].shape)
        shape.insert(axis, len(xs))
        out = self.arena.take(tuple(shape), np.result_type(*[x.dtype for x in xs]))
        return np.stack(xs, axis=axis, out=out)

    def concat(self, xs, axis):
        if self.builder is not None:
            return self.builder.concat(xs, axis)
        return self.be.concat([self._real(x) for x in xs], axis)

    def reshape(self, x, shape):
        return _lazy_or(x, lambda v: v.reshape(tuple(shape)), self._real)

    def transpose(self, x, perm):
        return _lazy_or(x, lambda v: v.transpose(tuple(perm)), self._real)

    def index(self, x, axis, i):
        return _lazy_or(x, lambda v: v.take(axis, i) if _is_stack(v) else
                        v[(slice(None),) * axis + (i,)], self._real)

    def slice(self, x, axis, start, stop):
        return _lazy_or(x, lambda v: v.take(axis, slice(start, stop)) if _is_stack(v) else
                        v[(slice(None),) * axis + (slice(start, stop),)], self._real)

    def pad(self, x, axis, n):
        return self.be.pad(self._real(x), axis, n)

    def broadcast(self, x, shape):
        return self.be.broadcast(self._real(x), shape)

    def cast(self, x, dtype):
        return self.be.cast(self._real(x), dtype)

    def to_numpy(self, x):
        return self.be.to_numpy(self._real(x))

    def all_zero(self, x):
        return self.be.all_zero(self._real(x))

    def equal(self, a, b):
        return self.be.equal(np.asarray(a), np.asarray(b))


def _is_stack(x) -> bool:
    from mapc.runtime.fastcopy import Stack
    return isinstance(x, Stack)


def _lazy_or(x, op, real):
    """``op(x)``; on a Stack that cannot stay lazy for it, ``op`` of its bytes."""
    if _is_stack(x):
        out = op(x)
        return op(real(x)) if out is None else out
    return op(x)


class _WriteBehind:
    """Writes on one thread behind the building of the next shards.

    With a writer that is done with each array when write() returns (``keeps_arrays``
    False) and the numpy backend, shard k is written while shard k+1 is built and the next unit
    is read (numpy copies, zlib, pwrite and copy_file_range all release the GIL). Two shard
    builders and two arenas alternate, and a buffer is reused only once the writes that read
    it are done, so at most two shards and two units are in flight. Writes keep their order.
    Otherwise everything runs inline, as before."""

    def __init__(self, writer, progress, pipelined: bool):
        self.writer, self.progress, self.pipelined = writer, progress, pipelined
        self.pending: list = []          # (round, shard number, future), oldest first
        self.round = self.shard = -1
        self.pool = None
        if pipelined:
            from concurrent.futures import ThreadPoolExecutor
            from mapc.runtime.fastcopy import Arena, ShardBuilder
            takes = getattr(writer, "takes_ranges", False)
            self.builders = [ShardBuilder(takes), ShardBuilder(takes)]
            self.arenas = [Arena(), Arena()]
            self.lazy = [_LazyBackend(a) for a in self.arenas]
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mapc-write")

    def _wait(self, done):
        while self.pending and done(self.pending[0]):
            self.pending.pop(0)[2].result()

    def next_round(self):
        """A new unit (or optimizer slot of it): (gather backend, shard backend) to use."""
        self.round += 1
        if not self.pipelined:
            return None, None
        r = self.round
        self._wait(lambda p: p[0] <= r - 2)      # that arena's tensors are all written
        self.arenas[r % 2].reset()
        return self.lazy[r % 2].bind(None), self.lazy[r % 2]

    def next_builder(self):
        self.shard += 1
        k = self.shard
        self._wait(lambda p: p[1] <= k - 2)      # that builder's buffers are written
        return self.builders[k % 2]

    def submit(self, writes):
        if self.pool is None:
            self._write(writes)
        else:
            self.pending.append((self.round, self.shard, self.pool.submit(self._write, writes)))

    def _write(self, writes):
        for slot, coord, name, arr in writes:
            if slot is None:
                self.writer.write(coord, name, arr)
            else:
                self.writer.write_slot(slot, coord, name, arr)
            self.progress.step(arr.nbytes)

    def drain(self):
        self._wait(lambda p: True)

    def close(self):
        """Wait for writes in flight (errors of a run already failing are not raised again)."""
        if self.pool is not None:
            for *_, f in self.pending:
                f.exception()
            self.pending = []
            self.pool.shutdown(wait=True)


def target_dtypes(program: Program, reader, dtype: str | None,
                  slot: str = "param") -> dict[tuple, str]:
    """The dtype of every target tensor, from the source headers (no data read)."""
    logical_dtype = {}
    for inst in program.source.instances:
        _, coord, name = inst.shards[0]
        dt = reader.dtype(name, coord) if slot == "param" or name in reader.stateless(coord) \
            else reader.dtype(name, coord, slot=slot)
        for key in inst.members.values():
            logical_dtype.setdefault(key, dt)
    out = {}
    for inst, coord, name in program.target.placements():
        have = logical_dtype[next(iter(inst.members.values()))]
        # --dtype casts floating tensors; integer buffers (step counters, ...) keep theirs;
        # value-mapped 16-bit weights are kept in float32 (plan_write.cast_dtype)
        out[(coord, name)] = cast_dtype(inst, have, dtype, widen=slot == "param")
    return out


FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def read_instances(instances, reader, be, report: Report, verify_replicas=True,
                   slot: str = "param", allow_lossy: bool = False):
    """Rebuild logical tensors from the shards of ``instances`` (primaries before copies)."""
    read = reader.read if slot == "param" else \
        (lambda name, coord: reader.read(name, coord, slot=slot))
    logical = {}
    for inst in instances:
        recipe = inst.recipe
        shards = {}
        for rc, copies in inst.by_recipe_coord().items():
            (coord, name), others = copies[0], copies[1:]
            arr = read(name, coord)
            report.bytes_read += arr.nbytes
            if inst.summed and slot in SUMMED_SLOTS:   # `sum over AXIS`: shares of the value
                arr, others = _sum_shares(inst, coord, arr, others, read, report)
            if verify_replicas:
                for other, oname in others:
                    again = read(oname, other)
                    report.bytes_read += again.nbytes
                    if not bytes_equal(arr, again):
                        report.warnings.append(
                            f"replicas of {name} differ between shards {_coord(coord)} and "
                            f"{_coord(other)}; took {_coord(coord)}")
            if getattr(inst, "value", None) is not None:   # the file stores f(x) (values.py)
                arr = _load_value(inst, arr, name, slot, report, allow_lossy)
            shards[rc] = be.from_numpy(arr)

        def check_pad(member, pad, inst=inst):
            if not be.all_zero(pad):
                report.warnings.append(f"padding of {inst.members[member]} in "
                                       f"{inst.rule['name']} was not zero (trained pad rows?); "
                                       f"dropped")

        def check_rep(member, equal, inst=inst):
            if not equal:
                report.warnings.append(f"the replicated copies of {inst.members[member]} in "
                                       f"{inst.rule['name']} differ; took the first")
        members = recipe.gather(be, shards, check_pad, check_rep)
        for m, key in inst.members.items():
            if key in logical:
                if not be.equal(logical[key], members[m]):
                    report.warnings.append(
                        f"the copy of {key} in {inst.first_name()} differs from its primary; "
                        f"took the primary")
            else:
                logical[key] = members[m]
    return logical


def _sum_shares(inst, coord, arr, others, read, report):
    """Add the shares of a ``sum over`` tensor held by the ranks of its summed axes (in
    float64, rounded once to the stored dtype); the copies along other axes are replicas."""
    first = dict(coord)
    same = [(c, n) for c, n in others
            if all(v == first.get(a) for a, v in c if a not in inst.summed)]
    if not same:
        return arr, others
    total = arr.astype(np.float64)
    for c, n in same:
        share = read(n, c)
        report.bytes_read += share.nbytes
        total = total + share.astype(np.float64)
    return total.astype(arr.dtype), [x for x in others if x not in same]


def _load_value(inst, arr, name, slot, report, allow_lossy):
    from mapc.runtime import values
    if slot not in values.VALUE_SLOTS:
        values.moments_pass(inst.value, name, slot)
        return arr
    return values.load(inst.value, arr, name, report, allow_lossy)


def _store_value(be, shard_be, inst, shard, want, name, slot, report, allow_lossy):
    """The physical shard of a value-mapped target tensor, as numpy in ``want``."""
    from mapc.runtime import values
    if shard_be is not None:       # pipelined: the shard's bytes, out of the lazy backend
        shard = shard_be.to_numpy(shard)
    if slot not in values.VALUE_SLOTS:
        values.moments_pass(inst.value, name, slot)
        return be.to_numpy(be.cast(shard, want))
    return be.to_numpy(values.store(be, inst.value, shard, want, name, report, allow_lossy))


def _coord(c) -> str:
    return ",".join(f"{a}={i}" for a, i in c) or "single"


def run(program: Program, reader, writer, *, backend: str = "numpy", dtype: str | None = None,
        quiet: bool = False, verify_replicas: bool = True, plan=None, only=None,
        weights_only: frozenset = frozenset(), progress=None,
        allow_lossy: bool = False) -> Report:
    """Stream ``program`` from ``reader`` into ``writer``. With ``plan`` (a WritePlan, see
    mapc.runtime.plan_write) the planned tensors, dtypes and slots are used as they are.
    ``allow_lossy`` writes value-mapped tensors whose map rounds (mapc.runtime.values).

    ``only`` (a set of target (coord, name)): write just those tensors, reading only the
    units that feed them (a worker's share of a parallel run; ``begin`` still receives every
    planned tensor); of those in ``weights_only`` just the weights are written (a unit whose
    wanted tensors are all such reads no optimizer slot). ``progress``: an object with ``step(nbytes)`` and ``done()`` to report
    to instead of the stderr bar."""
    from mapc.runtime import quantized as quant
    be = get_backend(backend)
    report = Report()
    start = time.monotonic()
    quantized = plan.quantized if plan is not None else {}
    have = reader.slots()
    slots = plan.slots if plan is not None else getattr(writer, "slots", ("param",))
    extra = [s for s in slots if s != "param" and s in have]
    param_from = weights_slot(slots, have)
    stored = {}
    if plan is not None:
        dtypes = {(coord, name): dt for coord, name, _, dt in plan.tensors}
        writer.begin(list(plan.tensors))
        # --quantize: a tensor is planned as the tensors that store it (mxfp4: NAME_blocks and
        # NAME_scales); a worker given those writes it
        sizes = {(coord, name): DTYPES[dt].itemsize * math.prod(shape)
                 for coord, name, shape, dt in plan.tensors}
        for (coord, name), kind in quantized.items():
            keys = [(coord, name + suffix) for suffix in quant.SUFFIXES[kind]]
            dtypes.setdefault((coord, name), dtypes[keys[0]])
            stored[(coord, name)] = sum(sizes[k] for k in keys)
            if only is not None and keys[0] in only:
                only = only | {(coord, name)}
    else:
        dtypes = target_dtypes(program, reader, dtype, param_from)
        writer.begin([(coord, name, inst.recipe.shape_at(coord), dtypes[(coord, name)])
                      for inst, coord, name in program.target.placements()])
    # Optimizer slots the source has and the writer stores (`extra`); a training checkpoint's
    # weights are exported from its fp32 master copy when the writer keeps no master slot.
    # Frozen parameters and buffers (stateless) have only their weights.
    stateless = program.stateless_keys(reader)
    for slot in extra:   # optimizer state is kept in fp32
        writer.begin_slot(slot, [(coord, name, inst.recipe.shape_at(coord), "float32")
                                 for inst, coord, name in program.target.placements()
                                 if not all(k in stateless for k in inst.members.values())])
    if progress is None:
        progress = Progress(planned_bytes(program, dtypes, len(extra), frozenset(stateless),
                                          only, weights_only, stored), "convert", quiet,
                            unit="B")
    # Shards that must be rebuilt go through reused buffers when the writer consumes each
    # array before write() returns; views of the source (unsplit tensors, row blocks) are
    # passed through untouched, and the writer may copy them in-kernel (runtime/fastcopy.py).
    pipelined = be.name == "numpy" and not getattr(writer, "keeps_arrays", True)
    behind = _WriteBehind(writer, progress, pipelined)
    try:
        for unit in program.units:
            if only is not None and not any((c, n) in only for inst in unit.targets
                                            for _, c, n in inst.shards):
                continue                         # another worker's tensors only
            if all(k in stateless for k in unit.keys):
                slots_here = ["param"]
            elif weights_only and all((c, n) in weights_only for inst in unit.targets
                                      for _, c, n in inst.shards if (c, n) in only):
                slots_here = [param_from]        # this worker's files hold the weights only
            else:
                slots_here = [param_from] + extra
            for slot in slots_here:
                is_weight = slot in ("param", param_from)
                read_be, shard_be = behind.next_round()
                logical = read_instances(unit.sources, reader, read_be or be, report,
                                         verify_replicas, slot, allow_lossy)
                for inst in unit.targets:
                    members = {m: logical[k] for m, k in inst.members.items()}
                    for rc, copies in inst.by_recipe_coord().items():
                        if only is not None:
                            copies = [c for c in copies if c in only and
                                      (is_weight or c not in weights_only)]
                            if not copies:
                                continue
                        want = dtypes[copies[0]] if is_weight else "float32"
                        kind = quantized.get(copies[0]) if is_weight else None
                        if kind is not None:     # --quantize: the value, then its storage
                            bind = shard_be.bind(None) if shard_be is not None else be
                            value = (shard_be or be).to_numpy(
                                inst.recipe.shard(bind, members, dict(rc)))
                            stored = quant.store(kind, value, copies[0][1], report, allow_lossy)
                            writes = [(None, coord, name + suffix, arr)
                                      for coord, name in copies for suffix, arr in stored]
                            behind.submit(writes)
                            report.tensors_written += len(writes)
                            report.bytes_written += sum(a.nbytes for *_, a in writes)
                            continue
                        if getattr(inst, "value", None) is not None:
                            bind = shard_be.bind(None) if shard_be is not None else be
                            arr = _store_value(be, shard_be, inst,
                                               inst.recipe.shard(bind, members, dict(rc)),
                                               want, copies[0][1], slot, report, allow_lossy)
                        elif shard_be is not None and not inst.recipe.ragged:
                            builder = behind.next_builder()
                            shard = inst.recipe.shard(shard_be.bind(builder), members, dict(rc))
                            arr = builder.build(shard, DTYPES[want])
                        else:
                            shard = inst.recipe.shard(be, members, dict(rc))
                            arr = be.to_numpy(shard if want is None else be.cast(shard, want))
                        if dtype_name(arr.dtype) != want:
                            raise MapcError(f"internal: {copies[0][1]} has dtype {arr.dtype}, "
                                            f"planned {want}")
                        zeros = np.zeros(arr.shape, arr.dtype) \
                            if inst.summed and slot in SUMMED_SLOTS else None
                        writes = [(None if is_weight else slot, coord, name,
                                   arr if zeros is None or inst.is_share_holder(coord) else zeros)
                                  for coord, name in copies]
                        behind.submit(writes)
                        report.tensors_written += len(writes)
                        report.bytes_written += arr.nbytes * len(writes)
        behind.drain()
    finally:
        behind.close()
    report.warnings += quant.summary(report)
    report.seconds = time.monotonic() - start
    progress.done()
    return report
