"""The training loop, the same for full fine-tuning, LoRA and QLoRA: only trainable parameters are optimized,
whatever the model builder left trainable. One step's work is in training.step; this module is the bookkeeping
around it: resume, logging, progress, checkpoints, interrupts and out-of-memory advice.
"""
from __future__ import annotations

import json
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from lite_ft.errors import Interrupted, LiteFTError, OutOfMemory, TrainingStopped
from lite_ft.recipe.precision import Precision
from lite_ft.recipe.schema import TrainConfig
from lite_ft.training import checkpoint
from lite_ft.training.checkpoint import Checkpointing
from lite_ft.training.loss import LossGuard
from lite_ft.training.memory import MemoryMonitor, StepPhases
from lite_ft.training.step import StepResult, Stepper, planned_steps, step_stream


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (optimizer state in 8 bits: about a quarter of the memory)."""
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb  # only here: ~1 s to import, and only this optimizer needs it

        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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


@dataclass
class _Log:
    """The logging window: mean step loss and tokens/s since the last entry, written to train_log.jsonl and the
    progress bar every cfg.log_every steps."""

    file: TextIO | None
    bar: Any
    monitor: MemoryMonitor
    started: float = field(default_factory=time.perf_counter)
    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    t0: float = field(default_factory=time.perf_counter)
    final_loss: float = float("nan")  # mean loss of the last window: steadier than one step's loss

    def add(self, step: int, result: StepResult, lr: float, last: bool, every: int) -> None:
        self.loss, self.steps, self.tokens = self.loss + result.loss, self.steps + 1, self.tokens + result.tokens
        self.bar.update(1)
        if step % every and not last:
            return
        now = time.perf_counter()
        entry = {"step": step, "loss": self.loss / self.steps, "lr": lr,
                 "tokens_per_second": self.tokens / max(now - self.t0, 1e-9),
                 "memory_mib": self.monitor.current_mib(), "elapsed_s": now - self.started}
        self.final_loss = entry["loss"]
        if self.file:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()
        self.bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{entry['tokens_per_second']:.0f}",
                             mem=f"{entry['memory_mib']:.0f}MiB")
        self.loss, self.steps, self.tokens, self.t0 = 0.0, 0, 0, time.perf_counter()


def train(model: torch.nn.Module, encoded: list[dict[str, Any]], cfg: TrainConfig, *, pad_id: int, causal: bool,
          precision: Precision, monitor: MemoryMonitor, log_path: Path | None = None,
          checkpointing: Checkpointing | None = None) -> dict[str, Any]:
    """Train for planned_steps(...) optimizer steps; returns the figures that metrics.json reports under `train`.

    Writes one JSON line per logging step to `log_path`. Memory phases: first_forward, first_backward,
    optimizer_step (all of the first step) and steady_state (the rest). With `checkpointing`, saves every
    cfg.save_every steps and on Ctrl-C, and resumes from `checkpointing.resume`: weights, optimizer, scheduler, RNG
    states and data position, so the result equals an uninterrupted run's.
    """
    stepper = _make_stepper(model, cfg, precision, causal, len(encoded))
    total = planned_steps(len(encoded), cfg)
    done = real_tokens = 0
    if checkpointing and checkpointing.resume:
        resumed = checkpoint.load(checkpointing.resume, model, stepper.optimizer, stepper.scheduler)
        done, real_tokens = resumed.step, resumed.real_tokens
    steps = step_stream(encoded, cfg, pad_id, causal, done=done)
    first_step, session_tokens, bad = done + 1, 0, 0
    phases = StepPhases(monitor, first=True)
    model.train()
    bar = tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True)
    log = _Log(_open_log(log_path, done) if log_path else None, bar, monitor)
    try:
        with _StopFlag() as stop:
            for step in range(first_step, total + 1):
                phases = StepPhases(monitor, first=step == first_step)
                with phases:
                    result = stepper.step(next(steps), phases)
                    if phases.first:  # gradients and optimizer state all exist now: measure what they hold
                        monitor.record_tensors(model, stepper.optimizer)
                    stepper.optimizer.zero_grad(set_to_none=True)
                bad += len(result.skipped)
                if result.skipped:
                    _check_bad(bad, cfg, step, result.skipped[-1], checkpointing)
                real_tokens, session_tokens = real_tokens + result.tokens, session_tokens + result.tokens
                log.add(step, result, stepper.scheduler.get_last_lr()[0], step == total, cfg.log_every)
                if checkpointing and cfg.save_every and step % cfg.save_every == 0 and step < total:
                    checkpoint.save(checkpointing, step, model, stepper.optimizer, stepper.scheduler, real_tokens)
                if stop.raised:
                    raise Interrupted(_interrupted(checkpointing, step, total, model, stepper, real_tokens))
    except torch.cuda.OutOfMemoryError:
        raise OutOfMemory(_oom_message(monitor, phases.current, cfg)) from None
    finally:
        bar.close()
        if log.file:
            log.file.close()
    wall = time.perf_counter() - log.started
    return {"steps": total, "final_loss": log.final_loss, "tokens_per_second": session_tokens / max(wall, 1e-9),
            "real_tokens": real_tokens, "seconds_per_step": wall / max(total - first_step + 1, 1),
            "wall_seconds": wall, "resumed_from_step": first_step - 1, "skipped_nonfinite": bad,
            "loss_path": stepper.loss.report, "precision": precision.describe(),
            **({"grad_scale": stepper.scaler.get_scale()} if stepper.scaler else {})}


def _make_stepper(model: torch.nn.Module, cfg: TrainConfig, precision: Precision, causal: bool, n: int) -> Stepper:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LiteFTError("the model has no trainable parameters; check method and lora.target_modules")
    optimizer = make_optimizer(params, cfg)
    total = planned_steps(n, cfg)
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total),
                              num_training_steps=total)
    return Stepper(model=model, params=params, optimizer=optimizer, scheduler=scheduler, precision=precision,
                   loss=LossGuard(causal), max_grad_norm=cfg.max_grad_norm, scaler=precision.make_scaler())


def _interrupted(ck: Checkpointing | None, step: int, total: int, model: torch.nn.Module, stepper: Stepper,
                 real_tokens: int) -> str:
    path = checkpoint.save(ck, step, model, stepper.optimizer, stepper.scheduler, real_tokens) if ck else None
    where = f"checkpoint {path}" if path else "no checkpoint (none configured)"
    return f"interrupted after step {step} of {total}; saved {where}. Run the same command with --resume to continue."


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
