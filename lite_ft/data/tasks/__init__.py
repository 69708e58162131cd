"""Tasks: how raw rows become training examples, and how a model is scored. One module per task."""
from __future__ import annotations

import time
from typing import Any, Protocol

import torch

from lite_ft.data.load import Split
from lite_ft.data.tasks.classification import ClassificationTask
from lite_ft.data.tasks.instruction import InstructionTask
from lite_ft.data.tasks.qa import QATask
from lite_ft.intervals import score_intervals
from lite_ft.recipe.schema import DataConfig, Recipe
from lite_ft.training.distributed import Dist


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

    def eval_order(self, examples: list[dict[str, Any]], tokenizer: Any, recipe: Recipe) -> list[int]:
        """The order in which evaluate batches the examples (and the examples it scores at all)."""

    def score(self, records: list[dict[str, Any]], shard_scores: dict[str, Any]) -> dict[str, Any]:
        """Scores from the prediction records of every example (`shard_scores`: one process's own scores)."""


def get_task(name: str) -> Task:
    """A fresh instance of the task `name` (tasks keep per-run state, e.g. the label names)."""
    return {"qa": QATask, "classification": ClassificationTask, "instruction": InstructionTask}[name]()


def evaluate_timed(task: Task, model: torch.nn.Module, tokenizer: Any, examples: list[dict[str, Any]],
                   recipe: Recipe, device: torch.device, dist: Dist | None = None
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """task.evaluate over all processes, with its wall time (`seconds`) and speed (`examples_per_second`).

    The examples are cut into the batches one process would make (task.eval_order, then eval.batch_size), and
    whole batches are dealt to the processes; the records come back in the examples' order and the scores are
    computed from them. So N processes give the same predictions and scores as one. `intervals`: each score's
    95% interval and n (lite_ft.intervals).
    """
    dist = dist or Dist()
    started = time.perf_counter()
    order = task.eval_order(examples, tokenizer, recipe)
    size = recipe.eval.batch_size
    batches = [order[s:s + size] for s in range(0, len(order), size)]
    mine = [i for batch in batches[dist.rank::dist.world] for i in batch]
    shard_scores, records = task.evaluate(model, tokenizer, [examples[i] for i in mine], recipe, device)
    by_index = {i: r for part_indices, part_records, _ in dist.gather((mine, records, shard_scores))
                for i, r in zip(part_indices, part_records)}
    records = [by_index[i] for i in sorted(by_index)]
    scores = task.score(records, shard_scores)
    scores["intervals"] = score_intervals(task.name, records)  # 95%, over these examples; seeded
    seconds = time.perf_counter() - started
    scores.update(seconds=seconds, examples_per_second=len(records) / max(seconds, 1e-9))
    return scores, records
