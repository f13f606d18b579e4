"""Errors that reach the user as one line and an exit code."""

from __future__ import annotations


class CdtoolError(Exception):
    """A runtime failure the user can fix: printed as `Error: ...`, exit code 1."""

    exit_code = 1


class UsageError(CdtoolError):
    """Arguments that do not fit together: exit code 2."""

    exit_code = 2
