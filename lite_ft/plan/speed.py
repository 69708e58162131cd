"""Seconds per step on this CPU: the replay's ops timed on this machine (lite_ft.plan.op_times) for the longest
micro-batch, scaled to each step's tokens, times a measured factor for what isolated op timings miss
(STEP_OVERHEAD), plus the update (clipping and the optimizer step, timed on the trainable parameters' shapes).
The fp32 matmul rate at the model's shape, measured once and cached under ~/.cache/lite-ft/plan/, is what MFU
figures are given against.
"""
from __future__ import annotations

import json
import platform
import time
from typing import Any

import torch

from lite_ft import allocator
from lite_ft.plan.activations import Shape, Transient
from lite_ft.plan.batches import Batches
from lite_ft.plan.op_times import OpTimes, update_seconds
from lite_ft.sources.catalog import cache_dir

# A training step's measured seconds, less its timed update, over the sum of its ops' timings with cold caches
# (lite_ft.plan.op_times), per method: page faults of fresh mappings, the autograd engine and Python between ops, and
# what cold timings overstate (an op's input often is still in cache from the op before). Fitted by
# benchmarks/plan_calibrate.py on the plan grid (benchmarks/results/plan-cpu/calibration*.md).
# lite-ft's glibc setup: fitted 2026-12-07 18:58 UTC on the same machine (LITE_FT_ALLOCATOR=glibc-tuned), one run per
# calibration row. Larger, and more spread (0.94-2.80 over the rows), than jemalloc's: the step's large outputs are
# fresh mappings whose pages fault in on first touch, more of them in a real step than in one op timed alone
STEP_OVERHEAD = {"full": 1.32, "lora": 1.33, "qlora": 1.49, "lora-8bit": 1.38}
# under jemalloc as lite-ft starts it (lite_ft.allocator.JEMALLOC_CONF), with the fused layers' own attention: the
# median over the calibration rows (one or two runs each), fitted 2026-12-07 20:47 UTC on a 2-core AMD EPYC with
# AVX512-BF16. Under 1: the steps fault almost no pages in, and cold timings overstate what a warm step pays (under
# jemalloc's own settings, which faulted every block over 8 MiB in anew: 0.91-1.12). The LoRA rows spread from 0.70
# (batch 8 x 357) to 0.87 (32 x 56); small micro-batches pay more per op than one factor says
STEP_OVERHEAD_JEMALLOC = {"full": 0.82, "lora": 0.72, "qlora": 1.06, "lora-8bit": 0.97}
# tokens/s with train.release_memory against the default (fresh pages for more tensors): the plan grid's
# lora-release-b8-l384 against lora-b8-l384 (benchmarks/results/plan-cpu), under the glibc setup (mmap threshold 1
# against 4 MiB) and under jemalloc (decay 0 against lite-ft's settings: 11.30 against 6.75 s/step)
RELEASE_SPEED = 0.91
RELEASE_SPEED_JEMALLOC = 0.60


def release_slowdown(release_memory: bool, allocator: str) -> float:
    """How many times longer a step takes with train.release_memory under `allocator` (a name from
    predict.allocator_model: jemalloc's, with or without ", decay 0", or glibc's)."""
    if not release_memory:
        return 1.0
    return 1 / (RELEASE_SPEED_JEMALLOC if allocator.startswith("jemalloc") else RELEASE_SPEED)


def machine_key() -> str:
    """This machine, its thread count and torch version: what measured rates and op times are cached by."""
    return f"{platform.node()}|{platform.processor() or platform.machine()}|{torch.get_num_threads()}|{torch.__version__}"


def matmul_gflops(m: int = 2048, k: int = 2048, n: int = 2048, repeats: int = 3) -> dict[str, Any]:
    """fp32 GFLOP/s of torch.mm of (m x k) @ (k x n) on this machine, best of `repeats` (2*m*k*n FLOPs each),
    measured on first use (well under a second at a model's shapes) and cached per machine, thread count, torch
    version and shape: small models run small matmuls, which reach a smaller share of the machine's peak."""
    path = cache_dir() / "plan" / "matmul.json"
    cached = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    key = f"{machine_key()}|{m}x{k}x{n}"
    if key in cached:
        return {**cached[key], "cached": str(path)}
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)  # warm-up: thread pool, page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    figure = {"gflops": 2 * m * k * n / best / 1e9, "shape": [m, k, n], "threads": torch.get_num_threads(),
              "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    cached[key] = figure
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cached, indent=2), encoding="utf-8")
    return {**figure, "cached": str(path)}


def model_shape(config: Any, tokens: int) -> tuple[int, int, int]:
    """The matmul that stands for a model's work: (tokens of a micro-batch, capped) x hidden -> MLP width."""
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0) or 1024)
    width = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    return min(max(tokens, 64), 4096), hidden, width


def method_name(method: str, quantization: str | None) -> str:
    return "lora-8bit" if method == "lora" and quantization == "8bit" else method


def step_seconds(compute_seconds: float, compute_fixed_seconds: float, update_seconds: float, method: str,
                 release_memory: bool, allocator: str = "mmap 4 MiB") -> tuple[float, float]:
    """Predicted seconds of one optimizer step on this CPU as (the part that grows with the step's tokens, the
    fixed part): its ops' timed seconds (of which `compute_fixed_seconds` do not grow with the tokens) times
    STEP_OVERHEAD (jemalloc's own factors where it is the allocator lite_ft.plan.predict.allocator_model names),
    and the timed update."""
    overhead = (STEP_OVERHEAD_JEMALLOC if allocator.startswith("jemalloc") else STEP_OVERHEAD)[method]
    release = release_slowdown(release_memory, allocator)  # train.release_memory slows every part of a step
    tokens = (compute_seconds - compute_fixed_seconds) * overhead * release
    return tokens, (compute_fixed_seconds * overhead + update_seconds) * release


def step_time(longest: tuple[Shape, Transient], typical: tuple[Shape, Transient] | None, batches: Batches,
              trainable_shapes: list[tuple[int, ...]], optimizer: str) -> dict[str, Any]:
    """Seconds of a mean step's ops, timed on this machine (op_times), and of the update (clipping, optimizer).
    The ops' time of a micro-batch is a fixed part plus a part linear in its tokens, from the longest micro-batch
    and a typical one (Batches.typical); with no typical one, proportional to the tokens, as the FLOPs."""
    table = OpTimes(f"{machine_key()}|{allocator.run_allocator(False)}")  # ops are timed under the run's allocator
    shape, transient = longest
    big, untimed = table.seconds(transient.ops)
    n_big = shape.rows * shape.width
    per_token, fixed = big / max(n_big, 1), 0.0
    if typical is not None:
        small, n_small = table.seconds(typical[1].ops)[0], typical[0].rows * typical[0].width
        slope = (big - small) / (n_big - n_small)
        if slope > 0 and big - slope * n_big >= 0:  # else timing noise: keep the proportional estimate
            per_token, fixed = slope, big - slope * n_big
    update = update_seconds(trainable_shapes, optimizer, table)
    table.save()
    compute_fixed = fixed * batches.micro_batches / batches.steps
    compute = per_token * batches.padded_tokens / batches.steps + compute_fixed
    return {"compute_seconds": compute, "compute_fixed_seconds": compute_fixed, "update_seconds": update,
            "untimed_ops": untimed, "ops_measured_now": table.measured}
