"""`lite-ft plan --budget` on the main job (recipes/squad-lora.yaml as plan_accuracy.py's lora-b8-l384 runs it),
for a budget it does not fit by default: the overrides it prints, then a run with them, its peak (max RSS from
the kernel) against the budget, and its loss against the default run's (plan_accuracy.json).

    flock /work/cpu.lock python benchmarks/plan_budget.py --budget 3GiB
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from plan_accuracy import OUT, REPO, child_env, measure, overrides_of

from lite_ft.plan.report import parse_size

BASE = "lora-b8-l384"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="3GiB")
    args = parser.parse_args()
    record = json.loads((OUT / "plan_accuracy.json").read_text())
    default = record["measured"][BASE]
    with tempfile.TemporaryDirectory() as tmp:
        recipe, over = overrides_of(BASE, Path(tmp) / "run")
        done = subprocess.run([sys.executable, "-m", "lite_ft", "plan", recipe, *over, "--budget", args.budget,
                               "--json"], cwd=REPO, env=child_env(), capture_output=True, text=True, check=True)
        plan = json.loads(done.stdout)
        fitted = plan["overrides"]
        if fitted is None:
            raise SystemExit(f"nothing fits {args.budget}")
    import plan_accuracy

    plan_accuracy.GRID["budget"] = [*plan_accuracy.GRID[BASE], *fitted]
    with tempfile.TemporaryDirectory() as tmp:
        run = measure("budget", Path(tmp) / "run")
    budget = parse_size(args.budget)
    result = {"budget": args.budget, "budget_mib": budget, "overrides": fitted,
              "default_predicted_peak_mib": plan["default_peak_mib"], "fitted_predicted_peak_mib": plan["peak_mib"],
              "default_measured_peak_mib": default["max_rss_mib"], "fitted_measured_peak_mib": run["max_rss_mib"],
              "under_budget": run["max_rss_mib"] <= budget, "default_final_loss": default["final_loss"],
              "fitted_final_loss": run["final_loss"],
              "loss_difference": abs(run["final_loss"] - default["final_loss"]), "fitted_run": run}
    (OUT / "budget.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "fitted_run"}, indent=2))


if __name__ == "__main__":
    main()
