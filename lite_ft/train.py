"""The training loop, the same for full fine-tuning, LoRA and QLoRA: only trainable parameters are optimized,
whatever the model builder left trainable."""
from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lite_ft import checkpoint
from lite_ft.batching import collate, epoch_batches
from lite_ft.config import Recipe, TrainConfig
from lite_ft.errors import Interrupted, LiteFTError, OutOfMemory, TrainingStopped
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


def _micro_batches(encoded: list[dict[str, Any]], cfg: TrainConfig, pad_id: int, causal: bool, skip: int = 0
                   ) -> Iterator[dict[str, torch.Tensor]]:
    """Endless stream of collated micro-batches, epoch after epoch, each epoch in a new seeded order.

    The first `skip` micro-batches are passed over without collating: that is how a resumed run finds its place.
    """
    lengths = [len(e["input_ids"]) for e in encoded]
    epoch = 0
    while True:
        for idx in epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length):
            if skip:
                skip -= 1
                continue
            yield collate([encoded[i] for i in idx], pad_id, causal)
        epoch += 1


@dataclass
class Checkpointing:
    """Where and how often the loop saves checkpoints, and the verified checkpoint to resume from."""

    folder: Path
    recipe: Recipe
    resume: Path | None = None


class _StopFlag:
    """Turns Ctrl-C into a flag checked between optimizer steps, so a step is never cut in half."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train(model: torch.nn.Module, encoded: list[dict[str, Any]], cfg: TrainConfig, *, pad_id: int, causal: bool,
          device: torch.device, monitor: MemoryMonitor, log_path: Path | None = None,
          checkpointing: Checkpointing | None = None) -> dict[str, Any]:
    """Train for planned_steps(...) optimizer steps; returns the figures that metrics.json reports under `train`.

    Writes one JSON line per logging step to `log_path`. Memory phases: first_forward, first_backward,
    optimizer_step (all of the first step) and steady_state (the rest). With `checkpointing`, saves every
    cfg.save_every steps and on Ctrl-C, and resumes from `checkpointing.resume`: weights, optimizer, scheduler, RNG
    states and data position, so the result equals an uninterrupted run's.
    """
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LiteFTError("the model has no trainable parameters; check method and lora.target_modules")
    optimizer = make_optimizer(params, cfg)
    total = planned_steps(len(encoded), cfg)
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total),
                              num_training_steps=total)
    done, consumed, real_tokens = 0, 0, 0  # optimizer steps, micro-batches and non-padding tokens so far
    session_tokens = 0  # non-padding tokens of this process, for tokens/s
    if checkpointing and checkpointing.resume:
        resumed = checkpoint.load(checkpointing.resume, model, optimizer, scheduler)
        done, consumed, real_tokens = resumed.step, resumed.micro_batches, resumed.real_tokens
    batches = _micro_batches(encoded, cfg, pad_id, causal, skip=consumed)

    def save() -> Path | None:
        if checkpointing is None:
            return None
        return checkpoint.save(checkpointing.folder, done, model, optimizer, scheduler, consumed, real_tokens,
                               checkpointing.recipe, cfg.keep_checkpoints)

    log_file = _open_log(log_path, done) if log_path else None
    model.train()
    window_loss, window_n, window_tokens, window_t0 = 0.0, 0, 0, time.perf_counter()
    final_loss = float("nan")  # mean loss of the last logging window: steadier than one step's loss
    bad = 0  # micro-batches skipped for a non-finite loss or gradient
    started, first_step = time.perf_counter(), done + 1
    phase = "first_forward"
    bar = tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True)
    try:
        with _StopFlag() as stop:
            for step in range(done + 1, total + 1):
                first = step == first_step
                step_loss = 0.0
                with (nullcontext() if first else monitor.phase("steady_state")):
                    for _ in range(cfg.grad_accum):
                        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
                        consumed += 1
                        phase = "first_forward" if first else "steady_state"
                        with (monitor.phase("first_forward") if first else nullcontext()):
                            loss, _ = batch_loss(model, batch, causal)
                        if not torch.isfinite(loss):
                            bad += 1
                            _check_bad(bad, cfg, step, f"the loss is {loss.item()}", checkpointing)
                            continue
                        phase = "first_backward" if first else "steady_state"
                        with (monitor.phase("first_backward") if first else nullcontext()):
                            (loss / cfg.grad_accum).backward()
                        step_loss += loss.item() / cfg.grad_accum
                        tokens = int(batch["attention_mask"].sum())
                        real_tokens += tokens
                        session_tokens += tokens
                        window_tokens += tokens
                    phase = "optimizer_step" if first else "steady_state"
                    with (monitor.phase("optimizer_step") if first else nullcontext()):
                        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
                        if torch.isfinite(norm):
                            optimizer.step()
                        else:
                            bad += 1
                            _check_bad(bad, cfg, step, f"the gradient norm is {norm.item()}", checkpointing)
                        scheduler.step()
                        if first:  # gradients and optimizer state all exist now: measure what they hold
                            monitor.record_tensors(model, optimizer)
                        optimizer.zero_grad(set_to_none=True)
                done = step
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
                if cfg.save_every and step % cfg.save_every == 0 and step < total:
                    save()
                if stop.raised:
                    path = save()
                    where = f"checkpoint {path}" if path else "no checkpoint (none configured)"
                    raise Interrupted(f"interrupted after step {step} of {total}; saved {where}. Run the same "
                                      "command with --resume to continue.")
    except torch.cuda.OutOfMemoryError:
        raise OutOfMemory(_oom_message(monitor, phase, cfg)) from None
    finally:
        bar.close()
        if log_file:
            log_file.close()
    wall = time.perf_counter() - started
    steps_run = max(total - first_step + 1, 1)
    return {"steps": total, "final_loss": final_loss, "tokens_per_second": session_tokens / max(wall, 1e-9),
            "real_tokens": real_tokens,
            "seconds_per_step": wall / steps_run, "wall_seconds": wall, "resumed_from_step": first_step - 1,
            "skipped_nonfinite": bad}


def _open_log(path: Path, done: int) -> Any:
    """The training log for appending; on resume, entries past the checkpoint's step are dropped (they are
    trained again)."""
    kept = []
    if done and path.exists():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= done]
    f = open(path, "w", encoding="utf-8")
    f.writelines(line + "\n" for line in kept)
    return f


def _check_bad(bad: int, cfg: TrainConfig, step: int, what: str, ck: Checkpointing | None) -> None:
    """Allow up to cfg.skip_nonfinite bad micro-batches; past that, stop with the causes and the last checkpoint."""
    if bad <= cfg.skip_nonfinite:
        return
    last = checkpoint.latest_valid(ck.folder)[0] if ck else None
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    raise TrainingStopped(
        f"{what} at step {step}: training diverged. Likely causes: learning rate too high (lower train.lr), fp16 "
        "overflow (use model.dtype bfloat16 or float32), or broken examples in this batch (set "
        f"train.skip_nonfinite to skip a few). {kept}.")


def _oom_message(monitor: MemoryMonitor, phase: str, cfg: TrainConfig) -> str:
    peak, where = monitor.peak()
    capacity = ""
    if monitor.device.type == "cuda":
        capacity = f", of {torch.cuda.get_device_properties(monitor.device).total_memory / 2**20:.0f} MiB"
    half = max(cfg.batch_size // 2, 1)
    return (f"out of GPU memory during {phase} (peak so far {peak:.0f} MiB in {where}{capacity}). "
            f"Changes that lower it: train.batch_size={half} train.grad_accum={cfg.grad_accum * 2} (same effective "
            "batch), train.gradient_checkpointing=true, train.optimizer=adamw8bit, method=qlora (4-bit base), a "
            "smaller data.max_length; or train.auto_batch_size=true to retry smaller micro-batches automatically.")
