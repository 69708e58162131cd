"""Memory by phase (load, first forward, ..., save), in MiB, and a breakdown of the training peak.

CPU: resident set size of the process, sampled by a background thread every few milliseconds so a step's peak is
caught. CUDA: the caching allocator's allocated / reserved / peak figures, with the peak reset at each phase.
The breakdown comes from PyTorch itself: the bytes of the weights (by dtype, quantized or not), the trainable
parameters, their gradients and the optimizer state; what the peak holds beyond those is activations and workspace.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import torch

MIB = 1024 * 1024


class MemoryMonitor:
    """Records the peak memory of each named phase; `phases` maps phase name -> figures in MiB."""

    def __init__(self, device: torch.device, interval_s: float = 0.005, snapshot: Path | None = None) -> None:
        self.device = device
        self.interval_s = interval_s
        self.source = "cuda_allocator" if device.type == "cuda" else "process_rss"
        self.phases: dict[str, dict[str, float]] = {}
        self.tensors: dict[str, Any] | None = None  # set once by record_tensors, during the first optimizer step
        self.notes: list[str] = []
        self.snapshot = snapshot
        self.baseline_mib = 0.0  # memory in use before the model: interpreter, libraries (CPU); 0 on CUDA
        self._proc = psutil.Process()
        self._peak_rss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MemoryMonitor:
        self.baseline_mib = 0.0 if self.device.type == "cuda" else self.current_mib()
        if self.snapshot is not None:
            self._start_snapshot()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="lite-ft-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.snapshot is not None and self.device.type == "cuda":
            self.snapshot.parent.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(self.snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)

    def _start_snapshot(self) -> None:
        if self.device.type != "cuda":
            self.notes.append("train.memory_snapshot needs CUDA (PyTorch records allocator history only there); "
                              "no snapshot was written")
            return
        torch.cuda.memory._record_memory_history(max_entries=200_000)  # ~100 MB of host memory at most

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

    def record_tensors(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Measure weights, gradients and optimizer state; call after optimizer.step(), before zero_grad()."""
        self.tensors = tensor_bytes(model, optimizer)

    def breakdown(self) -> dict[str, Any] | None:
        """What the training peak is made of, in MiB; None before record_tensors. The parts add up to the peak."""
        training = [self.phases[n] for n in TRAINING_PHASES if n in self.phases]
        if self.tensors is None or not training:
            return None
        peak = max(f["peak_mib"] for f in training)
        t = self.tensors
        parts = {"runtime": self.baseline_mib, **{f"weights ({k})": v for k, v in t["frozen_weights"].items()},
                 "trainable parameters": t["trainable"], "gradients": t["gradients"],
                 "optimizer state": t["optimizer"]}
        known = sum(parts.values())
        parts["activations and workspace"] = max(peak - known, 0.0)
        result = {"peak_mib": peak, "parts_mib": parts, "trainable_dtype": t["trainable_dtype"],
                  "sources": {"runtime": f"{self.source} before the model was loaded",
                              "activations and workspace": f"{self.source} peak minus the other parts",
                              "other parts": "PyTorch tensor sizes (bytes of each distinct storage)"}}
        if known > peak:  # a part not resident when sampled (e.g. weights still memory-mapped): say so, do not hide
            result["note"] = (f"the measured parts ({known:.0f} MiB) exceed the sampled peak ({peak:.0f} MiB); "
                              "some weights were not resident in memory when the peak was sampled")
        return result

    def report(self) -> dict[str, Any]:
        peak, where = self.peak()
        report = {"source": self.source, "unit": "MiB", "peak_mib": peak, "peak_phase": where,
                  "baseline_mib": self.baseline_mib, "phases": self.phases, "breakdown": self.breakdown()}
        if self.snapshot is not None and self.device.type == "cuda":
            report["snapshot"] = str(self.snapshot)
        if self.notes:
            report["notes"] = self.notes
        return report


TRAINING_PHASES = ("first_forward", "first_backward", "optimizer_step", "steady_state")


class StepPhases:
    """The memory phases of one optimizer step, in one place: the first step of a session measures its forward,
    backward and optimizer parts as phases of their own; every later step is measured whole as steady_state."""

    def __init__(self, monitor: MemoryMonitor, first: bool) -> None:
        self.monitor = monitor
        self.first = first
        self.current = "first_forward" if first else "steady_state"  # for out-of-memory messages
        self._steady: Any = None

    def __enter__(self) -> StepPhases:
        if not self.first:
            self._steady = self.monitor.phase("steady_state")
            self._steady.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._steady is not None:
            self._steady.__exit__(*exc)

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """`name` (first_forward, first_backward, optimizer_step) as its own phase on the first step only."""
        if self.first:
            self.current = name
            with self.monitor.phase(name):
                yield
        else:
            yield


def _weight_kind(param: torch.Tensor) -> str:
    """`4-bit nf4`, `8-bit` for bitsandbytes' quantized parameters, else the dtype (`float32`, ...)."""
    cls = type(param).__name__
    if cls == "Params4bit":
        state = getattr(param, "quant_state", None)
        return f"4-bit {getattr(state, 'quant_type', '')}".strip()
    if cls == "Int8Params":
        return "8-bit"
    return str(param.dtype).replace("torch.", "")


def _side_tensors(param: torch.Tensor) -> list[torch.Tensor]:
    """Tensors a quantized parameter keeps beside its data: scales, codebooks (and their own nested state)."""
    found: list[torch.Tensor] = []
    states = [getattr(param, "quant_state", None)]
    while states:
        state = states.pop()
        if state is None:
            continue
        found += [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
        states.append(getattr(state, "state2", None))
    found += [getattr(param, name) for name in ("SCB", "CB") if isinstance(getattr(param, name, None), torch.Tensor)]
    return found


def tensor_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """MiB held by the model's frozen weights (by kind), trainable parameters, gradients and optimizer state.

    Each storage counts once: tied weights and views are not double-counted. Under FSDP a parameter counts with
    this process's shard.
    """
    seen: set[int] = set()

    def size(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t  # FSDP2's DTensor: the local shard is what is resident
        try:
            storage = t.untyped_storage()
            pointer = storage.data_ptr()
        except RuntimeError:  # an unsharded copy FSDP has already freed
            return 0
        if pointer in seen or storage.device.type == "meta":
            return 0
        seen.add(pointer)
        return storage.nbytes()

    frozen: dict[str, float] = {}
    trainable = grads = 0
    trainable_dtypes = set()
    for param in model.parameters():
        if param.requires_grad:
            trainable += size(param)
            trainable_dtypes.add(str(param.dtype).replace("torch.", ""))
            if param.grad is not None:
                grads += size(param.grad)
            continue
        kind = _weight_kind(param)
        frozen[kind] = frozen.get(kind, 0) + (size(param) + sum(size(t) for t in _side_tensors(param))) / MIB
    for module in model.modules():  # LLM.int8 layers move their row scales to module.state after a forward
        scb = getattr(getattr(module, "state", None), "SCB", None)
        if isinstance(scb, torch.Tensor):
            frozen["8-bit"] = frozen.get("8-bit", 0) + size(scb) / MIB
    for buffer in model.buffers():
        kind = str(buffer.dtype).replace("torch.", "")
        frozen[kind] = frozen.get(kind, 0) + size(buffer) / MIB
    state = 0
    if optimizer is not None:
        state = sum(size(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return {"frozen_weights": {k: v for k, v in frozen.items() if v > 0}, "trainable": trainable / MIB,
            "trainable_dtype": ",".join(sorted(trainable_dtypes)), "gradients": grads / MIB,
            "optimizer": state / MIB}


def describe_breakdown(breakdown: dict[str, Any] | None) -> str:
    """One line for the terminal: the parts of the training peak, largest first."""
    if not breakdown:
        return ""
    parts = sorted(breakdown["parts_mib"].items(), key=lambda kv: -kv[1])
    return (f"training peak {breakdown['peak_mib']:.0f} MiB = "
            + " + ".join(f"{name} {mib:.0f}" for name, mib in parts if mib >= 0.5))
