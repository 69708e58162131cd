"""`lite-ft bench --plan-only`: each method's predicted memory by part (lite_ft.plan), no weights loaded, for models
too big for this machine (an 8B config on a 24 GB GPU: full vs LoRA vs QLoRA). Writes bench_plan.json, bench_plan.md
and bench_plan_memory.png."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lite_ft.bench.runner import METHODS
from lite_ft.plan.fit import plan
from lite_ft.plan.report import parse_size


def plan_only(recipe: str, methods: list[str], overrides: tuple[str, ...], out: str, device: str,
              gpu_memory: str | None) -> dict[str, Any]:
    """The plan of each method (the recipe plus the method's keys), side by side."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in methods:
        keys = [f"{k}={v}" for k, v in METHODS[name].items()]
        p = plan(recipe, [*overrides, *keys], device=device, gpu_memory=gpu_memory)
        rows.append({"method": name, "peak_mib": p["peak_mib"], "parts": p["parts"], "fits": p["fits"],
                     "seconds_per_step": p["seconds_per_step"], "trainable_params": p["trainable_params"],
                     "longest_micro_batch": p["longest_micro_batch"], "notes": p["notes"]})
    record = {"recipe": recipe, "overrides": list(overrides), "device": device,
              "memory_mib": parse_size(gpu_memory) if gpu_memory else None, "methods": rows}
    (folder / "bench_plan.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    (folder / "bench_plan.md").write_text(markdown(record), encoding="utf-8")
    chart(record, folder / "bench_plan_memory.png")
    return record


def markdown(record: dict[str, Any]) -> str:
    parts = list(dict.fromkeys(k for r in record["methods"] for k in r["parts"]))
    lines = [f"# lite-ft bench --plan-only: {record['recipe']} on {record['device']}"
             + (f" ({record['memory_mib']:,.0f} MiB)" if record["memory_mib"] else ""), "",
             "Predicted before loading any weights (`lite-ft plan`), MiB.", "",
             "| method | peak | fits | " + " | ".join(parts) + " |", "| --- " * (len(parts) + 3) + "|"]
    for r in record["methods"]:
        cells = [f"{r['parts'].get(p, 0):,.0f}" for p in parts]
        lines.append(f"| {r['method']} | {r['peak_mib']:,.0f} | {r['fits']} | " + " | ".join(cells) + " |")
    notes = {n for r in record["methods"] for n in r["notes"]}
    lines += ["", *(f"- {n}" for n in sorted(notes)), ""]
    return "\n".join(lines)


def chart(record: dict[str, Any], path: Path) -> None:
    """Stacked bars of the predicted parts per method, with the device's memory as a line."""
    import matplotlib  # only for the chart

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = list(dict.fromkeys(k for r in record["methods"] for k in r["parts"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    names = [r["method"] for r in record["methods"]]
    bottoms = [0.0] * len(names)
    for part in parts:
        values = [r["parts"].get(part, 0) / 1024 for r in record["methods"]]
        ax.bar(names, values, bottom=bottoms, label=part)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    if record["memory_mib"]:
        ax.axhline(record["memory_mib"] / 1024, color="black", linestyle="--", label="device memory")
    ax.set_ylabel("predicted peak, GiB")
    ax.set_title(f"Predicted memory by part ({record['device']})")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
