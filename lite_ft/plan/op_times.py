"""Seconds of a training step on this CPU, from the ops the meta replay runs.

The replay (lite_ft.plan.activations) sees every aten op a micro-batch's forward, loss and backward dispatch, with
the shapes, strides and dtypes of its arguments. Each distinct op is run here on real tensors of those shapes
(values that keep the arithmetic finite: floats in [0.5, 1), integers 0, masks true) and timed; the times are
cached per machine, thread count and torch version under ~/.cache/lite-ft/plan/op_times.json, so a plan measures
only the shapes it has not seen. A micro-batch's compute time is the sum over its ops; the optimizer step is timed
the same way on tensors of the trainable parameters' sizes.

Why ops and not FLOPs over one matmul rate: a step's time is not proportional to its FLOPs. A small micro-batch's
matmuls reach a smaller share of the machine's peak, MiniLM's are smaller still, and element-wise work (norms,
rotary embeddings, SiLU, dequantizing 4- and 8-bit weights, the optimizer) costs time the FLOP count does not see.
What isolated timings still miss (page faults of fresh mappings, caches shared with other ops, the autograd
engine's own work) is one measured factor, lite_ft.plan.speed.STEP_OVERHEAD.
"""
from __future__ import annotations

import functools
import json
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from lite_ft import allocator
from lite_ft.sources.catalog import cache_dir

Signature = tuple[Any, ...]  # (op name, argument specs, keyword specs): hashable, and a JSON key through repr()
REPEATS = 5  # timed runs per op after one warm-up; the median is kept (single runs vary by 10-20% here)
SKIP = {"aten.detach.default", "aten.view.default", "aten._unsafe_view.default", "aten.t.default",
        "aten.expand.default", "aten.alias.default", "aten.as_strided.default", "aten.slice.Tensor",
        "aten.select.int", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.permute.default",
        "aten.transpose.int", "aten.split.Tensor", "aten.split_with_sizes.default"}  # views: no work, no time


def _spec(x: Any) -> Any:
    """A hashable description of one op argument, from which an equivalent CPU argument can be made."""
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), tuple(x.stride()), str(x.dtype).replace("torch.", ""))
    if isinstance(x, torch.device):
        return ("D",)
    if isinstance(x, (torch.dtype, torch.layout, torch.memory_format)):
        return ("E", str(x).replace("torch.", ""))
    if isinstance(x, (list, tuple)):
        return ("L", tuple(_spec(v) for v in x))
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return ("?", type(x).__name__)  # not reproducible: the op is not timed


def _make(spec: Any, device: str = "cpu") -> Any:
    """The argument a spec stands for, on `device` (CPU: filled; meta: shapes only); raises ValueError for one that
    cannot be made."""
    if not isinstance(spec, tuple):
        return spec
    kind = spec[0]
    if kind == "T":
        _, shape, stride, dtype = spec
        # the storage the view reaches, filled, then viewed: expanded arguments (stride 0) overlap themselves
        size = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if all(shape) else 0
        base = torch.empty(size, dtype=getattr(torch, dtype), device=device)
        if device == "meta":
            return base.as_strided(shape, stride)
        if base.is_floating_point():
            base.uniform_(0.5, 1.0)
        else:
            base.fill_(True) if base.dtype == torch.bool else base.zero_()
        return base.as_strided(shape, stride)
    if kind == "D":
        return torch.device(device)
    if kind == "E":
        return getattr(torch, spec[1])
    if kind == "L":
        return [_make(v, device) for v in spec[1]]
    raise ValueError(f"cannot make an argument of kind {spec[1]}")


class OpTrace(TorchDispatchMode):
    """Counts the distinct ops dispatched inside the block, by signature (view ops left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[Signature] = Counter()
        self.ops: dict[Signature, Callable[..., Any]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name not in SKIP:
            sig = (name, tuple(_spec(a) for a in args), tuple(sorted((k, _spec(v)) for k, v in (kwargs or {}).items())))
            self.counts[sig] += 1
            self.ops[sig] = func
        return out

    def flops(self) -> float:
        """FLOPs of the traced ops by torch's own formulas (torch.utils.flop_counter), worked out on meta tensors.
        Not FlopCounterMode around the replay: its module tracking keeps a checkpointed layer's recomputed
        tensors alive until the backward ends, so the replay would count a peak the real run never has."""
        total = 0
        for sig, count in self.counts.items():
            formula = flop_registry.get(self.ops[sig]._overloadpacket)
            if formula is None:
                continue
            args = [_make(s, "meta") for s in sig[1]]
            kwargs = {k: _make(s, "meta") for k, s in sig[2]}
            total += count * formula(*args, **kwargs, out_val=self.ops[sig](*args, **kwargs))
        return float(total)


def _time(func: Callable[..., Any], sig: Signature) -> float | None:
    """Median seconds of one call of the op on CPU tensors of its shapes; None if it cannot run here."""
    try:
        args = [_make(s) for s in sig[1]]
        kwargs = {k: _make(s) for k, s in sig[2]}
        mask = kwargs.get("attn_mask")
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and args:
            # the replay hands the fused CPU attention kernel transformers' boolean mask; the real call gets it as
            # an additive mask in the query's dtype (scaled_dot_product_attention converts it), so time that
            kwargs["attn_mask"] = torch.zeros(mask.shape, dtype=args[0].dtype)
        return _median_seconds(lambda: func(*args, **kwargs))
    except (RuntimeError, ValueError, TypeError, NotImplementedError, IndexError):
        return None


def _median_seconds(call: Callable[[], Any]) -> float:
    """Median seconds of `call` over REPEATS runs after one untimed run (first-touch page faults, kernel selection,
    an optimizer's state)."""
    call()
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@functools.cache
def _run_allocator() -> None:
    """Time ops under the allocator a run has (lite_ft.allocator; the `lite-ft` command preloads jemalloc for the plan
    as for the run): under glibc, large outputs are fresh mappings whose first touch faults pages in, as in the run
    (train.release_memory's extra cost is RELEASE_SPEED). Once a process, and
    only when something is measured: a plan whose times are all cached leaves the process's allocator alone."""
    allocator.configure(release_memory=False)


class OpTimes:
    """Measured seconds per op signature on this machine, read from and written back to the cache file."""

    def __init__(self, machine: str) -> None:
        self.path = cache_dir() / "plan" / "op_times.json"
        self.machine = machine
        stored = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        self.table: dict[str, float | None] = stored.get(machine, {})
        self.measured = 0

    def seconds(self, trace: OpTrace) -> tuple[float, int]:
        """Summed seconds of every op in the trace, and how many of its op calls could not be timed."""
        total, untimed = 0.0, 0
        for sig, count in trace.counts.items():
            seconds = self.lookup(repr(sig), lambda: _time(trace.ops[sig], sig))
            if seconds is None:
                untimed += count
            else:
                total += count * seconds
        return total, untimed

    def lookup(self, key: str, measure: Callable[[], float | None]) -> float | None:
        """The cached seconds for `key`, measured now (and counted in `measured`) when not cached yet."""
        if key not in self.table:
            _run_allocator()
            self.table[key] = measure()
            self.measured += 1
        return self.table[key]

    def save(self) -> None:
        if not self.measured:
            return
        stored = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        stored[self.machine] = {**stored.get(self.machine, {}), **self.table}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stored), encoding="utf-8")
        tmp.replace(self.path)  # atomic: two plans at once never leave half a file


def optimizer_seconds(shapes: Iterable[tuple[int, ...]], optimizer: str, table: OpTimes) -> float:
    """Seconds of one optimizer step over trainable parameters of these shapes: the step timed on one tensor of
    each distinct shape (capped at 2**22 values, scaled by the values beyond: the update is linear in them)."""
    total = 0.0
    for shape, count in Counter(tuple(s) for s in shapes).items():
        numel = math.prod(shape)
        timed = min(numel, 1 << 22)
        measured = (timed,) if timed < numel else shape
        seconds = table.lookup(repr(("optimizer", optimizer, timed if timed < numel else shape)),
                               lambda: _optimizer_step(optimizer, measured))
        total += count * (seconds or 0.0) * numel / timed
    return total


def _optimizer_step(optimizer: str, shape: tuple[int, ...]) -> float | None:
    """Median seconds of one AdamW (torch) or 8-bit AdamW (bitsandbytes) step on one parameter of `shape`."""
    p = torch.nn.Parameter(torch.rand(shape))
    p.grad = torch.rand(shape)
    if optimizer == "adamw8bit":
        import bitsandbytes as bnb  # only for 8-bit AdamW plans; a heavy import

        opt = bnb.optim.AdamW8bit([p], lr=1e-4)
    else:
        opt = torch.optim.AdamW([p], lr=1e-4)
    return _median_seconds(opt.step)  # the untimed first step creates the state: not part of a steady step
