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

from lite_ft.data.batching import IGNORE, collate, epoch_steps, split_step
from lite_ft.recipe.precision import Precision
from lite_ft.recipe.schema import TrainConfig
from lite_ft.training.distributed import Dist
from lite_ft.training.loss import LossGuard
from lite_ft.training.memory import StepPhases


def effective_batch(cfg: TrainConfig, world: int = 1) -> int:
    """Examples per optimizer step: micro-batch x accumulation x processes."""
    return cfg.batch_size * cfg.grad_accum * world


def steps_per_epoch(n_examples: int, cfg: TrainConfig, world: int = 1) -> int:
    return math.ceil(n_examples / effective_batch(cfg, world))


def planned_steps(n_examples: int, cfg: TrainConfig, world: int = 1) -> int:
    """Optimizer steps: train.max_steps, else train.epochs passes over the data."""
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * steps_per_epoch(n_examples, cfg, world)))


def example_units(example: dict[str, Any], causal: bool) -> int:
    """Target units of one encoded example: its labelled next-token positions (causal), or 1."""
    return sum(1 for t in example["labels"][1:] if t != IGNORE) if causal else 1


@dataclass
class StepBatches:
    """This process's share of one optimizer step: (micro-batch, weight) pairs, and the whole step's target units
    over every process (known from the encoded examples: no collective needed)."""

    micro: list[tuple[dict[str, torch.Tensor], float]]
    units: int


def step_stream(encoded: list[dict[str, Any]], cfg: TrainConfig, pad_id: int, causal: bool, done: int = 0,
                rank: int = 0, world: int = 1) -> Iterator[StepBatches]:
    """Endless stream of optimizer steps, epoch after epoch, starting after step `done` (how a resumed run finds
    its place: nothing before it is collated).

    A step's micro-batches are dealt to the processes in turn. Each process runs the same number of them, as DDP
    needs: one that is short of a micro-batch runs a copy of another with weight 0 (it adds no gradient).
    """
    lengths = [len(e["input_ids"]) for e in encoded]
    units = [example_units(e, causal) for e in encoded]
    per_epoch = steps_per_epoch(len(encoded), cfg, world)
    epoch, skip = divmod(done, per_epoch)
    while True:
        for indices in epoch_steps(lengths, effective_batch(cfg, world), cfg.seed, epoch, cfg.group_by_length)[skip:]:
            micro = split_step(indices, lengths, cfg.batch_size)
            mine = [(m, 1.0) for m in micro[rank::world]]
            mine += [(micro[0], 0.0)] * (math.ceil(len(micro) / world) - len(mine))
            yield StepBatches([(collate([encoded[i] for i in m], pad_id, causal), w) for m, w in mine],
                              sum(units[i] for i in indices))
        epoch, skip = epoch + 1, 0


class Objective(torch.nn.Module):
    """The model and its loss as one module, so that DDP sees the whole forward (the fast causal loss calls the
    decoder and the output layer separately, which DDP would not see through the model's own forward)."""

    def __init__(self, model: torch.nn.Module, loss: LossGuard) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss(self.model, batch)


@dataclass
class StepResult:
    """What one optimizer step did, over all processes: its mean loss per target unit, the units and real tokens
    it saw, and what was skipped as non-finite."""

    loss: float
    units: int
    tokens: int
    skipped: list[str]
    grad_norm: float
    local_tokens: int = 0  # this process's share of `tokens`


@dataclass
class Stepper:
    """Everything a step needs besides its batches; built once per training session. `objective` is the
    Objective, DDP-wrapped on N processes."""

    model: torch.nn.Module
    objective: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Precision
    loss: LossGuard
    max_grad_norm: float
    dist: Dist
    scaler: torch.amp.GradScaler | None = None

    def step(self, step: StepBatches, phases: StepPhases) -> StepResult:
        """Forward and backward every micro-batch, each scaled by processes / the step's units (DDP averages the
        gradients over the processes), then one update."""
        device, world = self.precision.device, self.dist.world
        total, tokens, skipped = 0.0, 0, []
        for k, (cpu_batch, weight) in enumerate(step.micro):
            batch = {key: v.to(device, non_blocking=True) for key, v in cpu_batch.items()}
            with self.dist.no_sync(self.objective, sync=k == len(step.micro) - 1):
                with phases.part("first_forward"), self.precision.autocast_context():
                    summed = self.objective(batch)
                if not torch.isfinite(summed) and world == 1:  # on N processes every rank must run backward
                    skipped.append(f"the loss is {summed.item()}")
                    continue
                scaled = summed * (weight * world / max(step.units, 1))
                with phases.part("first_backward"):
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += summed.item() * weight
            tokens += int(cpu_batch["attention_mask"].sum()) if weight else 0
        with phases.part("optimizer_step"):
            norm = self._update(skipped)
        local = tokens
        total, tokens = self.dist.sum(total), int(self.dist.sum(tokens))
        return StepResult(loss=total / max(step.units, 1), units=step.units, tokens=tokens, skipped=skipped,
                          grad_norm=norm, local_tokens=local)

    def _update(self, skipped: list[str]) -> float:
        """Clip, step (unless the gradient is non-finite), advance the schedule. With a gradient scaler, the
        scaler skips steps whose scaled gradients overflowed and lowers its scale: that is not an error."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a sharded (DTensor) norm
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif torch.isfinite(norm):
            self.optimizer.step()
        else:
            skipped.append(f"the gradient norm is {norm.item()}")
        self.scheduler.step()
        return float(norm)
