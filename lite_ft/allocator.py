"""glibc's allocator, set up for training on a Linux CPU: large tensors on their own mappings, on huge pages, and
the heap trimmed once the model is loaded.

By default glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after which nearly
every activation tensor comes from its heap; the heap fragments within a step and never shrinks, so resident memory
ends well above what the live tensors need (about 1.5x for SmolLM2 LoRA on SQuAD batches). lite-ft changes three
things, measured in benchmarks/results/levers-cpu (the README's speed section has the table):

- the mmap threshold is fixed (`mallopt`, when a run starts: any caller gets it): tensors from MMAP_THRESHOLD up get
  their own mapping, returned to the OS when freed. `train.release_memory` lowers it to RELEASE_THRESHOLD.
- glibc backs its memory with transparent huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`), which makes the
  fresh pages of a new mapping 512x fewer faults. glibc reads tunables only when a process starts, so the `lite-ft`
  command sets the variable and starts itself again (exec: the same process id, before anything is loaded). A
  library caller sets it in the environment before starting Python.

- once the model is loaded, the heap's free pages go back to the OS (`malloc_trim`, release_free_heap): quantizing
  on load frees the full-precision weights into the heap, and training reused only part of them.

`LITE_FT_ALLOCATOR=glibc` leaves glibc as it is (all three). What was set goes into metrics.json
(`train.allocator`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys

MMAP_THRESHOLD = 4 << 20  # bytes: tensors from 4 MiB up get their own mapping (the default)
RELEASE_THRESHOLD = 1 << 20  # bytes: train.release_memory, nearly every activation on its own mapping
HUGE_PAGES = "glibc.malloc.hugetlb=1"
OPT_OUT = "LITE_FT_ALLOCATOR"  # "glibc": leave glibc's allocator as it is
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


@functools.cache  # platform.libc_ver reads the Python executable: once per process, not per call
def _glibc_linux() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def tuned() -> bool:
    """Whether lite-ft sets glibc up here (Linux with glibc, and not opted out)."""
    return _glibc_linux() and os.environ.get(OPT_OUT, "").lower() != "glibc"


def _tunables() -> list[str]:
    return [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]


def huge_pages_on() -> bool:
    """Whether glibc was started with transparent huge pages for its memory."""
    return HUGE_PAGES in _tunables()


def restart_with_huge_pages() -> None:
    """Start this command again with GLIBC_TUNABLES asking for huge pages, unless the variable already says
    something of glibc.malloc.hugetlb (the user's choice stands), lite-ft is opted out, or this is not glibc on
    Linux. Called first thing by the `lite-ft` command; returns when nothing is to be done (or the exec failed: the
    command then runs on 4 KiB pages, as metrics.json says)."""
    tunables = _tunables()
    if not tuned() or any(t.startswith("glibc.malloc.hugetlb=") for t in tunables) or os.environ.get(
            "LITE_FT_RESTARTED"):
        return
    os.environ["GLIBC_TUNABLES"] = ":".join([*tunables, HUGE_PAGES])
    os.environ["LITE_FT_RESTARTED"] = "1"  # one restart at most, whatever glibc makes of the variable
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:
        return


def configure(release_memory: bool) -> str:
    """Fix glibc's mmap threshold for this process (RELEASE_THRESHOLD with `release_memory`, else MMAP_THRESHOLD)
    and say what the allocator now is, for metrics.json."""
    if not _glibc_linux():
        return "platform default (lite-ft sets glibc's allocator on Linux only)"
    if not tuned():
        return f"glibc default ({OPT_OUT}=glibc)"
    pages = "transparent huge pages" if huge_pages_on() else "4 KiB pages"
    chosen = [t for t in _tunables() if t.startswith("glibc.malloc.mmap_threshold=")]
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        chosen.append(f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}")
    if chosen:  # the user's own choice stands
        return f"glibc, mmap threshold from the environment ({chosen[0]}), {pages}"
    threshold = RELEASE_THRESHOLD if release_memory else MMAP_THRESHOLD
    if not set_mmap_threshold(threshold):
        return "glibc default (mallopt refused)"
    return f"glibc mmap threshold {threshold >> 20} MiB, {pages}"


def set_mmap_threshold(threshold: int) -> bool:
    """mallopt(M_MMAP_THRESHOLD): blocks from `threshold` bytes up get their own mapping (and glibc stops moving the
    threshold). False when glibc refused or is not there."""
    try:
        return _libc().mallopt(_M_MMAP_THRESHOLD, threshold) == 1
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def release_free_heap() -> bool:
    """malloc_trim(0): give the heap's free pages back to the OS, from its top and from between live blocks. Called
    once after the model is loaded: SmolLM2 QLoRA, SQuAD batch 8, 4 steps, one thread peaked at 4,041 / 3,812 MiB
    with it against 4,119-4,206 without (its RSS after loading 1,041 against 1,540 MiB). False where lite-ft leaves
    glibc alone or glibc is not there."""
    if not tuned():
        return False
    try:
        return _libc().malloc_trim(0) == 1
    except (OSError, AttributeError):
        return False
