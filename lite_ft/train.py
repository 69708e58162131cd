"""The training loop, the same for full fine-tuning, LoRA and QLoRA: only trainable parameters are optimized,
whatever the model builder left trainable."""
from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from lite_ft.batching import collate, epoch_batches
from lite_ft.config import TrainConfig
from lite_ft.errors import LiteFTError
from lite_ft.loss import batch_loss
from lite_ft.memory import MemoryMonitor


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (optimizer state in 8 bits: about a quarter of the memory)."""
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def planned_steps(n_examples: int, cfg: TrainConfig) -> int:
    """Optimizer steps: train.max_steps, else train.epochs passes over the data."""
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = math.ceil(n_examples / cfg.batch_size)
    return max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))


def _micro_batches(encoded: list[dict[str, Any]], cfg: TrainConfig, pad_id: int, causal: bool
                   ) -> Iterator[dict[str, torch.Tensor]]:
    """Endless stream of collated micro-batches, epoch after epoch, each epoch in a new seeded order."""
    lengths = [len(e["input_ids"]) for e in encoded]
    epoch = 0
    while True:
        for idx in epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length):
            yield collate([encoded[i] for i in idx], pad_id, causal)
        epoch += 1


def train(model: torch.nn.Module, encoded: list[dict[str, Any]], cfg: TrainConfig, *, pad_id: int, causal: bool,
          device: torch.device, monitor: MemoryMonitor, log_path: Path | None = None) -> dict[str, Any]:
    """Train for planned_steps(...) optimizer steps; returns the figures that metrics.json reports under `train`.

    Writes one JSON line per logging step to `log_path`. Memory phases: first_forward, first_backward,
    optimizer_step (all of step 1) and steady_state (the rest).
    """
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LiteFTError("the model has no trainable parameters; check method and lora.target_modules")
    optimizer = make_optimizer(params, cfg)
    total = planned_steps(len(encoded), cfg)
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total),
                              num_training_steps=total)
    batches = _micro_batches(encoded, cfg, pad_id, causal)
    log_file = open(log_path, "w", encoding="utf-8") if log_path else None
    model.train()
    real_tokens = 0  # non-padding tokens seen, for tokens/s
    window_loss, window_n, window_tokens, window_t0 = 0.0, 0, 0, time.perf_counter()
    final_loss = float("nan")  # mean loss of the last logging window: steadier than one step's loss
    started = time.perf_counter()
    bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)
    try:
        for step in range(1, total + 1):
            first = step == 1
            step_loss = 0.0
            with (nullcontext() if first else monitor.phase("steady_state")):
                for _ in range(cfg.grad_accum):
                    batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
                    with (monitor.phase("first_forward") if first else nullcontext()):
                        loss, _ = batch_loss(model, batch, causal)
                    if not torch.isfinite(loss):
                        raise LiteFTError(f"the loss is {loss.item()} at step {step}: training diverged. Likely "
                                          "causes: learning rate too high (lower train.lr), fp16 overflow (use "
                                          "model.dtype bfloat16 or float32), or broken data in this batch")
                    with (monitor.phase("first_backward") if first else nullcontext()):
                        (loss / cfg.grad_accum).backward()
                    step_loss += loss.item() / cfg.grad_accum
                    real_tokens += int(batch["attention_mask"].sum())
                    window_tokens += int(batch["attention_mask"].sum())
                with (monitor.phase("optimizer_step") if first else nullcontext()):
                    if cfg.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            window_loss += step_loss
            window_n += 1
            if step % cfg.log_every == 0 or step == total:
                elapsed = time.perf_counter() - window_t0
                entry = {"step": step, "loss": window_loss / window_n, "lr": scheduler.get_last_lr()[0],
                         "tokens_per_second": window_tokens / max(elapsed, 1e-9),
                         "memory_mib": monitor.current_mib(), "elapsed_s": time.perf_counter() - started}
                final_loss = entry["loss"]
                if log_file:
                    log_file.write(json.dumps(entry) + "\n")
                    log_file.flush()
                bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{entry['tokens_per_second']:.0f}",
                                mem=f"{entry['memory_mib']:.0f}MiB")
                window_loss, window_n, window_tokens, window_t0 = 0.0, 0, 0, time.perf_counter()
            bar.update(1)
    finally:
        bar.close()
        if log_file:
            log_file.close()
    wall = time.perf_counter() - started
    return {"steps": total, "final_loss": final_loss, "tokens_per_second": real_tokens / max(wall, 1e-9),
            "real_tokens": real_tokens, "seconds_per_step": wall / total, "wall_seconds": wall}
