"""Seconds per step from FLOPs: the model's FLOPs per step (counted in the meta replay) over this machine's fp32
matmul rate, measured once and cached under ~/.cache/lite-ft/plan/, times the share of that rate a training step
reaches (calibrated, see EFFICIENCY).
"""
from __future__ import annotations

import json
import platform
import time
from typing import Any

import torch

from lite_ft.sources.catalog import cache_dir

# Share of the torch.mm rate that a training step reaches on the CPU, per method: measured on SmolLM2-135M
# (benchmarks/results/plan-cpu/calibration.md, by benchmarks/plan_calibrate.py). QLoRA and 8-bit dequantize their weights in every forward and
# backward (work the FLOP count does not see); gradient checkpointing's recomputation is in the FLOP count.
EFFICIENCY = {"full": 0.67, "lora": 0.24, "qlora": 0.55, "lora-8bit": 0.69}  # fitted 2026-12-02 on a 2-core Xeon
# with AMX (fp32 matmul ~430 GFLOP/s at the model's shape); on a 2-core AVX2 machine the same fit gave 0.62 / 0.48
# / 0.52 / 0.57: the share depends on the CPU, so seconds per step are this machine's figure, not a law
RELEASE_SPEED = 0.91  # tokens/s with train.release_memory against the default (fresh pages for more tensors): the
# plan grid's lora-release-b8-l384 against lora-b8-l384 (benchmarks/results/plan-cpu)


def _key() -> str:
    return f"{platform.node()}|{platform.processor() or platform.machine()}|{torch.get_num_threads()}|{torch.__version__}"


def matmul_gflops(m: int = 2048, k: int = 2048, n: int = 2048, repeats: int = 3) -> dict[str, Any]:
    """fp32 GFLOP/s of torch.mm of (m x k) @ (k x n) on this machine, best of `repeats` (2*m*k*n FLOPs each),
    measured on first use (well under a second at a model's shapes) and cached per machine, thread count, torch
    version and shape: small models run small matmuls, which reach a smaller share of the machine's peak."""
    path = cache_dir() / "plan" / "matmul.json"
    cached = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    key = f"{_key()}|{m}x{k}x{n}"
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


def seconds_per_step(flops_per_step: float, gflops: float, method: str, release_memory: bool) -> float:
    """Predicted seconds of one optimizer step on this CPU."""
    seconds = flops_per_step / (gflops * 1e9 * EFFICIENCY[method])
    return seconds / RELEASE_SPEED if release_memory else seconds
