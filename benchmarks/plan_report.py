"""plan_accuracy.md and plan_accuracy.png from plan_accuracy.json, or another record's (plan_accuracy.py --report)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _row(name: str, r: dict[str, Any], calibrated: set[str]) -> str:
    p, m = r["predicted"], r["measured"]
    lmb = p["longest_micro_batch"]
    spread = ""
    if r.get("repeats_max_rss_mib"):
        reps = r["repeats_max_rss_mib"]
        spread = f"{min(reps):,.0f}-{max(reps):,.0f} MiB ({len(reps)} runs)"
        if r.get("repeats_s_per_step"):  # this VM's speed varies from run to run more than its memory does
            secs = r["repeats_s_per_step"]
            spread += f"; {min(secs):.2f}-{max(secs):.2f} s/step"
    role = "calibration" if name in calibrated else "held out"
    return (f"| {name} | {role} | {lmb['rows']}x{lmb['width']} @ step {lmb['first_at_step']} | {p['peak_mib']:,.0f} | "
            f"{r['measured_mib']:,.0f} | {r['peak_error_pct']:+.1f}% | {spread} | "
            f"{r.get('predicted_s_per_step', p['seconds_per_step']):.2f} | "
            f"{r['measured_s_per_step']:.2f} | {r['speed_error_pct']:+.1f}% | {m['steps']} |")


def write_report(record: dict[str, Any], out: Path, stem: str = "plan_accuracy", calibration: str = "calibration"
                 ) -> None:
    results = record["results"]
    cal = out / f"{calibration}.json"
    calibrated = set(json.loads(cal.read_text())["rows"]) if cal.is_file() else set()
    held = [n for n in results if n not in calibrated]
    names = sorted(results, key=lambda n: -abs(results[n]["peak_error_pct"]))
    peak_err = [abs(results[n]["peak_error_pct"]) for n in names]
    speed_err = [abs(results[n]["speed_error_pct"]) for n in names]
    allocators = sorted({r["predicted"]["allocator"] for r in results.values()})
    lines = ["# lite-ft plan: predicted vs measured on this CPU", "", f"Allocator: {', '.join(allocators)}.", "",
             ("Measured peak: the `lite-ft run` child's max RSS from the kernel (os.wait4). Measured s/step: mean of "
             "steps 2.. of train_log.jsonl. Both the median of a configuration's runs where it ran more than once "
             "(spread column). Predicted s/step: the plan's seconds per real token times the real "
             "tokens of those steps (step 1, left out as warm-up, may be the run's longest), plus its update "
             "(clipping and optimizer step, the same every step). Sorted by the size of "
             "the peak error, worst first."), "",
             (f"- configurations: {len(names)}; within +/-10% peak: {sum(e <= 10 for e in peak_err)}, within "
             f"+/-15%: {sum(e <= 15 for e in peak_err)}; worst peak error {max(peak_err):.1f}%"),
             (f"- s/step within +/-25%: {sum(e <= 25 for e in speed_err)} of {len(names)}; worst "
             f"{max(speed_err):.1f}%"),
             ("- held out of the calibration (benchmarks/plan_calibrate.py set HEAP, CHECKPOINTED and STEP_OVERHEAD on "
              f"the others): "
              f"{', '.join(held)}; their worst peak error "
              f"{max((abs(results[n]['peak_error_pct']) for n in held), default=0):.1f}%"), "",
             ("| configuration | role | longest micro-batch | predicted MiB | measured MiB | error | spread of repeats | "
             "predicted s/step | measured s/step | error | steps |"),
             "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    lines += [_row(n, results[n], calibrated) for n in names]
    lines += ["", ("Commands (one at a time on an otherwise idle machine): `python benchmarks/plan_accuracy.py "
              f"--measure --record {stem}`, `python benchmarks/plan_calibrate.py --record {stem} --only NAMES` (the "
              f"calibration rows), `python benchmarks/plan_accuracy.py --record {stem} --predict`, then "
              f"`python benchmarks/plan_accuracy.py --record {stem} --report`."),
              ""]
    (out / f"{stem}.md").write_text("\n".join(lines), encoding="utf-8")
    _plot(results, out / f"{stem}.png")


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r["measured_mib"] for r in results.values()]
    predicted = [r["predicted"]["peak_mib"] for r in results.values()]
    top = max(measured + predicted) * 1.1
    fig, ax = plt.subplots(figsize=(7, 6))
    xs = [0, top]
    ax.fill_between(xs, [0, top * 0.9], [0, top * 1.1], color="tab:green", alpha=0.15, label="+/-10%")
    ax.plot(xs, xs, color="tab:green", lw=1)
    ax.scatter(measured, predicted, color="tab:blue", zorder=3)
    for name, x, y in zip(results, measured, predicted):
        ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("measured peak RSS (MiB, getrusage of the run)")
    ax.set_ylabel("predicted peak (MiB, lite-ft plan)")
    ax.set_title("lite-ft plan on this CPU: predicted vs measured peak memory")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
