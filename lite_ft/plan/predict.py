"""A run's peak memory and speed, predicted before any weights are loaded (`lite-ft plan`).

peak = runtime + frozen weights + trainable parameters + gradients + optimizer state + the largest micro-batch's
transient memory (activations kept for backward, then the output layer's and the backward's workspace), replayed on
the meta device for the longest micro-batch the run's data and seed produce. On the CPU the process's resident
memory also holds what glibc's heap keeps of freed activations (HEAP, calibrated); on CUDA the caching allocator's
reserve and the context (CUDA_CONTEXT_MIB, CUDA_RESERVE: assumptions, not measured on this machine).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

from lite_ft import allocator
from lite_ft.data.load import load_splits
from lite_ft.data.tasks import get_task
from lite_ft.model import load_tokenizer
from lite_ft.plan.activations import (
    Shape,
    Transient,
    measure,
    measure_eval,
    optimizer_transient_mib,
    scale_flops,
)
from lite_ft.plan.batches import Batches, encode_lengths, run_batches
from lite_ft.plan.parts import (
    MIB,
    MetaModel,
    build_meta,
    load_config,
    parameter_counts,
    static_parts,
)
from lite_ft.plan.speed import matmul_gflops, method_name, model_shape, step_seconds, step_time
from lite_ft.recipe.precision import precision_for
from lite_ft.recipe.schema import Recipe
from lite_ft.sources.resolve import resolve_source

# Resident memory of a micro-batch's transient tensors on the CPU against their live peak (which the replay counts),
# per allocator and method family, measured on this machine (benchmarks/results/plan-cpu/calibration*.md): HEAP x
# the transient peak, plus CHECKPOINTED x it with gradient checkpointing. Under lite-ft's glibc setup
# (lite_ft.allocator: mmap threshold 4 MiB, 1 MiB with train.release_memory) tensors from the threshold up get their
# own mappings; the smaller ones share glibc's heap, which keeps freed blocks, fragments, and holds on to what shorter
# micro-batches put there; a checkpointed step cycles each layer's recomputation through it (after one step of
# 8 x 162 tokens the heap held 1,027 MiB with 221 MiB in use, mallinfo2), so its factor is higher although the live
# peak is lower. The glibc-default row (threshold up to 32 MiB) is from before lite_ft.allocator, another machine.
# A best-fit simulation of the heap over the replay's allocation trace gave about half the measured excess, so the
# factors are measured. "quantized": QLoRA and LoRA over an 8-bit base. jemalloc (preloaded where the system has it)
# has no mmap threshold: its factor applies to the whole transient peak.
HEAP = {("glibc default", "full"): 0.78, ("glibc default", "adapters"): 1.84, ("glibc default", "quantized"): 1.84,
        ("mmap 4 MiB", "full"): 0.69, ("mmap 4 MiB", "adapters"): 1.40, ("mmap 4 MiB", "quantized"): 1.33,
        ("mmap 1 MiB", "full"): 1.0, ("mmap 1 MiB", "adapters"): 1.05, ("mmap 1 MiB", "quantized"): 1.0,
        ("jemalloc", "full"): 1.25, ("jemalloc", "adapters"): 1.13, ("jemalloc", "quantized"): 1.21,
        ("jemalloc, decay 0", "full"): 1.0, ("jemalloc, decay 0", "adapters"): 1.01,
        ("jemalloc, decay 0", "quantized"): 1.0, **{("preloaded", family): 1.0 for family in ("full", "adapters",
                                                                                             "quantized")}}
CHECKPOINTED = {**{key: 0.0 for key in HEAP}, ("mmap 4 MiB", "full"): 1.40, ("mmap 4 MiB", "adapters"): 0.65,
                ("jemalloc", "full"): 0.91, ("jemalloc", "adapters"): 0.25}
# Fitted on a 2-core AVX512-BF16 EPYC, one run per calibration row (1 MiB: adapters only; unmeasured rows neutral,
# "preloaded" too): glibc 2026-12-07 18:58 UTC; jemalloc 20:27 UTC, as lite-ft starts it (lite_ft.allocator.
# JEMALLOC_CONF: freed pages are kept longer than under jemalloc's own settings, so every factor is higher than
# those were: full 0.78, adapters 1.03, quantized 1.06, checkpointed 0.22 / 0.06).
CUDA_CONTEXT_MIB = 500.0  # CUDA context + cuBLAS workspace, typical of recent drivers; assumed, not measured here
CUDA_RESERVE = 1.05  # caching allocator: reserved over allocated at the peak; assumed, not measured here


@dataclass
class Context:
    """What planning reads once per recipe and reuses across the settings --budget tries."""

    path: str
    config: Any
    lengths: list[int] | None  # token lengths of the kept training examples; None: no tokenizer (config only)
    units: list[int] | None
    causal: bool
    num_labels: int | None
    runtime_mib: float
    eval_lengths: list[int] | None = None  # token lengths of the eval prompts (qa) or examples (classification)
    notes: list[str] = field(default_factory=list)
    cache: dict[Any, Any] = field(default_factory=dict)  # meta models and replays, by what they depend on


def prepare(recipe: Recipe) -> Context:
    """Resolve the model's config, load and encode the training data (tokenizer only), measure the runtime."""
    path = resolve_source(recipe.model.source, recipe.model.allow_pickle)
    config = load_config(path, recipe)
    task = get_task(recipe.task)
    notes: list[str] = []
    lengths = units = eval_lengths = None
    num_labels = None
    train_split, eval_split = load_splits(recipe, task)
    if recipe.task == "classification":
        num_labels = task.num_labels(recipe.data, train_split, eval_split)
    try:
        tokenizer = load_tokenizer(path, recipe)
    except (OSError, ValueError, TypeError) as exc:
        notes.append(f"no tokenizer in {path} ({type(exc).__name__}): every micro-batch is assumed "
                     f"data.max_length={recipe.data.max_length} tokens wide, fully labelled (an upper bound)")
    else:
        lengths, units = encode_lengths(task, train_split.examples, tokenizer, recipe, task.causal)
        eval_lengths = _eval_lengths(task, eval_split, tokenizer, recipe)
    if recipe.model.quantization in ("8bit", "4bit") or recipe.train.optimizer == "adamw8bit":
        import bitsandbytes  # noqa: F401  - the run imports it too; its libraries are part of the runtime
    runtime = psutil.Process().memory_info().rss / MIB
    return Context(path=path, config=config, lengths=lengths, units=units, causal=task.causal,
                   num_labels=num_labels, runtime_mib=runtime, eval_lengths=eval_lengths, notes=notes)


def _eval_lengths(task: Any, split: Any, tokenizer: Any, recipe: Recipe) -> list[int] | None:
    """Token lengths of what evaluation runs through the model: the prompts (qa, generation) or the encoded
    examples (classification); None for other tasks (their teacher-forced eval is a no-grad forward of training's
    own shapes, below the training peak) or without eval data."""
    if split is None or not split.examples or recipe.task not in ("qa", "classification"):
        return None
    if recipe.task == "qa":
        return [len(task.prompt(e, tokenizer, recipe)) for e in split.examples]
    return encode_lengths(task, split.examples, tokenizer, recipe, task.causal)[0] or None


def _batches(ctx: Context, recipe: Recipe) -> Batches:
    if ctx.lengths is not None:
        return run_batches(ctx.lengths, ctx.units or [], recipe.train)
    n = max(recipe.data.limit_train or 1000, 1)
    width = recipe.data.max_length
    return run_batches([width] * n, [width - 1 if ctx.causal else 1] * n, recipe.train)


def dtypes(recipe: Recipe, device: str) -> tuple[torch.dtype, torch.dtype, bool]:
    """(compute, weights, autocast) for `device`, as lite_ft.recipe.precision decides; a CUDA GPU that is not
    here is taken to support bf16."""
    if device == "cpu":
        p = precision_for(recipe, torch.device("cpu"))
        return p.compute, p.weights, p.autocast
    compute = torch.bfloat16 if recipe.model.dtype == "auto" else getattr(torch, recipe.model.dtype)
    half = compute in (torch.bfloat16, torch.float16)
    full = recipe.method == "full"
    return compute, torch.float32 if full else compute, full and half


def predict(recipe: Recipe, device: str = "cpu", gpu_memory_mib: float | None = None,
            ctx: Context | None = None, speed: bool = True) -> dict[str, Any]:
    """The plan of one recipe: peak (MiB), its parts, seconds per step, whether it fits (see the module doc).
    `speed` False skips the seconds (and the one-off matmul measurement they need)."""
    ctx = ctx or prepare(recipe)
    compute, weights, autocast = dtypes(recipe, device)
    batches = _batches(ctx, recipe)
    static = _meta(ctx, recipe, weights)
    parts = {"runtime": ctx.runtime_mib if device == "cpu" else CUDA_CONTEXT_MIB, **static_parts(static, recipe)}
    trainable, total = parameter_counts(static)
    replay_dtype = compute if autocast else weights
    worst = max((_transient(ctx, recipe, replay_dtype, s, device) for s in batches.worst()),
                key=lambda t: t[1].peak_mib)
    shape, transient = worst
    largest = max(p.numel() for p in static.model.parameters() if p.requires_grad)
    opt_temp = optimizer_transient_mib(trainable if device == "cuda" else largest, recipe.train.optimizer, device)
    parts["activations (kept for backward)"] = transient.activations_mib
    if device == "cuda":  # the caching allocator reuses the freed activations' blocks for the optimizer step
        parts["output layer, loss and backward workspace"] = max(transient.workspace_mib,
                                                                 opt_temp - transient.activations_mib)
    else:  # glibc keeps the activations' small chunks in its heap; the step's large temporaries are fresh mmaps
        parts["output layer, loss and backward workspace"] = transient.workspace_mib
        parts["optimizer step temporaries"] = opt_temp
    if autocast:
        parts["autocast weight copies"] = trainable * 2 / MIB  # 16-bit copies of the fp32 weights, kept for backward
    kind, threshold = allocator_model(recipe, device)
    in_heap = transient.small_peak_mib if threshold else transient.peak_mib
    if device == "cpu":  # what glibc keeps resident beyond the live peak (HEAP, CHECKPOINTED)
        parts[f"allocator ({kind})"] = resident_excess(recipe, kind, transient.peak_mib)
        if kind.startswith("jemalloc"):  # no mmap threshold: the update's temporaries reuse the memory the freed
            # activations leave resident (8-bit AdamW's 540 MiB on full fine-tuning were predicted on top: +14.7%)
            held = transient.peak_mib + parts[f"allocator ({kind})"]
            parts["optimizer step temporaries"] = max(0.0, opt_temp - held)
    peak = sum(parts.values())
    if device == "cuda":
        parts["allocator (cuda reserve)"] = (peak - CUDA_CONTEXT_MIB) * (CUDA_RESERVE - 1)
        peak = sum(parts.values())
    evaluation = _evaluation(ctx, recipe, replay_dtype, device, parts)
    training_peak, peak = peak, max(peak, evaluation["peak_mib"] if evaluation else 0.0)
    flops_step = scale_flops(transient.flops, shape, batches.padded_tokens) / batches.steps
    sps = tps = wall = rate = timing = None
    if device == "cpu" and speed:
        rate = matmul_gflops(*model_shape(ctx.config, shape.rows * shape.width))  # what MFU is given against
        typical = batches.typical()
        second = _transient(ctx, recipe, replay_dtype, typical, device) if typical else None
        trainable_shapes = [tuple(p.shape) for p in static.model.parameters() if p.requires_grad]
        timing = step_time((shape, transient), second, batches, trainable_shapes, recipe.train.optimizer)
        timing["token_seconds"], timing["fixed_seconds"] = step_seconds(
            timing["compute_seconds"], timing["compute_fixed_seconds"], timing["update_seconds"],
            method_name(recipe.method, recipe.model.quantization), recipe.train.release_memory, kind)
        sps = timing["token_seconds"] + timing["fixed_seconds"]
        tps = batches.real_tokens / batches.steps / sps
        wall = sps * batches.steps
    available = gpu_memory_mib if device == "cuda" and gpu_memory_mib else _available_mib(device)
    return {"device": device, "peak_mib": peak, "training_peak_mib": training_peak, "evaluation": evaluation,
            "peak_phase": "evaluation" if peak > training_peak else "training",
            "parts": parts, "seconds_per_step": sps, "tokens_per_second": tps,
            "wall_seconds_training": wall, "fits": None if available is None else peak <= available,
            "available_mib": available, "steps": batches.steps,
            "longest_micro_batch": {**dataclasses.asdict(shape), "first_at_step": batches.worst_step},
            "flops_per_step": flops_step, "matmul": rate, "step_time": timing, "trainable_params": trainable,
            "total_params": total,
            "dtypes": {"compute": str(compute).replace("torch.", ""), "weights": str(weights).replace("torch.", ""),
                       "autocast": autocast},
            "allocator": kind if device == "cpu" else "cuda caching allocator (reserve assumed)",
            "heap_mib": in_heap,
            "notes": list(ctx.notes)}


def _transient(ctx: Context, recipe: Recipe, dtype: torch.dtype, shape: Shape, device: str
               ) -> tuple[Shape, Transient]:
    """One replay, cached by everything it depends on (the --budget search reuses them)."""
    threshold = allocator_model(recipe, "cpu")[1]
    key = (shape, dtype, recipe.method, recipe.model.quantization, recipe.model.attention, recipe.lora,
           recipe.train.gradient_checkpointing, threshold, device)
    if key not in ctx.cache:
        ctx.cache[key] = measure(_meta(ctx, recipe, dtype), shape, ctx.causal, threshold=threshold, target=device)
    return shape, ctx.cache[key]


def _evaluation(ctx: Context, recipe: Recipe, dtype: torch.dtype, device: str, parts: dict[str, float]
                ) -> dict[str, Any] | None:
    """The largest eval batch's peak (MiB): the run's static parts (weights, adapter, gradients, optimizer state)
    plus the batch's no-grad forward, replayed on the meta device; None when the eval data is not known."""
    if not ctx.eval_lengths:
        return None
    generate = recipe.task == "qa"
    rows = min(recipe.eval.batch_size, len(ctx.eval_lengths))
    width = max(ctx.eval_lengths) + (recipe.eval.max_new_tokens if generate else 0)
    kind, threshold = allocator_model(recipe, device)
    key = ("eval", rows, width, dtype, recipe.method, recipe.model.quantization, recipe.lora, threshold)
    if key not in ctx.cache:
        ctx.cache[key] = measure_eval(_meta(ctx, recipe, dtype), rows, width, generate, threshold=threshold)
    transient = ctx.cache[key]
    static = sum(v for k, v in parts.items() if not k.startswith(("activations", "output layer", "allocator")))
    heap = resident_excess(recipe, kind, transient.peak_mib) if device == "cpu" else 0.0
    reserve = (static + transient.peak_mib) * (CUDA_RESERVE - 1) if device == "cuda" else 0.0
    return {"peak_mib": static + transient.peak_mib + heap + reserve, "rows": rows, "width": width,
            "generation": generate, "transient_mib": transient.peak_mib}


def _meta(ctx: Context, recipe: Recipe, dtype: torch.dtype) -> MetaModel:
    """The meta model, built once per structure (the --budget search tries many settings of one model)."""
    key = ("model", dtype, recipe.method, recipe.model.quantization, recipe.model.attention, recipe.lora,
           recipe.train.gradient_checkpointing)
    if key not in ctx.cache:
        ctx.cache[key] = build_meta(ctx.config, recipe, dtype, ctx.num_labels)
    return ctx.cache[key]


def family(recipe: Recipe) -> str:
    """The method family the CPU constants are measured by: full, adapters, or quantized (a 4- or 8-bit base)."""
    if recipe.method == "full":
        return "full"
    return "quantized" if recipe.model.quantization in ("4bit", "8bit") else "adapters"


def resident_excess(recipe: Recipe, kind: str, transient_mib: float) -> float:
    """MiB resident beyond the live tensors for a transient peak of `transient_mib` (HEAP, CHECKPOINTED)."""
    key = (kind, family(recipe))
    factor = HEAP[key] + (CHECKPOINTED[key] if recipe.train.gradient_checkpointing else 0.0)
    return (factor - 1.0) * transient_mib


def allocator_model(recipe: Recipe, device: str) -> tuple[str, int | None]:
    """The CPU allocator a run of `recipe` will have (lite_ft.allocator.run_allocator) and the size in bytes from
    which its tensors get their own mappings (None: no such threshold, or not the CPU)."""
    if device != "cpu":
        return "cuda caching allocator", None
    kind = allocator.run_allocator(recipe.train.release_memory)
    return kind, {"mmap 4 MiB": allocator.MMAP_THRESHOLD, "mmap 1 MiB": allocator.RELEASE_THRESHOLD}.get(kind)


def _available_mib(device: str) -> float | None:
    if device == "cpu":
        return psutil.virtual_memory().available / MIB
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free / MIB
    return None
