"""Checkpoint containers by format name.

A container module provides:
  LAYOUT                  the spec layout its tensors follow (e.g. "megatron")
  layout_for(topology)    optional: the layout at a topology, when it depends on it
  detect(path) -> bool    whether a directory/file is in this format
  Source(path)            an opened checkpoint (mapc.runtime.containers.base.Source)
  plan_write(program, facts, request) -> WritePlan
                          pure: every decision, every file the output will hold, every note;
                          raises MapcError for what it cannot write; reads and writes nothing
  Writer(tmpdir, program, plan)
                          I/O only: executes a WritePlan (mapc.runtime.plan_write.PlannedWriter)
The protocol and its types (SourceFacts, WriteRequest, WritePlan) are documented in
mapc.runtime.plan_write and docs/formats.md. Which request options a format honours is the
``HONOURS`` table below: an option the user sets that the target does not honour is refused
before planning. A format is registered by adding its module to ``MODULES`` and ``HONOURS``;
modules are imported only when used.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from mapc.errors import MapcError

# format name -> module (under mapc.runtime.containers). A listed module that does not exist
# yet is reported as "not available" rather than breaking the others.
MODULES = {
    "hf": "hf",
    "megatron": "megatron",
    "nemo": "nemo",
    "gguf": "gguf",
    "dcp": "dcp",
    "nxdt": "nxdt",
    "deepspeed": "deepspeed",
    "universal": "universal",
    "neox": "neox",
    "torch_dist": "torch_dist",
    "nemo2": "nemo2",
}


# Request options (mapc.runtime.plan_write.OPTIONS) each format's output honours; --dtype is
# honoured by every format.
HONOURS = {
    "hf": frozenset({"with_optimizer", "max_shard_bytes", "quantize"}),
    "megatron": frozenset({"with_optimizer", "pp_first_stage", "pp_last_stage", "vpp", "dp"}),
    "nemo": frozenset(),
    "gguf": frozenset(),
    "dcp": frozenset(),
    "nxdt": frozenset(),
    "deepspeed": frozenset({"dp", "zero_stage"}),
    "universal": frozenset({"dp", "zero_stage"}),
    "neox": frozenset({"dp", "zero_stage", "with_optimizer"}),
    "torch_dist": frozenset({"dp", "optim_sharding", "vpp"}),
    "nemo2": frozenset({"dp", "optim_sharding", "vpp"}),
}


def available(fmt: str) -> bool:
    return importlib.util.find_spec(f"mapc.runtime.containers.{MODULES[fmt]}") is not None


def module(fmt: str):
    if fmt not in MODULES:
        raise MapcError(f"unknown format '{fmt}'", hint="known formats: " + ", ".join(MODULES))
    if not available(fmt):
        raise MapcError(f"format '{fmt}' is not available in this version of mapc",
                        hint="available: " + ", ".join(f for f in MODULES if available(f)))
    return importlib.import_module(f"mapc.runtime.containers.{MODULES[fmt]}")


FORMATS = MODULES  # the names users may pass to --to / --from


# Most specific first: a training checkpoint may also hold a config.json and safetensors files
# (e.g. exported weights), so hf, the loosest test, comes last. A NeoX (pipeline) checkpoint
# also has DeepSpeed's optimizer files, so neox comes before deepspeed. A torch_dist root has
# Megatron's tracker file and its iteration directory is a DCP directory, so torch_dist comes
# before megatron and dcp. A NeMo 2 directory (weights/ + context/) has no file of the others.
DETECT_ORDER = ("neox", "deepspeed", "universal", "nemo", "nemo2", "nxdt", "torch_dist",
                "megatron", "gguf", "dcp", "hf")


def detect_format(path) -> str:
    p = Path(path)
    if not p.exists():
        raise MapcError(f"{path} does not exist")
    found = [name for name in DETECT_ORDER if available(name) and module(name).detect(p)]
    if not found:
        raise MapcError(f"cannot tell the format of {path}",
                        hint="readable formats: " + ", ".join(f for f in MODULES if available(f))
                        + "; mapc convert takes --from FORMAT to say which")
    return found[0]


def open_source(path, fmt: str | None = None):
    fmt = fmt or detect_format(path)
    return module(fmt).Source(path)


def layout_of(fmt: str, topology: dict | None = None) -> str:
    """The spec layout ``fmt``'s output follows at ``topology`` (a module may choose it by
    topology with ``layout_for``: a universal checkpoint with --tp is in the megatron layout)."""
    mod = module(fmt)
    choose = getattr(mod, "layout_for", None)
    return choose(topology or {}) if choose is not None else mod.LAYOUT


def check_request(request) -> None:
    """Refuse (MapcError) an option the user set that ``request.format`` does not honour."""
    from mapc.runtime.plan_write import OPTIONS
    takers = {opt: [f for f, h in HONOURS.items() if opt in h] for opt in OPTIONS}
    request.refuse_unhonoured(HONOURS.get(request.format, frozenset()), takers)


def plan_write(program, facts, request):
    """The WritePlan of ``request.format`` (pure; see mapc.runtime.plan_write)."""
    mod = module(request.format)
    check_request(request)
    return mod.plan_write(program, facts, request)


def make_writer(fmt: str, tmpdir, program, plan):
    """The I/O-only writer that executes ``plan`` in ``tmpdir``."""
    return module(fmt).Writer(tmpdir, program, plan)
