#!/usr/bin/env python
"""DeepSeek-V3 at its real shapes: planning the full 671B model, and converting a slice of it.

    python benchmarks/bench_deepseek.py [--workdir DIR] [--json OUT] [--skip-slice]

The full model (1.34 TB in bf16) cannot be stored on the machine this is run on, so the
checkpoints are *hollow*: real HuggingFace safetensors files (header, index, config.json of the
released model) whose data sections are holes (``ftruncate``), which take no disk space and read
as zeros. Tensor names and shapes come from transformers' own ``DeepseekV3ForCausalLM`` built on
the meta device, not from mapc.

1. **Plan** (``mapc convert SRC DST --to megatron ... --dry-run``) of all 61 layers, 256 experts
   per MoE layer, tp 4, ep 8, pp 8 with uneven stages (5 layers first, 8 last, 8 on each of the
   six others), in a fresh process: wall seconds and peak RSS (target: under 10 s; the RSS is
   reported, the issue's bound is 1.5 GB).
2. **Slice** (unless ``--skip-slice``): the first dense layer and the first MoE layer at real
   shapes (embedding, lm_head, all 256 experts: 27.6 GB of bf16), converted hf -> megatron tp 1
   ep 8 by mapc, beside ``cp -r --sparse=never`` of the same files in the same run (both read
   the holes as zeros and write every byte): wall seconds, peak RSS (target <= 1.5 GB, i.e. no
   layer of experts is ever built whole: one is 22.5 GB), GB/s. Each output is deleted before
   the next step, so the run needs ~66 GB of free disk: mapc's output is 65.3 GB, since every
   expert-parallel rank file holds its own copy of the dense tensors (embedding and head
   included), as Megatron's torch format does.

Values are zeros (holes): this measures planning, memory and byte movement, not the layout,
which tests/test_deepseek_v3.py checks against transformers and megatron-core.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import _have_gnu_time, mapc_cmd, mapc_revision, measure  # noqa: E402

PLAN_TARGET_S = 10.0
MAX_RSS_BYTES = 1.5e9
SHARD_BYTES = 5e9           # the hub release's shards are ~4.3 GB each (163 files)

# The released model's config (the fields transformers' DeepseekV3Config reads; rope scaling
# and the MTP layer, num_nextn_predict_layers, left out: transformers' model has no MTP layer)
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "vocab_size": 129280,
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "rope_theta": 10000.0, "torch_dtype": "bfloat16",
}
ST = {"torch.bfloat16": ("BF16", 2), "torch.float32": ("F32", 4)}


def hf_tensors(config: dict) -> list[tuple[str, str, tuple]]:
    """(name, safetensors dtype, shape) of transformers' DeepSeek-V3 state dict for ``config``
    (built on the meta device: no memory), bf16 but for the fp32 router score bias."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(**{k: v for k, v in config.items()
                              if k not in ("architectures", "model_type", "torch_dtype")})
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg)
    out = []
    for name, t in model.state_dict().items():
        dtype = "F32" if name.endswith("e_score_correction_bias") else "BF16"
        shape = tuple(t.shape)
        # the module fuses each layer's experts (gate_up_proj [E, 2F, H], down_proj
        # [E, H, F]); save_pretrained and the hub release store them one by one
        if name.endswith(".mlp.experts.gate_up_proj"):
            (e, f2, h), base = shape, name[:-len("gate_up_proj")]
            out += [(f"{base}{k}.{w}.weight", dtype, (f2 // 2, h))
                    for k in range(e) for w in ("gate_proj", "up_proj")]
        elif name.endswith(".mlp.experts.down_proj"):
            (e, h, f), base = shape, name[:-len("down_proj")]
            out += [(f"{base}{k}.down_proj.weight", dtype, (h, f)) for k in range(e)]
        else:
            out.append((name, dtype, shape))
    return out


def _nbytes(dtype: str, shape: tuple) -> int:
    n = {"BF16": 2, "F32": 4}[dtype]
    for s in shape:
        n *= s
    return n


def write_hollow_hf(out: Path, config: dict) -> int:
    """A HuggingFace checkpoint of ``config`` whose tensor data are holes; returns its bytes."""
    out.mkdir(parents=True)
    tensors = hf_tensors(config)
    shards, cur, size = [], [], 0
    for t in tensors:
        nb = _nbytes(t[1], t[2])
        if cur and size + nb > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += nb
    shards.append(cur)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {}, 0
        for name, dtype, shape in shard:
            nb = _nbytes(dtype, shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nb]}
            weight_map[name] = fname
            off += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / fname, "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little"))
            fh.write(raw)
            fh.truncate(8 + len(raw) + off)
        total += off
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-slice", action="store_true")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mapc-bench-dsv3-", dir=args.workdir))
    gnu = _have_gnu_time()
    mapc = mapc_cmd()
    results = {"revision": mapc_revision()}
    try:
        full = work / "full"
        t0 = time.perf_counter()
        nbytes = write_hollow_hf(full, DEEPSEEK_V3)
        print(f"hollow DeepSeek-V3 (61 layers, 256 experts): {nbytes / 1e12:.3f} TB in "
              f"{len(list(full.glob('*.safetensors')))} files, written in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        plan_cmd = mapc + ["convert", str(full), str(work / "mg-full"), "--to", "megatron",
                           "--tp", "4", "--ep", "8", "--pp", "8", "--pp-first-stage", "5",
                           "--pp-last-stage", "8", "--dry-run"]
        plan = [measure(plan_cmd, work, gnu) for _ in range(2)]
        best = min(plan, key=lambda r: r["seconds"])
        worst_rss = max(r["peak_rss_bytes"] for r in plan)
        results["plan"] = {"bytes": nbytes, "seconds": best["seconds"],
                           "runs_seconds": [r["seconds"] for r in plan],
                           "cpu_seconds": best["user"] + best["sys"],
                           "peak_rss_bytes": worst_rss}
        print(f"plan (--dry-run) tp4 ep8 pp8 (5 first, 8 last): {best['seconds']:.2f} s "
              f"(runs {', '.join('%.2f' % r['seconds'] for r in plan)}), peak RSS "
              f"{worst_rss / 2**20:.0f} MiB, {best['user'] + best['sys']:.2f} CPU s; "
              f"target <{PLAN_TARGET_S:.0f} s: "
              f"{'PASS' if best['seconds'] < PLAN_TARGET_S else 'MISS'}", flush=True)
        shutil.rmtree(full)

        if not args.skip_slice:
            cfg = dict(DEEPSEEK_V3, num_hidden_layers=2, first_k_dense_replace=1)
            src = work / "slice"
            nbytes = write_hollow_hf(src, cfg)
            print(f"slice (1 dense + 1 MoE layer, real shapes): {nbytes / 1e9:.1f} GB",
                  flush=True)
            rows = {}
            cp = measure(["cp", "-r", "--sparse=never", str(src), str(work / "copy")], work,
                         gnu)
            shutil.rmtree(work / "copy")
            rows["cp -r --sparse=never"] = cp
            conv = measure(mapc + ["convert", str(src), str(work / "mg"), "--to", "megatron",
                                   "--tp", "1", "--ep", "8", "-q", "--json"], work, gnu)
            out_bytes = sum(f.stat().st_size for f in (work / "mg").rglob("*") if f.is_file())
            shutil.rmtree(work / "mg")
            rows["mapc hf -> megatron ep8"] = conv
            results["slice"] = {"bytes": nbytes, "output_bytes": out_bytes,
                                "rows": rows}
            print(f"mapc writes {out_bytes / 1e9:.1f} GB (every expert-parallel rank file holds "
                  f"the dense tensors), cp {nbytes / 1e9:.1f} GB; GB/s below is of the source")
            print(f"{'operation':28s} {'seconds':>8s} {'x cp':>6s} {'CPU s':>6s} "
                  f"{'peak RSS MiB':>13s} {'GB/s':>6s}  RSS<=1.5GB")
            for what, r in rows.items():
                print(f"{what:28s} {r['seconds']:8.2f} {r['seconds'] / cp['seconds']:6.2f} "
                      f"{r['user'] + r['sys']:6.1f} "
                      f"{r['peak_rss_bytes'] / 2**20:13.0f} {nbytes / 1e9 / r['seconds']:6.2f}"
                      f"  {'PASS' if r['peak_rss_bytes'] <= MAX_RSS_BYTES else 'MISS'}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
