"""Exceptions that carry their context.

`TxsmsError` is the root of everything the engine raises on purpose. `ConfigError` stands
outside it on purpose: a broken configuration must stop start-up and never be swallowed by a
handler that catches engine errors.

Skips (opted out, quiet hours, duplicate) are *statuses with reasons*, never exceptions.
"""

from __future__ import annotations


class TxsmsError(Exception):
    """Root of the engine's own errors."""


class ConfigError(Exception):
    """A configuration problem: names the file, the dotted key and what is wrong."""

    def __init__(self, problem: str, *, key: str | None = None, file: str | None = None):
        self.problem = problem
        self.key = key
        self.file = file
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.key) if p]
        return ": ".join([*parts, self.problem])


class TemplateError(TxsmsError):
    """A template failed to compile or render; `key` names the template."""

    def __init__(self, problem: str, *, key: str):
        self.problem = problem
        self.key = key
        super().__init__(f"templates.{key}: {problem}")


class SignatureError(TxsmsError):
    """A delivery's signature is missing or wrong (answered 401/403)."""


class PayloadError(TxsmsError):
    """A delivery is signed correctly but cannot be read (answered 400)."""
