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
          "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), flush=True); "
          "allocator.restart_with_huge_pages(); print('ran', flush=True)")


def _probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LITE_FT_RESTARTED",
                                                               allocator.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True, timeout=60)
    return out.stdout.split("\n")[:-1]


@glibc
def test_the_command_restarts_itself_once_with_huge_pages() -> None:
    first, second, ran = _probe()
    assert first.split()[1] == "None"
    assert second.split()[0] == first.split()[0]  # exec: the same process
    assert allocator.HUGE_PAGES in second.split()[1].split(":")
    assert ran == "ran"  # and then goes on


@glibc
def test_no_restart_when_opted_out_or_already_set() -> None:
    assert len(_probe(LITE_FT_ALLOCATOR="glibc")) == 2
    kept = _probe(GLIBC_TUNABLES=f"glibc.malloc.arena_max=2:{allocator.HUGE_PAGES}")
    assert len(kept) == 2 and kept[0].split()[1] == f"glibc.malloc.arena_max=2:{allocator.HUGE_PAGES}"
