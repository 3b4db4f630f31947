"""Execute a program: stream units from a source reader into a target writer.

Readers and writers are the containers' (mapc.runtime.containers); they know files, the
program knows tensors. Each unit is read, rebuilt and written before the next is touched.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np

from mapc.compiler.program import Program
from mapc.errors import MapcError
from mapc.runtime.backends import bytes_equal, dtype_name, get_backend
from mapc.runtime.plan_write import weights_slot


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


class Progress:
    """A one-line progress bar on stderr (silent when quiet or not a terminal, unless forced)."""

    def __init__(self, total: int, label: str, quiet: bool = False):
        self.total, self.label, self.n = max(total, 1), label, 0
        self.enabled = not quiet
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.monotonic()

    def step(self, nbytes: int = 0):
        self.n += 1
        now = time.monotonic()
        if self.enabled and self.tty and (now - self.last > 0.1 or self.n == self.total):
            self.last = now
            frac = self.n / self.total
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {self.n}/{self.total} "
                             f"{now - self.start:5.1f}s")
            sys.stderr.flush()

    def done(self, summary: str):
        """Replace the bar by a summary line (terminals only; callers report the result)."""
        if self.enabled and self.tty:
            sys.stderr.write("\r\033[K" + summary + "\n")


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
        # --dtype casts floating tensors; integer buffers (step counters, ...) keep theirs
        out[(coord, name)] = dtype if dtype and have in FLOAT_DTYPES else have
    return out


FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def read_instances(instances, reader, be, report: Report, verify_replicas=True,
                   slot: str = "param"):
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


def _coord(c) -> str:
    return ",".join(f"{a}={i}" for a, i in c) or "single"


def run(program: Program, reader, writer, *, backend: str = "numpy", dtype: str | None = None,
        quiet: bool = False, verify_replicas: bool = True, plan=None) -> Report:
    """Stream ``program`` from ``reader`` into ``writer``. With ``plan`` (a WritePlan, see
    mapc.runtime.plan_write) the planned tensors, dtypes and slots are used as they are."""
    be = get_backend(backend)
    report = Report()
    start = time.monotonic()
    have = reader.slots()
    slots = plan.slots if plan is not None else getattr(writer, "slots", ("param",))
    extra = [s for s in slots if s != "param" and s in have]
    param_from = weights_slot(slots, have)
    if plan is not None:
        dtypes = {(coord, name): dt for coord, name, _, dt in plan.tensors}
        writer.begin(list(plan.tensors))
    else:
        dtypes = target_dtypes(program, reader, dtype, param_from)
        writer.begin([(coord, name, inst.recipe.shard_shape, dtypes[(coord, name)])
                      for inst, coord, name in program.target.placements()])
    # Optimizer slots the source has and the writer stores (`extra`); a training checkpoint's
    # weights are exported from its fp32 master copy when the writer keeps no master slot.
    # Frozen parameters and buffers (stateless) have only their weights.
    stateless = program.stateless_keys(reader)
    for slot in extra:   # optimizer state is kept in fp32
        writer.begin_slot(slot, [(coord, name, inst.recipe.shard_shape, "float32")
                                 for inst, coord, name in program.target.placements()
                                 if not all(k in stateless for k in inst.members.values())])
    progress = Progress(len(program.units) * (1 + len(extra)), "convert", quiet)
    for unit in program.units:
        weights_only = all(k in stateless for k in unit.keys)
        for slot in ["param"] if weights_only else [param_from] + extra:
            logical = read_instances(unit.sources, reader, be, report, verify_replicas, slot)
            for inst in unit.targets:
                members = {m: logical[k] for m, k in inst.members.items()}
                for rc, copies in inst.by_recipe_coord().items():
                    shard = inst.recipe.shard(be, members, dict(rc))
                    is_weight = slot in ("param", param_from)
                    want = dtypes[copies[0]] if is_weight else "float32"
                    arr = be.to_numpy(shard if want is None else be.cast(shard, want))
                    if dtype_name(arr.dtype) != want:
                        raise MapcError(f"internal: {copies[0][1]} has dtype {arr.dtype}, "
                                        f"planned {want}")
                    zeros = np.zeros_like(arr) if inst.summed and slot in SUMMED_SLOTS \
                        else None
                    for coord, name in copies:
                        value = arr if zeros is None or inst.is_share_holder(coord) else zeros
                        if is_weight:
                            writer.write(coord, name, value)
                        else:
                            writer.write_slot(slot, coord, name, value)
                        report.tensors_written += 1
                        report.bytes_written += arr.nbytes
            progress.step()
    report.seconds = time.monotonic() - start
    progress.done(f"wrote {report.tensors_written} tensors, "
                  f"{report.bytes_written / 2**20:.1f} MiB in {report.seconds:.1f}s")
    return report
