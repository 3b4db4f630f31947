"""Ground truth from the real megatron-core: distributed (``torch_dist``) checkpoints.

``save_checkpoint(root, cfg, tp, pp, dtype, truth)`` builds the GPTModel of ``cfg`` on every
(tp, pp) rank (``mcore_names.build_gpt``, local spec, gloo, one subprocess per rank), fills
its parameters with seeded random values and saves what Megatron-LM's ``save_checkpoint``
saves for ``--ckpt-format torch_dist``: ``dist_checkpointing.save`` of ``{"model":
model.sharded_state_dict(), "args", "checkpoint_version", "iteration",
"opt_param_scheduler"}`` into ``root/iter_NNNNNNN/`` (megatron-core writes ``.metadata``,
``__R_K.distcp``, ``common.pt`` and ``metadata.json`` there) with ``content_metadata`` as
Megatron-LM passes it, plus ``root/latest_checkpointed_iteration.txt``. Each rank also
``torch.save``s its live local ``state_dict()`` into ``truth/live_T_P.pt``: the shards the
checkpoint was made from.

``load_checkpoint(ckpt, cfg, tp, pp, dtype, out, tokens=None)`` builds the model at (tp, pp)
afresh and loads ``ckpt`` into it with megatron-core's own ``dist_checkpointing.load``
(strict: every key the model asks for must be in the checkpoint) and ``load_state_dict``,
then saves each rank's loaded local ``state_dict()`` into ``out/loaded_T_P.pt``. With
``tokens`` (tp = pp = 1 only) it also runs megatron-core's forward on them and saves the
logits (``[1, seq, padded vocab]``, fp32) into ``out/logits.pt``.

CPU workarounds (test harness only, inside the workers): ``Tensor.cuda`` is the identity,
``torch.cuda.current_device()`` is 0, ``torch.cuda.synchronize`` does nothing,
``torch.tensor/empty/zeros/ones/full/arange`` given a CUDA or integer device make CPU
tensors and ``Tensor.to(device=0)`` stays on
the CPU. The forward runs in fp32 at
tp = pp = 1: megatron-core's local spec is plain torch on CPU, but its pipeline schedules need
CUDA streams, so a tp/pp > 1 forward is not run here.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ITERATION = 7
_TIMEOUT_S = 300
HERE = Path(__file__).resolve()


def iter_dir(root: Path) -> Path:
    return Path(root) / f"iter_{ITERATION:07d}"


def _run(mode: str, cfg: dict, tp: int, pp: int, dtype: str, a: Path, b: Path | None,
         extra: dict | None = None, dp: int = 1):
    from tests.groundtruth.mcore_names import run_ranks
    root = str(HERE.parents[2])
    a.mkdir(parents=True, exist_ok=True)
    run_ranks(tp * pp * dp, [str(HERE), mode, json.dumps(cfg), str(tp), str(pp), dtype, str(a),
                        str(b or ""), json.dumps(extra or {})], a,
              {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")},
              "megatron-core dist-checkpoint worker", timeout=_TIMEOUT_S, cwd=root)


def save_checkpoint(root: Path, cfg: dict, tp: int, pp: int, dtype: str, truth: Path,
                    seed: int = 0, dp: int = 1, optimizer: bool = False) -> Path:
    """A torch_dist checkpoint saved by megatron-core at (tp, pp, dp); live shards into truth.
    With ``optimizer``, the model is wrapped in megatron-core's DDP and a DistributedOptimizer
    (Adam) takes one step on seeded gradients; its dp_reshardable state is saved too."""
    root, truth = Path(root), Path(truth)
    truth.mkdir(parents=True, exist_ok=True)
    _run("save", cfg, tp, pp, dtype, truth, root, {"seed": seed, "optimizer": optimizer},
         dp=dp)
    (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    return root


def load_checkpoint(ckpt: Path, cfg: dict, tp: int, pp: int, dtype: str, out: Path,
                    tokens=None) -> Path:
    """Load ``ckpt`` with megatron-core into a fresh model at (tp, pp); save what was loaded."""
    if tokens is not None and tp * pp != 1:
        raise ValueError("the forward runs at tp = pp = 1 only")
    _run("load", cfg, tp, pp, dtype, Path(out), Path(ckpt),
         {"tokens": list(tokens) if tokens is not None else None})
    return Path(out)


# --------------------------------------------------------------------------------- worker
def _patch_cuda(torch):
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda *a, **k: None
    def on_cpu(make):
        def build(*a, **k):
            dev = k.get("device")
            if isinstance(dev, int) or str(dev).startswith("cuda"):
                k["device"] = "cpu"
            return make(*a, **k)
        return build
    for name in ("tensor", "empty", "zeros", "ones", "full", "arange"):
        setattr(torch, name, on_cpu(getattr(torch, name)))
    to = torch.Tensor.to

    def to_cpu(self, *a, **k):
        # rotary embeddings move their frequencies to torch.cuda.current_device() (0)
        dev = k.get("device")
        if isinstance(dev, int) or str(dev).startswith("cuda"):
            k["device"] = "cpu"
        return to(self, *a, **k)
    torch.Tensor.to = to_cpu
    type_of = torch.Tensor.type

    def type_name(self, *a, **k):
        # the optimizers dispatch on the CUDA tensor type names
        out = type_of(self, *a, **k)
        if not a and not k and out in ("torch.HalfTensor", "torch.BFloat16Tensor",
                                       "torch.FloatTensor"):
            return out.replace("torch.", "torch.cuda.")
        return out
    torch.Tensor.type = type_name


def _args(cfg, tp, pp, dtype):
    """What Megatron-LM's common.pt carries under 'args' (the fields --load reads back), with
    megatron enums and a torch dtype among them, as Megatron-LM's own args have."""
    import argparse

    import torch
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend, CudaGraphScope
    vocab = int(cfg["vocab"])
    multiple = int(cfg.get("vocab_multiple", 128))
    padded = -(-vocab // (multiple * tp)) * multiple * tp
    return argparse.Namespace(
        num_layers=cfg["layers"], hidden_size=cfg["hidden"],
        num_attention_heads=cfg["heads"], num_query_groups=cfg["groups"],
        group_query_attention=cfg["groups"] != cfg["heads"], kv_channels=cfg["head_dim"],
        ffn_hidden_size=cfg["ffn"], vocab_size=vocab, padded_vocab_size=padded,
        make_vocab_size_divisible_by=multiple,
        untie_embeddings_and_output_weights=not cfg["tied"], norm_epsilon=1e-5,
        rotary_base=10000, max_position_embeddings=cfg.get("max_seq", 128),
        seq_length=cfg.get("max_seq", 128), normalization="RMSNorm", swiglu=True,
        position_embedding_type="rope", add_bias_linear=False, add_qkv_bias=False,
        add_position_embedding=False, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, bf16=dtype == "bf16", fp16=dtype == "fp16",
        params_dtype={"fp32": torch.float32, "bf16": torch.bfloat16,
                      "fp16": torch.float16}[dtype],
        use_distributed_optimizer=False, ckpt_format="torch_dist", iteration=ITERATION,
        attention_backend=AttnBackend.auto, model_type=ModelType.encoder_or_decoder,
        cuda_graph_scope=[CudaGraphScope.attn])


def _worker(mode, cfg, tp, pp, dtype, a, b, extra):
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    _patch_cuda(torch)
    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(backend="gloo", rank=rank, world_size=world)
    from megatron.core import dist_checkpointing, parallel_state
    from tests.groundtruth.mcore_names import build_gpt
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=pp)
    d = parallel_state.get_data_parallel_rank()
    t = parallel_state.get_tensor_model_parallel_rank()
    p = parallel_state.get_pipeline_model_parallel_rank()
    pdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    # Megatron-LM builds the model with the padded vocabulary and, for bf16/fp16, wraps it in
    # Float16Module, which casts every parameter (norms too) to the training dtype
    model = build_gpt(dict(cfg, vocab=_args(cfg, tp, pp, dtype).padded_vocab_size), tp, pp,
                      params_dtype=pdt)
    if pdt != torch.float32:
        from megatron.core.transformer.module import Float16Module
        model = Float16Module(model.config, model).module
    # what Megatron-LM passes as sharded_sd_metadata for the model with the default flags
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                "distrib_optim_sharding_type": "dp_reshardable"}
    if mode == "save":
        import zlib
        with torch.no_grad():
            for name, param in model.named_parameters():
                sharded = getattr(param, "tensor_model_parallel", False)
                g = torch.Generator().manual_seed(zlib.crc32(
                    f"{name}|{p}|{t if sharded else -1}|{extra.get('seed', 0)}".encode()))
                param.copy_(torch.randn(param.shape, generator=g) * 0.1
                            + (1.0 if param.ndim == 1 else 0.0))
        if cfg["tied"] and pp > 1:
            # as at construction: the last stage's copy of the embedding becomes the first's
            model.setup_embeddings_and_output_layer()
        state = {"args": _args(cfg, tp, pp, dtype), "checkpoint_version": 3.0,
                 "iteration": ITERATION, "model": model.sharded_state_dict(metadata=metadata),
                 "opt_param_scheduler": {"max_lr": 1e-3, "num_steps": ITERATION}}
        if extra.get("optimizer"):
            state["optimizer"] = _step_distributed_optimizer(torch, dist, model, dtype, pdt,
                                                             t, p, state["model"], metadata)
        out = iter_dir(b)
        out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(state, str(out), content_metadata=metadata)
        live = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        if d == 0:
            torch.save(live, Path(a) / f"live_{t}_{p}.pt")
    else:
        tracker = (Path(b) / "latest_checkpointed_iteration.txt").read_text().strip()
        sub = "release" if tracker == "release" else f"iter_{int(tracker):07d}"
        sharded = {"model": model.sharded_state_dict(metadata=metadata)}
        loaded = dist_checkpointing.load(sharded, str(Path(b) / sub),
                                         strict="raise_all")
        model.load_state_dict(loaded["model"], strict=True)
        live = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        torch.save(live, Path(a) / f"loaded_{t}_{p}.pt")
        common = torch.load(Path(b) / sub / "common.pt", weights_only=False)
        if rank == 0:
            torch.save({k: v for k, v in common.items() if k != "args"} |
                       {"args": vars(common["args"]) if "args" in common else None},
                       Path(a) / "common.pt")
        tokens = extra.get("tokens")
        if tokens is not None:
            ids = torch.tensor([tokens], dtype=torch.long)
            pos = torch.arange(len(tokens)).unsqueeze(0)
            mask = torch.triu(torch.ones(1, 1, len(tokens), len(tokens), dtype=torch.bool), 1)
            model.eval()   # no dropout: the CUDA RNG tracker's fork is not needed
            import contextlib
            from megatron.core.tensor_parallel import random as mcore_random
            mcore_random.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
            with torch.no_grad():
                logits = model(ids, pos, mask)
            torch.save(logits.float(), Path(a) / "logits.pt")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _step_distributed_optimizer(torch, dist, model, dtype, pdt, t, p, model_sd, metadata):
    """Wrap ``model`` in megatron-core's DDP (distributed optimizer buffers), build the
    DistributedOptimizer (Adam), take one step on seeded gradients and return its sharded state
    dict. The grad norm is computed in plain torch (megatron-core's needs a CUDA kernel)."""
    import zlib

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer import optimizer as mcore_optimizer

    def grad_norm(grads, norm_type=2, grad_stats_parallel_group=None):
        total = torch.zeros(1)
        for g in grads:
            total += g.float().pow(2).sum()
        if grad_stats_parallel_group is not None:
            dist.all_reduce(total, group=grad_stats_parallel_group)
        return float(total.sqrt())
    mcore_optimizer.get_grad_norm_fp32 = grad_norm
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True, overlap_grad_reduce=False),
        model)
    config = OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1, adam_beta1=0.9,
                             adam_beta2=0.95, adam_eps=1e-8, bf16=dtype == "bf16",
                             params_dtype=pdt, use_distributed_optimizer=True, clip_grad=0.0)
    opt = get_megatron_optimizer(config, [ddp])
    for name, param in ddp.module.named_parameters():
        sharded = getattr(param, "tensor_model_parallel", False)
        g = torch.Generator().manual_seed(zlib.crc32(f"{name}|{p}|{t if sharded else -1}|g"
                                                     .encode()))
        param.main_grad.copy_(torch.randn(param.shape, generator=g))
    ddp.start_grad_sync()
    ddp.finish_grad_sync()
    ok, _, _ = opt.step()
    assert ok, "the optimizer step was skipped"
    return opt.sharded_state_dict(model_sd, is_loading=False, metadata=metadata)


if __name__ == "__main__":
    mode, cfg_json, tp, pp, dtype, a, b, extra = sys.argv[1:9]
    _worker(mode, json.loads(cfg_json), int(tp), int(pp), dtype, a, b or None, json.loads(extra))
