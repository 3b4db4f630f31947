"""Train a tiny HF Llama with the real DeepSpeed ZeRO on CPU and save a checkpoint.

Run under torchrun (one process per data-parallel rank)::

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/groundtruth/ds_train.py \
        --stage 2 --dtype bf16 --out DIR --steps 3 [--groups 2] [--model JSON]

builds ``LlamaForCausalLM`` (MODEL: hidden 64, 2 layers, 4 heads / 2 KV heads, head_dim 16,
ffn 96, vocab 100, untied; ``--model`` overrides fields, e.g. ODD_MODEL; fixed seed, identical
on every rank), wraps a client ``torch.optim.AdamW`` (``--groups 2``: 2-D weights with
weight_decay 0.1, norms with 0.0) with ``deepspeed.initialize`` (ZeRO stage S, gloo on CPU,
``"zero_allow_untested_optimizer": true``, explicit ``gradient_clipping``), trains N steps and
calls ``engine.save_checkpoint(DIR)``.  Then, in DIR:

* ``fp32.safetensors``, ``exp_avg.safetensors``, ``exp_avg_sq.safetensors``: the full fp32
  master weights / Adam moments by HF name, gathered live with DeepSpeed's
  ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` (all ranks take part);
* ``zero_to_fp32.global_stepN.safetensors``: DeepSpeed's offline
  ``get_fp32_state_dict_from_zero_checkpoint`` run on the files just written (rank 0; absent for
  BF16_Optimizer checkpoints, which zero_to_fp32 refuses);
* ``config.json`` (HF config) and ``expected.json``::

    {"loss": [per-step loss, mean over the global batch], "stage", "dtype", "groups",
     "world_size", "steps", "start_step", "global_step", "tag": "global_stepN",
     "train_batch_size", "seq_len", "lr", "weight_decay", "model": {full LlamaConfig fields},
     "gradient_clipping", "grad_accum_fp32", "optimizer_class", "zero_to_fp32": true | error,
     "loaded_from", "loaded_tag", "universal"}

Resume mode (the oracle for resharding)::

    torchrun --nproc_per_node W ds_train.py --stage S --dtype D [--model JSON] --out NEW \
        --load CKPT_DIR [--tag TAG] [--universal] --steps 1

builds the same model/optimizer at world size W, ``engine.load_checkpoint(CKPT_DIR, tag)``
(with ``"checkpoint": {"load_universal": true}`` when ``--universal``; the tag then defaults
to ``latest_universal``), trains ``--steps`` more steps, saves to NEW and writes the same files
(``loss`` lists only the new steps; ``start_step`` is the global step it resumed from).
DeepSpeed refuses a native (non-universal) load at another DP size.

Data: the global batch of step k (k counted from 0 over the whole training run, so a resumed
run continues the stream) is ``--batch`` (default 6) sequences of ``--seq`` (16) tokens from
``torch.Generator().manual_seed(1000 + k)``; DP rank r takes rows ``[r*B/W, (r+1)*B/W)``.
Gradient accumulation is 1 and every micro batch has the same number of tokens, so the
optimizer sees the mean gradient over the same global batch whatever W is (W must divide B;
6 allows W = 1, 2, 3).  Results across W agree to rounding, not bit for bit (all-reduce order).

CPU notes: nothing is JIT-compiled.  DeepSpeed's CPU communication backend would g++-compile
its ``deepspeed_shm_comm`` op (shared-memory all-reduce, ~40 s on first use, cached in
~/.cache/torch_extensions, used only by ``inference_all_reduce``); ``main`` stubs out
``deepspeed.comm.torch.build_shm_op`` so it is never built.  The client ``torch.optim.AdamW``
is used as is (DeepSpeed builds its ``cpu_adam`` op only for ``DeepSpeedCPUAdam``, i.e. with
``offload_optimizer``, never enabled here), and gloo is the communication backend (the CPU
accelerator falls back to it when oneccl_bindings_for_pytorch is absent).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

MODEL = dict(hidden_size=64, head_dim=16, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, vocab_size=100,
             max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-6,
             hidden_act="silu")
# Every parameter of MODEL has a multiple of 64 elements, so no ZeRO group ever needs padding.
# ODD_MODEL (odd hidden size, GQA 9 heads / 3 KV heads, odd vocab) makes the flat groups and
# several stage-3 parameters need alignment padding at DP = 2 and 3.
ODD_MODEL = dict(hidden_size=63, num_attention_heads=9, num_key_value_heads=3, head_dim=16,
                 vocab_size=101)
SEED = 1234
LR = 1e-2
WEIGHT_DECAY = 0.1


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--stage", type=int, required=True, choices=(1, 2, 3))
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--groups", type=int, default=1, choices=(1, 2))
    p.add_argument("--model", default="{}",
                   help="JSON overrides of the LlamaConfig fields in MODEL, e.g. ODD_MODEL")
    p.add_argument("--grad-accum-fp32", action="store_true",
                   help='"data_types": {"grad_accum_dtype": "fp32"}: with bf16 at stage 1 this '
                        "selects DeepSpeed's BF16_Optimizer instead of the ZeRO stage-1 optimizer")
    p.add_argument("--clip", type=float, default=1.0, help="gradient_clipping")
    p.add_argument("--batch", type=int, default=6, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--load", default=None, help="resume from this checkpoint dir")
    p.add_argument("--tag", default=None, help="tag to load (default: latest / latest_universal)")
    p.add_argument("--universal", action="store_true", help='"checkpoint": {"load_universal": true}')
    p.add_argument("--arch", choices=("llama", "convnet"), default="llama",
                   help="convnet: conv_net(), no HF config (none is written)")
    return p.parse_args(argv)


# --arch convnet: a model that is no LLM and has no config anywhere (mapc's generic mode).
CONV_VOCAB = 37


def conv_net():
    """A small conv net over token ids: an embedding (tied to the output head, so DeepSpeed
    records ``shared_params``), a Conv1d, a LayerNorm, a frozen projection (requires_grad
    False: ``frozen_param_shapes``), a float and an integer buffer, odd sizes everywhere (every
    ZeRO flat group and stage-3 partition needs padding at DP 2 and 3)."""
    import torch
    from torch import nn

    class Out:
        def __init__(self, loss):
            self.loss = loss

    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(CONV_VOCAB, 7)
            self.conv = nn.Conv1d(7, 7, 3, padding=1)
            self.norm = nn.LayerNorm(7)
            self.mix = nn.Linear(7, 7, bias=False)    # a submodule, so ZeRO-3 gathers it
            self.mix.weight.requires_grad_(False)
            self.head = nn.Linear(7, CONV_VOCAB)
            self.head.weight = self.embed.weight
            self.register_buffer("channel_scale", torch.linspace(0.5, 1.5, 7))
            self.register_buffer("version", torch.tensor(3, dtype=torch.int64))

        def forward(self, input_ids, labels):
            x = self.embed(input_ids)                                   # [B, T, 7]
            x = self.conv(x.transpose(1, 2)).transpose(1, 2)
            x = self.norm(x) * self.channel_scale.to(x.dtype)
            x = self.mix(x)
            logits = self.head(x)
            loss = nn.functional.cross_entropy(logits.float().reshape(-1, CONV_VOCAB),
                                               labels.reshape(-1))
            return Out(loss)

    return ConvNet()


def build_model(overrides: dict | None = None, arch: str = "llama"):
    import torch

    if arch == "convnet":
        torch.manual_seed(SEED)
        return conv_net().float()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**MODEL, **(overrides or {})})
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg)
    return model.float()


def param_groups(model, groups: int):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if groups == 1:
        return [{"params": [p for _, p in params], "weight_decay": WEIGHT_DECAY}]
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]  # norms
    return [{"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0}]


def batch_for_step(k: int, batch: int, seq: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(1000 + k)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def ds_config(args, world: int) -> dict:
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} is not divisible by world size {world}")
    cfg = {
        "train_batch_size": args.batch,
        "train_micro_batch_size_per_gpu": args.batch // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": args.stage},
        "zero_allow_untested_optimizer": True,
        # DeepSpeed 0.19's default is 1.0 (it used to be 0.0): always say it explicitly.
        "gradient_clipping": args.clip,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if args.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if args.grad_accum_fp32:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if args.universal:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


def dump_full_state(engine, out_dir: Path, rank: int) -> None:
    """Gather every trainable parameter's fp32 master weight and Adam moments with DeepSpeed's
    own API (a collective: every rank calls it) and write ``{key}.safetensors`` for key in
    STATE_KEYS, ``{name: fp32 tensor}`` with the HF parameter names."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    # DeepSpeed 0.19.8 bug (ZeRO 1/2 and BF16_Optimizer): the optimizer-state views behind
    # safe_get_full_optimizer_state are linked once, right after the *first* param group's
    # optimizer step, when later groups have no Adam state yet; their params then raise
    # "exp_avg not found in optimizer state fragment".  Re-link now that all state exists.
    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    full = {k: {} for k in STATE_KEYS}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        full["fp32"][name] = safe_get_full_fp32_param(p)
        for k in STATE_KEYS[1:]:
            full[k][name] = safe_get_full_optimizer_state(p, k)
    if rank == 0:
        for k, d in full.items():
            save_file({n: t.detach().float().cpu().contiguous() for n, t in d.items()},
                      str(out_dir / f"{k}.safetensors"))


def run_zero_to_fp32(out_dir: Path, tag: str):
    """DeepSpeed's own offline consolidation of the checkpoint just written, saved as
    ``zero_to_fp32.{tag}.safetensors`` (the cache file deepspeed_ckpt.zero_to_fp32 reads).
    Returns True, or the error text: BF16_Optimizer checkpoints (bf16 + stage 1 + fp32 grad
    accumulation) carry no ``zero_stage`` and zero_to_fp32 refuses them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    try:
        sd = get_fp32_state_dict_from_zero_checkpoint(str(out_dir), tag=tag)
    except ValueError as e:
        return str(e)
    save_file({k: v.float().contiguous().clone() for k, v in sd.items()},
              str(out_dir / f"zero_to_fp32.{tag}.safetensors"))
    return True


def start_deepspeed_on_cpu():
    """Import DeepSpeed for the CPU accelerator and join the gloo group; returns the module."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import importlib

    import deepspeed

    # (`import deepspeed.comm.torch as m` would bind the real torch: deepspeed.comm imports it.)
    # The CPU accelerator's TorchBackend JIT-builds the `deepspeed_shm_comm` C++ op (g++,
    # ~40 s, cached in ~/.cache/torch_extensions) in its constructor.  It is used only by
    # `inference_all_reduce`, never in training: skip the build.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--serve":
        return serve(Path(argv[1]), int(argv[2]))
    args = parse_args(argv)
    import torch.distributed as tdist

    deepspeed = start_deepspeed_on_cpu()
    run(args, deepspeed)
    tdist.barrier()
    tdist.destroy_process_group()


def serve(queue: Path, parent_pid: int) -> int:
    """Resident mode (``ds_train.py --serve QUEUE PARENT_PID`` under torchrun): join the gloo
    group once, then run the jobs ``QUEUE/job-K.json`` (``{"argv": [...], "log": PATH}``, K =
    0, 1, ...) one after another, each exactly as a fresh ``ds_train.py ARGV`` would (the same
    seed, a new model, optimizer and engine), with every rank's output appended to the job's
    log.  Rank 0 marks a finished job with ``job-K.ok``; a failing rank writes
    ``job-K.err.RANK`` (its traceback) and exits, and the client ends the group.  Stops on a
    ``{"stop": true}`` job or when PARENT_PID is gone.  Saves DeepSpeed's import and the gloo
    start-up (~5 CPU seconds per rank) for every run after the first."""
    import gc
    import time
    import traceback

    import torch
    import torch.distributed as tdist

    deepspeed = start_deepspeed_on_cpu()
    rank = tdist.get_rank()
    # A ZeRO-3 engine replaces torch.nn.functional.linear with its own autograd function and
    # leaves it so ("this will persist unless manually reset"): a bf16 run after a ZeRO-3 one
    # then computes differently from a fresh process (measured: losses 1e-3 apart). Reset it
    # after every job, so each job runs as in a fresh process.
    pristine_linear = torch.nn.functional.linear
    k = 0
    while True:
        job = queue / f"job-{k}.json"
        while not job.is_file():
            try:
                os.kill(parent_pid, 0)
            except OSError:
                os._exit(0)
            time.sleep(0.02)
        spec = json.loads(job.read_text())
        if spec.get("stop"):
            break
        saved = os.dup(1), os.dup(2)
        fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        try:
            run(parse_args(spec["argv"]), deepspeed)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            (queue / f"job-{k}.err.{rank}").write_text(traceback.format_exc())
            os._exit(1)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        torch.nn.functional.linear = pristine_linear
        gc.collect()
        tdist.barrier()
        if rank == 0:
            (queue / f"job-{k}.ok").touch()
        k += 1
    tdist.barrier()
    tdist.destroy_process_group()
    return 0


def run(args, deepspeed):
    """One training run (fresh or resumed) in an initialized gloo group."""
    import torch
    import torch.distributed as tdist

    rank, world = tdist.get_rank(), tdist.get_world_size()
    torch.manual_seed(SEED)

    overrides = json.loads(args.model)
    model = build_model(overrides, args.arch)
    vocab = CONV_VOCAB if args.arch == "convnet" else model.config.vocab_size
    opt = torch.optim.AdamW(param_groups(model, args.groups), lr=LR, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=WEIGHT_DECAY)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(args, world))

    start = 0
    if args.load:
        path, _ = engine.load_checkpoint(args.load, tag=args.tag)
        if path is None:
            raise SystemExit(f"could not load a checkpoint from {args.load} (tag {args.tag})")
        start = engine.global_steps

    micro = args.batch // world
    losses = []
    for k in range(start, start + args.steps):
        ids = batch_for_step(k, args.batch, args.seq, vocab)
        ids = ids[rank * micro:(rank + 1) * micro]
        out = engine(input_ids=ids, labels=ids)
        engine.backward(out.loss)
        engine.step()
        loss = out.loss.detach().float().clone()
        tdist.all_reduce(loss)
        losses.append(loss.item() / world)

    out_dir = Path(args.out)
    engine.save_checkpoint(str(out_dir))
    tdist.barrier()
    dump_full_state(engine, out_dir, rank)
    z2f = None
    if rank == 0:
        z2f = run_zero_to_fp32(out_dir, f"global_step{engine.global_steps}")
        if args.arch == "llama":
            engine.module.config.to_json_file(str(out_dir / "config.json"))
        meta = {"loss": losses, "stage": args.stage, "dtype": args.dtype, "groups": args.groups,
                "world_size": world, "steps": args.steps, "start_step": start,
                "global_step": engine.global_steps, "tag": f"global_step{engine.global_steps}",
                "train_batch_size": args.batch, "seq_len": args.seq, "lr": LR,
                "weight_decay": WEIGHT_DECAY, "arch": args.arch,
                "model": {**MODEL, **overrides} if args.arch == "llama" else {},
                "gradient_clipping": args.clip, "grad_accum_fp32": args.grad_accum_fp32,
                "optimizer_class": type(engine.optimizer).__name__,
                "zero_to_fp32": z2f,
                "loaded_from": args.load, "loaded_tag": args.tag,
                "universal": args.universal}
        (out_dir / "expected.json").write_text(json.dumps(meta, indent=1) + "\n")
    del engine, opt, model


if __name__ == "__main__":
    sys.exit(main())
