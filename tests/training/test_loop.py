"""The one training loop: the loss falls for every method, runs are reproducible, logging and step counts add up."""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from helpers import train_steps
from lite_ft.data.batching import epoch_steps
from lite_ft.recipe.load import TrainConfig, load_recipe
from lite_ft.errors import LiteFTError
from lite_ft.training.memory import MemoryMonitor
from lite_ft.model import build
from lite_ft.recipe.precision import Precision
from lite_ft.training.loop import set_seed, train
from lite_ft.training.loss import LossGuard
from lite_ft.training.step import planned_steps

FP32_CPU = Precision(torch.device("cpu"), torch.float32, torch.float32, autocast=False, grad_scaler=False)

STEPS = 25


def overfit_recipe(make_doc: Callable[..., dict[str, Any]], method: str, **train_cfg: Any) -> Any:
    """Four QA examples in one batch, trained repeatedly: the loss on their answers must fall."""
    lr = 3e-3 if method == "full" else 1e-2
    return load_recipe(document=make_doc(
        "qa", method, data={"limit_train": 4, "eval": None}, lora={"r": 8, "alpha": 16},
        train={"max_steps": STEPS, "batch_size": 4, "lr": lr, "scheduler": "constant", "log_every": 1, **train_cfg}))


def run_losses(recipe: Any, log_path: Path) -> tuple[dict[str, Any], list[float]]:
    set_seed(recipe.train.seed)
    b = build(recipe)
    return train_steps(b.model, b.tokenizer, recipe, log_path=log_path)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_loss_falls_when_overfitting(method: str, make_doc: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    stats, losses = run_losses(overfit_recipe(make_doc, method), tmp_path / "log.jsonl")
    assert len(losses) == STEPS and stats["steps"] == STEPS
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, losses  # random-init tiny model: ~6.9 nats at the start
    assert stats["final_loss"] == losses[-1]
    assert stats["real_tokens"] > 0 and stats["tokens_per_second"] > 0


def test_same_seed_same_losses_other_seed_other_losses(make_doc: Callable[..., dict[str, Any]],
                                                       tmp_path: Path) -> None:
    # Dropout on: the seed also has to fix the dropout masks, not only the LoRA initialisation.
    recipe = load_recipe(document=make_doc("qa", "lora", data={"limit_train": 8, "eval": None},
                                           lora={"dropout": 0.1}, train={"max_steps": 6, "batch_size": 2}))
    _, first = run_losses(recipe, tmp_path / "a.jsonl")
    _, second = run_losses(recipe, tmp_path / "b.jsonl")
    assert first == second and len(first) == 6
    other = load_recipe(document=make_doc("qa", "lora", data={"limit_train": 8, "eval": None},
                                          lora={"dropout": 0.1}, train={"max_steps": 6, "batch_size": 2, "seed": 1}))
    _, third = run_losses(other, tmp_path / "c.jsonl")
    assert third != first


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_gradient_checkpointing_gives_the_same_losses(method: str, make_doc: Callable[..., dict[str, Any]],
                                                      tmp_path: Path) -> None:
    plain = overfit_recipe(make_doc, method, max_steps=3)
    checkpointed = overfit_recipe(make_doc, method, max_steps=3, gradient_checkpointing=True)
    set_seed(0)
    b = build(checkpointed)
    base = b.model.get_base_model() if hasattr(b.model, "get_base_model") else b.model
    assert base.is_gradient_checkpointing
    _, with_gc = train_steps(b.model, b.tokenizer, checkpointed, log_path=tmp_path / "gc.jsonl")
    _, without = run_losses(plain, tmp_path / "plain.jsonl")
    assert with_gc == pytest.approx(without, abs=1e-5)


def test_logged_loss_is_the_mean_over_the_logging_window(make_doc: Callable[..., dict[str, Any]],
                                                         tmp_path: Path) -> None:
    every_step = overfit_recipe(make_doc, "lora", max_steps=7)
    windows = overfit_recipe(make_doc, "lora", max_steps=7, log_every=3)
    _, per_step = run_losses(every_step, tmp_path / "a.jsonl")
    stats, logged = run_losses(windows, tmp_path / "b.jsonl")
    expected = [sum(per_step[0:3]) / 3, sum(per_step[3:6]) / 3, per_step[6]]  # steps 3, 6 and the last, 7
    assert logged == pytest.approx(expected, abs=1e-6)
    assert stats["final_loss"] == pytest.approx(per_step[6], abs=1e-6)


def test_grad_accum_runs_that_many_micro_batches_per_step(make_doc: Callable[..., dict[str, Any]],
                                                          monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    recipe = load_recipe(document=make_doc("qa", "lora", data={"limit_train": 7, "eval": None},
                                           train={"max_steps": 2, "batch_size": 2, "grad_accum": 3}))
    set_seed(0)
    b = build(recipe)
    sizes: list[int] = []
    real_call = LossGuard.__call__

    def recording_call(self: LossGuard, model: Any, batch: dict[str, torch.Tensor]) -> Any:
        sizes.append(int(batch["input_ids"].shape[0]))
        return real_call(self, model, batch)

    monkeypatch.setattr(LossGuard, "__call__", recording_call)
    stats, losses = train_steps(b.model, b.tokenizer, recipe, log_path=tmp_path / "log.jsonl")
    assert stats["steps"] == 2 and len(losses) == 2
    # Steps of 2 x 3 = 6 examples: 7 examples make an epoch of a full step [2, 2, 2] and a short one [1].
    assert sizes == [2, 2, 2, 1]


def test_non_finite_loss_stops_with_a_clear_error(make_doc: Callable[..., dict[str, Any]],
                                                  monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    recipe = overfit_recipe(make_doc, "lora", max_steps=3)
    set_seed(0)
    b = build(recipe)
    calls = []

    def nan_on_second_step(self: LossGuard, model: Any, batch: Any) -> torch.Tensor:
        calls.append(1)
        value = float("nan") if len(calls) == 2 else 1.0
        return torch.tensor(value, requires_grad=True)

    monkeypatch.setattr(LossGuard, "__call__", nan_on_second_step)
    with pytest.raises(LiteFTError, match="at step 2"):
        train_steps(b.model, b.tokenizer, recipe, log_path=tmp_path / "log.jsonl")


def test_model_without_trainable_parameters_is_refused() -> None:
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(LiteFTError, match="no trainable parameters"):
        train(model, [{"input_ids": [1, 2], "labels": 0}], TrainConfig(max_steps=1), pad_id=0, causal=False,
              precision=FP32_CPU, monitor=MemoryMonitor(torch.device("cpu")))


@pytest.mark.parametrize("n, cfg, steps", [
    (10, TrainConfig(max_steps=7), 7),
    (10, TrainConfig(batch_size=4), 3),
    (10, TrainConfig(batch_size=4, epochs=2), 6),
    (10, TrainConfig(batch_size=4, epochs=2, grad_accum=4), 2),
    (10, TrainConfig(batch_size=4, epochs=0.1), 1),
    (1, TrainConfig(batch_size=8), 1),
])
def test_planned_steps(n: int, cfg: TrainConfig, steps: int) -> None:
    assert planned_steps(n, cfg) == steps


@pytest.mark.parametrize("group", [True, False])
def test_epoch_steps_cover_every_example_once(group: bool) -> None:
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1000)]
    batches = epoch_steps(lengths, 8, seed=3, epoch=0, group_by_length=group)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert all(len(b) == 8 for b in batches)
    assert batches == epoch_steps(lengths, 8, seed=3, epoch=0, group_by_length=group)   # seeded
    assert batches != epoch_steps(lengths, 8, seed=3, epoch=1, group_by_length=group)   # new order per epoch
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    if group:
        assert spread < 40  # similar lengths together: little padding
    else:
        assert spread > 200
