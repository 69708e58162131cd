"""The two figures model FLOPs utilization needs, measured on this machine, in one process:

- the matmul peak: best of several timed torch.mm on square fp32 matrices, torch's default thread count, and in
  bf16 too on CPUs that compute it in hardware (AMX / AVX512-BF16; elsewhere it would take minutes);
- model FLOPs per real token for full fine-tuning and LoRA: torch.utils.flop_counter.FlopCounterMode around one
  forward + backward of lite-ft's own loss (lite_ft.training.loss.batch_loss) on one real example, unpadded (the
  median-length example of lite-ft's first training batch), divided by its tokens, on the reference path: peft's own
  LoRA layers (train.fused_lora off) and PyTorch's SDPA as the attention. QLoRA does the same model work as LoRA
  (dequantizing the 4-bit weights is overhead, not model FLOPs), so it uses the LoRA figure.

It also reports the real tokens of lite-ft's first steps and the fingerprint of lite-ft's LoRA initialisation, which
the TRL reference must reproduce.
Run: python benchmarks/flops.py --steps N --override data.train=... [--out FILE] (or --peak-only)
"""
from __future__ import annotations

import argparse
import gc
import time
from typing import Any

import torch
from bench_common import (
    RECIPE,
    adapter_fingerprint,
    emit,
    encode_training_data,
    quiet_libraries,
    step_tokens,
)


def matmul_peak(sizes: tuple[int, ...] = (2048, 4096), repeats: int = 5,
                dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """GFLOP/s of torch.mm in `dtype` (2*n^3 FLOPs per product), best of `repeats` after one warm-up, per size."""
    by_size = {}
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)  # warm-up: thread pool start, page faults on the output
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        by_size[str(n)] = 2 * n**3 / best / 1e9
    return {"gflops": max(by_size.values()), "gflops_by_size": by_size, "threads": torch.get_num_threads(),
            "repeats": repeats}


def count_flops(recipe: Any, examples: list[dict[str, list[int]]]) -> dict[str, Any]:
    """Build the recipe's model as `lite-ft run` does (seed first) and count the FLOPs of one forward + backward of
    lite-ft's loss per example, each alone and unpadded. Counting runs the real computation, about twice as slow
    as without the counter, so callers pass one example."""
    from torch.utils.flop_counter import FlopCounterMode

    from lite_ft.data.batching import collate
    from lite_ft.training.loss import batch_loss
    from lite_ft.model import build, count_params
    from lite_ft.training.loop import set_seed

    set_seed(recipe.train.seed)  # as lite_ft.run does before build: the LoRA init depends on it
    built = build(recipe)
    model = built.model
    fingerprint = adapter_fingerprint(model) if recipe.method != "full" else None
    model.train()
    flops = tokens = 0
    for example in examples:
        batch = collate([example], built.tokenizer.pad_token_id, causal=True)
        with FlopCounterMode(display=False) as counter:
            loss, _ = batch_loss(model, batch, causal=True)
            loss.backward()
        flops += counter.get_total_flops()
        tokens += len(example["input_ids"])
        model.zero_grad(set_to_none=True)
    trainable, total = count_params(model)
    del built, model
    gc.collect()
    return {"flops_per_token": flops / tokens, "examples": len(examples), "tokens": tokens,
            "trainable_params": trainable, "total_params": total, "adapter_fingerprint": fingerprint}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--override", action="append", default=[], help="recipe override (section.key=value)")
    parser.add_argument("--steps", type=int, default=0, help="steps whose real tokens to report")
    parser.add_argument("--peak-only", action="store_true", help="measure the matmul peak only")
    parser.add_argument("--out", default=None, help="write the JSON result here instead of stdout")
    args = parser.parse_args()
    quiet_libraries()
    from lite_ft.recipe.load import load_recipe

    from lite_ft.recipe.precision import cpu_computes_bf16

    peak = {"matmul_peak": matmul_peak()}  # first, before any model is in memory
    if cpu_computes_bf16():
        peak["matmul_peak_bf16"] = matmul_peak(dtype=torch.bfloat16)
    if args.peak_only:
        return emit(peak, args.out)
    lora = load_recipe(RECIPE, [*args.override, "method=lora"])
    data = encode_training_data(lora)
    first_batch = sorted((data.examples[i] for i in data.batches[0]), key=lambda e: len(e["input_ids"]))
    example = first_batch[len(first_batch) // 2]
    result: dict[str, Any] = {**peak, "step_tokens": step_tokens(data, args.steps),
                              "flops_example": "the median-length example of lite-ft's first training batch, unpadded"}
    del data
    for method in ("lora", "full"):
        # the model's work, not an implementation's. The fused blocks accumulate products in place (addmm_), which
        # FlopCounterMode does not count: 0.380 instead of 0.455 GFLOP a token for LoRA, an MFU a sixth too low
        # until 2026-12-07. lite-ft's attention kernel recomputes the weights in backward and skips blocks the causal
        # mask hides: not the model's work either.
        recipe = load_recipe(RECIPE, [*args.override, f"method={method}", "model.attention=sdpa",
                                      "train.fused_lora=false"])
        result[method] = count_flops(recipe, [example])
    emit(result, args.out)


if __name__ == "__main__":
    main()
