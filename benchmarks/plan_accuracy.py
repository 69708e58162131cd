"""How wrong `lite-ft plan` is on this machine: predicted vs measured peak memory and seconds per step.

Each configuration runs `lite-ft plan --json` in one child process and `lite-ft run` in another; the measured peak
is the run child's maximum resident set size as the kernel reports it (os.wait4 rusage: independent of lite-ft's
own sampler), the measured s/step the mean of steps 2.. from train_log.jsonl. Measurements and predictions
accumulate separately in benchmarks/results/plan-cpu/plan_accuracy.json (a measured configuration is skipped
unless --force), so the predictor can be re-run on the same measurements;
--report writes plan_accuracy.md and plan_accuracy.png (predicted against measured, with the +/-10% band).

    flock /work/cpu.lock python benchmarks/plan_accuracy.py --measure --only lora-b8-l384,full-b4-l256  # <= 10 min
    flock /work/cpu.lock python benchmarks/plan_accuracy.py --predict        # all predictions, about 5 minutes
    python benchmarks/plan_accuracy.py --report

The runs take the allocator the `lite-ft` command picks (jemalloc where installed); a grid under another one keeps
its own record, e.g. `LITE_FT_ALLOCATOR=glibc-tuned python benchmarks/plan_accuracy.py --record
plan_accuracy-glibc --measure` (its constants from `plan_calibrate.py --record plan_accuracy-glibc`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "plan-cpu"
DATA = Path(os.environ.get("LITE_FT_DATA", REPO.parent / "shared" / "data"))
COMMON = ["data.eval=null", "eval.baseline=false", "output.save_model=false", "train.log_every=1",
          "train.save_every=0", "train.warmup_ratio=0"]
SQUAD = ["recipes/squad-lora.yaml", f"data.train={DATA / 'squad_train.jsonl'}", "data.limit_train=400"]
SST2 = ["recipes/sst2-lora.yaml", f"data.train={DATA / 'sst2_train.jsonl'}", "data.limit_train=2000"]
SMOL_SST2 = [*SST2, "model.source=smollm2-135m-instruct"]

GRID: dict[str, list[str]] = {
    "lora-b8-l384": [*SQUAD, "train.batch_size=8", "data.max_length=384"],
    "full-b4-l256": [*SQUAD, "method=full", "train.lr=3e-5", "train.batch_size=4", "data.max_length=256"],
    "qlora-b4-l384": [*SQUAD, "method=qlora", "train.batch_size=4", "data.max_length=384"],
    "lora8bit-b4-l256": [*SQUAD, "model.quantization=8bit", "train.batch_size=4", "data.max_length=256"],
    "lora-b2-l1024": [*SQUAD, "train.batch_size=2", "data.max_length=1024"],
    "lora-ckpt-b8-l384": [*SQUAD, "train.batch_size=8", "data.max_length=384", "train.gradient_checkpointing=true"],
    "full-ckpt-b8-l256": [*SQUAD, "method=full", "train.lr=3e-5", "train.batch_size=8", "data.max_length=256",
                          "train.gradient_checkpointing=true"],
    "lora-ckpt-b4-l512": [*SQUAD, "train.batch_size=4", "data.max_length=512", "train.gradient_checkpointing=true"],
    "lora-adamw8bit-b8-l384": [*SQUAD, "train.batch_size=8", "data.max_length=384", "train.optimizer=adamw8bit"],
    "full-adamw8bit-b4-l256": [*SQUAD, "method=full", "train.lr=3e-5", "train.batch_size=4", "data.max_length=256",
                               "train.optimizer=adamw8bit"],
    "lora-release-b8-l384": [*SQUAD, "train.batch_size=8", "data.max_length=384", "train.release_memory=true"],
    "smollm-cls-lora-b32-l64": [*SMOL_SST2, "train.batch_size=32", "data.max_length=64"],
    "minilm-lora-b32-l66": [*SST2, "train.batch_size=32"],
    "minilm-full-b16-l128": [*SST2, "method=full", "train.lr=5e-5", "train.batch_size=16", "data.max_length=128"],
    "minilm-lora-b16-100steps": [*SST2, "train.batch_size=16", "train.max_steps=100"],
    "lora-b1-l256-100steps": [*SQUAD, "train.batch_size=1", "data.max_length=256", "train.max_steps=100"],
}
STEPS = 4  # per configuration, unless it sets train.max_steps itself


def child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONUNBUFFERED="1")


def overrides_of(name: str, out: Path) -> tuple[str, list[str]]:
    recipe, *over = GRID[name]
    if not any(o.startswith("train.max_steps=") for o in over):
        over.append(f"train.max_steps={STEPS}")
    return recipe, [*over, *COMMON, f"output.dir={out}"]


def predict(name: str, out: Path) -> dict[str, Any]:
    recipe, over = overrides_of(name, out)
    done = subprocess.run([sys.executable, "-m", "lite_ft", "plan", recipe, *over, "--json"], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"plan failed for {name}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def measure(name: str, out: Path) -> dict[str, Any]:
    """Run the configuration; the child's max RSS from the kernel (wait4), s/step from its train log."""
    recipe, over = overrides_of(name, out)
    log_path = out.parent / f"{name}.log"
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lite_ft", "run", recipe, *over, "--overwrite"], cwd=REPO,
                                env=child_env(), stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its max RSS, from the kernel
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"run failed for {name} (exit {proc.returncode}):\n{tail}")
    entries = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in itertools.pairwise(entries)]
    # each entry's rate is over its own window (one step with train.log_every=1), not cumulative: a step's real
    # tokens are its rate times its own seconds
    tokens = [b["tokens_per_second"] * (b["elapsed_s"] - a["elapsed_s"]) for a, b in itertools.pairwise(entries)]
    memory = json.loads((out / "memory.json").read_text())
    return {"max_rss_mib": usage.ru_maxrss / 1024, "sampled_peak_mib": memory["peak_mib"],
            "baseline_mib": memory["baseline_mib"], "breakdown": memory["breakdown"],
            "peak_phase": memory["peak_phase"], "seconds_per_step": sum(times) / len(times),
            "tokens_per_step": sum(tokens) / len(tokens),  # real tokens of the timed steps (2..N)
            "wall_s": time.perf_counter() - started, "steps": len(entries),
            "final_loss": entries[-1]["loss"]}


def predicted_figures(name: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"plan-{name}-") as tmp:
        p = predict(name, Path(tmp) / "run")
    return {"peak_mib": p["peak_mib"], "parts": p["parts"], "seconds_per_step": p["seconds_per_step"],
            "tokens_per_second": p["tokens_per_second"],
            "longest_micro_batch": p["longest_micro_batch"], "allocator": p["allocator"], "matmul": p["matmul"],
            "step_time": p["step_time"],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def measured_figures(name: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"run-{name}-") as tmp:
        m = measure(name, Path(tmp) / "run")
    return {**m, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def timed_steps_seconds(p: dict[str, Any], m: dict[str, Any]) -> float:
    """The plan's seconds for a step of the timed steps' real tokens: the measurement leaves out step 1 (warm-up),
    and with length grouping the steps differ in length (lora-b2-l1024: the longest batch is step 1), so the
    plan's per-token part is applied to the tokens of the steps that were timed and its fixed part (per-micro-batch
    op costs and the update) added as it is. Older measurements without token counts fall back to the plan's mean
    step."""
    if "tokens_per_step" not in m or not p.get("tokens_per_second"):
        return p["seconds_per_step"]
    timing = p["step_time"]
    mean_tokens = p["tokens_per_second"] * p["seconds_per_step"]
    return timing["fixed_seconds"] + timing["token_seconds"] * m["tokens_per_step"] / mean_tokens


def measured_medians(record: dict[str, Any], name: str) -> tuple[float, float]:
    """A configuration's measured peak MiB and s/step: the median of its runs where it was measured more than once
    (--repeat; this VM's speed moves by up to 2x within an hour), else its one run."""
    m = record["measured"][name]
    peaks = record.get("repeats", {}).get(name) or [m["max_rss_mib"]]
    seconds = record.get("repeats_s_per_step", {}).get(name) or [m["seconds_per_step"]]
    return statistics.median(peaks), statistics.median(seconds)


def combined(record: dict[str, Any]) -> dict[str, Any]:
    """One result per configuration with both sides: the errors in percent."""
    out = {}
    for name, overrides in GRID.items():
        p, m = record["predicted"].get(name), record["measured"].get(name)
        if not p or not m:
            continue
        predicted_sps = timed_steps_seconds(p, m)
        peak, sps = measured_medians(record, name)
        out[name] = {"name": name, "overrides": overrides, "predicted": p, "measured": m,
                     "repeats_max_rss_mib": record.get("repeats", {}).get(name),
                     "repeats_s_per_step": record.get("repeats_s_per_step", {}).get(name),
                     "measured_mib": peak, "measured_s_per_step": sps,
                     "peak_error_pct": 100 * (p["peak_mib"] - peak) / peak,
                     "predicted_s_per_step": predicted_sps,
                     "speed_error_pct": 100 * (predicted_sps - sps) / sps}
    return out


def calibration_stem(record: str) -> str:
    """The calibration files that go with a record: calibration.json with plan_accuracy.json,
    calibration-glibc.json with plan_accuracy-glibc.json."""
    return "calibration" + record.removeprefix("plan_accuracy")


def load(path: Path) -> dict[str, Any]:
    record = json.loads(path.read_text()) if path.is_file() else {}
    for key in ("predicted", "measured", "repeats"):
        record.setdefault(key, {})
    return record


def save(path: Path, record: dict[str, Any]) -> None:
    record["results"] = combined(record)
    path.write_text(json.dumps(record, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated configuration names (default: all)")
    parser.add_argument("--predict", action="store_true", help="(re)compute the predictions only")
    parser.add_argument("--measure", action="store_true", help="run the configurations (not yet measured)")
    parser.add_argument("--force", action="store_true", help="measure again configurations already measured")
    parser.add_argument("--repeat", type=int, default=0, help="measure each this many more times (spread)")
    parser.add_argument("--report", action="store_true", help="write the table and the plot from the results")
    parser.add_argument("--record", default="plan_accuracy", help="the results' file name under "
                        "benchmarks/results/plan-cpu/ without .json (one per allocator)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{args.record}.json"
    if args.report:
        from plan_report import write_report  # matplotlib only for the report

        return write_report(load(path), OUT, args.record, calibration_stem(args.record))
    names = args.only.split(",") if args.only else list(GRID)
    for name in names:
        if args.predict:
            figures = predicted_figures(name)
            record = load(path)
            record["predicted"][name] = figures
            save(path, record)
            print(f"{name}: predicted {figures['peak_mib']:.0f} MiB, {figures['seconds_per_step']:.2f} s/step",
                  flush=True)
        if args.measure and (name not in load(path)["measured"] or args.force):
            figures = measured_figures(name)
            record = load(path)
            record["measured"][name] = figures
            save(path, record)
            print(f"{name}: measured {figures['max_rss_mib']:.0f} MiB, {figures['seconds_per_step']:.2f} s/step",
                  flush=True)
        for _ in range(args.repeat):
            figures = measured_figures(name)
            record = load(path)
            record["repeats"].setdefault(name, [record["measured"][name]["max_rss_mib"]]).append(
                figures["max_rss_mib"])
            record.setdefault("repeats_s_per_step", {}).setdefault(
                name, [record["measured"][name]["seconds_per_step"]]).append(figures["seconds_per_step"])
            save(path, record)
            print(f"{name}: repeat {figures['max_rss_mib']:.0f} MiB, {figures['seconds_per_step']:.2f} s/step",
                  flush=True)


if __name__ == "__main__":
    main()
