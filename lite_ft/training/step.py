"""One optimizer step, the same for every method: its micro-batches, a token-exact loss, the backward passes, and
the update. The examples of a step depend only on the seed and the effective batch (data.batching.epoch_steps);
its loss is the sum of its token losses over all micro-batches divided by the step's total number of target units,
so splitting a step differently changes nothing beyond float rounding.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lite_ft.data.batching import collate, epoch_steps, split_step
from lite_ft.recipe.precision import Precision
from lite_ft.recipe.schema import TrainConfig
from lite_ft.training.loss import LossGuard, target_units
from lite_ft.training.memory import StepPhases


def effective_batch(cfg: TrainConfig) -> int:
    """Examples per optimizer step: micro-batch x accumulation."""
    return cfg.batch_size * cfg.grad_accum


def steps_per_epoch(n_examples: int, cfg: TrainConfig) -> int:
    return math.ceil(n_examples / effective_batch(cfg))


def planned_steps(n_examples: int, cfg: TrainConfig) -> int:
    """Optimizer steps: train.max_steps, else train.epochs passes over the data."""
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * steps_per_epoch(n_examples, cfg)))


def step_stream(encoded: list[dict[str, Any]], cfg: TrainConfig, pad_id: int, causal: bool, done: int = 0
                ) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Endless stream of optimizer steps, each a list of collated micro-batches, epoch after epoch, starting after
    step `done` (how a resumed run finds its place: nothing before it is collated)."""
    lengths = [len(e["input_ids"]) for e in encoded]
    per_epoch = steps_per_epoch(len(encoded), cfg)
    epoch, skip = divmod(done, per_epoch)
    while True:
        for indices in epoch_steps(lengths, effective_batch(cfg), cfg.seed, epoch, cfg.group_by_length)[skip:]:
            yield [collate([encoded[i] for i in micro], pad_id, causal)
                   for micro in split_step(indices, lengths, cfg.batch_size)]
        epoch, skip = epoch + 1, 0


@dataclass
class StepResult:
    """What one optimizer step did: its mean loss per target unit, the units and real tokens it saw, and the
    number of micro-batches or updates skipped as non-finite."""

    loss: float
    units: int
    tokens: int
    skipped: list[str]
    grad_norm: float


@dataclass
class Stepper:
    """Everything a step needs besides its batches; built once per training session."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Precision
    loss: LossGuard
    max_grad_norm: float
    scaler: torch.amp.GradScaler | None = None

    def step(self, micro_batches: list[dict[str, torch.Tensor]], phases: StepPhases) -> StepResult:
        """Forward and backward every micro-batch (each scaled by 1 / the step's units), then one update."""
        device = self.precision.device
        units = sum(target_units(b, self.loss.causal) for b in micro_batches)
        total, tokens, skipped = 0.0, 0, []
        for cpu_batch in micro_batches:
            batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
            with phases.part("first_forward"), self.precision.autocast_context():
                summed = self.loss(self.model, batch)
            if not torch.isfinite(summed):
                skipped.append(f"the loss is {summed.item()}")
                continue
            scaled = summed / max(units, 1)
            with phases.part("first_backward"):
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += summed.item()
            tokens += int(cpu_batch["attention_mask"].sum())
        with phases.part("optimizer_step"):
            norm = self._update(skipped)
        return StepResult(loss=total / max(units, 1), units=units, tokens=tokens, skipped=skipped, grad_norm=norm)

    def _update(self, skipped: list[str]) -> float:
        """Clip, step (unless the gradient is non-finite), advance the schedule. With a gradient scaler, the
        scaler skips steps whose scaled gradients overflowed and lowers its scale: that is not an error."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or float("inf"))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif torch.isfinite(norm):
            self.optimizer.step()
        else:
            skipped.append(f"the gradient norm is {norm.item()}")
        self.scheduler.step()
        return float(norm)
