"""DeepSpeed ZeRO checkpoints (stages 1, 2 and 3; fp32 and bf16), read with optimizer state.

``latest`` names the tag directory ``global_stepN/`` holding the model states
(``mp_rank_00_model_states.pt``, or per rank ``zero_pp_rank_R_mp_rank_00_model_states.pt`` at
stage 3) and one optimizer file per data-parallel rank (``[bf16_]zero_pp_rank_R_mp_rank_00_
optim_states.pt``). Parameters keep the wrapped module's names (for a transformers model: the
``hf`` layout). Every parameter's fp32 master weights and Adam moments are rebuilt from the flat
per-rank partitions, each read lazily as the slices that hold it (a parameter may straddle
ranks). The partition formulas are in docs/formats/deepspeed.md. No DeepSpeed code is needed
or run: its pickled objects are read as inert records.
"""
from __future__ import annotations

import json
import re
from math import prod
from pathlib import Path

import numpy as np

from mapc.errors import MapcError
from mapc.runtime import torchfile
from mapc.runtime.backends import DTYPES
from mapc.runtime.containers.base import Source

LAYOUT = "hf"
SINGLE = ()

torchfile.register_record_type("deepspeed.runtime.fp16.loss_scaler", "LossScaler")
torchfile.register_record_type("deepspeed.utils.tensor_fragment", "fragment_address")


def _zero_stage(value):
    """ZeroStageEnum is an int enum: its plain value is all a reader needs."""
    return int(value)


torchfile.ALLOWED_GLOBALS.setdefault("deepspeed.runtime.zero.config.ZeroStageEnum", _zero_stage)

_OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def _tag_dir(path: Path) -> Path | None:
    if not path.is_dir():
        return None
    if any(_OPTIM.match(p.name) for p in path.iterdir()):
        return path
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        return path / tag if (path / tag).is_dir() else None
    steps = sorted((p for p in path.glob("global_step*") if p.is_dir()),
                   key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    return steps[-1] if steps and any(_OPTIM.match(p.name) for p in steps[-1].iterdir()) \
        else None


def detect(path: Path) -> bool:
    d = _tag_dir(path)
    return d is not None and any(_OPTIM.match(p.name) for p in d.iterdir())


class _Piece:
    """Elements [start, stop) of one rank's flat tensor."""
    __slots__ = ("ref", "start", "stop")

    def __init__(self, ref, start, stop):
        self.ref, self.start, self.stop = ref, start, stop


class DeepSpeedSource(Source):
    format = "deepspeed"
    layout = LAYOUT

    def __init__(self, path):
        super().__init__(path)
        self.tag_dir = _tag_dir(self.path)
        if self.tag_dir is None:
            raise MapcError("no DeepSpeed checkpoint here (no 'latest' tag or "
                            "zero_pp_rank_*_optim_states.pt)", where=str(self.path))
        optim = {}
        for p in self.tag_dir.iterdir():
            m = _OPTIM.match(p.name)
            if m:
                if int(m.group(3)) != 0:
                    raise MapcError("model-parallel DeepSpeed checkpoints (mp_rank > 0) are not "
                                    "supported yet", where=str(self.tag_dir))
                optim[int(m.group(2))] = p
        self.dp = len(optim)
        if sorted(optim) != list(range(self.dp)):
            raise MapcError(f"optimizer files for data-parallel ranks "
                            f"{sorted(set(range(max(optim) + 1)) - set(optim))} are missing",
                            where=str(self.tag_dir), hint="copy the complete checkpoint")
        model_file = self.tag_dir / "mp_rank_00_model_states.pt"
        if not model_file.is_file():
            model_file = self.tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"
        if not model_file.is_file():
            raise MapcError("no model states file (mp_rank_00_model_states.pt)",
                            where=str(self.tag_dir))
        self.model_states = torchfile.load(model_file)
        if self.model_states.get("dp_world_size", self.dp) != self.dp:
            raise MapcError(f"the checkpoint says dp_world_size="
                            f"{self.model_states['dp_world_size']} but has {self.dp} optimizer "
                            f"files", where=str(self.tag_dir))
        self.optim = [torchfile.load(optim[r])["optimizer_state_dict"] for r in range(self.dp)]
        first = self.optim[0]
        if "fp32_flat_groups" in first:
            self.kind = "stage3"
        elif "zero_stage" in first:
            self.kind = "zero"          # DeepSpeedZeroOptimizer, stages 1/2
        else:
            self.kind = "bf16"          # BF16_Optimizer: fp32 partitions keep their padding
        self.module = dict(self.model_states.get("module") or {})
        self.param_shapes = [dict(g) for g in self.model_states["param_shapes"]]
        self._index()
        self.topology = {}      # the tensors are unsharded (hf layout); dp is ZeRO's own
        self.config = self.record.get("config") or self._config_json()
        self.format_meta = self.config or {}

    # -- where every parameter lives --------------------------------------------------------
    def _index(self):
        self.pieces: dict[str, dict[str, list[_Piece]]] = {}
        self.shapes: dict[str, tuple] = {}
        self.group_of: dict[str, int] = {}
        dp = self.dp
        for g, shapes in enumerate(self.param_shapes):
            numels = [prod(s) for s in shapes.values()]
            if self.kind == "stage3":
                flats = {"master": [o["fp32_flat_groups"][g] for o in self.optim]}
                state = [o["optimizer_state_dict"]["state"][g] for o in self.optim]
            else:
                flats = {"master": [o["single_partition_of_fp32_groups"][g] for o in self.optim]}
                state = [o["base_optimizer_state"]["state"][g] for o in self.optim]
            flats["exp_avg"] = [s["exp_avg"] for s in state]
            flats["exp_avg_sq"] = [s["exp_avg_sq"] for s in state]
            total = sum(numels)
            part = -(-total // (2 * dp)) * (2 * dp) // dp        # stages 1/2: P_g
            off = 0
            for (name, shape), n in zip(shapes.items(), numels):
                self.shapes[name] = tuple(shape)
                self.group_of[name] = g
                slots = {}
                for slot, refs in flats.items():
                    if self.kind == "stage3":   # per-parameter partitions
                        pp = -(-n // dp)
                        slots[slot] = [_Piece(refs[r], off, off + min(pp, n - r * pp))
                                       for r in range(dp) if r * pp < n]
                    else:                       # the group flattened, cut in equal parts
                        slots[slot] = [_Piece(refs[r], max(off, r * part) - r * part,
                                              min(off + n, (r + 1) * part) - r * part)
                                       for r in range(dp)
                                       if max(off, r * part) < min(off + n, (r + 1) * part)]
                self.pieces[name] = slots
                off += -(-n // dp) if self.kind == "stage3" else n
        self._check_lengths()

    def _check_lengths(self):
        for name, slots in self.pieces.items():
            for slot, pieces in slots.items():
                for p in pieces:
                    if p.stop > prod(p.ref.shape):
                        raise MapcError(f"the {slot} partition holding {name} is too short "
                                        f"({prod(p.ref.shape)} elements, needs {p.stop}); the "
                                        f"optimizer files do not match param_shapes",
                                        where=str(self.tag_dir))

    def _config_json(self):
        for d in (self.tag_dir, self.path, self.path.parent):
            f = d / "config.json"
            if f.is_file():
                try:
                    return json.loads(f.read_text())
                except ValueError as e:
                    raise MapcError(f"corrupt config.json: {e}", where=str(f)) from None
        return None

    # -- Source protocol -----------------------------------------------------------------------
    def slots(self):
        return ["param", "master", "exp_avg", "exp_avg_sq"]

    def coords(self):
        return [SINGLE]

    def names(self, coord=SINGLE):
        return list(self.shapes)

    def shape(self, name, coord=SINGLE):
        return self._known(name)

    def dtype(self, name, coord=SINGLE, slot="param"):
        self._known(name)
        if slot == "param" and name in self.module:
            return self.module[name].dtype
        return "float32"

    def _known(self, name):
        try:
            return self.shapes[name]
        except KeyError:
            raise MapcError(f"parameter {name} is not in the checkpoint",
                            where=str(self.tag_dir)) from None

    def read(self, name, coord=SINGLE, slot="param"):
        shape = self._known(name)
        if slot == "param":
            ref = self.module.get(name)
            if ref is not None and tuple(ref.shape) == shape:
                return ref.map()
            # stage 3 keeps only empty placeholders in the module: use the master copy
            master = self.read(name, coord, "master")
            want = ref.dtype if ref is not None else "float32"
            return master.astype(DTYPES[want])
        parts = [np.asarray(p.ref.map()).reshape(-1)[p.start:p.stop] for p in
                 self.pieces[name][slot]]
        flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return np.ascontiguousarray(flat[:prod(shape)]).reshape(shape)

    def training_state(self) -> dict:
        ms = self.model_states
        first = self.optim[0]
        base = first["optimizer_state_dict"] if self.kind == "stage3" \
            else first["base_optimizer_state"]
        groups = []
        for g, pg in enumerate(base["param_groups"]):
            hyper = {k: v for k, v in pg.items() if k != "params"}
            hyper["params"] = list(self.param_shapes[g]) if g < len(self.param_shapes) else []
            groups.append(hyper)
        steps = [float(np.asarray(s["step"].map())) for s in base["state"].values()
                 if "step" in s]
        scaler = first.get("loss_scaler")
        return {
            "iteration": ms.get("global_steps"),
            "global_samples": ms.get("global_samples"),
            "step": steps[0] if steps else None,
            "param_groups": groups,
            "lr_scheduler": ms.get("lr_scheduler"),
            "loss_scale": getattr(scaler, "cur_scale", None) if scaler is not None else None,
            "clip_grad": first.get("clip_grad"),
            "zero_stage": first.get("zero_stage", 1 if self.kind == "bf16" else None),
            "dp_world_size": self.dp,
            "ds_config": ms.get("ds_config"),
        }

    def describe_coord(self, coord):
        return str(self.tag_dir.relative_to(self.path)) if self.tag_dir != self.path \
            else "global"


Source = DeepSpeedSource


def make_writer(tmpdir, program, resolved, options):
    raise MapcError("writing DeepSpeed ZeRO checkpoints is not available yet",
                    hint="convert to hf, megatron, nemo, nxdt, gguf or dcp")
