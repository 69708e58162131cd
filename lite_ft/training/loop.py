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
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from lite_ft.errors import Interrupted, LiteFTError, OutOfMemory, TrainingStopped, WriteFailed
from lite_ft.recipe.precision import Precision
from lite_ft.recipe.schema import TrainConfig
from lite_ft.training import checkpoint, sharding, writes
from lite_ft.training.checkpoint import Checkpointing
from lite_ft.training.distributed import Dist
from lite_ft.training.evaluation import DuringEval, KeptWeights, Tracking
from lite_ft.training.loss import LossGuard
from lite_ft.training.memory import MemoryMonitor, StepPhases
from lite_ft.training.step import Objective, StepResult, Stepper, planned_steps, step_stream
from lite_ft.training.trackers import Trackers

RESUME_HINT = "The last checkpoint is intact: free disk space, then run the same command with --resume"


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
    """Turns Ctrl-C (SIGINT) and SIGTERM (kill, docker stop, Kubernetes and SLURM preemption) into a flag checked
    between optimizer steps, so a step is never cut in half and a checkpoint is written before the run exits."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.raised: int | None = None  # the signal received
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised is not None:  # a second signal stops at once
            raise KeyboardInterrupt
        self.raised = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _LogFile:
    """train_log.jsonl, one line per logging step. A failed append is cut back to the last whole line, and the run
    stops saying so: the last checkpoint has everything a resume needs."""

    def __init__(self, path: Path, done: int) -> None:
        kept = []
        if done and path.exists():  # on resume, entries past the checkpoint's step are trained again
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= done]
        writes.atomic_write(path, "the training log", lambda p: p.write_text("".join(f"{line}\n" for line in kept),
                                                                       encoding="utf-8"), RESUME_HINT)
        self.path = path
        self.file = open(path, "a", encoding="utf-8")

    def write(self, entry: dict[str, Any]) -> None:
        good = self.file.tell()
        try:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()
        except Exception as exc:  # ENOSPC, or the folder vanished
            self.close(truncate_to=good)
            raise WriteFailed(writes.describe_failure(self.path, "the training log", exc, RESUME_HINT)) from None

    def close(self, truncate_to: int | None = None) -> None:
        if self.file.closed:
            return
        try:
            if truncate_to is not None:
                self.file.truncate(truncate_to)
            self.file.close()
        except OSError:
            pass


@dataclass
class _Log:
    """The logging window: mean step loss and tokens/s since the last entry, written to train_log.jsonl and the
    progress bar every cfg.log_every steps."""

    file: _LogFile | None
    bar: Any
    monitor: MemoryMonitor
    started: float = field(default_factory=time.perf_counter)
    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    t0: float = field(default_factory=time.perf_counter)
    final_loss: float = float("nan")  # mean loss of the last window: steadier than one step's loss
    trackers: Trackers | None = None
    eval_loss: float | None = None  # the last evaluation's, shown on the progress bar
    eval_seconds: float = 0.0  # spent in evaluations during training (eval.every)

    def add(self, step: int, result: StepResult, lr: float, last: bool, every: int) -> None:
        self.loss, self.steps, self.tokens = self.loss + result.loss, self.steps + 1, self.tokens + result.tokens
        self.bar.update(1)
        if step % every and not last:
            return
        self.flush(step, lr)

    def flush(self, step: int, lr: float) -> None:
        """Write the window's entry (a no-op for an empty window)."""
        if not self.steps:
            return
        now = time.perf_counter()
        entry = {"step": step, "loss": self.loss / self.steps, "lr": lr,
                 "tokens_per_second": self.tokens / max(now - self.t0, 1e-9),
                 "memory_mib": self.monitor.current_mib(), "elapsed_s": now - self.started}
        self.final_loss = entry["loss"]
        if self.file:
            self.file.write(entry)
        if self.trackers:
            self.trackers.log(entry)
        self._postfix(entry)
        self.loss, self.steps, self.tokens, self.t0 = 0.0, 0, 0, time.perf_counter()

    def evaluation(self, entry: dict[str, Any]) -> None:
        """One evaluation during training (eval.every): its own line in the log, the trackers and the bar."""
        self.eval_loss = entry["eval_loss"]
        if self.file:
            self.file.write(entry)
        if self.trackers:
            self.trackers.log(entry)
        self.t0 += entry["eval_seconds"]  # tokens/s measures training, not the evaluation in between
        self.eval_seconds += entry["eval_seconds"]

    def _postfix(self, entry: dict[str, Any]) -> None:
        extra = {"eval_loss": f"{self.eval_loss:.3f}"} if self.eval_loss is not None else {}
        self.bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{entry['tokens_per_second']:.0f}",
                             mem=f"{entry['memory_mib']:.0f}MiB", **extra)


def train(model: torch.nn.Module, encoded: list[dict[str, Any]], cfg: TrainConfig, *, pad_id: int, causal: bool,
          precision: Precision, monitor: MemoryMonitor, log_path: Path | None = None,
          checkpointing: Checkpointing | None = None, dist: Dist | None = None, trackers: Trackers | None = None,
          evaluation: DuringEval | None = None) -> dict[str, Any]:
    """Train for planned_steps(...) optimizer steps; returns the figures that metrics.json reports under `train`.

    Writes one JSON line per logging step to `log_path`. Memory phases: first_forward, first_backward,
    optimizer_step (all of the first step) and steady_state (the rest). With `checkpointing`, saves every
    cfg.save_every steps and on Ctrl-C, and resumes from `checkpointing.resume`: weights, optimizer, scheduler, RNG
    states and data position, so the result equals an uninterrupted run's. On N processes (`dist`) every rank runs
    this; rank 0 alone writes the log, the checkpoints and the progress bar.

    With `evaluation` (eval.every), evaluates every evaluation.every steps and after the last; cfg.keep_best then
    leaves the best evaluation's weights in the model at the end, and cfg.early_stop ends training early. Their
    state (best so far, patience) is in every checkpoint.
    """
    dist = dist or Dist()
    stepper = _make_stepper(model, cfg, precision, causal, len(encoded), dist)
    total = planned_steps(len(encoded), cfg, dist.world)
    done = real_tokens = 0
    resumed_state: dict[str, Any] = {}
    if checkpointing and checkpointing.resume:
        resumed = checkpoint.load(checkpointing.resume, model, stepper.optimizer, stepper.scheduler, dist.rank,
                                  sharded=dist.fsdp)
        done, real_tokens, resumed_state = resumed.step, resumed.real_tokens, resumed.state
    tracking = Tracking(cfg.keep_best, cfg.early_stop)
    tracking.restore(resumed_state.get("tracking"))
    kept = KeptWeights(checkpointing, dist)
    if checkpointing and cfg.keep_best and dist.is_main:  # best weights of steps to be trained again are stale
        checkpoint.prune_best(checkpointing.folder, keep={tracking.best["step"]} if tracking.best else set(),
                              after=done)
    end = tracking.stopped or total  # a run that stopped early and then crashed does not train on
    steps = step_stream(encoded, cfg, pad_id, causal, done=done, rank=dist.rank, world=dist.world)
    first_step, session_tokens, local_tokens, bad = done + 1, 0, 0, 0
    phases = StepPhases(monitor, first=True)
    model.train()
    bar = tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True, disable=not dist.is_main)
    log = _Log(_LogFile(log_path, done) if log_path and dist.is_main else None, bar, monitor,
               final_loss=resumed_state.get("final_loss", float("nan")), trackers=trackers)
    try:
        with _StopFlag() as stop:
            for step in range(first_step, end + 1):
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
                local_tokens += result.local_tokens
                log.add(step, result, stepper.scheduler.get_last_lr()[0], step == total, cfg.log_every)
                if evaluation and evaluation.due(step, total):
                    entry = evaluation(step, model, stepper.loss, precision, dist)
                    log.evaluation(entry)
                    if tracking.update(entry):
                        kept.keep(step, stepper, tracking.best)
                if tracking.stopped == step:
                    end = step
                    log.flush(step, stepper.scheduler.get_last_lr()[0])
                # The last step is always checkpointed: a crash while saving or evaluating never trains again.
                saved = bool(checkpointing) and (step == end or bool(cfg.save_every) and step % cfg.save_every == 0)
                if saved:
                    _save(checkpointing, step, stepper, real_tokens, log.final_loss, tracking)
                signum = dist.max(stop.raised or 0)  # every rank stops after the same step
                if signum and step < end:
                    raise _interrupted(signum, checkpointing, step, total, stepper, real_tokens, log.final_loss,
                                       saved, tracking)
                if step == end:  # the last planned step, or early stopping's
                    break
    except torch.cuda.OutOfMemoryError:
        raise OutOfMemory(_oom_message(monitor, phases.current, cfg)) from None
    finally:
        bar.close()
        if log.file:
            log.file.close()
    if cfg.keep_best and tracking.best:
        kept.restore(tracking.best["step"], stepper)  # the run's result: the best evaluation's weights
    wall = time.perf_counter() - log.started
    training = wall - log.eval_seconds  # speed figures: training only, not the evaluations in between
    return {"steps": end, "planned_steps": total, **tracking.report(), "final_loss": log.final_loss,
            "tokens_per_second": session_tokens / max(training, 1e-9),
            "real_tokens": real_tokens, "seconds_per_step": training / max(end - first_step + 1, 1),
            "rank_tokens_per_second": local_tokens / max(training, 1e-9),
            "wall_seconds": wall, "eval_seconds_during_training": log.eval_seconds, "resumed_from_step": first_step - 1, "skipped_nonfinite": bad,
            "loss_path": stepper.loss.report, "precision": precision.describe(),
            **({"grad_scale": stepper.scaler.get_scale()} if stepper.scaler else {})}


def _make_stepper(model: torch.nn.Module, cfg: TrainConfig, precision: Precision, causal: bool, n: int,
                  dist: Dist) -> Stepper:
    if not any(p.requires_grad for p in model.parameters()):
        raise LiteFTError("the model has no trainable parameters; check method and lora.target_modules")
    loss = LossGuard(causal)
    objective = dist.wrap(Objective(model, loss), model)  # first: FSDP replaces the parameters with shards
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    total = planned_steps(n, cfg, dist.world)
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total),
                              num_training_steps=total)
    return Stepper(model=model, objective=objective, params=params, optimizer=optimizer, scheduler=scheduler,
                   precision=precision, loss=loss, max_grad_norm=cfg.max_grad_norm, dist=dist,
                   scaler=precision.make_scaler())


def _save(ck: Checkpointing, step: int, stepper: Stepper, real_tokens: int, final_loss: float,
          tracking: Tracking) -> Path:
    """A checkpoint of every rank's RNG state (gathered) and rank 0's weights and optimizer, written by rank 0."""
    dist = stepper.dist
    states = dist.gather(checkpoint.rng_state())
    full = (sharding.full_trainable(stepper.model), sharding.full_optimizer(stepper.model, stepper.optimizer)) \
        if dist.fsdp else (None, None)  # collectives: every rank gathers, rank 0 writes
    path = ck.folder / f"step-{step:06d}"
    if dist.is_main:
        checkpoint.save(ck, step, stepper.model, stepper.optimizer, stepper.scheduler, real_tokens,
                        extra={"final_loss": final_loss, "tracking": tracking.state()}, rng_states=states,
                        trainable=full[0], optimizer_state=full[1])
        if tracking.best:  # the checkpoints it replaced may have held older best weights
            checkpoint.prune_best(ck.folder, keep={tracking.best["step"]})
    return path


def _interrupted(signum: int, ck: Checkpointing | None, step: int, total: int, stepper: Stepper, real_tokens: int,
                 final_loss: float, saved: bool, tracking: Tracking) -> Interrupted:
    """The error a stop signal becomes, after a checkpoint of the step just finished (unless it was saved)."""
    path = None
    if ck:
        path = ck.folder / f"step-{step:06d}" if saved else _save(ck, step, stepper, real_tokens, final_loss,
                                                                  tracking)
    where = f"checkpoint {path}" if path else "no checkpoint (none configured)"
    name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    error = Interrupted(f"interrupted after step {step} of {total} ({name}); saved {where}. Run the same command "
                        "with --resume to continue.")
    error.exit_code = 143 if signum == signal.SIGTERM else 130  # 128 + the signal, as shells report it
    return error


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
