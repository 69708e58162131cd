"""`lite-ft run`: data -> model -> (baseline eval) -> train -> eval -> save, all recorded in the run folder."""
from __future__ import annotations

import dataclasses
import gc
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from lite_ft.data.load import Split, load_splits
from lite_ft.data.tasks import evaluate_timed, get_task
from lite_ft.errors import DataError, OutOfMemory
from lite_ft.metrics import SCORE_KEYS
from lite_ft.model import Built, build, count_params
from lite_ft.recipe.load import dump_recipe
from lite_ft.recipe.precision import Placement, place
from lite_ft.recipe.schema import Recipe
from lite_ft.training import checkpoint, rundir
from lite_ft.training.checkpoint import Checkpointing
from lite_ft.training.loop import set_seed, train
from lite_ft.training.memory import MemoryMonitor, describe_breakdown, return_freed_memory
from lite_ft.util import versions, write_jsonl


def run(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune and evaluate as the recipe says; write metrics.json, predictions.jsonl, train_log.jsonl,
    memory.json, data_report.json, recipe.yaml and the weights into output.dir. Returns the metrics.

    An unfinished run of the same recipe in output.dir resumes from its last good checkpoint; a different run
    there is refused unless `overwrite`.
    """
    started = time.perf_counter()
    placement = place(recipe)  # once, before anything is loaded: device and precision for the whole run
    allocator = "glibc default"
    if recipe.train.release_memory and placement.device.type == "cpu":
        allocator = return_freed_memory()  # before the model and data take memory
    out = Path(recipe.output.dir)
    plan = rundir.prepare(out, recipe, resume=resume, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(recipe.task)
    try:
        train_split, eval_split = load_splits(recipe, task)  # before the model: bad data fails fast
    except DataError as exc:
        (out / "data_report.json").write_text(json.dumps({"error": str(exc)}, indent=2), encoding="utf-8")
        raise
    while True:
        try:
            metrics = _train_and_evaluate(recipe, placement, task, train_split, eval_split, out, plan)
            break
        except OutOfMemory as exc:
            if not recipe.train.auto_batch_size or recipe.train.batch_size == 1:
                raise
            recipe = _halve_micro_batch(recipe)
            plan = _retry_plan(plan, out, exc, recipe)
    metrics["train"]["allocator"] = allocator
    metrics["wall_seconds_total"] = time.perf_counter() - started
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics


def _train_and_evaluate(recipe: Recipe, placement: Placement, task: Any, train_split: Split,
                        eval_split: Split | None, out: Path, plan: rundir.Plan) -> dict[str, Any]:
    num_labels = task.num_labels(recipe.data, train_split, eval_split) if recipe.task == "classification" else None
    (out / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    set_seed(recipe.train.seed)  # before build: LoRA and classifier heads are initialised there
    snapshot = out / "memory_snapshot.pickle" if recipe.train.memory_snapshot else None
    monitor = MemoryMonitor(placement.device, snapshot=snapshot)
    with monitor:
        with monitor.phase("model_load"):
            built = build(recipe, placement, num_labels=num_labels)
        encoded = _encode(task, train_split, built, recipe)
        data_report = {"train": train_split.report(), "eval": eval_split.report() if eval_split else None}
        (out / "data_report.json").write_text(json.dumps(data_report, indent=2), encoding="utf-8")
        metrics: dict[str, Any] = {"task": recipe.task, "method": recipe.method, "model": recipe.model.source,
                                   "quantization": recipe.model.quantization}
        if recipe.eval.baseline and eval_split is not None:
            with monitor.phase("evaluation"):
                metrics["baseline_eval"], _ = task.evaluate(built.model, built.tokenizer, eval_split.examples,
                                                            recipe, built.device)
        trainable, total = count_params(built.model)
        stats = train(built.model, encoded, recipe.train, pad_id=built.tokenizer.pad_token_id, causal=task.causal,
                      precision=placement.precision, monitor=monitor, log_path=out / "train_log.jsonl",
                      checkpointing=Checkpointing(out / "checkpoints", recipe, resume=plan.resume))
        if eval_split is not None:
            with monitor.phase("evaluation"):
                metrics["eval"], predictions = evaluate_timed(task, built.model, built.tokenizer,
                                                              eval_split.examples, recipe, built.device)
            write_jsonl(out / "predictions.jsonl", predictions)
        if recipe.output.save_model:
            with monitor.phase("save"):
                _save(built, out)
    memory = monitor.report()
    stats.update(trainable_params=trainable, total_params=total, peak_memory_mib=memory["peak_mib"],
                 peak_memory_phase=memory["peak_phase"], memory_source=memory["source"],
                 memory_breakdown=memory["breakdown"],
                 device=_describe_device(built.device), dtype=str(built.dtype).replace("torch.", ""))
    metrics["loss_path"] = stats.pop("loss_path")
    metrics["train"] = stats
    metrics["data"] = data_report
    metrics["run"] = rundir.record(plan)
    metrics["versions"] = versions()
    (out / "memory.json").write_text(json.dumps(memory, indent=2), encoding="utf-8")
    return metrics


def _halve_micro_batch(recipe: Recipe) -> Recipe:
    """Half the micro-batch, twice the accumulation: the same effective batch, so the same steps, in less memory.
    The memory the failed attempt held is released first."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    t = recipe.train
    return dataclasses.replace(recipe, train=dataclasses.replace(t, batch_size=t.batch_size // 2,
                                                                 grad_accum=t.grad_accum * 2))


def _retry_plan(plan: rundir.Plan, out: Path, exc: Exception, recipe: Recipe) -> rundir.Plan:
    """After an out-of-memory retry, continue from the failed attempt's last checkpoint: a step computes the same
    whatever its split, so its checkpoints stay valid."""
    resume, _ = checkpoint.latest_valid(out / "checkpoints")
    where = f"resuming from {resume}" if resume else "from the start"
    note = (f"out of memory ({exc}); retrying {where} with train.batch_size={recipe.train.batch_size} "
            f"train.grad_accum={recipe.train.grad_accum}")
    return rundir.Plan(resume=resume, notes=plan.notes + [note], harmless_changes=plan.harmless_changes)


def _encode(task: Any, split: Any, built: Built, recipe: Recipe) -> list[dict[str, Any]]:
    """Tokenize the training examples; those longer than data.max_length are skipped and counted."""
    kept, encoded = [], []
    for example in split.examples:
        item = task.encode(example, built.tokenizer, recipe)
        if item is None:
            split.skip(f"longer than data.max_length ({recipe.data.max_length} tokens)", example.get("id"))
        else:
            kept.append(example)
            encoded.append(item)
    split.examples = kept
    if not encoded:
        raise DataError(f"no training example fits in data.max_length={recipe.data.max_length} tokens; raise it")
    return encoded


def _save(built: Built, out: Path) -> None:
    """The adapter (PEFT format) for lora/qlora, else the full weights (safetensors), plus the tokenizer."""
    folder = out / ("adapter" if hasattr(built.model, "peft_config") else "model")
    built.model.save_pretrained(folder)
    built.tokenizer.save_pretrained(folder)


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def summary(metrics: dict[str, Any]) -> str:
    """A small before/after table of the task scores and the training figures, for the terminal."""
    keys = SCORE_KEYS[metrics["task"]]
    rows = [("", *keys)]
    if "baseline_eval" in metrics:
        rows.append(("before training", *(f"{metrics['baseline_eval'][k]:.2f}" for k in keys)))
    if "eval" in metrics:
        rows.append(("after training", *(f"{metrics['eval'][k]:.2f}" for k in keys)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    t = metrics["train"]
    n = metrics.get("eval", {}).get("n")
    lines.append(f"{t['steps']} steps, final loss {t['final_loss']:.3f}, {t['tokens_per_second']:.0f} tokens/s, "
                 f"peak memory {t['peak_memory_mib']:.0f} MiB ({t['peak_memory_phase']}), "
                 f"{t['trainable_params']:,} of {t['total_params']:,} parameters trained"
                 + (f", {n} eval examples" if n else ""))
    if t.get("memory_breakdown"):
        lines.append(describe_breakdown(t["memory_breakdown"]))
    for name, report in metrics["data"].items():
        if report and report["skipped"]:
            reasons = ", ".join(f"{count} {reason}" for reason, count in report["skipped"].items())
            lines.append(f"data.{name}: {report['used']} examples used, skipped: {reasons}")
    return "\n".join(lines)
