"""NxD Training (NeuronX Distributed, AWS Trainium) checkpoints.

A checkpoint directory (e.g. ``<name>--step=N-consumed_samples=X.ckpt``) holds
``model/dp_rank_00_tp_rank_TT_pp_rank_PP.pt`` (``_ep_rank_EE`` with expert parallelism), one
flat state dict per rank with global layer indices. With xser (torch_xla serialization) each
``.pt`` holds ``TensorReference`` placeholders and every tensor is its own file in
``<file>.tensors/tensor_<tid>.pt``. Both are read and written without torch or torch_xla;
the layout (names, KV replication, query reorder, fused QKV) is the spec's ``nxdt`` layout.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from mapc.errors import MapcError
from mapc.runtime import torchfile
from mapc.runtime.containers.base import (MAPC_JSON, RefSource, coord_key, rank_grid,
                                          read_record, write_json)
from mapc.runtime.plan_write import PlannedWriter, make_plan, parts_by_file, planned_tensors

LAYOUT = "nxdt"
_RANK_FILE = re.compile(r"^dp_rank_(\d+)_tp_rank_(\d+)_pp_rank_(\d+)(?:_ep_rank_(\d+))?\.pt$")
TensorReference = torchfile.record_type("torch_xla.utils.serialization", "TensorReference")
PICKLES = torchfile.allow_list("NxD Training", TensorReference)


def _model_dir(path: Path) -> Path | None:
    for d in (path / "model", path):
        if d.is_dir() and any(_RANK_FILE.match(p.name) for p in d.iterdir()):
            return d
    return None


def detect(path: Path) -> bool:
    return path.is_dir() and _model_dir(path) is not None


def rank_file(coord, ep: int = 1) -> str:
    c = dict(coord)
    return (f"dp_rank_00_tp_rank_{c.get('tp', 0):02d}_pp_rank_{c.get('pp', 0):02d}"
            + (f"_ep_rank_{c.get('ep', 0):02d}" if ep > 1 else "") + ".pt")


class NxdtSource(RefSource):
    format = "nxdt"
    layout = LAYOUT

    def __init__(self, path):
        super().__init__(path)
        self.model_dir = _model_dir(self.path)
        if self.model_dir is None:
            raise MapcError("no NxD rank files (model/dp_rank_*_tp_rank_*_pp_rank_*.pt)",
                            where=str(self.path))
        if not self.record:   # pointed at model/ itself: the record sits one level up
            self.record = read_record(self.model_dir.parent) if self.model_dir == self.path \
                else read_record(self.model_dir)
        ranks = {}
        for p in sorted(self.model_dir.iterdir()):
            m = _RANK_FILE.match(p.name)
            if m and int(m.group(1)) == 0:   # data-parallel replicas hold the same weights
                ranks[(int(m.group(2)), int(m.group(3)), int(m.group(4) or 0))] = p
        self.topology, self.files, self._coords = rank_grid(
            ranks, lambda c, pp, ep: rank_file(c, ep), str(self.model_dir))
        self._loaded: dict = {}
        self.config = self.record.get("config")
        self.format_meta = dict(self.record.get("meta", {}))
        xser = any(isinstance(v, TensorReference) for v in self._state(self._coords[0]).values())
        self.format_meta["xser"] = xser

    def _state(self, coord) -> dict:
        key = coord_key(coord)
        if key not in self._loaded:
            f = self.files[key]
            obj = torchfile.load(f, PICKLES)
            if isinstance(obj, dict) and set(obj) == {"model"} and isinstance(obj["model"], dict):
                obj = obj["model"]
            if not isinstance(obj, dict):
                raise MapcError("expected a state dict", where=str(f))
            self._loaded[key] = {k: v for k, v in obj.items()
                                 if isinstance(v, (torchfile.TensorRef, TensorReference))}
        return self._loaded[key]

    def _ref(self, name, coord):
        try:
            ref = self._state(coord)[name]
        except KeyError:
            raise MapcError(f"tensor {name} is not in the checkpoint",
                            where=str(self.files[coord_key(coord)])) from None
        if isinstance(ref, TensorReference):
            f = self.files[coord_key(coord)]
            tensor_file = f.with_name(f.name + ".tensors") / f"tensor_{ref['tid']}.pt"
            if not tensor_file.is_file():
                raise MapcError(f"xser tensor file {tensor_file.name} of {name} is missing",
                                where=str(tensor_file.parent))
            ref = torchfile.load(tensor_file, PICKLES)
            if not isinstance(ref, torchfile.TensorRef):
                raise MapcError("an xser tensor file does not hold one tensor",
                                where=str(tensor_file))
        return ref

    def coords(self):
        return list(self._coords)

    def names(self, coord):
        return list(self._state(coord))

    def describe_coord(self, coord):
        return str(self.files[coord_key(coord)].relative_to(self.path))


Source = NxdtSource


def plan_write(program, facts, request):
    """``model/dp_rank_00_tp_rank_TT_pp_rank_PP[_ep_rank_EE].pt`` per rank (with ``xser``,
    each tensor in its own file under ``<rank file>.tensors/``) and mapc.json."""
    tensors = planned_tensors(program, facts, request.dtype, ("param",))
    ep = program.target.mesh.get("ep", 1)
    xser = bool(program.target.params.get("xser"))
    per_coord: dict = {}
    for coord, *_ in tensors:
        per_coord[coord] = per_coord.get(coord, 0) + 1
    files = [MAPC_JSON]
    for coord, n in per_coord.items():
        rank = f"model/{rank_file(coord, ep)}"
        files.append(rank)
        if xser:
            files += [f"{rank}.tensors/tensor_{i}.pt" for i in range(n)]
    # each rank's file (and with xser its tensor files) holds that rank's tensors only
    counts = {f"model/{rank_file(c, ep)}": n for c, n in per_coord.items()}
    parts = parts_by_file(tensors, lambda c, _: f"model/{rank_file(c, ep)}",
                          extra_files=lambda f: [f"{f}.tensors/tensor_{i}.pt"
                                                 for i in range(counts[f])] if xser else [])
    return make_plan("nxdt", files, decisions={"xser": xser, "ranks": len(per_coord)},
                     tensors=tensors, parts=parts)


class NxdtWriter(PlannedWriter):
    keeps_arrays = False    # every array is written before write() returns

    def __init__(self, tmpdir, program, plan):
        super().__init__(tmpdir, program, plan)
        self.ep = program.target.mesh.get("ep", 1)
        self.xser = bool(program.target.params.get("xser"))
        self.meta = program.target.meta()
        self.model_dir = self.dir / "model"
        self.files: dict = {}

    def begin(self, tensors):
        self.model_dir.mkdir(exist_ok=True)       # workers of a parallel run share it
        for coord, name, shape, dt in tensors:
            if not self.owns(f"model/{rank_file(coord, self.ep)}"):
                continue                          # another worker's rank
            if coord not in self.files:
                path = self.model_dir / rank_file(coord, self.ep)
                if self.xser:
                    path.with_name(path.name + ".tensors").mkdir()
                self.files[coord] = {"path": path, "order": [], "values": {},
                                     "writer": None if self.xser else
                                     torchfile.TorchWriter(path)}
            self.files[coord]["order"].append(name)

    def write(self, coord, name, arr):
        f = self.files[coord]
        if self.xser:
            tid = len(f["values"])
            tensor_file = f["path"].with_name(f["path"].name + ".tensors") / f"tensor_{tid}.pt"
            w = torchfile.TorchWriter(tensor_file)
            w.finish(w.add_tensor(arr))
            f["values"][name] = TensorReference(tid=tid)
        else:
            f["values"][name] = f["writer"].add_tensor(arr)

    def finish(self, record: dict):
        for f in self.files.values():
            state = {n: f["values"][n] for n in f["order"]}
            if self.xser:
                w = torchfile.TorchWriter(f["path"])
                w.finish(state)
            else:
                f["writer"].finish(state)
        if not self.metadata:
            return
        record = dict(record, meta=self.meta)
        write_json(self.dir / MAPC_JSON, record)

    def abort(self):
        for f in self.files.values():
            if f["writer"] is not None:
                f["writer"].abort()


Writer = NxdtWriter
