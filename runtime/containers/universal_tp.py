"""Model-parallel DeepSpeed universal checkpoints (Megatron-DeepSpeed's layouts with tensor and
pipeline parallelism), read and written.

Beside ``zero/`` such a folder holds one ``mp_rank_TT_model_states.pt`` per tensor-parallel
rank, each with that rank's shards of the module (``module``, ``param_shapes``),
``mp_world_size`` and ``universal_checkpoint_info``. Every ``zero/<param>/{fp32,exp_avg,
exp_avg_sq}.pt`` holds the *full* (TP-merged) tensor, as DeepSpeed's ``ds_to_universal`` merges
the ranks' slices, with how to cut it again:

    {"param": T}                                  replicated on every rank (norms)
    {"param": T, "cat_dim": d}                    the ranks' slices concatenated on axis d
    {"param": T, "cat_dim": 0, "param_n_sub_params": 2}
                                                  each slice is [a_r; b_r]: T = [a; b]
    {"param": T, "cat_dim": 0, "vocab_tensor": True}
                                                  vocabulary rows, the padding stripped

DeepSpeed's loader (``deepspeed/checkpoint/universal_checkpoint.py``,
``load_hp_checkpoint_state``) takes rank r's slice from these keys alone, for any target TP.

Which tensor is which comes from the family's spec, never from its name: the tensors are the
spec's ``megatron`` layout (its megatron-core or legacy names, at the checkpoint's TP), and each
one's rule is read off its compiled recipe (where the ``tp`` split sits on its axis, whether a
vocabulary axis is padded). ``universal_checkpoint_info`` is written from the same rules, one
exact pattern per tensor. With pipeline parallelism the tensors are the family's
``megatron_pipe`` layout (DeepSpeed PipelineModule names at global layer positions, one zero/
folder each across stages) and there is one ``mp_rank_MM_model_states.pt`` per (pp, tp) rank,
MM = pp * tp + tp rank. Expert parallelism and ZeRO stage 3 with TP are refused.
docs/formats/deepspeed.md section 13 has the details.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mapc.errors import MapcError

LAYOUT = "megatron"
PIPE_LAYOUT = "megatron_pipe"    # DeepSpeed pipeline names (Megatron-DeepSpeed's GPTModelPipe)
MAX_TP = 4096
UC_VERSION = 0.2          # the universal_checkpoint_info version this layout needs (< 0.4)

# universal_checkpoint_info keys (deepspeed/checkpoint/constants.py)
ROW_PARALLEL = "parameter_with_row_parallelism_patterns"
REPLICATED = "tp_replicated_parameter_patterns"
VOCABULARY = "vocabulary_parameter_patterns"
TWO_SUB_PARAMS = "parameter_with_2_sub_params_cat_dim_0"
TO_AVERAGE = "parameter_to_average_patterns"
SUB_PARAMS = "parameter_with_sub_params"
PIPE_REPLICATED = "pipeline_replicated_parameter_patterns"


def rank_file(t: int) -> str:
    return f"mp_rank_{t:02d}_model_states.pt"


def tp_of(model_states: dict, udir: Path) -> int:
    """The checkpoint's tensor-parallel size: ``mp_world_size`` (1 when absent), checked
    against the mp_rank files present."""
    tp = model_states.get("mp_world_size", 1)
    if isinstance(tp, bool) or not isinstance(tp, int) or not 1 <= tp <= MAX_TP:
        raise MapcError(f"mp_world_size {tp!r} is not a tensor-parallel size",
                        where=str(udir / rank_file(0)), hint="is the checkpoint corrupt?")
    if tp == 1 and (udir / rank_file(1)).is_file():
        raise MapcError(f"{rank_file(1)} is present but {rank_file(0)} says mp_world_size 1",
                        where=str(udir), hint="is the checkpoint mixed from two runs?")
    return tp


def tp_pp_of(model_states: dict, mp: int, where: str) -> tuple[int, int]:
    """(tp, pp) of a checkpoint of ``mp`` model-parallel ranks: DeepSpeed's
    ``checkpoint_parallel_dimensions`` when recorded (a pipeline engine's ``mp_world_size``
    counts every stage's ranks: tp * pp), else (mp, 1)."""
    dims = model_states.get("checkpoint_parallel_dimensions")
    if dims is None:
        return mp, 1
    tp = dims.get("tp_degree") if isinstance(dims, dict) else None
    pp = dims.get("pp_degree") if isinstance(dims, dict) else None
    if not all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= MAX_TP
               for x in (tp, pp)) or tp * pp != mp:
        raise MapcError(f"checkpoint_parallel_dimensions {dims!r} do not describe "
                        f"mp_world_size {mp} (tp_degree * pp_degree)", where=where,
                        hint="is the checkpoint corrupt?")
    return tp, pp


_PIPE_NAME = re.compile(r"^(\d+|tied_modules)\.")


def pipeline_name(name: str) -> bool:
    """Whether ``name`` is a DeepSpeed PipelineModule parameter name (``<position>.<key>``
    or ``tied_modules.<key>``)."""
    return bool(_PIPE_NAME.match(name))


def pipeline_position(name: str) -> int:
    """Where a PipelineModule registers ``name``: its tied modules first (-1), then each
    layer at its position; not a pipeline name: 0 (the order is kept)."""
    m = _PIPE_NAME.match(name)
    if not m:
        return 0
    return -1 if m.group(1) == "tied_modules" else int(m.group(1))


# ---- the rule of one tensor, from its recipe -----------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """How DeepSpeed merges a tensor's TP slices into its universal tensor and cuts it again:
    ``kind`` "replicated", "cat" (on ``dim``), "sub2" (two sub-parameters on axis 0) or
    "vocab" (axis 0, padded: ``rows`` true rows)."""
    kind: str
    dim: int = 0
    rows: int = 0

    def entries(self) -> dict:
        """The keys of the zero/<param>/*.pt dicts besides ``param``."""
        if self.kind == "replicated":
            return {}
        if self.kind == "sub2":
            return {"cat_dim": 0, "param_n_sub_params": 2}
        if self.kind == "vocab":
            return {"cat_dim": 0, "vocab_tensor": True}
        return {"cat_dim": self.dim}

    def full_shape(self, shape, tp: int) -> tuple:
        """The universal tensor's shape, from one rank's slice ``shape``."""
        shape = tuple(int(d) for d in shape)
        if self.kind == "replicated":
            return shape
        if self.kind == "vocab":
            return (self.rows,) + shape[1:]
        d = self.dim if self.kind == "cat" else 0
        return shape[:d] + (shape[d] * tp,) + shape[d + 1:]

    def places(self, shape, t: int, tp: int) -> list[tuple[int, int, int, int, int]]:
        """Where rank ``t``'s slice (of ``shape``) lies in the universal tensor, as
        :meth:`merge` puts it there, so that each slice can be written into its place as it
        arrives, no rank's slice and no merged tensor held. Each entry ``(lo, hi, at, seg,
        stride)``: rows ``lo..hi`` of the slice's axis 0, row-major, cut into runs of ``seg``
        elements, land run after run ``stride`` elements apart from element ``at`` of the
        universal tensor (``stride == seg``: one contiguous range)."""
        shape = tuple(int(d) for d in shape) or (1,)
        s0, inner = shape[0], math.prod(shape[1:])
        if self.kind == "replicated":
            return [(0, s0, 0, inner, inner)] if t == 0 else []
        if self.kind == "vocab":
            keep = max(0, min(s0, self.rows - t * s0))          # the padding is not kept
            return [(0, keep, t * s0 * inner, inner, inner)] if keep else []
        if self.kind == "sub2":
            h = s0 // 2
            return [(0, h, t * h * inner, inner, inner),
                    (h, s0, (tp + t) * h * inner, inner, inner)]
        if self.dim == 0:
            return [(0, s0, t * s0 * inner, inner, inner)]
        seg = math.prod(shape[self.dim:])
        return [(0, s0, t * seg, seg, tp * seg)]

    def merge(self, slices: list):
        """ds_to_universal's merge of the ranks' slices (``merge_tp_slices``): the reference
        that :meth:`places` follows (the writer never holds the slices to call it)."""
        if self.kind == "replicated":
            return slices[0]
        if self.kind == "sub2":
            halves = [np.split(s, 2, axis=0) for s in slices]
            return np.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=0)
        full = np.concatenate(slices, axis=self.dim)
        return full[:self.rows] if self.kind == "vocab" else full


def rule_of(inst, name: str) -> Rule:
    """The DeepSpeed universal rule of one target tensor of a TP layout, read off its recipe:
    no ``tp`` factor -> replicated; the ``tp`` factor outermost on axis d -> cat on d; behind
    a factor of 2 on axis 0 (``[a b] n split n over tp``) -> two sub-parameters; a padded
    single-member axis 0 -> vocabulary rows. Anything else has no universal description."""
    r = inst.recipe
    mesh = [k for k, f in enumerate(r.factors) if f.mesh]
    tpk = [k for k in mesh if r.factors[k].axis == "tp"]
    why = None
    if len(mesh) != len(tpk) or len(tpk) > 1 or inst.summed or inst.copy:
        why = "it is split over more than tp, summed or a copy"
    pads = [p for m in r.members for p in m.pads]
    if not tpk and why is None:
        if pads:
            why = "it is padded but not split over tp"
        else:
            return Rule("replicated")
    if why is None:
        k = tpk[0]
        axis = next(a for a, ax in enumerate(r.axes) if k in ax)
        outer = math.prod(r.factors[j].size for j in r.axes[axis][:r.axes[axis].index(k)]
                          if not r.factors[j].mesh)
        if pads:
            m = r.members[0]
            if len(r.members) == 1 and axis == 0 and outer == 1 and \
                    all(a == 0 for a, _ in m.pads) and m.perm == tuple(range(len(m.perm))):
                return Rule("vocab", 0, m.pre[0])
            why = "it is padded other than on its vocabulary rows"
        elif outer == 1:
            return Rule("cat", axis)
        elif outer == 2 and axis == 0:
            return Rule("sub2")
        else:
            why = f"its tp split sits inside {outer} blocks of axis {axis}"
    raise MapcError(f"{name} (layout {LAYOUT}) cannot be described "
                    f"in a universal checkpoint: {why}",
                    hint="convert to megatron or torch_dist for this tensor-parallel layout, or "
                         "to universal without --tp")


def checkpoint_info(rules: dict, vocab: int | None, pipeline_replicated=()) -> dict:
    """``universal_checkpoint_info`` for ``rules`` (name -> Rule): one exact pattern per
    tensor, in the lists ds_to_universal's merge reads; ``pipeline_replicated`` names the
    tensors held by more than one pipeline stage (a tied embedding)."""
    info = {ROW_PARALLEL: [], REPLICATED: [], VOCABULARY: [], TWO_SUB_PARAMS: [],
            TO_AVERAGE: [],
            PIPE_REPLICATED: ["^" + re.escape(n) + "$" for n in pipeline_replicated],
            "universal_checkpoint_version": UC_VERSION}
    for name, rule in rules.items():
        pattern = "^" + re.escape(name) + "$"
        if rule.kind == "replicated":
            info[REPLICATED].append(pattern)
        elif rule.kind == "sub2":
            info[TWO_SUB_PARAMS].append(pattern)
        elif rule.kind == "vocab":
            info[VOCABULARY].append(pattern)
        elif rule.dim == 1:
            info[ROW_PARALLEL].append(pattern)
        elif rule.dim != 0:
            raise MapcError(f"{name} is split over tp on axis {rule.dim}, which DeepSpeed's "
                            "universal merge cannot express (axis 0 or 1 only)")
    if vocab is not None:
        info["original_vocab_size"] = int(vocab)
    return info


# ---- cutting a universal tensor for one rank (DeepSpeed's load_hp_checkpoint_state) --------------
def tp_slice(full: np.ndarray, obj: dict, shape: tuple, rank: int, tp: int, where: str):
    """Rank ``rank``'s slice of shape ``shape`` of the universal tensor ``full``, cut as
    DeepSpeed's loader cuts it from the file's own keys (``obj``): a view of ``full`` where
    it can be (``full`` may be a mapping of the file: only the slice's pages are read)."""
    if tuple(full.shape) == tuple(shape):
        return full
    if obj.get("sub_param_shape") is not None:
        raise MapcError("sub_param_shape (uneven sub-parameters) is not read yet", where=where,
                        hint="convert it with DeepSpeed's own tools, or report the layout")
    dim = obj.get("cat_dim", 0)
    n = obj.get("param_n_sub_params", 1)
    if not isinstance(dim, int) or not 0 <= dim < full.ndim or not isinstance(n, int) or n < 1:
        raise MapcError(f"cat_dim {dim!r} / param_n_sub_params {n!r} do not fit a tensor of "
                        f"shape {list(full.shape)}", where=where,
                        hint="the universal checkpoint is corrupt; convert it again")
    if obj.get("vocab_tensor") and len(shape) >= 1:
        rows = shape[0] * tp
        if rows < full.shape[0]:
            raise MapcError(f"vocabulary tensor has {full.shape[0]} rows, more than {tp} "
                            f"ranks of {shape[0]}", where=where)
        if rows > full.shape[0] and dim == 0 and n == 1 and full.ndim == len(shape):
            # the rank's rows, its share of the padding zeros: the tensor is not padded whole
            out = np.zeros(shape, full.dtype)
            part = full[rank * shape[0]:(rank + 1) * shape[0]]
            if tuple(part.shape[1:]) == tuple(shape[1:]):
                out[:len(part)] = part
                return out
        if rows > full.shape[0]:
            full = np.concatenate([full, np.zeros((rows - full.shape[0],) + full.shape[1:],
                                                  full.dtype)])
    if full.shape[dim] % (n * tp):
        raise MapcError(f"axis {dim} of size {full.shape[dim]} does not split into {n} x {tp} "
                        f"equal parts", where=where,
                        hint="the checkpoint's mp_world_size or its metadata is wrong")
    parts = [np.split(p, tp, axis=dim)[rank] for p in np.split(full, n, axis=dim)]
    out = parts[0] if n == 1 else np.concatenate(parts, axis=dim)
    if tuple(out.shape) != tuple(shape):
        raise MapcError(f"rank {rank}'s slice has shape {list(out.shape)}, its model states say "
                        f"{list(shape)}", where=where,
                        hint="universal_checkpoint_info does not match the model; is the "
                             "checkpoint corrupt?")
    return out


def check_info(info, where: str) -> dict:
    """``universal_checkpoint_info``, checked: a dict of the lists DeepSpeed reads, each
    pattern a compilable regular expression."""
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise MapcError("universal_checkpoint_info is not a dict", where=where,
                        hint="is the checkpoint corrupt?")
    for key, value in info.items():
        if key in (ROW_PARALLEL, REPLICATED, VOCABULARY, TWO_SUB_PARAMS, TO_AVERAGE):
            if not isinstance(value, (list, tuple)) or \
                    not all(isinstance(p, str) for p in value):
                raise MapcError(f"universal_checkpoint_info[{key!r}] is not a list of patterns",
                                where=where, hint="is the checkpoint corrupt?")
            for p in value:
                try:
                    re.compile(p)
                except re.error as e:
                    raise MapcError(f"universal_checkpoint_info[{key!r}] pattern {p!r} is not "
                                    f"a regular expression ({e})", where=where) from None
    return dict(info)


def check_file(info: dict, name: str, obj: dict, where: str) -> None:
    """Refuse a ``zero/<name>/*.pt`` whose keys contradict what ``universal_checkpoint_info``
    says of ``name`` (row-parallel but not cut on axis 1, two sub-parameters but not
    ``param_n_sub_params`` 2, vocabulary but no ``vocab_tensor``, replicated but cut), or a
    name two categories claim. A checkpoint whose info has no patterns is read by its files'
    keys alone, as DeepSpeed's loader does."""
    said = [key for key in (ROW_PARALLEL, REPLICATED, VOCABULARY, TWO_SUB_PARAMS)
            if any(re.match(p, name) for p in info.get(key) or ())]
    if not said:
        return
    if len(said) > 1:
        raise MapcError(f"universal_checkpoint_info puts {name} in both {said[0]} and "
                        f"{said[1]}", where=where, hint="fix the patterns in the model states' "
                        "universal_checkpoint_info (one category per parameter)")
    cat, n = obj.get("cat_dim"), obj.get("param_n_sub_params", 1)
    ok = {ROW_PARALLEL: cat == 1 and n == 1,
          REPLICATED: cat is None,
          VOCABULARY: bool(obj.get("vocab_tensor")) and cat in (None, 0),
          TWO_SUB_PARAMS: cat in (None, 0) and n == 2}[said[0]]
    if not ok:
        raise MapcError(f"universal_checkpoint_info lists {name} in {said[0]}, but the file has "
                        f"cat_dim={cat!r}, param_n_sub_params={n!r}, "
                        f"vocab_tensor={obj.get('vocab_tensor')!r}", where=where,
                        hint="the checkpoint's metadata disagree; convert it again from its "
                             "source (ds_to_universal or mapc)")
