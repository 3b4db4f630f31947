"""Check a spec and print its Spec IR, or, given a model config, the compiled program.

Without --config, prints the checked Spec IR (JSON with --json, a summary otherwise). With a
config, compiles the conversion from the unsharded hf layout to --layout at --tp/--pp and prints
the program: every recipe once, then each output shard's tensors."""
from __future__ import annotations

import sys

from mapc.cli.common import add_topology, print_json

HELP = "check a spec; print its IR or a compiled program"
EXAMPLES = """examples:
  mapc compile specs/llama.map
  mapc compile llama --json > llama.ir.json
  mapc compile llama --layout megatron --config config.json --tp 2 --pp 2
  mapc compile llama --layout megatron --config config.json --tp 2 --set naming=te
"""


def add_arguments(p):
    p.add_argument("spec", help="a spec file, or the name of a shipped spec (e.g. llama)")
    p.add_argument("--layout", help="target layout to compile (default: the spec's first)")
    p.add_argument("--from-layout", dest="source_layout",
                   help="source layout of the program (default: hf)")
    p.add_argument("--config", help="model config JSON (HF config.json keys)")
    add_topology(p)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="set a layout parameter the spec declares")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def run(args) -> int:
    if args.config is None:      # the checked IR alone (from the disk cache): no numpy
        from mapc.compiler.spec import load_spec
        out = load_spec(args.spec)
        if args.layout is not None:
            out.layout(args.layout)
    else:
        from mapc.api import compile_spec
        out = compile_spec(args.spec, layout=args.layout, config=args.config, tp=args.tp,
                           pp=args.pp, ep=args.ep, set=args.set,
                           source_layout=args.source_layout)
    if args.config is None:
        if args.json:
            print_json(out.ir)
        else:
            ir = out.ir
            print(f"family {ir['family']}  ({ir['file']}, sha256 {ir['sha256'][:12]})")
            print(f"  config symbols: {', '.join(c['name'] for c in ir['config'])}")
            print(f"  logical tensors: {len(ir['tensors'])}")
            for lay in ir["layouts"]:
                params = ", ".join(f"{p['name']}=" + (f"{p['default']!r}" if "default_expr"
                                                      not in p else "(from the config)")
                                   for p in lay["params"])
                print(f"  layout {lay['name']}: {len(lay['rules'])} rules"
                      + (f", mesh {' '.join(lay['mesh'])}" if lay["mesh"] else "")
                      + (f", params {params}" if params else ""))
            print("ok: spec checked", file=sys.stderr)
        return 0
    if args.json:
        prog = out
        print_json({
            "source": prog.source.describe(), "target": prog.target.describe(),
            "shards": [{"coord": dict(coord), "tensors": [
                {"name": name, "shape": list(inst.recipe.shape_at(coord)),
                 "from": list(inst.members.values()), "recipe": inst.recipe.label}
                for name, inst in tensors]} for coord, tensors in prog.target_files().items()]})
    else:
        print(out.pretty())
    return 0
