"""Checkpoint containers by format name.

A container module provides:
  LAYOUT                  the spec layout its tensors follow (e.g. "megatron")
  detect(path) -> bool    whether a directory/file is in this format
  Source(path)            an opened checkpoint (mapc.runtime.containers.base.Source)
  make_writer(tmpdir, program, resolved, options) -> Writer
A format is registered by adding its module here; modules are imported only when used.
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
# before megatron and dcp.
DETECT_ORDER = ("neox", "deepspeed", "universal", "nemo", "nxdt", "torch_dist", "megatron",
                "gguf", "dcp", "hf")


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


def layout_of(fmt: str) -> str:
    return module(fmt).LAYOUT


def make_writer(fmt: str, tmpdir, program, resolved, options: dict):
    return module(fmt).make_writer(tmpdir, program, resolved, options)
