#!/usr/bin/env python
"""Throughput of the quantizers behind ``--quantize``: elements per second of one process.

    python benchmarks/bench_quantize.py [--repeat N] [--experts E] [--json OUT]

- ``mxfp4``: ``quant_mxfp4`` on GPT-OSS-120b's expert tensors at their real shapes,
  ``gate_up_proj`` [E, 2880, 5760] and ``down_proj`` [E, 2880, 2880] in bfloat16 (E experts of
  one layer; the release has 128 per layer), normally distributed: the lossy bf16 -> MXFP4
  case. And the same values dequantized and quantized again (MXFP4 -> MXFP4, which also checks
  each block's twin scale).
- ``fp8_block``: ``quant_fp8_block`` on a DeepSeek-V3 weight at its real shape, [7168, 18432]
  bfloat16 (``mlp.gate_proj`` of a dense layer).

Each case reports the best of ``--repeat`` runs (seconds, elements/s) and the peak RSS of the
process. The values are random, so this measures the arithmetic, not the disk; a conversion's
other costs (reading, writing) are bench_convert.py's.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_unpickle import _best as best_of  # noqa: E402
from mapc.runtime.quantized import dequant_mxfp4, quant_fp8_block, quant_mxfp4  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--experts", type=int, default=2, help="experts per tensor (default 2)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []

    def case(name, fn, elements):
        s = best_of(fn, a.repeat)
        rows.append({"case": name, "elements": elements, "seconds": round(s, 3),
                     "elements_per_s": round(elements / s)})
        print(f"{name:<44} {elements / 1e6:8.1f} M elements {s:7.2f} s "
              f"{elements / s / 1e6:7.1f} M elements/s", flush=True)

    for label, shape in [("gate_up_proj", (a.experts, 2880, 5760)),
                         ("down_proj", (a.experts, 2880, 2880))]:
        x = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        case(f"mxfp4 bf16 -> MXFP4  {label} {list(shape)}", lambda: quant_mxfp4(x), x.size)
        blocks, scales, _ = quant_mxfp4(x)
        back = dequant_mxfp4(blocks, scales)
        case(f"mxfp4 MXFP4 -> MXFP4 {label} {list(shape)}", lambda: quant_mxfp4(back), x.size)
        del x, back, blocks, scales
    w = (rng.standard_normal((7168, 18432), dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    case("fp8_block bf16 -> FP8 [7168, 18432]", lambda: quant_fp8_block(w), w.size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"peak RSS {peak / 2**20:.0f} MiB")
    if a.json is not None:
        a.json.write_text(json.dumps({"rows": rows, "peak_rss_bytes": peak}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
