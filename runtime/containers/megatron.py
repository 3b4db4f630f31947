"""Megatron-LM checkpoints in the ``torch`` format.

``latest_checkpointed_iteration.txt`` (an iteration number or ``release``) and
``iter_0000100/`` or ``release/`` holding ``mp_rank_TT[_PPP]/model_optim_rng.pt`` (the
``_PPP`` suffix only when pp > 1). Each file is a dict with ``model`` (megatron-core names,
flat; legacy models nest ``language_model`` -> ``embedding``/``encoder``/``output_layer``),
``args`` (an argparse.Namespace), ``checkpoint_version``, ``iteration``. Files are read and
written with mapc's own torch-file code: no pickled code runs and torch is not required.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import numpy as np

from mapc.errors import MapcError
from mapc.runtime import torchfile
from mapc.runtime.containers.base import (MAPC_JSON, RefSource, Writer, coord_key, rank_grid,
                                          write_json)

LAYOUT = "megatron"
TRACKER = "latest_checkpointed_iteration.txt"
FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


def _iteration_dir(path: Path) -> Path:
    """The directory holding mp_rank_* folders: PATH itself, or the one the tracker names."""
    if any(_RANK_DIR.match(p.name) for p in path.iterdir() if p.is_dir()):
        return path
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        sub = "release" if text == "release" else f"iter_{int(text):07d}" \
            if text.isdigit() else None
        if sub is None:
            raise MapcError(f"{TRACKER} holds {text!r}, not an iteration or 'release'",
                            where=str(path))
        if not (path / sub).is_dir():
            raise MapcError(f"{TRACKER} names {sub}, which does not exist", where=str(path))
        return path / sub
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
        args = torchfile.load(first_file).get("args")
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
        self.topology, self.files, self._coords = rank_grid(ranks, rank_dir, str(self.iter_dir))
        self._loaded: dict = {}
        first = self._load(self._coords[0])
        args = first.get("args")
        self.format_meta = dict(args) if args is not None else {}
        self.iteration = first.get("iteration")
        self.checkpoint_version = first.get("checkpoint_version")
        self.config = self.record.get("config")

    def _file(self, coord):
        return self.files[coord_key(coord)]

    def _load(self, coord):
        key = coord_key(coord)
        if key not in self._loaded:
            obj = torchfile.load(self.files[key])
            if not isinstance(obj, dict) or "model" not in obj:
                raise MapcError("not a Megatron checkpoint file (no 'model' entry)",
                                where=str(self.files[key]))
            model = obj["model"]
            flat = {k: v for k, v in flatten(model).items()
                    if not k.endswith("_extra_state") and isinstance(v, torchfile.TensorRef)}
            obj = dict(obj)
            obj["_tensors"] = flat
            self._loaded[key] = obj
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
        return str(self._file(coord).relative_to(self.path))


def rank_dir(coord, pp: int, ep: int = 1) -> str:
    c = dict(coord)
    return (f"mp_rank_{c.get('tp', 0):02d}" + (f"_{c.get('pp', 0):03d}" if pp > 1 else "")
            + (f"_{c.get('ep', 0):03d}" if ep > 1 else ""))


class MegatronWriter(Writer):
    def __init__(self, tmpdir, topology: dict, args: dict, iteration=None):
        super().__init__(tmpdir)
        self.tp, self.pp = topology.get("tp", 1), topology.get("pp", 1)
        self.ep = topology.get("ep", 1)
        self.args = args
        self.iteration = iteration
        self.sub = "release" if iteration is None else f"iter_{int(iteration):07d}"
        self.writers = {}
        self.order = {}

    def begin(self, tensors):
        for coord, name, shape, dt in tensors:
            self.order.setdefault(coord, []).append(name)
        for coord in self.order:
            d = self.dir / self.sub / rank_dir(coord, self.pp, self.ep)
            d.mkdir(parents=True, exist_ok=True)
            self.writers[coord] = (torchfile.TorchWriter(d / FILE), {})

    def write(self, coord, name, arr):
        w, placeholders = self.writers[coord]
        placeholders[name] = w.add_tensor(arr)

    def finish(self, record: dict):
        for coord, (w, placeholders) in self.writers.items():
            c = dict(coord)
            args = dict(self.args)
            args.update(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                        expert_model_parallel_size=self.ep, rank=0,
                        world_size=self.tp * self.pp * self.ep)
            model = nest((n, placeholders[n]) for n in self.order[coord])
            w.finish({
                "args": torchfile.Namespace(**args),
                "checkpoint_version": 3.0,
                "iteration": 0 if self.iteration is None else int(self.iteration),
                "model": model,
                "mapc": {"tp_rank": c.get("tp", 0), "pp_rank": c.get("pp", 0),
                         "ep_rank": c.get("ep", 0)},
            })
        (self.dir / TRACKER).write_text(
            "release" if self.iteration is None else str(int(self.iteration)))
        write_json(self.dir / MAPC_JSON, record)

    def abort(self):
        for w, _ in self.writers.values():
            w.abort()


Source = MegatronSource


def make_writer(tmpdir, program, resolved, options):
    return MegatronWriter(tmpdir, program.target.mesh, program.target.meta())
