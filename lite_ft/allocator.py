"""The CPU allocator for training on Linux: jemalloc where the system has it, else glibc set up for training.

A training step allocates and frees gigabytes of activations. Where each freed block goes decides both the speed
and the resident memory, measured in benchmarks/results/levers-cpu/allocator-steady.md:
- glibc as it comes raises its mmap threshold (up to 32 MiB) each time a large block is freed, after which nearly
  every activation comes from its heap: fast once warm, but the heap fragments and never shrinks (about 1.4x the
  resident memory of the other settings for SmolLM2 LoRA on SQuAD batches);
- lite-ft's glibc setup fixes the mmap threshold (`mallopt`, MMAP_THRESHOLD; `train.release_memory` lowers it to
  RELEASE_THRESHOLD): tensors from there up get their own mapping, returned to the OS when freed, on transparent
  huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`), and the heap is trimmed once the model is loaded. Low
  resident memory, but every large tensor of every step is a fresh mapping the kernel must fault in and zero:
  about a third of a steady SmolLM2 LoRA step went to that;
- jemalloc (`LD_PRELOAD`) keeps freed extents for reuse in size classes. With its own settings every block over
  8 MiB (SmolLM2's MLP activations) comes from a dedicated arena that gives freed pages back at once, and pages
  past their dirty decay are purged outright (muzzy decay 0): a 17 MiB tensor allocated, freed and allocated again
  is faulted in anew every time, and a bf16 LoRA step of SQuAD batch 8 faults in ~3.4 GB. lite-ft starts it with
  JEMALLOC_CONF: no dedicated arena below 1 GiB, and purged pages only marked free (the kernel takes them back
  when it needs memory). Measured (benchmarks/results/levers-cpu/allocator-2026-12-07b.md): 0.6 M instead of
  5.7 M page faults over 6 bf16 steps, about 1.2x the tokens/s, 1.12x the peak; 100 varied steps of batch 1 peak at
  1,456 MiB against 1,429 with jemalloc's settings, where its page decay off (`dirty_decay_ms:-1`) grew to 3,470.

So the `lite-ft` command starts itself again once, before anything is loaded (exec: the same process id), with
jemalloc preloaded when the system has it (`apt install libjemalloc2`, `conda install jemalloc`), else with glibc's
huge-pages tunable (glibc reads tunables only when a process starts). A library caller sets these in the
environment before starting Python. `LITE_FT_ALLOCATOR` chooses: `auto` (the default, as above), `jemalloc` (stop
if it is missing), `glibc-tuned` (lite-ft's glibc setup even where jemalloc is present) or `glibc` (glibc as it
comes). What a run got goes into metrics.json (`train.allocator`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys
from pathlib import Path
from typing import Any

MMAP_THRESHOLD = 4 << 20  # bytes: tensors from 4 MiB up get their own mapping (the default)
RELEASE_THRESHOLD = 1 << 20  # bytes: train.release_memory, nearly every activation on its own mapping
HUGE_PAGES = "glibc.malloc.hugetlb=1"
OPT_OUT = "LITE_FT_ALLOCATOR"  # auto | jemalloc | glibc-tuned | glibc (as it comes)
CHOICES = ("auto", "jemalloc", "glibc-tuned", "glibc")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")  # already in LD_PRELOAD: the user's choice stands
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
JEMALLOC_ALL_ARENAS = 4096  # MALLCTL_ARENAS_ALL in jemalloc.h: arena.<i>.purge on every arena
JEMALLOC_CONF = "oversize_threshold:1073741824,muzzy_decay_ms:-1"  # MALLOC_CONF of the restart (module docstring)


@functools.cache  # platform.libc_ver reads the Python executable: once per process, not per call
def _glibc_linux() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def choice() -> str:
    """LITE_FT_ALLOCATOR, checked: one of CHOICES (unset: auto)."""
    value = os.environ.get(OPT_OUT, "").strip().lower() or "auto"
    if value not in CHOICES:
        raise SystemExit(f"{OPT_OUT}={value!r}: expected one of {', '.join(CHOICES)}")
    return value


def tuned() -> bool:
    """Whether lite-ft sets the allocator up here (Linux with glibc, and not LITE_FT_ALLOCATOR=glibc)."""
    return _glibc_linux() and choice() != "glibc"


@functools.cache
def jemalloc_library() -> str | None:
    """jemalloc's shared library: the Python environment's own (conda) first, then the system's (ldconfig)."""
    for folder in (Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib"):
        found = sorted(folder.glob("libjemalloc.so*"))
        if found:
            return str(found[0])
    return ctypes.util.find_library("jemalloc")  # a soname such as libjemalloc.so.2, which the loader finds


def _preloaded() -> list[str]:
    return [lib for lib in os.environ.get("LD_PRELOAD", "").replace(" ", ":").split(":") if lib]


def jemalloc_active() -> bool:
    """Whether this process allocates through jemalloc (mapped in, and so first in symbol lookup via LD_PRELOAD)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return "libjemalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _user_allocator() -> str | None:
    """The allocator the user preloaded (LD_PRELOAD), if any: it stands, and lite-ft preloads nothing."""
    return next((name for lib in _preloaded() for name in OTHER_ALLOCATORS if name in lib), None)


def _jemalloc_to_preload() -> str | None:
    """The jemalloc library the restart preloads: None where the user preloaded an allocator, LITE_FT_ALLOCATOR
    asks for glibc, or the system has none."""
    if _user_allocator() or choice() not in ("auto", "jemalloc"):
        return None
    return jemalloc_library()


def run_allocator(release_memory: bool) -> str:
    """The allocator a `lite-ft` run started now on this machine gets, as lite-ft plan's model names it:
    jemalloc / jemalloc, decay 0 / mmap 4 MiB / mmap 1 MiB / glibc default / preloaded (another LD_PRELOAD)."""
    if not tuned():
        return "glibc default"
    user = _user_allocator()
    if user == "jemalloc" or (user is None and _jemalloc_to_preload()):
        return "jemalloc, decay 0" if release_memory else "jemalloc"
    if user is not None:
        return "preloaded"
    return f"mmap {(RELEASE_THRESHOLD if release_memory else MMAP_THRESHOLD) >> 20} MiB"


def _tunables() -> list[str]:
    return [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]


def huge_pages_on() -> bool:
    """Whether glibc was started with transparent huge pages for its memory."""
    return HUGE_PAGES in _tunables()


def _restart_environment() -> dict[str, str]:
    """What the restart adds to the environment (nothing: no restart)."""
    if _user_allocator():
        return {}  # an allocator the user preloaded stands
    lib = _jemalloc_to_preload()
    if choice() == "jemalloc" and lib is None:
        raise SystemExit(f"{OPT_OUT}=jemalloc but no libjemalloc was found: install it (apt install libjemalloc2, "
                         f"conda install jemalloc) or unset {OPT_OUT}")
    if lib is not None:  # a MALLOC_CONF of the user's stands
        return {"LD_PRELOAD": ":".join([lib, *_preloaded()]), "MALLOC_CONF": os.environ.get("MALLOC_CONF",
                                                                                         JEMALLOC_CONF)}
    tunables = _tunables()
    if any(t.startswith("glibc.malloc.hugetlb=") for t in tunables):
        return {}  # the user's choice stands
    return {"GLIBC_TUNABLES": ":".join([*tunables, HUGE_PAGES])}


def restart_for_training() -> None:
    """Start this command again with jemalloc preloaded, or with GLIBC_TUNABLES asking for huge pages (see the
    module's docstring). Called first thing by the `lite-ft` command; returns when nothing is to be done (not glibc
    on Linux, LITE_FT_ALLOCATOR=glibc, the environment already says, this is the restarted process) or when the exec
    failed (the command then runs as it is, as metrics.json says)."""
    if not tuned() or os.environ.get("LITE_FT_RESTARTED"):
        return
    changes = _restart_environment()
    if not changes:
        return
    os.environ.update(changes)
    os.environ["LITE_FT_RESTARTED"] = "1"  # one restart at most, whatever the loader or glibc make of it
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:
        return


def configure(release_memory: bool) -> str:
    """Set the allocator up for this process and say what it now is, for metrics.json. jemalloc: with
    `release_memory`, freed pages go back to the OS at once (decay 0). glibc: fix the mmap threshold
    (RELEASE_THRESHOLD with `release_memory`, else MMAP_THRESHOLD)."""
    if not _glibc_linux():
        return "platform default (lite-ft sets the allocator on Linux with glibc only)"
    if jemalloc_active():
        if release_memory and not jemalloc_no_decay():
            return "jemalloc (setting decay 0 for train.release_memory failed)"
        decay = _mallctl("arenas.dirty_decay_ms", read=ctypes.c_ssize_t)  # ms for new arenas: -1 never, 0 at once
        said = {-1: "jemalloc, freed pages kept for reuse (decay off)",
                0: "jemalloc, freed pages returned at once (decay 0)"}.get(decay, f"jemalloc, dirty decay {decay} ms")
        if decay not in (-1, 0) and _mallctl("arenas.muzzy_decay_ms", read=ctypes.c_ssize_t) == -1:
            said += ", purged pages marked free"
        return said
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


def _mallctl(name: str, value: int | None = None, read: type | None = None) -> Any:
    """jemalloc's mallctl (the preloaded one, through the process's global symbols): with `read`, the value of that
    ctypes type (None if refused); else write `value` as an ssize_t (None: a command such as a purge), True if
    jemalloc took it."""
    try:
        call = ctypes.CDLL(None).mallctl
    except (OSError, AttributeError):
        return None if read else False
    if read is not None:
        out = read()
        size = ctypes.c_size_t(ctypes.sizeof(out))
        return out.value if call(name.encode(), ctypes.byref(out), ctypes.byref(size), None, 0) == 0 else None
    new = None if value is None else ctypes.byref(ctypes.c_ssize_t(value))
    size = 0 if value is None else ctypes.sizeof(ctypes.c_ssize_t)
    return call(name.encode(), None, None, new, ctypes.c_size_t(size)) == 0


def jemalloc_no_decay() -> bool:
    """Every jemalloc arena, present and future, gives its freed pages back to the OS at once."""
    arenas = _mallctl("arenas.narenas", read=ctypes.c_uint)
    if arenas is None:
        return False
    names = ["arenas.dirty_decay_ms", "arenas.muzzy_decay_ms"]
    names += [f"arena.{i}.{kind}_decay_ms" for i in range(arenas) for kind in ("dirty", "muzzy")]
    done = [_mallctl(name, 0) for name in names]  # arenas not yet made refuse: they take the new default
    return done[0] and done[1]


def release_free_heap() -> bool:
    """Give the allocator's free pages back to the OS: glibc's malloc_trim(0) (from the heap's top and from between
    live blocks), jemalloc's purge of every arena. Called once after the model is loaded: SmolLM2 QLoRA, SQuAD batch
    8, 4 steps, one thread peaked at 4,041 / 3,812 MiB with it against 4,119-4,206 without (glibc; its RSS after
    loading 1,041 against 1,540 MiB). False where lite-ft leaves the allocator alone or the call failed."""
    if not tuned():
        return False
    if jemalloc_active():
        return _mallctl(f"arena.{JEMALLOC_ALL_ARENAS}.purge")
    try:
        return _libc().malloc_trim(0) == 1
    except (OSError, AttributeError):
        return False
