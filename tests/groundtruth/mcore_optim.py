"""Ground truth from the real megatron-core optimizer: Megatron ``model_optim_rng.pt`` files
with optimizer state, written and loaded by megatron-core itself on CPU.

``save_checkpoint(root, cfg, tp, pp, dtype)`` builds the GPTModel of ``cfg`` on every
(tp, pp) rank (``mcore_names.build_gpt``, gloo process group, one subprocess per rank), builds
the real optimizer with ``megatron.core.optimizer.get_megatron_optimizer`` (Adam, the
non-distributed optimizer: ``FP32Optimizer`` for fp32, ``Float16OptimizerWithFloat16Params``
for bf16/fp16) and the real ``OptimizerParamScheduler``, takes ``STEPS`` steps on synthetic
gradients and saves what Megatron-LM's ``generate_state_dict`` saves for ``ckpt_format=torch``
(``args``, ``checkpoint_version``, ``iteration``, ``model``, ``optimizer``,
``opt_param_scheduler``) with ``torch.save`` into ``iter_XXXXXXX/mp_rank_TT[_PPP]/``, and
``names_T_P.json``: the parameter names of the live optimizer's groups, in index order.

``load_checkpoint(ckpt, cfg, tp, pp, dtype, out)`` builds the same model and optimizer afresh,
loads ``ckpt``'s files into them with ``model.load_state_dict`` and
``optimizer.load_state_dict`` / ``scheduler.load_state_dict`` (what Megatron-LM's
``load_checkpoint`` calls), and saves the *loaded* ``optimizer.state_dict()``, model and
scheduler per rank into ``out/rank{T}_{P}.pt`` for the test to compare.

Initial weights and gradients are seeded by (parameter name, pipeline rank, and tensor rank
only for tensor-parallel parameters), so replicated parameters stay equal across tp ranks.

``cfg["vpp"]`` (a virtual pipeline size, Megatron's interleaved schedule) builds one GPTModel
chunk per virtual stage on every rank, as Megatron-LM's ``get_model`` does
(``initialize_model_parallel(virtual_pipeline_model_parallel_size=)``, ``vp_stage=v``,
``pre_process``/``post_process`` of the virtual stage), one optimizer over all chunks, and saves
``model0``, ``model1``, ... instead of ``model`` (Megatron-LM's ``generate_state_dict``);
parameter names (and seeds) are then ``model{v}.NAME``, and ``layers_T_P.json`` maps each
chunk's ``model{v}.decoder.layers.{j}`` to megatron-core's own global ``layer_number`` - 1.

CPU workarounds (test harness only, inside the workers): ``Tensor.cuda`` is the identity,
``torch.tensor(..., device='cuda')`` makes CPU tensors, ``torch.cuda.current_device()`` is 0,
and ``Tensor.type()`` reports CPU half/bfloat16/float tensors under their ``torch.cuda.*``
names (``Float16OptimizerWithFloat16Params`` sorts parameters by those names). Without
Transformer Engine or apex megatron-core itself falls back to ``torch.optim.AdamW``.
Gradient clipping is off (``clip_grad=0``) and the grad norm the optimizer step logs is computed
in plain torch (megatron-core's ``get_grad_norm_fp32`` needs a CUDA multi-tensor kernel).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

STEPS = 2
ITERATION = 7      # the iteration the checkpoint claims (any non-release number)
_TIMEOUT_S = 300
HERE = Path(__file__).resolve()


def _run(mode: str, cfg: dict, tp: int, pp: int, dtype: str, a: Path, b: Path | None,
         dist: Path | None = None):
    from tests.groundtruth.mcore_names import run_ranks
    root = str(HERE.parents[2])
    a.mkdir(parents=True, exist_ok=True)
    run_ranks(tp * pp, [str(HERE), mode, json.dumps(cfg), str(tp), str(pp), dtype, str(a),
                        str(b or ""), str(dist or "")], a,
              {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")},
              "megatron-core optimizer worker", timeout=_TIMEOUT_S, cwd=root)


def save_checkpoint(root: Path, cfg: dict, tp: int, pp: int, dtype: str,
                    dist: Path | None = None) -> Path:
    """A Megatron torch-format checkpoint with optimizer state, saved by megatron-core. With
    ``dist``, the same trained model (all its chunks) is also saved there as a ``torch_dist``
    checkpoint, as Megatron-LM saves one (``dist_checkpointing.save`` of ``{"model" or
    "model0", "model1", ...: chunk.sharded_state_dict(), "args", ...}``; no optimizer)."""
    root = Path(root)
    _run("save", cfg, tp, pp, dtype, root, None, dist)
    (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    if dist is not None:
        (Path(dist) / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    return root


def load_checkpoint(ckpt: Path, cfg: dict, tp: int, pp: int, dtype: str, out: Path) -> Path:
    """Load ``ckpt`` into a fresh megatron-core model + optimizer; save what was loaded."""
    _run("load", cfg, tp, pp, dtype, Path(out), Path(ckpt))
    return Path(out)


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")


# --------------------------------------------------------------------------------- worker
def _patch_cuda(torch):
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.current_device = lambda: 0
    make = torch.tensor

    def tensor(*a, **k):
        if str(k.get("device", "")).startswith("cuda"):
            k["device"] = "cpu"
        return make(*a, **k)
    torch.tensor = tensor
    type_of = torch.Tensor.type

    def type_name(self, *a, **k):
        out = type_of(self, *a, **k)
        if not a and not k and out in ("torch.HalfTensor", "torch.BFloat16Tensor",
                                       "torch.FloatTensor"):
            return out.replace("torch.", "torch.cuda.")
        return out
    torch.Tensor.type = type_name


def _seed(name: str, tp_rank: int, pp_rank: int, sharded: bool, salt: int) -> int:
    import zlib
    return zlib.crc32(f"{name}|{pp_rank}|{tp_rank if sharded else -1}|{salt}".encode())


def _args(cfg, tp, pp, dtype):
    import argparse
    vocab = int(cfg["vocab"])
    return argparse.Namespace(
        num_layers=cfg["layers"], hidden_size=cfg["hidden"],
        num_attention_heads=cfg["heads"], num_query_groups=cfg["groups"],
        group_query_attention=cfg["groups"] != cfg["heads"], kv_channels=cfg["head_dim"],
        ffn_hidden_size=cfg["ffn"], vocab_size=vocab, padded_vocab_size=vocab,
        make_vocab_size_divisible_by=cfg.get("vocab_multiple", 128),
        untie_embeddings_and_output_weights=not cfg["tied"], norm_epsilon=1e-5,
        rotary_base=10000, max_position_embeddings=cfg.get("max_seq", 128),
        seq_length=cfg.get("max_seq", 128), normalization="RMSNorm", swiglu=True,
        position_embedding_type="rope", add_bias_linear=False, add_qkv_bias=False,
        add_position_embedding=False, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, bf16=dtype == "bf16", fp16=dtype == "fp16",
        params_dtype=dtype, use_distributed_optimizer=False, ckpt_format="torch",
        lr=1e-3, min_lr=1e-5, weight_decay=0.1,
        virtual_pipeline_model_parallel_size=cfg.get("vpp"),
        # uneven stages (only when set) as Megatron-LM's args hold them
        # (--decoder-first/last-pipeline-num-layers) and as its TransformerConfig names them
        **{k: cfg[c] for c, keys in (
            ("layers_first_stage", ("decoder_first_pipeline_num_layers",
                                    "num_layers_in_first_pipeline_stage")),
            ("layers_last_stage", ("decoder_last_pipeline_num_layers",
                                   "num_layers_in_last_pipeline_stage")))
           if cfg.get(c) is not None for k in keys})


def _worker(mode, cfg, tp, pp, dtype, a, b, dist_dir=None):
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    if dist_dir:    # dist_checkpointing also makes tensors on the CUDA device
        from tests.groundtruth.mcore_dist import _patch_cuda as patch_for_dist
        patch_for_dist(torch)
    else:
        _patch_cuda(torch)
    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(backend="gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from tests.groundtruth.mcore_names import build_gpt

    from megatron.core.optimizer import optimizer as mcore_optimizer

    def grad_norm(grads, norm_type=2, grad_stats_parallel_group=None):
        # megatron-core's get_grad_norm_fp32 uses a CUDA multi-tensor kernel; the same sum of
        # squares over the model-parallel group, in plain torch
        total = torch.zeros(1)
        for g in grads:
            total += g.float().pow(2).sum()
        if grad_stats_parallel_group is not None:
            dist.all_reduce(total, group=grad_stats_parallel_group)
        return float(total.sqrt())
    mcore_optimizer.get_grad_norm_fp32 = grad_norm
    vpp = cfg.get("vpp")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vpp)
    t = parallel_state.get_tensor_model_parallel_rank()
    p = parallel_state.get_pipeline_model_parallel_rank()
    pdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    chunks = [build_gpt(cfg, tp, pp, params_dtype=pdt, vp_stage=v) for v in range(vpp)] \
        if vpp else [build_gpt(cfg, tp, pp, params_dtype=pdt)]
    keys = [f"model{v}" for v in range(vpp)] if vpp else ["model"]
    prefix = [f"{k}." if vpp else "" for k in keys]

    def named_parameters():   # over all chunks, in the optimizer's order
        for pre, chunk in zip(prefix, chunks):
            for name, param in chunk.named_parameters():
                yield pre + name, param
    for chunk in chunks:
        # get_megatron_optimizer reads the DDP config of the (normally DDP-wrapped) chunk.
        chunk.ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=False)
    with torch.no_grad():
        for name, param in named_parameters():
            g = torch.Generator().manual_seed(_seed(name, t, p, getattr(
                param, "tensor_model_parallel", False), 0))
            param.copy_(torch.randn(param.shape, generator=g) * 0.1 + (1.0 if param.ndim == 1
                                                                        else 0.0))
    config = OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=1e-5, weight_decay=0.1,
                             adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
                             bf16=dtype == "bf16", fp16=dtype == "fp16", params_dtype=pdt,
                             use_distributed_optimizer=False, clip_grad=0.0,
                             initial_loss_scale=2.0 ** 12)
    opt = get_megatron_optimizer(config, chunks)
    sched = OptimizerParamScheduler(opt, init_lr=0.0, max_lr=1e-3, min_lr=1e-5,
                                    lr_warmup_steps=2, lr_decay_steps=20,
                                    lr_decay_style="cosine", start_wd=0.1, end_wd=0.1,
                                    wd_incr_steps=20, wd_incr_style="constant")
    if mode == "save":
        for step in range(STEPS):
            for name, param in named_parameters():
                g = torch.Generator().manual_seed(_seed(name, t, p, getattr(
                    param, "tensor_model_parallel", False), step + 1))
                param.main_grad = torch.randn(param.shape, generator=g)
                param.grad = None
            ok, _, _ = opt.step()
            assert ok, "the optimizer step was skipped"
            sched.step(increment=1)
            opt.zero_grad()
        sd = {"args": _args(cfg, tp, pp, dtype), "checkpoint_version": 3.0,
              "iteration": ITERATION}
        sd.update((k, c.state_dict_for_save_checkpoint()) for k, c in zip(keys, chunks))
        sd.update(optimizer=opt.state_dict(), opt_param_scheduler=sched.state_dict())
        d = Path(a) / f"iter_{ITERATION:07d}" / rank_dir(t, p, pp)
        d.mkdir(parents=True, exist_ok=True)
        torch.save(sd, d / "model_optim_rng.pt")
        # megatron-core's own global layer number of every chunk's local layer
        layers = {f"{pre}decoder.layers.{j}": layer.layer_number - 1
                  for pre, c in zip(prefix, chunks) for j, layer in enumerate(c.decoder.layers)}
        (Path(a) / f"layers_{t}_{p}.json").write_text(json.dumps(layers))
        # which parameter each optimizer index is, from the live optimizer's own groups
        name_of = {id(q): n for n, q in named_parameters()}
        inner = opt.chained_optimizers[0]
        for f16, main in zip(getattr(inner, "float16_groups", []),
                             getattr(inner, "fp32_from_float16_groups", [])):
            name_of.update({id(m): name_of[id(q)] for q, m in zip(f16, main)})
        groups = [[name_of[id(q)] for q in g["params"]] for g in inner.optimizer.param_groups]
        (Path(a) / f"names_{t}_{p}.json").write_text(json.dumps(groups))
        if dist_dir:
            from megatron.core import dist_checkpointing
            from tests.groundtruth import mcore_dist
            metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                        "distrib_optim_sharding_type": "dp_reshardable"}
            args = mcore_dist._args(cfg, tp, pp, dtype)
            args.virtual_pipeline_model_parallel_size = vpp
            state = {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION,
                     "opt_param_scheduler": sched.state_dict()}
            state.update((k, c.sharded_state_dict(metadata=metadata))
                         for k, c in zip(keys, chunks))
            out = Path(dist_dir) / f"iter_{ITERATION:07d}"
            out.mkdir(parents=True, exist_ok=True)
            dist.barrier()
            dist_checkpointing.save(state, str(out), content_metadata=metadata)
    else:
        from megatron.core.optimizer import ChainedOptimizer   # noqa: F401 (the real class)
        tracker = (Path(b) / "latest_checkpointed_iteration.txt").read_text().strip()
        sub = "release" if tracker == "release" else f"iter_{int(tracker):07d}"
        sd = torch.load(Path(b) / sub / rank_dir(t, p, pp) / "model_optim_rng.pt",
                        map_location="cpu", weights_only=False)
        for k, chunk in zip(keys, chunks):
            missing, unexpected = chunk.load_state_dict(sd[k], strict=False)
            missing = [m for m in missing if not m.endswith("_extra_state")]
            assert not missing and not unexpected, (k, missing, unexpected)
        opt.load_state_dict(sd["optimizer"])
        if "opt_param_scheduler" in sd:
            sched.load_state_dict(sd["opt_param_scheduler"])
        loaded = {"optimizer": opt.state_dict(), "opt_param_scheduler": sched.state_dict(),
                  "loss_scale": float(opt.get_loss_scale().item())}
        loaded.update((k, c.state_dict_for_save_checkpoint()) for k, c in zip(keys, chunks))
        torch.save(loaded, Path(a) / f"rank{t}_{p}.pt")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, cfg_json, tp, pp, dtype, a, b, dist_dir = sys.argv[1:9]
    _worker(mode, json.loads(cfg_json), int(tp), int(pp), dtype, a, b or None, dist_dir or None)
