"""User-facing errors.

Anything the user can fix (a bad config key, a malformed data line, a missing model folder) is
raised as :class:`TuneforgeError`. The CLI prints its message and exits with ``exit_code``;
it never shows a traceback for these.
"""

from __future__ import annotations


class TuneforgeError(Exception):
    """An error the user can fix. ``str(err)`` is the whole message shown to them."""

    exit_code: int = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(TuneforgeError):
    """One or more problems in a run config; the message lists all of them."""


class DataError(TuneforgeError):
    """One or more problems in a data file; the message lists them with file:line."""


class ModelLoadError(TuneforgeError):
    """A model could not be found or loaded."""
