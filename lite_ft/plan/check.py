"""What `lite-ft run` does with the plan before it loads the model: apply `train.fit`, then stop with the
prediction and the settings that would fit when the predicted peak exceeds the memory available
(`train.memory_check`)."""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import psutil
import torch

from lite_ft.errors import LiteFTError
from lite_ft.plan.fit import fit
from lite_ft.plan.parts import MIB
from lite_ft.plan.predict import predict, prepare
from lite_ft.plan.report import describe, describe_fit, parse_size
from lite_ft.recipe.schema import Recipe

LIMIT_ENV = "LITE_FT_MEMORY_LIMIT"  # e.g. 2GiB: the memory a run may use, where the OS cannot tell (tests, jobs)


def available_mib(device: torch.device) -> tuple[float, str]:
    """Memory this run can still take, MiB, and where the figure comes from: free GPU memory on CUDA; on the CPU
    the lowest of psutil's available RAM, the cgroup's limit less its usage, and LITE_FT_MEMORY_LIMIT less this
    process's own resident memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / MIB, "free GPU memory"
    options = [(psutil.virtual_memory().available / MIB, "available RAM")]
    cgroup = Path("/sys/fs/cgroup/memory.max")
    if cgroup.is_file() and cgroup.read_text().strip() != "max":
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        options.append(((int(cgroup.read_text()) - used) / MIB, "the cgroup's memory limit"))
    if os.environ.get(LIMIT_ENV):
        rss = psutil.Process().memory_info().rss / MIB
        options.append((parse_size(os.environ[LIMIT_ENV], LIMIT_ENV) - rss, LIMIT_ENV))
    return min(options)


def before_loading(recipe: Recipe, device: torch.device) -> tuple[Recipe, dict[str, Any] | None]:
    """The recipe to run (train.fit applied) and what the check found, for metrics.json; raises LiteFTError
    (exit 1) with the prediction and suggestions when the run is predicted not to fit. A model the planner
    cannot replay (an architecture the meta device does not support) skips the check, saying so on stderr and
    in metrics.json; train.fit then fails, as it cannot do what it was asked."""
    t = recipe.train
    if not t.memory_check and not t.fit:
        return recipe, None
    try:
        return _check(recipe, device)
    except LiteFTError:
        raise
    except Exception as exc:  # any failure to plan: reported, never hidden
        if t.fit:
            raise LiteFTError(f"train.fit: the run could not be planned ({type(exc).__name__}: {exc})") from exc
        note = f"memory check skipped: the run could not be planned ({type(exc).__name__}: {str(exc)[:300]})"
        print(f"lite-ft: {note}", file=sys.stderr, flush=True)
        return recipe, {"check": {"skipped": note}}


def _check(recipe: Recipe, device: torch.device) -> tuple[Recipe, dict[str, Any]]:
    t = recipe.train
    kind = "cuda" if device.type == "cuda" else "cpu"
    ctx = prepare(recipe)
    record: dict[str, Any] = {}
    if t.fit:
        budget = parse_size(t.fit, "train.fit")
        found = fit(recipe, budget, kind, ctx=ctx, speed=False)
        if found["recipe"] is None:
            raise LiteFTError(f"train.fit: no setting tried fits {t.fit} ({budget:,.0f} MiB); "
                              "`lite-ft plan RECIPE --budget SIZE --allow-method-change` also tries qlora and a "
                              "shorter data.max_length")
        recipe = dataclasses.replace(found["recipe"], train=dataclasses.replace(found["recipe"].train, fit=t.fit))
        record["fit"] = {"budget_mib": budget, "overrides": found["overrides"], "peak_mib": found["peak_mib"]}
    if not t.memory_check:
        return recipe, record
    plan = predict(recipe, kind, ctx=ctx, speed=False)
    free, source = available_mib(device)
    # On the CPU this process already holds the plan's runtime part: only the rest must still be free.
    held = psutil.Process().memory_info().rss / MIB if kind == "cpu" else 0.0
    needed = plan["peak_mib"] - held
    parts = plan["parts"]
    live = parts["activations (kept for backward)"] + parts["output layer, loss and backward workspace"]
    record["check"] = {"predicted_peak_mib": plan["peak_mib"], "needed_mib": needed, "available_mib": free,
                       "available_from": source, "live_transient_mib": live}
    if needed > free:
        found = fit(recipe, free + held, kind, ctx=ctx, speed=False)
        found.update(budget_mib=free + held, fitted=found["plan"])
        raise LiteFTError(f"the run is predicted to need {needed:,.0f} MiB more than this process holds, and "
                          f"{free:,.0f} MiB is free ({source}); stopped before loading the model\n"
                          f"{describe(plan)}\n{describe_fit(found)}\n"
                          "(train.memory_check: false skips this check)")
    return recipe, record
