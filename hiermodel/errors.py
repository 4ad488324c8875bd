"""User-facing errors: one clear line, exit code 2."""

from __future__ import annotations


class HierfedError(Exception):
    """An error a user can fix; its message is one line naming what, where and what to do."""

    exit_code = 2


class DataError(HierfedError):
    """Input data is missing, unreadable or malformed."""


class ConfigError(HierfedError):
    """A setting or command-line value is invalid."""


def quoted(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: a fuzzed 100 kB field stays out of a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
