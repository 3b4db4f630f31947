"""The ``mapc`` command. One module per subcommand; ``main(argv) -> int`` for in-process use.

A MapcError prints as one line on stderr and exits 1; set MAPC_DEBUG=1 for the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from mapc import __version__
from mapc.errors import MapcError

COMMANDS = ("compile", "convert", "inspect", "verify")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mapc",
        description="Convert and reshard LLM checkpoints, compiled from declarative specs.",
        epilog="Run 'mapc COMMAND --help' for examples. MAPC_DEBUG=1 shows tracebacks.")
    parser.add_argument("--version", action="version", version=f"mapc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import importlib
    for name in COMMANDS:
        module = importlib.import_module(f"mapc.cli.cmd_{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           epilog=module.EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.run(args) or 0)
    except MapcError as e:
        if os.environ.get("MAPC_DEBUG"):
            traceback.print_exc()
        print(f"mapc: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `mapc compile llama --json | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        print("mapc: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
