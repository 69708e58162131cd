"""The package's own error type: a message a user can act on, turned into a clean exit by the CLI."""
from __future__ import annotations


SHOWN_PROBLEMS = 20  # a recipe with thousands of bad keys would otherwise print thousands of lines


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
        lines += [f"  - {p}" for p in problems[:SHOWN_PROBLEMS]]
        if len(problems) > SHOWN_PROBLEMS:
            lines.append(f"  ... and {len(problems) - SHOWN_PROBLEMS:,} more (fix these first; the rest are often "
                         "the same mistake)")
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


class WriteFailed(LiteFTError):
    """A file of the run could not be written (full disk, read-only or missing folder, a name too long); the
    previous good state is kept and the message says what is needed to resume."""


class RunLocked(LiteFTError):
    """Another `lite-ft run` holds the run folder."""


class DataChanged(LiteFTError):
    """The training data differs from what an unfinished run was trained on."""
