"""`lite-ft eval`: score any model on a recipe's eval data with the task's own evaluate(), and write the same
metrics.json / predictions.jsonl a run writes.

What can be evaluated: a model folder (full weights or a merged export), a .gguf file (converted once, like
model.source), or a run folder (its base model as trained, quantized or not, plus its adapter; or its model/).
Model folders and GGUF files load unquantized in the recipe's compute dtype.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from lite_ft.data.load import load_splits
from lite_ft.data.tasks import evaluate_timed, get_task
from lite_ft.errors import LiteFTError
from lite_ft.export.run_folder import RunInfo, attach_adapter, inspect_run
from lite_ft.intervals import describe, paired_differences
from lite_ft.model import load_base, load_tokenizer
from lite_ft.recipe.load import load_recipe
from lite_ft.recipe.precision import pick_device, pick_dtype
from lite_ft.sources.resolve import resolve_source
from lite_ft.util import versions, write_jsonl


def evaluate(target: str | os.PathLike[str], recipe: str | os.PathLike[str] | None = None,
             out: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()
             ) -> dict[str, Any]:
    """Evaluate `target` on the eval data of `recipe` (default: a run folder's own recipe.yaml, with overrides);
    write metrics.json and predictions.jsonl into `out` when given. Returns the metrics."""
    return _evaluated(target, recipe, out, overrides)[0]


def compare(target: str | os.PathLike[str], other: str | os.PathLike[str],
            recipe: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()
            ) -> dict[str, Any]:
    """Evaluate `target` and `other` on the same eval examples (the recipe of `target`, as evaluate() finds it)
    and return both metrics and, per score, target minus other with its paired bootstrap 95% interval."""
    first, records_a = _evaluated(target, recipe, None, overrides)
    recipe = recipe if recipe is not None else Path(target).expanduser() / "recipe.yaml"
    second, records_b = _evaluated(other, recipe, None, overrides)
    differences = paired_differences(first["task"], records_a, records_b)
    return {"task": first["task"], "a": first, "b": second, "differences": differences}


def compare_summary(result: dict[str, Any]) -> str:
    """The two evaluations and their paired differences, for the terminal."""
    lines = [summary(result["a"]), summary(result["b"]), "A - B, paired over the same examples:"]
    for key, d in result["differences"].items():
        verdict = "within noise" if d["within_noise"] else "beyond noise"
        lines.append(f"  {key}: {d['difference']:+.2f} [95% interval {d['low']:+.2f}, {d['high']:+.2f}], "
                     f"n {d['n']}: {verdict}")
    return "\n".join(lines)


def _evaluated(target: str | os.PathLike[str], recipe: str | os.PathLike[str] | None,
               out: str | os.PathLike[str] | None, overrides: list[str] | tuple[str, ...]
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """evaluate()'s work: the metrics and the prediction records."""
    path = Path(target).expanduser()
    is_run = path.is_dir() and (path / "recipe.yaml").is_file()
    if recipe is None and not is_run:
        raise LiteFTError(f"{target} is not a run folder: pass --recipe RECIPE to say which task and eval data to use")
    parsed = load_recipe(recipe if recipe is not None else path / "recipe.yaml", overrides)
    device = pick_device(parsed.train.device)  # once: every model below is loaded onto it
    task = get_task(parsed.task)
    train_split, eval_split = load_splits(parsed, task)
    if eval_split is None:
        raise LiteFTError("the recipe has no eval data: set data.eval (or data.holdout), e.g. "
                          "data.eval=builtin:qa-eval")
    num_labels = task.num_labels(parsed.data, train_split, eval_split) if parsed.task == "classification" else None
    model, tokenizer, described = _load(path, is_run, parsed, num_labels, device)
    scores, predictions = evaluate_timed(task, model, tokenizer, eval_split.examples, parsed, device)
    metrics = {"task": parsed.task, "evaluated": str(target), **described, "eval": scores,
               "data": {"eval": eval_split.report()}, "versions": versions()}
    if out is not None:
        _write(Path(out).expanduser(), metrics, predictions)
    return metrics, predictions


def _load(path: Path, is_run: bool, recipe: Any, num_labels: int | None, device: torch.device
          ) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """The model, its tokenizer, and what was loaded (for metrics.json)."""
    if is_run:
        run = inspect_run(path)
        if run.recipe.task != recipe.task:
            raise LiteFTError(f"the run was trained for task {run.recipe.task} but the recipe is for task "
                              f"{recipe.task}; use a recipe of the same task")
        if run.is_adapter:
            return _run_with_adapter(run, recipe, num_labels, device)
        path = run.weights
    return _plain(path, recipe, num_labels, device)


def _run_with_adapter(run: RunInfo, recipe: Any, num_labels: int | None, device: torch.device
                      ) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """The base exactly as the run trained on it (its source, quantization and dtype) plus the saved adapter."""
    trained = run.recipe
    dtype = pick_dtype(trained.model.dtype, device)
    tokenizer = load_tokenizer(str(run.weights), trained)
    base = load_base(run.base_path, trained, device, dtype, num_labels or run.num_labels, tokenizer.pad_token_id)
    model = attach_adapter(base, run)
    return model, tokenizer, {"kind": "run (base + adapter)", "model": trained.model.source,
                              "adapter": str(run.weights), "quantization": trained.model.quantization,
                              "dtype": str(dtype).replace("torch.", "")}


def _plain(path: Path, recipe: Any, num_labels: int | None, device: torch.device
           ) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """A model folder or .gguf file, unquantized, in the recipe's compute dtype."""
    if path.suffix.lower() != ".gguf" and not path.is_dir():
        raise LiteFTError(f"{path} is neither a model folder, a run folder nor a .gguf file")
    source = resolve_source(str(path), recipe.model.allow_pickle)
    plain = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, source=source, quantization="none",
                                                                  revision=None))
    dtype = pick_dtype(recipe.model.dtype, device)
    tokenizer = load_tokenizer(source, plain)
    model = load_base(source, plain, device, dtype, num_labels, tokenizer.pad_token_id)
    kind = "gguf file" if path.suffix.lower() == ".gguf" else "model folder"
    return model, tokenizer, {"kind": kind, "model": str(path), "quantization": "none",
                              "dtype": str(dtype).replace("torch.", "")}


def _write(out: Path, metrics: dict[str, Any], predictions: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    write_jsonl(out / "predictions.jsonl", predictions)


def summary(metrics: dict[str, Any]) -> str:
    """One line of scores for the terminal."""
    scores = metrics["eval"]
    intervals = scores.get("intervals", {})
    shown = ", ".join(f"{k} {describe(v, intervals.get(k))}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in scores.items() if k != "intervals")
    return f"{metrics['evaluated']} ({metrics['kind']}): {shown}"
