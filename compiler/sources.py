"""Spec texts by file name, registered when a spec is compiled, so that an error raised anywhere
later (a plan, an evaluation) can show the offending spec line with a caret. Read-only to
everything but ``register``; a text is registered again, unchanged, on every compile."""
from __future__ import annotations

_TEXTS: dict[str, str] = {}


def register(file: str, text: str) -> None:
    _TEXTS[file] = text


def text_of(file: str) -> str:
    """The text of the spec compiled from ``file`` ("" if none was)."""
    return _TEXTS.get(file, "")
