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
import subprocess
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
                    seed: int = 0, dp: int = 1, optimizer: bool = False, also=()) -> Path:
    """A torch_dist checkpoint saved by megatron-core at (tp, pp, dp); live shards into truth.
    With ``optimizer``, the model is wrapped in megatron-core's DDP and a DistributedOptimizer
    (Adam) takes one step on seeded gradients; its dp_reshardable state is saved too, and each
    rank's live optimizer (DDP buffers, param_index_map, its pieces of the masters and moments,
    param groups, step) goes to ``truth/optim_T_P_D.pt``; ``also`` names other sharding types
    (e.g. ``fully_reshardable``) the same state is saved as, each into ``ROOT_<type>``. Then the
    run takes one more step (``_value_step``) and saves ``truth/stepped_T_P_D.pt``."""
    root, truth = Path(root), Path(truth)
    truth.mkdir(parents=True, exist_ok=True)
    _run("save", cfg, tp, pp, dtype, truth, root, {"seed": seed, "optimizer": optimizer,
                                                   "also": list(also)}, dp=dp)
    for r in [root] + [root.parent / f"{root.name}_{kind}" for kind in also
                       if not kind.startswith(NEMO2)]:
        (r / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    return root


# ``also`` kinds "nemo2_<sharding type>": the same state saved as NeMo 2's MegatronStrategy
# saves it (see _save_nemo2), into ROOT_<kind>/weights/
NEMO2 = "nemo2_"
# Lightning's entries of a NeMo 2 checkpoint's dict, in the shapes Lightning 2.x saves them
# (values made up for a run at step ITERATION): the fit loop's progress, one scheduler's
# state_dict, a ModelCheckpoint callback's state (which holds tensors)
NEMO2_LOOPS = {"fit_loop": {
    "state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": ITERATION},
    "epoch_loop.batch_progress": {
        "total": {"ready": ITERATION, "completed": ITERATION, "started": ITERATION,
                  "processed": ITERATION},
        "current": {"ready": ITERATION, "completed": ITERATION, "started": ITERATION,
                    "processed": ITERATION}, "is_last_batch": False},
    "epoch_progress": {"total": {"ready": 1, "completed": 0, "started": 1, "processed": 0},
                       "current": {"ready": 1, "completed": 0, "started": 1, "processed": 0}}}}
NEMO2_SCHEDULERS = [{"max_steps": 100, "warmup_steps": 2, "min_lr": 1e-5, "base_lrs": [1e-3],
                     "last_epoch": ITERATION, "_step_count": ITERATION + 1,
                     "_get_lr_called_within_step": False, "_last_lr": [9e-4]}]


def _save_nemo2(torch, dist, model, opt, root: Path, kind: str):
    """``dist_checkpointing.save`` of the dict NeMo 2's ``MegatronStrategy.save_checkpoint``
    hands ``MegatronCheckpointIO`` (nemo/lightning/pytorch/strategies/megatron_strategy.py,
    io/pl.py, _strategy_lib.optimizer_sharded_state_dict): Lightning's checkpoint entries,
    ``state_dict`` emptied, ``optimizer_states`` cleared, ``sharded_state_dict`` the model's
    with the prefix ``module.`` (MegatronParallel's), ``optimizer`` a one-element list of the
    DistributedOptimizer's sharded state dict of the model's (``_extra_state`` dropped), the
    content metadata NeMo's ``sharded_state_dict_metadata`` gives. With ``model`` a list (a
    virtual pipeline's chunks) the model's dict is ``MegatronParallel.sharded_state_dict``'s
    with ``vp_size`` set: ``{"model_0": chunk 0's, "model_1": ...}`` (each chunk's keys
    prefixed ``module.``, global layer numbers), which NeMo's ``_extra_state`` filter, looking
    at the top level only, leaves whole."""
    meta = {"distrib_optim_sharding_type": kind}
    model_sd = model.sharded_state_dict(prefix="module.", metadata=meta) \
        if not isinstance(model, list) else \
        {f"model_{v}": c.sharded_state_dict(prefix="module.", metadata=meta)
         for v, c in enumerate(model)}
    opt_sd = opt.sharded_state_dict({k: v for k, v in model_sd.items()
                                     if not k.endswith("_extra_state")},
                                    is_loading=False, metadata=meta)
    ckpt = {"epoch": 0, "global_step": ITERATION, "pytorch-lightning_version": "2.5.1",
            "state_dict": {}, "loops": NEMO2_LOOPS,
            "callbacks": {"ModelCheckpoint{'monitor': 'reduced_train_loss'}": {
                "monitor": "reduced_train_loss", "best_model_score": torch.tensor(2.5),
                "best_model_path": "/run/checkpoints/x", "best_k_models": {}}},
            "optimizer_states": {}, "lr_schedulers": NEMO2_SCHEDULERS,
            "sharded_state_dict": model_sd, "optimizer": [opt_sd]}
    from megatron.core import dist_checkpointing
    out = root / "weights"
    out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(ckpt, str(out), content_metadata=meta)


def _load_as_nemo2(weights: Path, meta: dict, model_sd: dict, opt):
    """``dist_checkpointing.load`` of ``weights/`` into the dict NeMo 2's
    ``MegatronStrategy.load_checkpoint`` builds: ``state_dict`` the model's sharded dict
    (``model_sd``: with a virtual pipeline ``{"model_0": ..., ...}``), ``optimizer`` a
    one-element list of the optimizer's sharded dict of it (``_extra_state`` dropped at the top
    level), ``strict`` returning the keys: (loaded, missing, unexpected)."""
    from megatron.core import dist_checkpointing
    sharded = {"state_dict": model_sd, "optimizer": [opt.sharded_state_dict(
        {k: v for k, v in model_sd.items() if not k.endswith("_extra_state")},
        is_loading=True, metadata=meta)]}
    return dist_checkpointing.load(sharded, str(weights), strict="return_all")


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


def _args(cfg, tp, pp, dtype, dp=1):
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
        transformer_impl="local", data_parallel_size=dp, world_size=tp * pp * dp,
        attention_backend=AttnBackend.auto, model_type=ModelType.encoder_or_decoder,
        cuda_graph_scope=[CudaGraphScope.attn])


def _fp32_norms(cfg, model):
    """With ``cfg["fp32_norms"]``, every 1-D parameter (the norms: the local spec has no
    biases here) back in fp32 after Float16Module's cast, as a run keeping its norms in fp32
    has them: megatron-core's DDP then makes two buffers, (bf16, fp32) and (fp32, fp32)."""
    if cfg.get("fp32_norms"):
        for _, param in model.named_parameters():
            if param.ndim == 1:
                param.data = param.data.float()


def _vpp_run(torch, dist, cfg, tp, pp, dtype, init=None):
    """The model chunks (``cfg["vpp"]`` per rank, as Megatron-LM's ``get_model`` builds them,
    bf16 through Float16Module), each in its own DDP (bucketing disabled after chunk 0, as
    Megatron-LM does), and one DistributedOptimizer over all (one buffer per chunk and dtype):
    ``(chunks, ddps, opt)``; ``init(chunks)`` sets the weights before the optimizer copies its
    masters. The parallel state must be initialized."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module
    from tests.groundtruth.mcore_names import build_gpt
    vpp = int(cfg["vpp"])
    pdt = torch.bfloat16
    padded = _args(cfg, tp, pp, dtype).padded_vocab_size
    chunks = [Float16Module(c.config, c).module for c in
              (build_gpt(dict(cfg, vocab=padded), tp, pp, params_dtype=pdt, vp_stage=v)
               for v in range(vpp))]
    for chunk in chunks:
        _fp32_norms(cfg, chunk)
    if init is not None:
        init(chunks)
    _distributed_optimizer(torch, dist, chunks[0], dtype, pdt)   # patches the grad norm
    ddps = [DistributedDataParallel(c.config, DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True, overlap_grad_reduce=False),
        c, disable_bucketing=v > 0) for v, c in enumerate(chunks)]
    config = OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1, adam_beta1=0.9,
                             adam_beta2=0.95, adam_eps=1e-8, bf16=True, params_dtype=pdt,
                             use_distributed_optimizer=True, clip_grad=0.0)
    return chunks, ddps, get_megatron_optimizer(config, ddps)


def _vpp_truth(torch, ddps, opt, path):
    """What the live DistributedOptimizer of a virtual-pipeline rank holds (names
    ``model{v}.NAME``), as ``_optimizer_truth`` and with each buffer's chunk, into ``path``."""
    inner = opt.chained_optimizers[0] if hasattr(opt, "chained_optimizers") else opt
    names = {param: f"model{v}.{name}" for v, ddp in enumerate(ddps)
             for name, param in ddp.module.named_parameters()}
    pieces = {}
    for ranges in inner.gbuf_ranges:
        for per_bucket in ranges.values():
            for bucket in per_bucket:
                for param, rmap in bucket["param_map"].items():
                    tensors = inner._get_main_param_and_optimizer_states(param)
                    pieces[names[param]] = {"range": (rmap["param"].start,
                                                      rmap["param"].end),
                                            "shape": tuple(param.shape)} \
                        | {k: v.detach().clone() for k, v in tensors.items()
                           if isinstance(v, torch.Tensor) and v.ndim}
    buffers = [{"dtype": (str(x.param_dtype), str(x.grad_dtype)), "chunk": v,
                "buckets": [(k.offset, k.grad_data.numel(), k.numel_unpadded)
                            for k in x.buckets],
                "index": {names[q]: tuple(int(y) for y in r)
                          for q, r in x.param_index_map.items()}}
               for v, ddp in enumerate(ddps) for x in ddp.buffers]
    steps = {float(st["step"]) for st in inner.optimizer.state.values() if "step" in st}
    torch.save({"dp_group_idx": inner.data_parallel_group_idx, "buffers": buffers,
                "pieces": pieces, "steps": sorted(steps)}, path)


def _vpp_value_step(torch, ddps, opt):
    """``_value_step`` of every model chunk."""
    for ddp in ddps:
        for _, param in ddp.module.named_parameters():
            param.main_grad.copy_(torch.sin(param.detach().float() * 1000.0))
        ddp.finish_grad_sync()
    ok, _, _ = opt.step()
    assert ok, "the optimizer step was skipped"


def _vpp_worker(cfg, tp, pp, dtype, a, b, extra):
    """``save_checkpoint`` of a virtual-pipeline run (``_vpp_run``): one seeded step, the state
    saved with ``model0``, ``model1``, ... and dp_reshardable; the live optimizer (names
    ``model{v}.NAME``) into ``a/optim_T_P_D.pt``. ``extra["also"]`` names other ways the same
    state is saved, as in ``_worker``: "legacy" Megatron-LM's torch format (``B_legacy``,
    ``_save_legacy``), "nemo2_<type>" NeMo 2's (``B_nemo2_<type>/weights``, ``_save_nemo2``),
    another sharding type (``B_<type>``)."""
    import warnings
    import zlib
    warnings.filterwarnings("ignore")
    import torch
    _patch_cuda(torch)
    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(backend="gloo", rank=rank, world_size=world)
    from megatron.core import dist_checkpointing, parallel_state
    vpp = int(cfg["vpp"])
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vpp)
    d = parallel_state.get_data_parallel_rank()
    t = parallel_state.get_tensor_model_parallel_rank()
    p = parallel_state.get_pipeline_model_parallel_rank()
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                "distrib_optim_sharding_type": "dp_reshardable"}

    @torch.no_grad()
    def init(chunks):
        for v, chunk in enumerate(chunks):
            for name, param in chunk.named_parameters():
                sharded = getattr(param, "tensor_model_parallel", False)
                g = torch.Generator().manual_seed(zlib.crc32(
                    f"model{v}.{name}|{p}|{t if sharded else -1}".encode()))
                param.copy_(torch.randn(param.shape, generator=g) * 0.1
                            + (1.0 if param.ndim == 1 else 0.0))
    chunks, ddps, opt = _vpp_run(torch, dist, cfg, tp, pp, dtype, init)
    for v, ddp in enumerate(ddps):
        for name, param in ddp.module.named_parameters():
            sharded = getattr(param, "tensor_model_parallel", False)
            g = torch.Generator().manual_seed(zlib.crc32(
                f"model{v}.{name}|{p}|{t if sharded else -1}|g".encode()))
            param.main_grad.copy_(torch.randn(param.shape, generator=g))
        ddp.finish_grad_sync()
    ok, _, _ = opt.step()
    assert ok, "the optimizer step was skipped"
    args = _args(cfg, tp, pp, dtype, world // (tp * pp))
    args.use_distributed_optimizer = True
    args.virtual_pipeline_model_parallel_size = vpp
    state = {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION,
             "opt_param_scheduler": {"max_lr": 1e-3, "num_steps": ITERATION}}
    state.update((f"model{v}", c.sharded_state_dict(metadata=metadata))
                 for v, c in enumerate(chunks))
    state["optimizer"] = opt.sharded_state_dict(
        {k: v for k, v in state.items() if k.startswith("model")}, is_loading=False,
        metadata=metadata)
    _vpp_truth(torch, ddps, opt, Path(a) / f"optim_{t}_{p}_{d}.pt")
    out = iter_dir(b)
    out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state, str(out), content_metadata=metadata)
    for kind in extra.get("also", []):      # the same state, saved another way
        if kind == "legacy":
            _save_legacy(torch, dist, chunks, opt, args, Path(f"{b}_legacy"), t, p, pp, d)
        elif kind.startswith(NEMO2):
            _save_nemo2(torch, dist, chunks, opt, Path(f"{b}_{kind}"), kind[len(NEMO2):])
        else:
            meta = dict(metadata, distrib_optim_sharding_type=kind)
            model_sd = {f"model{v}": c.sharded_state_dict(metadata=meta)
                        for v, c in enumerate(chunks)}
            other = dict(state, **model_sd, optimizer=opt.sharded_state_dict(
                model_sd, is_loading=False, metadata=meta))
            out = iter_dir(Path(f"{b}_{kind}"))
            out.mkdir(parents=True, exist_ok=True)
            dist.barrier()
            dist_checkpointing.save(other, str(out), content_metadata=meta)
    _vpp_value_step(torch, ddps, opt)       # the run continues: one step on value gradients
    _vpp_truth(torch, ddps, opt, Path(a) / f"stepped_{t}_{p}_{d}.pt")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _worker(mode, cfg, tp, pp, dtype, a, b, extra):
    if cfg.get("vpp"):
        return _vpp_worker(cfg, tp, pp, dtype, a, b, extra)
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
    _fp32_norms(cfg, model)
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
        args = _args(cfg, tp, pp, dtype, world // (tp * pp))
        args.use_distributed_optimizer = bool(extra.get("optimizer"))
        state = {"args": args, "checkpoint_version": 3.0,
                 "iteration": ITERATION, "model": model.sharded_state_dict(metadata=metadata),
                 "opt_param_scheduler": {"max_lr": 1e-3, "num_steps": ITERATION}}
        if extra.get("optimizer"):
            ddp, opt = _distributed_optimizer(torch, dist, model, dtype, pdt)
            _seeded_step(torch, ddp, opt, t, p)
            torch.save(_optimizer_truth(torch, ddp, opt), Path(a) / f"optim_{t}_{p}_{d}.pt")
            state["optimizer"] = opt.sharded_state_dict(state["model"], is_loading=False,
                                                        metadata=metadata)
        out = iter_dir(b)
        out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(state, str(out), content_metadata=metadata)
        live = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        if d == 0:
            torch.save(live, Path(a) / f"live_{t}_{p}.pt")
        for kind in extra.get("also", []):    # the same state, saved another way
            if kind == "legacy":
                _save_legacy(torch, dist, model, opt, args, Path(f"{b}_legacy"), t, p, pp, d)
                continue
            if kind.startswith(NEMO2):
                _save_nemo2(torch, dist, model, opt, Path(f"{b}_{kind}"), kind[len(NEMO2):])
                continue
            meta = dict(metadata, distrib_optim_sharding_type=kind)
            model_sd = model.sharded_state_dict(metadata=meta)
            other = dict(state, model=model_sd, optimizer=opt.sharded_state_dict(
                model_sd, is_loading=False, metadata=meta))
            out = iter_dir(Path(f"{b}_{kind}"))
            out.mkdir(parents=True, exist_ok=True)
            dist.barrier()
            dist_checkpointing.save(other, str(out), content_metadata=meta)
        if extra.get("optimizer"):      # the original run continues: one more step
            _value_step(torch, ddp, opt)
            torch.save(_optimizer_truth(torch, ddp, opt), Path(a) / f"stepped_{t}_{p}_{d}.pt")
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


def _save_legacy(torch, dist, model, opt, args, root, t, p, pp, d):
    """The same state in Megatron-LM's torch format with the distributed optimizer, as its
    save_checkpoint writes it: per model-parallel rank ``mp_rank_TT[_PPP]/model_optim_rng.pt``
    (model, the optimizer's state dict: param groups and step) and beside it
    ``distrib_optim.pt`` (``save_parameter_state``: the buckets gathered on DP rank 0). With
    ``model`` a list (a virtual pipeline's chunks) the rank file holds ``model0``, ``model1``,
    ... as Megatron-LM's ``generate_state_dict`` does."""
    sub = root / f"iter_{ITERATION:07d}" / (f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else ""))
    sub.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    opt.save_parameter_state(str(sub / "distrib_optim.pt"))
    if d == 0:
        legacy = type(args)(**vars(args))
        legacy.ckpt_format = "torch"
        models = {"model": model.state_dict_for_save_checkpoint()} \
            if not isinstance(model, list) else \
            {f"model{v}": m.state_dict_for_save_checkpoint() for v, m in enumerate(model)}
        torch.save({"args": legacy, "checkpoint_version": 3.0, "iteration": ITERATION}
                   | models | {"optimizer": opt.state_dict(),
                              "opt_param_scheduler": {"max_lr": 1e-3, "num_steps": ITERATION}},
                   sub / "model_optim_rng.pt")
    dist.barrier()


def _distributed_optimizer(torch, dist, model, dtype, pdt):
    """``model`` wrapped in megatron-core's DDP (distributed optimizer buffers, fp32 grads, one
    bucket) and its DistributedOptimizer (Adam, clip_grad 0). The grad norm is computed in
    plain torch (megatron-core's needs a CUDA kernel)."""
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
    return ddp, get_megatron_optimizer(config, [ddp])


def _step(ddp, opt):
    # without overlap_grad_reduce, finish_grad_sync starts the (synchronous) reduce-scatter
    # itself: calling start_grad_sync first would scale and reduce the gradients twice
    ddp.finish_grad_sync()
    ok, _, _ = opt.step()
    assert ok, "the optimizer step was skipped"


def _seeded_step(torch, ddp, opt, t, p):
    """One step on gradients seeded by (name, pipeline rank, tensor rank if TP-sharded)."""
    import zlib
    for name, param in ddp.module.named_parameters():
        sharded = getattr(param, "tensor_model_parallel", False)
        g = torch.Generator().manual_seed(zlib.crc32(f"{name}|{p}|{t if sharded else -1}|g"
                                                     .encode()))
        param.main_grad.copy_(torch.randn(param.shape, generator=g))
    _step(ddp, opt)


def _value_step(torch, ddp, opt):
    """One step on gradients that are a function of each weight element's value
    (``sin(1000 w)``), so they are the same at every TP/PP/DP split of the model: the
    continuation of a run is comparable across topologies. Every DP rank has the same
    gradients, and the DP mean of 1, 2 or 4 equal values is exact."""
    for _, param in ddp.module.named_parameters():
        param.main_grad.copy_(torch.sin(param.detach().float() * 1000.0))
    _step(ddp, opt)


def load_optimizer(ckpt: Path, cfg: dict, tp: int, pp: int, dp: int, dtype: str,
                   out: Path, fully: Path | None = None, nemo2: bool = False,
                   legacy: bool = False) -> Path:
    """Build the model and its DDP + DistributedOptimizer at (tp, pp, dp), load ``ckpt``'s
    model and dp_reshardable optimizer state with megatron-core's own
    ``dist_checkpointing.load`` (strict) and ``load_state_dict``, save what the optimizer then
    holds into ``out/loaded_T_P_D.pt`` (as ``optim_T_P_D.pt``), take one step on value
    gradients (``_value_step``) and save ``out/stepped_T_P_D.pt``. With ``fully`` (a
    fully_reshardable checkpoint), that one is loaded too, after the first, into the same
    optimizer and saved as ``out/loadedF_T_P_D.pt``, before the step. With ``nemo2`` both are
    NeMo 2 checkpoints, loaded as NeMo's MegatronStrategy.load_checkpoint does (``weights/``,
    the saved content metadata choosing the sharding type, the prefix ``module.``, the
    optimizer under ``optimizer[0]``); megatron-core's missing (saved, not asked for) and
    unexpected (asked for, not saved) keys go to ``out/keys_KIND_T_P_D.json``, the loaded
    common state to ``out/common_KIND.pt``. With ``legacy``,
    ``ckpt`` is Megatron-LM's torch format with the distributed optimizer instead, loaded as
    Megatron-LM's ``load_checkpoint`` does: each rank's ``mp_rank_TT[_PPP]/model_optim_rng.pt``
    into the model (``load_state_dict``) and the optimizer (``load_state_dict`` of its
    ``optimizer`` entry), then ``DistributedOptimizer.load_parameter_state`` of the
    ``distrib_optim.pt`` beside it (read on DP rank 0, scattered to the DP ranks). (One
    topology per run:
    megatron-core's parallel state does not re-initialize cleanly in one process.)"""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from tests.groundtruth.mcore_names import run_ranks
    root = str(HERE.parents[2])
    run_ranks(tp * pp * dp, [str(HERE), "load_optimizer", json.dumps(cfg), str(ckpt), str(tp),
                             str(pp), dtype, str(out), str(fully or ""),
                             "nemo2" if nemo2 else ("legacy" if legacy else "")], out,
              {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")},
              "megatron-core distributed-optimizer load worker", timeout=_TIMEOUT_S, cwd=root)
    return out


def _load_optimizer_worker(cfg, ckpt, tp, pp, dtype, out, fully, mode=""):
    nemo2, legacy = mode == "nemo2", mode == "legacy"
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    _patch_cuda(torch)
    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(backend="gloo", rank=rank, world_size=world)
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.transformer.module import Float16Module
    from tests.groundtruth.mcore_names import build_gpt
    pdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                "distrib_optim_sharding_type": "dp_reshardable"}
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=pp)
    d = parallel_state.get_data_parallel_rank()
    t = parallel_state.get_tensor_model_parallel_rank()
    p = parallel_state.get_pipeline_model_parallel_rank()
    model = build_gpt(dict(cfg, vocab=_args(cfg, tp, pp, dtype).padded_vocab_size), tp, pp,
                      params_dtype=pdt)
    if pdt != torch.float32:
        model = Float16Module(model.config, model).module
    _fp32_norms(cfg, model)
    ddp, opt = _distributed_optimizer(torch, dist, model, dtype, pdt)
    _patch_fully_reshardable_load()
    # megatron-core's torch-Adam fallback (no Transformer Engine or Apex here) cannot make
    # its state_dict before a first step (it reads the step from the state): take one on
    # zero gradients; the load below replaces every parameter, master, moment and the step
    for _, param in ddp.module.named_parameters():
        param.main_grad.zero_()
    _step(ddp, opt)
    def unshare_steps():
        # megatron-core 0.16.1's torch-Adam fallback gives every parameter's state the same
        # step tensor on load, which torch's Adam then increments once per parameter: unshare
        # them (the Transformer Engine / Apex optimizers of a GPU run keep the step in the
        # param groups)
        for inner in getattr(opt, "chained_optimizers", [opt]):
            for st in inner.optimizer.state.values():
                if "step" in st:
                    st["step"] = st["step"].clone()

    def load_legacy(ckpt):
        tracker = (Path(ckpt) / "latest_checkpointed_iteration.txt").read_text().strip()
        sub = Path(ckpt) / f"iter_{int(tracker):07d}" / (
            f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else ""))
        sd = torch.load(sub / "model_optim_rng.pt", map_location="cpu", weights_only=False)
        missing, unexpected = model.load_state_dict(sd["model"], strict=False)
        missing = [m for m in missing if not m.endswith("_extra_state")]
        assert not missing and not unexpected, (missing, unexpected)
        opt.load_state_dict(sd["optimizer"])
        opt.load_parameter_state(str(sub / "distrib_optim.pt"))
        unshare_steps()

    def load(ckpt, kind):
        if nemo2:
            return load_nemo2(ckpt, kind)
        meta = dict(metadata, distrib_optim_sharding_type=kind)
        tracker = (Path(ckpt) / "latest_checkpointed_iteration.txt").read_text().strip()
        model_sd = model.sharded_state_dict(metadata=meta)
        sharded = {"model": model_sd, "optimizer": opt.sharded_state_dict(
            model_sd, is_loading=True, metadata=meta)}
        loaded = dist_checkpointing.load(sharded, str(Path(ckpt) / f"iter_{int(tracker):07d}"),
                                         strict="raise_all")
        model.load_state_dict(loaded["model"], strict=True)
        # an fp32 parameter's master is a view of the parameter itself, which megatron-core
        # 0.16.1 copies into in place: autograd allows that only without grad recording
        with torch.no_grad():
            opt.load_state_dict(loaded["optimizer"])
        unshare_steps()
    def load_nemo2(ckpt, kind):
        weights = Path(ckpt) / "weights"
        meta = dist_checkpointing.load_content_metadata(str(weights))
        assert meta == {"distrib_optim_sharding_type": kind}, meta
        model_sd = model.sharded_state_dict(prefix="module.", metadata=meta)
        loaded, missing, unexpected = _load_as_nemo2(weights, meta, model_sd, opt)
        (Path(out) / f"keys_{kind}_{t}_{p}_{d}.json").write_text(json.dumps(
            {"missing": sorted(missing), "unexpected": sorted(unexpected)}))
        model.load_state_dict({k[len("module."):]: v for k, v in loaded["state_dict"].items()},
                              strict=True)
        opt.load_state_dict(loaded["optimizer"][0])
        if rank == 0:
            torch.save({k: v for k, v in loaded.items() if k not in ("state_dict", "optimizer")}
                       | {"optimizer": [{k: v for k, v in loaded["optimizer"][0].items()
                                         if k == "param_state_sharding_type"}]},
                       Path(out) / f"common_{kind}.pt")
        unshare_steps()
    if legacy:
        load_legacy(ckpt)
    else:
        load(ckpt, "dp_reshardable")
    torch.save(_optimizer_truth(torch, ddp, opt), Path(out) / f"loaded_{t}_{p}_{d}.pt")
    if fully:
        load(fully, "fully_reshardable")
        torch.save(_optimizer_truth(torch, ddp, opt), Path(out) / f"loadedF_{t}_{p}_{d}.pt")
    _value_step(torch, ddp, opt)
    torch.save(_optimizer_truth(torch, ddp, opt), Path(out) / f"stepped_{t}_{p}_{d}.pt")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def load_vpp(ckpt: Path, legacy: Path, cfg: dict, tp: int, pp: int, dp: int, dtype: str,
             out: Path, nemo2: Path | None = None) -> Path:
    """A virtual-pipeline run (``_vpp_run``: ``cfg["vpp"]`` chunks per rank at (tp, pp, dp))
    loads ``ckpt``, a torch_dist checkpoint with the dp_reshardable state, with megatron-core's
    own ``dist_checkpointing.load`` (strict: ``model0``, ``model1``, ... and the optimizer's
    sharded state dict of all chunks, as Megatron-LM's ``load_checkpoint`` asks) and
    ``load_state_dict``; saves what it then holds into ``out/loaded_T_P_D.pt`` (as
    ``_vpp_truth``), takes one step on value gradients (``_vpp_value_step``) and saves
    ``out/stepped_T_P_D.pt``. Then every weight, master and moment is zeroed and the step set to
    99, and ``legacy`` (Megatron-LM's torch format with the distributed optimizer) is loaded as
    Megatron-LM loads it: each rank file's ``model{v}`` into chunk v, its ``optimizer`` into the
    optimizer, then ``DistributedOptimizer.load_parameter_state`` of the ``distrib_optim.pt``
    beside it; saved as ``out/loadedL_T_P_D.pt``, stepped, ``out/steppedL_T_P_D.pt``. With
    ``nemo2`` (a NeMo 2 checkpoint), everything is zeroed again and it is loaded as NeMo 2's
    ``MegatronStrategy.load_checkpoint`` loads a virtual pipeline (``weights/``, the saved
    content metadata choosing the sharding type, ``state_dict: {"model_0": chunk 0's sharded
    dict with the prefix module., ...}``, the optimizer's of those under ``optimizer[0]``;
    ``_strategy_lib.load_model_state_dict`` giving chunk v its ``model_v``): saved as
    ``out/loadedN_T_P_D.pt``, stepped, ``out/steppedN_T_P_D.pt``; megatron-core's missing and
    unexpected keys into ``out/keysN_T_P_D.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from tests.groundtruth.mcore_names import run_ranks
    root = str(HERE.parents[2])
    run_ranks(tp * pp * dp, [str(HERE), "load_vpp", json.dumps(cfg), str(ckpt), str(legacy),
                             str(tp), str(pp), dtype, str(out), str(nemo2 or "")], out,
              {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")},
              "megatron-core virtual-pipeline load worker", timeout=_TIMEOUT_S, cwd=root)
    return out


def _load_vpp_worker(cfg, ckpt, legacy, tp, pp, dtype, out, nemo2=""):
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    _patch_cuda(torch)
    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(backend="gloo", rank=rank, world_size=world)
    from megatron.core import dist_checkpointing, parallel_state
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=int(cfg["vpp"]))
    d = parallel_state.get_data_parallel_rank()
    t = parallel_state.get_tensor_model_parallel_rank()
    p = parallel_state.get_pipeline_model_parallel_rank()
    chunks, ddps, opt = _vpp_run(torch, dist, cfg, tp, pp, dtype)
    _patch_fully_reshardable_load()     # load_parameter_state copies through the same setter
    inner = opt.chained_optimizers[0] if hasattr(opt, "chained_optimizers") else opt
    # torch-Adam's state_dict needs a step first (see _load_optimizer_worker): on zero grads
    for ddp in ddps:
        for _, param in ddp.module.named_parameters():
            param.main_grad.zero_()
        ddp.finish_grad_sync()
    ok, _, _ = opt.step()
    assert ok, "the optimizer step was skipped"

    def unshare_steps():        # as in _load_optimizer_worker
        for st in inner.optimizer.state.values():
            if "step" in st:
                st["step"] = st["step"].clone()

    meta = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
            "distrib_optim_sharding_type": "dp_reshardable"}
    tracker = (Path(ckpt) / "latest_checkpointed_iteration.txt").read_text().strip()
    model_sd = {f"model{v}": c.sharded_state_dict(metadata=meta) for v, c in enumerate(chunks)}
    sharded = dict(model_sd, optimizer=opt.sharded_state_dict(model_sd, is_loading=True,
                                                              metadata=meta))
    loaded = dist_checkpointing.load(sharded, str(Path(ckpt) / f"iter_{int(tracker):07d}"),
                                     strict="raise_all")
    for v, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"model{v}"], strict=True)
    with torch.no_grad():
        opt.load_state_dict(loaded["optimizer"])
    unshare_steps()
    _vpp_truth(torch, ddps, opt, Path(out) / f"loaded_{t}_{p}_{d}.pt")
    _vpp_value_step(torch, ddps, opt)
    _vpp_truth(torch, ddps, opt, Path(out) / f"stepped_{t}_{p}_{d}.pt")

    @torch.no_grad()
    def zero_all():                 # nothing of an earlier load survives the next
        for chunk in chunks:
            for _, param in chunk.named_parameters():
                param.zero_()
        for ranges in inner.gbuf_ranges:
            for per_bucket in ranges.values():
                for bucket in per_bucket:
                    for param in bucket["param_map"]:
                        for x in inner._get_main_param_and_optimizer_states(param).values():
                            if isinstance(x, torch.Tensor) and x.ndim:
                                x.zero_()
        for st in inner.optimizer.state.values():
            if "step" in st:
                st["step"] = torch.full_like(st["step"], 99.0)
    zero_all()
    tracker = (Path(legacy) / "latest_checkpointed_iteration.txt").read_text().strip()
    sub = Path(legacy) / f"iter_{int(tracker):07d}" / (
        f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else ""))
    sd = torch.load(sub / "model_optim_rng.pt", map_location="cpu", weights_only=False)
    for v, chunk in enumerate(chunks):
        missing, unexpected = chunk.load_state_dict(sd[f"model{v}"], strict=False)
        missing = [m for m in missing if not m.endswith("_extra_state")]
        assert not missing and not unexpected, (missing, unexpected)
    opt.load_state_dict(sd["optimizer"])
    with torch.no_grad():           # fp32 parameters are their own masters (see above)
        opt.load_parameter_state(str(sub / "distrib_optim.pt"))
    unshare_steps()
    _vpp_truth(torch, ddps, opt, Path(out) / f"loadedL_{t}_{p}_{d}.pt")
    _vpp_value_step(torch, ddps, opt)
    _vpp_truth(torch, ddps, opt, Path(out) / f"steppedL_{t}_{p}_{d}.pt")
    if nemo2:
        zero_all()
        weights = Path(nemo2) / "weights"
        meta = dist_checkpointing.load_content_metadata(str(weights))
        kind = meta.get("distrib_optim_sharding_type")     # (sharded_state_dict adds groups)
        model_sd = {f"model_{v}": c.sharded_state_dict(prefix="module.", metadata=meta)
                    for v, c in enumerate(chunks)}
        loaded, missing, unexpected = _load_as_nemo2(weights, meta, model_sd, opt)
        (Path(out) / f"keysN_{t}_{p}_{d}.json").write_text(json.dumps(
            {"missing": sorted(missing), "unexpected": sorted(unexpected), "kind": kind}))
        for v, chunk in enumerate(chunks):
            chunk.load_state_dict({k[len("module."):]: x for k, x in
                                   loaded["state_dict"][f"model_{v}"].items()}, strict=True)
        with torch.no_grad():
            opt.load_state_dict(loaded["optimizer"][0])
        # megatron-core 0.16.1's sharded load with torch's Adam (no Transformer Engine or
        # Apex) leaves an already-initialized state's step as it was (99 here; a load right
        # after the warm-up step keeps that step's 1): put the step of the param groups it
        # read from the checkpoint into torch's Adam state, as its load_state_dict means to
        (step,) = {float(g["step"]) for g in loaded["optimizer"][0]["optimizer"]["param_groups"]}
        for st in inner.optimizer.state.values():
            st["step"] = torch.tensor(step)
        _vpp_truth(torch, ddps, opt, Path(out) / f"loadedN_{t}_{p}_{d}.pt")
        _vpp_value_step(torch, ddps, opt)
        _vpp_truth(torch, ddps, opt, Path(out) / f"steppedN_{t}_{p}_{d}.pt")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _patch_fully_reshardable_load():
    """megatron-core 0.16.1's torch-Adam fallback (no Transformer Engine or Apex) cannot load a
    fully_reshardable state: its loader passes param/exp_avg/exp_avg_sq but copies into every
    key of the parameter's state, which for torch's Adam includes "step" (KeyError). The step
    is already loaded from the param groups then: keep it aside while the tensors are copied."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_keeps_step", False):
        return

    def set_states(self, model_param, tensors):
        if "step" in tensors or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][
            group_order]]
        step = state.pop("step", None)
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step
    set_states._keeps_step = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _optimizer_truth(torch, ddp, opt) -> dict:
    """What the live DistributedOptimizer of this rank holds, for the tests: its
    ``data_parallel_group_idx``; per DDP buffer its (param dtype, grad dtype), its buckets'
    (offset, numel, numel_unpadded) and every parameter's ``param_index_map`` entry (start, end,
    bucket) by name; and per parameter this DP rank's piece of the fp32 master and the Adam
    moments with the range of the parameter (flattened) it covers; the param groups (names and
    hyper-parameters) and the step."""
    opts = getattr(opt, "chained_optimizers", [opt])
    assert len(opts) == 1, f"{len(opts)} chained optimizers"
    return _inner_truth(torch, ddp, opts[0], ddp.buffers)


def _inner_truth(torch, ddp, opt, ddp_buffers) -> dict:
    """``_optimizer_truth`` of one DistributedOptimizer ``opt`` over the DDP buffers
    ``ddp_buffers`` (a MoE model's ChainedOptimizer has one over ``ddp.buffers`` and one over
    ``ddp.expert_parallel_buffers``)."""
    names = {param: name for name, param in ddp.module.named_parameters()}
    buffers = [{"dtype": (str(b.param_dtype), str(b.grad_dtype)),
                "buckets": [(k.offset, k.grad_data.numel(), k.numel_unpadded) for k in b.buckets],
                "index": {names[p]: tuple(int(x) for x in v)
                          for p, v in b.param_index_map.items()}} for b in ddp_buffers]
    pieces = {}
    for ranges in opt.gbuf_ranges:
        for per_bucket in ranges.values():
            for bucket in per_bucket:
                for param, rmap in bucket["param_map"].items():
                    tensors = opt._get_main_param_and_optimizer_states(param)
                    pieces[names[param]] = {"range": (rmap["param"].start, rmap["param"].end)} \
                        | {k: v.detach().clone() for k, v in tensors.items()
                           if isinstance(v, torch.Tensor) and v.ndim}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.optimizer.param_groups]
    steps = {float(s["step"]) for s in opt.optimizer.state.values() if "step" in s}
    return {"dp_group_idx": opt.data_parallel_group_idx, "buffers": buffers, "pieces": pieces,
            "param_groups": groups, "steps": sorted(steps)}


def buffer_layouts(cases: list, out: Path) -> list:
    """megatron-core's own DDP buffer layout (``_ParamAndGradBuffer`` with the distributed
    optimizer, bf16 params, fp32 grads) of each case ``(params, dp, bucket_size, high_busbw)``,
    ``params`` being (name, numel, shared_embedding) in named_parameters order: per case
    ``{"index": {name: [start, end, bucket]}, "buckets": [[offset, numel, numel_unpadded]]}``.
    One process (a data-parallel group of size ``dp`` is only asked its size), no model."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cases.json").write_text(json.dumps(cases))
    root = str(HERE.parents[2])
    subprocess.run([sys.executable, str(HERE), "buffers", str(out)], check=True, cwd=root,
                   env=dict(os.environ, PYTHONPATH=root + os.pathsep +
                            os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore",
                            CUDA_VISIBLE_DEVICES=""),
                   stdout=subprocess.DEVNULL, stderr=open(out / "log", "w"),
                   timeout=_TIMEOUT_S)
    return json.loads((out / "layouts.json").read_text())


def _buffers_worker(out):
    import tempfile
    import types
    import torch
    _patch_cuda(torch)
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.FileStore(tempfile.mktemp(), 1), rank=0,
                            world_size=1)
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer

    class Group:              # the buffer asks the data-parallel group its size only
        def __init__(self, n):
            self.n = n

        def size(self):
            return self.n

        def rank(self):
            return 0

    layouts = []
    for params, dp, bucket_size, high in json.loads((Path(out) / "cases.json").read_text()):
        config = DistributedDataParallelConfig(use_distributed_optimizer=True,
                                               grad_reduce_in_fp32=True,
                                               pad_buckets_for_high_nccl_busbw=high)
        tensors = []
        for _, numel, shared in params:
            p = torch.nn.Parameter(torch.zeros(numel, dtype=torch.bfloat16))
            if shared:
                p.shared_embedding = True
            tensors.append(p)
        names = {p: n for p, (n, _, _) in zip(tensors, params)}
        group = Group(dp)
        buf = _ParamAndGradBuffer(config, torch.bfloat16, torch.float32, tensors, group,
                                  bucket_size, names, 1.0, list(range(len(tensors))), False,
                                  types.SimpleNamespace(tp=Group(1), dp_cp=group))
        layouts.append({"index": {names[p]: list(v) for p, v in buf.param_index_map.items()},
                        "buckets": [[b.offset, b.grad_data.numel(), b.numel_unpadded]
                                    for b in buf.buckets]})
    (Path(out) / "layouts.json").write_text(json.dumps(layouts))
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "buffers":
        _buffers_worker(sys.argv[2])
        sys.exit(0)
    if sys.argv[1] == "load_vpp":
        _load_vpp_worker(json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]),
                         int(sys.argv[6]), sys.argv[7], sys.argv[8], sys.argv[9])
        sys.exit(0)
    if sys.argv[1] == "load_optimizer":
        _load_optimizer_worker(json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4]),
                               int(sys.argv[5]), sys.argv[6], sys.argv[7], sys.argv[8],
                               sys.argv[9])
        sys.exit(0)
    mode, cfg_json, tp, pp, dtype, a, b, extra = sys.argv[1:9]
    _worker(mode, json.loads(cfg_json), int(tp), int(pp), dtype, a, b or None, json.loads(extra))
