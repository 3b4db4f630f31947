"""What every container shares: the reader/writer protocol, format detection, atomic output
and the ``mapc.json`` record every output carries.

A container knows files (names, nesting, metadata files, shard naming) and never a model
family; the spec's layouts know tensors and never a file.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from mapc.errors import MapcError

MAPC_JSON = "mapc.json"


def coord_key(coord) -> tuple:
    """A mesh coordinate independent of which axes a layout names: sorted, zero ranks
    dropped, so (tp=1, pp=0) of one layout and (tp=1, pp=0, ep=0) of another are equal."""
    return tuple(sorted((a, i) for a, i in coord if i))
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


def rank_grid(ranks: dict, file_name, where: str):
    """Check that per-rank files form a complete (tp, pp, ep) grid.

    ``ranks`` maps (tp, pp, ep) to a path; ``file_name(coord, pp, ep)`` names a missing one.
    Returns (topology, files keyed by coord_key, coords in pipeline-major order)."""
    tp = max(t for t, _, _ in ranks) + 1
    pp = max(p for _, p, _ in ranks) + 1
    ep = max(e for _, _, e in ranks) + 1
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


class Writer:
    """Writes into a fresh temporary directory; ``commit`` renames it into place.

    A writer that stores optimizer state lists its slots in ``slots``; it then receives
    ``begin_slot(slot, tensors)`` before and ``write_slot(slot, coord, name, arr)`` for every
    tensor of each further slot, and the source's training state in ``record["training"]``."""

    slots: tuple[str, ...] = ("param",)

    def __init__(self, tmpdir: Path):
        self.dir = tmpdir

    def begin(self, tensors):
        raise NotImplementedError

    def write(self, coord, name, arr):
        raise NotImplementedError

    def finish(self, record: dict):
        raise NotImplementedError

    def abort(self):
        pass


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
    """A temporary directory beside ``dst``, renamed to ``dst`` only when complete."""

    def __init__(self, dst, force: bool = False, source=None):
        self.dst = Path(dst).absolute()
        if source is not None:
            src = Path(source).resolve()
            d = self.dst.resolve()
            if d == src or src in d.parents or d in src.parents:
                raise MapcError(f"the destination {dst} overlaps the source {source}",
                                hint="write somewhere else; mapc never modifies its source")
        if self.dst.exists() and not force:
            raise MapcError(f"{dst} already exists", hint="choose a new path, or pass --force "
                            "to replace it")
        # Missing parent directories are created, as DeepSpeed's save_checkpoint and
        # ds_to_universal create theirs; an aborted conversion removes the ones it made.
        parent = self.dst.parent
        self.made: list[Path] = []
        if not parent.is_dir():
            if parent.exists() or any(p.exists() and not p.is_dir() for p in parent.parents):
                raise MapcError(f"the parent of {dst} is not a directory",
                                hint="choose a destination inside a directory")
            missing = [parent] + [p for p in parent.parents if not p.exists()]
            try:
                parent.mkdir(parents=True)
            except OSError as e:
                raise MapcError(f"cannot create the parent directory {parent}: {e.strerror}",
                                hint="choose a destination you may write to") from None
            self.made = missing       # innermost first
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.mapc-", dir=parent))
        except OSError as e:
            self._remove_made()
            raise MapcError(f"cannot write in {parent}: {e.strerror}",
                            hint="choose a destination you may write to") from None

    def commit(self):
        if self.dst.exists():
            old = self.dst.with_name(f".{self.dst.name}.mapc-old")
            _remove(old)
            os.rename(self.dst, old)
            os.rename(self.tmp, self.dst)
            _remove(old)
        else:
            os.rename(self.tmp, self.dst)

    def abort(self):
        _remove(self.tmp)
        self._remove_made()

    def _remove_made(self):
        for d in self.made:          # only the directories this conversion created, if empty
            try:
                d.rmdir()
            except OSError:
                break


def _remove(path: Path) -> None:
    """Delete a file or a directory tree, if it exists (outputs may be either, e.g. .nemo)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
