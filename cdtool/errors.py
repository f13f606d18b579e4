"""Errors that reach the user as one line and an exit code."""

from __future__ import annotations


class CdtoolError(Exception):
    """A runtime failure the user can fix: printed as `Error: ...`, exit code 1."""

    exit_code = 1


class UsageError(CdtoolError):
    """Arguments that do not fit together: exit code 2."""

    exit_code = 2


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty), for
    the one-line errors that name what a library said."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
