"""The measured constants of `lite-ft plan` on the CPU, from the measured runs of plan_accuracy.json:

- HEAP and OVERHEAD (lite_ft.plan.predict): per allocator and method family, the least-squares fit of
  excess = HEAP x transient + OVERHEAD, where excess is the measured max RSS less every static predicted part
  (runtime, weights, adapter, gradients, optimizer state) and transient the replay's live peak of the longest
  micro-batch;
- STEP_OVERHEAD (lite_ft.plan.speed): per method, the median of measured seconds per step over the plan's sum of
  the step's ops timed in isolation (lite_ft.plan.op_times), both for the tokens of the timed steps.

Runs the predictor in this one process (no weights are loaded), with the constants neutral (HEAP 1, OVERHEAD 0,
STEP_OVERHEAD 1), and writes calibration.json and calibration.md next to the results. The constants in the code are
the ones printed here; the accuracy table is therefore partly in-sample (calibration.md says which configurations set which constant).

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
from lite_ft.plan import speed
from lite_ft.plan.speed import method_name
from lite_ft.recipe.load import load_recipe


def fit_allocator(rows: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """Per allocator and family, least squares of excess = HEAP x transient + OVERHEAD over the rows (excess:
    resident beyond the static parts); one row, or transients all alike: HEAP 1 and the median excess over it."""
    import numpy as np

    heap, overhead = {}, {}
    for group in {(r["allocator"], r["family"]) for r in rows.values()}:
        members = [r for r in rows.values() if (r["allocator"], r["family"]) == group]
        excess = np.array([r["excess_mib"] for r in members])
        transient = np.array([r["transient_mib"] for r in members])
        key = f"{group[0]}/{group[1]}"
        if len(members) > 1 and np.ptp(transient) > 200:
            (h, c), *_ = np.linalg.lstsq(np.stack([transient, np.ones_like(transient)], 1), excess, rcond=None)
            heap[key], overhead[key] = float(h), float(c)
        else:
            heap[key], overhead[key] = 1.0, float(np.median(excess - transient))
    return heap, overhead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="calibrate on these measured configurations only")
    args = parser.parse_args()
    record = json.loads((OUT / "plan_accuracy.json").read_text())
    names = args.only.split(",") if args.only else list(record["measured"])
    predictor.HEAP = {key: 1.0 for key in predictor.HEAP}  # neutral: the constants are what is measured here
    predictor.OVERHEAD = {key: 0.0 for key in predictor.OVERHEAD}
    speed.STEP_OVERHEAD = {key: 1.0 for key in speed.STEP_OVERHEAD}
    rows: dict[str, Any] = {}
    for name in names:
        measured = record["measured"][name]
        with tempfile.TemporaryDirectory() as tmp:
            recipe_path, over = overrides_of(name, Path(tmp) / "run")
            recipe = load_recipe(recipe_path, over)
            plan = predictor.predict(recipe)
        parts = plan["parts"]
        transient = parts["activations (kept for backward)"] + parts["output layer, loss and backward workspace"]
        runtime = parts["runtime"]  # as predicted: with bitsandbytes' libraries where the run imports them
        other = sum(v for k, v in parts.items() if k not in ("runtime",)) - transient
        in_heap = plan["heap_mib"]  # the part in tensors under the mmap threshold: shown, not fitted on
        excess = measured["max_rss_mib"] - runtime - other  # resident beyond the static parts
        heap = excess / transient
        family = predictor.family(recipe)
        # per real token, over the timed steps' tokens (step 1, left out as warm-up, may be the longest)
        timed = measured.get("tokens_per_step", plan["tokens_per_second"] * plan["seconds_per_step"])
        overhead = measured["seconds_per_step"] / (timed / plan["tokens_per_second"])  # release_memory's own
        # slowdown (RELEASE_SPEED) is already in the plan's seconds: a separate constant
        rows[name] = {"allocator": plan["allocator"], "family": family,
                      "method": method_name(recipe.method, recipe.model.quantization), "heap_factor": heap,
                      "heap_mib": in_heap, "excess_mib": excess,
                      "step_overhead": overhead, "transient_mib": transient, "runtime_mib": runtime,
                      "flops_per_step": plan["flops_per_step"], "gflops": plan["matmul"]["gflops"],
                      "ops_seconds": plan["step_time"]}
        print(name, json.dumps({k: v for k, v in rows[name].items() if isinstance(v, float)}), flush=True)
    heap, overhead = fit_allocator(rows)
    eff = {m: statistics.median(r["step_overhead"] for r in rows.values() if r["method"] == m)
           for m in {r["method"] for r in rows.values()}}
    (OUT / "calibration.json").write_text(json.dumps({"rows": rows, "heap": heap, "overhead": overhead,
                                                      "step_overhead": eff}, indent=2))
    lines = ["# lite-ft plan: the CPU constants, measured", "",
             "Least squares per group (`python benchmarks/plan_calibrate.py --only` the calibration rows).",
             "", "| group | constant |", "| --- | ---: |"]
    lines += [f"| HEAP {k} | {v:.2f} |" for k, v in sorted(heap.items())]
    lines += [f"| OVERHEAD {k} | {v:.0f} MiB |" for k, v in sorted(overhead.items())]
    lines += [f"| STEP_OVERHEAD {k} | {v:.2f} |" for k, v in sorted(eff.items())]
    lines += ["", "| configuration | resident / live transient | under the mmap threshold MiB | transient MiB | "
              "measured s / timed ops' s |",
              "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {n} | {r['heap_factor']:.2f} | {r['heap_mib']:,.0f} | "
              f"{r['transient_mib']:,.0f} | {r['step_overhead']:.2f} |" for n, r in rows.items()]
    (OUT / "calibration.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({"heap": heap, "overhead": overhead, "step_overhead": eff}, indent=2))


if __name__ == "__main__":
    main()
