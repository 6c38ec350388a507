"""One error type the CLI knows how to print: what is wrong, and what to do about it."""

from __future__ import annotations


class PedError(Exception):
    """A user-facing error. `hint` says how to fix it; the CLI prints both and exits 2."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"
