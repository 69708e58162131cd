"""Evaluation during training: eval.every logs the eval loss at the right steps (the loss the model itself gives),
train.keep_best returns the best evaluation's weights, train.early_stop stops at the right evaluation, and a resume
in the middle keeps the best so far and the patience counter."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import read_jsonl
from safetensors.torch import load_file

from lite_ft.data.batching import collate
from lite_ft.data.load import load_splits
from lite_ft.data.tasks import get_task
from lite_ft.errors import RecipeError
from lite_ft.evaluate import evaluate
from lite_ft.export.run_folder import attach_adapter, inspect_run
from lite_ft.model import load_base, load_tokenizer
from lite_ft.recipe.load import load_recipe
from lite_ft.recipe.precision import pick_dtype
from lite_ft.run import run, summary
from lite_ft.training import checkpoint


def evaluations(out: Path) -> list[dict[str, Any]]:
    return [e for e in read_jsonl(out / "train_log.jsonl") if "eval_loss" in e]


def reloaded(out: Path) -> tuple[torch.nn.Module, Any, Any]:
    """The run folder's saved result (base + adapter) as `lite-ft eval` loads it, and its recipe."""
    info = inspect_run(out)
    tokenizer = load_tokenizer(str(info.weights), info.recipe)
    dtype = pick_dtype(info.recipe.model.dtype, torch.device("cpu"))
    base = load_base(info.base_path, info.recipe, torch.device("cpu"), dtype, info.num_labels, tokenizer.pad_token_id)
    return attach_adapter(base, info).eval(), tokenizer, info.recipe


@torch.no_grad()
def own_eval_loss(out: Path) -> float:
    """The eval loss of the saved result from the model's own forward, one example at a time: total loss over
    the eval examples' target units (answer tokens, or examples) divided by their number."""
    model, tokenizer, recipe = reloaded(out)
    task = get_task(recipe.task)
    _, split = load_splits(recipe, task)
    total, units = 0.0, 0
    for example in split.examples:
        encoded = task.encode(example, tokenizer, recipe)
        if encoded is None:
            continue
        batch = collate([encoded], tokenizer.pad_token_id, task.causal)
        if task.causal:
            n = int((batch["labels"][:, 1:] != -100).sum())
            total, units = total + float(model(**batch).loss) * n, units + n
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total, units = total + float(F.cross_entropy(logits.float(), batch["labels"], reduction="sum")), units + 1
    return total / units


def test_eval_every_logs_the_eval_loss_at_the_right_steps(make_doc: Callable[..., dict[str, Any]]) -> None:
    doc = make_doc("qa", "lora", train={"max_steps": 7, "batch_size": 4, "log_every": 2},
                   eval={"every": 3}, output={"report_to": ["tensorboard"]})
    metrics = run(load_recipe(document=doc))
    out = Path(doc["output"]["dir"])
    found = evaluations(out)
    assert [e["step"] for e in found] == [3, 6, 7]  # every 3 steps, and after the last
    assert [e["step"] for e in read_jsonl(out / "train_log.jsonl") if "loss" in e] == [2, 4, 6, 7]
    assert all(e["eval_examples"] == 4 and e["eval_units"] > 0 for e in found)
    assert found[0]["eval_loss"] != found[1]["eval_loss"]  # the model changed in between
    # The last evaluation is of the final weights: the model's own loss on the saved adapter gives the same figure.
    assert found[-1]["eval_loss"] == pytest.approx(own_eval_loss(out), rel=1e-5)
    assert metrics["train"]["steps"] == 7 and "best" not in metrics["train"]
    spent = sum(e["eval_seconds"] for e in found)  # speed figures leave the evaluations out
    assert metrics["train"]["eval_seconds_during_training"] == pytest.approx(spent)
    assert metrics["train"]["seconds_per_step"] == pytest.approx((metrics["train"]["wall_seconds"] - spent) / 7)
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((out / "trackers").rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("eval/loss")] == \
        [(e["step"], e["eval_loss"]) for e in found]


def classification_doc(make_doc: Callable[..., dict[str, Any]], steps: int = 12, **extra: Any) -> dict[str, Any]:
    """Tiny BERT, a high constant rate: the eval loss is best at the first evaluation and worse after (measured:
    0.729, 0.737, 0.778, 0.817, 0.781, 0.781 at steps 2..12), so the best step is not the last."""
    train = {"max_steps": steps, "batch_size": 4, "lr": 1e-2, "scheduler": "constant", "save_every": 1,
             "keep_checkpoints": 100, **extra.pop("train", {})}
    return make_doc("classification", "lora", train=train, eval={"every": 2, "during_limit": 16, **extra.pop("eval", {})},
                    **extra)


def test_keep_best_returns_the_best_steps_weights(make_doc: Callable[..., dict[str, Any]]) -> None:
    doc = classification_doc(make_doc, train={"keep_best": "eval_loss"})
    metrics = run(load_recipe(document=doc))
    out = Path(doc["output"]["dir"])
    found = evaluations(out)
    best = min(found, key=lambda e: e["eval_loss"])
    assert best["step"] != found[-1]["step"], "the test needs a run whose best evaluation is not its last"
    assert metrics["train"]["best"] == {"metric": "eval_loss", "value": best["eval_loss"], "step": best["step"]}
    assert f"step {best['step']}'s weights" in summary(metrics)
    # The saved adapter is the best step's: its eval loss and scores, reloaded, are the ones logged at that step.
    assert own_eval_loss(out) == pytest.approx(best["eval_loss"], rel=1e-5)
    assert metrics["eval"]["accuracy"] == best["accuracy"] and metrics["eval"]["macro_f1"] == best["macro_f1"]
    again = evaluate(out)["eval"]
    assert (again["accuracy"], again["macro_f1"]) == (best["accuracy"], best["macro_f1"])
    kept = load_file(out / "checkpoints" / "best" / f"step-{best['step']:06d}" / "trainable.safetensors")
    last = load_file(out / "checkpoints" / f"step-{found[-1]['step']:06d}" / "trainable.safetensors")
    assert any(not torch.equal(kept[n], last[n]) for n in kept)  # the best weights really differ from the last


def expected_stop(values: list[tuple[int, float]], patience: int) -> int | None:
    """The step after which early stopping must end training (lower is better), replayed from the log."""
    best, since = None, 0
    for step, value in values:
        if best is None or value < best:
            best, since = value, 0
        else:
            since += 1
        if since >= patience:
            return step
    return None


def test_early_stop_stops_at_the_right_evaluation(make_doc: Callable[..., dict[str, Any]]) -> None:
    doc = classification_doc(make_doc, steps=30, train={"early_stop": {"metric": "eval_loss", "patience": 2}})
    metrics = run(load_recipe(document=doc))
    out = Path(doc["output"]["dir"])
    found = evaluations(out)
    stop = expected_stop([(e["step"], e["eval_loss"]) for e in found], patience=2)
    assert stop is not None and stop < 30
    assert found[-1]["step"] == stop and metrics["train"]["steps"] == stop  # no step trained past it
    assert max(e["step"] for e in read_jsonl(out / "train_log.jsonl")) == stop
    assert metrics["train"]["early_stop"]["stopped_after_step"] == stop and metrics["train"]["planned_steps"] == 30
    assert checkpoint.complete(out / "checkpoints")[-1].name == f"step-{stop:06d}"


def test_resume_in_the_middle_keeps_best_so_far_and_patience(make_doc: Callable[..., dict[str, Any]],
                                                              tmp_path: Path) -> None:
    tracked = {"keep_best": "eval_loss", "early_stop": {"metric": "eval_loss", "patience": 3}}
    straight_doc = classification_doc(make_doc, steps=30, train=tracked, output={"dir": str(tmp_path / "straight")})
    straight = run(load_recipe(document=straight_doc))
    doc = classification_doc(make_doc, steps=30, train=tracked, output={"dir": str(tmp_path / "cut")})
    run(load_recipe(document=doc))
    out = Path(doc["output"]["dir"])
    best, stop = straight["train"]["best"]["step"], straight["train"]["early_stop"]["stopped_after_step"]
    cut = best + 2  # after the best evaluation and one worse one: the counter is 1 there
    assert stop is not None and cut < stop, "the test needs a run that stops early after its best step"
    # Crash after step `cut`: later checkpoints, the results and the final weights are gone; the best weights of
    # later steps, if any, are stale and must not be used.
    for path in checkpoint.complete(out / "checkpoints"):
        if int(path.name.split("-")[1]) > cut:
            shutil.rmtree(path)
    for name in ("metrics.json", "adapter", "predictions.jsonl"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    state = checkpoint.state_of(out / "checkpoints" / f"step-{cut:06d}")["tracking"]
    assert state["best"]["step"] == best and state["since"] == 1
    resumed = run(load_recipe(document=doc))
    assert resumed["run"]["resumed_from"].endswith(f"step-{cut:06d}")
    for key in ("best", "early_stop", "steps"):
        assert resumed["train"][key] == straight["train"][key], key
    assert resumed["eval"]["accuracy"] == straight["eval"]["accuracy"]
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    def timeless(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k != "eval_seconds"} for e in entries]

    assert timeless(evaluations(out)) == timeless(evaluations(tmp_path / "straight"))


def test_keep_best_and_early_stop_are_checked_with_the_recipe(make_doc: Callable[..., dict[str, Any]]) -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe(document=make_doc("qa", "lora", data={"eval": None},
                                      train={"keep_best": "f2", "early_stop": {"metric": "f1", "patience": 0}}))
    text = str(caught.value)
    for expected in ("train.keep_best: needs evaluations during training; set eval.every",
                     "train.keep_best: needs eval data", "train.keep_best: 'f2' is not a metric of task qa",
                     "train.early_stop.metric: f1 is a task score; set eval.during_limit",
                     "train.early_stop.patience: 0 is out of range"):
        assert expected in text, text
    with pytest.raises(RecipeError, match="did you mean train.early_stop.patience"):
        load_recipe(document=make_doc("qa", "lora", train={"early_stop": {"patiense": 2}}))
    ok = load_recipe(document=make_doc("qa", "lora", eval={"every": 5, "during_limit": 2},
                                       train={"keep_best": "f1", "early_stop": {"metric": "eval_loss"}}))
    assert ok.train.early_stop.patience == 3 and json.loads(json.dumps(ok.to_dict()))["train"]["keep_best"] == "f1"
