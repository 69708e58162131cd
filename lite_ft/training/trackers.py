"""Experiment trackers (`output.report_to: [tensorboard]`, also wandb and mlflow when installed), through
accelerate's tracker classes: every logging step's loss, learning rate, tokens/s and memory, and every
evaluation's eval loss and scores, from rank 0.
train_log.jsonl stays the record of the run; trackers are for watching it."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from accelerate.tracking import LOGGER_TYPE_TO_CLASS

LOGGED = {"loss": "train/loss", "lr": "train/lr", "tokens_per_second": "train/tokens_per_second",
          "memory_mib": "train/memory_mib",
          # evaluations during training (eval.every), with the task scores eval.during_limit adds
          "eval_loss": "eval/loss", "exact_match": "eval/exact_match", "f1": "eval/f1", "accuracy": "eval/accuracy",
          "macro_f1": "eval/macro_f1"}


class Trackers:
    """The trackers a recipe asks for, started in `folder` (those that write locally) under `run_name`."""

    def __init__(self, names: list[str], run_name: str, folder: Path) -> None:
        self.folder = folder
        self.trackers = []
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            takes_dir = "logging_dir" in inspect.signature(cls.__init__).parameters
            tracker = cls(run_name, logging_dir=str(folder)) if takes_dir else cls(run_name)
            tracker.start()
            self.trackers.append(tracker)

    def log(self, entry: dict[str, Any]) -> None:
        """One train_log.jsonl entry (a logging step's or an evaluation's), at its step."""
        values = {tag: float(entry[key]) for key, tag in LOGGED.items() if key in entry}
        for tracker in self.trackers:
            tracker.log(values, step=int(entry["step"]))

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
