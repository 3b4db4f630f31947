"""Arguments shared by several subcommands."""
from __future__ import annotations

import json
import sys


def add_topology(p, what="target"):
    p.add_argument("--tp", type=int, default=None, help=f"tensor-parallel size of the {what}")
    p.add_argument("--pp", type=int, default=None, help=f"pipeline-parallel size of the {what}")
    p.add_argument("--ep", type=int, default=None, help=f"expert-parallel size of the {what}")


def add_quiet(p):
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output on stderr")


def print_json(obj):
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")
