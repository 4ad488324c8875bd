"""User-facing errors: one clear line, exit code 2."""

from __future__ import annotations


class HierfedError(Exception):
    """An error a user can fix; its message is one line naming what, where and what to do."""

    exit_code = 2


class DataError(HierfedError):
    """Input data is missing, unreadable or malformed."""


class ConfigError(HierfedError):
    """A setting or command-line value is invalid."""
