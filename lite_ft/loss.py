"""Losses. The causal-LM loss runs the output layer only where labels exist: on a 49k-token vocabulary that layer
over every prompt position would be a large share of a small model's compute and memory."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(base, "get_decoder", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or head is None or decoder is base:
        return None
    config = getattr(base, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None  # the head's output is post-processed inside forward (Gemma 2, Cohere): use the full pass
    return decoder, head


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labelled positions, and how many there were.

    Equal to the model's own loss (`model(**batch).loss`), computed on the hidden states of labelled positions only.
    Models whose decoder and head cannot be separated use their full forward pass.
    """
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    count = int(keep.sum())
    parts = _decoder_and_head(model)
    if parts is None:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[:, :-1][keep]
    else:
        decoder, head = parts
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][keep])
    loss = F.cross_entropy(logits.float(), labels[keep], reduction="mean") if count else logits.sum() * 0.0
    return loss, count


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], causal: bool) -> tuple[torch.Tensor, int]:
    """The training loss of one micro-batch and the number of target units in it (tokens or examples)."""
    if causal:
        return causal_lm_loss(model, batch)
    out = model(**batch)
    return out.loss, int(batch["labels"].numel())
