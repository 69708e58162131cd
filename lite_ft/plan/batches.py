"""Every micro-batch a run will see, from the encoded data alone (tokenizer, no weights): which examples form each
step depends only on the seed and the effective batch (lite_ft.data.batching.epoch_steps), so the run's longest
micro-batch, which sets its peak memory, is known before it starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lite_ft.data.batching import epoch_steps, split_step
from lite_ft.plan.activations import Shape
from lite_ft.recipe.schema import TrainConfig
from lite_ft.training.step import (
    effective_batch,
    example_units,
    planned_steps,
    steps_per_epoch,
)


@dataclass(frozen=True)
class Batches:
    """The micro-batch shapes of a whole run and the figures the time prediction needs."""

    steps: int
    examples: int
    shapes: list[Shape]  # distinct shapes, most padded tokens first
    worst_step: int  # the (1-based) step holding the largest micro-batch
    padded_tokens: int  # over the whole run: what the forward and backward compute on
    real_tokens: int
    micro_batches: int  # over the whole run

    def typical(self) -> Shape | None:
        """The shape closest to the run's mean micro-batch (padded tokens), where it is under 3/4 of the longest:
        a second point for the step's time, whose per-op costs (reading weights, launching ops) do not shrink with
        the tokens. None where the micro-batches are all about as long."""
        mean = self.padded_tokens / max(self.micro_batches, 1)
        nearest = min(self.shapes, key=lambda s: abs(s.rows * s.width - mean))
        longest = self.shapes[0].rows * self.shapes[0].width
        return nearest if nearest.rows * nearest.width < 0.75 * longest else None

    def worst(self, n: int = 2) -> list[Shape]:
        """The shapes that can set the peak: the most padded tokens, and the widest (attention grows faster)."""
        widest = max(self.shapes, key=lambda s: (s.width, s.rows))
        return list(dict.fromkeys([*self.shapes[:n], widest]))


def encode_lengths(task: Any, examples: list[dict[str, Any]], tokenizer: Any, recipe: Any, causal: bool
                   ) -> tuple[list[int], list[int]]:
    """Token lengths and target units of the examples the run keeps (those over data.max_length skipped, as
    lite_ft.run does)."""
    lengths, units = [], []
    for example in examples:
        item = task.encode(example, tokenizer, recipe)
        if item is not None:
            lengths.append(len(item["input_ids"]))
            units.append(example_units(item, causal))
    return lengths, units


def run_batches(lengths: list[int], units: list[int], cfg: TrainConfig) -> Batches:
    """Walk the run's steps as the training loop does (epochs, grouping, micro-batch split) and collect the
    micro-batch shapes."""
    steps = planned_steps(len(lengths), cfg)
    per_epoch = steps_per_epoch(len(lengths), cfg)
    found: dict[tuple[int, int], Shape] = {}
    first_at: dict[tuple[int, int], int] = {}
    padded = real = micro_batches = 0
    done = 0
    epoch = 0
    while done < steps:
        for indices in epoch_steps(lengths, effective_batch(cfg), cfg.seed, epoch, cfg.group_by_length):
            if done == steps:
                break
            done += 1
            for micro in split_step(indices, lengths, cfg.batch_size):
                width = max(lengths[i] for i in micro)
                key = (len(micro), width)
                shape = Shape(rows=len(micro), width=width, units=sum(units[i] for i in micro))
                if key not in found or shape.units > found[key].units:
                    found[key] = shape
                first_at.setdefault(key, done)
                padded += len(micro) * width
                micro_batches += 1
                real += sum(lengths[i] for i in micro)
        epoch += 1
        if per_epoch == 0:
            break
    shapes = sorted(found.values(), key=lambda s: (-(s.rows * s.width), -s.width))
    return Batches(steps=steps, examples=len(lengths), shapes=shapes,
                   worst_step=first_at[(shapes[0].rows, shapes[0].width)], padded_tokens=padded, real_tokens=real,
                   micro_batches=micro_batches)
