"""Tasks: how raw rows become training examples, and how a model is scored. One module per task."""
from __future__ import annotations

import time
from typing import Any, Protocol

import torch

from lite_ft.data.load import Split
from lite_ft.data.tasks.classification import ClassificationTask
from lite_ft.data.tasks.instruction import InstructionTask
from lite_ft.data.tasks.qa import QATask
from lite_ft.recipe.schema import DataConfig, Recipe


class Task(Protocol):
    name: str
    causal: bool  # trained with the causal-LM loss (qa, instruction) or a classification head
    fields_hint: str  # example data.fields mapping, shown when no row is usable

    def prepare(self, rows: list[Any], cfg: DataConfig, split: str) -> Split:
        """Keep the rows the task can use, reduced to its own fields; count the others by reason."""

    def encode(self, example: dict[str, Any], tokenizer: Any, recipe: Recipe) -> dict[str, Any] | None:
        """Token ids and labels for training; None when the example cannot be used (too long)."""

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, examples: list[dict[str, Any]], recipe: Recipe,
                 device: torch.device) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Scores (percent) and one prediction record per example."""


def get_task(name: str) -> Task:
    """A fresh instance of the task `name` (tasks keep per-run state, e.g. the label names)."""
    return {"qa": QATask, "classification": ClassificationTask, "instruction": InstructionTask}[name]()


def evaluate_timed(task: Task, model: torch.nn.Module, tokenizer: Any, examples: list[dict[str, Any]],
                   recipe: Recipe, device: torch.device) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """task.evaluate, with its wall time (`seconds`) and speed (`examples_per_second`) added to the scores."""
    started = time.perf_counter()
    scores, predictions = task.evaluate(model, tokenizer, examples, recipe, device)
    seconds = time.perf_counter() - started
    scores.update(seconds=seconds, examples_per_second=len(predictions) / max(seconds, 1e-9))
    return scores, predictions
