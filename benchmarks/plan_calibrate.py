"""The two measured constants of `lite-ft plan` on the CPU, from the measured runs of plan_accuracy.json:

- HEAP (lite_ft.plan.predict): resident memory of a micro-batch's transient tensors over their live peak, per
  allocator and method family: (measured max RSS - every other predicted part) / the replay's live peak;
- EFFICIENCY (lite_ft.plan.speed): the share of the matmul rate at the model's shape a step reaches:
  FLOPs per step / rate / measured seconds per step.

Runs the predictor in this one process (no weights are loaded), with the constants neutral (HEAP 1), and writes
calibration.json and calibration.md next to the results. The constants in the code are the medians printed here;
the accuracy table is therefore partly in-sample (calibration.md says which configurations set which constant).

    flock /work/cpu.lock python benchmarks/plan_calibrate.py
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from plan_accuracy import OUT, overrides_of

from lite_ft.plan import predict as predictor
from lite_ft.plan.speed import method_name
from lite_ft.recipe.load import load_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="calibrate on these measured configurations only")
    args = parser.parse_args()
    record = json.loads((OUT / "plan_accuracy.json").read_text())
    names = args.only.split(",") if args.only else list(record["measured"])
    predictor.HEAP = {key: 1.0 for key in predictor.HEAP}  # neutral: the factor is what is measured here
    rows: dict[str, Any] = {}
    for name in names:
        measured = record["measured"][name]
        with tempfile.TemporaryDirectory() as tmp:
            recipe_path, over = overrides_of(name, Path(tmp) / "run")
            recipe = load_recipe(recipe_path, over)
            plan = predictor.predict(recipe)
        parts = plan["parts"]
        transient = parts["activations (kept for backward)"] + parts["output layer, loss and backward workspace"]
        runtime = measured.get("baseline_mib") or parts["runtime"]
        other = sum(v for k, v in parts.items() if k not in ("runtime",)) - transient
        heap = (measured["max_rss_mib"] - runtime - other) / transient
        family = "full" if recipe.method == "full" else "adapters"
        rate = plan["matmul"]["gflops"] * 1e9
        efficiency = plan["flops_per_step"] / rate / measured["seconds_per_step"]
        if recipe.train.release_memory:
            efficiency /= 0.79  # RELEASE_SPEED: release_memory's own slowdown is a separate constant
        rows[name] = {"allocator": plan["allocator"], "family": family,
                      "method": method_name(recipe.method, recipe.model.quantization), "heap_factor": heap,
                      "efficiency": efficiency, "transient_mib": transient, "runtime_mib": runtime,
                      "flops_per_step": plan["flops_per_step"], "gflops": plan["matmul"]["gflops"]}
        print(name, json.dumps({k: v for k, v in rows[name].items() if isinstance(v, float)}), flush=True)
    heap = {f"{a}/{f}": statistics.median(r["heap_factor"] for r in rows.values()
                                          if r["allocator"] == a and r["family"] == f)
            for a, f in {(r["allocator"], r["family"]) for r in rows.values()}}
    eff = {m: statistics.median(r["efficiency"] for r in rows.values() if r["method"] == m)
           for m in {r["method"] for r in rows.values()}}
    (OUT / "calibration.json").write_text(json.dumps({"rows": rows, "heap": heap, "efficiency": eff}, indent=2))
    lines = ["# lite-ft plan: the CPU constants, measured", "", "Median per group (`python benchmarks/plan_calibrate.py`).",
             "", "| group | constant |", "| --- | ---: |"]
    lines += [f"| HEAP {k} | {v:.2f} |" for k, v in sorted(heap.items())]
    lines += [f"| EFFICIENCY {k} | {v:.2f} |" for k, v in sorted(eff.items())]
    lines += ["", "| configuration | heap factor | efficiency |", "| --- | ---: | ---: |"]
    lines += [f"| {n} | {r['heap_factor']:.2f} | {r['efficiency']:.2f} |" for n, r in rows.items()]
    (OUT / "calibration.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({"heap": heap, "efficiency": eff}, indent=2))


if __name__ == "__main__":
    main()
