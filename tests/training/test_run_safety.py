"""No run is ever lost: every write fails cleanly and resumes to the same weights, SIGTERM checkpoints, evaluation
can crash without training again, two runs cannot share a folder, edited data is noticed, run folders work from
any directory."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from helpers import cli, logged_steps, write_jsonl
from lite_ft.cli import main
from lite_ft.training import checkpoint, loop, writes



def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def small_doc(make_doc: Callable[..., dict[str, Any]], out: Path, steps: int = 4, **train: Any) -> dict[str, Any]:
    return make_doc("qa", "lora", lora={"r": 4, "alpha": 8, "dropout": 0.1},  # dropout: the RNG must resume too
                    data={"limit_train": 12, "limit_eval": 2},
                    train={"max_steps": steps, "batch_size": 2, "save_every": 2, "log_every": 1, **train},
                    output={"dir": str(out)})


def no_partials(out: Path) -> list[str]:
    return [str(p) for p in out.rglob("*") if ".partial" in p.name or p.name.endswith(".old")]


class FailingJson:
    """Stands in for the json module in the training loop: dumps fails with ENOSPC from its `fail_at`-th call."""

    def __init__(self, fail_at: int) -> None:
        self.calls, self.fail_at = 0, fail_at

    def dumps(self, value: Any) -> str:
        self.calls += 1
        if self.calls >= self.fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return json.dumps(value)

    loads = staticmethod(json.loads)


@pytest.mark.parametrize("kind", ["checkpoint step-000004", "the trained weights", "predictions.jsonl",
                                  "metrics.json", "the training log"])
def test_each_write_fails_cleanly_and_resumes_to_the_same_weights(
        kind: str, make_doc: Callable[..., dict[str, Any]], write_recipe: Callable[..., Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    straight = write_recipe(small_doc(make_doc, tmp_path / "straight"), "straight.yaml")
    assert runner.invoke(main, ["run", str(straight)]).exit_code == 0
    faulty = write_recipe(small_doc(make_doc, tmp_path / "faulty"), "faulty.yaml")
    real = writes.atomic_write

    def full_disk(target: Path, what: str, write: Callable[[Path], None], hint: str, needed_bytes: Any = None
                  ) -> None:
        def partly(staging: Path) -> None:
            write(staging)  # everything is written, then the disk is full: partial files to clean up
            raise OSError(errno.ENOSPC, "No space left on device")
        real(target, what, partly if what.startswith(kind) else write, hint, needed_bytes)

    if kind == "the training log":
        monkeypatch.setattr(loop, "json", FailingJson(fail_at=3))
    else:
        monkeypatch.setattr(writes, "atomic_write", full_disk)
    failed = runner.invoke(main, ["run", str(faulty)])
    assert failed.exit_code == 1, failed.output
    assert f"could not write {kind}" in failed.output and "No space left on device" in failed.output
    assert "--resume" in failed.output and "Traceback" not in failed.output
    assert no_partials(tmp_path / "faulty") == []
    last, _ = checkpoint.latest_valid(tmp_path / "faulty" / "checkpoints")
    assert last is not None and checkpoint.verify(last) is None
    monkeypatch.undo()
    resumed = runner.invoke(main, ["run", str(faulty), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert_same_adapter(tmp_path / "straight", tmp_path / "faulty")
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("straight", "faulty"))
    assert a["eval"]["f1"] == b["eval"]["f1"] and a["train"]["final_loss"] == b["train"]["final_loss"]


def test_torch_save_errors_are_reported_like_os_errors(make_doc: Callable[..., dict[str, Any]],
                                                       write_recipe: Callable[..., Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save reports a full disk as a RuntimeError from its zip writer, not as an OSError."""
    def enforce_fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(checkpoint.torch, "save", enforce_fail)
    result = CliRunner().invoke(main, ["run", str(write_recipe(small_doc(make_doc, tmp_path / "run")))])
    assert result.exit_code == 1 and "No space left on device" in result.output
    assert "Traceback" not in result.output and no_partials(tmp_path / "run") == []


def is_root_with_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.mark.skipif(not is_root_with_mount(), reason="mounting a small tmpfs needs root")
def test_a_real_full_tmpfs(make_doc: Callable[..., dict[str, Any]], write_recipe: Callable[..., Path],
                           tmp_path: Path) -> None:
    """A real file system that fills up during the run: full fine-tuning, whose checkpoints are the model and
    its AdamW state (about 2.4 MB each for the tiny model), on 4 MB."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        doc = small_doc(make_doc, disk / "run") | {"method": "full"}
        doc["train"]["lr"] = 1e-4
        runner = CliRunner()
        result = runner.invoke(main, ["run", str(write_recipe(doc, "full.yaml"))])
        assert result.exit_code == 1 and "No space left on device" in result.output, result.output
        assert "MiB free" in result.output and "Traceback" not in result.output
        assert no_partials(disk / "run") == []
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert runner.invoke(main, ["run", str(write_recipe(doc, "full.yaml")), "--resume"]).exit_code == 0
        straight = doc | {"output": {"dir": str(tmp_path / "straight")}}
        assert runner.invoke(main, ["run", str(write_recipe(straight, "straight.yaml"))]).exit_code == 0
        a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
        b = load_file(disk / "run" / "model" / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    finally:
        subprocess.run(["umount", "-l", str(disk)])  # lazy: tensors may still map its files


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while not condition() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)


@pytest.mark.slow  # over 20 s here: three `lite-ft run` processes
def test_sigterm_checkpoints_and_resume_is_bit_identical(make_doc: Callable[..., dict[str, Any]],
                                                         write_recipe: Callable[..., Path], tmp_path: Path) -> None:
    straight = write_recipe(small_doc(make_doc, tmp_path / "straight", steps=10, save_every=0), "straight.yaml")
    killed = write_recipe(small_doc(make_doc, tmp_path / "killed", steps=10, save_every=0), "killed.yaml")
    assert CliRunner().invoke(main, ["run", str(straight)]).exit_code == 0  # in this process: no start-up cost
    proc = cli(["run", str(killed)], tmp_path)
    wait_for(lambda: logged_steps(tmp_path / "killed") >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    message = proc.stderr.read()
    assert "SIGTERM" in message and "--resume" in message and "Traceback" not in message
    assert len(checkpoint.complete(tmp_path / "killed" / "checkpoints")) == 1  # save_every 0: only SIGTERM's
    assert cli(["run", str(killed), "--resume"], tmp_path).wait(timeout=300) == 0
    assert_same_adapter(tmp_path / "straight", tmp_path / "killed")


@pytest.mark.slow  # over 20 s here: three `lite-ft run` processes
def test_sigkill_in_evaluation_evaluates_again_without_training(make_doc: Callable[..., dict[str, Any]],
                                                                write_recipe: Callable[..., Path],
                                                                tmp_path: Path) -> None:
    def doc(name: str) -> dict[str, Any]:
        d = small_doc(make_doc, tmp_path / name, steps=3)
        d["data"]["limit_eval"] = 12
        d["eval"] = {"batch_size": 1, "max_new_tokens": 48}  # a long evaluation, to be killed in
        return d

    assert CliRunner().invoke(main, ["run", str(write_recipe(doc("straight"), "s.yaml"))]).exit_code == 0
    path = write_recipe(doc("killed"), "k.yaml")
    proc = cli(["run", str(path)], tmp_path)
    out = tmp_path / "killed"
    wait_for(lambda: (out / "adapter").is_dir(), proc)  # the weights are saved just before evaluation
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "metrics.json").exists(), "the run finished before it was killed"
    log_before = (out / "train_log.jsonl").read_text()
    assert cli(["run", str(path)], tmp_path).wait(timeout=300) == 0
    assert (out / "train_log.jsonl").read_text() == log_before  # no step trained again
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("straight", "killed"))
    assert b["train"]["resumed_from_step"] == 3 and a["eval"]["f1"] == b["eval"]["f1"]
    assert (tmp_path / "straight" / "predictions.jsonl").read_text() == (out / "predictions.jsonl").read_text()


@pytest.mark.slow  # over 20 s here: three `lite-ft run` processes
def test_one_run_per_folder_and_a_stale_lock_is_taken_over(make_doc: Callable[..., dict[str, Any]],
                                                           write_recipe: Callable[..., Path], tmp_path: Path) -> None:
    path = write_recipe(small_doc(make_doc, tmp_path / "run", steps=100_000, save_every=0))  # runs until killed
    holder = cli(["run", str(path)], tmp_path)
    wait_for(lambda: logged_steps(tmp_path / "run") >= 1, holder)
    second = cli(["run", str(path)], tmp_path)
    assert second.wait(timeout=120) == 1  # a second run that waited for the lock would still be running
    assert holder.poll() is None, "the holder ended: the refusal proves nothing"  # it refused while the lock was held
    message = second.stderr.read()
    assert f"PID {holder.pid}" in message and "Traceback" not in message
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    short = write_recipe(small_doc(make_doc, tmp_path / "run", steps=2, save_every=0), "short.yaml")
    assert CliRunner().invoke(main, ["run", str(short), "--overwrite"]).exit_code == 0
    notes = json.loads((tmp_path / "run" / "metrics.json").read_text())["run"]["notes"]
    assert any("stale lock" in n and str(holder.pid) in n for n in notes), notes


def test_resume_on_edited_data_is_refused_naming_the_file(make_doc: Callable[..., dict[str, Any]],
                                                          write_recipe: Callable[..., Path], tmp_path: Path) -> None:
    rows = [{"text": f"sentence number {i} is {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(16)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    doc = make_doc("classification", "lora", data={"train": str(data), "eval": str(data), "labels": ["neg", "pos"]},
                   train={"max_steps": 4, "save_every": 2}, output={"dir": str(tmp_path / "run")})
    path = write_recipe(doc)
    runner = CliRunner()
    assert runner.invoke(main, ["run", str(path)]).exit_code == 0
    (tmp_path / "run" / "metrics.json").unlink()  # as if it had been interrupted after its last checkpoint
    write_jsonl(data, [r | {"label": 1 - r["label"]} for r in rows])  # every label flipped
    refused = runner.invoke(main, ["run", str(path), "--resume"])
    assert refused.exit_code == 1 and str(data) in refused.output and "changed" in refused.output
    assert "--allow-data-change" in refused.output and "Traceback" not in refused.output
    allowed = runner.invoke(main, ["run", str(path), "--resume", "--allow-data-change"])
    assert allowed.exit_code == 0, allowed.output
    notes = json.loads((tmp_path / "run" / "metrics.json").read_text())["run"]["notes"]
    assert any("--allow-data-change" in n for n in notes)


def test_merge_and_eval_of_a_run_folder_from_another_directory(make_doc: Callable[..., dict[str, Any]],
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    write_jsonl(here / "data.jsonl", [{"instruction": f"Say {w}.", "output": w} for w in ("yes", "no", "maybe")])
    doc = make_doc("instruction", "lora", data={"train": "data.jsonl", "eval": "data.jsonl", "max_length": 128},
                   train={"max_steps": 2}, output={"dir": "run"})
    (here / "recipe.yaml").write_text(yaml.safe_dump(doc))
    monkeypatch.chdir(here)
    runner = CliRunner()
    assert runner.invoke(main, ["run", "recipe.yaml"]).exit_code == 0
    saved = yaml.safe_load((here / "run" / "recipe.yaml").read_text())
    assert saved["data"]["train"] == str(here / "data.jsonl") and saved["output"]["dir"] == str(here / "run")
    monkeypatch.chdir(elsewhere)
    merged = runner.invoke(main, ["merge", str(here / "run"), "--out", "export"])
    assert merged.exit_code == 0, merged.output
    evaluated = runner.invoke(main, ["eval", str(here / "run")])
    assert evaluated.exit_code == 0 and "loss" in evaluated.output, evaluated.output
