"""Activation memory and FLOPs of one micro-batch, measured by replaying lite-ft's loss, forward and backward on the
`meta` device (lite_ft.plan.tracker counts every tensor the real computation would allocate; nothing is computed).

What is measured is the transient memory of a micro-batch on top of the weights, gradients and optimizer state:
the activations autograd keeps for backward (their total at the end of the forward), and the peak over forward,
loss and backward (the output layer's logits, the backward's temporaries).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lite_ft.plan.op_times import OpTrace
from lite_ft.plan.parts import MIB, MetaModel
from lite_ft.plan.tracker import LiveBytes, cpu_attention_kernel
from lite_ft.training.attention import WORKSPACE, replaying
from lite_ft.training.loss import decoder_and_head


@dataclass(frozen=True)
class Shape:
    """One micro-batch: rows, padded width, and the target units its loss sums over (labelled positions)."""

    rows: int
    width: int
    units: int


@dataclass(frozen=True)
class Transient:
    """MiB a micro-batch adds on top of the run's static tensors, and its FLOPs."""

    activations_mib: float  # kept for backward at the end of the decoder's forward
    peak_mib: float  # the most at once over forward, loss and backward
    flops: float  # forward + backward (recomputation included)
    small_peak_mib: float = 0.0  # of the peak, in tensors under the allocator's mmap threshold (glibc's heap)
    ops: OpTrace | None = field(default=None, compare=False, repr=False)  # what ran, for timing (op_times)

    @property
    def workspace_mib(self) -> float:
        """The output layer, loss and backward temporaries: what the peak holds beyond the kept activations."""
        return max(self.peak_mib - self.activations_mib, 0.0)


def measure(meta: MetaModel, shape: Shape, causal: bool, device: str = "meta", threshold: int | None = None,
            target: str = "cpu") -> Transient:
    """Replay one micro-batch of `shape` as in a steady-state step: the gradients already exist (made here as
    zeros) and accumulate in place. `threshold`: the mmap threshold in bytes (None: every tensor counts as small).
    `device` "cpu" runs the same count on a real model (how tests check the replay); `target`: the device of the
    run replayed (the fused LoRA layers' attention kernel differs)."""
    model = meta.model
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    known = [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters() if p.grad is not None)]
    tracker = LiveBytes(known=known, threshold=threshold)
    ops = OpTrace()
    WORKSPACE.clear()  # the attention kernel's buffers: made during the replay, as in a run's first step
    with cpu_attention_kernel(), replaying(target), tracker, ops:
        loss = _loss(model, shape, causal, device, tracker)
        loss.backward()
        del loss
    return Transient(activations_mib=tracker.marks.get("forward", 0) / MIB, peak_mib=tracker.peak / MIB,
                     flops=ops.flops(), small_peak_mib=tracker.small_at_peak / MIB, ops=ops)


def _loss(model: torch.nn.Module, shape: Shape, causal: bool, device: str, tracker: LiveBytes
          ) -> torch.Tensor:
    """lite-ft's loss (lite_ft.training.loss.loss_sum) on meta inputs: the output layer on the labelled positions
    only (causal), the model's own logits (classification). The padding mask is the 4-D boolean mask transformers
    builds for SDPA (built directly: the meta device cannot inspect a mask's values)."""
    rows, width = shape.rows, shape.width
    ids = torch.zeros(rows, width, dtype=torch.long, device=device)
    mask = torch.ones(rows, 1, width, width, dtype=torch.bool, device=device)
    if not causal:
        logits = model(input_ids=ids, attention_mask=mask).logits
        tracker.mark("forward")
        return F.cross_entropy(logits.float(), torch.zeros(rows, dtype=torch.long, device=device),
                               reduction="sum")
    parts = decoder_and_head(model)
    if parts is None:
        raise RuntimeError("planning needs a model with a separate decoder and output layer")
    decoder, head = parts
    hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    tracker.mark("forward")
    picked = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(
        0, torch.zeros(max(shape.units, 1), dtype=torch.long, device=device))
    logits = head(picked)
    targets = torch.zeros(logits.shape[0], dtype=torch.long, device=device)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def measure_eval(meta: MetaModel, rows: int, width: int, generate: bool, threshold: int | None = None,
                 device: str = "meta") -> Transient:
    """One eval batch without gradients: `rows` prompts `width` tokens wide through the model. `generate` (qa):
    with the KV cache and the output layer on the last position only, as lite-ft's greedy decoding runs its
    prefill (`width` is then the prompt plus eval.max_new_tokens: the most the cache holds); else the model's own
    logits (classification)."""
    model = meta.model
    tracker = LiveBytes(known=[*model.parameters(), *model.buffers()], threshold=threshold)
    ids = torch.zeros(rows, width, dtype=torch.long, device=device)
    mask = torch.ones(rows, 1, width, width, dtype=torch.bool, device=device)
    kwargs = {"use_cache": True, "logits_to_keep": 1} if generate else {}
    with torch.no_grad(), cpu_attention_kernel(), tracker:
        out = model(input_ids=ids, attention_mask=mask, **kwargs)
        del out
    return Transient(activations_mib=0.0, peak_mib=tracker.peak / MIB, flops=0.0,
                     small_peak_mib=tracker.small_at_peak / MIB)


def scale_flops(flops: float, measured: Shape, tokens: int) -> float:
    """FLOPs for `tokens` padded tokens, from a replay of `measured` (linear in tokens: attention's quadratic
    share is small at these lengths and is kept at the measured width)."""
    return flops * tokens / max(measured.rows * measured.width, 1)


def optimizer_transient_mib(trainable_values: int, optimizer: str, device: str) -> float:
    """Temporaries of one optimizer step, MiB. On CUDA: torch's AdamW runs the foreach implementation, which holds
    one fp32 copy of all second moments' square roots at once; bitsandbytes' 8-bit kernel updates in place, block
    by block. On the CPU both run tensor by tensor, so the largest tensor's temporaries (`trainable_values`) set
    it: torch's AdamW 8 bytes per value, bitsandbytes' 8-bit AdamW 20 (its CPU path dequantizes both moments to
    fp32, copies the gradient and builds the denominator; measured one step on a 28.3M-value tensor: 540 MiB)."""
    if device == "cuda":
        return 0.0 if optimizer == "adamw8bit" else 4 * trainable_values / MIB
    return (20 if optimizer == "adamw8bit" else 8) * trainable_values / MIB
