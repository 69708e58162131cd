"""`--budget` / `train.fit`: the fastest settings that keep a run's result the same (or close) and fit a memory
budget, as `key=value` overrides.

Tried, in this order of closeness to the recipe: the same effective batch split into smaller micro-batches (the
same steps, so the same model within float rounding); gradient checkpointing (the same model, more compute);
train.release_memory (CPU: the same model, slower); adamw8bit (8-bit optimizer state: close, not identical); and,
only with `allow_method_change`, qlora and a shorter data.max_length (a different result).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from lite_ft.errors import RecipeError
from lite_ft.plan.predict import Context, predict, prepare
from lite_ft.plan.report import parse_size
from lite_ft.plan.speed import release_slowdown
from lite_ft.recipe.load import load_recipe
from lite_ft.recipe.schema import Recipe

# A setting fits when its predicted peak, with this share added to everything but the runtime (measured in this
# very process), stays within the budget: the plan's error on this machine is up to about 15% low on SmolLM2
# (benchmarks/results/plan-cpu; with 10%, `--budget 3GiB` on the SQuAD job picked a run that peaked 3.5% over).
MARGIN = 0.15


def with_margin(plan: dict[str, Any], margin: float) -> float:
    """The predicted peak (MiB) with `margin` added to all parts but the runtime."""
    runtime = plan["parts"].get("runtime", 0.0)
    return runtime + (plan["peak_mib"] - runtime) * (1 + margin)


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def candidates(recipe: Recipe, device: str, allow_method_change: bool) -> list[tuple[list[str], Recipe]]:
    """Every setting the search may try, as (overrides, recipe), the recipe's own first."""
    t = recipe.train
    effective = t.batch_size * t.grad_accum
    methods: list[tuple[list[str], dict[str, Any], dict[str, Any]]] = [([], {}, {})]
    lengths = [recipe.data.max_length]
    if allow_method_change:
        if recipe.method != "qlora":
            methods.append((["method=qlora", "model.quantization=4bit"], {"method": "qlora"},
                            {"quantization": "4bit"}))
        lengths += [n for n in (recipe.data.max_length * 3 // 4, recipe.data.max_length // 2) if n >= 32]
    out: list[tuple[list[str], Recipe]] = []
    for (m_over, top, model), length, ckpt, release, opt8, micro in itertools.product(
            methods, lengths, sorted({t.gradient_checkpointing, True}),
            sorted({t.release_memory, device == "cpu"}) if device == "cpu" else [t.release_memory],
            sorted({t.optimizer == "adamw8bit", True}), _divisors_desc(effective)):
        over = list(m_over)
        if length != recipe.data.max_length:
            over.append(f"data.max_length={length}")
        train = dataclasses.replace(t, batch_size=micro, grad_accum=effective // micro,
                                    gradient_checkpointing=ckpt, release_memory=release,
                                    optimizer="adamw8bit" if opt8 else t.optimizer)
        for key, old, new in (("batch_size", t.batch_size, micro), ("grad_accum", t.grad_accum, effective // micro),
                              ("gradient_checkpointing", t.gradient_checkpointing, ckpt),
                              ("release_memory", t.release_memory, release)):
            if old != new:
                over.append(f"train.{key}={str(new).lower()}")
        if opt8 and t.optimizer != "adamw8bit":
            over.append("train.optimizer=adamw8bit")
        changed = dataclasses.replace(recipe, **top, train=train,
                                      model=dataclasses.replace(recipe.model, **model),
                                      data=dataclasses.replace(recipe.data, max_length=length))
        out.append((over, changed))
    return out


def closeness(recipe: Recipe, changed: Recipe) -> int:
    """How far a candidate's result may move from the recipe's: 0 the same model (split, checkpointing,
    release_memory), 1 close (8-bit optimizer state), 2 another method (qlora), 3 other data (a shorter
    max_length, which skips or cuts examples)."""
    if changed.data.max_length != recipe.data.max_length:
        return 3
    if changed.method != recipe.method:
        return 2
    return 1 if changed.train.optimizer != recipe.train.optimizer else 0


def relative_time(plan: dict[str, Any], recipe: Recipe) -> float:
    """Seconds per step where predicted, else FLOPs per step (candidates are compared within one method: closeness
    ranks the methods first)."""
    if plan["seconds_per_step"] is not None:
        return plan["seconds_per_step"]
    slow = release_slowdown(recipe.train.release_memory, plan["allocator"])
    return plan["flops_per_step"] * slow


def fit(recipe: Recipe, budget_mib: float, device: str = "cpu", allow_method_change: bool = False,
        ctx: Context | None = None, speed: bool = True, margin: float = MARGIN) -> dict[str, Any]:
    """The closest, then fastest, candidate whose predicted peak with the margin is within `budget_mib` (see
    `closeness`): {overrides, peak_mib, plan, tried, recipe, margin}; `overrides` is None when nothing fits.
    Within one group of settings, smaller micro-batches are tried only until one fits (smaller ones are slower)."""
    ctx = ctx or prepare(recipe)
    best: tuple[tuple[int, float], list[str], dict[str, Any], Recipe] | None = None
    done: set[tuple[Any, ...]] = set()
    contexts = {recipe.data.max_length: ctx}  # a shorter max_length keeps other examples: encoded again, once
    tried = 0
    for over, changed in candidates(recipe, device, allow_method_change):
        t = changed.train
        group = (changed.method, changed.data.max_length, t.gradient_checkpointing, t.release_memory, t.optimizer)
        if group in done:
            continue
        length = changed.data.max_length
        if length not in contexts:
            contexts[length] = prepare(changed)
        plan = predict(changed, device, budget_mib, ctx=contexts[length], speed=speed)
        tried += 1
        if with_margin(plan, margin) > budget_mib:
            continue
        done.add(group)
        cost = (closeness(recipe, changed), relative_time(plan, changed))
        if best is None or cost < best[0]:
            best = (cost, over, plan, changed)
    if best is None:
        return {"overrides": None, "peak_mib": None, "budget_mib": budget_mib, "plan": None, "tried": tried,
                "recipe": None, "margin": margin}
    return {"overrides": best[1], "peak_mib": best[2]["peak_mib"], "budget_mib": budget_mib, "plan": best[2],
            "tried": tried, "recipe": best[3], "margin": margin}


def plan(recipe_path: str, overrides: tuple[str, ...] | list[str] = (), device: str = "cpu",
         gpu_memory: str | None = None, budget: str | None = None, allow_method_change: bool = False
         ) -> dict[str, Any]:
    """`lite-ft plan` as a function: the plan of a recipe file; with `budget`, also the fit: `overrides` (None when
    nothing fits), `peak_mib` of the fitted setting, `default_peak_mib`, and the fitted plan under `fitted`."""
    recipe = load_recipe(recipe_path, overrides)
    gpu_mib = parse_size(gpu_memory, "--gpu-memory") if gpu_memory else None
    if device == "cuda" and gpu_mib is None:
        raise RecipeError(["--device cuda needs --gpu-memory (e.g. 24GiB): the memory of the GPU to plan for"],
                          "the command line")
    ctx = prepare(recipe)
    limit = parse_size(budget, "--budget") if budget else gpu_mib
    result = predict(recipe, device, limit, ctx=ctx)
    if budget:
        result["budget_mib"] = limit
        found = fit(recipe, limit, device, allow_method_change, ctx=ctx)
        result["default_peak_mib"] = result["peak_mib"]
        result.update(overrides=found["overrides"], peak_mib=found["peak_mib"] or result["peak_mib"],
                      fits=found["overrides"] is not None, fitted=found["plan"], tried=found["tried"],
                      margin=found["margin"])
    return result
