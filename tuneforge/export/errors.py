"""The error raised when a run cannot be exported as asked."""

from __future__ import annotations

from tuneforge.errors import TuneforgeError


class ExportError(TuneforgeError):
    """A run, an option or a model that cannot be exported as asked; the message says why."""
