"""Remove the temporary outputs (``.DST.mapc-PID-XXXX``) that killed conversions left behind.

A conversion writes into a temporary directory beside DST and renames it into place when
complete; Ctrl-C and SIGTERM remove it, but SIGKILL, a power cut or an out-of-memory kill
cannot. ``mapc convert`` warns about such leftovers in DST's directory; this command deletes
them. Temporary outputs of conversions still running on this machine (their process id is
alive) are left alone."""
from __future__ import annotations

import sys
from pathlib import Path

from mapc.cli.common import print_json

HELP = "remove temporary outputs left by killed conversions"
EXAMPLES = """examples:
  mapc clean .                 # in the current directory
  mapc clean /data/ckpts --dry-run
"""


def add_arguments(p):
    p.add_argument("dirs", nargs="+", metavar="DIR",
                   help="directory holding the destinations of interrupted conversions")
    p.add_argument("--dry-run", action="store_true", help="list them, remove nothing")
    p.add_argument("--json", action="store_true", help="print the list as JSON on stdout")


def run(args) -> int:
    from mapc.errors import MapcError
    from mapc.runtime.containers.base import _remove, stale_outputs
    found = []
    for d in args.dirs:
        if not Path(d).is_dir():
            raise MapcError(f"{d} is not a directory", hint="pass the directory that holds DST")
        found += stale_outputs(Path(d))
    for p in found:
        if not args.dry_run:
            _remove(p)
        if not args.json:
            print(f"{'would remove' if args.dry_run else 'removed'} {p}", file=sys.stderr)
    if args.json:
        print_json({"removed": [] if args.dry_run else [str(p) for p in found],
                    "stale": [str(p) for p in found]})
    elif not found:
        print("mapc: no temporary outputs of interrupted runs", file=sys.stderr)
    return 0
