"""GPT-NeoX / DeepSpeed pipeline checkpoints (``PipelineModule`` saved by ``PipelineEngine``).

``latest`` names the tag directory ``global_stepN/``, which holds

* ``layer_{p:02d}-model_{t:02d}-model_states.pt``: the state dict of pipeline position ``p``
  (a plain ``{key: tensor}``) on tensor-parallel rank ``t``. Positions are global: the pipeline
  size decides only which stage saves which file, and layers without parameters have no file.
* ``mp_rank_{m:02d}_model_states.pt``: one per (pipeline stage, tp rank), ``m = stage * tp +
  t`` (DeepSpeed's model-parallel rank within a data-parallel replica), holding ``module:
  None``, ``global_steps``, ``dp_world_size``, ``mp_world_size`` (tp * pp), ``ds_config``,
  ``checkpoint_parallel_dimensions`` and, from NeoX's client state, ``iteration`` and
  ``args`` (a dict of a few sizes: ARGS_KEYS).
* ``zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt``: ZeRO 1/2 optimizer state per
  (data-parallel rank, model-parallel rank), read as the optimizer slots (fp32 master weights,
  Adam moments) with the ``deepspeed`` container's partition arithmetic; not written yet.

A tensor's physical name is DeepSpeed's ``PipelineModule`` state-dict key,
``"{position}.{key}"``: the spec's ``neox`` layouts say which position holds what. The reader
presents every layer file of tp rank ``t`` at mesh coordinate (tp=t, pp=0), that is it reads
any checkpoint as pipeline size 1 (the files do not depend on it); the writer takes ``--pp``
for the ``mp_rank`` files and the config it writes. Nothing is unpickled beyond inert records.
"""
from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path

from mapc.errors import MapcError
from mapc.runtime import torchfile
from mapc.runtime.containers.base import (MAPC_JSON, RefSource, Writer, read_record,
                                          write_json)

LAYOUT = "neox"
LATEST = "latest"
_LAYER = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
_MP = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")

# The "args" dict NeoX's save_ds_checkpoint stores in every mp_rank file (client state).
ARGS_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
             "make_vocab_size_divisible_by", "padded_vocab_size", "tokenizer_type",
             "model_parallel_size", "pipe_parallel_size")


def layer_file(position: int, tp_rank: int) -> str:
    return f"layer_{position:02d}-model_{tp_rank:02d}-model_states.pt"


def mp_file(stage: int, tp_rank: int, tp: int) -> str:
    return f"mp_rank_{stage * tp + tp_rank:02d}_model_states.pt"


def _tag_dir(path: Path) -> Path | None:
    if not path.is_dir():
        return None
    if any(_LAYER.match(p.name) for p in path.iterdir()):
        return path
    latest = path / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        d = path / tag
        if not d.is_dir():
            raise MapcError(f"'{LATEST}' names {tag}, which does not exist", where=str(path))
        return d
    steps = sorted((p for p in path.glob("global_step*") if p.is_dir()),
                   key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    return steps[-1] if steps else None


def detect(path: Path) -> bool:
    try:
        d = _tag_dir(path)
    except MapcError:
        return False
    return d is not None and any(_LAYER.match(p.name) for p in d.iterdir())


def _plain(obj) -> dict:
    """An args record (argparse Namespace, NeoXArgs) or dict as a plain dict."""
    if obj is None:
        return {}
    try:
        return {str(k).replace("-", "_"): v for k, v in dict(obj).items()}
    except (TypeError, ValueError):
        return {}


class NeoxSource(RefSource):
    format = "neox"
    layout = LAYOUT

    def __init__(self, path):
        super().__init__(path)
        self.tag_dir = _tag_dir(self.path)
        if self.tag_dir is None or not any(_LAYER.match(p.name) for p in
                                           self.tag_dir.iterdir()):
            raise MapcError("no NeoX / DeepSpeed pipeline checkpoint here (no "
                            "layer_XX-model_TT-model_states.pt files)", where=str(self.path))
        if not self.record and self.tag_dir == self.path:   # pointed at global_stepN/
            self.record = read_record(self.path.parent)
        layers: dict[int, dict[int, Path]] = {}
        mp: dict[int, Path] = {}
        for p in sorted(self.tag_dir.iterdir()):
            m = _LAYER.match(p.name)
            if m:
                layers.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
            m = _MP.match(p.name)
            if m:
                mp[int(m.group(1))] = p
        self.tp = max(layers) + 1
        positions = sorted({i for files in layers.values() for i in files})
        missing = [layer_file(i, t) for t in range(self.tp) for i in positions
                   if i not in layers.get(t, {})]
        if missing:
            raise MapcError(f"missing layer files: {', '.join(missing[:4])}"
                            + (" ..." if len(missing) > 4 else ""), where=str(self.tag_dir),
                            hint="copy the complete checkpoint (every tensor-parallel rank "
                                 "saves every layer)")
        self.layer_files = layers
        self.positions = positions
        self.mp_files = mp
        self.model_states = torchfile.load(mp[0]) if 0 in mp else {}
        if not isinstance(self.model_states, dict):
            raise MapcError("not a DeepSpeed model-states file", where=str(mp[0]))
        dims = _plain(self.model_states.get("checkpoint_parallel_dimensions"))
        mp_world = self.model_states.get("mp_world_size") or len(mp) or self.tp
        self.pipeline_stages = int(dims.get("pp_degree") or max(1, mp_world // self.tp))
        self.topology = {"tp": self.tp, "pp": 1}
        self._coords = [(("tp", t), ("pp", 0)) for t in range(self.tp)]
        self._loaded: dict = {}
        self._views = self._optimizer_views()
        if self._views:
            weights = {(t, n) for t in range(self.tp) for n in self.names(self._coords[t])}
            uncovered = weights - {(t, n) for t, v in self._views.items() for n in v}
            if uncovered:   # e.g. tied modules, which param_shapes names tied_modules.*
                self.warnings.append(f"the optimizer state does not cover "
                                     f"{sorted(uncovered)[0][1]}; only weights are read")
                self._views = {}
        self.config = self.record.get("config")
        self.format_meta = self._format_meta()

    # -- optimizer state: DeepSpeed ZeRO 1/2 partitions, one set per (stage, tp rank) ----------
    def _optimizer_views(self) -> dict:
        """tp rank -> {name: partition view} from the ``zero_pp_rank_D_mp_rank_MM`` files.

        Each model-parallel rank MM (= stage * tp + tp rank) has its own ZeRO partitions over
        the parameters its stage holds, in the order of its ``param_shapes``, whose names are
        the PipelineModule keys this reader presents. The partition arithmetic is the
        ``deepspeed`` container's. Empty when any rank lacks optimizer files."""
        from mapc.runtime.containers.deepspeed import DeepSpeedSource
        files: dict[int, dict[int, Path]] = {}
        for p in self.tag_dir.iterdir():
            m = _OPTIM.match(p.name)
            if m:
                files.setdefault(int(m.group(3)), {})[int(m.group(2))] = p
        if not files or sorted(files) != sorted(self.mp_files):
            return {}
        views: dict[int, dict] = {}
        for mp, by_dp in sorted(files.items()):
            dp = len(by_dp)
            if sorted(by_dp) != list(range(dp)):
                raise MapcError(f"optimizer files of mp_rank {mp:02d} for data-parallel ranks "
                                f"{sorted(set(range(max(by_dp) + 1)) - set(by_dp))} are missing",
                                where=str(self.tag_dir), hint="copy the complete checkpoint")
            states = torchfile.load(self.mp_files[mp])
            if not states.get("param_shapes"):
                return {}
            v = DeepSpeedSource.__new__(DeepSpeedSource)
            v.tag_dir, v.dp, v.model_states, v.module = self.tag_dir, dp, states, {}
            v.param_shapes = [dict(g) for g in states["param_shapes"]]
            v.optim = [torchfile.load(by_dp[r])["optimizer_state_dict"] for r in range(dp)]
            v.kind = "stage3" if "fp32_flat_groups" in v.optim[0] else \
                "zero" if "zero_stage" in v.optim[0] else "bf16"
            v._index()
            for name in v.shapes:
                views.setdefault(mp % self.tp, {})[name] = v
        return views

    def slots(self):
        return ["param", "master", "exp_avg", "exp_avg_sq"] if self._views else ["param"]

    def dtype(self, name, coord, slot="param"):
        return super().dtype(name, coord) if slot == "param" else "float32"

    def read(self, name, coord, slot="param"):
        if slot == "param":
            return super().read(name, coord)
        return self._views[dict(coord).get("tp", 0)][name].read(name, slot=slot)

    def _format_meta(self) -> dict:
        if self.record.get("meta"):
            return dict(self.record["meta"])
        meta = _plain(self.model_states.get("args"))
        cfg_dir = self.tag_dir.parent / "configs"
        if cfg_dir.is_dir():
            try:
                import yaml
            except ImportError:   # the YAML is optional metadata
                yaml = None
            for f in sorted(cfg_dir.glob("*.yml")) + sorted(cfg_dir.glob("*.yaml")):
                try:
                    text = f.read_text()
                    data = yaml.safe_load(text) if yaml else json.loads(text)
                except (ValueError, OSError, Exception):   # noqa: BLE001 - metadata only
                    continue
                if isinstance(data, dict):
                    meta.update(_plain(data))
        return meta

    def _state(self, key) -> dict:
        if key not in self._loaded:
            f = self.layer_files[key[0]][key[1]]
            obj = torchfile.load(f)
            if not isinstance(obj, dict):
                raise MapcError("a layer file does not hold a state dict", where=str(f))
            self._loaded[key] = {k: v for k, v in obj.items()
                                 if isinstance(v, torchfile.TensorRef)}
        return self._loaded[key]

    def coords(self):
        return list(self._coords)

    def names(self, coord):
        t = dict(coord).get("tp", 0)
        return [f"{i}.{k}" for i in self.positions for k in self._state((t, i))]

    def _ref(self, name, coord):
        t = dict(coord).get("tp", 0)
        head, _, key = name.partition(".")
        try:
            return self._state((t, int(head)))[key]
        except (KeyError, ValueError):
            raise MapcError(f"tensor {name} is not in the checkpoint",
                            where=str(self.tag_dir / layer_file(int(head) if head.isdigit()
                                                                else 0, t))) from None

    def describe_coord(self, coord):
        return f"{self.tag_dir.name}/layer_*-model_{dict(coord).get('tp', 0):02d}-*"

    def training_state(self) -> dict:
        s = self.model_states
        if not s:
            return {}
        it = s.get("iteration", s.get("global_steps"))
        out = {"iteration": it, "global_samples": s.get("global_samples"),
               "dp_world_size": s.get("dp_world_size"), "ds_config": s.get("ds_config"),
               "pp_world_size": self.pipeline_stages}
        views = list({id(v): v for v in self._views.get(0, {}).values()}.values())
        if views:   # every stage's optimizer: its hyper-parameters and its parameters' names
            first = views[0].training_state()
            for g, group in enumerate(first["param_groups"]):
                group["params"] = [n for v in views for n in
                                   (v.param_shapes[g] if g < len(v.param_shapes) else [])]
            out.update({k: first[k] for k in ("step", "param_groups", "lr_scheduler",
                                              "loss_scale", "clip_grad", "zero_stage")})
            out["iteration"] = it
        return out


Source = NeoxSource


def _allow_open_files(n: int) -> None:
    """Units arrive tensor by tensor across layers, so every layer file may be open at once
    (positions x tp ranks): raise the soft limit on open files up to the hard one if needed."""
    try:
        import resource
    except ImportError:   # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or n <= soft:
        return
    if hard != resource.RLIM_INFINITY and n > hard:
        raise MapcError(f"writing needs {n} open files (one per layer file) but the limit is "
                        f"{hard}", hint="raise it (ulimit -Hn) or convert with a smaller --tp")
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


class NeoxWriter(Writer):
    """Layer files by (position, tp rank), streamed: a file is finished as soon as its last
    tensor arrives, so only the files of the units in flight are open."""

    def __init__(self, tmpdir, topology: dict, meta: dict, dp: int | None, dst: str | None):
        super().__init__(tmpdir)
        self.tp, self.pp = topology.get("tp", 1), topology.get("pp", 1)
        self.meta = meta
        self.dp = dp or 1
        self.dst = dst
        self.expected: dict[tuple, list[str]] = {}
        self.open: dict[tuple, tuple] = {}
        self.tag = None

    def begin(self, tensors):
        for coord, name, shape, dt in tensors:
            head, _, key = name.partition(".")
            if not head.isdigit() or not key:
                raise MapcError(f"internal: {name!r} is not a pipeline state-dict name "
                                "('<position>.<key>')")
            file = (int(head), dict(coord).get("tp", 0))
            self.expected.setdefault(file, []).append(key)
        _allow_open_files(len(self.expected) + 64)

    def _dir(self) -> Path:
        return self.dir / "global_step_pending"

    def write(self, coord, name, arr):
        head, _, key = name.partition(".")
        file = (int(head), dict(coord).get("tp", 0))
        if file not in self.open:
            d = self._dir()
            d.mkdir(exist_ok=True)
            self.open[file] = (torchfile.TorchWriter(d / layer_file(*file)), {})
        w, values = self.open[file]
        values[key] = w.add_tensor(arr)
        if len(values) == len(self.expected[file]):
            w.finish(OrderedDict((k, values[k]) for k in self.expected[file]))
            self.open[file] = (None, values)

    def finish(self, record: dict):
        training = record.get("training") or {}
        iteration = int(training.get("iteration") or 0)
        self.tag = f"global_step{iteration}"
        d = self._dir()
        d.mkdir(exist_ok=True)
        unfinished = [layer_file(*f) for f, (w, _) in self.open.items() if w is not None]
        if unfinished or len(self.open) != len(self.expected):
            raise MapcError(f"internal: layer files left incomplete: {unfinished[:3]}")
        ds_config = training.get("ds_config") or {}
        for stage in range(self.pp):
            for t in range(self.tp):
                state = {
                    "module": None, "buffer_names": [], "optimizer": None,
                    "param_shapes": None, "frozen_param_shapes": None, "shared_params": None,
                    "frozen_param_fragments": None, "lr_scheduler": None,
                    "data_sampler": None, "random_ltd": None, "skipped_steps": 0,
                    "global_steps": iteration,
                    "global_samples": int(training.get("global_samples") or 0),
                    "dp_world_size": self.dp, "mp_world_size": self.tp * self.pp,
                    "checkpoint_parallel_dimensions": {"pp_degree": self.pp,
                                                       "tp_degree": self.tp},
                    "ds_config": ds_config, "ds_version": "mapc",
                    "iteration": iteration,
                    "args": {k: v for k, v in self._args().items() if k in ARGS_KEYS},
                }
                w = torchfile.TorchWriter(d / mp_file(stage, t, self.tp))
                w.finish(state)
        d.rename(self.dir / self.tag)
        (self.dir / LATEST).write_text(self.tag)
        configs = self.dir / "configs"
        configs.mkdir()
        # JSON is valid YAML: NeoX reads this with its YAML loader.
        (configs / "mapc_neox.yml").write_text(json.dumps(self._args(), indent=2) + "\n")
        write_json(self.dir / MAPC_JSON, dict(record, meta=self.meta))

    def _args(self) -> dict:
        args = dict(self.meta)
        args.update(model_parallel_size=self.tp, pipe_parallel_size=self.pp,
                    # the checkpoint carries no optimizer state or RNG states (yet)
                    no_load_optim=True, no_load_rng=True)
        if self.dst:
            args.update(load=str(Path(self.dst).absolute()), save=str(Path(self.dst).absolute()))
        return args

    def abort(self):
        for w, _ in self.open.values():
            if w is not None:
                w.abort()


def make_writer(tmpdir, program, resolved, options):
    return NeoxWriter(tmpdir, program.target.mesh, program.target.meta(), options.get("dp"),
                      options.get("dst"))
