"""The measured constants of `lite-ft plan` on the CPU, from the measured runs of plan_accuracy.json:

- HEAP and CHECKPOINTED (lite_ft.plan.predict): per allocator and method family, the least-squares fit (errors
  relative to each measured peak) of excess = HEAP x transient on the runs without gradient checkpointing, then of
  excess = (HEAP + CHECKPOINTED) x transient on those with it, where excess is the measured max RSS less every
  static predicted part (runtime, weights, adapter, gradients, optimizer state) and transient the replay's live
  peak of the longest micro-batch;
- STEP_OVERHEAD and STEP_OVERHEAD_JEMALLOC (lite_ft.plan.speed): per allocator and method, the median of measured
  seconds per step less the plan's timed update, over the plan's sum of the step's ops timed in isolation
  (lite_ft.plan.op_times; a fixed part per micro-batch and a part per token) for the tokens of the timed steps.

Runs the predictor in this one process (no weights are loaded), with the constants neutral (HEAP 1, CHECKPOINTED 0,
STEP_OVERHEAD 1), and writes calibration.json and calibration.md next to the results. The constants in the code are
the ones printed here; the accuracy table is therefore partly in-sample (calibration.md says which configurations
set which constant).

    flock /work/cpu.lock python benchmarks/plan_calibrate.py
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from plan_accuracy import OUT, calibration_stem, measured_medians, overrides_of

from lite_ft.plan import predict as predictor
from lite_ft.plan import speed
from lite_ft.plan.speed import method_name
from lite_ft.recipe.load import load_recipe


def _through_origin(x: list[float], y: list[float], scale: list[float]) -> float:
    """The factor f minimising the sum of ((f x - y) / scale)^2: errors relative to each run's measured peak."""
    num = sum(xi * yi / si ** 2 for xi, yi, si in zip(x, y, scale))
    den = sum(xi * xi / si ** 2 for xi, si in zip(x, scale))
    return num / den if den else 1.0


def fit_allocator(rows: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """Per allocator and family: HEAP from the runs without gradient checkpointing (excess = HEAP x transient),
    then CHECKPOINTED from those with it (excess = (HEAP + CHECKPOINTED) x transient); excess is the resident
    memory beyond the static parts. A group without runs of a kind keeps HEAP 1 / CHECKPOINTED 0."""
    heap, checkpointed = {}, {}
    for group in {(r["allocator"], r["family"]) for r in rows.values()}:
        key = f"{group[0]}/{group[1]}"
        members = [r for r in rows.values() if (r["allocator"], r["family"]) == group]
        plain = [r for r in members if not r["checkpointing"]]
        ckpt = [r for r in members if r["checkpointing"]]
        heap[key] = _through_origin([r["transient_mib"] for r in plain], [r["excess_mib"] for r in plain],
                                    [r["measured_mib"] for r in plain]) if plain else 1.0
        if ckpt:
            checkpointed[key] = _through_origin(
                [r["transient_mib"] for r in ckpt], [r["excess_mib"] - heap[key] * r["transient_mib"] for r in ckpt],
                [r["measured_mib"] for r in ckpt])
    return heap, checkpointed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="calibrate on these measured configurations only")
    parser.add_argument("--record", default="plan_accuracy", help="the measurements' file under "
                        "benchmarks/results/plan-cpu/ without .json (plan_accuracy.py --record)")
    args = parser.parse_args()
    record = json.loads((OUT / f"{args.record}.json").read_text())
    stem = calibration_stem(args.record)
    names = args.only.split(",") if args.only else list(record["measured"])
    predictor.HEAP = {key: 1.0 for key in predictor.HEAP}  # neutral: the constants are what is measured here
    predictor.CHECKPOINTED = {key: 0.0 for key in predictor.CHECKPOINTED}
    speed.STEP_OVERHEAD = {key: 1.0 for key in speed.STEP_OVERHEAD}
    speed.STEP_OVERHEAD_JEMALLOC = {key: 1.0 for key in speed.STEP_OVERHEAD_JEMALLOC}
    rows: dict[str, Any] = {}
    for name in names:
        measured = dict(record["measured"][name])
        measured["max_rss_mib"], measured["seconds_per_step"] = measured_medians(record, name)
        with tempfile.TemporaryDirectory() as tmp:
            recipe_path, over = overrides_of(name, Path(tmp) / "run")
            recipe = load_recipe(recipe_path, over)
            plan = predictor.predict(recipe)
        parts = plan["parts"]
        transient = parts["activations (kept for backward)"] + parts["output layer, loss and backward workspace"]
        # as predicted in a fresh process (plan_accuracy --predict, one child per configuration): this process's
        # RSS grows from row to row (569 -> 691 MiB over the ten rows, 2026-12-06) and would shrink the excess
        fresh = record["predicted"].get(name, {}).get("parts", {})
        runtime = fresh.get("runtime", parts["runtime"])
        other = sum(v for k, v in parts.items() if k not in ("runtime",)) - transient
        in_heap = plan["heap_mib"]  # the part in tensors under the mmap threshold: shown, not fitted on
        excess = measured["max_rss_mib"] - runtime - other  # resident beyond the static parts
        heap = excess / transient
        family = predictor.family(recipe)
        # the plan's ops for the timed steps' real tokens (step 1, left out as warm-up, may be the longest); the
        # update is timed whole, not scaled. release_memory's own slowdown (speed.release_slowdown) is already in
        # the plan's seconds: a separate constant
        timing = plan["step_time"]
        mean_tokens = plan["tokens_per_second"] * plan["seconds_per_step"]
        timed = measured.get("tokens_per_step", mean_tokens)
        slower = speed.release_slowdown(recipe.train.release_memory, plan["allocator"])
        fixed_ops = timing["compute_fixed_seconds"]
        ops = (fixed_ops + (timing["compute_seconds"] - fixed_ops) * timed / mean_tokens) * slower
        overhead = (measured["seconds_per_step"] - timing["update_seconds"] * slower) / ops
        rows[name] = {"allocator": plan["allocator"], "family": family,
                      "method": method_name(recipe.method, recipe.model.quantization), "heap_factor": heap,
                      "heap_mib": in_heap, "excess_mib": excess, "measured_mib": measured["max_rss_mib"],
                      "checkpointing": recipe.train.gradient_checkpointing,
                      "step_overhead": overhead, "transient_mib": transient, "runtime_mib": runtime,
                      "flops_per_step": plan["flops_per_step"], "gflops": plan["matmul"]["gflops"],
                      "ops_seconds": plan["step_time"]}
        print(name, json.dumps({k: v for k, v in rows[name].items() if isinstance(v, float)}), flush=True)
    heap, checkpointed = fit_allocator(rows)
    # per allocator and method (STEP_OVERHEAD for glibc's fixed threshold, STEP_OVERHEAD_JEMALLOC)
    groups = {(r["allocator"].split(",")[0], r["method"]) for r in rows.values()}
    step_overhead = {f"{a}/{m}": statistics.median(r["step_overhead"] for r in rows.values()
                                                    if (r["allocator"].split(",")[0], r["method"]) == (a, m))
                     for a, m in groups}
    (OUT / f"{stem}.json").write_text(json.dumps({"rows": rows, "heap": heap, "checkpointed": checkpointed,
                                                      "step_overhead": step_overhead}, indent=2))
    lines = ["# lite-ft plan: the CPU constants, measured", "",
             f"Least squares per group (`python benchmarks/plan_calibrate.py --record {args.record} --only` the "
             "calibration rows).",
             "", "| group | constant |", "| --- | ---: |"]
    lines += [f"| HEAP {k} | {v:.2f} |" for k, v in sorted(heap.items())]
    lines += [f"| CHECKPOINTED {k} | {v:.2f} |" for k, v in sorted(checkpointed.items())]
    lines += [f"| STEP_OVERHEAD {k} | {v:.2f} |" for k, v in sorted(step_overhead.items())]
    lines += ["", "| configuration | resident / live transient | under the mmap threshold MiB | transient MiB | "
              "measured s / timed ops' s |",
              "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {n} | {r['heap_factor']:.2f} | {r['heap_mib']:,.0f} | "
              f"{r['transient_mib']:,.0f} | {r['step_overhead']:.2f} |" for n, r in rows.items()]
    (OUT / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({"heap": heap, "checkpointed": checkpointed, "step_overhead": step_overhead}, indent=2))


if __name__ == "__main__":
    main()
