#!/usr/bin/env python
"""Many processes: ``--workers 1`` against ``--workers 2`` and torchrun, side by side with
``cp -r`` of the same bytes, in one run.

    python benchmarks/bench_workers.py --size-gb 1 --workdir-parent /work [--repeat 2]
                                       [--no-deepspeed] [--no-torchrun] [--only-deepspeed]
                                       [--before PYTHON] [--json OUT]

Generates a Llama-shaped bf16 HF checkpoint (benchmarks/bench_convert.py's generator, 300 MB
shards) in a fresh directory under ``--workdir-parent`` (removed afterwards), then times, in
interleaved rounds (every operation of a group once, then again: they see the same load),
each in a fresh process after ``sync`` (``/usr/bin/time -v``: wall, user+sys CPU seconds of the
whole process tree, peak RSS of its largest process), with the 1-minute load average of the
machine just before each run:

  - ``cp -r SRC COPY``                                       the floor
  - hf -> megatron TP=2 PP=2, ``--workers 1`` and ``--workers 2``
  - megatron TP=2 PP=2 -> hf, ``--workers 1`` and ``--workers 2`` (hf shards of 5 GB: a 1 GB
    checkpoint is one shard, so one process whatever ``--workers`` says)
  - hf -> torch_dist (one data file: one process)
  - deepspeed dp2 -> dp3, ``--workers 1`` and ``--workers 2`` (each data-parallel rank's
    optimizer file and the model states are written by one worker; the dp2 source, 12 bytes
    per parameter of optimizer state, is made first and not timed), beside ``cp -r`` of it;
    with ``--before PYTHON`` (the interpreter of another checkout's venv, e.g. main's), the
    same two conversions by that mapc too, in the same rounds, their output checked equal
  - torchrun --standalone --nproc-per-node 2 -m mapc convert hf -> megatron TP=2 PP=2
  - with ``--only-distopt`` instead: deepspeed dp2 (made first, fresh optimizer, not timed) ->
    megatron TP=2 DP=2 with megatron-core's distributed optimizer (``distrib_optim.pt`` per
    rank), ``--workers 1``, beside ``cp -r`` of the deepspeed source (and ``--before``'s mapc)
  - with ``--only-torch-dist`` instead: hf -> torch_dist beside ``cp -r`` (and ``--before``'s
    mapc), outputs compared but for ``.metadata`` (its save_id is random)
  - with ``--only-universal-tp`` instead: hf -> universal TP=2 (Megatron-DeepSpeed's layout:
    each parameter's fp32 weights and zero moments in zero/, each rank's model states), with
    ``--workers 1`` and ``--workers 2`` (``--universal-workers``), beside ``cp -r`` of the
    source; with ``--before PYTHON`` also by that mapc (``--workers 1``), its output checked
    identical; with ``--big-embedding`` the source is 2 layers of Llama-3-8B's shape with its
    128256 x 4096 embedding and lm_head (2.97 GB: each of those is 2.1 GB in float32, the
    tensors the universal writer once held whole), whatever ``--size-gb`` says

Outputs are checked equal to the ``--workers 1`` output (megatron, hf, deepspeed: ``cmp`` of
every file)
and the round trip with ``mapc verify``. Numbers go to stdout (and ``--json``).
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_convert as bc  # noqa: E402  (the generator and the measuring of bench_convert)


# Llama-3-8B's shape: a 128256 x 4096 embedding (and lm_head), 1.05 GB each in bf16
BIG_EMBEDDING = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=14336, vocab_size=128256)


def same_tree(a: Path, b: Path) -> bool:
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return fa == fb and all(filecmp.cmp(a / f, b / f, shallow=False) for f in fa)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--workdir-parent", default="/work")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--no-torchrun", action="store_true")
    ap.add_argument("--only-deepspeed", action="store_true",
                    help="just the deepspeed dp2 -> dp3 group (and its cp -r)")
    ap.add_argument("--only-universal-tp", action="store_true",
                    help="just hf -> universal --tp 2, --workers 1 and 2 (and cp -r)")
    ap.add_argument("--only-distopt", action="store_true",
                    help="just deepspeed dp2 -> megatron tp2 dp2 with megatron-core's "
                         "distributed optimizer (and cp -r of the deepspeed source)")
    ap.add_argument("--only-torch-dist", action="store_true",
                    help="just hf -> torch_dist (one data file) and cp -r (with --before: "
                         "that mapc's too)")
    ap.add_argument("--before", metavar="PYTHON",
                    help="also time deepspeed dp2 -> dp3 (with --only-universal-tp: hf -> "
                         "universal tp2; with --only-distopt: -> megatron tp2 dp2) with this interpreter's mapc (another checkout's "
                         "venv), side by side")
    ap.add_argument("--big-embedding", action="store_true",
                    help="the source: 2 layers of Llama-3-8B's shape, vocabulary 128256")
    ap.add_argument("--universal-workers", default="1,2",
                    help="--only-universal-tp: the --workers values timed (default 1,2)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mapc-bench-workers-", dir=args.workdir_parent))
    mapc = [sys.executable, "-m", "mapc"]
    gnu = bc._have_gnu_time()
    rows = []
    try:
        src = work / "src-hf"
        layers = bc.layers_for_size(args.size_gb * 1e9)
        shape = bc.LLAMA_1B
        if args.big_embedding:
            layers, shape = 2, BIG_EMBEDDING
        t0 = time.perf_counter()
        bc.write_llama_checkpoint(src, layers, shape)
        size = bc.dir_bytes(src)
        print(f"generated {size / 1e9:.3f} GB ({layers} layers) in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)

        def rounds(ops):
            """Time ``ops`` [(name, cmd, out)] in ``--repeat`` interleaved rounds (op 1, op 2,
            ..., op 1, op 2, ...), so that every op sees the same load; the best run of each
            is kept, with the load average just before it. An op with a check (``after``)
            has it run on its output, which is then removed; other outputs stay (an op's
            output is removed before it runs again)."""
            runs = {op[0]: [] for op in ops}
            for k in range(args.repeat):
                for name, cmd, out, *after in ops:
                    shutil.rmtree(out, ignore_errors=True)
                    load = os.getloadavg()[0]
                    try:
                        r = bc.measure(cmd, work, gnu)
                    except bc.StepFailed as e:
                        print(f"    {name}: FAILED\n      " + e.stderr[-1500:].replace(
                            "\n", "\n      "), flush=True)
                        raise
                    r["load"] = load
                    runs[name].append(r)
                    print(f"    {name}: {r['seconds']:.2f} s, cpu {r['user'] + r['sys']:.2f} s,"
                          f" load {load:.1f}", flush=True)
                    if after:                      # check the output, then free the disk
                        after[0](out)
                        shutil.rmtree(out, ignore_errors=True)
            out_rows = []
            for name, *_ in ops:
                best = min(runs[name], key=lambda r: r["seconds"])
                row = {"operation": name, "seconds": best["seconds"],
                       "cpu_seconds": best["user"] + best["sys"],
                       "peak_rss_mib": max(r["peak_rss_bytes"] for r in runs[name]) / 2**20,
                       "written_bytes": best["written_bytes"],
                       "load": best["load"],
                       "runs": [(round(r["seconds"], 2), round(r["user"] + r["sys"], 2),
                                 round(r["load"], 1)) for r in runs[name]]}
                rows.append(row)
                out_rows.append(row)
            return out_rows

        copy, mg1, mg2, tr = work / "copy", work / "mg1", work / "mg2", work / "mg-torchrun"
        conv = mapc + ["convert", str(src)]
        if args.only_deepspeed:
            return _deepspeed_only(args, work, src, size, conv, rounds, rows, copy)
        if args.only_universal_tp:
            return _universal_tp_only(args, work, src, size, conv, rounds, rows, copy)
        if args.only_distopt:
            return _distopt_only(args, work, src, conv, rounds, rows, copy)
        if args.only_torch_dist:
            return _torch_dist_only(args, work, src, size, rounds, rows, copy)
        mg = ["--to", "megatron", "--tp", "2", "--pp", "2", "-q"]
        checks = {}

        def same_as_mg1(what):
            def check(out):
                checks[what] = checks.get(what, True) and same_tree(mg1, out)
            return check
        ops = [("hf -> megatron tp2 pp2 --workers 1", conv + [str(mg1), *mg, "--workers", "1"],
                mg1),
               ("cp -r", ["cp", "-r", str(src), str(copy)], copy, lambda out: None),
               ("hf -> megatron tp2 pp2 --workers 2", conv + [str(mg2), *mg, "--workers", "2"],
                mg2, same_as_mg1("megatron --workers 2 == --workers 1"))]
        if not args.no_torchrun:
            ops.append(("torchrun 2 procs: hf -> megatron tp2 pp2",
                        [sys.executable, "-m", "torch.distributed.run", "--standalone",
                         "--nproc-per-node", "2", "-m", "mapc", "convert", str(src), str(tr),
                         *mg], tr, same_as_mg1("megatron torchrun == --workers 1")))
        cp = rounds(ops)[1]
        td = work / "td"
        rounds([("hf -> torch_dist", conv + [str(td), "--to", "torch_dist", "-q"], td,
                 lambda out: None)])
        if not args.no_deepspeed:
            ds2, ds3 = work / "ds2", work / "ds3"
            subprocess.run(conv + [str(ds2), "--to", "deepspeed", "--dp", "2", "-q"],
                           check=True)
            _deepspeed_rounds(ds2, ds3, copy, rounds, checks, args.before)
            shutil.rmtree(ds2)
        shutil.rmtree(src)          # the disk: at most three checkpoints at a time
        back1, back2 = work / "back1", work / "back2"
        rounds([("megatron tp2 pp2 -> hf --workers 1",
                 mapc + ["convert", str(mg1), str(back1), "--to", "hf", "--workers", "1", "-q"],
                 back1),
                ("megatron tp2 pp2 -> hf --workers 2",
                 mapc + ["convert", str(mg1), str(back2), "--to", "hf", "--workers", "2", "-q"],
                 back2, lambda out: checks.__setitem__(
                     "hf --workers 2 == --workers 1", same_tree(back1, out)))])
        v = subprocess.run(mapc + ["verify", str(mg1), str(back1), "-q"])
        checks["round trip verifies (mapc verify megatron hf)"] = v.returncode == 0
        shutil.rmtree(back1)
        shutil.rmtree(mg1)
        return _print(args, size, rows, checks, cp)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _deepspeed_rounds(ds2: Path, ds3: Path, copy: Path, rounds, checks: dict,
                      before: str | None = None) -> None:
    """deepspeed dp2 -> dp3 with --workers 1 and 2 beside cp -r of the dp2 checkpoint (and
    by the ``before`` interpreter's mapc)."""
    mapc = [sys.executable, "-m", "mapc"]
    dsb = bc.dir_bytes(ds2)
    ds3b = ds3.with_name(ds3.name + "-w2")
    three = ["--to", "deepspeed", "--dp", "3", "-q", "--workers"]

    def same_as_w1(what):
        def check(out):
            checks[what] = checks.get(what, True) and same_tree(ds3, out)
        return check
    ops = [(f"cp -r deepspeed dp2 ({dsb / 1e9:.2f} GB)", ["cp", "-r", str(ds2), str(copy)],
            copy, lambda out: None),
           ("deepspeed dp2 -> dp3 --workers 1", mapc + ["convert", str(ds2), str(ds3), *three,
                                                        "1"], ds3),
           ("deepspeed dp2 -> dp3 --workers 2", mapc + ["convert", str(ds2), str(ds3b), *three,
                                                        "2"], ds3b,
            same_as_w1("deepspeed --workers 2 == --workers 1"))]
    if before:
        for n in ("1", "2"):
            out = ds3.with_name(f"{ds3.name}-before-w{n}")
            ops.append((f"before: deepspeed dp2 -> dp3 --workers {n}",
                        [before, "-m", "mapc", "convert", str(ds2), str(out), *three, n], out,
                        same_as_w1("deepspeed before == after")))
    cpd, *conv = rounds(ops)
    for row in conv:
        row["x_cp_own"] = row["seconds"] / cpd["seconds"]
        row["bytes"] = dsb
    cpd["bytes"] = dsb
    shutil.rmtree(ds3, ignore_errors=True)


def _deepspeed_only(args, work, src, size, conv, rounds, rows, copy) -> int:
    ds2, ds3 = work / "ds2", work / "ds3"
    subprocess.run(conv + [str(ds2), "--to", "deepspeed", "--dp", "2", "-q"], check=True)
    shutil.rmtree(src)
    checks: dict = {}
    _deepspeed_rounds(ds2, ds3, copy, rounds, checks, args.before)
    return _print(args, size, rows, checks, rows[0])


def _universal_tp_only(args, work, src, size, conv, rounds, rows, copy) -> int:
    """hf -> universal --tp 2 with --workers 1 and 2 (and by the ``--before`` mapc). Each
    output is removed after its run (7 bytes written per byte read: a kept output's page
    cache would slow the next run down), and compared by the sha256 of every file (mapc.json
    aside: it names the mapc version and the time)."""
    import hashlib
    checks: dict = {}
    digests: dict = {}

    def digest(out: Path) -> dict:
        out_digest = {}
        for p in sorted(out.rglob("*")):
            if p.is_file() and p.name != "mapc.json":
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while block := f.read(64 << 20):
                        h.update(block)
                out_digest[str(p.relative_to(out))] = h.hexdigest()
        return out_digest

    def same(key):
        def check(out):
            got = digest(out)
            if "first" not in digests:
                digests["first"] = got
            else:
                checks[key] = checks.get(key, True) and got == digests["first"]
        return check
    tp = ["--to", "universal", "--tp", "2", "-q", "--workers"]
    ops = [("cp -r", ["cp", "-r", str(src), str(copy)], copy, lambda out: None)]
    for n in args.universal_workers.split(","):
        ops.append((f"hf -> universal tp2 --workers {n}", conv + [str(work / f"u{n}"), *tp, n],
                    work / f"u{n}", same(f"universal --workers {n} == the first")))
    if args.before:
        ops.append(("before: hf -> universal tp2 --workers 1",
                    [args.before, "-m", "mapc", "convert", str(src), str(work / "u-before"),
                     *tp, "1"], work / "u-before", same("universal before == after")))
    cp, *_ = rounds(ops)
    return _print(args, size, rows, checks, cp)


def _digest(out: Path) -> dict:
    """sha256 of every file under ``out`` (mapc.json without the spec's file name, which
    names the checkout it was read from)."""
    import hashlib
    got = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "mapc.json":
                record = json.loads(data)
                record.get("spec", {}).pop("file", None)
                data = json.dumps(record, sort_keys=True).encode()
            got[str(p.relative_to(out))] = hashlib.sha256(data).hexdigest()
    return got


def _distopt_only(args, work, src, conv, rounds, rows, copy) -> int:
    """deepspeed dp2 (made from the HF checkpoint with a fresh optimizer, not timed) ->
    megatron tp2 dp2 with megatron-core's distributed optimizer (``distrib_optim.pt`` beside
    every rank's ``model_optim_rng.pt``), one process, beside ``cp -r`` of the deepspeed
    checkpoint; with ``--before``, the same conversion by that mapc in the same rounds. Each
    output is compared by digest with the first one, then removed (its page cache would slow
    the next run down)."""
    ds2 = work / "ds2"
    subprocess.run(conv + [str(ds2), "--to", "deepspeed", "--dp", "2", "-q"], check=True)
    shutil.rmtree(src)
    dsb = bc.dir_bytes(ds2)
    mg = ["convert", str(ds2), None, "--to", "megatron", "--tp", "2", "--dp", "2", "-q",
          "--workers", "1"]
    checks: dict = {}
    digests: dict = {}

    def same(out):
        d = _digest(out)
        digests.setdefault("first", d)
        key = "megatron distributed optimizer: every output identical"
        checks[key] = checks.get(key, True) and d == digests["first"]
        digests["bytes"] = bc.dir_bytes(out)
    cpd, *conv_rows = rounds(_before_after(
        args, work, f"cp -r deepspeed dp2 ({dsb / 1e9:.2f} GB)", ds2, copy,
        "deepspeed dp2 -> megatron tp2 dp2", mg, same))
    for row in conv_rows:
        row["x_cp_own"] = row["seconds"] / cpd["seconds"]
        row["bytes"] = dsb
    cpd["bytes"] = dsb
    print(f"output: {digests.get('bytes', 0) / 1e9:.2f} GB in {len(digests.get('first', {}))} "
          f"files")
    return _print(args, dsb, rows, checks, cpd)


def _before_after(args, work, cp_name, src, copy, what, mapc_args, check) -> list:
    """The ops of a before/after group: ``cp -r`` of ``src``, then ``mapc_args`` (their None:
    the output) by this mapc and, with ``--before``, by that interpreter's, each checked."""
    ops = [(cp_name, ["cp", "-r", str(src), str(copy)], copy, lambda out: None)]
    for side, python in (("after", sys.executable), ("before", args.before)):
        if python:
            out = work / f"out-{side}"
            ops.append((f"{side}: {what}", [python, "-m", "mapc"] +
                        [str(out) if a is None else a for a in mapc_args], out, check))
    return ops


def _torch_dist_only(args, work, src, size, rounds, rows, copy) -> int:
    """hf -> torch_dist beside cp -r of the source (and by ``--before``'s mapc in the same
    rounds), each output compared by digest with the first one (``.metadata`` aside: its
    save_id is random), then removed."""
    checks: dict = {}
    digests: dict = {}

    def same(out):
        d = {k: v for k, v in _digest(out).items() if not k.endswith(".metadata")}
        digests.setdefault("first", d)
        key = "torch_dist: every output identical (.metadata's random save_id aside)"
        checks[key] = checks.get(key, True) and d == digests["first"]
    td = ["convert", str(src), None, "--to", "torch_dist", "-q"]
    cp, *_ = rounds(_before_after(args, work, "cp -r", src, copy, "hf -> torch_dist", td,
                                  same))
    return _print(args, size, rows, checks, cp)


def _print(args, size, rows, checks, cp) -> int:
    """The table of ``rows`` (x cp: against ``cp``; GB/s of the bytes each read)."""
    for r in rows:
        r.setdefault("x_cp", r["seconds"] / cp["seconds"])
        r["gb_per_s"] = r.get("bytes", size) / 1e9 / r["seconds"]
    print()
    print(f"{size / 1e9:.2f} GB bf16, {os.cpu_count()} CPUs, mapc {bc.mapc_revision()}, "
          f"best of {args.repeat}")
    print(f"| operation | s | x cp | CPU s | peak RSS MiB | written GB | load |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['x_cp']:.2f}" + (f" ({r['x_cp_own']:.2f} own cp)" if "x_cp_own" in r
                                       else "")
        print(f"| {r['operation']} | {r['seconds']:.2f} | {ratio} | {r['cpu_seconds']:.2f} "
              f"| {r['peak_rss_mib']:.0f} | {r['written_bytes'] / 1e9:.2f} | {r['load']:.1f} |")
    for k, ok in checks.items():
        print(f"{k}: {'yes' if ok else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"size_bytes": size, "rows": rows,
                                               "checks": checks}, indent=2) + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
