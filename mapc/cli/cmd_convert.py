"""Convert a checkpoint to another format and/or parallel layout.

The source format, model family, config and layout parameters are detected from SRC (mapc
records everything it needs in every output, so converting again needs no extra flags). Output
is written to a temporary directory beside DST and renamed into place only when complete; the
source is never modified."""
from __future__ import annotations

import sys

from mapc.cli.common import add_quiet, add_topology, print_json

HELP = "convert / reshard a checkpoint"
EXAMPLES = """examples:
  mapc convert llama-hf llama-mcore --to megatron --tp 2 --pp 2
  mapc convert llama-mcore llama-tp4 --to megatron --tp 4          # reshard up
  mapc convert llama-hf llama-vpp --to megatron --pp 2 --vpp 2      # interleaved schedule
  mapc convert llama-mcore llama-back --to hf --dtype bf16
  mapc convert ds-mcore ds-fp8 --to hf --quantize fp8_block --allow-lossy   # FP8 release form
  mapc convert oss-mcore oss-mx --to hf --quantize mxfp4 --allow-lossy      # MXFP4 release form
  mapc convert llama-hf out --to megatron --set naming=te --set vocab_multiple=64
  mapc convert old-run new-run --like fresh-init-on-new-cluster   # format/topology from a template
  mapc convert llama-hf llama-mcore --to megatron --tp 8 --workers 4   # 4 processes
  torchrun --nnodes 2 --nproc-per-node 4 -m mapc convert SRC DST --to megatron --tp 8
"""


def add_arguments(p):
    from mapc.runtime.plan_write import DTYPE_CHOICES
    from mapc.runtime.containers import FORMATS
    p.add_argument("src", help="source checkpoint directory")
    p.add_argument("dst", help="destination directory (must not exist unless --force)")
    p.add_argument("--to", choices=sorted(FORMATS),
                   help="target format (required unless --like gives it)")
    p.add_argument("--like", metavar="TEMPLATE",
                   help="take the target format, topology (tp/pp/ep/dp), layout parameters and "
                        "optimizer param groups from an existing checkpoint, e.g. one freshly "
                        "initialized on the new hardware; a source that does not match it "
                        "tensor for tensor is refused")
    p.add_argument("--from", dest="source_format", choices=sorted(FORMATS),
                   help="source format (default: detected)")
    add_topology(p)
    p.add_argument("--vpp", type=int, default=None,
                   help="virtual pipeline stages per pipeline rank of a megatron target "
                        "(Megatron's interleaved schedule: model0, model1, ... in every rank "
                        "file; with the distributed optimizer, one buffer set per chunk), or "
                        "of a torch_dist target's distributed optimizer state (one DDP per "
                        "chunk); the source's are read automatically")
    p.add_argument("--dp", type=int, default=None,
                   help="data-parallel size of a training-checkpoint target (deepspeed, neox, "
                        "torch_dist; megatron: writes the distributed optimizer, "
                        "distrib_optim.pt): the optimizer state is repartitioned for it "
                        "(default: the source's)")
    p.add_argument("--optim-sharding", choices=("dp_reshardable", "fully_reshardable"),
                   default=None,
                   help="with --to torch_dist: how the distributed optimizer's state is saved "
                        "(default: dp_reshardable, Megatron-LM's default)")
    p.add_argument("--zero-stage", type=int, choices=(1, 2, 3), default=None,
                   help="ZeRO stage of a deepspeed/universal target (default: the source's, "
                        "else 1)")
    p.add_argument("--with-optimizer", action="store_true",
                   help="with --to hf: also write optimizer.pt, scheduler.pt and "
                        "trainer_state.json so transformers' Trainer can resume")
    p.add_argument("--pp-first-stage", type=int, default=None, metavar="N",
                   help="megatron target: N layers on the first pipeline stage (uneven stages; "
                        "the rest split evenly, as megatron-core's "
                        "num_layers_in_first_pipeline_stage)")
    p.add_argument("--pp-last-stage", type=int, default=None, metavar="N",
                   help="megatron target: N layers on the last pipeline stage")
    p.add_argument("--dtype", default="keep", choices=list(DTYPE_CHOICES),
                   help="cast tensors on write (default: keep)")
    p.add_argument("--config", help="model config JSON, when the source carries none")
    p.add_argument("--spec", help="spec file to use instead of detecting the family")
    p.add_argument("--allow-spec-change", action="store_true",
                   help="read a checkpoint mapc wrote with a --spec other than the one its "
                        "record carries (refused otherwise)")
    p.add_argument("--allow-lossy", action="store_true",
                   help="write tensors whose spec value map (e.g. 'value 1 + x') rounds in "
                        "the stored dtype, or that --quantize rounds, with a warning "
                        "(refused otherwise)")
    p.add_argument("--quantize", metavar="KIND", default=None,
                   help="with --to hf: store the tensors whose spec rules say 'quantized "
                        "KIND' in that storage; fp8_block: float8_e4m3fn + float32 "
                        "_scale_inv per 128x128 block (DeepSeek-V3's release); mxfp4: uint8 "
                        "_blocks + e8m0 _scales per 32 values (GPT-OSS's release). Lossy "
                        "unless read from that storage: needs --allow-lossy then")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="set a target layout parameter the spec declares (repeatable)")
    p.add_argument("--source-set", action="append", default=[], metavar="NAME=VALUE",
                   help="state a layout parameter of the SOURCE that mapc cannot tell from its "
                        "files (e.g. hw_backend=trn2 for an NxD checkpoint)")
    p.add_argument("--backend", default="numpy", choices=["numpy", "torch", "jax"],
                   help="array backend (identical bytes on all)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes that write the output's independent files (megatron, nemo "
                        "and nxdt ranks, hf shards), balanced by bytes; 1: one process "
                        "(default: the machine's CPUs, at most 8, at least 256 MiB each). "
                        "Under torchrun/srun every rank writes its share instead")
    p.add_argument("--dry-run", action="store_true",
                   help="plan and check everything, print the plan, write nothing")
    p.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    add_quiet(p)


def run(args) -> int:
    from mapc.api import plan_convert, write_conversion
    if args.to is None and args.like is None:
        from mapc.errors import MapcError
        raise MapcError("no target format", hint="pass --to FORMAT (or --like TEMPLATE)")
    # --dry-run and the real run take the same path: plan everything, then write (or print)
    cp = plan_convert(args.src, args.dst, args.to, tp=args.tp, pp=args.pp, ep=args.ep,
                      dtype=args.dtype, config=args.config, set=args.set,
                      source_set=args.source_set, spec=args.spec,
                      source_format=args.source_format, dp=args.dp,
                      with_optimizer=args.with_optimizer, like=args.like,
                      zero_stage=args.zero_stage, allow_spec_change=args.allow_spec_change,
                      allow_lossy=args.allow_lossy,
                      pp_first_stage=args.pp_first_stage, pp_last_stage=args.pp_last_stage,
                      workers=args.workers, vpp=args.vpp, optim_sharding=args.optim_sharding,
                      quantize=args.quantize)
    if args.dry_run:
        cp.close()
        print(cp.pretty(backend=args.backend))
        return 0
    report = write_conversion(cp, args.src, args.dst, force=args.force, backend=args.backend,
                              quiet=args.quiet)
    from mapc.runtime.workers import distributed_env
    world = distributed_env()
    if world is not None and world[0] != 0:
        return 0                          # rank 0 reports for all ranks
    for w in report.warnings:
        print(f"mapc: warning: {w}", file=sys.stderr)
    from mapc.runtime.execute import peak_rss_bytes
    rate = report.bytes_written / report.seconds if report.seconds > 0 else 0.0
    if args.json:
        print_json({"dst": args.dst, "tensors": report.tensors_written,
                    "bytes": report.bytes_written, "seconds": round(report.seconds, 3),
                    "gb_per_s": round(rate / 1e9, 3),
                    "peak_rss_bytes": max(report.peak_rss, peak_rss_bytes()),
                    "workers": report.workers, "warnings": report.warnings})
    elif not args.quiet:
        print(f"{args.src} -> {args.dst} ({args.to or 'like ' + args.like}): "
              f"{report.tensors_written} tensors, {report.bytes_written / 2**20:.1f} MiB in "
              f"{report.seconds:.1f}s ({rate / 1e9:.3f} GB/s"
              + (f", {report.workers} workers" if report.workers > 1 else "") + ")",
              file=sys.stderr)
    return 0
