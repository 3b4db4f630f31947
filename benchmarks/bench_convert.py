#!/usr/bin/env python
"""End-to-end conversion benchmark: mapc against ``cp -r`` on a ~1 GB Llama-shaped checkpoint.

    python benchmarks/bench_convert.py [--size-gb 1.0] [--workdir DIR] [--json OUT] [--keep]

1. Writes a Llama-shaped HuggingFace checkpoint (bf16, sharded safetensors + index +
   config.json) of about ``--size-gb`` GB with random data. The safetensors files are written
   directly, one tensor at a time, so the generator needs only one tensor's worth of memory.
2. Times, each in a fresh subprocess (peak RSS per operation, from ``/usr/bin/time -v`` or,
   without it, ``getrusage(RUSAGE_CHILDREN)`` in a small wrapper):
     - ``cp -r SRC COPY``                                   (the floor)
     - ``mapc convert SRC MG --to megatron --tp 2 --pp 2``
     - ``mapc convert MG BACK --to hf``
   Each is run twice after ``sync`` and the best run is reported; the page cache is warm for
   all of them (the source was just written / read), so this measures CPU + page-cache copy
   cost, not the disk.
3. Checks ``mapc verify SRC BACK`` exits 0 (not timed).
4. Prints a table with the ratio to cp, peak RSS and GB/s, and PASS/MISS against the targets
   (convert <= 1.5x cp, peak RSS <= 1.5 GB = 1.5e9 bytes). ``--json OUT`` writes the numbers.

The exit status is 0 when the round trip verifies (whether or not targets are met), 1 if it
differs or could not run (a conversion failed).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# ---- targets ----------------------------------------------------------------------------------
MAX_RATIO_TO_CP = 1.5
MAX_RSS_BYTES = 1.5e9

# ---- the model shape ---------------------------------------------------------------------------
LLAMA_1B = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=4,
                intermediate_size=5632, vocab_size=32000)
TINY = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=688, vocab_size=8000)
BF16 = 2  # bytes
ST_DTYPE = {"bfloat16": ("BF16", 2), "float32": ("F32", 4)}


MAX_RATIO_TO_MEGATRON = 2.0


def llama_config(num_hidden_layers: int, *, hidden_size, num_attention_heads,
                 num_key_value_heads, intermediate_size, vocab_size) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "num_hidden_layers": num_hidden_layers,
        "vocab_size": vocab_size,
        "head_dim": hidden_size // num_attention_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pretraining_tp": 1,
        "use_cache": True,
    }


def layer_tensors(i: int, c: dict) -> list[tuple[str, tuple]]:
    h, f = c["hidden_size"], c["intermediate_size"]
    d = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * d
    p = f"model.layers.{i}."
    return [
        (p + "input_layernorm.weight", (h,)),
        (p + "self_attn.q_proj.weight", (h, h)),
        (p + "self_attn.k_proj.weight", (kv, h)),
        (p + "self_attn.v_proj.weight", (kv, h)),
        (p + "self_attn.o_proj.weight", (h, h)),
        (p + "post_attention_layernorm.weight", (h,)),
        (p + "mlp.gate_proj.weight", (f, h)),
        (p + "mlp.up_proj.weight", (f, h)),
        (p + "mlp.down_proj.weight", (h, f)),
    ]


def all_tensors(c: dict) -> list[tuple[str, tuple]]:
    h, v = c["hidden_size"], c["vocab_size"]
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(c["num_hidden_layers"]):
        out += layer_tensors(i, c)
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def _nbytes(shape, itemsize: int = BF16) -> int:
    n = itemsize
    for s in shape:
        n *= s
    return n


def layers_for_size(size_bytes: float, shape: dict = LLAMA_1B, multiple: int = 2,
                    dtype: str = "bfloat16") -> int:
    """The number of layers (a multiple of ``multiple``, for pp) closest to ``size_bytes``."""
    k = ST_DTYPE[dtype][1]
    fixed = sum(_nbytes(s, k) for n, s in all_tensors({**shape, "num_hidden_layers": 0}))
    per_layer = sum(_nbytes(s, k) for n, s in layer_tensors(0, shape))
    n = round((size_bytes - fixed) / per_layer / multiple) * multiple
    return max(multiple, n)


def _random_bf16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random finite bf16 values as uint16 bits: random sign, mantissa and the two low
    exponent bits over a fixed base, so |x| is in [2**-7, 2**-3). No NaN/Inf, so bit-exact
    comparisons are meaningful."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    bits &= 0x81FF
    bits |= 0x3C00
    return bits


def _ones_bf16_bits(n: int) -> np.ndarray:
    return np.full(n, 0x3F80, dtype=np.uint16)  # 1.0, like a fresh RMSNorm weight


def write_safetensors(path: Path, tensors: list[tuple[str, tuple]], rng: np.random.Generator,
                      dtype: str = "bfloat16", chunk_elems: int = 16 * 2**20) -> int:
    """Write one safetensors file (bf16, or fp32 holding bf16-representable values), tensor by
    tensor in chunks, never holding more than ``chunk_elems`` elements in memory. Returns the
    file size."""
    st, itemsize = ST_DTYPE[dtype]
    header, offset = {}, 0
    for name, shape in tensors:
        n = _nbytes(shape, itemsize)
        header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in tensors:
            left = _nbytes(shape) // BF16
            norm = name.endswith("norm.weight")
            while left:
                k = min(left, chunk_elems)
                bits = _ones_bf16_bits(k) if norm else _random_bf16_bits(rng, k)
                if itemsize == 4:
                    bits = bits.astype("<u4") << 16
                f.write(memoryview(bits))
                left -= k
    return 8 + len(raw) + offset


def write_llama_checkpoint(out: Path, num_hidden_layers: int, shape: dict = LLAMA_1B, *,
                           max_shard_bytes: int = 300 * 10**6, seed: int = 0,
                           dtype: str = "bfloat16") -> dict:
    """A Llama-shaped HF checkpoint (``dtype``, default bf16) in ``out``: ``config.json``,
    ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``. Shards are
    filled greedily up to ``max_shard_bytes`` (as transformers does). Returns the config."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = llama_config(num_hidden_layers, **shape)
    config["torch_dtype"] = dtype
    itemsize = ST_DTYPE[dtype][1]
    tensors = all_tensors(config)
    groups, size = [[]], 0
    for name, shp in tensors:
        n = _nbytes(shp, itemsize)
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shp))
        size += n
    rng = np.random.default_rng(seed)
    weight_map = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(out / fname, group, rng, dtype)
        weight_map.update({name: fname for name, _ in group})
    total = sum(_nbytes(s, itemsize) for _, s in tensors)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---- measuring ----------------------------------------------------------------------------------
TIME_BIN = "/usr/bin/time"

_WRAPPER = r"""
import json, resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    json.dump({"rc": rc, "maxrss_kb": ru.ru_maxrss, "user": ru.ru_utime, "sys": ru.ru_stime,
               "oublock": ru.ru_oublock}, f)
sys.exit(rc)
"""


def _have_gnu_time() -> bool:
    if not os.access(TIME_BIN, os.X_OK):
        return False
    r = subprocess.run([TIME_BIN, "-v", "true"], capture_output=True, text=True)
    return r.returncode == 0 and "Maximum resident set size" in r.stderr


class StepFailed(Exception):
    def __init__(self, what: str, stderr: str):
        super().__init__(what)
        self.stderr = stderr
        lines = stderr.strip().splitlines()
        self.last_line = lines[-1] if lines else what


def measure(cmd: list[str], workdir: Path, use_gnu_time: bool) -> dict:
    """Run ``cmd`` in a fresh process; wall seconds (timed here) and the child's peak RSS."""
    subprocess.run(["sync"], check=True)
    if use_gnu_time:
        full = [TIME_BIN, "-v"] + cmd
    else:
        rfile = workdir / ".rusage.json"
        full = [sys.executable, "-c", _WRAPPER, str(rfile)] + cmd
    t0 = time.perf_counter()
    r = subprocess.run(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        err = r.stderr
        if use_gnu_time:  # drop GNU time's report
            err = err.split("\tCommand being timed:")[0]
            err = "\n".join(x for x in err.splitlines() if not x.startswith("Command exited"))
        raise StepFailed(f"command failed ({r.returncode}): {' '.join(cmd)}", err.strip())
    if use_gnu_time:
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
        maxrss_kb = int(m.group(1))
        user = float(re.search(r"User time \(seconds\): ([\d.]+)", r.stderr).group(1))
        sys_s = float(re.search(r"System time \(seconds\): ([\d.]+)", r.stderr).group(1))
        oublock = int(re.search(r"File system outputs: (\d+)", r.stderr).group(1))
    else:
        ru = json.loads(rfile.read_text())
        maxrss_kb, user, sys_s, oublock = ru["maxrss_kb"], ru["user"], ru["sys"], ru["oublock"]
        rfile.unlink()
    # file system outputs (512-byte blocks): the bytes the process tree dirtied in the page
    # cache, scratch files included even when deleted before they reach the disk
    return {"seconds": seconds, "peak_rss_bytes": maxrss_kb * 1024, "user": user, "sys": sys_s,
            "written_bytes": oublock * 512}


def mapc_revision() -> str:
    """The git commit of the mapc checkout being measured (``+dirty`` with local edits)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--",
                                ".", ":!benchmarks"], capture_output=True, text=True).stdout
        return rev + ("+dirty" if any(l[:2].strip() and not l.startswith("??")
                                      for l in dirty.splitlines()) else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def mapc_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "mapc"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("mapc")
    return [found] if found else [sys.executable, "-m", "mapc.cli.main"]


def best_of(n: int, run, cleanup) -> dict:
    """Run ``n`` times; the best wall time and the worst peak RSS (so a lucky run cannot hide
    memory use). ``cleanup`` runs between runs; the last run's output is kept."""
    runs = []
    for k in range(n):
        runs.append(run())
        if k < n - 1:
            cleanup()
    return {"seconds": min(r["seconds"] for r in runs),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
            "runs_seconds": [r["seconds"] for r in runs],
            "runs_user_sys": [(r["user"], r["sys"]) for r in runs],
            "runs_peak_rss_bytes": [r["peak_rss_bytes"] for r in runs]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size (1 GB = 1e9 B)")
    ap.add_argument("--workdir", help="where to write (default: a temp dir, removed after)")
    ap.add_argument("--json", help="write the numbers to this JSON file")
    ap.add_argument("--repeat", type=int, default=2, help="runs per timed step (best kept)")
    ap.add_argument("--shard-mb", type=float, default=300, help="source shard size, MB")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--formats", default="nemo,gguf,dcp,nxdt,neox,torch_dist",
                    help="other formats to time there and back (comma-separated; '' for none)")
    args = ap.parse_args(argv)

    own_tmp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="mapc-bench-")) if own_tmp else Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src, copy, mg, back = (work / n for n in ("src-hf", "copy-hf", "mg-tp2pp2", "back-hf"))
    for p in (src, copy, mg, back):
        if p.exists():
            shutil.rmtree(p)
    use_gnu_time = _have_gnu_time()
    mapc = mapc_cmd()
    try:
        layers = layers_for_size(args.size_gb * 1e9)
        t0 = time.perf_counter()
        write_llama_checkpoint(src, layers, max_shard_bytes=int(args.shard_mb * 1e6))
        gen_s = time.perf_counter() - t0
        size = dir_bytes(src)
        nshards = len(list(src.glob("*.safetensors")))
        print(f"generated {src}: {layers} layers, {nshards} shards, {size / 1e9:.3f} GB "
              f"in {gen_s:.1f}s", flush=True)

        ops: dict[str, dict] = {}

        def step(name, run, cleanup, needs=None):
            if needs is not None and "error" in ops.get(needs, {}):
                ops[name] = {"error": f"skipped: '{needs}' failed"}
                return
            print(f"timing {name} ...", flush=True)
            try:
                ops[name] = best_of(args.repeat, run, cleanup)
            except StepFailed as e:
                print(f"  FAILED: {e}\n  {e.last_line}", flush=True)
                ops[name] = {"error": e.last_line, "stderr": e.stderr}

        def rm(p):
            return lambda: shutil.rmtree(p, ignore_errors=True)

        step("cp -r (floor)",
             lambda: measure(["cp", "-r", str(src), str(copy)], work, use_gnu_time), rm(copy))
        shutil.rmtree(copy, ignore_errors=True)
        to_mg, to_hf = "hf -> megatron tp2 pp2", "megatron -> hf"
        step(to_mg, lambda: measure(mapc + ["convert", str(src), str(mg), "--to", "megatron",
                                            "--tp", "2", "--pp", "2", "-q"], work, use_gnu_time),
             rm(mg))
        step(to_hf, lambda: measure(mapc + ["convert", str(mg), str(back), "--to", "hf", "-q"],
                                    work, use_gnu_time), rm(back), needs=to_mg)

        # Every other format there and back, each against hf -> megatron per byte (<= 2x).
        per_format_topology = {"nemo": ["--tp", "2", "--pp", "2"],
                               "nxdt": ["--tp", "2", "--pp", "2"],
                               "neox": ["--tp", "2", "--pp", "2"],
                               "torch_dist": ["--tp", "2", "--pp", "2"]}
        format_rows = []
        for fmt in [f for f in args.formats.split(",") if f]:
            out, home = work / f"fmt-{fmt}", work / f"fmt-{fmt}-back"
            there, again = f"hf -> {fmt}", f"{fmt} -> hf"
            step(there, lambda: measure(mapc + ["convert", str(src), str(out), "--to", fmt, "-q"]
                                        + per_format_topology.get(fmt, []), work, use_gnu_time),
                 rm(out))
            step(again, lambda: measure(mapc + ["convert", str(out), str(home), "--to", "hf",
                                                "-q"], work, use_gnu_time), rm(home), needs=there)
            shutil.rmtree(home, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            format_rows += [there, again]

        if "error" in ops[to_hf]:
            identical, verify_out = None, "not run: no round-trip output"
        else:
            print("verifying round trip (not timed) ...", flush=True)
            v = subprocess.run(mapc + ["verify", str(src), str(back), "-q"],
                               capture_output=True, text=True)
            identical, verify_out = v.returncode == 0, (v.stdout + v.stderr).strip()
        mg_bytes = dir_bytes(mg) if mg.exists() else None
        back_bytes = dir_bytes(back) if back.exists() else None

        cp = ops["cp -r (floor)"]
        if "error" in cp:
            raise SystemExit(f"cp failed: {cp['error']}")
        cp_s = cp["seconds"]
        rows = []
        for name, r in ops.items():
            is_mapc = not name.startswith("cp")
            if "error" in r:
                rows.append({"operation": name, "error": r["error"], "seconds": None,
                             "ratio_to_cp": None, "peak_rss_mib": None, "gb_per_s": None,
                             "time_target": False, "rss_target": False})
                continue
            ratio = r["seconds"] / cp_s
            rows.append({
                "operation": name,
                "seconds": r["seconds"],
                "runs_seconds": r["runs_seconds"],
                "runs_user_sys_seconds": r["runs_user_sys"],
                "ratio_to_cp": ratio,
                "peak_rss_mib": r["peak_rss_bytes"] / 2**20,
                "runs_peak_rss_mib": [b / 2**20 for b in r["runs_peak_rss_bytes"]],
                "gb_per_s": size / 1e9 / r["seconds"],
                "time_target": (ratio <= MAX_RATIO_TO_CP) if is_mapc else None,
                "rss_target": (r["peak_rss_bytes"] <= MAX_RSS_BYTES) if is_mapc else None,
            })

        def gb(n):
            return "-" if n is None else f"{n / 1e9:.3f} GB"
        print()
        print(f"checkpoint: {size / 1e9:.3f} GB bf16 ({layers} layers, hidden 2048, "
              f"{nshards} safetensors shards); megatron output {gb(mg_bytes)}, "
              f"hf output {gb(back_bytes)}")
        print(f"mapc {mapc_revision()}; machine: {os.cpu_count()} cpus, "
              f"python {platform.python_version()}, "
              f"peak RSS via {'/usr/bin/time -v' if use_gnu_time else 'getrusage wrapper'}")
        print(f"best time of {args.repeat} runs each (RSS: worst run), each after sync, in a "
              f"fresh process; page cache WARM for cp and mapc (source already cached, outputs "
              f"go to the page cache, no fsync)")
        print()
        hdr = f"{'operation':<24} {'seconds':>8} {'x cp':>6} {'peak RSS MiB':>13} " \
              f"{'GB/s':>6}  {'time<=1.5x cp':>13} {'RSS<=1.5GB':>10}"
        print(hdr)
        print("-" * len(hdr))

        def pm(x):
            return "" if x is None else ("PASS" if x else "MISS")
        for r in rows:
            if "error" in r:
                print(f"{r['operation']:<24} {'FAILED':>8} {'-':>6} {'-':>13} {'-':>6}  "
                      f"{'MISS':>13} {'MISS':>10}")
                print(f"    {r['error']}")
                continue
            print(f"{r['operation']:<24} {r['seconds']:>8.2f} {r['ratio_to_cp']:>6.2f} "
                  f"{r['peak_rss_mib']:>13.0f} {r['gb_per_s']:>6.2f}  "
                  f"{pm(r['time_target']):>13} {pm(r['rss_target']):>10}")
        print()
        print("all runs (wall s [user+sys s]):")
        for r in rows:
            if "error" not in r:
                print(f"  {r['operation']:<24} " + ", ".join(
                    f"{w:.2f} [{u:.2f}+{k:.2f}]"
                    for w, (u, k) in zip(r["runs_seconds"], r["runs_user_sys_seconds"])))
        print()
        print("round trip verify (mapc verify SRC BACK): "
              + {True: "identical", False: "DIFFERENT", None: "NOT RUN"}[identical])
        if identical is not True:
            print("    " + verify_out.replace("\n", "\n    "))
        base = ops.get(to_mg, {}).get("seconds")
        if format_rows and base:
            print()
            print("other formats, per byte against hf -> megatron (target <= "
                  f"{MAX_RATIO_TO_MEGATRON}x):")
            for name in format_rows:
                r = ops[name]
                if "error" in r:
                    print(f"  {name:<24} FAILED")
                    continue
                ratio = r["seconds"] / base
                print(f"  {name:<24} {r['seconds']:6.2f} s  {ratio:5.2f}x  "
                      f"{'PASS' if ratio <= MAX_RATIO_TO_MEGATRON else 'MISS'}")
                for row in rows:
                    if row["operation"] == name:
                        row["ratio_to_megatron"] = ratio
        all_pass = bool(identical) and all(r[k] for r in rows[1:]
                                           if r["operation"] not in format_rows
                                           for k in ("time_target", "rss_target"))
        print(f"targets (<= {MAX_RATIO_TO_CP}x cp, <= {MAX_RSS_BYTES / 1e9} GB peak RSS, "
              f"round trip identical): {'PASS' if all_pass else 'MISS'}")

        if args.json:
            Path(args.json).write_text(json.dumps({
                "size_bytes": size, "layers": layers, "source_shards": nshards,
                "megatron_bytes": mg_bytes, "hf_back_bytes": back_bytes,
                "mapc_revision": mapc_revision(),
                "cpus": os.cpu_count(), "repeat": args.repeat, "page_cache": "warm",
                "rss_method": "gnu-time" if use_gnu_time else "getrusage",
                "targets": {"max_ratio_to_cp": MAX_RATIO_TO_CP, "max_rss_bytes": MAX_RSS_BYTES},
                "operations": rows, "verify_identical": identical, "all_targets_pass": all_pass,
            }, indent=2) + "\n")
        return 0 if identical else 1
    finally:
        if own_tmp and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif not args.keep:
            for p in (src, copy, mg, back):
                shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
