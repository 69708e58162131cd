"""Memory by phase (load, first forward, ..., save), in MiB.

CPU: resident set size of the process, sampled by a background thread every few milliseconds so a step's peak is
caught. CUDA: the caching allocator's allocated / reserved / peak figures, with the peak reset at each phase.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import torch

MIB = 1024 * 1024


class MemoryMonitor:
    """Records the peak memory of each named phase; `phases` maps phase name -> figures in MiB."""

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self.device = device
        self.interval_s = interval_s
        self.source = "cuda_allocator" if device.type == "cuda" else "process_rss"
        self.phases: dict[str, dict[str, float]] = {}
        self._proc = psutil.Process()
        self._peak_rss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MemoryMonitor:
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="lite-ft-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak_rss = max(self._peak_rss, self._proc.memory_info().rss)
            time.sleep(self.interval_s)

    def current_mib(self) -> float:
        """Memory in use now: allocated tensors on CUDA, resident set size on the CPU."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / MIB
        return self._proc.memory_info().rss / MIB

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Measure the peak inside the block; a phase entered twice keeps its highest peak."""
        rss = self._proc.memory_info().rss
        self._peak_rss = rss
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            figures = {"rss_peak_mib": max(self._peak_rss, self._proc.memory_info().rss) / MIB,
                       "rss_end_mib": self._proc.memory_info().rss / MIB}
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                figures.update(allocated_mib=torch.cuda.memory_allocated(self.device) / MIB,
                               reserved_mib=torch.cuda.memory_reserved(self.device) / MIB,
                               peak_mib=torch.cuda.max_memory_allocated(self.device) / MIB)
            else:
                figures["peak_mib"] = figures["rss_peak_mib"]
            old = self.phases.get(name)
            if old is None or figures["peak_mib"] >= old["peak_mib"]:
                self.phases[name] = figures

    def peak(self) -> tuple[float, str]:
        """The highest peak over all phases, in MiB, and the phase where it occurred."""
        if not self.phases:
            return self.current_mib(), "none"
        name = max(self.phases, key=lambda n: self.phases[n]["peak_mib"])
        return self.phases[name]["peak_mib"], name

    def report(self) -> dict[str, Any]:
        peak, where = self.peak()
        return {"source": self.source, "unit": "MiB", "peak_mib": peak, "peak_phase": where, "phases": self.phases}
