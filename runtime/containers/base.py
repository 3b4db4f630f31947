"""What every container shares: the reader protocol, atomic output and the ``mapc.json``
record every output carries (the write protocol is mapc.runtime.plan_write).

A container knows files (names, nesting, metadata files, shard naming) and never a model
family; the spec's layouts know tensors and never a file.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

from mapc.errors import MapcError

MAPC_JSON = "mapc.json"


def coord_key(coord) -> tuple:
    """A mesh coordinate independent of which axes a layout names: sorted, zero ranks
    dropped, so (tp=1, pp=0) of one layout and (tp=1, pp=0, ep=0) of another are equal. The
    expert tensor parallel rank (``etp``) is dropped too: the other ranks fix it
    (mapc.compiler.plan.expert_ranks), and a layout without that axis names the same file."""
    return tuple(sorted((a, i) for a, i in coord if i and a != "etp"))
FORMAT_VERSION = 1


class Source:
    """An opened checkpoint. Subclasses fill the attributes and implement the accessors."""

    format: str = ""
    layout: str = ""

    def __init__(self, path):
        self.path = Path(path)
        self.record: dict = read_record(self.path)   # mapc.json when mapc wrote it
        self.config: dict | None = None              # the model's config (HF keys), if stored
        self.format_meta: dict = {}                  # format metadata the spec's meta can read
        self.topology: dict = {}
        self.warnings: list[str] = []                # things the user should know (e.g. guesses)

    # Optimizer state travels in slots beside the weights ("param"): fp32 master weights
    # ("master") and Adam moments ("exp_avg", "exp_avg_sq"), each with its parameter's shape,
    # so the same compiled program moves them. Scalars live in training_state().
    SLOTS = ("param", "master", "exp_avg", "exp_avg_sq")

    def slots(self) -> list[str]:
        return ["param"]

    def training_state(self) -> dict:
        """Scalars a resumed run needs: iteration, optimizer step, param groups (lr, betas, eps,
        weight decay), scheduler, loss scale. Empty when the checkpoint carries none."""
        return {}

    def stateless(self, coord) -> dict[str, str]:
        """Tensors of ``coord`` that have no optimizer state, by name: ``"frozen"`` (a
        parameter no optimizer holds) or ``"buffer"`` (a module buffer). Only their
        ``param`` slot is read."""
        return {}

    def aliases(self) -> dict[str, str]:
        """Tied parameters the checkpoint records (DeepSpeed's ``shared_params``): alias name
        -> the stored name it shares. A family's spec declares its own (``alias``)."""
        return {}

    # -- tensors, by (mesh coord, physical name) --
    def coords(self) -> list[tuple]:
        raise NotImplementedError

    def names(self, coord) -> list[str]:
        raise NotImplementedError

    def shape(self, name, coord) -> tuple:
        raise NotImplementedError

    def dtype(self, name, coord) -> str:
        raise NotImplementedError

    def read(self, name, coord):
        raise NotImplementedError

    def describe_coord(self, coord) -> str:
        return ",".join(f"{a}={i}" for a, i in coord) or "single file"

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RefSource(Source):
    """A source whose tensors are lazy references (``.shape``, ``.dtype``, ``.map()``) found
    by ``_ref(name, coord)``: the .pt-based formats."""

    def _ref(self, name, coord):
        raise NotImplementedError

    def shape(self, name, coord):
        return tuple(self._ref(name, coord).shape)

    def dtype(self, name, coord):
        return self._ref(name, coord).dtype

    def read(self, name, coord):
        return self._ref(name, coord).map()


def rank_grid(ranks: dict, file_name, where: str, etp: int | None = None,
              sizes: dict | None = None):
    """Check that per-rank files form a complete (tp, pp, ep) grid.

    ``ranks`` maps (tp, pp, ep) to a path; ``file_name(coord, pp, ep)`` names a missing one.
    With ``etp`` (megatron-core's expert tensor parallel size, when it is not tp) the grid is
    the ranks that save (mapc.compiler.plan.expert_ranks), each coord with its etp rank, and
    ``sizes`` (the tp, pp, ep the checkpoint states) say how large it is.
    Returns (topology, files keyed by coord_key, coords in pipeline-major order)."""
    tp = max(t for t, _, _ in ranks) + 1
    pp = max(p for _, p, _ in ranks) + 1
    ep = max(e for _, _, e in ranks) + 1
    if etp is not None and etp != (sizes or {}).get("tp", tp):
        sizes = sizes or {}
        return _expert_rank_grid(ranks, file_name, where, max(tp, sizes.get("tp", 1)),
                                 max(pp, sizes.get("pp", 1)), max(ep, sizes.get("ep", 1)), etp)
    missing = [file_name((("tp", t), ("pp", p), ("ep", e)), pp, ep)
               for t in range(tp) for p in range(pp) for e in range(ep)
               if (t, p, e) not in ranks]
    if missing:
        raise MapcError(f"missing shard files: {', '.join(missing[:4])}"
                        + (" ..." if len(missing) > 4 else ""), where=where,
                        hint="copy the complete checkpoint")
    topology = {"tp": tp, "pp": pp} | ({"ep": ep} if ep > 1 else {})
    files = {coord_key((("tp", t), ("pp", p), ("ep", e))): f for (t, p, e), f in ranks.items()}
    coords = [(("tp", t), ("pp", p)) + ((("ep", e),) if ep > 1 else ())
              for (t, p, e) in sorted(ranks, key=lambda r: (r[1], r[2], r[0]))]
    return topology, files, coords


def _expert_rank_grid(ranks, file_name, where, tp, pp, ep, etp):
    from mapc.compiler.plan import expert_ranks
    if tp % etp or etp * ep < tp:
        raise MapcError(f"expert tensor parallel size {etp} does not fit tp={tp} ep={ep} (it "
                        f"must divide tp, with etp * ep >= tp)", where=where)
    grid = {(t, p, e): x for p in range(pp) for t, e, x in expert_ranks(tp, ep, etp)}
    extra = [file_name((("tp", t), ("pp", p), ("ep", e)), pp, ep)
             for t, p, e in ranks if (t, p, e) not in grid]
    missing = [file_name((("tp", t), ("pp", p), ("ep", e)), pp, ep)
               for t, p, e in grid if (t, p, e) not in ranks]
    if missing or extra:
        raise MapcError(f"missing shard files: {', '.join(missing[:4])}" if missing else
                        f"shard files of no rank at tp={tp} ep={ep} etp={etp}: "
                        f"{', '.join(extra[:4])}", where=where,
                        hint="copy the complete checkpoint" if missing else
                        "the args' expert_tensor_parallel_size does not match the files")

    topology = {"tp": tp, "pp": pp, "ep": ep, "etp": etp}
    files = {coord_key((("tp", t), ("pp", p), ("ep", e))): f for (t, p, e), f in ranks.items()}
    coords = [(("tp", t), ("pp", p), ("ep", e), ("etp", grid[(t, p, e)]))
              for t, p, e in sorted(ranks, key=lambda r: (r[1], r[2], r[0]))]
    return topology, files, coords


# Writers: see mapc.runtime.plan_write (a pure plan_write per format, then an I/O-only
# PlannedWriter that executes the WritePlan).


def read_record(path: Path) -> dict:
    f = Path(path) / MAPC_JSON
    if f.is_file():
        try:
            return json.loads(f.read_text())
        except ValueError as e:
            raise MapcError(f"corrupt {MAPC_JSON}: {e}", where=str(f)) from None
    return {}


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


class AtomicOutput:
    """A temporary directory beside ``dst``, renamed to ``dst`` only when complete.

    Commit replaces nothing it did not plan to: without ``force`` the rename refuses to land on
    anything (``renameat2(RENAME_NOREPLACE)`` on Linux), so a DST someone created meanwhile
    (even an empty directory, which a plain ``rename`` would silently replace) is an error;
    with ``force`` only the very file or directory that was at DST when the conversion started
    is replaced. When commit refuses, the finished output stays in its temporary directory,
    named in the error, for the user to move. The critical renames run with SIGINT/SIGTERM
    held, so an interrupt never leaves DST missing between them."""

    def __init__(self, dst, force: bool = False, source=None):
        self.dst = check_destination(dst)
        if source is not None:
            src = Path(source).resolve()
            d = self.dst.resolve()
            if d == src or src in d.parents or d in src.parents:
                raise MapcError(f"the destination {dst} overlaps the source {source}",
                                hint="write somewhere else; mapc never modifies its source")
        self.replaces = _identity(self.dst)         # what --force may replace, or None
        if self.replaces is not None and not force:
            raise MapcError(f"{dst} already exists" + (" (a symlink)" if self.dst.is_symlink()
                                                         else ""),
                            hint="choose a new path, or pass --force to replace it")
        # Missing parent directories are created, as DeepSpeed's save_checkpoint and
        # ds_to_universal create theirs; an aborted conversion removes the ones it made.
        parent = self.dst.parent
        self.made: list[Path] = []
        if not parent.is_dir():
            if parent.exists() or parent.is_symlink() or \
                    any(p.exists() and not p.is_dir() for p in parent.parents):
                raise MapcError(f"the parent of {dst} is not a directory",
                                hint="choose a destination inside a directory")
            missing = [parent] + [p for p in parent.parents if not p.exists()]
            try:
                parent.mkdir(parents=True)
            except OSError as e:
                raise MapcError(f"cannot create the parent directory {parent}: "
                                f"{e.strerror or e}", where=str(parent),
                                hint="choose a destination in a directory you can write") \
                    from None
            self.made = missing       # innermost first
        self.stale = stale_outputs(parent)
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}{TMP_MARK}{os.getpid()}-",
                                             dir=parent))
        except OSError as e:
            self._remove_made()
            raise MapcError(f"cannot create the output beside {dst}: {e.strerror or e}",
                            where=str(parent),
                            hint="choose a destination in a directory you can write") from None
        os.chmod(self.tmp, 0o777 & ~_umask())       # mkdtemp makes 0700; outputs follow umask
        self.committed = False
        self.kept = False

    def commit(self):
        with _signals_blocked():
            self._commit()
            self.committed = True

    def _commit(self):
        old = None
        if self.replaces is not None:
            if _identity(self.dst) != self.replaces:
                self._keep(f"{self.dst} changed while converting (it is not what --force was "
                           f"to replace)")
            old = self.dst.with_name(f".{self.dst.name}{TMP_MARK}{os.getpid()}-old-"
                                     f"{self.tmp.name[-8:]}")
            _rename_noreplace(self.dst, old)
        try:
            _rename_noreplace(self.tmp, self.dst)
        except FileExistsError:
            if old is not None:
                self._keep(f"{self.dst} was created while converting; the old {self.dst.name} "
                           f"is kept as {old}")
            self._keep(f"{self.dst} was created by someone else while converting")
        if old is not None:
            _remove(old)

    def _keep(self, why: str):
        self.kept = True
        raise MapcError(f"{why}: nothing was replaced", where=str(self.dst),
                        hint=f"the finished output is in {self.tmp}; move it where you want it")

    def abort(self):
        if not self.committed and not self.kept:
            _remove(self.tmp)
            self._remove_made()

    def _remove_made(self):
        for d in self.made:          # only the directories this conversion created, if empty
            try:
                d.rmdir()
            except OSError:
                break


TMP_MARK = ".mapc-"      # AtomicOutput's temporary names: .DST.mapc-PID-XXXX


def _identity(path: Path):
    """(device, inode) of what is at ``path`` (a symlink itself, not its target), or None."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # (a file in the way is refused later)
        return None
    except OSError as e:
        raise MapcError(f"cannot look at the destination: {e.strerror or e}", where=str(path)) \
            from None
    return st.st_dev, st.st_ino


def check_destination(dst) -> Path:
    """The absolute DST, refusing paths whose replacement would destroy the user's work: an
    empty string (an unset shell variable), '.', '..', '/', the home directory, the current
    directory or one of its parents."""
    text = os.fspath(dst) if isinstance(dst, os.PathLike) else dst
    if not isinstance(text, str) or not text.strip():
        raise MapcError(f"the destination {text!r} is empty",
                        hint="pass the output directory (is a shell variable unset?)")
    p = Path(text)
    if p.name in ("", ".", ".."):
        raise MapcError(f"the destination {text!r} names a directory by '.' or '..' or '/'",
                        hint="name the new output directory itself, e.g. ./out")
    try:
        absolute = p.absolute()
        resolved = absolute.resolve()
        cwd = Path.cwd().resolve()
    except OSError as e:                 # e.g. the current directory was deleted
        raise MapcError(f"cannot resolve the destination {text}: {e.strerror or e}",
                        hint="pass an absolute path from an existing directory") from None
    try:
        home = Path.home().resolve()
    except (KeyError, RuntimeError):
        home = None
    if resolved == cwd or resolved in cwd.parents:
        raise MapcError(f"the destination {text} is the current directory or one of its "
                        "parents", hint="choose a new directory for the output")
    if resolved == home or resolved == Path(resolved.anchor):
        raise MapcError(f"the destination {text} is the home or root directory",
                        hint="choose a new directory for the output")
    return absolute


def stale_outputs(parent: Path) -> list[Path]:
    """Temporary outputs (``.NAME.mapc-PID-...``) in ``parent`` left by runs that were killed
    (their process no longer exists on this machine)."""
    out = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return out
    for e in entries:
        m = _TMP_RE.match(e.name)
        if m is None:
            continue
        pid = int(m.group(1)) if m.group(1) else None
        if pid is not None and _alive(pid):
            continue
        out.append(Path(parent) / e.name)
    return sorted(out)


def stale_warning(stale: list[Path]) -> list[str]:
    if not stale:
        return []
    names = ", ".join(p.name for p in stale[:4]) + (" ..." if len(stale) > 4 else "")
    return [f"{len(stale)} temporary output(s) of interrupted mapc runs in {stale[0].parent}: "
            f"{names} (remove them with: mapc clean {stale[0].parent})"]


_TMP_RE = re.compile(r"^\..+\.mapc-(?:(\d+)-)?[^/]*$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _signals_blocked:
    """SIGINT and SIGTERM held (not lost) for the duration, then delivered. Python handlers
    run in the main thread whichever thread the kernel picks, so the handlers are swapped for
    a recorder rather than masking the signal in one thread (a no-op outside the main thread,
    where handlers cannot be set)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.old, self.got = {}, []
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.old[s] = signal.signal(s, lambda signum, frame: self.got.append(signum))

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(self.got):
            signal.raise_signal(s)


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _libc_renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _libc_renameat2() if sys.platform.startswith("linux") else None


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if anything is at ``dst``. Atomic with
    renameat2(RENAME_NOREPLACE); where the kernel or file system lacks it, a check right
    before the rename (a window of microseconds instead of the whole conversion)."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
                      _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _remove(path: Path) -> None:
    """Delete a file or a directory tree, if it exists (outputs may be either, e.g. .nemo)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
