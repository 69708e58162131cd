"""`lite-ft run`: data -> model -> (baseline eval) -> train -> eval -> save, all recorded in the run folder."""
from __future__ import annotations

import dataclasses
import gc
import json
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lite_ft.allocator import configure as configure_allocator, release_free_heap
from lite_ft.data.load import Split, fingerprint, load_splits
from lite_ft.data.tasks import evaluate_timed, get_task
from lite_ft.errors import DataError, OutOfMemory, WriteFailed
from lite_ft.intervals import describe
from lite_ft.metrics import SCORE_KEYS
from lite_ft.model import Built, build, count_params
from lite_ft.plan.check import before_loading
from lite_ft.recipe.load import dump_recipe
from lite_ft.recipe.precision import Placement, place
from lite_ft.recipe.preflight import absolute_paths
from lite_ft.recipe.schema import Recipe
from lite_ft.sources.resolve import resolve_source
from lite_ft.training import checkpoint, distributed, rundir, sharding, writes
from lite_ft.training.checkpoint import Checkpointing
from lite_ft.training.distributed import Dist
from lite_ft.training.evaluation import DuringEval, eval_batches
from lite_ft.training.lock import RunLock
from lite_ft.training.loop import RESUME_HINT, set_seed, train
from lite_ft.training.memory import MemoryMonitor, describe_breakdown
from lite_ft.training.trackers import Trackers
from lite_ft.util import versions, write_jsonl


def run(recipe: Recipe, resume: bool = False, overwrite: bool = False, allow_data_change: bool = False
        ) -> dict[str, Any]:
    """Fine-tune and evaluate as the recipe says; write metrics.json, predictions.jsonl, train_log.jsonl,
    memory.json, data_report.json, recipe.yaml and the weights into output.dir. Returns the metrics.

    An unfinished run of the same recipe in output.dir resumes from its last good checkpoint (refused when the
    training data changed, unless `allow_data_change`); a different run there is refused unless `overwrite`. The
    folder is locked for the whole run: a second run on it stops at once.
    """
    started = time.perf_counter()
    recipe = absolute_paths(recipe)  # recipe.yaml then means the same from any working directory
    dist = distributed.start(recipe.train.device, recipe.train.fsdp)  # before the device: each rank owns one
    placement = place(recipe)  # once, before anything is loaded: device and precision for the whole run
    recipe, memory_plan = before_loading(recipe, placement.device)  # train.fit, train.memory_check (lite-ft plan)
    allocator = "cuda caching allocator"
    if placement.device.type == "cpu":
        allocator = configure_allocator(recipe.train.release_memory)  # before the model and data take memory
    out = Path(recipe.output.dir)
    with _locked(out) if dist.is_main else nullcontext() as lock:
        plan = rundir.prepare(out, recipe, resume=resume, overwrite=overwrite) if dist.is_main else None
        if lock is not None and lock.note:
            plan.notes.append(lock.note)
        plan = dist.broadcast(plan)  # every rank resumes from the same checkpoint
        job = _Job(recipe, placement, out, plan, dist)
        with dist.lost_ranks_as_errors():
            metrics = _run_locked(job, allow_data_change)
        metrics["train"]["allocator"] = allocator
        if memory_plan:
            metrics["train"]["memory_plan"] = memory_plan
        metrics["wall_seconds_total"] = time.perf_counter() - started
        job.write_json("metrics.json", metrics)
    dist.close()
    return metrics


@contextmanager
def _locked(out: Path) -> Iterator[RunLock]:
    """The run folder's lock; a folder that cannot be created or written is a message, not a traceback."""
    lock = RunLock(out)
    try:
        lock.__enter__()
    except OSError as exc:
        raise WriteFailed(writes.describe_failure(out, "the run folder", exc, "Choose another output.dir")) from None
    try:
        yield lock
    finally:
        lock.__exit__(None, None, None)


@dataclass
class _Job:
    """One run as every rank sees it; only rank 0 writes the run folder."""

    recipe: Recipe
    placement: Placement
    out: Path
    plan: rundir.Plan
    dist: Dist

    def write(self, name: str, write: Any, hint: str = RESUME_HINT) -> None:
        if self.dist.is_main:
            writes.atomic_write(self.out / name, name, write, hint)

    def write_json(self, name: str, value: Any, hint: str = RESUME_HINT) -> None:
        self.write(name, lambda p: p.write_text(json.dumps(value, indent=2), encoding="utf-8"), hint)


def _run_locked(job: _Job, allow_data_change: bool) -> dict[str, Any]:
    task = get_task(job.recipe.task)
    try:
        train_split, eval_split = load_splits(job.recipe, task)  # before the model: bad data fails fast
    except DataError as exc:
        job.write_json("data_report.json", {"error": str(exc)}, "")
        raise
    data = fingerprint(train_split, job.recipe.data.train)
    rundir.check_data(job.plan, data, allow_data_change)
    while True:
        try:
            return _train_and_evaluate(job, task, (train_split, eval_split), data)
        except OutOfMemory as exc:
            if not job.recipe.train.auto_batch_size or job.recipe.train.batch_size == 1:
                raise
            job.recipe = _halve_micro_batch(job.recipe)
            job.plan = _retry_plan(job.plan, job.out, exc, job.recipe)


def _train_and_evaluate(job: _Job, task: Any, splits: tuple[Split, Split | None], data: dict[str, Any]
                        ) -> dict[str, Any]:
    """Build, train (ending with a checkpoint of the last step), save the weights, then evaluate: a crash after
    training never trains again."""
    recipe, out, dist = job.recipe, job.out, job.dist
    train_split, eval_split = splits
    num_labels = task.num_labels(recipe.data, train_split, eval_split) if recipe.task == "classification" else None
    job.write("recipe.yaml", lambda p: p.write_text(dump_recipe(recipe), encoding="utf-8"))
    set_seed(recipe.train.seed)  # before build: LoRA and classifier heads are initialised there
    snapshot = out / "memory_snapshot.pickle" if recipe.train.memory_snapshot and dist.is_main else None
    monitor = MemoryMonitor(job.placement.device, snapshot=snapshot)
    with monitor:
        with monitor.phase("model_load"):
            built = build(recipe, job.placement, num_labels=num_labels, source_path=_source(recipe, dist))
            release_free_heap()  # loading (quantizing above all) leaves freed weights in glibc's heap
        encoded = _encode(task, train_split, built, recipe)
        data_report = {"train": train_split.report(), "eval": eval_split.report() if eval_split else None}
        job.write_json("data_report.json", data_report)
        metrics: dict[str, Any] = {"task": recipe.task, "method": recipe.method, "model": recipe.model.source,
                                   "quantization": recipe.model.quantization}
        if recipe.eval.baseline and eval_split is not None:
            with monitor.phase("evaluation"):
                metrics["baseline_eval"] = _baseline(job, task, built, eval_split)
        trainable, total = count_params(built.model)
        trackers = Trackers(recipe.output.report_to, out.name, out / "trackers") \
            if recipe.output.report_to and dist.is_main else None
        try:
            stats = train(built.model, encoded, recipe.train, pad_id=built.tokenizer.pad_token_id,
                          causal=task.causal, precision=job.placement.precision, monitor=monitor,
                          log_path=out / "train_log.jsonl", dist=dist, trackers=trackers,
                          checkpointing=Checkpointing(out / "checkpoints", recipe, resume=job.plan.resume, data=data),
                          evaluation=_during_eval(job, task, built, eval_split))
        finally:
            if trackers:
                trackers.finish()
        if recipe.output.save_model:
            with monitor.phase("save"):
                _save(built, out, dist)
        if eval_split is not None:
            with monitor.phase("evaluation"), dist.unsharded():
                metrics["eval"], predictions = evaluate_timed(task, built.model, built.tokenizer,
                                                              eval_split.examples, recipe, built.device,
                                                              Dist() if dist.fsdp else dist)
            job.write("predictions.jsonl", lambda p: write_jsonl(p, predictions))
    memory = monitor.report()
    stats.update(trainable_params=trainable, total_params=total, peak_memory_mib=memory["peak_mib"],
                 peak_memory_phase=memory["peak_phase"], memory_source=memory["source"],
                 memory_breakdown=memory["breakdown"], processes=dist.describe(),
                 device=_describe_device(built.device), dtype=str(built.dtype).replace("torch.", ""),
                 fused_lora=built.fused_lora)
    stats["ranks"] = dist.gather({"rank": dist.rank, "peak_memory_mib": memory["peak_mib"],
                                  "tokens_per_second": stats.pop("rank_tokens_per_second")})
    metrics.update(loss_path=stats.pop("loss_path"), train=stats, data=data_report, run=rundir.record(job.plan),
                   versions=versions())
    metrics["data"]["train"]["fingerprint"] = data
    job.write_json("memory.json", memory)
    return metrics


def _source(recipe: Recipe, dist: Dist) -> str:
    """The model's local source, resolved (fetched, converted) by rank 0 first, then read from its cache by the
    other ranks: no two processes convert the same GGUF file at once."""
    if not dist.is_main:
        dist.barrier()
    path = resolve_source(recipe.model.source, recipe.model.allow_pickle)
    if dist.is_main:
        dist.barrier()
    return path


def _baseline(job: _Job, task: Any, built: Built, split: Split) -> dict[str, Any]:
    """The untrained model's scores; kept in baseline_eval.json so that a resumed run does not evaluate twice."""
    path = job.out / "baseline_eval.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    scores, _ = evaluate_timed(task, built.model, built.tokenizer, split.examples, job.recipe, built.device,
                               Dist() if job.dist.fsdp else job.dist)
    job.write_json("baseline_eval.json", scores)
    return scores


def _during_eval(job: _Job, task: Any, built: Built, split: Split | None) -> DuringEval | None:
    """eval.every's evaluations: every eval example encoded as for training (its eval loss), and the task's scores
    on the first eval.during_limit examples."""
    recipe = job.recipe
    if not recipe.eval.every:
        return None
    if split is None:
        raise DataError("eval.every: there is no eval data to evaluate during training; set data.eval or "
                        "data.holdout, or eval.every=0")
    encoded = [e for e in (task.encode(x, built.tokenizer, recipe) for x in split.examples) if e is not None]
    if not encoded:
        raise DataError(f"eval.every: no eval example fits in data.max_length={recipe.data.max_length} tokens")
    batches = eval_batches(encoded, recipe.eval.batch_size, built.tokenizer.pad_token_id, task.causal)
    scores = None
    if recipe.eval.during_limit:
        few, dist = split.examples[:recipe.eval.during_limit], Dist() if job.dist.fsdp else job.dist

        def scores() -> dict[str, Any]:
            return evaluate_timed(task, built.model, built.tokenizer, few, recipe, built.device, dist)[0]
    return DuringEval(recipe.eval.every, batches, task.causal, len(encoded), scores)


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
            split.truncated += bool(item.pop("truncated", False))
            kept.append(example)
            encoded.append(item)
    split.examples = kept
    if not encoded:
        raise DataError(f"no training example fits in data.max_length={recipe.data.max_length} tokens; raise it")
    return encoded


def _save(built: Built, out: Path, dist: Dist) -> None:
    """The adapter (PEFT format) for lora/qlora, else the full weights (safetensors), plus the tokenizer; written
    by rank 0 under a temporary name and renamed, after the last checkpoint (FSDP: every rank gathers first)."""
    state = sharding.full_model(built.model) if dist.fsdp else None
    if not dist.is_main:
        return
    folder = out / ("adapter" if hasattr(built.model, "peft_config") else "model")

    def write(staging: Path) -> None:
        built.model.save_pretrained(staging, **({"state_dict": state} if state is not None else {}))
        built.tokenizer.save_pretrained(staging)

    writes.atomic_write(folder, f"the trained weights ({folder.name}/)", write,
                        "The last step's checkpoint is intact: free disk space, then run the same command with "
                        "--resume; no step is trained again")


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def summary(metrics: dict[str, Any]) -> str:
    """A small before/after table of the task scores and the training figures, for the terminal."""
    keys = SCORE_KEYS[metrics["task"]]
    rows = [("", *(f"{k} [95% interval]" for k in keys), "n")]
    for name, key in (("before training", "baseline_eval"), ("after training", "eval")):
        if key in metrics:
            scores = metrics[key]
            rows.append((name, *(describe(scores[k], scores.get("intervals", {}).get(k)) for k in keys),
                         str(scores.get("n", ""))))
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
    if t.get("best"):
        b = t["best"]
        lines.append(f"train.keep_best: the result is step {b['step']}'s weights (best {b['metric']} "
                     f"{b['value']:.4g} of the evaluations during training)")
    if (t.get("early_stop") or {}).get("stopped_after_step"):
        e = t["early_stop"]
        lines.append(f"stopped early after step {e['stopped_after_step']} of {t['planned_steps']}: {e['metric']} "
                     f"did not improve for {e['patience']} evaluations (best at step {e['best']['step']})")
    for name, report in metrics["data"].items():
        if report and report["skipped"]:
            reasons = ", ".join(f"{count} {reason}" for reason, count in report["skipped"].items())
            lines.append(f"data.{name}: {report['used']} examples used, skipped: {reasons}")
        if report and report.get("truncated"):
            lines.append(f"data.{name}: {report['truncated']} examples truncated to data.max_length")
    return "\n".join(lines)
