"""The package's own error type: a message a user can act on, turned into a clean exit by the CLI."""
from __future__ import annotations


class LiteFTError(Exception):
    """A problem the user can fix (bad recipe, missing file, unreachable Hub). Never a bug in lite-ft."""

    exit_code = 1


class RecipeError(LiteFTError):
    """One or more problems in a recipe; every problem is listed, each with its key, the bad value and the fix."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str = "recipe") -> None:
        self.problems = list(problems)
        self.source = source
        lines = [f"{source} has {len(problems)} problem{'s' if len(problems) != 1 else ''}:"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


class DataError(LiteFTError):
    """The data cannot be used: missing file, no usable example, wrong fields."""


class TrainingStopped(LiteFTError):
    """Training stopped before its last step (non-finite loss, interrupt); the last good checkpoint is kept."""


class Interrupted(TrainingStopped):
    """Ctrl-C during training: a checkpoint was written and `--resume` continues."""

    exit_code = 130


class OutOfMemory(LiteFTError):
    """The accelerator ran out of memory; the message says where and what would fit."""
