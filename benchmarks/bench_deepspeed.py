#!/usr/bin/env python
"""DeepSpeed writer benchmark: a ZeRO checkpoint resharded by mapc, against ``cp -r``.

    python benchmarks/bench_deepspeed.py [--size-gb 0.5] [--workdir DIR] [--json OUT]

1. Writes a Llama-shaped HF checkpoint (bf16, ``--size-gb`` of weights) with bench_convert's
   generator, then ``mapc convert HF DS2 --to deepspeed --dp 2`` (a fresh optimizer: fp32
   master + two fp32 moments, so DS2 is ~7x the HF size).
2. Times, each in a fresh subprocess (best of ``--repeat``, worst peak RSS):
     - ``cp -r DS2 COPY``                                     (the floor)
     - ``mapc convert DS2 DS3 --to deepspeed --dp 3``       (grow)
     - ``mapc convert DS3 DS1 --to deepspeed --dp 1``       (shrink)
3. Checks ``mapc verify DS2 DS1`` (not timed) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_convert as bc  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=0.5)
    ap.add_argument("--workdir")
    ap.add_argument("--json")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mapc-dsbench-"))
    work.mkdir(parents=True, exist_ok=True)
    gnu = bc._have_gnu_time()
    mapc = bc.mapc_cmd()
    try:
        layers = bc.layers_for_size(args.size_gb * 1e9)
        bc.write_llama_checkpoint(work / "hf", layers)
        bc.measure(mapc + ["convert", str(work / "hf"), str(work / "ds2"), "--to", "deepspeed",
                           "--dp", "2", "-q"], work, gnu)
        size = bc.dir_bytes(work / "ds2")

        def step(cmd, out):
            def cleanup():
                shutil.rmtree(out, ignore_errors=True)
            return bc.best_of(args.repeat, lambda: bc.measure(cmd, work, gnu), cleanup)

        res = {
            "cp": step(["cp", "-r", str(work / "ds2"), str(work / "copy")], work / "copy"),
            "dp2->dp3": step(mapc + ["convert", str(work / "ds2"), str(work / "ds3"), "--to",
                                     "deepspeed", "--dp", "3", "-q", "--force"], work / "ds3"),
            "dp3->dp1": step(mapc + ["convert", str(work / "ds3"), str(work / "ds1"), "--to",
                                     "deepspeed", "--dp", "1", "-q", "--force"], work / "ds1"),
        }
        bc.measure(mapc + ["verify", str(work / "ds2"), str(work / "ds1")], work, gnu)
        print(f"DeepSpeed ZeRO-1 bf16 checkpoint, {layers} layers, {size / 1e9:.2f} GB on disk "
              f"(mapc {bc.mapc_revision()})")
        for k, r in res.items():
            print(f"  {k:10s} {r['seconds']:7.2f} s  {size / r['seconds'] / 1e9:5.2f} GB/s  "
                  f"peak RSS {r['peak_rss_bytes'] / 1e6:7.0f} MB")
        if args.json:
            Path(args.json).write_text(json.dumps({"bytes": size, "layers": layers, **res},
                                                  indent=1))
        return 0
    except bc.StepFailed as e:
        print(f"FAILED: {e}\n{e.stderr}", file=sys.stderr)
        return 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
