"""One correct optimizer step: token-exact accumulation (the step's loss is its token losses summed over all
micro-batches, divided by the step's labelled tokens) and step invariance (how a step is split never changes what
it computes, including the out-of-memory retry)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file

from helpers import train_steps, write_jsonl
from lite_ft.data.batching import IGNORE, collate, epoch_steps, split_step
from lite_ft.model import build
from lite_ft.recipe.load import load_recipe
from lite_ft.run import run
from lite_ft.training.loop import set_seed
from lite_ft.training.loss import LossGuard, batch_loss, loss_sum, target_units

RTOL = 1e-5  # fp32: only the summation order differs between splits

LONG = ("The committee met on a grey morning in the old hall by the river and, after a long and careful debate "
        "about the budget, the roads, the school and the new bridge, agreed to publish every figure in full.")


def uneven_rows() -> list[dict[str, Any]]:
    """Instruction rows whose responses are 1 token or about 60: a micro-batch of short ones weighs little."""
    rows = []
    for i in range(16):
        response = "Yes." if i % 3 else LONG
        rows.append({"instruction": f"Question number {i}: say something.", "output": response})
    return rows


def uneven_recipe(make_doc: Callable[..., dict[str, Any]], tmp_path: Path, method: str, batch: int, accum: int,
                  **train: Any) -> Any:
    data = write_jsonl(tmp_path / "uneven.jsonl", uneven_rows())
    return load_recipe(document=make_doc(
        "instruction", method, data={"train": str(data), "eval": None, "max_length": 256},
        lora={"r": 4, "alpha": 8, "dropout": 0.0},  # no dropout: its masks depend on the micro-batch shapes
        train={"max_steps": 4, "batch_size": batch, "grad_accum": accum, "lr": 1e-3, "warmup_ratio": 0.0,
               "log_every": 1, "scheduler": "constant", **train}))


def trained(recipe: Any, log: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    set_seed(recipe.train.seed)
    built = build(recipe)
    _, losses = train_steps(built.model, built.tokenizer, recipe, log_path=log)
    weights = {n: p.detach().clone() for n, p in built.model.named_parameters() if p.requires_grad}
    return losses, weights


def assert_same(a: tuple[list[float], dict[str, torch.Tensor]], b: tuple[list[float], dict[str, torch.Tensor]]
                ) -> None:
    assert b[0] == pytest.approx(a[0], rel=RTOL)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:  # relative to the tensor's norm: Adam turns rounding noise in ~0 gradients into +-lr
        assert relative(b[1][name], a[1][name]) < RTOL, name


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_split_of_a_step_never_changes_what_it_computes(method: str, make_doc: Callable[..., dict[str, Any]],
                                                            tmp_path: Path) -> None:
    runs = {(b, a): trained(uneven_recipe(make_doc, tmp_path, method, b, a), tmp_path / f"{b}x{a}.jsonl")
            for b, a in ((8, 1), (4, 2), (2, 4))}
    assert len(runs[(8, 1)][0]) == 4
    assert_same(runs[(8, 1)], runs[(4, 2)])
    assert_same(runs[(8, 1)], runs[(2, 4)])


def test_the_examples_of_a_step_depend_only_on_the_seed_and_the_effective_batch() -> None:
    lengths = [5 + (i * 37) % 300 for i in range(100)]
    steps = epoch_steps(lengths, 8, seed=1, epoch=0, group_by_length=True)
    for batch in (1, 2, 4, 8):
        split = [split_step(s, lengths, batch) for s in steps]
        assert [sorted(i for m in micro for i in m) for micro in split] == [sorted(s) for s in steps]
        assert all(len(m) <= batch for micro in split for m in micro)


def grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_mean_of_means_weighs_micro_batches_wrongly(make_doc: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    """The old accumulation (each micro-batch's mean / grad_accum) gives another gradient than one batch of all
    the examples; the token-exact sum does not. Without this difference the invariance test could not fail."""
    recipe = uneven_recipe(make_doc, tmp_path, "full", 2, 2)
    set_seed(0)
    built = build(recipe)
    model = built.model.eval()
    from lite_ft.data.load import load_splits
    from lite_ft.data.tasks import get_task

    task = get_task("instruction")
    examples = [task.encode(e, built.tokenizer, recipe) for e in load_splits(recipe, task)[0].examples]
    short, long = [e for e in examples if len(e["labels"]) - e["labels"].count(IGNORE) < 5][:2], \
        [e for e in examples if len(e["labels"]) - e["labels"].count(IGNORE) > 30][:2]
    pad = built.tokenizer.pad_token_id
    micro = [collate(short, pad, True), collate(long, pad, True)]
    whole = collate(short + long, pad, True)

    batch_loss(model, whole, causal=True)[0].backward()
    reference = grads(model)
    model.zero_grad()
    units = sum(target_units(b, True) for b in micro)
    for b in micro:
        (loss_sum(model, b, True) / units).backward()
    exact = grads(model)
    model.zero_grad()
    for b in micro:
        (batch_loss(model, b, True)[0] / len(micro)).backward()
    mean_of_means = grads(model)
    torch.testing.assert_close(exact, reference, rtol=1e-4, atol=1e-7)
    assert (mean_of_means - reference).norm() > 0.2 * reference.norm()


def test_out_of_memory_retry_resumes_with_the_same_steps(make_doc: Callable[..., dict[str, Any]], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """batch 8 runs out of memory at step 3; the retry (4 x 2) resumes from step 2's checkpoint and ends where an
    uninterrupted 8 x 1 run ends."""
    def recipe(name: str, **train: Any) -> Any:
        doc = uneven_recipe(make_doc, tmp_path, "lora", 8, 1, save_every=1, **train)
        return load_recipe(document=doc.to_dict() | {"output": {"dir": str(tmp_path / name)}})

    straight = run(recipe("straight"))
    real, calls = LossGuard.__call__, []

    def oom_at_third_step(self: LossGuard, model: Any, batch: Any) -> torch.Tensor:
        calls.append(1)
        if batch["input_ids"].shape[0] > 4 and len(calls) >= 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, model, batch)

    monkeypatch.setattr(LossGuard, "__call__", oom_at_third_step)
    retried = run(recipe("retried", auto_batch_size=True))
    assert any("resuming from" in n and "step-000002" in n for n in retried["run"]["notes"]), retried["run"]
    logs = [[json.loads(line)["loss"] for line in (tmp_path / n / "train_log.jsonl").read_text().splitlines()]
            for n in ("straight", "retried")]
    assert len(logs[0]) == 4 and logs[1] == pytest.approx(logs[0], rel=RTOL)
    a, b = (load_file(tmp_path / n / "adapter" / "adapter_model.safetensors") for n in ("straight", "retried"))
    for name in a:
        assert relative(b[name], a[name]) < RTOL, name
    assert straight["train"]["steps"] == retried["train"]["steps"] == 4
