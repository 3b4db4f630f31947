"""The ``mapc`` command. One module per subcommand; ``main(argv) -> int`` for in-process use.

A MapcError prints as one line on stderr and exits 1; set MAPC_DEBUG=1 for the traceback.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback

from mapc import __version__
from mapc.errors import MapcError

COMMANDS = ("compile", "convert", "inspect", "verify", "clean")


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
    previous = _terminate_like_interrupt()
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
    except KeyboardInterrupt as e:
        done = getattr(e, "mapc_written", None)
        print(f"mapc: interrupted after {done} was complete; it holds the finished output"
              if done else "mapc: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _sigterm(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def _terminate_like_interrupt():
    """SIGTERM (kill, a batch scheduler's time limit) cleans up like Ctrl-C: the temporary
    output is removed. Returns the previous handler (None when not in the main thread)."""
    try:
        return signal.signal(signal.SIGTERM, _sigterm)
    except ValueError:       # not the main thread: leave signals alone
        return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
