"""Ground truth from the real megatron-core: state-dict names and shapes.

Builds a Llama-style ``GPTModel`` (local spec, ``get_gpt_layer_local_spec``)
with the real megatron-core on CPU, once per ``(tp_rank, pp_rank)``, and
reports ``{state_dict key: shape}`` for each rank.  Keys ending in
``_extra_state`` are dropped.

Every rank runs in its own subprocess (this file, run with ``--worker``)
under a gloo process group, because megatron-core's ``parallel_state``
needs a real ``torch.distributed`` world of size ``tp * pp``.  Each worker
writes one JSON file into a temporary directory; the parent collects them.

CPU workarounds (test harness only, applied only inside the worker):

* ``use_cpu_initialization=True`` and ``perform_initialization=False``:
  parameters are created with ``torch.empty`` on CPU, so the CUDA RNG
  tracker (``model_parallel_cuda_manual_seed``, which needs CUDA) is never
  used and is not seeded.
* ``torch.Tensor.cuda`` is replaced by the identity.  With tied embeddings
  and ``pp > 1``, ``LanguageModule.setup_embeddings_and_output_layer`` does
  ``weight.data = weight.data.cuda()`` before an all-reduce over the
  embedding group; on CPU the tensor simply stays put (gloo reduces CPU
  tensors).  Nothing else reached while building the model touches CUDA.
* ``meta=True`` (optional) also sets ``torch.set_default_device("meta")`` in
  the worker, so full-size configs allocate nothing (same names and shapes).

Usage as a script::

    python tests/groundtruth/mcore_names.py '{"hidden":64,"layers":4,...}' TP PP [--meta]

prints ``{"tp_rank,pp_rank": {name: shape}}`` as JSON on stdout.
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

__all__ = ["mcore_state_dict_shapes", "mcore_ranks", "CFG_KEYS"]

CFG_KEYS = ("hidden", "layers", "heads", "groups", "head_dim", "ffn", "vocab", "tied")

_WORKER_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mcore_state_dict_shapes(
    cfg: dict, tp: int, pp: int, *, meta: bool = False
) -> dict[tuple[int, int], dict[str, list[int]]]:
    """{(tp_rank, pp_rank): {state_dict key: shape}} of megatron-core's GPTModel (see _ranks)."""
    return {k: v["shapes"] for k, v in mcore_ranks(cfg, tp, pp, meta=meta).items()}


def mcore_ranks(cfg: dict, tp: int, pp: int, *, meta: bool = False) -> dict:
    """Like ``mcore_state_dict_shapes``, with each rank's ``{"shapes": {...}, "layers": [...]}``:
    ``layers`` are the global (0-based) numbers megatron-core gives the stage's layers, local
    index first (``TransformerLayer.layer_number - 1``)."""
    return _ranks(cfg, tp, pp, meta)


def _ranks(cfg: dict, tp: int, pp: int, meta: bool = False) -> dict:
    """(Behind ``mcore_state_dict_shapes`` and ``mcore_ranks``.) Build megatron-core GPTModel (local spec, get_gpt_layer_local_spec) for a Llama-style config
    on CPU with use_cpu_initialization=True, for every (tp_rank, pp_rank), and return
    {(tp_rank, pp_rank): {state_dict key: shape}} with `_extra_state` keys dropped.

    Optional cfg keys: ``layers_first_stage`` / ``layers_last_stage`` (passed as
    ``num_layers_in_first/last_pipeline_stage``, megatron-core's uneven-PP knobs) and
    ``max_seq`` (default 128; the shape of learned position embeddings, if any).

    Optional architecture keys (defaults give the Llama-style model above):
    ``norm`` ("RMSNorm" or "LayerNorm"), ``gated`` (True: SwiGLU fc1 of 2*ffn rows),
    ``activation`` ("silu", "gelu"; default "silu" if gated else "gelu"),
    ``linear_bias`` (``add_bias_linear``, default False), ``qkv_bias`` (``add_qkv_bias``,
    default False), ``position_embedding`` ("rope" or "learned_absolute").

    MTP: ``mtp`` (``mtp_num_layers``; megatron-core's MTP block on the last stage).

    MoE: ``experts`` (``num_moe_experts``, SequentialMLP experts, local spec) and ``topk``;
    the expert-parallel sizes come from ``parallel_state``.

    ``meta=True`` builds the model under ``torch.set_default_device("meta")`` so that
    full-size configs (e.g. 8B) cost no memory; names and shapes are identical.

    Raises RuntimeError (carrying a worker's stderr) if megatron-core rejects the
    configuration, e.g. ``layers % pp != 0`` without the uneven-PP keys.
    """
    missing = [k for k in CFG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"cfg is missing keys {missing}")
    return _variant_ranks(cfg, tp, pp, meta)[0]


def mcore_rank_variants(cfg: dict, tp: int, pp: int, variants: list[dict]) -> list[dict]:
    """``mcore_ranks`` of ``cfg`` and of ``cfg`` updated by each of ``variants``, built one
    after the other by the same processes (one world, one megatron-core import): each variant
    must fit the world of the first (its tp, pp, and ep * etp); a variant's ``grid_tp`` /
    ``grid_pp`` give it another tp x pp grid of the same world size."""
    return _variant_ranks(dict(cfg, then=list(variants)), tp, pp, False)


def _world(cfg: dict, tp: int, pp: int) -> int:
    ep = int(cfg.get("ep", 1))      # expert parallel: carved out of data parallel
    etp = cfg.get("etp")            # expert tensor parallel size (megatron-core: tp if unset)
    if etp is None:
        return tp * pp * ep
    return pp * math.lcm(tp, int(etp) * ep)     # the smallest world both rank grids fit


def _variant_ranks(cfg: dict, tp: int, pp: int, meta: bool) -> list[dict]:
    missing = [k for k in CFG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"cfg is missing keys {missing}")
    tp, pp = int(tp), int(pp)
    variants = [cfg] + [dict(cfg, **v) for v in cfg.get("then", ())]
    world = _world(cfg, tp, pp)
    if world < 1:
        raise ValueError("tp and pp must be >= 1")

    with tempfile.TemporaryDirectory(prefix="mcore_names_") as out_dir:
        run_ranks(world, [os.path.abspath(__file__), "--worker", json.dumps(cfg), str(tp),
                          str(pp), out_dir], Path(out_dir),
                  {"MCORE_NAMES_META": "1" if meta else "0"}, "megatron-core worker")

        results = []
        for vi, vcfg in enumerate(variants):
            ep, etp = int(vcfg.get("ep", 1)), vcfg.get("etp")
            result: dict = {}
            for rank in range(world):
                data = json.loads(Path(out_dir, f"rank{rank}.{vi}.json").read_text())
                if etp is not None and data["edp_rank"] != 0:
                    continue        # with etp: the ranks that save (expert data-parallel 0)
                key = (data["tp_rank"], data["pp_rank"]) + ((data["ep_rank"],) if ep > 1 else ())
                result[key] = {"shapes": data["shapes"], "layers": data["layers"]}
                if etp is not None:
                    result[key].update(etp_rank=data["etp_rank"], loaded=data.get("loaded"))
                elif data.get("loaded"):
                    result[key]["loaded"] = data["loaded"]
            if etp is None and len(result) != world:
                raise RuntimeError(f"expected {world} distinct ranks, got {sorted(result)}")
            results.append(dict(sorted(result.items())))
    return results


def run_ranks(world: int, argv: list[str], log_dir: Path, extra_env: dict, what: str,
              timeout: float | None = None, cwd: str | None = None) -> None:
    """Start ``world`` ranks of ``python ARGV...`` on a gloo group (RANK, WORLD_SIZE, a free
    MASTER_PORT; one thread each, no CUDA) and wait for all. Output goes to files, not pipes:
    a rank blocked on a full pipe would stall the collectives of all the others. A rank that
    fails or hangs kills the rest (their collectives would hang too); raises RuntimeError with
    the first failing rank's output."""
    env_base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                    WORLD_SIZE=str(world), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                    PYTHONWARNINGS="ignore", **extra_env)
    procs, logs = [], []
    for rank in range(world):
        log = open(Path(log_dir, f".rank{rank}.log"), "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, *argv], env=dict(env_base, RANK=str(rank), LOCAL_RANK=str(rank)),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd))
    failures = []  # (rank, reason, output)
    try:
        for rank, p in enumerate(procs):
            try:
                p.wait(timeout=timeout or _WORKER_TIMEOUT_S)
                reason = None if p.returncode == 0 else f"exit {p.returncode}"
            except subprocess.TimeoutExpired:
                reason = "timeout"
                for q in procs:
                    if q.poll() is None:
                        q.kill()
                p.wait()
            if reason:
                logs[rank].seek(0)
                failures.append((rank, reason, logs[rank].read()))
    finally:
        for q in procs:
            if q.poll() is None:
                q.kill()
                q.wait()
        for log in logs:
            log.close()
    if failures:
        rank, reason, err = failures[0]
        others = ", ".join(f"rank {r}: {why}" for r, why, _ in failures[1:])
        raise RuntimeError(f"{what} rank {rank} failed ({reason})"
                           + (f"; also {others}" if others else "")
                           + f"\n--- rank {rank} output (tail) ---\n{err[-5000:]}")


# --------------------------------------------------------------------------- worker


def _worker(cfg: dict, tp: int, pp: int, out_dir: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    # See module docstring: tied embeddings with pp > 1 call `.cuda()` on the
    # shared weight before all-reducing it.  Keep it on CPU.
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]

    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    dist.init_process_group(backend="gloo", rank=rank, world_size=world)

    from megatron.core import parallel_state

    extra = {}
    if cfg.get("etp") is not None:
        extra["expert_tensor_parallel_size"] = int(cfg["etp"])
    variants = [cfg] + [dict(cfg, **v) for v in cfg.get("then", ())]
    for vi, vcfg in enumerate(variants):
        _build_and_report(vcfg, tp, pp, rank, Path(out_dir, f"rank{rank}.{vi}.json"))
    dist.destroy_process_group()


def _build_and_report(cfg: dict, tp: int, pp: int, rank: int, path: Path) -> None:
    import torch
    from megatron.core import parallel_state
    # a variant may lay the same world out as another grid (tp=2 pp=1, then tp=1 pp=2)
    tp, pp = int(cfg.get("grid_tp", tp)), int(cfg.get("grid_pp", pp))
    extra = {}
    if cfg.get("etp") is not None:
        extra["expert_tensor_parallel_size"] = int(cfg["etp"])
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=int(cfg.get("ep", 1)), **extra,
    )
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    if os.environ.get("MCORE_NAMES_META") == "1":
        torch.set_default_device("meta")
    model = build_gpt(cfg, tp, pp)
    shapes = {
        k: list(v.shape)
        for k, v in model.state_dict().items()
        if not k.endswith("_extra_state")
    }
    tmp = path.with_suffix(".tmp")
    # megatron-core's own global numbering of this stage's layers (get_transformer_layer_offset
    # + local index; layer_number is 1-based)
    layers = [int(layer.layer_number) - 1 for layer in model.decoder.layers]
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    out = {"tp_rank": tp_rank, "pp_rank": pp_rank, "ep_rank": ep_rank, "shapes": shapes,
           "layers": layers}
    if cfg.get("etp") is not None:
        out.update(etp_rank=parallel_state.get_expert_tensor_parallel_rank(),
                   edp_rank=parallel_state.get_expert_data_parallel_rank())
    if cfg.get("load"):
        # Megatron-LM's legacy load: this rank's file by its tp/pp/ep ranks
        # (mp_rank_TT[_PPP][_EEE]), model.load_state_dict(strict=True)
        name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "") + \
            (f"_{ep_rank:03d}" if int(cfg.get("ep", 1)) > 1 else "")
        sd = torch.load(Path(cfg["load"], name, "model_optim_rng.pt"), map_location="cpu",
                        weights_only=False)
        model.load_state_dict(sd["model"], strict=True)
        out["loaded"] = name
    tmp.write_text(json.dumps(out))
    tmp.rename(path)
    parallel_state.destroy_model_parallel()


def single_cpu_rank() -> None:
    """One gloo rank of megatron-core on CPU at tp = pp = 1: no CUDA device, a CUDA RNG
    tracker that forks nothing (the forward scripts of mcore_forward and nemo1_forward)."""
    import contextlib
    import types
    import torch
    import torch.distributed as dist
    torch.cuda.current_device = lambda: "cpu"
    dist.init_process_group(backend="gloo", rank=0, world_size=1)
    from megatron.core import parallel_state, tensor_parallel
    null = types.SimpleNamespace(fork=lambda *a, **k: contextlib.nullcontext())
    tensor_parallel.get_cuda_rng_tracker = lambda *a, **k: null
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1,
                                             pipeline_model_parallel_size=1)


def end_single_cpu_rank() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def cpu_shims(cfg: dict) -> None:
    """Harness-only workarounds for building MoE / MLA models without CUDA or Transformer
    Engine (documented in tests/groundtruth/mcore_forward.py); idempotent."""
    import torch
    if cfg.get("expert_bias") or cfg.get("softmax_type"):
        # the router's expert_bias buffers and learnable softmax offsets are made on cuda
        torch.cuda.current_device = lambda: "cpu"
    from megatron.core.transformer.moe import moe_utils
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    if cfg.get("mla") and not getattr(cpu_shims, "mla_done", False):
        cpu_shims.mla_done = True
        from megatron.core.transformer import dot_product_attention as dpa
        init = dpa.DotProductAttention.__init__

        def mla_init(self, *a, k_channels=None, v_channels=None, **k):
            init(self, *a, **k)
            if v_channels is not None:
                self.hidden_size_per_partition = v_channels * \
                    self.num_attention_heads_per_partition
        dpa.DotProductAttention.__init__ = mla_init
        from megatron.core.transformer import multi_latent_attention as mla
        if not isinstance(mla.TELinear, type):     # isinstance(x, TELinear): plain False
            mla.TELinear = type("NoTransformerEngineLinear", (), {})


def seeded_fill(torch, model, tag) -> None:
    """Fill every parameter with ``randn * 0.1`` (+ 1 for 1-D ones: norms) seeded by the crc32
    of ``f"{name}|{tag(name, param)}"``."""
    import zlib
    with torch.no_grad():
        for name, param in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(f"{name}|{tag(name, param)}"
                                                         .encode()))
            param.copy_(torch.randn(param.shape, generator=g) * 0.1
                        + (1.0 if param.ndim == 1 else 0.0))


def build_gpt(cfg: dict, tp: int, pp: int, params_dtype=None, vp_stage=None):
    """The megatron-core GPTModel of ``cfg`` for this process's (tp, pp) rank; call after
    ``parallel_state.initialize_model_parallel`` (see ``_worker``). With ``cfg["vpp"]`` it is
    the chunk of virtual stage ``vp_stage`` (as Megatron-LM's ``get_model`` builds it)."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    params_dtype = params_dtype or torch.float32
    cpu_shims(cfg)
    extra = {}
    if cfg.get("layers_first_stage") is not None:
        extra["num_layers_in_first_pipeline_stage"] = int(cfg["layers_first_stage"])
    if cfg.get("layers_last_stage") is not None:
        extra["num_layers_in_last_pipeline_stage"] = int(cfg["layers_last_stage"])
    if cfg.get("experts"):
        extra.update(_moe_config(cfg))
    if cfg.get("softmax_type"):     # "learnable": attention sinks as core_attention.softmax_offset
        extra["softmax_type"] = cfg["softmax_type"]
    norm = cfg.get("norm", "RMSNorm")
    gated = bool(cfg.get("gated", True))
    from megatron.core.activations import quick_gelu
    from megatron.core.transformer.utils import openai_gelu     # GPT-2's tanh GELU
    activation = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
                  "quick_gelu": quick_gelu, "openai_gelu": openai_gelu}[cfg.get("activation", "silu" if gated else "gelu")]
    if cfg.get("mtp"):      # multi-token prediction layers (on the last stage)
        extra["mtp_num_layers"] = int(cfg["mtp"])
    if cfg.get("glu_offset") is not None:     # GPT-OSS's GLU: act(gate) * (up + offset)
        extra["glu_linear_offset"] = float(cfg["glu_offset"])
    if cfg.get("clamp") is not None:          # ... with gate and up clamped to the value
        extra["activation_func_clamp_value"] = float(cfg["clamp"])
    config_class = TransformerConfig
    if cfg.get("mla"):      # Multi-head Latent Attention: megatron-core's MLA config
        from megatron.core.transformer.transformer_config import MLATransformerConfig
        config_class = MLATransformerConfig
        extra.update(q_lora_rank=cfg["q_lora"], kv_lora_rank=int(cfg["kv_lora"]),
                     qk_head_dim=int(cfg["nope"]), qk_pos_emb_head_dim=int(cfg["rope"]),
                     v_head_dim=int(cfg["v_dim"]), rope_type="rope",
                     rotary_base=float(cfg.get("rotary_base", 10000)),
                     rotary_interleaved=bool(cfg.get("rotary_interleaved", False)))
    config = config_class(
        num_layers=int(cfg["layers"]),
        hidden_size=int(cfg["hidden"]),
        ffn_hidden_size=int(cfg["ffn"]),
        num_attention_heads=int(cfg["heads"]),
        num_query_groups=int(cfg["groups"]),
        kv_channels=int(cfg["head_dim"]),
        normalization=norm,
        gated_linear_unit=gated,
        activation_func=activation,
        add_bias_linear=bool(cfg.get("linear_bias", False)),
        add_qkv_bias=bool(cfg.get("qkv_bias", False)),
        qk_layernorm=bool(cfg.get("qk_layernorm", False)),
        layernorm_epsilon=float(cfg.get("norm_eps", 1e-5)),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        virtual_pipeline_model_parallel_size=cfg.get("vpp"),
        **extra,
    )
    if cfg.get("vpp"):
        extra_model = {"vp_stage": vp_stage}
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    else:
        extra_model = {}
        first = parallel_state.is_pipeline_first_stage()
        last = parallel_state.is_pipeline_last_stage()
    if cfg.get("experts"):
        # dense and MoE layers (moe_layer_freq): megatron-core's per-layer block spec
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
        layer_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                                normalization=norm)
    else:
        layer_spec = get_gpt_layer_local_spec(
            normalization=norm, qk_layernorm=bool(cfg.get("qk_layernorm", False)))
    if cfg.get("mtp"):      # megatron-core's MTP block: None on the stages that hold none
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec
        extra_model["mtp_block_spec"] = get_gpt_mtp_block_spec(
            config, layer_spec, use_transformer_engine=False, vp_stage=vp_stage)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=int(cfg["vocab"]),
        max_sequence_length=int(cfg.get("max_seq", 128)),
        pre_process=first,
        post_process=last,
        share_embeddings_and_output_weights=bool(cfg["tied"]),
        position_embedding_type=cfg.get("position_embedding", "rope"),
        rotary_base=int(cfg.get("rotary_base", 10000)),
        rotary_percent=float(cfg.get("rotary_percent", 1.0)),
        **extra_model,
    )


def _moe_config(cfg: dict) -> dict:
    """TransformerConfig fields of an MoE model: cfg keys ``experts``, ``moe_ffn``, ``topk``,
    ``moe_layer_freq`` (int or per-layer 0/1 list), ``pre_softmax`` (softmax over all experts
    before the top-k, i.e. unnormalized top-k weights), ``ep`` (expert-parallel size),
    ``score`` ("softmax" or "sigmoid"), ``expert_bias``, ``shared_ffn``, ``topk_scale``, ``etp``
    (expert tensor parallel size; default: parallel_state's)."""
    from megatron.core import parallel_state
    out = dict(num_moe_experts=int(cfg["experts"]),
               moe_ffn_hidden_size=int(cfg.get("moe_ffn") or cfg["ffn"]),
               moe_router_topk=int(cfg.get("topk", 2)),
               moe_layer_freq=cfg.get("moe_layer_freq", 1),
               moe_router_pre_softmax=bool(cfg.get("pre_softmax", False)),
               moe_router_score_function=cfg.get("score", "softmax"),
               moe_token_dispatcher_type="allgather", moe_grouped_gemm=False,
               moe_aux_loss_coeff=0.0, moe_router_load_balancing_type="none",
               expert_model_parallel_size=int(
                   cfg.get("ep") or parallel_state.get_expert_model_parallel_world_size()),
               expert_tensor_parallel_size=int(
                   cfg["etp"] if cfg.get("etp") is not None
                   else parallel_state.get_expert_tensor_parallel_world_size()))
    if cfg.get("expert_bias"):
        out["moe_router_enable_expert_bias"] = True
    if cfg.get("shared_ffn"):
        out["moe_shared_expert_intermediate_size"] = int(cfg["shared_ffn"])
    if cfg.get("groups_n"):
        out.update(moe_router_num_groups=int(cfg["groups_n"]),
                   moe_router_group_topk=int(cfg["group_topk"]))
    if cfg.get("topk_scale") is not None:
        out["moe_router_topk_scaling_factor"] = float(cfg["topk_scale"])
    return out


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "--worker":
        _, cfg_json, tp, pp, out_dir = argv
        _worker(json.loads(cfg_json), int(tp), int(pp), out_dir)
        return 0
    meta = "--meta" in argv
    argv = [a for a in argv if a != "--meta"]
    if len(argv) != 3:
        print(f"usage: {sys.argv[0]} CFG_JSON TP PP [--meta]", file=sys.stderr)
        return 2
    cfg_json, tp, pp = argv
    res = mcore_state_dict_shapes(json.loads(cfg_json), int(tp), int(pp), meta=meta)
    # one "name": shape per line, ranks in (tp_rank, pp_rank) order
    lines = []
    for (t, p), shapes in res.items():
        body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in shapes.items())
        lines.append(f" {json.dumps(f'{t},{p}')}: {{\n{body}\n }}")
    sys.stdout.write("{\n" + ",\n".join(lines) + "\n}\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
