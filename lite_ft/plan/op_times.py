"""Seconds of a training step on this CPU, from the ops the meta replay runs.

The replay (lite_ft.plan.activations) sees every aten op a micro-batch's forward, loss and backward dispatch, with
the shapes, strides and dtypes of its arguments. Each distinct op is run here on real tensors of those shapes
(values that keep the arithmetic finite: floats in [0.5, 1), integers 0, masks true) and timed with cold caches,
as a step runs it: a model's weights and a layer's activations are larger than the CPU's caches and come from
memory, where an op repeated on the same tensors would find them cached (MiniLM's full fine-tuning steps ran
1.4-2x their ops timed warm, 0.97-1.10x their ops timed cold; SmolLM2's 0.98-1.00x). The times are cached per machine,
thread count and torch version under ~/.cache/lite-ft/plan/op_times.json, so a plan measures only the shapes it has
not seen. A micro-batch's compute time is the sum over its ops (lite_ft.plan.predict fits a fixed part and a part
per token on two micro-batches); the update (gradient clipping and the optimizer step) is timed the same way on
tensors of the trainable parameters' own shapes.

Why ops and not FLOPs over one matmul rate: a step's time is not proportional to its FLOPs. A small micro-batch's
matmuls reach a smaller share of the machine's peak, MiniLM's are smaller still, and element-wise work (norms,
rotary embeddings, SiLU, dequantizing 4- and 8-bit weights, the optimizer) costs time the FLOP count does not see.
What isolated timings still miss (page faults of fresh mappings, the autograd engine's and Python's own work
between ops) is one measured factor, lite_ft.plan.speed.STEP_OVERHEAD.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from lite_ft import allocator
from lite_ft.sources.catalog import cache_dir

Signature = tuple[Any, ...]  # (op name, argument specs, keyword specs): hashable, and a JSON key through repr()
REPEATS = 5  # timed runs per op after one warm-up; the median is kept (single runs vary by 10-20% here)
TIMING = "cold caches"  # how the cached times were taken: part of their key, so older warm timings are not reused
UPDATE_VALUES = 1 << 25  # trainable values the update is timed on at most (4 fp32 copies: 512 MiB); a larger model
# is timed on a sample of its parameters and scaled by its values (the update's cost is linear in them)
SKIP = {"aten.detach.default", "aten.view.default", "aten._unsafe_view.default", "aten.t.default",
        "aten.expand.default", "aten.alias.default", "aten.as_strided.default", "aten.slice.Tensor",
        "aten.select.int", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.permute.default",
        "aten.transpose.int", "aten.split.Tensor", "aten.split_with_sizes.default"}  # views: no work, no time
# in-place matmuls do what their out-of-place forms do, but torch's FLOP registry (and FlopCounterMode) has no entry
# for them: the fused LoRA blocks accumulate products with addmm_, which would count 0
IN_PLACE_MATMULS = {torch.ops.aten.addmm_: torch.ops.aten.addmm, torch.ops.aten.baddbmm_: torch.ops.aten.baddbmm}


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
        tensors alive until the backward ends, so the replay would count a peak the real run never has. In-place
        matmuls count as their out-of-place forms (IN_PLACE_MATMULS), which FlopCounterMode misses."""
        total = 0
        for sig, count in self.counts.items():
            packet = self.ops[sig]._overloadpacket
            formula = flop_registry.get(IN_PLACE_MATMULS.get(packet, packet))
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
    an optimizer's state), each run with the CPU's caches emptied first (_flush_caches)."""
    call()
    times = []
    for _ in range(REPEATS):
        _flush_caches()
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@functools.cache
def _flush_buffer() -> torch.Tensor:
    """Twice the last-level cache this CPU reports (sysfs), 64 MiB where it reports none (twice most desktop and
    laptop L3s), 512 MiB at most."""
    size = 32 << 20
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()  # e.g. "32768K"
        size = int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1], 0)
    except (OSError, ValueError):
        pass
    return torch.empty(min(2 * size, 512 << 20) // 4, dtype=torch.float32)


def _flush_caches() -> None:
    """Write a buffer larger than the caches: what a timed op reads next comes from memory (~5 ms for 64 MiB)."""
    _flush_buffer().fill_(1.0)


@functools.cache
def _run_allocator() -> None:
    """Time ops under the allocator a run has (lite_ft.allocator; the `lite-ft` command preloads jemalloc for the plan
    as for the run): under glibc, large outputs are fresh mappings whose first touch faults pages in, as in the run
    (train.release_memory's extra cost is speed.release_slowdown). Once a process, and
    only when something is measured: a plan whose times are all cached leaves the process's allocator alone."""
    allocator.configure(release_memory=False)


class OpTimes:
    """Measured seconds per op signature on this machine, read from and written back to the cache file."""

    def __init__(self, machine: str) -> None:
        self.path = cache_dir() / "plan" / "op_times.json"
        self.machine = f"{machine}|{TIMING}"
        stored = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        self.table: dict[str, float | None] = stored.get(self.machine, {})
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


def update_seconds(shapes: list[tuple[int, ...]], optimizer: str, table: OpTimes) -> float:
    """Seconds of one update over trainable parameters of these shapes, as the training loop makes it: gradient
    clipping over all of them, then one AdamW (torch) or 8-bit AdamW (bitsandbytes) step. Timed on tensors of the
    real shapes, because per-tensor overheads and the tensors' sizes both count (SmolLM2's 420 LoRA matrices: 0.019 s
    in one step against 0.046 s summed over one-tensor steps; MiniLM's full update 0.065 s against 0.040 s for its
    shapes timed one at a time, warm); above UPDATE_VALUES on every k-th parameter, scaled by the values."""
    total = sum(math.prod(s) for s in shapes)
    if not total:
        return 0.0
    every = max(1, math.ceil(total / UPDATE_VALUES))
    timed = [s if math.prod(s) <= UPDATE_VALUES else (UPDATE_VALUES,) for s in shapes[::every]]
    digest = hashlib.sha1(repr(timed).encode()).hexdigest()[:16]  # a LoRA model has hundreds of shapes
    seconds = table.lookup(repr(("update", optimizer, len(timed), digest)), lambda: _update_step(optimizer, timed))
    return (seconds or 0.0) * total / sum(math.prod(s) for s in timed)


def _update_step(optimizer: str, shapes: list[tuple[int, ...]]) -> float | None:
    """Median seconds of clip_grad_norm_ and one optimizer step over parameters of `shapes` (the untimed first
    step creates the optimizer's state: not part of a steady step)."""
    params = [torch.nn.Parameter(torch.rand(shape)) for shape in shapes]
    for p in params:
        p.grad = torch.rand_like(p)
    if optimizer == "adamw8bit":
        import bitsandbytes as bnb  # only for 8-bit AdamW plans; a heavy import

        opt = bnb.optim.AdamW8bit(params, lr=1e-4)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4)

    def update() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return _median_seconds(update)
