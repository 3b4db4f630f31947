"""Ground truth for NeMo 1 checkpoints: the model NeMo 1's ``MegatronGPTModel`` builds from a
``model_config.yaml``, in the real megatron-core, loaded from the ``model_weights.ckpt`` beside
it, and its logits (tp = pp = 1, CPU, one gloo world of size 1).

NeMo itself is not installed (it needs Apex, Transformer Engine, Lightning and CUDA). What it
does with the config is re-stated here from its source (NeMo's
``nemo/collections/nlp/models/language_modeling/megatron_base_model.py`` and
``megatron_gpt_model.py``, ``build_transformer_config``, ``get_specs``,
``model_provider_func``; ``nemo/collections/nlp/parts/utils_funcs.py``, ``activation_to_func``):

* ``TransformerConfig`` (``MLATransformerConfig`` when ``multi_latent_attention``) takes every
  field whose name is a key of the model config, with NeMo's own mapping first:
  ``add_bias_linear = bias`` (default true), ``add_qkv_bias = qkv_bias`` (default false),
  ``gated_linear_unit`` = the activation ends in ``glu``, ``activation_func`` from the
  activation (``gelu``/``geglu``/``fast-geglu``: ``F.gelu``; ``swiglu``/``fast-swiglu``:
  ``F.silu``; ``openai_gelu`` first), ``rotary_interleaved`` (default false),
  ``apply_query_key_layer_scaling`` false, ``layernorm_zero_centered_gamma`` from the key or
  ``normalization: layernorm1p``, ``normalization`` ``rmsnorm`` -> ``RMSNorm``, ``layernorm``
  -> ``LayerNorm``; then the MoE fields it sets after construction (``num_moe_experts``,
  ``moe_router_topk`` default 2, ``moe_router_load_balancing_type`` default ``aux_loss``,
  ``moe_grouped_gemm``, ``moe_aux_loss_coeff`` default 0, ...).
  Then every ``mcore_customization_config`` entry is set on the config as an attribute.
* The layer spec is the config's ``name``: ``""`` is megatron-core's
  ``get_gpt_layer_local_spec(num_moe_experts, moe_grouped_gemm)`` (``te_gpt``, the TE one,
  when ``transformer_engine``), ``decoder_block_gpt`` is ``get_gpt_decoder_block_spec(config,
  transformer_engine)``, ``megatron_gemma2`` is NeMo's ``get_gemma2_layer_spec()``
  (``megatron/gemma2/gemma2_spec.py``: megatron-core's ``TransformerLayer``, ``SelfAttention``,
  ``MLP`` and ``get_bias_dropout_add``; ``TELayerNormColumnParallelLinear`` for ``linear_qkv``
  and ``linear_fc1``, NeMo's ``TERowParallelLinearLayerNorm`` (a ``TERowParallelLinear`` whose
  output goes through a ``TENorm`` ``post_layernorm``) for ``linear_proj`` and ``linear_fc2``,
  NeMo's ``Gemma2DotProductAttention`` as core attention); other names are refused here.
  Transformer Engine is not installed: its modules are mcore_gemma's stand-ins (megatron-core
  linears with TE's parameter names, RMSNorms zero-centered as the config says), also for the
  final ``TENorm`` megatron-core's block builds around a layer spec when TE is present.
  ``Gemma2DotProductAttention``, ``Gemma2OutputLayer`` and ``EmbeddingScalingMixin`` are NeMo's
  own code: their source is taken from the installed NeMo 2.7.3
  (``nemo/collections/llm/gpt/model/gemma2.py``; their syntax trees, and those of
  ``get_swa`` and ``logit_softcapping``, equal NeMo 1's last ``megatron/gemma2/gemma2_modules.py``
  and ``megatron_gpt_model.py``, NeMo commit ff19f95, before its nlp collection was removed) and
  run without importing NeMo's package (``_nemo_gemma2``; importing its llm collection needs
  packages not installed here); the one change is that ``get_swa`` builds its sliding-window
  mask on the CPU instead of ``"cuda"``.
* ``mcore_model_customize``: ``apply_embedding_scaling`` extends the embedding with
  ``EmbeddingScalingMixin`` (embeddings times ``sqrt(hidden_size)``), a non-zero
  ``mcore_customization_config.final_logit_softcapping`` the output layer with
  ``Gemma2OutputLayer`` (NeMo's ``extend_instance``: the mixin class placed first).
* ``GPTModel(config, spec, vocab_size=override_vocab_size, max_sequence_length=
  encoder_seq_length (512), share_embeddings_and_output_weights (true),
  position_embedding_type (learned_absolute), rotary_percent=rotary_percentage (1.0),
  rotary_base (10000))``; the checkpoint's keys are the ``MegatronGPTModel``'s, i.e. the
  GPTModel's under ``model.``; they are loaded with ``load_state_dict(strict=True)`` apart from
  ``_extra_state`` entries.

Harness-only settings: ``use_cpu_initialization`` and no initialization, fp32, and the CPU
workarounds of mcore_forward / mcore_names (``cpu_shims``).

``nemo1_logits(jobs, tokens)``: ``jobs`` is a list of ``{"dir": NEMO_DIR}`` (optionally
``"drop": [config keys]`` removed from the config before building, ``"a.b"`` for key ``b`` of
mapping ``a``, ``"swap": [a, b]`` two
checkpoint tensors exchanged, a negative control); returns per job the logits
``[1, len(tokens), padded vocab]`` or ``{"error": message}`` when megatron-core refuses to build
or load the model.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

_HERE = Path(__file__).parent


def nemo1_logits(jobs: list[dict], tokens: list[int]) -> list:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(Path(__file__)), json.dumps(jobs),
                          json.dumps(tokens)], capture_output=True, text=True, env=env,
                         timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"NeMo 1 model build failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _activation(torch, cfg: dict):
    """NeMo's activation_to_func (the activations it supports that are not squared-relu)."""
    name = cfg.get("activation", "gelu")
    if cfg.get("openai_gelu", False):
        from megatron.core.transformer.utils import openai_gelu
        return openai_gelu
    if name in ("gelu", "geglu", "fast-geglu"):
        return torch.nn.functional.gelu
    if name in ("reglu", "fast-reglu"):
        return torch.nn.functional.relu
    if name in ("swiglu", "fast-swiglu"):
        return torch.nn.functional.silu
    raise ValueError(f"activation {name!r} is not one of NeMo's")


def transformer_config(torch, cfg: dict):
    """NeMo 1's build_transformer_config for a model config ``cfg`` (see the docstring)."""
    import dataclasses
    from megatron.core.transformer.transformer_config import (MLATransformerConfig,
                                                              TransformerConfig)
    norm = str(cfg.get("normalization", "layernorm")).lower()
    zero_centered = norm == "layernorm1p" or bool(cfg.get("layernorm_zero_centered_gamma", False))
    activation = cfg.get("activation", "gelu")
    mapping = {
        "apply_query_key_layer_scaling": False,
        "apply_residual_connection_post_layernorm": False,
        "layernorm_zero_centered_gamma": zero_centered,
        "add_bias_linear": cfg.get("bias", True),
        "add_qkv_bias": cfg.get("qkv_bias", False),
        "gated_linear_unit": activation.endswith("glu"),
        "activation_func": _activation(torch, cfg),
        "normalization": {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm",
                          "layernorm1p": "LayerNorm"}[norm],
        "attention_softmax_in_fp32": False,
        "bias_activation_fusion": cfg.get("bias_activation_fusion", True),
        "bias_dropout_fusion": cfg.get("bias_dropout_add_fusion", True),
        "apply_rope_fusion": cfg.get("apply_rope_fusion", False),
        "rotary_interleaved": cfg.get("rotary_interleaved", False),
        "fp8": None,
        # harness: CPU, fp32, no initialization (the weights are loaded)
        "use_cpu_initialization": True, "perform_initialization": False,
        "params_dtype": torch.float32, "pipeline_dtype": torch.float32,
        "bf16": False, "fp16": False,
    }
    cls = MLATransformerConfig if cfg.get("multi_latent_attention", False) else TransformerConfig
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in mapping:
            kwargs[f.name] = mapping[f.name]
        elif f.name in cfg:
            kwargs[f.name] = cfg[f.name]
    config = cls(**kwargs)
    for key, value in cfg.get("mcore_customization_config", {}).items():
        setattr(config, key, value)     # after model_specific_configs in NeMo: no key overlaps
    for key, value in {          # megatron_gpt_model's model_specific_configs, set afterwards
        "num_moe_experts": cfg.get("num_moe_experts", None),
        "moe_router_load_balancing_type": cfg.get("moe_router_load_balancing_type", "aux_loss"),
        "moe_router_topk": cfg.get("moe_router_topk", 2),
        "moe_grouped_gemm": cfg.get("moe_grouped_gemm", False),
        "moe_aux_loss_coeff": cfg.get("moe_aux_loss_coeff", 0),
        "moe_z_loss_coeff": cfg.get("moe_z_loss_coeff", None),
        "moe_input_jitter_eps": cfg.get("moe_input_jitter_eps", None),
        "moe_token_dropping": cfg.get("moe_token_dropping", False),
    }.items():
        setattr(config, key, value)
    return config


def build_model(torch, cfg: dict):
    """The GPTModel NeMo 1's model_provider_func builds for ``cfg`` (mcore_gpt only)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt import gpt_layer_specs as specs
    if not cfg.get("mcore_gpt", False):
        raise ValueError("not an mcore_gpt config")
    config = transformer_config(torch, cfg)
    name, use_te = cfg.get("name", ""), cfg.get("transformer_engine", False)
    nemo = None
    if name == "" and not use_te:
        spec = specs.get_gpt_layer_local_spec(config.num_moe_experts, config.moe_grouped_gemm)
    elif name == "decoder_block_gpt":
        spec = specs.get_gpt_decoder_block_spec(config, use_te)
    elif name == "megatron_gemma2":
        nemo = _nemo_gemma2()
        spec = _gemma2_block_spec(config, nemo["Gemma2DotProductAttention"])
    else:
        raise ValueError(f"layer spec {name!r} (transformer_engine={use_te}) is not built here")
    model = GPTModel(
        config=config, transformer_layer_spec=spec,
        vocab_size=cfg["override_vocab_size"],
        max_sequence_length=cfg.get("encoder_seq_length", 512),
        pre_process=True, post_process=True, parallel_output=True,
        share_embeddings_and_output_weights=cfg.get("share_embeddings_and_output_weights", True),
        position_embedding_type=cfg.get("position_embedding_type", "learned_absolute"),
        rotary_percent=cfg.get("rotary_percentage", 1.0),
        rotary_base=cfg.get("rotary_base", 10000))
    if cfg.get("apply_embedding_scaling", False):       # mcore_model_customize
        nemo = nemo or _nemo_gemma2()
        _extend_instance(model.embedding, nemo["EmbeddingScalingMixin"])
    if cfg.get("mcore_customization_config", {}).get("final_logit_softcapping", 0):
        nemo = nemo or _nemo_gemma2()
        _extend_instance(model.output_layer, nemo["Gemma2OutputLayer"])
    return model


def _extend_instance(obj, mixin):
    """NeMo's extend_instance (nemo/collections/common/parts/utils.py): the mixin first."""
    obj.__class__ = type(obj.__class__.__name__, (mixin, obj.__class__), {})


def _te_modules():
    sys.path.insert(0, str(_HERE))
    from mcore_gemma import _modules
    return _modules(from_config=True)


def _gemma2_block_spec(config, core_attention):
    """NeMo's get_gemma2_layer_spec(), with mcore_gemma's Transformer Engine stand-ins, in the
    block megatron-core builds around a layer spec (its final norm TENorm when TE is present)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import (TransformerLayer,
                                                             TransformerLayerSubmodules)
    norm, column, row = _te_modules()
    layer = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        self_attention=ModuleSpec(
            module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(linear_qkv=column, core_attention=core_attention,
                                               linear_proj=row)),
        self_attn_bda=get_bias_dropout_add,
        mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column,
                                                            linear_fc2=row)),
        mlp_bda=get_bias_dropout_add))
    return TransformerBlockSubmodules(layer_specs=[layer] * config.num_layers, layer_norm=norm)


NEMO_GEMMA2 = ("get_swa", "logit_softcapping", "Gemma2DotProductAttention",
               "Gemma2OutputLayer", "EmbeddingScalingMixin")


def nemo_gemma2_source() -> Path:
    """NeMo 2.7.3's file holding NeMo's Gemma 2 modules (the module docstring)."""
    root = Path(os.environ.get("MAPC_NEMO_DIR") or Path(sys.prefix) / "nemo")
    return root / "nemo" / "collections" / "llm" / "gpt" / "model" / "gemma2.py"


def _nemo_gemma2() -> dict:
    """NeMo's Gemma 2 modules (:data:`NEMO_GEMMA2`), their definitions taken from
    :func:`nemo_gemma2_source` and executed with the megatron-core names that file imports."""
    import ast
    import math
    from typing import Callable, Optional
    import torch
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import MegatronModule, TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func
    from megatron.core.utils import divide
    text = nemo_gemma2_source().read_text()
    found = {node.name: ast.get_source_segment(text, node) for node in ast.parse(text).body
             if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in NEMO_GEMMA2}
    if set(found) != set(NEMO_GEMMA2):
        raise ValueError(f"{nemo_gemma2_source()} lacks {sorted(set(NEMO_GEMMA2) - set(found))}")
    found["get_swa"] = found["get_swa"].replace('device="cuda"', 'device="cpu"')   # CPU
    ns = dict(math=math, torch=torch, Tensor=torch.Tensor, nn=torch.nn, Optional=Optional,
              Callable=Callable, parallel_state=parallel_state,
              tensor_parallel=tensor_parallel, FusedScaleMaskSoftmax=FusedScaleMaskSoftmax,
              PackedSeqParams=PackedSeqParams, ColumnParallelLinear=ColumnParallelLinear,
              MegatronModule=MegatronModule, TransformerConfig=TransformerConfig,
              AttnMaskType=AttnMaskType, attention_mask_func=attention_mask_func,
              divide=divide)
    for name in NEMO_GEMMA2:
        exec(compile(found[name], str(nemo_gemma2_source()), "exec"), ns)
    return {name: ns[name] for name in NEMO_GEMMA2}


def _worker(jobs: list[dict], tokens: list[int]) -> list:
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    import yaml
    sys.path.insert(0, str(_HERE))
    from mcore_names import single_cpu_rank, end_single_cpu_rank, cpu_shims
    single_cpu_rank()
    ids = torch.tensor([tokens])
    pos = torch.arange(len(tokens)).unsqueeze(0)
    mask = torch.triu(torch.ones(1, 1, len(tokens), len(tokens)), diagonal=1).bool()
    results = []
    for job in jobs:
        root = Path(job["dir"])
        cfg = yaml.safe_load((root / "model_config.yaml").read_text())
        for key in job.get("drop", ()):     # "a.b": key b of the mapping a
            *path, leaf = key.split(".")
            node = cfg
            for part in path:
                node = node.get(part, {})
            node.pop(leaf, None)
        cpu_shims({"expert_bias": cfg.get("moe_router_enable_expert_bias"),
                   "mla": cfg.get("multi_latent_attention")})
        state = torch.load(root / "model_weights.ckpt", weights_only=True)
        sd = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        if job.get("swap"):
            a, b = job["swap"]
            sd[a], sd[b] = sd[b], sd[a]
        try:
            model = build_model(torch, cfg)
            missing, unexpected = model.load_state_dict(sd, strict=False)
            missing = [m for m in missing if not m.endswith("_extra_state")]
            if missing or unexpected:
                raise ValueError(f"state dict mismatch: missing {missing}, "
                                 f"unexpected {unexpected}")
        except (ValueError, AssertionError, RuntimeError) as e:
            results.append({"error": str(e)[:2000]})
            continue
        model.eval()
        with torch.no_grad():
            results.append(model(input_ids=ids, position_ids=pos, attention_mask=mask).tolist())
    end_single_cpu_rank()
    return results


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]), json.loads(sys.argv[2]))))
