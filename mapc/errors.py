"""The one error type users see.

Every failure that is the user's to fix (a malformed spec, a checkpoint that does not match,
a topology that cannot divide a shape, a file that is truncated or pickles code) raises
:class:`MapcError`. The CLI prints it as one line and exits 1; ``MAPC_DEBUG=1`` shows the
traceback.
"""
from __future__ import annotations


class MapcError(Exception):
    """A failure with a message that names what went wrong, where, and how to fix it."""

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None,
                 context: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        self.context = context      # e.g. the offending spec line with a caret, shown below
        super().__init__(self.format())

    def format(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f" ({self.hint})"
        return text + (self.context or "")


class SpecError(MapcError):
    """An error in a spec file, located at file:line:col."""
