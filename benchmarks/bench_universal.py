#!/usr/bin/env python
"""mapc against DeepSpeed's own ``ds_to_universal`` on a real ZeRO checkpoint.

    python benchmarks/bench_universal.py CACHE_DIR [--json OUT] [--repeat N] [--layers 8]

1. Trains (once; cached in ``CACHE_DIR``) a Llama-shaped model with the real DeepSpeed at
   data-parallel 2, ZeRO stage 2, fp32, for 1 step (tests/groundtruth/deepspeed_ckpt.py):
   hidden 512, 8 heads / 4 KV heads, FFN 1536, vocab 32000, 8 layers, untied = 58.2M params,
   so 0.70 GB of fp32 master weights + Adam moments in the two optimizer files.
2. Times, side by side in this run, each in a fresh subprocess, ``--repeat`` times (best wall
   time, worst peak RSS):
     - ``python -m deepspeed.checkpoint.ds_to_universal --input_folder CKPT/global_step1
       --output_folder OUT/global_step1_universal --inject_missing_state`` (its default
       workers: 4 extract, 2 merge processes);
     - ``mapc convert CKPT OUT --to universal -q``.
   Both read the checkpoint as ``engine.save_checkpoint`` leaves it: ``latest`` and the tag
   folder, without the ``config.json`` the test harness adds (mapc then runs in generic mode:
   no model config, no spec chosen by family). ``--with-config`` keeps the config.json.
   Peak RSS is that of the whole process tree (ds_to_universal forks workers): the tree's
   summed RSS sampled every 10 ms with psutil. The page cache is warm for both (the source
   was just read), so this is CPU + memory cost, not the disk.
3. Checks that both outputs are identical, file for file and tensor for tensor, with torch
   (tests/groundtruth/ds_universal_compare.py; not timed).
4. Prints the table and PASS/MISS against the target: mapc >= 5x faster than ds_to_universal
   with less peak memory. Exit status 0 when the outputs are identical, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.groundtruth import deepspeed_ckpt as ds  # noqa: E402

MIN_SPEEDUP = 5.0
BENCH_MODEL = {"hidden_size": 512, "head_dim": 64, "num_hidden_layers": 8,
               "num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 1536,
               "vocab_size": 32000, "max_position_embeddings": 64}


def n_params(m: dict, layers: int) -> int:
    h, f, v, hd = m["hidden_size"], m["intermediate_size"], m["vocab_size"], m["head_dim"]
    q, kv = m["num_attention_heads"] * hd, m["num_key_value_heads"] * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h
    return 2 * v * h + layers * per_layer + h


def run_measured(cmd: list[str], env: dict) -> tuple[float, int, str, float]:
    """(wall seconds, peak summed RSS of the process tree in bytes, stderr tail, CPU seconds
    (user + system) of the whole tree: less sensitive than wall time to other jobs on the
    cores)."""
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    peak = [0]
    done = threading.Event()

    def sample():
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not done.is_set():
            total = 0
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            peak[0] = max(peak[0], total)
            time.sleep(0.01)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    wall = time.monotonic() - start
    done.set()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, peak[0], err, cpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cache", help="directory holding (or to hold) the trained checkpoint")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--with-config", action="store_true",
                    help="give mapc the harness's config.json too (family mode)")
    args = ap.parse_args(argv)
    cache = Path(args.cache).absolute()
    cache.mkdir(parents=True, exist_ok=True)
    model = dict(BENCH_MODEL, num_hidden_layers=args.layers)
    t0 = time.monotonic()
    ckpt = ds.make_zero_checkpoint(cache, stage=2, dtype="fp32", groups=1, steps=1, model=model,
                                   timeout=3600, name=f"bench_universal_z2_fp32_L{args.layers}")
    trained = time.monotonic() - t0
    tag = (ckpt / "latest").read_text().strip()
    optim_bytes = sum(p.stat().st_size for p in (ckpt / tag).glob("*optim_states.pt"))
    params = n_params(model, args.layers)
    print(f"checkpoint {ckpt} ({params / 1e6:.1f}M params, optimizer files "
          f"{optim_bytes / 1e9:.2f} GB; {'trained' if trained > 5 else 'cached'})",
          file=sys.stderr)

    if not args.with_config:     # what a DeepSpeed user has: latest + the tag folder only
        saved = cache / f"{ckpt.name}_as_saved"
        shutil.rmtree(saved, ignore_errors=True)
        saved.mkdir()
        shutil.copy(ckpt / "latest", saved / "latest")
        (saved / tag).symlink_to(ckpt / tag, target_is_directory=True)
        ckpt = saved
    env = ds._env()
    work = cache / "bench_universal_out"
    theirs_dir, mine_dir = work / "ds", work / "mapc"
    mapc = [sys.executable, "-c", "import sys; from mapc.cli.main import main; "
            "sys.exit(main(sys.argv[1:]))"]
    rows = {}
    for label, make_cmd, out in [
        ("ds_to_universal", lambda o: [sys.executable, "-m",
                                       "deepspeed.checkpoint.ds_to_universal",
                                       "--input_folder", str(ckpt / tag), "--output_folder",
                                       str(o / f"{tag}_universal"), "--inject_missing_state"],
         theirs_dir),
        ("mapc --to universal", lambda o: mapc + ["convert", str(ckpt), str(o), "--to",
                                                  "universal", "-q"], mine_dir),
    ]:
        runs = []
        for _ in range(args.repeat):
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True) if label == "ds_to_universal" else out.parent.mkdir(
                parents=True, exist_ok=True)
            subprocess.run(["sync"], check=False)
            wall, rss, _, cpu = run_measured(make_cmd(out), env)
            runs.append((wall, rss, cpu))
        rows[label] = {"seconds": min(w for w, _, _ in runs),
                       "peak_rss": max(r for _, r, _ in runs),
                       "cpu_seconds": min(c for _, _, c in runs), "runs": runs}

    cmp = subprocess.run([sys.executable, str(ROOT / "tests/groundtruth/ds_universal_compare.py"),
                          str(mine_dir / f"{tag}_universal"), str(theirs_dir / f"{tag}_universal")],
                         capture_output=True, text=True, env=env)
    try:
        res = json.loads(cmp.stdout.strip().splitlines()[-1])[0]
        identical = not (res["diffs"] or res["only_a"] or res["only_b"])
    except (ValueError, IndexError):
        res, identical = {"error": cmp.stderr[-2000:]}, False

    a, b = rows["ds_to_universal"], rows["mapc --to universal"]
    speedup = a["seconds"] / b["seconds"]
    ok_speed, ok_mem = speedup >= MIN_SPEEDUP, b["peak_rss"] < a["peak_rss"]
    print(f"\n{'operation':<22}{'seconds':>9}{'CPU s':>8}{'peak RSS MiB':>14}{'GB/s':>7}")
    for label, r in rows.items():
        print(f"{label:<22}{r['seconds']:>9.2f}{r['cpu_seconds']:>8.2f}"
              f"{r['peak_rss'] / 2**20:>14.0f}"
              f"{optim_bytes / 1e9 / r['seconds']:>7.2f}   runs: "
              + ", ".join(f"{w:.2f}s/{c:.2f}cpu/{m / 2**20:.0f}MiB" for w, m, c in r["runs"]))
    print(f"load average {' '.join(f'{x:.1f}' for x in __import__('os').getloadavg())}; "
          f"CPU-time ratio {a['cpu_seconds'] / b['cpu_seconds']:.1f}x")
    print(f"\nspeedup {speedup:.1f}x (target >= {MIN_SPEEDUP}x): {'PASS' if ok_speed else 'MISS'}; "
          f"memory {b['peak_rss'] / a['peak_rss']:.2f}x of ds_to_universal (target < 1): "
          f"{'PASS' if ok_mem else 'MISS'}")
    print(f"mapc read the checkpoint {'with' if args.with_config else 'without'} a "
          f"config.json ({'family' if args.with_config else 'generic'} mode)")
    print(f"outputs identical (torch, {res.get('compared')} files): "
          f"{'yes' if identical else 'NO ' + json.dumps(res)[:2000]}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "params": params, "optimizer_file_bytes": optim_bytes, "rows": rows,
            "speedup": speedup, "identical": identical,
            "with_config": args.with_config}, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
