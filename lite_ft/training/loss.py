"""Losses, as sums over target units (labelled tokens, or examples for classification), so that an optimizer step
can divide by the step's total: how a step is split into micro-batches never changes what it computes.

The causal-LM loss runs the output layer only where labels exist: on a 49k-token vocabulary that layer over every
prompt position would be a large share of a small model's compute and memory. That shortcut skips whatever the
model's own forward does to its logits (softcapping, `logit_scale`, `logits_scaling`, ...), so the first batch of
every run checks it against the model's own loss (LossGuard) and uses the full forward where they differ.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lite_ft.data.batching import IGNORE

GUARD_RTOL = 1e-4  # relative difference between the fast and the model's own loss that switches to the full forward


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The model's decoder stack and output layer, separately; None when it has no such split."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(base, "get_decoder", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


def target_units(batch: dict[str, torch.Tensor], causal: bool) -> int:
    """What a micro-batch's loss is a sum over: next-token targets (causal) or examples (classification)."""
    if causal:
        return int((batch["labels"][:, 1:] != IGNORE).sum())
    return int(batch["labels"].numel())


def labelled_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], full_forward: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, targets, keep) of the labelled next-token positions: the output layer runs on those positions only
    unless `full_forward` (or the model cannot be split into decoder and head). `keep` marks them in the batch."""
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    parts = None if full_forward else decoder_and_head(model)
    if parts is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
    else:
        decoder, head = parts
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][keep])
    return logits, labels[keep], keep


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], causal: bool, full_forward: bool = False
             ) -> torch.Tensor:
    """Sum of the per-unit cross-entropies of one micro-batch, in fp32.

    Causal: over labelled next-token positions (labelled_logits). Classification: over examples, from the model's
    logits.
    """
    if not causal:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
    logits, targets, keep = labelled_logits(model, batch, full_forward)
    if not bool(keep.any()):
        return logits.sum() * 0.0  # keeps the graph, so a micro-batch without targets still backpropagates
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def row_loss_sums(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[float]:
    """Each example's summed next-token loss (causal), so that scores can be added up example by example in one
    order, however the examples were split into batches or across processes."""
    logits, targets, keep = labelled_logits(model, batch)
    per_position = F.cross_entropy(logits.float(), targets, reduction="none")
    rows = torch.zeros(keep.shape[0], dtype=torch.float64, device=per_position.device)
    rows.index_add_(0, keep.nonzero()[:, 0], per_position.double())
    return rows.tolist()


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labelled positions, and how many there were (the model's own loss)."""
    count = target_units(batch, causal=True)
    return loss_sum(model, batch, causal=True) / max(count, 1), count


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], causal: bool) -> tuple[torch.Tensor, int]:
    """The mean training loss of one micro-batch and the number of target units in it (tokens or examples)."""
    count = target_units(batch, causal)
    return loss_sum(model, batch, causal) / max(count, 1), count


@dataclass
class LossGuard:
    """Chooses, on the first batch, between the fast causal loss and the model's full forward, and says why."""

    causal: bool
    full_forward: bool = False
    checked: bool = False
    report: dict[str, Any] = field(default_factory=dict)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.checked:
            self.check(model, batch)
        return loss_sum(model, batch, self.causal, self.full_forward)

    @torch.no_grad()
    def check(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
        """Compare the fast loss with `model(labels=...).loss` on the batch's first example with targets, in eval
        mode (dropout would make two passes differ). One example keeps the full-vocabulary logits small."""
        self.checked = True
        if not self.causal:
            self.report = {"path": "model forward (classification)"}
            return
        rows = (batch["labels"][:, 1:] != IGNORE).any(1).nonzero()
        if len(rows) == 0 or decoder_and_head(model) is None:
            self.report = {"path": "full forward", "reason": "the model has no separate decoder and output layer"}
            self.full_forward = True
            return
        row = int(rows[0])
        one = {k: v[row:row + 1] for k, v in batch.items()}
        was_training = model.training
        model.eval()
        try:
            fast = (loss_sum(model, one, True) / target_units(one, True)).item()
            own = float(model(**one).loss)
        finally:
            model.train(was_training)
        relative = abs(fast - own) / max(abs(own), 1e-12)
        self.full_forward = not relative <= GUARD_RTOL  # a NaN difference also takes the safe path
        self.report = {"path": "full forward" if self.full_forward else "output layer on labelled positions",
                       "fast_loss": fast, "model_loss": own, "relative_difference": relative,
                       "tolerance": GUARD_RTOL}
        if self.full_forward:
            self.report["reason"] = ("the model post-processes its logits inside forward (the fast loss differs "
                                     "from the model's own); the full forward is used for this run")
