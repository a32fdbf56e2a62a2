"""One project error type: every failure names the thing, the expectation and the fix."""

from __future__ import annotations

from pathlib import Path


class SsdoptError(Exception):
    """A user-facing failure. The CLI turns it into a message and exit code 2.

    Args:
        what: the thing that is wrong (usually a file path or parameter name).
        expected: what was expected of it.
        fix: how the user can fix it.
    """

    exit_code = 2

    def __init__(self, what: str | Path, expected: str, fix: str) -> None:
        self.what = str(what)
        self.expected = expected
        self.fix = fix
        super().__init__(f"{self.what}: expected {expected}. Fix: {fix}")
