"""megatron-core distributed checkpoints: Megatron-LM's ``--ckpt-format torch_dist``.

A root holds ``latest_checkpointed_iteration.txt`` (an iteration or ``release``) and
``iter_NNNNNNN/`` (or ``release/``); the iteration directory holds what megatron-core's
``dist_checkpointing.save`` writes with its ``torch_dist`` backend:

* ``metadata.json``: ``{"sharded_backend": "torch_dist", "sharded_backend_version": 1,
  "common_backend": "torch", ...}``;
* a torch.distributed.checkpoint directory: ``.metadata`` (a pickled DCP ``Metadata``) and
  ``__R_K.distcp`` data files, each chunk a ``torch.save`` archive at an offset recorded in
  ``.metadata`` (which file holds a chunk depends on which rank saved it);
* ``common.pt``: everything that is not a sharded tensor: ``args`` (Megatron-LM's
  ``argparse.Namespace``), ``iteration``, ``checkpoint_version``, ``opt_param_scheduler``,
  ``content_metadata`` (``singleton_local_shards``, the optimizer's sharding type, ...).

The tensors are **global**: the same whatever TP/PP saved them. A TransformerBlock's layers are
**stacked** on a leading axis of all its layers (global layer numbers, across pipeline stages):
``decoder.layers.self_attention.linear_qkv.weight`` is ``[layers, (nh+2ng)*hd, H]``. The spec
names layer ``i``'s slab of such a tensor ``NAME[i]`` (``"NAME[{i}]"`` in a layout), and this
container presents every stacked tensor as those slabs, each read on its own from the chunks
that hold it (megatron-core saves one chunk per layer and tensor-parallel rank), so no stacked
tensor is ever materialized whole. Which keys are stacked is megatron-core's rule: the ones
under a ``layers.`` prefix not followed by a layer number. ``..._extra_state`` entries are
pickled objects (bytes entries in ``.metadata``), not weights.

Everything is read without torch: ``.metadata`` and the chunks through the ``dcp`` container's
restricted readers, ``common.pt`` through mapc's restricted unpickler.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np

from mapc.errors import MapcError
from mapc.runtime import torchfile
from mapc.runtime.containers import dcp
from mapc.runtime.containers.megatron import TRACKER, tracked_iteration
from mapc.runtime.backends import dtype_name
from mapc.runtime.containers.base import MAPC_JSON, Source, write_json
from mapc.runtime.plan_write import (PlannedWriter, SourceFacts, WritePlan, WriteRequest,
                                     make_plan, planned_tensors)

LAYOUT = "torch_dist"
METADATA_JSON = "metadata.json"
COMMON = "common.pt"
SINGLE = ()
# Enums Megatron-LM pickles inside ``args`` (attention_backend, model_type, fp8_recipe,
# cuda_graph_scope, ...). Each is read as an inert ``Call`` of its class on its value, so it is
# written back exactly as it came; megatron is never imported.
MEGATRON_ENUMS = [("megatron.core.enums", n) for n in ("ModelType", "Fp8Recipe", "Fp4Recipe")] \
    + [("megatron.core.transformer.enums", n) for n in (
        "ModelType", "LayerType", "AttnType", "AttnMaskType", "AttnBackend", "CudaGraphScope")]


def _enum(module: str, name: str):
    def member(value=None, *rest):
        if rest or not isinstance(value, (int, str)):
            raise MapcError(f"unexpected {module}.{name}({value!r}) in the pickle")
        return torchfile.Call(module, name, (value,))
    member.__name__ = name
    return member


ENUM_GLOBALS = {f"{m}.{n}": _enum(m, n) for m, n in MEGATRON_ENUMS}
PICKLES = torchfile.allow_list("megatron-core torch_dist", ENUM_GLOBALS)
# a key of megatron-core's stacked layers: "<block>.layers.<not a layer number>..."
_STACKED = re.compile(r"(?:^|\.)layers\.(?!\d+(?:\.|$))")
_SLAB = re.compile(r"^(.*)\[(\d+)\]$")


def _backend(d: Path) -> str | None:
    """The ``sharded_backend`` named by ``d/metadata.json``, or None if there is none."""
    f = d / METADATA_JSON
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise MapcError(f"cannot read {METADATA_JSON}: {e}", where=str(f),
                        hint="re-copy the checkpoint") from None
    backend = meta.get("sharded_backend") if isinstance(meta, dict) else None
    return backend if isinstance(backend, str) else None


def iteration_dir(path: Path) -> Path:
    """The directory holding the distributed checkpoint: PATH itself, or the one the tracker
    names, or the newest ``iter_*`` / ``release``."""
    path = Path(path)
    if (path / METADATA_JSON).is_file():
        return path
    tracked = tracked_iteration(path, hint="copy the complete checkpoint")
    if tracked is not None:
        return tracked
    iters = sorted(p for p in path.iterdir() if p.is_dir() and (p / METADATA_JSON).is_file()
                   and (p.name == "release" or p.name.startswith("iter_")))
    if iters:
        return iters[-1]
    raise MapcError(f"no distributed checkpoint here (no {METADATA_JSON}, no {TRACKER})",
                    where=str(path))


def detect(path: Path) -> bool:
    if not path.is_dir():
        return False
    try:
        return _backend(iteration_dir(path)) is not None
    except (MapcError, OSError, ValueError):
        return False


# --tp/--pp of a torch_dist target are the training run's sizes, which only the layout's
# parameters see (the tensors are global): mapc.api passes them as these parameters.
TOPOLOGY_PARAMS = {"tp": "tp_size", "pp": "pp_size", "ep": "ep_size"}
DATA = "__0_0.distcp"
BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
           "common_backend": "torch", "common_backend_version": 1}
# what Megatron-LM records as content_metadata for a model saved with its default flags
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                    "distrib_optim_sharding_type": "dp_reshardable"}


def _iteration_name(iteration) -> str:
    return f"iter_{iteration:07d}" if isinstance(iteration, int) else "release"


def plan_write(program, facts: SourceFacts, request: WriteRequest) -> WritePlan:
    """The tracker, one iteration directory (the source's iteration, else ``release``) with
    ``metadata.json``, ``common.pt``, ``.metadata`` and one data file, and mapc.json."""
    iteration = facts.training.get("iteration")
    iteration = int(iteration) if isinstance(iteration, (int, np.integer)) else None
    sub = _iteration_name(iteration)
    tensors = planned_tensors(program, facts, request.dtype, ("param",))
    files = [TRACKER, MAPC_JSON] + [f"{sub}/{f}" for f in (METADATA_JSON, COMMON, dcp.METADATA,
                                                           DATA)]
    decisions = {"iteration directory": sub, "data file": DATA,
                 "optimizer": "none (weights only)"}
    return make_plan("torch_dist", files, decisions=decisions, tensors=tensors,
                     detail=(dict(program.target.meta()), iteration),
                     serial="one .distcp data file holds every tensor")


class TorchDistSource(Source):
    format = "torch_dist"
    layout = "torch_dist"
    # a prefix every model key carries (NeMo 2's "module."), stripped on reading
    key_prefix = ""

    def _find_iter_dir(self) -> Path:
        return iteration_dir(self.path)

    def __init__(self, path):
        super().__init__(path)
        if not self.path.is_dir():
            raise MapcError("a torch_dist checkpoint is a directory", where=str(self.path))
        self.iter_dir = self._find_iter_dir()
        backend = _backend(self.iter_dir)
        if backend != "torch_dist":
            raise MapcError(f"this distributed checkpoint uses the {backend!r} backend; mapc "
                            f"reads torch_dist only", where=str(self.iter_dir / METADATA_JSON),
                            hint="re-save it with Megatron-LM --ckpt-format torch_dist")
        common = self._common()
        args = common.get("args")
        self.args = args.to_dict() if isinstance(args, torchfile.Record) else \
            dict(args) if isinstance(args, dict) else {}
        self.iteration = common.get("iteration")
        self.checkpoint_version = common.get("checkpoint_version")
        self.content_metadata = common.get("content_metadata") or {}
        if not isinstance(self.content_metadata, dict):
            self.content_metadata = {}
        if self.content_metadata.get("singleton_local_shards"):
            raise MapcError("this checkpoint was saved with singleton_local_shards (one key "
                            "per layer, fc1 split into weight_w/weight_v), which mapc does not "
                            "read yet", where=str(self.iter_dir / COMMON),
                            hint="re-save it without singleton_local_shards")
        self.format_meta = dict(self.args)
        self.config = self.record.get("config")
        md = dcp.read_metadata(self.iter_dir)
        self.entries = dcp.index_tensors(self.iter_dir, md)
        self.tensors: dict[str, tuple] = {}     # name -> (entry key, slab index or None)
        for key, entry in self.entries.items():
            if key.startswith("optimizer.") or key.startswith("rng_state"):
                continue                         # optimizer state: not read yet
            if not key.startswith(self.key_prefix):
                continue
            name = key[len(self.key_prefix):]
            shape = entry[0]
            if _STACKED.search(name) and shape:
                for k in range(shape[0]):
                    self.tensors[f"{name}[{k}]"] = (key, k)
            else:
                self.tensors[name] = (key, None)
        if any(k.startswith("optimizer.") for k in self.entries):
            kind = self.content_metadata.get("distrib_optim_sharding_type") or "unknown"
            self.warnings.append(f"the distributed optimizer's state ({kind}) is not read yet: "
                                 f"weights only")

    def _common(self) -> dict:
        f = self.iter_dir / COMMON
        if not f.is_file():
            raise MapcError(f"no {COMMON} (megatron-core's non-tensor state: args, "
                            f"iteration)", where=str(self.iter_dir),
                            hint="copy the complete checkpoint")
        obj = torchfile.load(f, PICKLES)
        if not isinstance(obj, dict):
            raise MapcError(f"{COMMON} holds a {type(obj).__name__}, not a dict",
                            where=str(f))
        return obj

    @property
    def saved_topology(self) -> dict:
        """The TP/PP the training run saved at (args); the tensors do not depend on it."""
        return {"tp": int(self.args.get("tensor_model_parallel_size") or 1),
                "pp": int(self.args.get("pipeline_model_parallel_size") or 1)}

    def coords(self):
        return [SINGLE]

    def names(self, coord=SINGLE):
        return list(self.tensors)

    def _get(self, name):
        try:
            key, index = self.tensors[name]
        except KeyError:
            raise MapcError(f"tensor {name} is not in the checkpoint",
                            where=str(self.iter_dir)) from None
        return key, index, self.entries[key]

    def shape(self, name, coord=SINGLE):
        _, index, (shape, _, _) = self._get(name)
        return tuple(shape[1:]) if index is not None else tuple(shape)

    def dtype(self, name, coord=SINGLE):
        return self._get(name)[2][1]

    def read(self, name, coord=SINGLE):
        key, index, entry = self._get(name)
        return dcp.read_entry(key, entry, index)

    def training_state(self):
        out = dict(self.record.get("training") or {})
        if isinstance(self.iteration, int):
            out.setdefault("iteration", self.iteration)
        return out

    def describe_coord(self, coord):
        t = self.saved_topology
        return f"{self.iter_dir.name} (global tensors, saved at tp={t['tp']}, pp={t['pp']})"


Source = TorchDistSource


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------
def _archive(obj=None, array=None) -> bytes:
    """A ``torch.save`` archive of one tensor or of a plain object, as DCP stores each item."""
    buf = io.BytesIO()
    w = torchfile.TorchWriter(DATA, fileobj=buf)
    w.finish(w.add_tensor(np.require(array, requirements="C")) if array is not None else obj)
    return buf.getvalue()


# megatron-core's SequentialMLP shards its local experts under "<prefix>experts.experts." on a
# second global axis (after the layers'); its TopKRouter has no _extra_state
_EXPERTS = re.compile(r"(?:^|\.)experts\.experts\.")
_NO_EXTRA_STATE = re.compile(r"(?:^|\.)router\.weight$")


def _extra_state_keys(fqn: str, shape: tuple) -> list[str]:
    """The ``_extra_state`` ShardedObject keys megatron-core's loader asks for beside a stacked
    ``<module>.weight``: ``<module>._extra_state/shard_{offset}_{global shape}``, one per layer
    (``shard_i_L``) or, for SequentialMLP experts, per layer and expert (``shard_i.e_L.E``)."""
    if not fqn.endswith(".weight") or not _STACKED.search(fqn) or _NO_EXTRA_STATE.search(fqn):
        return []
    module = fqn[:-len(".weight")]
    if _EXPERTS.search(fqn) and len(shape) >= 2:
        return [f"{module}._extra_state/shard_{i}.{e}_{shape[0]}.{shape[1]}"
                for i in range(shape[0]) for e in range(shape[1])]
    return [f"{module}._extra_state/shard_{i}_{shape[0]}" for i in range(shape[0])]


class TorchDistWriter(PlannedWriter):
    """Writes what Megatron-LM's ``--load`` reads for ``--ckpt-format torch_dist``, streaming and
    without torch: the tracker, ``iter_NNNNNNN/`` (``release/`` without an iteration) with
    ``metadata.json``, ``common.pt`` (args, iteration, checkpoint_version, content_metadata) and
    one DCP data file. Every tensor and every slab ``NAME[i]`` of a stacked tensor is appended
    to it as its own chunk the moment it arrives (a slab as the chunk ``[i:i+1, ...]`` of
    ``NAME``), so memory stays at one tensor. Each stacked ``<module>.weight`` gets the
    ``<module>._extra_state/shard_{i}_{L}`` objects megatron-core's loader asks for (megatron-core
    saves ``[None]`` there for its local-spec layers). ``.metadata`` is written at the end."""

    key_prefix = ""     # prepended to every model key (NeMo 2: "module.")

    def __init__(self, tmpdir, program, plan):
        super().__init__(tmpdir, program, plan)
        args, iteration = plan.detail
        self.args = dict(args)
        self.iteration = iteration
        self.sub = self._subdir()
        self.tensors: dict[str, list] = {}       # fqn -> [global shape, dtype, chunks]
        self.objects: dict[str, tuple] = {}
        self.expected: dict[str, tuple] = {}     # physical name -> (fqn, slab index or None)
        self.file = None

    def _subdir(self) -> str:
        return _iteration_name(self.iteration)

    def begin(self, tensors):
        stacked: dict[str, dict] = {}
        pre = self.key_prefix
        for _, name, shape, dtype in tensors:
            m = _SLAB.match(name)
            if m:
                stacked.setdefault(pre + m.group(1), {})[int(m.group(2))] = (tuple(shape), dtype)
                self.expected[name] = (pre + m.group(1), int(m.group(2)))
            else:
                self.tensors[pre + name] = [tuple(shape), dtype, []]
                self.expected[name] = (pre + name, None)
        for fqn, slabs in stacked.items():
            n = len(slabs)
            if sorted(slabs) != list(range(n)) or len(set(slabs.values())) != 1:
                raise MapcError(f"internal: the slabs of {fqn} are not layers 0..{n - 1} of "
                                f"one shape and dtype")
            shape, dtype = slabs[0]
            self.tensors[fqn] = [(n,) + shape, dtype, []]
        (self.dir / self.sub).mkdir(parents=True)
        self.file = open(self.dir / self.sub / DATA, "wb")

    def _append(self, data: bytes) -> tuple[int, int]:
        offset = self.file.tell()
        try:
            self.file.write(data)
        except OSError as e:
            raise MapcError(f"cannot write: {e.strerror}", where=str(self.dir / DATA),
                            hint="free disk space or choose another destination") from None
        return offset, len(data)

    def write(self, coord, name, arr):
        fqn, index = self.expected[name]
        entry = self.tensors[fqn]
        if dtype_name(arr.dtype) != entry[1]:
            raise MapcError(f"internal: {name} arrived as {dtype_name(arr.dtype)}, planned "
                            f"{entry[1]}")
        arr = np.asarray(arr)
        if index is None:
            offsets, chunk = (0,) * arr.ndim, arr
        else:
            offsets, chunk = (index,) + (0,) * arr.ndim, arr[None]
        entry[2].append((offsets, tuple(chunk.shape)) + self._append(_archive(array=chunk)))

    def finish(self, record: dict):
        for fqn, (shape, _, chunks) in self.tensors.items():
            if sum(int(np.prod(z)) for _, z, _, _ in chunks) != int(np.prod(shape)):
                raise MapcError(f"internal: {fqn} was not written completely")
            for key in self._extra_state_keys(fqn, shape):
                self.objects.setdefault(key, self._append(_archive(obj=[None])))
        self.file.close()
        d = self.dir / self.sub
        dcp.write_chunked_metadata(d / dcp.METADATA, {k: tuple(v) for k, v in
                                                      self.tensors.items()},
                                   self.objects, DATA)
        write_json(d / METADATA_JSON, BACKEND)
        w = torchfile.TorchWriter(d / COMMON)
        w.finish(self._common())
        self._finish_root(record)

    def _extra_state_keys(self, fqn: str, shape: tuple) -> list[str]:
        return _extra_state_keys(fqn, shape)

    def _common(self) -> dict:
        args = dict(self.args, ckpt_format="torch_dist",
                    iteration=self.iteration or 0)
        return {"args": torchfile.Namespace(**args), "checkpoint_version": 3.0,
                "iteration": self.iteration or 0, "content_metadata": dict(CONTENT_METADATA)}

    def _finish_root(self, record: dict):
        (self.dir / TRACKER).write_text(str(self.iteration) if self.iteration is not None
                                        else "release")
        write_json(self.dir / MAPC_JSON, record)

    def abort(self):
        if self.file is not None and not self.file.closed:
            self.file.close()


Writer = TorchDistWriter
