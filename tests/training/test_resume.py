"""Runs survive crashes: exact resume after SIGKILL, atomic and verified checkpoints, refused recipe changes,
non-finite losses, out-of-memory advice and retries, and failing writes that keep the previous checkpoint."""
from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

import lite_ft.training.loop
from helpers import cli, logged_steps
from lite_ft.cli import main
from lite_ft.errors import LiteFTError, OutOfMemory, TrainingStopped
from lite_ft.model import build
from lite_ft.recipe.load import load_recipe
from lite_ft.run import run
from lite_ft.training import checkpoint, rundir
from lite_ft.training.loop import set_seed
from lite_ft.training.loss import LossGuard



def resumable_doc(make_doc: Callable[..., dict[str, Any]], steps: int = 10, **train: Any) -> dict[str, Any]:
    # Dropout on, so the resumed run must also restore the RNG state to match.
    return make_doc("qa", "lora", lora={"r": 4, "alpha": 8, "dropout": 0.1},
                    data={"limit_train": 12, "limit_eval": 2},
                    train={"max_steps": steps, "batch_size": 2, "save_every": 1, "log_every": 1, **train})


def test_sigkill_then_resume_equals_an_uninterrupted_run(make_doc: Callable[..., dict[str, Any]],
                                                         write_recipe: Callable[..., Path], tmp_path: Path) -> None:
    doc = resumable_doc(make_doc)
    straight = write_recipe(yaml.safe_load(yaml.safe_dump(doc)) | {"output": {"dir": str(tmp_path / "straight")}},
                            "straight.yaml")
    killed = write_recipe(doc | {"output": {"dir": str(tmp_path / "killed")}}, "killed.yaml")
    assert CliRunner().invoke(main, ["run", str(straight)]).exit_code == 0  # in this process: no start-up cost

    seed = int(os.environ.get("LITE_FT_KILL_SEED", "11"))  # set it to reproduce a failure at another step
    kill_after = random.Random(seed).randint(2, 8)
    proc = cli(["run", str(killed)], tmp_path)
    deadline = time.time() + 300
    while logged_steps(tmp_path / "killed") < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (tmp_path / "killed" / "metrics.json").exists(), "the run finished before it was killed"
    proc = cli(["run", str(killed)], tmp_path)  # same command: the unfinished run resumes by itself
    assert proc.wait(timeout=300) == 0, proc.stderr.read()

    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    b = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert b["run"]["resumed_from"] is not None, f"killed after {kill_after} steps (LITE_FT_KILL_SEED={seed}) but " \
        "did not resume"
    assert a["train"]["final_loss"] == b["train"]["final_loss"]
    wa = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def _checkpoints(make_doc: Callable[..., dict[str, Any]], tmp_path: Path, steps: int = 3) -> tuple[Any, Path]:
    recipe = load_recipe(document=resumable_doc(make_doc, steps=steps))
    out = Path(recipe.output.dir)
    run(recipe)
    (out / "metrics.json").unlink()  # now it looks like a run that died after its last checkpoint
    return recipe, out


def test_truncated_checkpoint_is_skipped_and_partial_ones_never_listed(make_doc: Callable[..., dict[str, Any]],
                                                                       tmp_path: Path) -> None:
    recipe, out = _checkpoints(make_doc, tmp_path, steps=4)
    folder = out / "checkpoints"
    names = [p.name for p in checkpoint.complete(folder)]
    assert names == ["step-000003", "step-000004"]  # keep_checkpoints 2; the last step is always checkpointed
    weights = folder / "step-000004" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (folder / ".step-000005.partial").mkdir()
    path, damaged = checkpoint.latest_valid(folder)
    assert path == folder / "step-000003"
    assert damaged and "trainable.safetensors" in damaged[0]
    plan = rundir.prepare(out, recipe)
    assert plan.resume == folder / "step-000003"


def test_changed_recipe_is_refused_with_the_changed_keys(make_doc: Callable[..., dict[str, Any]],
                                                         tmp_path: Path) -> None:
    recipe, out = _checkpoints(make_doc, tmp_path)
    doc = resumable_doc(make_doc, steps=3)
    changed = load_recipe(document=doc, overrides=["lora.r=8", "train.batch_size=3"])
    with pytest.raises(LiteFTError) as err:
        rundir.prepare(out, changed, resume=True)
    message = str(err.value)
    assert "lora.r: 4 -> 8" in message and "train.effective_batch: 2 -> 3 (train.batch_size x" in message
    # The split of the effective batch (2 x 1 -> 1 x 2) computes the same steps: harmless, like the log interval.
    harmless = load_recipe(document=doc, overrides=["train.log_every=2", "eval.batch_size=1", "train.batch_size=1",
                                                    "train.grad_accum=2"])
    plan = rundir.prepare(out, harmless, resume=True)
    assert plan.resume is not None
    assert plan.harmless_changes == ["eval.batch_size: 4 -> 1", "train.batch_size: 2 -> 1", "train.grad_accum: 1 -> 2",
                                     "train.log_every: 1 -> 2"]


def test_finished_or_foreign_output_dir_needs_overwrite(make_doc: Callable[..., dict[str, Any]],
                                                        write_recipe: Callable[..., Path], tmp_path: Path) -> None:
    doc = resumable_doc(make_doc, steps=2)
    path = write_recipe(doc)
    runner = CliRunner()
    assert runner.invoke(main, ["run", str(path)]).exit_code == 0
    again = runner.invoke(main, ["run", str(path)])
    assert again.exit_code == 1 and "finished run" in again.output and "--overwrite" in again.output
    other = write_recipe(doc | {"lora": {"r": 2, "alpha": 4, "dropout": 0.1}}, "other.yaml")
    refused = runner.invoke(main, ["run", str(other)])
    assert refused.exit_code == 1 and "lora.r: 4 -> 2" in refused.output and "Traceback" not in refused.output
    replaced = runner.invoke(main, ["run", str(other), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert yaml.safe_load((Path(doc["output"]["dir"]) / "recipe.yaml").read_text())["lora"]["r"] == 2
    nothing = runner.invoke(main, ["run", str(path), "--resume", "output.dir=" + str(tmp_path / "empty")])
    assert nothing.exit_code == 1 and "no run to resume" in nothing.output


def test_non_finite_loss_names_step_and_keeps_last_checkpoint(make_doc: Callable[..., dict[str, Any]],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe(document=resumable_doc(make_doc, steps=5))
    real = LossGuard.__call__
    calls = []

    def nan_at_third_step(self: LossGuard, model: Any, batch: Any) -> torch.Tensor:
        calls.append(1)
        loss = real(self, model, batch)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(LossGuard, "__call__", nan_at_third_step)
    with pytest.raises(TrainingStopped, match="at step 3") as err:
        run(recipe)
    assert "step-000002" in str(err.value) and "learning rate" in str(err.value)
    assert checkpoint.verify(Path(recipe.output.dir) / "checkpoints" / "step-000002") is None

    calls.clear()
    tolerant = load_recipe(document=resumable_doc(make_doc, steps=5, skip_nonfinite=1),
                           overrides=["output.dir=" + recipe.output.dir + "-tolerant"])
    metrics = run(tolerant)
    assert metrics["train"]["skipped_nonfinite"] == 1 and metrics["train"]["steps"] == 5


def test_out_of_memory_advice_and_automatic_smaller_batches(make_doc: Callable[..., dict[str, Any]],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    real = LossGuard.__call__

    def oom_above_one(self: LossGuard, model: Any, batch: Any) -> torch.Tensor:
        if batch["input_ids"].shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, model, batch)

    monkeypatch.setattr(LossGuard, "__call__", oom_above_one)
    doc = resumable_doc(make_doc, steps=2)
    with pytest.raises(OutOfMemory) as err:
        run(load_recipe(document=doc))
    assert "train.batch_size=1 train.grad_accum=2" in str(err.value) and "gradient_checkpointing" in str(err.value)
    metrics = run(load_recipe(document=doc, overrides=["train.auto_batch_size=true"]), overwrite=True)
    saved = yaml.safe_load((Path(doc["output"]["dir"]) / "recipe.yaml").read_text())
    assert (saved["train"]["batch_size"], saved["train"]["grad_accum"]) == (1, 2)
    assert metrics["train"]["steps"] == 2 and any("out of memory" in n for n in metrics["run"]["notes"])


def test_failed_checkpoint_write_keeps_the_previous_one(make_doc: Callable[..., dict[str, Any]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe(document=resumable_doc(make_doc, steps=4))
    real = checkpoint.save_file
    writes = []

    def disk_full_on_second(tensors: Any, path: Any) -> None:
        writes.append(path)
        if len(writes) == 2:
            raise OSError(28, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", disk_full_on_second)
    with pytest.raises(LiteFTError, match="No space left on device") as err:
        run(recipe)
    assert "previous checkpoints are intact (step-000001)" in str(err.value)
    folder = Path(recipe.output.dir) / "checkpoints"
    assert [p.name for p in checkpoint.complete(folder)] == ["step-000001"]
    assert checkpoint.verify(folder / "step-000001") is None
    assert not list(folder.glob(".*partial"))


def test_resume_restores_weights_optimizer_and_data_position(make_doc: Callable[..., dict[str, Any]]) -> None:
    recipe, out = _checkpoints(make_doc, Path(), steps=3)
    set_seed(0)
    built = build(recipe)
    params = [p for p in built.model.parameters() if p.requires_grad]
    optimizer = lite_ft.training.loop.make_optimizer(params, recipe.train)
    from transformers import get_scheduler

    scheduler = get_scheduler("constant", optimizer)
    resumed = checkpoint.load(out / "checkpoints" / "step-000002", built.model, optimizer, scheduler)
    assert resumed.step == 2
    saved = load_file(out / "checkpoints" / "step-000002" / "trainable.safetensors")
    params = dict(built.model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in saved.items())
    assert any(t.abs().sum() > 0 for n, t in saved.items() if "lora_B" in n)
    assert len(optimizer.state) == len(saved)


@pytest.mark.slow  # over 20 s here: two `lite-ft run` processes
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(make_doc: Callable[..., dict[str, Any]],
                                                       write_recipe: Callable[..., Path], tmp_path: Path) -> None:
    doc = resumable_doc(make_doc, steps=40, save_every=0)  # no periodic checkpoints: only the one Ctrl-C writes
    path = write_recipe(doc)
    out = Path(doc["output"]["dir"])
    proc = cli(["run", str(path)], tmp_path)
    deadline = time.time() + 300
    while logged_steps(out) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    message = proc.stderr.read()
    assert "interrupted after step" in message and "--resume" in message and "Traceback" not in message
    saved = checkpoint.complete(out / "checkpoints")
    assert len(saved) == 1 and checkpoint.verify(saved[0]) is None
    proc = cli(["run", str(path), "--resume"], tmp_path)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["resumed_from"] == str(saved[0]) and metrics["train"]["steps"] == 40


def test_attempt_that_failed_before_its_first_checkpoint_does_not_block_the_next(
        make_doc: Callable[..., dict[str, Any]], write_recipe: Callable[..., Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    doc = resumable_doc(make_doc, steps=2)
    runner = CliRunner()
    failed = runner.invoke(main, ["run", str(write_recipe(doc)), "data.train=" + str(bad)])
    assert failed.exit_code == 1 and "no usable example" in failed.output
    assert (Path(doc["output"]["dir"]) / "data_report.json").exists()
    fixed = runner.invoke(main, ["run", str(write_recipe(doc))])  # the data fixed: the same output.dir is fine
    assert fixed.exit_code == 0, fixed.output
    assert runner.invoke(main, ["run", str(write_recipe(doc)), "--resume"]).exit_code == 1  # finished: no resume
