"""NeMo 1 checkpoints: ``.nemo`` tar archives and their unpacked directories.

Files: ``model_config.yaml`` and ``model_weights.ckpt`` (tp = pp = 1),
``mp_rank_{tp:02d}/model_weights.ckpt`` (pp = 1) or
``tp_rank_{tp:02d}_pp_rank_{pp:03d}/model_weights.ckpt`` (pp > 1). Each ckpt is a
``torch.save``'d flat state dict whose keys are the Megatron layout's names prefixed
``model.`` (``model.decoder.layers.0.self_attention.linear_qkv.weight``, or legacy
``model.language_model...``), so the Megatron layout of the spec is reused unchanged: this
container adds and strips the prefix.

A ``.nemo`` is an uncompressed tar of those files (NeMo writes ``tar.add(dir, arcname=".")``).
Reading one extracts nothing: tar members are stored contiguously, so each ckpt is parsed in
place and its tensors are mapped from the tar file itself. A gzip-compressed ``.nemo`` (older
NeMo) cannot be addressed by offset; its config and weights are extracted into a temporary
directory under the system temp dir, removed when the source is closed.

``model_config.yaml`` is generated from the Megatron layout's ``meta`` through a table that
renames Megatron arguments to NeMo config keys, or keeps the name of those that are
megatron-core TransformerConfig fields (NeMo 1 copies such fields from its config by name),
plus ``tensor_model_parallel_size`` / ``pipeline_model_parallel_size``, the layer spec
(``name: decoder_block_gpt`` when NeMo's default spec would lack q/k layernorms, MLA or dense
layers between MoE layers) and mapc's record under the key ``mapc``, so re-conversion needs no
flags (file-format knowledge; no model family is named here). NeMo 1 keys that no Megatron
argument states (a model-specific layer spec ``name``, ``apply_embedding_scaling``,
``mcore_customization_config`` entries) are the layout's ``nemo.KEY`` meta entries
(compiler/metakeys/nemo.txt), written as they are, dots nesting. A model NeMo 1 would build
differently from its config (an argument with no NeMo 1 key, a module none of the layer specs
it selects from the config has) is refused before anything is written. Reading inverts the table:
``format_meta`` is the Megatron-argument view the spec's ``meta`` reads back, plus the NeMo 1
keys of that list as ``nemo.KEY``. NeMo's config
does not hold the true vocabulary size (that comes from the tokenizer); without mapc's record
the padded size (``override_vocab_size``, else the embedding's rows) stands in for it.

Output to a path ending in ``.nemo`` is a tar file, otherwise a directory. Files are read and
written with mapc's own torch-file code: no pickled code runs and torch is not required.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections import OrderedDict
from pathlib import Path


from mapc.errors import MapcError
from mapc.runtime import torchfile
from mapc.runtime.containers.base import RefSource, coord_key
from mapc.runtime.plan_write import PlannedWriter, make_plan, parts_by_file, planned_tensors
from mapc.runtime.containers.dcp import load_torch_at
from mapc.runtime.containers.megatron import flatten

try:
    from lzma import LZMAError
except ImportError:                 # Python built without lzma: tarfile cannot open .xz then
    LZMAError = tarfile.TarError

LAYOUT = "megatron"
PICKLES = torchfile.allow_list("NeMo")
CONFIG = "model_config.yaml"
WEIGHTS = "model_weights.ckpt"
PREFIX = "model."
RECORD_KEY = "mapc"
READER = "nemo"             # the megatron layout's own meta entries for NeMo 1: nemo.KEY
SUFFIX = ".nemo"
_RANK_DIR = re.compile(r"^(?:mp_rank_(\d{2})|tp_rank_(\d{2})_pp_rank_(\d{3}))$")


def _same(v):
    return v


# Megatron argument -> (NeMo config key, Megatron value -> NeMo value, NeMo -> Megatron).
# Megatron arguments without a NeMo key (vocab_size, group_query_attention, ...) are not
# written: NeMo derives them (the vocabulary comes from the tokenizer).
_NORMS = {"RMSNorm": "rmsnorm", "LayerNorm": "layernorm"}
RENAME = {
    "num_layers": ("num_layers", _same, _same),
    "hidden_size": ("hidden_size", _same, _same),
    "ffn_hidden_size": ("ffn_hidden_size", _same, _same),
    "num_attention_heads": ("num_attention_heads", _same, _same),
    "num_query_groups": ("num_query_groups", _same, _same),
    "kv_channels": ("kv_channels", _same, _same),
    "max_position_embeddings": ("max_position_embeddings", _same, _same),
    "seq_length": ("encoder_seq_length", _same, _same),
    "make_vocab_size_divisible_by": ("make_vocab_size_divisible_by", _same, _same),
    "padded_vocab_size": ("override_vocab_size", _same, _same),
    "norm_epsilon": ("layernorm_epsilon", _same, _same),
    "rotary_base": ("rotary_base", _same, _same),
    "rotary_percent": ("rotary_percentage", _same, _same),
    "position_embedding_type": ("position_embedding_type", _same, _same),
    "untie_embeddings_and_output_weights": ("share_embeddings_and_output_weights",
                                            lambda v: not v, lambda v: not v),
    "normalization": ("normalization", lambda v: _NORMS.get(v, str(v).lower()),
                      lambda v: {n.lower(): m for m, n in _NORMS.items()}.get(str(v).lower(),
                                                                             v)),
    "swiglu": ("activation", lambda v: "fast-swiglu" if v else "gelu",
               lambda v: str(v).endswith("swiglu")),
    "add_bias_linear": ("bias", _same, _same),
    "add_qkv_bias": ("qkv_bias", _same, _same),
    "tensor_model_parallel_size": ("tensor_model_parallel_size", _same, _same),
    "pipeline_model_parallel_size": ("pipeline_model_parallel_size", _same, _same),
    "num_experts": ("num_moe_experts", _same, _same),
}
# Megatron arguments that are megatron-core TransformerConfig (or MLATransformerConfig) fields
# of the same name: NeMo 1's build_transformer_config copies every such field from its model
# config by name, so these are written unchanged. (moe_router_topk is read the same way, with
# NeMo's own default 2.)
PASSTHROUGH = (
    "qk_layernorm", "layernorm_zero_centered_gamma", "openai_gelu",
    "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
    "multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim",
    "qk_pos_emb_head_dim", "v_head_dim", "rope_type",
    "moe_ffn_hidden_size", "moe_router_topk", "moe_layer_freq", "moe_router_score_function",
    "moe_router_pre_softmax", "moe_router_enable_expert_bias", "moe_router_num_groups",
    "moe_router_group_topk", "moe_router_topk_scaling_factor",
    "moe_shared_expert_intermediate_size", "moe_grouped_gemm",
    "window_size", "window_attn_skip_freq", "softmax_type", "glu_linear_offset",
    "activation_func_clamp_value",
)
RENAME.update({k: (k, _same, _same) for k in PASSTHROUGH})
# Megatron arguments NeMo 1 needs no key for: it derives them from the keys above (the
# vocabulary from the tokenizer, GQA from num_query_groups, learned positions from
# position_embedding_type, a gated MLP from the activation) or they are older names of keys
# written above (Megatron-LM's decoder_first/last_pipeline_num_layers).
DERIVED = frozenset({
    "vocab_size", "group_query_attention", "add_position_embedding", "gated_linear_unit",
    "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
})
# Megatron arguments NeMo 1's MegatronGPTModel cannot build, with why; refused when set (a
# NeMo 1 model built without them would compute something else).
UNSUPPORTED = {
    "mtp_num_layers": "NeMo 1's MegatronGPTModel builds no multi-token-prediction block "
                      "(megatron-core's mtp_block_spec is not passed)",
    "quick_geglu": "NeMo 1's activations (activation_to_func) have no quick-GELU GLU",
}
# megatron-core modules that no layer spec NeMo 1 selects from its config holds ('', te_gpt,
# decoder_block_gpt): a norm after the attention or MLP output projection exists only in a
# model-specific NeMo 1 spec, which the layout must name (meta nemo.name) with the settings
# that spec reads (nemo.* entries)
NO_NEMO1_MODULE = re.compile(r"\.(linear_proj|linear_fc2)\.post_layernorm\.")
# The layer spec is NeMo's model config key `name`: the default ('' or te_gpt) builds q/k
# layernorms, MLA or dense layers between MoE layers never; megatron-core's per-layer block
# spec (`decoder_block_gpt`, get_gpt_decoder_block_spec) builds them from the config.
BLOCK_SPEC = "decoder_block_gpt"
PRECISION = {"bfloat16": "bf16", "float16": 16, "float32": 32}
TARGET = "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel"


def detect(path: Path) -> bool:
    if path.is_file():
        return path.name.endswith(SUFFIX)
    return path.is_dir() and (path / CONFIG).is_file()


def plan_write(program, facts, request):
    """The directory form (``model_config.yaml`` and ``model_weights.ckpt`` per rank folder),
    or, for a DST ending in ``.nemo``, that directory packed into one tar file."""
    mesh = program.target.mesh
    if mesh.get("ep", 1) > 1:
        raise MapcError("NeMo checkpoints have no expert-parallel file layout in mapc yet "
                        f"(ep={mesh['ep']})",
                        hint="write NeMo with --ep 1, or use --to megatron for expert parallelism")
    tensors = planned_tensors(program, facts, request.dtype, ("param",))
    check_translatable(program.target.meta(), {name for _, name, *_ in tensors},
                       program.target.meta(READER))
    tp, pp = mesh.get("tp", 1), mesh.get("pp", 1)
    as_tar = str(request.dst).endswith(SUFFIX)
    files = ["."] if as_tar else [CONFIG] + [_weights_path(c, tp, pp) for c in
                                             {c for c, *_ in tensors}]
    # the directory form's rank files are independent; a tar is one file packed at the end
    parts = () if as_tar else parts_by_file(tensors, lambda c, _: _weights_path(c, tp, pp))
    return make_plan("nemo", files, decisions={"tp": tp, "pp": pp,
                                               "form": "tar" if as_tar else "directory"},
                     tensors=tensors, detail=as_tar, parts=parts,
                     serial="a .nemo tar is one file" if as_tar else None)


def check_translatable(meta: dict, names, own: dict | None = None) -> None:
    """Refuse, before anything is written, a model NeMo 1 would build differently from its
    config: a Megatron argument with no NeMo 1 key, or a tensor no NeMo 1 layer spec holds
    (unless the layout names, in ``own``, a model-specific layer spec that does)."""
    for arg, value in meta.items():
        if value is None or value is False or arg in RENAME or arg in DERIVED:
            continue
        why = UNSUPPORTED.get(arg)
        if why is None and not value:
            continue
        raise MapcError(f"cannot write NeMo 1: Megatron argument {arg} = {value!r} "
                        + (f"({why})" if why else "has no NeMo 1 model config key in mapc's "
                                                  "table"),
                        hint="write --to megatron, torch_dist or nemo2 instead")
    odd = sorted(n for n in names if NO_NEMO1_MODULE.search("." + n))
    if odd and not (own or {}).get("name"):
        raise MapcError(f"cannot write NeMo 1: {odd[0]} has no module in the layer specs NeMo "
                        "1 selects from its config (a norm after the output projection is "
                        "only in a model-specific NeMo 1 spec, and the spec's megatron layout "
                        "names none: meta nemo.name)",
                        hint="write --to megatron, torch_dist or nemo2 instead")


def needs_block_spec(meta: dict) -> bool:
    """Whether NeMo 1 must build the layers with megatron-core's per-layer block spec."""
    freq = meta.get("moe_layer_freq")
    mixed = meta.get("num_experts") and freq is not None and freq != 1 and \
        not (isinstance(freq, list) and all(f == 1 for f in freq))
    return bool(meta.get("qk_layernorm") or meta.get("multi_latent_attention") or mixed)


def _weights_path(coord, tp: int, pp: int) -> str:
    c = dict(coord)
    d = rank_dir(c["tp"], c.get("pp", 0), tp, pp)
    return f"{d}/{WEIGHTS}" if d else WEIGHTS


def _rank_of(rel: str):
    """(tp, pp) of a ``.../model_weights.ckpt`` path relative to the checkpoint root."""
    parts = rel.split("/")
    if parts == [WEIGHTS]:
        return 0, 0
    if len(parts) == 2 and parts[1] == WEIGHTS:
        m = _RANK_DIR.match(parts[0])
        if m:
            if m.group(1) is not None:
                return int(m.group(1)), 0
            return int(m.group(2)), int(m.group(3))
    return None


def rank_dir(tp_rank: int, pp_rank: int, tp: int, pp: int) -> str:
    if pp > 1:
        return f"tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:03d}"
    return f"mp_rank_{tp_rank:02d}" if tp > 1 else ""


MAX_CONFIG = 16 << 20          # bytes of model_config.yaml
MAX_RATIO = 32                 # extracted bytes per compressed byte (weights barely compress)
MIN_BUDGET = 64 << 20          # ... but a small archive may always extract this much
_BUDGET_RULE = (f"at most {MAX_RATIO}x the archive's size (or {MIN_BUDGET >> 20} MiB), and "
                "the free space of the temp dir")


def _extraction_budget(archive: Path, tmp: Path) -> int:
    """How many bytes extracting a compressed .nemo may write: a compression bomb (1 MB of
    gzip that inflates to 1 GiB) is refused before it fills the temp dir."""
    free = shutil.disk_usage(tmp).free
    return min(max(MAX_RATIO * archive.stat().st_size, MIN_BUDGET), free - (64 << 20))


def _read_config_member(tar, m, path: Path) -> str:
    if m.size > MAX_CONFIG:
        raise MapcError(f"{m.name} is {m.size} bytes (a model config is at most "
                        f"{MAX_CONFIG >> 20} MiB)", where=str(path))
    return tar.extractfile(m).read().decode("utf-8", "replace")


class _tar_errors:
    """A truncated or corrupt archive (also a gzip one) as a one-line MapcError."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if kind is not None and issubclass(kind, (tarfile.TarError, EOFError, zlib.error,
                                                  OSError, LZMAError)) \
                and not issubclass(kind, MapcError):
            why = getattr(e, "strerror", None) or e
            raise MapcError(f"corrupt or truncated archive: {why}", where=str(self.path),
                            hint="re-copy the .nemo file") from None
        return False


def _nemo_config(yaml_text: str, where: str) -> dict:
    import yaml     # imported when a NeMo checkpoint is read, not to detect one
    try:
        cfg = yaml.safe_load(yaml_text)
    except yaml.YAMLError as e:
        raise MapcError(f"cannot parse {CONFIG}: {e}", where=where) from None
    if not isinstance(cfg, dict):
        raise MapcError(f"{CONFIG} is not a mapping", where=where)
    if "num_layers" not in cfg and isinstance(cfg.get("model"), dict):
        cfg = cfg["model"]      # a training run's hparams.yaml nests the model config
    return cfg


def megatron_view(cfg: dict) -> dict:
    """The Megatron arguments a NeMo config states (the inverse of :data:`RENAME`)."""
    out = {}
    for arg, (key, _, back) in RENAME.items():
        if cfg.get(key) is not None:
            out[arg] = back(cfg[key])
    act = str(cfg.get("activation", ""))
    if act.endswith("glu") and not act.endswith("swiglu"):
        out["gated_linear_unit"] = True       # a GLU other than SwiGLU (fast-geglu, ...)
    return out


def own_view(cfg: dict) -> dict:
    """The NeMo 1 keys no Megatron argument states, as the layout's ``nemo.KEY`` entries."""
    out = {}
    for key in own_keys():
        node = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            out[f"{READER}.{key}"] = node
    return out


def own_keys() -> frozenset:
    from mapc.compiler.metakeys import reader_keys
    return reader_keys(READER)


class NemoSource(RefSource):
    format = "nemo"
    layout = "megatron"

    def __init__(self, path):
        super().__init__(path)
        self._tmp = None
        try:
            if self.path.is_file():
                yaml_text, files = self._open_tar()
            else:
                yaml_text, files = self._open_dir()
            self._setup(yaml_text, files)
        except BaseException:
            self.close()
            raise

    # -- locating the files --
    def _open_dir(self):
        if (self.path / "model_weights").is_dir():
            raise MapcError("this is a distributed (torch_dist / zarr) NeMo checkpoint "
                            "(model_weights/ directory), which mapc does not read",
                            where=str(self.path))
        files = {}
        for p in [self.path / WEIGHTS, *sorted(self.path.glob("*/" + WEIGHTS))]:
            if p.is_file():
                rank = _rank_of(p.relative_to(self.path).as_posix())
                if rank is not None:
                    files[rank] = (p, 0, None)
        try:
            text = (self.path / CONFIG).read_text()
        except OSError as e:
            raise MapcError(f"cannot read {CONFIG}: {e.strerror or e}", where=str(self.path)) \
                from None
        return text, files

    def _open_tar(self):
        try:
            tar = tarfile.open(self.path, "r:")
        except tarfile.ReadError:
            return self._extract_compressed()
        except OSError as e:
            raise MapcError(f"cannot read: {e.strerror or e}", where=str(self.path)) from None
        size = self.path.stat().st_size
        with tar, _tar_errors(self.path):
            text, files = None, {}
            for m in tar:
                rel = os.path.normpath(m.name).lstrip("/")
                if m.isreg() and m.offset_data + m.size > size:
                    raise MapcError(f"truncated: member {m.name} declares {m.size} bytes at "
                                    f"byte {m.offset_data}, the file has {size}",
                                    where=str(self.path), hint="re-copy the .nemo file")
                if rel == CONFIG and m.isreg():
                    text = _read_config_member(tar, m, self.path)
                rank = _rank_of(rel) if m.isreg() else None
                if rank is not None:
                    if m.issparse():
                        raise MapcError(f"{rel} is a sparse tar member", where=str(self.path))
                    files[rank] = (self.path, m.offset_data, m.size)
                elif rel.startswith("model_weights/"):
                    raise MapcError("this is a distributed (torch_dist / zarr) NeMo "
                                    "checkpoint, which mapc does not read", where=str(self.path))
        if text is None:
            raise MapcError(f"no {CONFIG} in the archive", where=str(self.path),
                            hint="is this a NeMo 1 .nemo file?")
        return text, files

    def _extract_compressed(self):
        """A compressed .nemo cannot be read in place: copy out the config and weights."""
        try:
            tar = tarfile.open(self.path, "r:*")
        except (tarfile.TarError, OSError) as e:
            raise MapcError(f"not a .nemo archive (a tar file): {e}", where=str(self.path)) \
                from None
        self._tmp = Path(tempfile.mkdtemp(prefix="mapc-nemo-"))
        budget = _extraction_budget(self.path, self._tmp)
        text, files = None, {}
        with tar, _tar_errors(self.path):
            for m in tar:
                if not m.isreg():
                    continue
                rel = os.path.normpath(m.name).lstrip("/")
                if rel == CONFIG:
                    text = _read_config_member(tar, m, self.path)
                rank = _rank_of(rel)
                if rank is not None:   # our own file name: nothing from the archive is a path
                    if m.size > budget:
                        raise MapcError(f"member {m.name} declares {m.size} bytes; extracting "
                                        f"the compressed archive may write at most {budget} "
                                        f"more ({_BUDGET_RULE})", where=str(self.path),
                                        hint="decompress it yourself (gunzip) if it is genuine: "
                                             "an uncompressed .nemo is read in place")
                    budget -= m.size
                    dst = self._tmp / f"{rank[0]}_{rank[1]}.ckpt"
                    with tar.extractfile(m) as src, open(dst, "wb") as out:
                        shutil.copyfileobj(src, out, 16 << 20)
                    files[rank] = (dst, 0, None)
        if text is None:
            raise MapcError(f"no {CONFIG} in the archive", where=str(self.path))
        return text, files

    def _setup(self, yaml_text, files):
        where = str(self.path)
        if not files:
            raise MapcError(f"no {WEIGHTS} files", where=where)
        tp = max(t for t, _ in files) + 1
        pp = max(p for _, p in files) + 1
        missing = [rank_dir(t, p, tp, pp) or WEIGHTS for t in range(tp) for p in range(pp)
                   if (t, p) not in files]
        if missing:
            raise MapcError(f"missing shard files: {', '.join(missing)}", where=where,
                            hint="copy the complete checkpoint")
        self.topology = {"tp": tp, "pp": pp}
        self.files = {(("tp", t), ("pp", p)): f for (t, p), f in files.items()}
        self.nemo_config = _nemo_config(yaml_text, where)
        record = self.nemo_config.get(RECORD_KEY)
        if isinstance(record, dict):
            self.record = record
        self.config = self.record.get("config")
        self._tensors: dict = {}
        self.format_meta = megatron_view(self.nemo_config) | own_view(self.nemo_config)
        if "vocab_size" not in self.format_meta:
            padded = self.format_meta.get("padded_vocab_size") or self._embedding_rows()
            if padded:
                self.format_meta["vocab_size"] = padded

    def _embedding_rows(self):
        """The padded vocabulary, from the first stage's word embedding (Megatron names)."""
        coord = (("tp", 0), ("pp", 0))
        rows = [ref.shape[0] for name, ref in self._load(coord).items()
                if name.endswith("word_embeddings.weight") and ref.ndim == 2]
        return rows[0] * self.topology["tp"] if rows else None

    def _canon(self, coord):
        """The files' own key for a coordinate of any layout (extra axes of rank 0 ignored)."""
        keys = getattr(self, "_keys", None)
        if keys is None:
            keys = self._keys = {coord_key(c): c for c in self.files}
        return keys.get(coord_key(coord), coord)

    def _load(self, coord):
        coord = self._canon(coord)
        if coord not in self._tensors:
            path, offset, size = self.files[coord]
            if size is None:
                obj = torchfile.load(path, PICKLES)
            else:
                obj = load_torch_at(path, offset, size, self.describe_coord(coord))
            if not isinstance(obj, dict):
                raise MapcError("not a NeMo weights file (not a state dict)",
                                where=self._where(coord))
            if "state_dict" in obj and isinstance(obj["state_dict"], dict):
                obj = obj["state_dict"]    # a training (.ckpt) file rather than weights
            flat = OrderedDict()
            for key, value in flatten(obj).items():
                if key.endswith("_extra_state") or not isinstance(value, torchfile.TensorRef):
                    continue
                flat[key[len(PREFIX):] if key.startswith(PREFIX) else key] = value
            self._tensors[coord] = flat
        return self._tensors[coord]

    def _where(self, coord):
        return f"{self.path} {self.describe_coord(coord)}"

    def coords(self):
        return list(self.files)

    def names(self, coord):
        return list(self._load(coord))

    def _ref(self, name, coord):
        try:
            return self._load(coord)[name]
        except KeyError:
            raise MapcError(f"tensor {PREFIX}{name} is not in the checkpoint",
                            where=self._where(coord)) from None

    def describe_coord(self, coord):
        c = dict(self._canon(coord))
        d = rank_dir(c["tp"], c["pp"], self.topology["tp"], self.topology["pp"])
        return f"{d}/{WEIGHTS}" if d else WEIGHTS

    def close(self):
        self._tensors = {}
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


Source = NemoSource


class NemoWriter(PlannedWriter):
    """Writes the directory form; with a tar plan, packs it into a ``.nemo`` tar at the end
    and leaves that file at the temporary path, which AtomicOutput renames into place."""
    keeps_arrays = False    # every array is written before write() returns

    def __init__(self, tmpdir, program, plan):
        super().__init__(tmpdir, program, plan)
        topology = program.target.mesh
        self.tp, self.pp = topology.get("tp", 1), topology.get("pp", 1)
        self.meta = program.target.meta()
        self.own = program.target.meta(READER)
        self.as_tar = bool(plan.detail)
        self.writers = {}
        self.order = {}
        self.tar_path = None

    def _path(self, coord) -> Path:
        return self.dir / _weights_path(coord, self.tp, self.pp)

    def begin(self, tensors):
        for coord, name, shape, dt in tensors:
            self.order.setdefault(coord, []).append(name)
        self.dtypes = {dt for *_, dt in tensors}
        self.names = {name for _, name, _, _ in tensors}
        for coord in self.order:
            if not self.owns(_weights_path(coord, self.tp, self.pp)):
                continue                          # another worker's rank
            path = self._path(coord)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writers[coord] = (torchfile.TorchWriter(path), {})

    def write(self, coord, name, arr):
        w, placeholders = self.writers[coord]
        placeholders[name] = w.add_tensor(arr)

    def config(self, record: dict) -> dict:
        """``model_config.yaml``: the layout's meta renamed to NeMo keys, plus the record."""
        cfg: dict = {"mcore_gpt": not any(n.startswith("language_model.") for n in self.names)}
        if any(n.endswith(".layer_norm_weight") for n in self.names):
            cfg["transformer_engine"] = True      # norms fused into TE linears
        meta = dict(self.meta, tensor_model_parallel_size=self.tp,
                    pipeline_model_parallel_size=self.pp)
        for arg, value in meta.items():
            if arg in RENAME and value is not None:
                key, fwd, _ = RENAME[arg]
                cfg[key] = fwd(value)
        if meta.get("gated_linear_unit") and not meta.get("swiglu"):
            cfg["activation"] = "fast-geglu"      # NeMo 1's GELU GLU (F.gelu), Megatron's
        if meta.get("openai_gelu"):
            # NeMo's default bias_activation_fusion (true) is megatron-core's fused bias-GELU
            # or -SwiGLU, which megatron-core refuses for any other activation function
            cfg["bias_activation_fusion"] = False
        if needs_block_spec(meta):
            cfg["name"] = BLOCK_SPEC
        for key, value in self.own.items():      # the layout's nemo.KEY entries
            *path, leaf = key.split(".")
            node = cfg
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = value
        if len(self.dtypes) == 1 and next(iter(self.dtypes)) in PRECISION:
            cfg["precision"] = PRECISION[next(iter(self.dtypes))]
        cfg["target"] = TARGET
        cfg[RECORD_KEY] = json.loads(json.dumps(record))   # plain YAML types only
        return cfg

    def finish(self, record: dict):
        for coord, (w, placeholders) in self.writers.items():
            w.finish(OrderedDict((PREFIX + n, placeholders[n]) for n in self.order[coord]))
        if not self.metadata:
            return
        import yaml
        (self.dir / CONFIG).write_text(yaml.safe_dump(self.config(record), sort_keys=False))
        if self.as_tar:
            self._pack()

    def _pack(self):
        """Tar the directory (as NeMo does: members ``./...``), then put the tar file where
        the directory was. Each file is deleted once packed, bounding the extra disk use."""
        tar_path = self.dir.with_name(self.dir.name + ".tar-partial")
        self.tar_path = tar_path
        files = sorted(p for p in self.dir.rglob("*") if p.is_file())
        dirs = sorted({p.parent for p in files} - {self.dir})
        with tarfile.open(tar_path, "w:", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(self._info(".", tarfile.DIRTYPE, 0))
            for d in dirs:
                tar.addfile(self._info("./" + d.relative_to(self.dir).as_posix(),
                                       tarfile.DIRTYPE, 0))
            for p in [self.dir / CONFIG] + [f for f in files if f.name != CONFIG]:
                info = self._info("./" + p.relative_to(self.dir).as_posix(), tarfile.REGTYPE,
                                  p.stat().st_size)
                with open(p, "rb") as f:
                    tar.addfile(info, f)
                p.unlink()
        shutil.rmtree(self.dir)
        os.rename(tar_path, self.dir)
        self.tar_path = None

    @staticmethod
    def _info(name, kind, size):
        info = tarfile.TarInfo(name)
        info.type, info.size, info.mtime = kind, size, 0
        info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        return info

    def abort(self):
        for w, _ in self.writers.values():
            w.abort()
        if self.tar_path is not None:
            try:
                self.tar_path.unlink()
            except FileNotFoundError:
                pass


Writer = NemoWriter
