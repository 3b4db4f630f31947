"""Checkpoint containers by format name. Each format names the spec layout it uses."""
from __future__ import annotations

from pathlib import Path

from mapc.errors import MapcError


def _hf():
    from mapc.runtime.containers import hf
    return hf


def _megatron():
    from mapc.runtime.containers import megatron
    return megatron


# format -> (layout name in specs, module loader, source class name)
FORMATS = {
    "hf": ("hf", _hf, "HFSource"),
    "megatron": ("megatron", _megatron, "MegatronSource"),
}


def detect_format(path) -> str:
    p = Path(path)
    if not p.exists():
        raise MapcError(f"{path} does not exist")
    if not p.is_dir():
        raise MapcError(f"{path} is a file; mapc reads checkpoint directories",
                        hint="give the directory that holds it")
    found = [name for name, (_, mod, _) in FORMATS.items() if mod().detect(p)]
    if not found:
        raise MapcError(f"cannot tell the format of {path}",
                        hint="known formats: " + ", ".join(FORMATS)
                        + " (mapc convert takes --from FORMAT to say which)")
    return found[0]


def open_source(path, fmt: str | None = None):
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise MapcError(f"unknown format '{fmt}'", hint="known formats: " + ", ".join(FORMATS))
    _, mod, cls = FORMATS[fmt]
    return getattr(mod(), cls)(path)


def layout_of(fmt: str) -> str:
    if fmt not in FORMATS:
        raise MapcError(f"unknown format '{fmt}'", hint="known formats: " + ", ".join(FORMATS))
    return FORMATS[fmt][0]
