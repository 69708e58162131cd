"""`lite-ft bench`: the same recipe trained with several methods (full, LoRA, QLoRA, LoRA on 8 bits), each in its own
process, compared side by side: memory (with what the peak is made of), speed, loss and task scores.

Each method is a `lite-ft run` in a subprocess, so one method's memory (allocator caches, freed-but-kept pages) can
never show up in another's figures, and a method that fails (out of memory, say) is reported while the rest go on.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lite_ft.bench.report import environment, write_reports
from lite_ft.errors import RecipeError
from lite_ft.intervals import paired_differences
from lite_ft.metrics import SCORE_KEYS
from lite_ft.recipe.load import load_recipe
from lite_ft.util import read_jsonl

# What each method means as recipe keys. lora-8bit: LoRA adapters over an 8-bit (LLM.int8) base.
METHODS: dict[str, dict[str, str]] = {
    "full": {"method": "full", "model.quantization": "none"},
    "lora": {"method": "lora", "model.quantization": "none"},
    "qlora": {"method": "qlora", "model.quantization": "4bit"},
    "lora-8bit": {"method": "lora", "model.quantization": "8bit"},
}
FULL_LR_FACTOR = 0.1  # full fine-tuning diverges at LoRA's rates; a 10x smaller rate is the usual starting point


@dataclass
class MethodPlan:
    """One method's run: its name, the overrides that make it, and where it writes."""

    name: str
    overrides: list[str]
    run_dir: Path
    log: Path
    lr: float


@dataclass
class BenchPlan:
    recipe: Path
    steps: int
    out: Path
    methods: list[MethodPlan] = field(default_factory=list)
    nproc: int = 1  # processes per method (data parallel)


def plan(recipe: str | os.PathLike[str], methods: list[str], steps: int, eval_limit: int | None, out: str | os.PathLike[str],
         overrides: list[str] | tuple[str, ...] = (), method_overrides: list[str] | tuple[str, ...] = (),
         full_lr: float | None = None, nproc: int = 1) -> BenchPlan:
    """Check every method's recipe before anything runs; RecipeError lists all problems at once."""
    problems: list[str] = []
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        problems.append(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if steps < 1:
        problems.append(f"--steps: {steps} is not a positive number of steps")
    per_method = _split_method_overrides(method_overrides, problems)
    if problems:
        raise RecipeError(problems, "lite-ft bench")
    out_dir = Path(out)
    result = BenchPlan(Path(recipe), steps, out_dir, nproc=nproc)
    base = load_recipe(recipe, overrides)  # reports the recipe's own problems first, alone
    for name in methods:
        lr = base.train.lr if name != "full" or base.method == "full" else base.train.lr * FULL_LR_FACTOR
        lr = full_lr if name == "full" and full_lr is not None else lr
        ovr = [*overrides, *(f"{k}={v}" for k, v in METHODS[name].items()), f"train.lr={lr}",
               f"train.max_steps={steps}", f"output.dir={out_dir / 'runs' / name}", "output.save_model=false",
               "train.save_every=0", "train.log_every=1", "eval.baseline=false"]
        if eval_limit is not None:
            ovr.append(f"data.limit_eval={eval_limit}")
        ovr += per_method.get(name, [])
        try:
            load_recipe(recipe, ovr)
        except RecipeError as exc:
            problems += [f"{name}: {p}" for p in exc.problems]
        result.methods.append(MethodPlan(name, ovr, out_dir / "runs" / name, out_dir / "logs" / f"{name}.log", lr))
    if problems:
        raise RecipeError(problems, "lite-ft bench")
    return result


def _split_method_overrides(items: list[str] | tuple[str, ...], problems: list[str]) -> dict[str, list[str]]:
    """`qlora:train.batch_size=4` -> {"qlora": ["train.batch_size=4"]}."""
    found: dict[str, list[str]] = {}
    for item in items:
        name, sep, override = item.partition(":")
        if not sep or name not in METHODS or "=" not in override:
            problems.append(f"--set {item!r}: write METHOD:KEY=VALUE with METHOD one of {', '.join(METHODS)}, "
                            "e.g. --set full:train.lr=1e-5")
            continue
        found.setdefault(name, []).append(override)
    return found


def bench(bench_plan: BenchPlan) -> dict[str, Any]:
    """Run every planned method in turn, each in its own process; write bench.json, .csv, .md and the plots.

    Returns the bench record (what bench.json holds).
    """
    bench_plan.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, method in enumerate(bench_plan.methods, 1):
        rows.append(_run_method(method, bench_plan, f"[{i}/{len(bench_plan.methods)}] {method.name}"))
    record = {"recipe": str(bench_plan.recipe), "steps": bench_plan.steps, "methods": rows,
              "differences": differences(rows, {m.name: m.run_dir for m in bench_plan.methods}),
              "environment": environment(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    write_reports(record, bench_plan.out)
    return record


def _run_method(method: MethodPlan, bench_plan: BenchPlan, label: str) -> dict[str, Any]:
    """One `lite-ft run` in a subprocess, with a progress bar fed from its train_log.jsonl."""
    method.log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "lite_ft", "run", str(bench_plan.recipe), *method.overrides, "--overwrite",
           "--nproc", str(bench_plan.nproc)]
    started = time.perf_counter()
    with open(method.log, "w", encoding="utf-8") as log, \
            tqdm(total=bench_plan.steps, desc=label, unit="step", dynamic_ncols=True) as bar:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            _follow(method.run_dir, bar, bench_plan.steps)
            time.sleep(1.0)
        _follow(method.run_dir, bar, bench_plan.steps)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        error = _last_error(method.log)
        tqdm.write(f"{label}: FAILED (exit {proc.returncode}): {error} (log: {method.log})")
        return {"method": method.name, "status": "failed", "exit_code": proc.returncode, "error": error,
                "wall_seconds": wall, "lr": method.lr, "log": str(method.log)}
    row = result_row(method.name, json.loads((method.run_dir / "metrics.json").read_text(encoding="utf-8")))
    row.update(wall_seconds=wall, lr=method.lr, log=str(method.log))
    tqdm.write(f"{label}: peak {row['peak_memory_mib']:.0f} MiB ({row['peak_phase']}), "
               f"{row['tokens_per_second']:.0f} tok/s, {row['seconds_per_step']:.2f} s/step, "
               f"loss {row['final_loss']:.3f}"
               + "".join(f", {k} {row[k]:.2f}" for k in row["score_names"] if row[k] is not None))
    return row


def _follow(run_dir: Path, bar: tqdm, steps: int) -> None:
    """Move the bar to the child's last logged step; say whether it is loading, training or evaluating."""
    log = run_dir / "train_log.jsonl"
    done = 0
    if log.is_file():
        done = sum(1 for line in log.read_text(encoding="utf-8").splitlines()
                   if line.strip() and '"eval_loss"' not in line)  # evaluations have lines of their own
    bar.update(min(done, steps) - bar.n)
    bar.set_postfix_str("loading" if done == 0 else "training" if done < steps else "evaluating")


def _last_error(log: Path) -> str:
    """The child's `error: ...` line, else its last non-empty line (a traceback's last line, say)."""
    lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors[-1][len("error:"):].strip() if errors else lines[-1] if lines else "no output")[:500]


def differences(rows: list[dict[str, Any]], run_dirs: dict[str, Path]) -> list[dict[str, Any]]:
    """Each pair of evaluated methods, A - B per score on the examples both scored, with the paired bootstrap
    95% interval; `within_noise` when it contains 0."""
    ok = [r for r in rows if r["status"] == "ok" and (run_dirs[r["method"]] / "predictions.jsonl").is_file()]
    records = {r["method"]: read_jsonl(run_dirs[r["method"]] / "predictions.jsonl") for r in ok}
    found = []
    for i, a in enumerate(ok):
        for b in ok[i + 1:]:
            paired = paired_differences(a["task"], records[a["method"]], records[b["method"]])
            found += [{"a": a["method"], "b": b["method"], "score": k, **v} for k, v in paired.items()]
    return found


def result_row(name: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The bench row of one finished run, from its metrics.json."""
    t = metrics["train"]
    breakdown = t.get("memory_breakdown") or {}
    check = (t.get("memory_plan") or {}).get("check") or {}  # lite-ft plan's prediction, made before loading
    scores = SCORE_KEYS[metrics["task"]]
    evaluation = metrics.get("eval", {})
    return {"method": name, "status": "ok", "trainable_params": t["trainable_params"],
            "total_params": t["total_params"], "peak_memory_mib": t["peak_memory_mib"],
            "predicted_peak_mib": check.get("predicted_peak_mib"),
            "live_transient_mib": check.get("live_transient_mib"),
            "peak_phase": t["peak_memory_phase"], "training_peak_mib": breakdown.get("peak_mib"),
            "memory_source": t["memory_source"], "breakdown_mib": breakdown.get("parts_mib", {}),
            "tokens_per_second": t["tokens_per_second"], "seconds_per_step": t["seconds_per_step"],
            "final_loss": t["final_loss"], "score_names": list(scores),
            **{k: evaluation.get(k) for k in scores}, "task": metrics["task"],
            "intervals": evaluation.get("intervals", {}),
            "eval_examples_per_second": evaluation.get("examples_per_second"), "eval_n": evaluation.get("n"),
            "dtype": t.get("dtype"), "device": t.get("device"), "quantization": metrics.get("quantization"),
            "processes": (t.get("processes") or {}).get("world_size", 1),
            "rank_peak_memory_mib": [r["peak_memory_mib"] for r in t.get("ranks", [])] or None}
