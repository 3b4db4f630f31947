"""NeMo 2 checkpoints: a directory with ``weights/`` and ``context/``.

``weights/`` is a megatron-core distributed checkpoint (``torch_dist`` backend: ``metadata.json``,
``.metadata``, ``__R_K.distcp``, ``common.pt``) of the model inside NeMo's ``MegatronParallel``,
whose ``sharded_state_dict`` prefixes every model key with ``module.``
(``module.decoder.layers.self_attention.linear_qkv.weight``); optimizer state, when saved, sits
beside it under ``optimizer.``; ``common.pt`` holds Lightning's non-tensor state and the
``content_metadata``. The tensors are otherwise exactly the ``torch_dist`` layout's, which this
container reuses (runtime/containers/torch_dist.py) with the prefix added and stripped.

Optimizer state: NeMo's ``MegatronStrategy.save_checkpoint`` hands ``dist_checkpointing.save``
Lightning's checkpoint dict with ``sharded_state_dict`` (the model, ``module.`` keys) and
``optimizer``: a one-element list holding megatron-core's
``DistributedOptimizer.sharded_state_dict`` of the model's sharded dict (its ``_extra_state``
entries dropped), with the content metadata
``{"distrib_optim_sharding_type": ...}`` NeMo's ``sharded_state_dict_metadata`` gives. So the
optimizer's tensors and objects have megatron-core's keys unchanged
(``optimizer.distributed.dp_group_idx_I...``, or ``optimizer.state.<slot>.module.<model key>``),
and ``common.pt`` holds ``optimizer: [{"param_state_sharding_type": ...}]`` beside Lightning's
``epoch``, ``global_step``, ``loops``, ``lr_schedulers``, ``callbacks``, ``optimizer_states: {}``
and ``state_dict: {}``. Reading unwraps the list and takes ``global_step`` as the iteration,
then reads the state as torch_dist's; writing wraps it back.

``context/`` holds the model's configuration: ``model.yaml`` (NeMo's fiddle config rendered in
Hydra syntax with every default: ``_target_`` the model class, ``config`` its ``GPTConfig``,
whose fields are megatron-core ``TransformerConfig`` names; callables and dtypes as
``{_target_: ..., _call_: false}``) and ``io.json`` (the same config serialized by fiddle, with
only the arguments given, which NeMo's ``io.load_context`` reads), plus tokenizer files. Reading
takes the config from ``model.yaml``'s ``config`` and renames the few keys that differ from
Megatron-LM's arguments (:data:`FROM_NEMO`), which the spec's ``torch_dist`` layout reads; a
``vocab_size`` equal to the embedding's rows is unpadded (NeMo builds the embedding with it).
Writing produces ``weights/``, ``context/model.yaml`` and ``context/io.json`` (the
family-neutral ``nemo.collections.llm.gpt.model.base.GPTModel`` / ``GPTConfig`` with every
field, :func:`io_json`) and ``mapc.json``; the tokenizer is not written. Checked against the real
NeMo 2.7.3 in tests/test_nemo_real.py.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from mapc.compiler.plan import MAX_MESH
from mapc.errors import MapcError
from mapc.runtime.containers import torch_dist
from mapc.runtime.containers.base import MAPC_JSON, write_json

LAYOUT = "torch_dist"
WEIGHTS = "weights"
CONTEXT = "context"
MODEL_YAML = "model.yaml"
IO_JSON = "io.json"
PREFIX = "module."
# NeMo's strategy copies its virtual pipeline size into the model's config (a
# ModelParallelConfig field) and MegatronStrategy takes it under the same name
VPP_KEY = "virtual_pipeline_model_parallel_size"
MAX_YAML = 16 << 20
TOPOLOGY_PARAMS = torch_dist.TOPOLOGY_PARAMS
MODEL_TARGET = "nemo.collections.llm.gpt.model.base.GPTModel"
CONFIG_TARGET = "nemo.collections.llm.gpt.model.base.GPTConfig"
STRATEGY_TARGET = "nemo.lightning.pytorch.strategies.megatron_strategy.MegatronStrategy"
TRAINER_TARGET = "nemo.lightning.pytorch.trainer.Trainer"
CONTEXT_TARGET = "nemo.lightning.io.pl.TrainerContext"
ACTIVATION = "torch.nn.functional.silu"
# NeMo 2 builds its GPT models with megatron-core's Transformer Engine spec
# and a vocabulary unpadded (round_up(vocab, tp)): NeMo builds the embedding with the config's
# vocab_size as it is, which its HF importers set to the tokenizer's size
LAYOUT_DEFAULTS = {"naming": "te", "vocab_multiple": 1}
# what NeMo 2 records as content_metadata for a model without the distributed optimizer
# (MegatronStrategy.sharded_state_dict_metadata)
CONTENT_METADATA: dict = {}
# Lightning's entries of common.pt that mapc carries from a NeMo 2 source to a NeMo 2 output
# (plain data only; callbacks name the old run's files and are not carried)
LIGHTNING_KEYS = ("epoch", "global_step", "pytorch-lightning_version", "loops", "lr_schedulers")

# NeMo 2 (megatron-core TransformerConfig) key -> (Megatron-LM argument, NeMo -> Megatron);
# keys not listed have the same name in both.
FROM_NEMO = {
    "layernorm_epsilon": ("norm_epsilon", lambda v: v),
    "share_embeddings_and_output_weights": ("untie_embeddings_and_output_weights",
                                            lambda v: not v),
    "gated_linear_unit": ("swiglu", bool),
    "num_moe_experts": ("num_experts", lambda v: v),
}
# Megatron-LM argument -> NeMo 2 key (the inverse), for writing
TO_NEMO = {"norm_epsilon": ("layernorm_epsilon", lambda v: v),
           "untie_embeddings_and_output_weights": ("share_embeddings_and_output_weights",
                                                   lambda v: not v),
           "swiglu": ("gated_linear_unit", bool),
           "num_experts": ("num_moe_experts", lambda v: v)}
# Megatron-LM arguments that are no TransformerConfig field (derived by NeMo or the tokenizer)
NOT_IN_CONFIG = {"group_query_attention", "padded_vocab_size", "max_position_embeddings",
                 "add_position_embedding", "swiglu"}


def detect(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS / torch_dist.METADATA_JSON).is_file() and \
        (path / CONTEXT).is_dir()


def read_model_yaml(path: Path) -> dict | None:
    """``context/model.yaml`` as a dict (its top level: ``_target_`` and ``config``), or None
    when there is none."""
    import yaml     # imported when a NeMo 2 checkpoint is read, not to detect one
    f = path / CONTEXT / MODEL_YAML
    if not f.is_file():
        return None
    if f.stat().st_size > MAX_YAML:
        raise MapcError(f"{MODEL_YAML} is larger than {MAX_YAML >> 20} MiB", where=str(f))
    try:
        obj = yaml.safe_load(f.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise MapcError(f"cannot parse {MODEL_YAML}: {e}".splitlines()[0], where=str(f),
                        hint="restore the file from the checkpoint, or pass --config") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("config"), dict):
        raise MapcError(f"{MODEL_YAML} has no 'config' mapping (NeMo 2 writes the model's "
                        f"GPTConfig there)", where=str(f), hint="pass --config")
    return obj


def megatron_view(config: dict) -> dict:
    """The Megatron-LM arguments a NeMo 2 ``GPTConfig`` states."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):       # callables, dtypes, enums: {_target_: ...}
            continue
        arg, conv = FROM_NEMO.get(key, (key, lambda v: v))
        out[arg] = conv(value) if value is not None else None
    if out.get("seq_length") is not None:
        out.setdefault("max_position_embeddings", out["seq_length"])
    if out.get("num_query_groups") is None and out.get("num_attention_heads") is not None:
        out["num_query_groups"] = out["num_attention_heads"]
    return out


class Nemo2Source(torch_dist.TorchDistSource):
    format = "nemo2"
    layout = "torch_dist"
    key_prefix = PREFIX
    # earlier NeMo 2 releases' default, fully_sharded_model_space, is what megatron-core
    # 0.16.1 cannot save; NeMo 2.7.3 saves dp_reshardable (ckpt_optim_fully_reshardable: fully)
    RESAVE_HINT = ("re-save it with NeMo 2.7.3's MegatronStrategy (dp_reshardable by default, "
                   "or ckpt_optim_fully_reshardable=True), or without the optimizer "
                   "(ckpt_save_optimizer=False)")

    def _find_iter_dir(self) -> Path:
        d = self.path / WEIGHTS
        if not (d / torch_dist.METADATA_JSON).is_file():
            raise MapcError(f"no {WEIGHTS}/{torch_dist.METADATA_JSON} (NeMo 2's distributed "
                            f"weights)", where=str(self.path), hint="copy the complete checkpoint")
        return d

    def _common(self) -> dict:
        """``common.pt`` in torch_dist's shape: NeMo's one-element ``optimizer`` list
        unwrapped, Lightning's ``global_step`` as the ``iteration``; or ``{}`` when it names
        objects mapc does not unpickle (NeMo keeps Lightning's training state there: loops,
        callbacks, schedulers), which the weights and ``model.yaml`` do not need."""
        try:
            common = dict(super()._common())
        except MapcError as e:
            if not (self.iter_dir / torch_dist.COMMON).is_file():
                raise
            if not any(k.startswith("optimizer.") for k in self._keys()):
                self.warnings.append(f"{WEIGHTS}/{torch_dist.COMMON} is not read "
                                     f"({e.message}); the weights and {MODEL_YAML} do not "
                                     f"need it")
                return {}
            raise MapcError(f"{WEIGHTS}/{torch_dist.COMMON} is not read ({e.message}), and "
                            f"the optimizer state needs it (its sharding type and param "
                            f"groups)", where=str(self.iter_dir / torch_dist.COMMON),
                            hint="convert the weights only: copy the checkpoint without "
                                 "its optimizer.* entries, or re-save without callbacks' "
                                 "objects") from None
        opt = common.get("optimizer")
        if isinstance(opt, list):
            if len(opt) != 1 or not isinstance(opt[0], dict):
                raise MapcError(f"{WEIGHTS}/{torch_dist.COMMON}: 'optimizer' holds {len(opt)} "
                                f"entries; mapc reads NeMo 2's one megatron-core optimizer",
                                where=str(self.iter_dir / torch_dist.COMMON))
            common["optimizer"] = opt[0]
        step = common.get("global_step")
        if common.get("iteration") is None and isinstance(step, int) and \
                not isinstance(step, bool):
            common["iteration"] = step
        return common

    def _keys(self):
        """The keys of ``weights/.metadata``."""
        return torch_dist.dcp.read_metadata(self.iter_dir).get("state_dict_metadata") or {}

    def training_state(self):
        out = super().training_state()
        lightning = {k: v for k, v in self._lightning().items() if k in LIGHTNING_KEYS}
        if lightning:
            out["lightning"] = lightning
        return out

    def _lightning(self) -> dict:
        """Lightning's plain entries of ``common.pt`` (none when it is not read)."""
        try:
            common = torch_dist.TorchDistSource._common(self)
        except MapcError:
            return {}
        return {k: v for k, v in common.items() if k in LIGHTNING_KEYS and _plain(v)}

    def __init__(self, path):
        super().__init__(path)
        if not self.tensors:
            raise MapcError(f"no model tensors under the prefix {PREFIX!r} in {WEIGHTS}/",
                            where=str(self.iter_dir), hint="is this a NeMo 2 checkpoint?")
        self.model_yaml = read_model_yaml(self.path)
        if self.model_yaml is None:
            self.format_meta = {}
            if not self.config:
                self.warnings.append(f"no {CONTEXT}/{MODEL_YAML} (the model's NeMo 2 config; "
                                     f"io.json, which holds only the arguments given, is not "
                                     f"read): pass --config")
            return
        self.format_meta = megatron_view(self.model_yaml["config"])
        self.saved_topology, self.saved_vpp   # bounded now, before anything uses them
        emb = self.tensors.get("embedding.word_embeddings.weight")
        if emb is not None and self.format_meta.get("vocab_size") is not None and \
                self.entries[emb[0]][0][0] == self.format_meta["vocab_size"]:
            # NeMo's GPTConfig.configure_model builds the embedding with a given vocab_size as
            # it is (make_vocab_size_divisible_by pads only a tokenizer's size)
            self.format_meta["make_vocab_size_divisible_by"] = 1
        if self.config and "vocab_multiple" in (self.record.get("params") or {}):
            # mapc's own output: model.yaml states the padded size (NeMo builds the embedding
            # with it), mapc.json the true vocabulary and the padding that gives those rows
            self.format_meta.pop("make_vocab_size_divisible_by", None)
        if self.format_meta.get("vocab_size") is None and not self.config:
            if emb is not None:
                self.format_meta["vocab_size"] = self.entries[emb[0]][0][0]
                self.warnings.append(f"{MODEL_YAML} states no vocab_size (NeMo 2 takes it from "
                                     f"the tokenizer): the padded embedding's "
                                     f"{self.format_meta['vocab_size']} rows are taken as the "
                                     f"vocabulary")

    def _size(self, key: str) -> int:
        """A parallel size of ``model.yaml``'s config (NeMo's strategy copies its own there,
        ``_strategy_lib.set_model_parallel_attributes``): 1 when unset."""
        n = self.format_meta.get(key)
        if n is None:
            return 1
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_MESH:
            raise MapcError(f"{MODEL_YAML}: {key} is {n!r}, not a size from 1 to {MAX_MESH}",
                            where=str(self.path / CONTEXT / MODEL_YAML))
        return n

    @property
    def saved_topology(self) -> dict:
        return {"tp": self._size("tensor_model_parallel_size"),
                "pp": self._size("pipeline_model_parallel_size")}

    @property
    def saved_vpp(self) -> int:
        """``virtual_pipeline_model_parallel_size`` of ``model.yaml``'s config: the model
        chunks of each pipeline rank, whose DDP buffers the distributed optimizer's state
        follows (the weights do not depend on it)."""
        return self._size(VPP_KEY)

    def describe_coord(self, coord):
        t = self.saved_topology
        vpp = f", vpp={self.saved_vpp}" if self.saved_vpp > 1 else ""
        return f"{WEIGHTS} (global tensors, saved at tp={t['tp']}, pp={t['pp']}{vpp})"


Source = Nemo2Source


def plan_write(program, facts, request):
    """``weights/`` (torch_dist, keys prefixed ``module.``; with the source's Adam moments,
    megatron-core's distributed optimizer state as torch_dist writes it), ``context/model.yaml``
    and ``mapc.json``."""
    plan = torch_dist.plan_write(program, facts, request)
    files = [MAPC_JSON, f"{CONTEXT}/{MODEL_YAML}", f"{CONTEXT}/{IO_JSON}"] + \
        [f"{WEIGHTS}/{f}" for f in (torch_dist.METADATA_JSON, torch_dist.COMMON,
                                    torch_dist.dcp.METADATA, torch_dist.DATA)]
    decisions = {"weights": f"{WEIGHTS}/ (torch_dist, keys prefixed {PREFIX!r})",
                 "context": f"{CONTEXT}/{MODEL_YAML}, {CONTEXT}/{IO_JSON} ({MODEL_TARGET})"} | \
        {k: v for k, v in plan.decisions.items()
         if k not in ("iteration directory", "data file")}
    return dataclasses.replace(plan, format="nemo2", files=tuple(sorted(files)),
                               decisions=decisions)


def _plain(obj, depth: int = 0) -> bool:
    """Whether ``obj`` is plain data (what Lightning's loops and torch's schedulers save)."""
    if depth > 32:
        return False
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_plain(v, depth + 1) for v in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, (str, int)) and _plain(v, depth + 1) for k, v in obj.items())
    return False


def model_yaml(args: dict) -> dict:
    """NeMo 2's ``model.yaml`` for a GPT model with these Megatron-LM arguments."""
    config = {"_target_": CONFIG_TARGET} | gpt_config(args)
    if args.get("swiglu"):
        config["activation_func"] = {"_call_": False, "_target_": ACTIVATION}
    return {"_target_": MODEL_TARGET, "config": config}


def gpt_config(args: dict) -> dict:
    """The ``GPTConfig`` fields of these Megatron-LM arguments (callables apart)."""
    config = {}
    for arg, value in args.items():
        if arg in TO_NEMO:
            key, conv = TO_NEMO[arg]
            if key in args and key != arg:
                continue            # stated directly (gated_linear_unit beside swiglu false)
            config[key] = conv(value)
        elif arg not in NOT_IN_CONFIG:
            config[arg] = value
    if args.get("padded_vocab_size") is not None:
        # NeMo builds the embedding with vocab_size rows (a given vocab_size is not padded)
        config["vocab_size"] = args["padded_vocab_size"]
        config["make_vocab_size_divisible_by"] = 1
    return config


def io_json(args: dict, topology: dict) -> dict:
    """``context/io.json``: fiddle's JSON serialization (format 0.0.1, what NeMo's
    ``IOMixin.io_dump`` writes and ``io.load_context`` reads) of NeMo's ``TrainerContext`` with
    ``model`` the ``GPTModel`` of a ``GPTConfig`` holding every field of :func:`gpt_config`
    (fiddle records only the arguments given, so nothing is left to a class default), and
    ``trainer`` a NeMo ``Trainer`` on a ``MegatronStrategy`` of the saved TP and PP (and
    virtual pipeline size, ``topology["vpp"]`` > 1)."""
    objects: dict = {}
    counts: dict = {}

    def pyref(qualified: str) -> dict:
        module, _, name = qualified.rpartition(".")
        return {"type": "pyref", "module": module, "name": name}

    def new(kind: str, obj: dict) -> dict:
        counts[kind] = counts.get(kind, 0) + 1
        key = f"{kind}_{counts[kind]}"
        objects[key] = obj
        return {"type": "ref", "key": key}

    def value(v, path: str):
        if v is None or isinstance(v, (bool, int, float, str)):
            return {"type": "leaf", "value": v, "paths": [path]}
        if isinstance(v, (list, tuple)):
            kind = "list" if isinstance(v, list) else "tuple"
            return new(kind, {"type": pyref(f"builtins.{kind}"),
                              "items": [[f"Index(index={i})", value(x, f"{path}[{i}]")]
                                        for i, x in enumerate(v)],
                              "metadata": None, "paths": [path]})
        if isinstance(v, dict) and "_pyref_" in v:
            return {"type": "pyref", **{k: x for k, x in pyref(v["_pyref_"]).items()
                                        if k != "type"}, "paths": [path]}
        raise MapcError(f"cannot write {v!r} at {path} into {IO_JSON}")

    def empty_dict() -> dict:
        return new("dict", {"type": pyref("builtins.dict"), "items": [],
                            "metadata": {"type": pyref("builtins.tuple"), "items": [],
                                         "metadata": None}})

    def config(target: str, kind: str, fields: dict, path: str) -> dict:
        names = new("tuple", {"type": pyref("builtins.tuple"),
                              "items": [[f"Index(index={i})", k] for i, k in enumerate(fields)],
                              "metadata": None})
        btm = "fiddle._src.config.BuildableTraverserMetadata"
        meta = new("buildable_traverser_metadata", {
            "type": pyref(btm),
            "items": [["Attr(name='fn_or_cls')", pyref(target)],
                      ["Attr(name='argument_names')", names],
                      ["Attr(name='argument_tags')", empty_dict()],
                      ["Attr(name='argument_history')", empty_dict()]],
            "metadata": pyref(btm)})
        items = [[f"Attr(name='{k}')", v if isinstance(v, dict) and v.get("type") == "ref"
                  else value(v, f"{path}.{k}")] for k, v in fields.items()]
        return new(kind, {"type": pyref("fiddle._src.config.Config"), "items": items,
                          "metadata": meta, "paths": [path]})

    fields = {k: v for k, v in gpt_config(args).items()}
    if args.get("swiglu"):
        fields["activation_func"] = {"_pyref_": ACTIVATION}
    cfg = config(CONFIG_TARGET, "gpt_config", fields, "<root>.model.config")
    model = config(MODEL_TARGET, "gpt_model", {"config": cfg}, "<root>.model")
    sizes = {"tensor_model_parallel_size": topology.get("tp", 1),
             "pipeline_model_parallel_size": topology.get("pp", 1)}
    if topology.get("vpp", 1) > 1:
        sizes[VPP_KEY] = topology["vpp"]
    strategy = config(STRATEGY_TARGET, "megatron_strategy", sizes, "<root>.trainer.strategy")
    trainer = config(TRAINER_TARGET, "trainer", {"strategy": strategy}, "<root>.trainer")
    extra = new("dict", {"type": pyref("builtins.dict"), "items": [],
                         "metadata": {"type": pyref("builtins.tuple"), "items": [],
                                      "metadata": None}, "paths": ["<root>.extra"]})
    root = config(CONTEXT_TARGET, "trainer_context",
                  {"model": model, "trainer": trainer, "extra": extra}, "<root>")
    return {"root": root, "objects": objects, "refcounts": {k: 1 for k in objects},
            "version": "0.0.1"}


# Transformer Engine modules (NeMo 2's spec) with an _extra_state but no tensor mapc writes
# under their own name: the attention core beside each attention's output projection (NeMo 2
# checkpoints list module.decoder.layers.self_attention.core_attention._extra_state; MLA has
# no fused QKV) and the final norm
_TE_ATTENTION = re.compile(r"^(.*\.self_attention\.)linear_proj\.weight$")
_TE_FINAL_NORM = re.compile(r"^(.*\.final_layernorm)\.weight$")
# ... and the attention norms (qk_layernorm's q/k, MLA's q/kv), which are Transformer Engine
# norms there and plain torch norms (no _extra_state) in torch_dist's local spec
# and the post-norms inside row-parallel linears (Megatron-Bridge's
# TERowParallelLinearLayerNorm: linear_proj / linear_fc2 .post_layernorm, a TENorm)
_TE_ATTENTION_NORM = re.compile(
    r"^(.*\.(?:self_attention\.(?:q|k|kv)_layernorm|post_layernorm))\.weight$")


class Nemo2Writer(torch_dist.TorchDistWriter):
    """The torch_dist writer with every key prefixed ``module.``, into ``weights/``, and the
    ``_extra_state`` objects of Transformer Engine's modules that have no tensor of their own
    (``None``, as a module without fp8 state; a loader without them leaves them unread)."""
    key_prefix = PREFIX

    def _extra_state_keys(self, fqn: str, shape: tuple) -> list[str]:
        keys = super()._extra_state_keys(fqn, shape)
        # one object per layer of a stacked tensor, one for a numbered layer's own
        shards = [f"shard_{i}_{shape[0]}" for i in range(shape[0])] \
            if shape and torch_dist.stacked(fqn) else ["shard_0_1"]
        m = _TE_ATTENTION.match(fqn)
        if m and shape:
            keys += [f"{m.group(1)}core_attention._extra_state/{s}" for s in shards]
        m = _TE_ATTENTION_NORM.match(fqn)
        if m and shape:
            keys += [f"{m.group(1)}._extra_state/{s}" for s in shards]
        m = _TE_FINAL_NORM.match(fqn)
        if m:
            keys.append(f"{m.group(1)}._extra_state/shard_0_1")
        return keys

    def _subdir(self) -> str:
        return WEIGHTS

    def _common(self) -> dict:
        """Lightning's checkpoint entries as NeMo's ``MegatronStrategy`` saves them: the
        torch_dist writer's optimizer entry wrapped in NeMo's one-element ``optimizer`` list,
        ``global_step`` (the step), and the Lightning state of a NeMo 2 source (loops,
        schedulers) carried."""
        common = {"content_metadata": dict(CONTENT_METADATA)}
        if self.opt is None:
            return common
        td = super()._common()
        step = int(self.iteration or 0)
        lightning = self.training.get("lightning")
        lightning = dict(lightning) if isinstance(lightning, dict) else {}
        common = {"epoch": 0, "global_step": step} | \
            {k: v for k, v in lightning.items() if k in LIGHTNING_KEYS and _plain(v)} | \
            {"state_dict": {}, "optimizer_states": {}, "optimizer": [td["optimizer"]],
             "content_metadata": {"distrib_optim_sharding_type": self.opt.kind}}
        return common

    def _finish_root(self, record: dict):
        """``context/``: with a virtual pipeline (the optimizer's buffers laid out for its
        chunks) its size in the model's config, as NeMo's strategy puts it there, and in the
        strategy."""
        import yaml
        d = self.dir / CONTEXT
        d.mkdir()
        vpp = self.opt.vpp if self.opt is not None else 1
        args = dict(self.args, **{VPP_KEY: vpp}) if vpp > 1 else self.args
        (d / MODEL_YAML).write_text(yaml.safe_dump(model_yaml(args), sort_keys=False))
        (d / IO_JSON).write_text(json.dumps(io_json(args, {
            "tp": args.get("tensor_model_parallel_size") or 1,
            "pp": args.get("pipeline_model_parallel_size") or 1, "vpp": vpp})))
        write_json(self.dir / MAPC_JSON, record)


Writer = Nemo2Writer
