"""One `lite-ft run` per run folder: an advisory lock (flock) on `output.dir/.lock`, held for the whole run, with
the holder's PID, host and start time written in it. The kernel drops the lock when its process dies, however it
dies, so a lock file left by a killed run is stale and is taken over, with a note.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from lite_ft.errors import RunLocked

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked (and the run says so)
    fcntl = None  # type: ignore[assignment]

LOCK = ".lock"


class RunLock:
    """`with RunLock(folder) as lock:` holds the folder or raises RunLocked naming the holder; `lock.note` says
    whether a stale lock was taken over."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK
        self.note: str | None = None
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            self.note = "run folder not locked: this platform has no flock"
            self._fd = fd
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read(fd)
            os.close(fd)
            raise RunLocked(f"output.dir {self.path.parent} is in use by another lite-ft run ({_describe(holder)}); "
                            "wait for it to finish or stop it, or choose another output.dir") from None
        previous = _read(fd)
        if previous:
            self.note = f"took over the stale lock of a run that is gone ({_describe(previous)})"
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty lock file is not stale: the run ended normally
        os.close(self._fd)  # closing releases the flock
        self._fd = None


def _read(fd: int) -> dict[str, Any]:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {"unreadable": True}


def _describe(holder: dict[str, Any]) -> str:
    if not holder or holder.get("unreadable"):
        return "holder unknown"
    return f"PID {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
