"""Evaluation during training (`eval.every`): the eval loss, teacher-forced through the training loss, and
optionally the task's scores on a few examples; and what keep_best / early_stop make of them (Tracking).

The eval loss is the training loss's own definition: the sum of the per-unit losses over every eval example
divided by their target units (answer tokens, or examples for classification). On N processes each rank takes
every N-th batch, and the per-batch sums are gathered and added up in batch order (math.fsum), so the figure is
the same on any number of processes.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lite_ft.data.batching import collate
from lite_ft.recipe.precision import Precision
from lite_ft.recipe.schema import LOWER_IS_BETTER, EarlyStop
from lite_ft.training import checkpoint, sharding
from lite_ft.training.checkpoint import Checkpointing
from lite_ft.training.distributed import Dist
from lite_ft.training.loss import LossGuard, target_units


@dataclass
class DuringEval:
    """What each evaluation during training runs. `batches`: the eval examples encoded as for training (CPU
    tensors, fixed order); `scores`: the task's scores on eval.during_limit examples, or None (eval loss only)."""

    every: int
    batches: list[dict[str, torch.Tensor]]
    causal: bool
    examples: int  # eval examples in the batches (those that fit data.max_length)
    scores: Callable[[], dict[str, Any]] | None = None

    def due(self, step: int, total: int) -> bool:
        """Every `every` optimizer steps, and after the last one."""
        return step % self.every == 0 or step == total

    @torch.no_grad()
    def __call__(self, step: int, model: torch.nn.Module, loss: LossGuard, precision: Precision,
                 dist: Dist) -> dict[str, Any]:
        """One evaluation after `step`: the train_log.jsonl entry (step, eval_loss, the scores, seconds)."""
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        # Under FSDP every rank must run the same forwards (its all-gathers are collectives): each does them all.
        mine = list(range(len(self.batches))) if dist.fsdp else list(range(dist.rank, len(self.batches), dist.world))
        found = []
        try:
            with dist.unsharded():
                for i in mine:
                    batch = {k: v.to(precision.device) for k, v in self.batches[i].items()}
                    with precision.autocast_context():
                        summed = loss(model, batch)
                    found.append((i, float(summed), target_units(batch, self.causal)))
                parts = {i: (s, u) for part in dist.gather(found) for i, s, u in part}
                entry: dict[str, Any] = {"step": step}
                if self.scores is not None:
                    scores = self.scores()  # the task's own scores (percent), on eval.during_limit examples
                    entry.update({k: v for k, v in scores.items() if isinstance(v, float)
                                  and k not in ("seconds", "examples_per_second")}, scores_n=scores.get("n"))
        finally:
            model.train(was_training)
        total = math.fsum(parts[i][0] for i in sorted(parts))
        units = sum(parts[i][1] for i in sorted(parts))
        entry.update(eval_loss=total / max(units, 1), eval_units=units, eval_examples=self.examples,
                     eval_seconds=time.perf_counter() - started)
        return entry


def eval_batches(encoded: list[dict[str, Any]], size: int, pad_id: int, causal: bool
                 ) -> list[dict[str, torch.Tensor]]:
    """The encoded eval examples as padded batches of `size`, shortest first (little padding; a fixed order)."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    return [collate([encoded[i] for i in order[s:s + size]], pad_id, causal) for s in range(0, len(order), size)]


def better(metric: str, value: float, than: float | None) -> bool:
    """Whether `value` of `metric` improves on `than` (None: nothing yet). A NaN never improves."""
    if math.isnan(value):
        return False
    if than is None:
        return True
    return value < than if metric in LOWER_IS_BETTER else value > than


@dataclass
class Tracking:
    """Best-so-far for train.keep_best, and the early-stop metric's best and patience counter. Its `state()` goes
    into every checkpoint, so a resumed run continues counting where it stopped."""

    keep: str | None = None
    stop: EarlyStop | None = None
    best: dict[str, Any] | None = None  # keep_best: {metric, value, step}
    stop_best: dict[str, Any] | None = None  # early_stop: {metric, value, step}
    since: int = 0  # evaluations since early_stop.metric last improved
    stopped: int | None = None  # the step early stopping ended training after
    history: list[dict[str, Any]] = field(default_factory=list)  # [{step, metric: value}] of the tracked metrics

    def update(self, entry: dict[str, Any]) -> bool:
        """Take one evaluation's entry; True when it is the new best for keep_best (its weights must be kept)."""
        step = entry["step"]
        tracked = {m: float(entry[m]) for m in {self.keep, self.stop.metric if self.stop else None} if m}
        self.history.append({"step": step, **tracked})
        improved = False
        if self.keep and better(self.keep, tracked[self.keep], self.best and self.best["value"]):
            self.best = {"metric": self.keep, "value": tracked[self.keep], "step": step}
            improved = True
        if self.stop:
            metric = self.stop.metric
            if better(metric, tracked[metric], self.stop_best and self.stop_best["value"]):
                self.stop_best, self.since = {"metric": metric, "value": tracked[metric], "step": step}, 0
            else:
                self.since += 1
            if self.since >= self.stop.patience:
                self.stopped = step
        return improved

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "stop_best": self.stop_best, "since": self.since, "stopped": self.stopped,
                "history": self.history}

    def restore(self, state: dict[str, Any] | None) -> None:
        """Continue from a checkpoint's state (nothing to restore from a checkpoint written without tracking)."""
        if state:
            self.best, self.stop_best = state.get("best"), state.get("stop_best")
            self.since, self.stopped = state.get("since", 0), state.get("stopped")
            self.history = list(state.get("history", []))

    def report(self) -> dict[str, Any]:
        """What metrics.json says under train: the kept step and why, and whether and where training stopped."""
        out: dict[str, Any] = {}
        if self.keep:
            out["best"] = self.best
        if self.stop:
            out["early_stop"] = {"metric": self.stop.metric, "patience": self.stop.patience,
                                 "stopped_after_step": self.stopped, "best": self.stop_best,
                                 "evaluations_without_improvement": self.since}
        return out


class KeptWeights:
    """The best evaluation's trainable weights: in checkpoints/best/ when the run checkpoints (they survive a
    crash and a resume), else in rank 0's memory. Gathered from every rank under FSDP; kept by rank 0."""

    def __init__(self, ck: Checkpointing | None, dist: Dist) -> None:
        self.ck, self.dist, self.memory = ck, dist, None

    def keep(self, step: int, stepper: Any, best: dict[str, Any]) -> None:
        trainable = sharding.full_trainable(stepper.model) if self.dist.fsdp else \
            {n: p.detach().to("cpu", copy=True) for n, p in stepper.model.named_parameters() if p.requires_grad}
        if self.dist.is_main:
            if self.ck is None:
                self.memory = trainable
            else:
                checkpoint.save_best(self.ck, step, trainable, best)
        self.dist.barrier()  # no rank goes on before rank 0 holds them

    def restore(self, step: int, stepper: Any) -> None:
        """Put the kept weights back into the model on every rank: rank 0 reads them and sends them on (the other
        ranks may run on machines without the run folder)."""
        weights = None
        if self.dist.is_main:
            weights = self.memory if self.ck is None else checkpoint.load_best(self.ck.folder, step)
        weights = self.dist.broadcast(weights)
        if self.dist.fsdp:
            sharding.load_trainable(stepper.model, weights)
            return
        params = dict(stepper.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
