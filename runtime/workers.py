"""Writing one output with many processes: ``--workers N`` on one machine, torchrun / srun
ranks on many.

A format's WritePlan lists its independent file groups (``WritePlan.parts``, see
mapc.runtime.plan_write). They are partitioned among the processes, balanced by bytes
(:func:`partition`); each process runs the program for its share only (reading just the units
that feed its files) into the one temporary directory of the output, and writes no metadata.
When every share succeeded, one process (the parent, or rank 0) writes the metadata files (the
plan's files in no part: records, index, tracker) and commits the output atomically. A share
that fails, or a process that dies, aborts the whole output: nothing is left at DST.

Formats whose plan has no parts (one file fed by every tensor) run in one process; the plan
says why (``WritePlan.serial``), and ``mapc convert --dry-run`` shows it.

torch is imported only under torchrun/srun (:func:`distributed_env`); worker processes are
forked (the planned conversion, with its open source, is inherited, nothing is pickled).
"""
from __future__ import annotations

import os
import time

from mapc.errors import MapcError
from mapc.runtime import execute

MAX_AUTO_WORKERS = 8                 # --workers default: at most this many processes
MIN_AUTO_SHARE = 256 * 2**20         # --workers default: at least this many bytes each


def partition(parts, n: int) -> list[tuple]:
    """``parts`` in at most ``n`` shares balanced by bytes, each a run of consecutive parts
    in plan order (the ranks of one pipeline stage, neighbouring shards: files fed by the
    same units stay together, so each worker reads fewer units). Share k ends at the part
    boundary nearest to k/n of the bytes, so no share is off by more than one part.
    Deterministic: every rank of a distributed run computes the same shares."""
    n = max(1, min(n, len(parts)))
    total = sum(p.bytes for p in parts)
    cuts, at, start = [], 0, 0
    cum = [0]
    for p in parts:
        cum.append(cum[-1] + p.bytes)
    for k in range(1, n):
        want = total * k / n
        lo, hi = start + 1, len(parts) - (n - k)        # leave a part for each later share
        at = min(range(lo, hi + 1), key=lambda i: (abs(cum[i] - want), i))
        cuts.append(at)
        start = at
    bounds = [0, *cuts, len(parts)]
    return [tuple(parts[bounds[k]:bounds[k + 1]]) for k in range(n)]


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose(plan, requested: int | None, backend: str = "numpy") -> tuple[int, str]:
    """(number of processes, why) for writing ``plan`` with ``--workers requested`` (None:
    the default, what the machine has, at most MAX_AUTO_WORKERS and at least MIN_AUTO_SHARE
    bytes each) and ``--backend backend``. The real run and ``--dry-run`` both ask this."""
    if requested is not None and (not isinstance(requested, int) or requested < 1):
        raise MapcError(f"--workers {requested!r} must be a positive integer")
    if backend != "numpy":
        return 1, f"--backend {backend}: its thread pools do not survive fork()"
    parts = plan.parts
    if not parts:
        return 1, f"{plan.format}: {plan.serial or 'its files are not independent'}"
    if requested is None:
        total = sum(p.bytes for p in parts)
        n = min(cpu_count(), MAX_AUTO_WORKERS, len(parts), max(1, total // MIN_AUTO_SHARE))
        return n, (f"default: {cpu_count()} CPUs, {len(parts)} independent file groups, "
                   f"{execute.fmt_bytes(total)}")
    if requested > len(parts):
        return len(parts), f"{len(parts)} independent file groups"
    return requested, "as asked"


def describe(plan, requested: int | None, world: int | None = None,
             backend: str = "numpy") -> str:
    """What ``--dry-run`` prints about the processes that will write ``plan``: their number
    and each one's share, as the real run partitions the files."""
    if world is not None:
        n, why = (min(world, len(plan.parts)), f"{world} ranks") if plan.parts else \
            (1, f"{plan.format}: {plan.serial or 'its files are not independent'}")
    else:
        n, why = choose(plan, requested, backend)
    lines = [f"workers: {n} ({why})"]
    if n > 1:
        total = len(plan.tensors)
        for k, share in enumerate(partition(plan.parts, n)):
            files = [f for p in share for f in p.files]
            labels = [_label(p) for p in share]
            shown = labels if len(labels) <= 4 else [*labels[:3], "...", labels[-1]]
            fed = {t for p in share for t in p.tensors}
            lines.append(f"  worker {k}: {len(files)} file{'s' if len(files) != 1 else ''}, "
                         f"{execute.fmt_bytes(sum(p.bytes for p in share))}, "
                         f"reads {len(fed)} of {total} tensors: " + ", ".join(shown))
        lines.append("  metadata and commit: " + ("rank 0" if world else "the parent process"))
    return "\n".join(lines)


def _label(part) -> str:
    """A Part as --dry-run names it: its file, or the folder holding all its files."""
    if len(part.files) == 1:
        return part.files[0]
    head = os.path.commonpath(part.files)
    return f"{head}/ ({len(part.files)} files)" if head else \
        f"{part.files[0]} (+{len(part.files) - 1} files)"


def write_share(cp, tmp, share, *, backend: str, record_of, progress=None):
    """Write the data files of ``share`` (Parts of ``cp.write``) into ``tmp``; no metadata.
    Returns the Report (the caller merges reports and writes the metadata)."""
    from mapc.runtime.containers import make_writer
    plan = cp.write
    writer = make_writer(cp.request.format, tmp, cp.program, plan)
    writer.owned = frozenset(f for p in share for f in p.files)
    writer.metadata = False
    only = frozenset(t for p in share for t in p.tensors)
    full = frozenset(t for p in share if not p.weights_only for t in p.tensors)
    return _run_writer(cp, writer, backend, True, record_of, only=only, progress=progress,
                       weights_only=only - full)


def _run_writer(cp, writer, backend, quiet, record_of, only=None, progress=None,
                weights_only=frozenset()):
    """Stream ``cp``'s program into ``writer`` (just the tensors ``only``, if given; of those
    in ``weights_only`` just the weights) and finish it; abort it on any failure."""
    try:
        report = execute.run(cp.program, cp.resolved.source, writer, backend=backend,
                             plan=cp.write, only=only, weights_only=weights_only,
                             quiet=quiet, progress=progress,
                             allow_lossy=cp.request.allow_lossy)
        writer.finish(record_of(report))
    except BaseException:
        writer.abort()
        raise
    return report


def write_metadata(cp, tmp, record) -> None:
    """The plan's files in no part, written once every share is done."""
    from mapc.runtime.containers import make_writer
    plan = cp.write
    writer = make_writer(cp.request.format, tmp, cp.program, plan)
    writer.owned = frozenset()
    try:
        writer.begin(list(plan.tensors))
        writer.finish(record)
    except BaseException:
        writer.abort()
        raise


def merge(reports, seconds: float) -> execute.Report:
    """One report of the shares' reports (warnings in share order, each once)."""
    out = execute.Report(seconds=seconds)
    for r in reports:
        out.tensors_written += r.tensors_written
        out.bytes_written += r.bytes_written
        out.bytes_read += r.bytes_read
        out.warnings += [w for w in r.warnings if w not in out.warnings]
        out.peak_rss = max(out.peak_rss, r.peak_rss)
    return out


# ---- processes on one machine -------------------------------------------------------------------
class _PipeProgress:
    """A worker's progress, sent to the parent at most 10 times a second."""

    def __init__(self, conn):
        self.conn, self.n, self.last = conn, 0, time.monotonic()

    def step(self, n: int = 1):
        self.n += n
        now = time.monotonic()
        if now - self.last >= 0.1:
            self.flush()
            self.last = now

    def flush(self):
        if self.n:
            self.conn.send(("step", self.n))
            self.n = 0

    def done(self):
        self.flush()


def _worker(conn, cp, tmp, share, backend, record_of):
    """A forked worker: its share, then ("done", report) or ("error", message) to the parent."""
    try:
        progress = _PipeProgress(conn)
        report = write_share(cp, tmp, share, backend=backend, record_of=record_of,
                             progress=progress)
        progress.flush()
        report.peak_rss = execute.peak_rss_bytes()
        conn.send(("done", report))
    except BaseException as e:    # noqa: BLE001 - reported to the parent, which aborts all
        text = str(e) if isinstance(e, MapcError) else f"{type(e).__name__}: {e}"
        try:
            conn.send(("error", text, isinstance(e, KeyboardInterrupt)))
        except OSError:
            pass
        conn.close()
        os._exit(1)
    conn.close()


def run_forked(cp, tmp, n: int, *, backend: str, quiet: bool, record_of) -> execute.Report:
    """Write ``cp``'s data files with ``n`` forked workers into ``tmp``; raises MapcError
    (after stopping the others) when one fails or dies. The caller writes the metadata."""
    import multiprocessing
    from multiprocessing.connection import wait
    shares = partition(cp.write.parts, n)
    totals = [sum(p.bytes for p in s) for s in shares]
    ctx = multiprocessing.get_context("fork")
    start = time.monotonic()
    procs, conns = [], []
    done = [0] * len(shares)
    progress = execute.Progress(sum(totals), "convert", quiet, unit="B",
                                detail=lambda: _each_worker(done, totals, start))
    reports: list = [None] * len(shares)
    failure = None
    try:
        for k, share in enumerate(shares):
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker, args=(w, cp, tmp, share, backend, record_of),
                            name=f"mapc-worker-{k}", daemon=True)
            p.start()
            w.close()
            procs.append(p)
            conns.append(r)
        live = dict(enumerate(conns))
        while live and failure is None:
            for conn in wait(list(live.values())):
                k = conns.index(conn)
                try:
                    msg = conn.recv()
                except EOFError:
                    del live[k]
                    if reports[k] is None:
                        procs[k].join()
                        code = procs[k].exitcode
                        how = f"killed by signal {-code}" if code and code < 0 else \
                            f"exit code {code}"
                        failure = failure or MapcError(
                            f"worker {k} of {len(shares)} died ({how}); nothing was written",
                            hint="see the system log (out of memory?) and run again")
                    continue
                if msg[0] == "step":
                    done[k] += msg[1]
                    progress.step(msg[1])
                elif msg[0] == "done":
                    reports[k] = msg[1]
                else:
                    if msg[2]:
                        failure = KeyboardInterrupt()
                    else:
                        failure = MapcError(f"worker {k} of {len(shares)} failed: {msg[1]}")
    except BaseException as e:
        failure = e
    finally:
        if failure is not None:
            for p in procs:
                if p.is_alive():
                    p.terminate()
        for p in procs:
            p.join()
        for c in conns:
            c.close()
        progress.done()
    if failure is not None:
        raise failure
    return merge(reports, time.monotonic() - start)


def _each_worker(done, totals, start, now=None) -> str:
    """Each worker's part of a progress line: its share done and its own time left (at its
    own rate so far), e.g. ``w0 40% left 0:12 w1 100%``."""
    elapsed = max((time.monotonic() if now is None else now) - start, 1e-9)
    out = []
    for k, (d, t) in enumerate(zip(done, totals)):
        text = f"w{k} {100 * d // max(t, 1)}%"
        if 0 < d < t:
            text += f" left {execute.fmt_seconds((t - d) * elapsed / d)}"
        out.append(text)
    return " ".join(out)


# ---- ranks of torchrun / srun -------------------------------------------------------------------
def distributed_env() -> tuple[int, int] | None:
    """(rank, world size) when run by torchrun (or torch.distributed.run / elastic) or by
    Slurm's srun with more than one task; None otherwise."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env
                                        and "MASTER_ADDR" in env):
        rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 \
            and env.get("MAPC_SLURM", "1") != "0":
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    else:
        return None
    return (rank, world) if world > 1 else None


class _Group:
    """The gloo process group of a distributed run (torch imported only here)."""

    def __init__(self, rank: int, world: int):
        try:
            import torch.distributed as dist
        except ImportError:
            raise MapcError("mapc runs under torchrun/srun (RANK and WORLD_SIZE are set) but "
                            "torch is not installed",
                            hint="pip install torch (CPU is enough), or run mapc without "
                                 "torchrun") from None
        self.dist = dist
        if not dist.is_initialized():
            env = os.environ
            if "MASTER_ADDR" not in env:
                raise MapcError("srun: MASTER_ADDR is not set",
                                hint="export MASTER_ADDR=<first node> MASTER_PORT=29500 "
                                     "before srun (or use torchrun)")
            env.setdefault("MASTER_PORT", "29500")
            dist.init_process_group("gloo", rank=rank, world_size=world)
            # a gloo group still alive when the interpreter exits can abort the process
            # ("terminate called without an active exception", exit -6, seen on rank 0 after
            # its work was done): torchrun then reports the run failed. End it at exit.
            import atexit
            atexit.register(_end_group, dist)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def broadcast(self, obj):
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out


def _end_group(dist) -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:       # noqa: BLE001 - exiting anyway; the work is committed
            pass


def run_distributed(cp, src, dst, *, force: bool, backend: str, quiet: bool, record_of,
                    rank_world) -> execute.Report:
    """This rank's share of a distributed conversion. Rank 0 creates the temporary
    directory (on a file system all ranks see), every rank writes its share into it, they
    meet at a barrier (all_gather), rank 0 writes the metadata and commits when every share
    succeeded, else removes it. Every rank returns the merged report or raises the error."""
    from mapc.runtime.containers.base import AtomicOutput, stale_warning
    group = _Group(*rank_world)
    rank, world = group.rank, group.world
    start = time.monotonic()
    out, err, mine = None, None, None
    # every rank has planned the conversion (a rank whose planning failed never gets here:
    # it exits, torchrun stops the others, and nothing has been created yet)
    group.gather(rank)
    if rank == 0:
        try:
            out = AtomicOutput(dst, force=force, source=src)
        except MapcError as e:
            err = str(e)
    tmp = group.broadcast(str(out.tmp) if out is not None else ("", err))
    if not isinstance(tmp, str):
        raise MapcError(tmp[1] if rank == 0 else f"rank 0: {tmp[1]}")
    parts = cp.write.parts
    serial = not parts                       # rank 0 writes everything, the others wait
    shares = partition(parts, world) if parts else []
    try:
        if not os.path.isdir(tmp):
            raise MapcError(f"rank {rank} does not see the output directory {tmp} that rank 0 "
                            f"created", hint="DST must be on a file system every node mounts")
        if serial and rank == 0:
            mine = ("ok", _write_all(cp, tmp, backend, quiet, record_of))
        elif not serial and rank < len(shares):
            prog = execute.Progress(sum(p.bytes for p in shares[rank]), f"convert rank {rank}",
                                    quiet, unit="B")
            mine = ("ok", write_share(cp, tmp, shares[rank], backend=backend,
                                      record_of=record_of, progress=prog))
            prog.done()
        else:
            mine = ("ok", execute.Report())
        mine[1].peak_rss = execute.peak_rss_bytes()
    except BaseException as e:    # noqa: BLE001 - every rank must reach the barrier
        mine = ("error", str(e) if isinstance(e, MapcError) else f"{type(e).__name__}: {e}")
    results = group.gather(mine)
    failed = [(k, r[1]) for k, r in enumerate(results) if r[0] != "ok"]
    report = merge([r[1] for r in results if r[0] == "ok"], time.monotonic() - start)
    final = None
    if rank == 0:
        try:
            if failed:
                raise MapcError(f"rank {failed[0][0]} of {world} failed: {failed[0][1]}")
            if not serial:
                write_metadata(cp, tmp, record_of(report))
            out.commit()
            report.warnings += stale_warning(out.stale)
            final = ("ok", report.warnings)
        except BaseException as e:    # noqa: BLE001 - told to every rank below
            out.abort()
            final = ("error", str(e) if isinstance(e, MapcError) else
                     f"{type(e).__name__}: {e}")
    final = group.broadcast(final)
    if final[0] != "ok":
        raise MapcError(final[1] if rank == 0 or final[1].startswith("rank ")
                        else f"rank 0: {final[1]}")
    report.warnings = list(final[1])
    report.workers = world
    return report


def _write_all(cp, tmp, backend, quiet, record_of) -> execute.Report:
    """A serial format on rank 0: data and metadata, as one process writes them."""
    from mapc.runtime.containers import make_writer
    writer = make_writer(cp.request.format, tmp, cp.program, cp.write)
    return _run_writer(cp, writer, backend, quiet, record_of)
