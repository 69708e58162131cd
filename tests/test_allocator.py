"""glibc set up for training (lite_ft.allocator): the mmap threshold glibc really applies, free heap pages given
back after loading, and the restart of the command with huge pages (once, same process id, not when opted out)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from lite_ft import allocator

glibc = pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                           reason="glibc on Linux only")


_MAPPED = """
import ctypes, sys
from lite_ft import allocator
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t)
                for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
said = allocator.configure(release_memory=sys.argv[1] == "release")
before = libc.mallinfo2().hblkhd
block = libc.malloc(int(sys.argv[2]))
print(said, "|", libc.mallinfo2().hblkhd - before)
"""


def _mapped(mode: str, size: int) -> tuple[str, int]:
    """In a fresh process (whose heap has no free space of that size yet): what configure said, and how many more
    bytes glibc holds in its own mappings once a block of `size` bytes is allocated."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocator.OPT_OUT,
                                                             "MALLOC_MMAP_THRESHOLD_")}
    out = subprocess.run([sys.executable, "-c", _MAPPED, mode, str(size)], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout
    said, mapped = out.rsplit("|", 1)
    return said.strip(), int(mapped)


@glibc
def test_blocks_from_the_threshold_up_get_their_own_mapping() -> None:
    said, mapped = _mapped("default", allocator.MMAP_THRESHOLD + (1 << 20))
    assert said.startswith("glibc mmap threshold 4 MiB") and mapped >= allocator.MMAP_THRESHOLD
    assert _mapped("default", allocator.MMAP_THRESHOLD - (1 << 20))[1] == 0  # from the heap
    said, mapped = _mapped("release", allocator.RELEASE_THRESHOLD + (1 << 20))
    assert said.startswith("glibc mmap threshold 1 MiB") and mapped >= allocator.RELEASE_THRESHOLD


_TRIM = """
import ctypes, sys
from lite_ft import allocator
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
allocator.configure(release_memory=False)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
blocks, pins = [], []
for _ in range(256):  # 1 MiB blocks from the heap, each followed by one of 64 KiB that stays: nothing to trim at
    blocks.append(libc.malloc(1 << 20))  # the top (64 KiB: above glibc's per-thread caches, so it comes from the
    ctypes.memset(blocks[-1], 1, 1 << 20)  # top too, right after its block)
    pins.append(libc.malloc(64 << 10))
for b in blocks:
    libc.free(ctypes.c_void_p(b))
before = rss()  # the freed blocks are still resident
released = allocator.release_free_heap()
print(released, before - rss())
"""


@glibc
def test_free_heap_pages_between_live_blocks_go_back_to_the_os() -> None:
    """What run() does once the model is loaded: 256 MiB freed between live blocks stops counting in RSS."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocator.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", _TRIM], env=env, capture_output=True, text=True, check=True,
                         timeout=60).stdout.split()
    assert out[0] == "True" and int(out[1]) > 200 << 20


@glibc
def test_opting_out_leaves_glibc_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(allocator.OPT_OUT, "glibc")
    assert allocator.configure(release_memory=True) == "glibc default (LITE_FT_ALLOCATOR=glibc)"
    assert not allocator.release_free_heap()


_PROBE = ("import os, sys; from lite_ft import allocator; "
          "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), os.environ.get('LD_PRELOAD'), flush=True); "
          "allocator.restart_for_training(); "
          "print('ran', allocator.jemalloc_active(), allocator.configure(release_memory=False), flush=True)")
jemalloc = pytest.mark.skipif(allocator.jemalloc_library() is None,
                              reason="jemalloc is not installed here (apt install libjemalloc2)")


def _probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LITE_FT_RESTARTED", "LD_PRELOAD",
                                                               allocator.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True, timeout=60)
    return out.stdout.split("\n")[:-1]


@glibc
def test_the_command_restarts_itself_once_with_huge_pages_without_jemalloc() -> None:
    first, second, ran = _probe(LITE_FT_ALLOCATOR="glibc-tuned")
    assert first.split()[1:] == ["None", "None"]
    assert second.split()[0] == first.split()[0]  # exec: the same process
    assert allocator.HUGE_PAGES in second.split()[1].split(":") and second.split()[2] == "None"
    assert ran.startswith("ran False glibc mmap threshold 4 MiB, transparent huge pages")  # and then goes on


@glibc
@jemalloc
def test_the_command_restarts_itself_once_with_jemalloc_where_the_system_has_it() -> None:
    first, second, ran = _probe()  # auto
    assert second.split()[0] == first.split()[0]
    assert second.split()[1:] == ["None", allocator.jemalloc_library()]
    # mapped into the process: allocating through it, started with lite-ft's settings
    assert ran.startswith("ran True jemalloc, dirty decay 10000 ms, purged pages marked free")
    assert _probe(MALLOC_CONF="dirty_decay_ms:5000")[2] == "ran True jemalloc, dirty decay 5000 ms"  # the user's


@glibc
def test_no_restart_when_opted_out_already_set_or_another_allocator_preloaded() -> None:
    assert len(_probe(LITE_FT_ALLOCATOR="glibc")) == 2
    kept = _probe(LITE_FT_ALLOCATOR="glibc-tuned", GLIBC_TUNABLES=f"glibc.malloc.arena_max=2:{allocator.HUGE_PAGES}")
    assert len(kept) == 2 and kept[0].split()[1] == f"glibc.malloc.arena_max=2:{allocator.HUGE_PAGES}"
    other = _probe(LD_PRELOAD="/nowhere/libtcmalloc_minimal.so.4")  # the loader warns and goes on without it
    assert len(other) == 2 and other[0].split()[2] == "/nowhere/libtcmalloc_minimal.so.4"


def test_what_the_run_will_get_and_a_missing_jemalloc_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(allocator, "_glibc_linux", lambda: True)
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: None)
    assert [allocator.run_allocator(r) for r in (False, True)] == ["mmap 4 MiB", "mmap 1 MiB"]
    monkeypatch.setenv(allocator.OPT_OUT, "jemalloc")
    with pytest.raises(SystemExit, match="apt install libjemalloc2"):
        allocator.restart_for_training()
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: "libjemalloc.so.2")
    monkeypatch.setenv(allocator.OPT_OUT, "auto")
    assert [allocator.run_allocator(r) for r in (False, True)] == ["jemalloc", "jemalloc, decay 0"]
    monkeypatch.setenv("LD_PRELOAD", "/opt/libfoo.so")  # not an allocator: the plan and the restart agree
    assert allocator.run_allocator(False) == "jemalloc"
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    assert allocator._restart_environment() == {"LD_PRELOAD": "libjemalloc.so.2:/opt/libfoo.so",
                                                "MALLOC_CONF": allocator.JEMALLOC_CONF}
    monkeypatch.setenv("MALLOC_CONF", "narenas:1")  # the user's settings stand
    assert allocator._restart_environment()["MALLOC_CONF"] == "narenas:1"
    monkeypatch.setenv("LD_PRELOAD", "/opt/libtcmalloc_minimal.so.4")
    assert allocator.run_allocator(False) == "preloaded" and allocator._restart_environment() == {}
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv(allocator.OPT_OUT, "glibc-tuned")
    assert allocator.run_allocator(False) == "mmap 4 MiB"
    monkeypatch.setenv(allocator.OPT_OUT, "glibc")
    assert allocator.run_allocator(False) == "glibc default"
    monkeypatch.setenv(allocator.OPT_OUT, "jemaloc")
    with pytest.raises(SystemExit, match="expected one of auto, jemalloc, glibc-tuned, glibc"):
        allocator.choice()


_DECAY = """
import ctypes
from lite_ft import allocator
said = allocator.configure(release_memory=True)
value, size = ctypes.c_ssize_t(-2), ctypes.c_size_t(ctypes.sizeof(ctypes.c_ssize_t))
mallctl = ctypes.CDLL(None).mallctl
read = [mallctl(name, ctypes.byref(value), ctypes.byref(size), None, 0) or value.value
        for name in (b"arena.0.dirty_decay_ms", b"arena.0.muzzy_decay_ms", b"arenas.dirty_decay_ms")]
print(said, "|", read, allocator.release_free_heap())
"""


@glibc
@jemalloc
def test_release_memory_under_jemalloc_returns_freed_pages_at_once() -> None:
    env = {**{k: v for k, v in os.environ.items() if k != allocator.OPT_OUT}, "LD_PRELOAD": allocator.jemalloc_library()}
    out = subprocess.run([sys.executable, "-c", _DECAY], env=env, capture_output=True, text=True, check=True,
                         timeout=60).stdout
    said, rest = out.split("|")
    assert said.strip() == "jemalloc, freed pages returned at once (decay 0)"
    assert rest.split() == ["[0,", "0,", "0]", "True"]  # jemalloc's own reading: no decay delay in any arena


_REFAULT = """
import resource, torch
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.empty(17 << 18); x.fill_(1); del x  # 17 MiB, the size of a SmolLM2 MLP activation of batch 8 x 384
before = faults()
for _ in range(5):
    x = torch.empty(17 << 18); x.fill_(1); del x
print((faults() - before) // 5)
"""


@glibc
@jemalloc
def test_jemalloc_as_started_reuses_a_freed_large_block_without_faulting_it_in() -> None:
    """Under the restart's MALLOC_CONF a 17 MiB block freed and allocated again is not faulted in anew (with
    jemalloc's own settings here every one of its 4,352 pages is, each time)."""
    clean = {k: v for k, v in os.environ.items() if k not in (allocator.OPT_OUT, "MALLOC_CONF", "LD_PRELOAD")}
    env = {**clean, "LD_PRELOAD": allocator.jemalloc_library(), "MALLOC_CONF": allocator.JEMALLOC_CONF}
    out = subprocess.run([sys.executable, "-c", _REFAULT], env=env, capture_output=True, text=True, check=True,
                         timeout=60).stdout
    assert int(out) < 100
