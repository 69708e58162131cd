"""Every file a run writes (checkpoints, weights, logs, metrics, predictions) is written under a temporary name and
renamed: a reader, or a resumed run, sees the old file or the new one, never half of one. A failed write, whatever
raised it (ENOSPC from the OS, safetensors or torch.save's own errors), removes its partial files and says what
failed, how much space there is, and how to go on.
"""
from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from lite_ft.errors import WriteFailed

MIB = 2**20
LOW_SPACE = 16 * MIB  # below this, a write error from a library is taken to be a full disk


def atomic_write(target: Path, what: str, write: Callable[[Path], None], resume_hint: str,
                 needed_bytes: int | None = None) -> None:
    """Call `write(staging)` (a file or a folder path next to `target`), then rename it to `target`.

    A folder already at `target` is moved aside first and removed after, so `target` is never missing while a
    previous version existed. On any failure the staging path is removed and WriteFailed says what to do.
    """
    staging = target.with_name(f".{target.name}.partial")
    aside = target.with_name(f".{target.name}.old")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove(staging)
        write(staging)
        if target.is_dir():
            remove(aside)
            os.rename(target, aside)
        os.replace(staging, target)
        remove(aside)
    except BaseException as exc:  # full disk, read-only or vanished folder; libraries wrap OS errors in their own types
        remove(staging)
        if aside.exists() and not target.exists():
            os.rename(aside, target)
        if not isinstance(exc, Exception):  # Ctrl-C, SIGTERM, exit: cleaned up, and on its way
            raise
        raise WriteFailed(describe_failure(target, what, exc, resume_hint, needed_bytes)) from None


def remove(path: Path) -> None:
    """Delete a file or a folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def describe_failure(target: Path, what: str, exc: BaseException, resume_hint: str,
                     needed_bytes: int | None = None) -> str:
    """What failed and why in a user's words, the free space there, and how to go on."""
    try:
        free: int | None = shutil.disk_usage(_existing_parent(target)).free
    except OSError:
        free = None
    reason = _reason(exc, free, needed_bytes)
    space = ""
    if free is not None:
        space = f"; {free / MIB:,.0f} MiB free on that file system"
        if needed_bytes:
            space += f", about {needed_bytes / MIB:,.0f} MiB needed"
    return f"could not write {what} ({target}): {reason}{space}. {resume_hint}"


def _reason(exc: BaseException, free: int | None, needed: int | None) -> str:
    code = getattr(exc, "errno", None)
    text = str(exc)
    first = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
    if code == errno.ENOSPC or "No space left" in text or "file write failed" in text:
        return "No space left on device"
    if code == errno.EROFS:
        return "the file system is read-only; choose another output.dir"
    if code == errno.ENAMETOOLONG:
        return "a file name is longer than the file system allows; choose a shorter output.dir"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied; choose a folder you can write to"
    # Libraries report a full disk in their own words (torch.save: "unexpected pos ..."): judge by the space left.
    if free is not None and (free < LOW_SPACE or (needed is not None and free < needed)):
        return f"No space left on device ({type(exc).__name__}: {first})"
    return f"{type(exc).__name__}: {first}"


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def folder_bytes(path: Path) -> int:
    """Bytes of the files under `path` (a previous version's size estimates the space the next one needs)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0
