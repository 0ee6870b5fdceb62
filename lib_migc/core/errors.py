"""One error type for everything a user can fix.

The WebUI swallows exceptions raised inside Script callbacks, so a user-facing error must be raised
from code that runs unwrapped (the attention hook). Its API handler answers with
``vars(e).get("status_code", 500)`` and ``detail``: both must be *instance* attributes, and ``str(e)``
is what the browser shows, so all three carry the same actionable message.
"""
from __future__ import annotations

import logging

log = logging.getLogger("migc")


class MigcError(ValueError):
    """A problem the user can act on: bad layout, missing or wrong weights, unsupported model."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = message


class LayoutError(MigcError):
    """The layout (instances, boxes, scales) is invalid; the message names the instance and field."""


class CheckpointError(MigcError):
    """A weights file is missing, unsafe to load, or does not have the MIGC key/shape layout."""


def argument_error(exc: Exception) -> MigcError:
    """Any failure to read the script's arguments, as the 4xx error the job stops with."""
    if isinstance(exc, MigcError):
        return exc
    return MigcError(f"MIGC: the script arguments could not be read ({type(exc).__name__}: {str(exc)[:300]}); "
                     "see the README's API section for the dict and list forms.")


def unexpected_error(what: str, exc: Exception) -> MigcError:
    """A failure that is not the user's input: logged with its traceback, reported as a 500 with the message."""
    if isinstance(exc, MigcError):
        return exc
    log.exception("%s", what)
    return MigcError(f"{what}: {type(exc).__name__}: {str(exc)[:300]}", status_code=500)
