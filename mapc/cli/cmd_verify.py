"""Check that two checkpoints, in any formats and topologies, hold the same model.

Both are read back to their logical (unsharded, canonical) tensors and compared bit for bit.
Exit 0 when every tensor is identical; otherwise exit 1 and list each differing tensor with its
maximum absolute difference."""
from __future__ import annotations

import sys

from mapc.cli.common import add_quiet, print_json

HELP = "compare two checkpoints tensor by tensor"
EXAMPLES = """examples:
  mapc verify llama-hf llama-mcore
  mapc verify llama-tp2 llama-tp4 --json
"""


def add_arguments(p):
    p.add_argument("a", help="first checkpoint")
    p.add_argument("b", help="second checkpoint")
    p.add_argument("--config", help="model config JSON, when neither checkpoint carries one")
    p.add_argument("--spec", help="spec file to use instead of detecting the family")
    p.add_argument("--allow-spec-change", action="store_true",
                   help="read a checkpoint mapc wrote with a --spec other than the one its "
                        "record carries (refused otherwise)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    add_quiet(p)


def run(args) -> int:
    from mapc.api import verify
    r = verify(args.a, args.b, config=args.config, spec=args.spec, quiet=args.quiet,
               allow_spec_change=args.allow_spec_change)
    if args.json:
        print_json({"identical": r.identical, "compared": r.compared,
                    "differences": r.differences, "warnings": r.warnings})
    else:
        for w in r.warnings:
            print(f"mapc: warning: {w}", file=sys.stderr)
        if r.identical:
            print(f"identical: {r.compared} tensors match bit for bit")
        else:
            print(f"DIFFERENT: {len(r.differences)} of {r.compared} tensors differ")
            for d in r.differences:
                print(f"  {d['tensor']:<40} max |a-b| = {d['max_abs_diff']:.6g}"
                      + (f"  ({d['dtype_a']} vs {d['dtype_b']})"
                         if d["dtype_a"] != d["dtype_b"] else ""))
    return 0 if r.identical else 1
