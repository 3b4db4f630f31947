"""Train a tiny HF Llama with the real DeepSpeed AutoTP (tensor parallel T=2, ZeRO 1, fp32) on
CPU, save it, and keep the oracles mapc's AutoTP reader and writer are checked against.

Run under torchrun (one process per tensor-parallel rank; data-parallel size 1)::

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/groundtruth/ds_autotp.py --out DIR

builds ``LlamaForCausalLM`` (MODEL: hidden 64, 2 layers, 4 heads / 2 KV heads, head_dim 16,
ffn 96, vocab 128, untied; fixed seed), a client ``torch.optim.AdamW`` and
``deepspeed.initialize`` with ``"tensor_parallel": {"autotp_size": 2}`` and ZeRO stage 1;
trains STEPS steps (every rank sees the whole global batch) and calls
``engine.save_checkpoint(DIR/ckpt)``. Then, in DIR:

* ``ckpt.full.safetensors``: the full weights by HF name, gathered by DeepSpeed's own
  ``engine._replace_module_consolidated_state_dict`` (GatherReplacedLayerParams);
* ``logits.safetensors``: the training module's logits on PROBE (the batch of step 99);
* ``saved.t{T}.{key}.safetensors`` for key in fp32, exp_avg, exp_avg_sq: TP rank T's fp32
  master shards and Adam moments at the save (``safe_get_full_fp32_param`` /
  ``safe_get_full_optimizer_state``, which return the rank's own shard);
* ``next.t{T}.{key}.safetensors``: the same after one more step (the original run's own next
  step, the resume oracle);
* ``ckpt_universal/``: DeepSpeed's ``ds_to_universal --inject_missing_state`` of ``ckpt``;
* ``expected.json``: losses, ``partition_dim`` of every parameter (DeepSpeed's AutoTP
  metadata, ``ds_autotp_universal_checkpoint_meta``; null when replicated), the model config;
* ``z2bf16/``, ``z2bf16.full.safetensors``, ``z2bf16.t{T}.{key}.safetensors``: the same
  model trained again by a second engine (ZeRO 2, bf16) in the same processes, saved, its
  gathered (bf16) weights and its shards at the save;
* ``qwen2/``, ``qwen2.full.safetensors``, ``qwen2.t{T}.*``: the same for a transformers
  ``Qwen2ForCausalLM`` of MODEL's sizes (q/k/v biases), ZeRO 1, fp32;
* for each of EXTRA's models, ``NAME/``, ``NAME.full.safetensors``, ``NAME.t{T}.*`` and
  ``NAMEnext.t{T}.*`` (its shards after one more step, the resume oracle): ``qwen3``, a
  transformers ``Qwen3ForCausalLM`` of MODEL's sizes with tied embeddings (q_norm/k_norm,
  which AutoTP replicates and all-reduces the gradients of; the tied head, which AutoTP cuts
  with the embedding on the vocabulary), ``uneven``, a Llama whose KV heads (3), MLP
  (97) and vocabulary (127) tp does not divide (AutoTP splits them unevenly), and ``z3``,
  MODEL's Llama trained with ZeRO stage 3.

Resume mode::

    torchrun --nproc_per_node 2 ds_autotp.py --out NEW --weights CKPT_A --load CKPT_B \
        [--universal CKPT_C]

builds the same engine; ``load_checkpoint(CKPT_A, load_optimizer_states=False)`` and writes the
module's logits on PROBE (``weights_logits.safetensors``); then ``load_checkpoint(CKPT_B)``,
trains one step (the step after CKPT_B's global step) and writes ``next.t{T}.*`` as above,
and ``load_universal/``, DeepSpeed's ``ds_to_universal`` of CKPT_B.
With ``--also NAME=CKPT_D`` (repeatable), an engine of EXTRA's model NAME loads CKPT_D,
trains one step and writes ``NAMEresumed.t{T}.*``; with ``--also-universal NAME=CKPT_E`` an
engine of NAME with ``"load_universal": true`` loads the universal checkpoint CKPT_E, trains
one step and writes ``NAMEunext.t{T}.*``.
With ``--universal``, a second engine (``"checkpoint": {"load_universal": true}``) loads the
universal checkpoint CKPT_C, trains one step and writes ``unext.t{T}.*``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.groundtruth.ds_train import (LR, SEED, WEIGHT_DECAY, batch_for_step,  # noqa: E402
                                        start_deepspeed_on_cpu)

MODEL = dict(hidden_size=64, head_dim=16, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, vocab_size=128,
             max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-6,
             hidden_act="silu")
# the Qwen3: MODEL's sizes, tied embeddings (no token ids outside the tiny vocabulary)
QWEN3 = dict(MODEL, tie_word_embeddings=True, use_sliding_window=False, pad_token_id=None,
             bos_token_id=None, eos_token_id=None)
UNEVEN = dict(MODEL, hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
              intermediate_size=97, vocab_size=127)
# z3: MODEL's Llama with ZeRO stage 3 (DeepSpeed 0.19 trains AutoTP with any ZeRO stage)
EXTRA = {"qwen3": QWEN3, "uneven": UNEVEN, "z3": MODEL}
STAGE = {"z3": 3}
TP = 2
STEPS = 2
BATCH, SEQ = 4, 16
PROBE = 99
KEYS = ("fp32", "exp_avg", "exp_avg_sq")


def ds_config(universal: bool = False, stage: int = 1, bf16: bool = False) -> dict:
    return {**({"checkpoint": {"load_universal": True}} if universal else {}),
            **({"bf16": {"enabled": True}} if bf16 else {}),
            "train_micro_batch_size_per_gpu": BATCH,
            "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
            "tensor_parallel": {"autotp_size": TP}, "zero_allow_untested_optimizer": True,
            "gradient_clipping": 1.0, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def engine_of(deepspeed, universal: bool = False, stage: int = 1, bf16: bool = False,
              arch: str = "llama"):
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)

    torch.manual_seed(SEED)
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**QWEN3)).float()
    elif arch == "uneven":
        model = LlamaForCausalLM(LlamaConfig(**UNEVEN)).float()
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**MODEL, use_sliding_window=False)).float()
    else:
        model = LlamaForCausalLM(LlamaConfig(**MODEL)).float()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=WEIGHT_DECAY)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(universal, stage, bf16))
    return engine


def step(engine, k):
    ids = batch_for_step(k, BATCH, SEQ, engine.module.config.vocab_size)
    out = engine(input_ids=ids, labels=ids)
    engine.backward(out.loss)
    engine.step()
    return float(out.loss.detach())


def logits(engine, path, rank):
    import torch
    from safetensors.torch import save_file

    ids = batch_for_step(PROBE, BATCH, SEQ, MODEL["vocab_size"])
    with torch.no_grad():
        out = engine.module(input_ids=ids).logits.float().contiguous()
    if rank == 0:
        save_file({"logits": out}, str(path))


def dump_state(engine, out: Path, prefix: str, rank: int):
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):    # see ds_train.dump_full_state
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    full = {k: {} for k in KEYS}
    for name, p in engine.module.named_parameters():
        full["fp32"][name] = safe_get_full_fp32_param(p)
        for k in KEYS[1:]:
            full[k][name] = safe_get_full_optimizer_state(p, k)
    for k, d in full.items():
        save_file({n: t.detach().float().cpu().contiguous() for n, t in d.items()},
                  str(out / f"{prefix}.t{rank}.{k}.safetensors"))


def to_universal(ckpt: Path, out: Path):
    """DeepSpeed's own ``ds_to_universal --inject_missing_state`` of ``ckpt``'s latest tag into
    ``out`` (serial: one extract and one merge worker, so no process pool), on the calling
    rank only."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tag = (ckpt / "latest").read_text().strip()
    ds_to_universal(Namespace(input_folder=str(ckpt / tag), output_folder=str(out),
                              num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True))


def save_and_gather(engine, out: Path, name: str, rank: int):
    """engine.save_checkpoint(out/name) and DeepSpeed's gathered full weights
    (``{name}.full.safetensors``)."""
    import torch.distributed as tdist
    from safetensors.torch import save_file

    engine.save_checkpoint(str(out / name))
    tdist.barrier()
    full = engine._replace_module_consolidated_state_dict()
    if rank == 0:
        save_file({n: t.contiguous() for n, t in full.items()},
                  str(out / f"{name}.full.safetensors"))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--weights", default=None)
    p.add_argument("--load", default=None)
    p.add_argument("--universal", default=None)
    p.add_argument("--also", action="append", default=[])
    p.add_argument("--also-universal", action="append", default=[])
    args = p.parse_args(argv)
    import torch.distributed as tdist
    from safetensors.torch import save_file

    deepspeed = start_deepspeed_on_cpu()
    rank = tdist.get_rank()
    engine = engine_of(deepspeed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": MODEL, **EXTRA, "tp": TP}
    if args.load:
        if args.weights:
            path, _ = engine.load_checkpoint(args.weights, load_optimizer_states=False,
                                             load_lr_scheduler_states=False)
            if path is None:
                raise SystemExit(f"could not load {args.weights}")
            logits(engine, out / "weights_logits.safetensors", rank)
        path, _ = engine.load_checkpoint(args.load)
        if path is None:
            raise SystemExit(f"could not load {args.load}")
        start = engine.global_steps
        meta["loss"] = [step(engine, start)]
        meta["start_step"] = start
        dump_state(engine, out, "next", rank)
        if rank == 0:
            to_universal(Path(args.load), out / "load_universal")
        if args.universal:
            engine = engine_of(deepspeed, universal=True)
            path, _ = engine.load_checkpoint(args.universal)
            if path is None:
                raise SystemExit(f"could not load {args.universal}")
            meta["universal_start_step"] = engine.global_steps
            meta["universal_loss"] = [step(engine, engine.global_steps)]
            dump_state(engine, out, "unext", rank)
        for item, universal in [(a, False) for a in args.also] + \
                [(a, True) for a in args.also_universal]:
            arch, ckpt = item.split("=", 1)
            engine = engine_of(deepspeed, universal=universal, arch=arch,
                               stage=STAGE.get(arch, 1))
            path, _ = engine.load_checkpoint(ckpt)
            if path is None:
                raise SystemExit(f"could not load {ckpt}")
            key = f"{arch}_universal" if universal else arch
            meta[f"{key}_start_step"] = engine.global_steps
            meta[f"{key}_loss"] = [step(engine, engine.global_steps)]
            dump_state(engine, out, f"{arch}unext" if universal else f"{arch}resumed", rank)
    else:
        meta["loss"] = [step(engine, k) for k in range(STEPS)]
        save_and_gather(engine, out, "ckpt", rank)
        if rank == 0:
            to_universal(out / "ckpt", out / "ckpt_universal")
        logits(engine, out / "logits.safetensors", rank)
        dump_state(engine, out, "saved", rank)
        meta["partition_dim"] = {
            n: (getattr(p, "ds_autotp_universal_checkpoint_meta", None) or {}).get("partition_dim")
            for n, p in engine.module.named_parameters()}
        meta["next_loss"] = step(engine, STEPS)
        dump_state(engine, out, "next", rank)
        meta["global_step"] = STEPS
        # a second engine in the same processes: ZeRO 2, bf16 (DeepSpeedZeroOptimizer with
        # bf16 weights and fp32 masters)
        engine = engine_of(deepspeed, stage=2, bf16=True)
        meta["z2bf16_loss"] = [step(engine, k) for k in range(STEPS)]
        save_and_gather(engine, out, "z2bf16", rank)
        dump_state(engine, out, "z2bf16", rank)
        # and a transformers Qwen2 (q/k/v biases), ZeRO 1, fp32
        engine = engine_of(deepspeed, arch="qwen2")
        meta["qwen2_loss"] = [step(engine, k) for k in range(STEPS)]
        save_and_gather(engine, out, "qwen2", rank)
        dump_state(engine, out, "qwen2", rank)
        # and EXTRA's models (ZeRO 1, fp32), each with one more step after the save
        for arch in EXTRA:
            engine = engine_of(deepspeed, arch=arch, stage=STAGE.get(arch, 1))
            meta[f"{arch}_loss"] = [step(engine, k) for k in range(STEPS)]
            save_and_gather(engine, out, arch, rank)
            dump_state(engine, out, arch, rank)
            meta[f"{arch}_partition_dim"] = {
                n: (getattr(p, "ds_autotp_universal_checkpoint_meta", None) or {})
                .get("partition_dim") for n, p in engine.module.named_parameters()}
            meta[f"{arch}_next_loss"] = step(engine, STEPS)
            dump_state(engine, out, f"{arch}next", rank)
    if rank == 0:
        (out / "expected.json").write_text(json.dumps(meta, indent=1) + "\n")
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
