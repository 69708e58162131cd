"""Batches: padding collation and length-grouped ordering, so little compute goes to padding tokens."""
from __future__ import annotations

import random
from typing import Any

import torch

IGNORE = -100  # label value that the loss skips (prompt and padding positions)


def collate(examples: list[dict[str, Any]], pad_id: int, causal: bool) -> dict[str, torch.Tensor]:
    """Right-pad input_ids to the longest example; labels are token lists (causal) or class indices."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long) if causal else None
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        mask[row, :n] = 1
        if labels is not None:
            labels[row, :n] = torch.tensor(e["labels"])
    batch = {"input_ids": ids, "attention_mask": mask}
    batch["labels"] = labels if labels is not None else torch.tensor([e["labels"] for e in examples])
    return batch


def epoch_steps(lengths: list[int], step_size: int, seed: int, epoch: int, group_by_length: bool
                ) -> list[list[int]]:
    """Example indices of each optimizer step of one epoch; `step_size` is the effective batch.

    Which examples share a step depends only on the seed, the epoch and the effective batch, never on how a step is
    later split into micro-batches (split_step) or across processes. With grouping: shuffle, cut into chunks of 50
    steps, sort each chunk by length, cut it into steps, then shuffle the steps: a step holds similar lengths, and
    the order stays random.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        chunk = step_size * 50
        order = [i for s in range(0, len(order), chunk)
                 for i in sorted(order[s:s + chunk], key=lambda i: lengths[i], reverse=True)]
    steps = [order[s:s + step_size] for s in range(0, len(order), step_size)]
    if group_by_length:
        rng.shuffle(steps)
    return steps


def split_step(indices: list[int], lengths: list[int], batch_size: int) -> list[list[int]]:
    """One step's examples as micro-batches of at most `batch_size`, longest first: each micro-batch pads to
    similar lengths. Ties keep the step's order, so the split is deterministic."""
    ordered = sorted(indices, key=lambda i: -lengths[i])
    return [ordered[s:s + batch_size] for s in range(0, len(ordered), batch_size)]
