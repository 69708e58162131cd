"""A plan for the terminal (a table of parts, the speed, whether it fits) and sizes such as `24GiB` parsed."""
from __future__ import annotations

import re
from typing import Any

from lite_ft.errors import RecipeError

UNITS = {"": 1 / (1024 * 1024), "b": 1 / (1024 * 1024), "k": 1 / 1024, "kb": 1 / 1024, "kib": 1 / 1024,
         "m": 1, "mb": 1, "mib": 1, "g": 1024, "gb": 1024, "gib": 1024, "t": 1024**2, "tb": 1024**2, "tib": 1024**2}


def parse_size(text: str, key: str = "size") -> float:
    """'24GiB', '8GB', '500MiB', '3g' -> MiB (GB and GiB both mean 1024 MiB, as free(1) and most tools print)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in UNITS:
        raise RecipeError([f"{key}: {text!r} is not a memory size; write e.g. 8GiB, 24GB or 500MiB"])
    return float(match.group(1)) * UNITS[match.group(2).lower()]


def describe(plan: dict[str, Any]) -> str:
    """The plan as a few lines of text."""
    longest = plan["longest_micro_batch"]
    lines = [(f"predicted peak {plan['peak_mib']:,.0f} MiB ({_what(plan)}), {plan['steps']} steps; longest "
              f"micro-batch {longest['rows']} x {longest['width']} tokens (first at step {longest['first_at_step']})")]
    width = max(len(k) for k in plan["parts"])
    lines.append(f"training peak {plan['training_peak_mib']:,.0f} MiB:")
    for name, mib in sorted(plan["parts"].items(), key=lambda kv: -kv[1]):
        if mib >= 0.5:
            lines.append(f"  {name:<{width}}  {mib:>10,.0f} MiB")
    ev = plan.get("evaluation")
    if ev:
        what = "prefill with the KV cache" if ev["generation"] else "no-grad forward"
        lines.append(f"evaluation peak {ev['peak_mib']:,.0f} MiB ({ev['rows']} x {ev['width']} tokens, {what})"
                     + ("  <- the run's peak" if plan["peak_phase"] == "evaluation" else ""))
    if plan["seconds_per_step"] is not None:
        lines.append(f"speed: {plan['seconds_per_step']:.2f} s/step, {plan['tokens_per_second']:.0f} tokens/s, "
                     f"training about {plan['wall_seconds_training'] / 60:.1f} min "
                     f"(timed on this machine: the step's ops {plan['step_time']['compute_seconds']:.2f} s before the "
                     f"measured overhead, clipping and optimizer {plan['step_time']['update_seconds']:.2f} s)")
        if plan["allocator"].startswith(("mmap", "glibc")):  # the grid: glibc's step overhead spreads 0.94-2.80x
            lines.append("  (under glibc a step's time depends more on its shapes, through page faults of fresh "
                         "mappings: less certain than under jemalloc, which lite-ft uses where installed: "
                         "apt install libjemalloc2)")
    else:
        why = "no op timings for a device that is not here" if plan["device"] == "cuda" else "not asked"
        lines.append(f"speed: not predicted ({why})")
    if plan["fits"] is not None:
        verdict = "fits" if plan["fits"] else "does NOT fit"
        lines.append(f"{verdict} in {plan['available_mib']:,.0f} MiB ({_against(plan)})")
    lines += [f"note: {n}" for n in plan["notes"]]
    return "\n".join(lines)


def _what(plan: dict[str, Any]) -> str:
    if plan["device"] == "cpu":
        return f"process resident memory; allocator: {plan['allocator']}"
    return "CUDA reserved peak plus context"


def _against(plan: dict[str, Any]) -> str:
    if plan.get("budget_mib") is not None:
        return "the budget"
    return "available RAM" if plan["device"] == "cpu" else "GPU memory"


def describe_fit(result: dict[str, Any]) -> str:
    """The --budget answer: overrides to paste, or why nothing fits."""
    if result["overrides"] is None:
        return (f"nothing tried ({result['tried']} settings) fits {result['budget_mib']:,.0f} MiB; "
                "try --allow-method-change (qlora, a shorter max_length) or a smaller model")
    fitted = result["fitted"]
    speed = (f", {fitted['seconds_per_step']:.2f} s/step, {fitted['tokens_per_second']:.0f} tokens/s"
             if fitted["seconds_per_step"] is not None else "")
    margin = f", with the plan's {100 * result['margin']:.0f}% margin" if result.get("margin") else ""
    if not result["overrides"]:
        return f"the recipe as it is fits the budget{margin} ({fitted['peak_mib']:,.0f} MiB{speed})"
    return (f"fits {result['budget_mib']:,.0f} MiB{margin} with: {' '.join(result['overrides'])}\n"
            f"  predicted peak {fitted['peak_mib']:,.0f} MiB{speed}")
