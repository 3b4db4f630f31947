"""Ground truth from the real megatron-core for Gemma 2 / 3 as Megatron-Bridge builds them.

Megatron-Bridge builds Gemma with megatron-core's ``GPTModel``, ``TransformerLayer``,
``SelfAttention`` and ``MLP`` and a layer spec of Transformer Engine modules
(``gemma2_layer_spec`` / ``gemma3_layer_spec``): ``TELayerNormColumnParallelLinear`` for
``linear_qkv`` and ``linear_fc1`` (the pre-norm fused in, weight ``layer_norm_weight``), its own
``TERowParallelLinearLayerNorm`` for ``linear_proj`` and ``linear_fc2`` (a row-parallel linear
whose output goes through ``post_layernorm``), ``TENorm`` q/k layernorms (Gemma 3), and
``layernorm_zero_centered_gamma=True`` (every norm computes ``x * (1 + w)``), a GELU-tanh GLU,
the embedding scaled by ``sqrt(hidden)``.

Transformer Engine is not installed here, so the TE modules are stood in for by megatron-core's
own ``ColumnParallelLinear`` / ``RowParallelLinear`` with the same parameter names added
(:class:`LayerNormColumn`, :class:`RowLayerNorm`), and a zero-centered RMSNorm written here
(:class:`ZeroCenteredRMSNorm`, ``x / rms(x) * (1 + w)``, as TE's ``zero_centered_gamma``).
Everything else (the layer numbering over pipeline stages, QKV and fc1 partitions per tensor
rank, the padded, vocab-parallel embedding and output layer, the tied output copy on the last
stage, attention, the GLU) is megatron-core's.

``gemma_ranks(jobs, tp, pp)``: for each (cfg, ckpt), per (tp_rank, pp_rank) the model's
``state_dict`` names and shapes, after loading mapc's rank file from ``ckpt`` (Megatron
``release/mp_rank_TT[_PPP]``) with no key missing or unexpected. ``gemma_logits(jobs,
tokens)``: for each (cfg, model file), the logits of the tp=1 pp=1 model loaded from it
(``gemma_ranks`` computes them too, in its world re-initialized at tp=1: one start-up).

Distributed checkpoints (``torch_dist``, NeMo 2's ``weights/``) are loaded with megatron-core's
own ``dist_checkpointing.load`` of the model's ``sharded_state_dict()`` (mcore_forward's
``_dist_load``: strict ``raise_all``, or with ``unread`` the exact list of checkpoint keys the
model does not ask for), then ``load_state_dict(strict=True)``: in ``gemma_ranks``' tp x pp
world (``dist`` jobs, each rank's loaded ``state_dict()`` into ``out`` formatted with ``t`` and
``p``), and at tp=1 in place of a model file (a ``forward`` job whose file is a dict, the
variant of mcore_forward: ``dist``, ``prefix``, ``unread``, ``out``, and ``dist_save``: then
megatron-core's own torch_dist save of the loaded model, Megatron-LM's ``args`` with
``args`` over them). The CPU workarounds are mcore_names', mcore_forward's and mcore_dist's
(documented there).
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

_HERE = Path(__file__).parent


def gemma_ranks(jobs: list, tp: int, pp: int, forward=(), tokens=(),
                dist=()) -> tuple[list, list]:
    """For each (cfg, ckpt) of ``jobs`` (one world of tp * pp ranks builds them all in turn):
    {(tp_rank, pp_rank): {state_dict name: shape}}; then each (cfg, variant) of ``dist``
    loaded at tp x pp (see the module docstring); then, in the same world re-initialized at
    tp=1 pp=1, rank 0's logits of ``tokens`` for each (cfg, model file or variant) of
    ``forward``."""
    sys.path.insert(0, str(_HERE))
    from mcore_names import run_ranks
    jobs = [[cfg, str(ckpt)] for cfg, ckpt in jobs]
    forward = [[cfg, f if isinstance(f, dict) else str(f)] for cfg, f in forward]
    with tempfile.TemporaryDirectory(prefix="mcore_gemma_") as out:
        run_ranks(tp * pp, [os.path.abspath(__file__), "ranks", json.dumps(jobs), str(tp),
                            str(pp), out, json.dumps(forward), json.dumps(list(tokens)),
                            json.dumps(list(dist))],
                  Path(out), {"PYTHONPATH": str(_HERE.parents[1]) + os.pathsep
                              + os.environ.get("PYTHONPATH", "")}, "megatron-core gemma",
                  cwd=str(_HERE.parents[1]))
        results = []
        for j in range(len(jobs)):
            got = {}
            for r in range(tp * pp):
                d = json.loads(Path(out, f"rank{r}.{j}.json").read_text())
                got[(d["tp"], d["pp"])] = d["shapes"]
            results.append(dict(sorted(got.items())))
        logits = json.loads(Path(out, "logits.json").read_text()) if forward else []
    return results, logits


def gemma_logits(jobs: list, tokens: list[int]) -> list:
    """For each (cfg, tp=1 pp=1 model file) of ``jobs``: the logits of ``tokens`` (one
    process)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    jobs = [[cfg, str(f)] for cfg, f in jobs]
    out = subprocess.run([sys.executable, str(Path(__file__)), "logits", json.dumps(jobs),
                          json.dumps(tokens)],
                         capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"megatron-core forward failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- worker side

def _modules(from_config: bool = False):
    """The TE stand-ins. Their RMSNorms are zero-centered (``x / rms(x) * (1 + w)``), or with
    ``from_config`` zero-centered as ``config.layernorm_zero_centered_gamma`` says (as TE's
    modules take ``zero_centered_gamma`` from it; Megatron-Bridge's provider sets it)."""
    import torch
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    def zero_centered(x, w, eps, centered=True):
        """RMSNorm with zero-centered gamma: x / rms(x) * (1 + w), in fp32 (x * w if not
        ``centered``)."""
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return (y * ((1.0 if centered else 0.0) + w.float())).to(x.dtype)

    def centered_by(config):
        return bool(config.layernorm_zero_centered_gamma) if from_config else True

    class ZeroCenteredRMSNorm(torch.nn.Module):
        def __init__(self, config, hidden_size, eps=None):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(hidden_size))
            self.eps = config.layernorm_epsilon if eps is None else eps
            self.centered = centered_by(config)

        def forward(self, x):
            return zero_centered(x, self.weight, self.eps, self.centered)

    class LayerNormColumn(ColumnParallelLinear):
        """TELayerNormColumnParallelLinear's names: the pre-norm's weight is
        ``layer_norm_weight`` [input_size], applied before the column-parallel linear."""

        def __init__(self, input_size, output_size, *args, config, **kwargs):
            super().__init__(input_size, output_size, *args, config=config, **kwargs)
            self.layer_norm_weight = torch.nn.Parameter(torch.zeros(input_size))
            self.eps = config.layernorm_epsilon
            self.centered = centered_by(config)

        def forward(self, x, *args, **kwargs):
            return super().forward(zero_centered(x, self.layer_norm_weight, self.eps,
                                                 self.centered), *args, **kwargs)

    class RowLayerNorm(RowParallelLinear):
        """Megatron-Bridge's TERowParallelLinearLayerNorm: the output goes through
        ``post_layernorm``."""

        def __init__(self, input_size, output_size, *args, config, **kwargs):
            super().__init__(input_size, output_size, *args, config=config, **kwargs)
            self.post_layernorm = ZeroCenteredRMSNorm(config, output_size)

        def forward(self, x):
            out, bias = super().forward(x)
            assert bias is None
            return self.post_layernorm(out), bias

    return ZeroCenteredRMSNorm, LayerNormColumn, RowLayerNorm


def build_gemma(cfg: dict, tp: int, pp: int):
    import torch
    from megatron.core import parallel_state
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import (TransformerLayer,
                                                             TransformerLayerSubmodules)
    norm, column, row = _modules()
    config = TransformerConfig(
        num_layers=int(cfg["layers"]), hidden_size=int(cfg["hidden"]),
        ffn_hidden_size=int(cfg["ffn"]), num_attention_heads=int(cfg["heads"]),
        num_query_groups=int(cfg["groups"]), kv_channels=int(cfg["head_dim"]),
        normalization="RMSNorm", gated_linear_unit=True,
        activation_func=lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
        add_bias_linear=False, qk_layernorm=bool(cfg.get("qk_layernorm")),
        layernorm_epsilon=float(cfg["norm_eps"]), hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        use_cpu_initialization=True, perform_initialization=False,
        params_dtype=torch.float32, pipeline_dtype=torch.float32)
    qk = norm if cfg.get("qk_layernorm") else None
    spec = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        self_attention=ModuleSpec(
            module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(linear_qkv=column,
                                               core_attention=DotProductAttention,
                                               linear_proj=row, q_layernorm=qk,
                                               k_layernorm=qk)),
        self_attn_bda=get_bias_dropout_add,
        mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column,
                                                            linear_fc2=row)),
        mlp_bda=get_bias_dropout_add))
    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=int(cfg["vocab"]),
                     max_sequence_length=64, pre_process=first, post_process=last,
                     share_embeddings_and_output_weights=bool(cfg["tied"]),
                     position_embedding_type="rope", rotary_base=int(cfg["rotary_base"]))
    if last:      # the final norm is zero-centered too (TENorm in Megatron-Bridge)
        model.decoder.final_layernorm = norm(config, int(cfg["hidden"]), float(cfg["norm_eps"]))
    if first:     # Megatron-Bridge's EmbeddingScalingMixin: embeddings * sqrt(hidden)
        embed = model.embedding.forward
        scale = math.sqrt(int(cfg["hidden"]))

        def scaled(*a, **k):
            out = embed(*a, **k)
            return out * torch.tensor(scale, dtype=out.dtype)
        model.embedding.forward = scaled
    return model


def _load(path):
    import argparse

    import torch
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)["model"]


def _dist_patches(torch):
    """What megatron-core's dist_checkpointing needs on CPU (mcore_dist's patches) and the
    common.pt classes it registers (a safe_globals context dropped them again on exit)."""
    from tests.groundtruth.mcore_dist import _patch_cuda
    from megatron.core.safe_globals import register_safe_globals
    _patch_cuda(torch)
    register_safe_globals()


def _ranks_worker(jobs, tp, pp, out, forward, tokens, dists):
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    torch.Tensor.cuda = lambda self, *a, **k: self
    sys.path.insert(0, str(_HERE))
    import torch.distributed as dist
    rank = int(os.environ["RANK"])
    dist.init_process_group(backend="gloo", rank=rank, world_size=tp * pp)
    from megatron.core import parallel_state
    for j, (cfg, ckpt) in enumerate(jobs):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                 pipeline_model_parallel_size=pp)
        t = parallel_state.get_tensor_model_parallel_rank()
        p = parallel_state.get_pipeline_model_parallel_rank()
        model = build_gemma(cfg, tp, pp)
        name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
        state = _load(Path(ckpt, "release", name, "model_optim_rng.pt"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not m.endswith("_extra_state")]
        if missing or unexpected:
            raise SystemExit(f"{name}: missing {missing}, unexpected {unexpected}")
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()
                  if not k.endswith("_extra_state")}
        Path(out, f"rank{rank}.{j}.json").write_text(
            json.dumps({"tp": t, "pp": p, "shapes": shapes}))
        parallel_state.destroy_model_parallel()
    for cfg, v in dists:
        from mcore_forward import _dist_load
        _dist_patches(torch)
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                 pipeline_model_parallel_size=pp)
        t = parallel_state.get_tensor_model_parallel_rank()
        p = parallel_state.get_pipeline_model_parallel_rank()
        _dist_load(torch, build_gemma(cfg, tp, pp), dict(v, out=v["out"].format(t=t, p=p)))
        parallel_state.destroy_model_parallel()
    if forward:
        logits = _forward(forward, tokens)     # every rank joins the collectives of the setup
        if rank == 0:
            Path(out, "logits.json").write_text(json.dumps(logits))
    dist.destroy_process_group()


def _logits_worker(jobs, tokens):
    import torch.distributed as dist
    dist.init_process_group(backend="gloo", rank=0, world_size=1)
    out = _forward(jobs, tokens)
    dist.destroy_process_group()
    return out


def _forward(jobs, tokens):
    import contextlib
    import types
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    torch.cuda.current_device = lambda: "cpu"
    from megatron.core import parallel_state, tensor_parallel
    null = types.SimpleNamespace(fork=lambda *a, **k: contextlib.nullcontext())
    tensor_parallel.get_cuda_rng_tracker = lambda *a, **k: null
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1,
                                             pipeline_model_parallel_size=1)
    ids = torch.tensor([tokens])
    pos = torch.arange(len(tokens)).unsqueeze(0)
    mask = torch.triu(torch.ones(1, 1, len(tokens), len(tokens)), diagonal=1).bool()
    out = []
    for cfg, model_file in jobs:
        model = build_gemma(cfg, 1, 1)
        if isinstance(model_file, dict):        # a distributed checkpoint (module docstring)
            sys.path.insert(0, str(_HERE))
            from mcore_forward import _dist_load, _dist_save
            _dist_patches(torch)
            torch.cuda.current_device = lambda: "cpu"
            _dist_load(torch, model, model_file)
            if model_file.get("dist_save"):
                _dist_save(torch, model, cfg, model_file)
        else:
            missing, unexpected = model.load_state_dict(_load(model_file), strict=False)
            missing = [m for m in missing if not m.endswith("_extra_state")]
            if missing or unexpected:
                raise SystemExit(f"missing {missing}, unexpected {unexpected}")
        model.eval()
        with torch.no_grad():
            out.append(model(input_ids=ids, position_ids=pos, attention_mask=mask).tolist())
    parallel_state.destroy_model_parallel()
    return out


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "ranks":
        _, _, jobs, tp, pp, out, forward, toks, dists = sys.argv
        _ranks_worker(json.loads(jobs), int(tp), int(pp), out, json.loads(forward),
                      json.loads(toks), json.loads(dists))
    else:
        _, _, jobs, toks = sys.argv
        print(json.dumps(_logits_worker(json.loads(jobs), json.loads(toks))))
