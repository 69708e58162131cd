"""The same loop on N processes (gloo on the CPU) gives the same model as one process: losses, weights,
evaluation and predictions; gradients all-reduce to the single-process gradient; a killed or failing rank stops
the job with its own message, and the same command resumes bit-identically."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import logged_steps, recipe_doc

REPO = Path(__file__).resolve().parents[2]
DDP = Path(__file__).resolve().parent / "ddp"
RTOL = 1e-5
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def lite_ft(args: list[str], cwd: Path, nproc: int = 1, torchrun: bool = False, **extra: str) -> subprocess.Popen:
    """`lite-ft run ... --nproc N`, or the same under `torchrun --nproc_per_node N -m lite_ft`."""
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(_port()), "-m", "lite_ft", *args]
    else:
        cmd = [sys.executable, "-m", "lite_ft", *args, *(["--nproc", str(nproc)] if nproc > 1 else [])]
    return subprocess.Popen(cmd, cwd=cwd, env=env(**extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _port() -> int:
    from lite_ft.training.launch import free_port

    return free_port()


def sections(out: Path, batch: int, accum: int, **train: Any) -> dict[str, Any]:
    """The recipe sections of these tests: LoRA without dropout (its masks would differ by split), 24 examples."""
    return {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "data": {"limit_train": 24, "limit_eval": 6},
            "train": {"max_steps": 4, "batch_size": batch, "grad_accum": accum, "log_every": 1,
                      "warmup_ratio": 0.0, **train},
            "eval": {"batch_size": 2, "max_new_tokens": 6}, "output": {"dir": str(out)}}


def doc(make_doc: Callable[..., dict[str, Any]], out: Path, batch: int, accum: int, **train: Any) -> dict[str, Any]:
    return make_doc("qa", "lora", **sections(out, batch, accum, **train))


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def finished(proc: subprocess.Popen, timeout: float = 300) -> None:
    code = proc.wait(timeout=timeout)
    assert code == 0, proc.stderr.read()


@pytest.fixture(scope="module")
def one_process(tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: 1 process x micro-batch 8, 4 steps, checkpoints every 2 (shared by the tests below)."""
    folder = tmp_path_factory.mktemp("one-process")
    d = recipe_doc("qa", "lora", folder, tiny_llama_dir, tiny_bert_dir, **sections(folder / "run", 8, 1, save_every=2))
    (folder / "one.yaml").write_text(yaml.safe_dump(d))
    finished(lite_ft(["run", str(folder / "one.yaml")], folder))
    return folder / "run"


@pytest.mark.slow  # two two-process runs: about 40 s here
def test_two_processes_compute_what_one_does(one_process: Path, make_doc: Callable[..., dict[str, Any]],
                                             write_recipe: Callable[..., Path], tmp_path: Path) -> None:
    two = write_recipe(doc(make_doc, tmp_path / "two", 4, 1, save_every=2), "two.yaml")
    accum = write_recipe(doc(make_doc, tmp_path / "accum", 2, 2, save_every=2), "accum.yaml")
    finished(lite_ft(["run", str(two)], tmp_path, nproc=2))
    finished(lite_ft(["run", str(accum)], tmp_path, nproc=2, torchrun=True))
    reference = losses(one_process)
    weights = load_file(one_process / "adapter" / "adapter_model.safetensors")
    for name in ("two", "accum"):
        assert losses(tmp_path / name) == pytest.approx(reference, rel=RTOL), name
        other = load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
        # All adapter weights as one vector within 1e-5; each tensor within 1e-4, since Adam turns the rounding
        # of the all-reduce in near-zero gradients (layer 0's k_proj at random init) into differences of ~5e-7.
        flat = [torch.cat([t[k].flatten() for k in sorted(weights)]) for t in (other, weights)]
        assert relative(*flat) < RTOL, name
        assert all(relative(other[k], weights[k]) < 10 * RTOL for k in weights), name
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["eval"]["f1"] == json.loads((one_process / "metrics.json").read_text())["eval"]["f1"]
        assert (tmp_path / name / "predictions.jsonl").read_text() == (one_process / "predictions.jsonl").read_text()
        assert metrics["train"]["processes"]["world_size"] == 2 and len(metrics["train"]["ranks"]) == 2


@pytest.mark.slow  # a torchrun of two processes: about 25 s here
def test_the_all_reduced_gradient_is_the_single_process_gradient(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Plain SGD with lr 1 makes the weight change the gradient itself; Adam would hide a wrong scale."""
    worker = str(DDP / "grad_worker.py")
    single = subprocess.run([sys.executable, worker, str(tiny_llama_dir), str(tmp_path / "one.pt"), "8"],
                            env=env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(_port()), worker, str(tiny_llama_dir), str(tmp_path / "two.pt"),
                             "4"], env=env(), capture_output=True, text=True, timeout=300)  # a hung rank fails the test
    assert double.returncode == 0, double.stderr
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert len(a) == len(b) and any(float(g.abs().max()) > 0 for g in a)
    for g1, g2 in zip(a, b):
        assert relative(g2, g1) < 1e-5


def test_a_process_leaves_the_group_after_a_run_and_can_join_again(tmp_path: Path) -> None:
    """Every rank leaves the process group once it is done (a gloo rank that exits inside it can abort with
    SIGABRT after a run that succeeded), and a second run in the same process joins again."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_port()), str(DDP / "rejoin_worker.py"), str(tmp_path / "seen.json")], env=env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "seen.json").read_text()) == [{"world": 2, "sum": 3.0, "left": True}] * 2


def rank_pids(launcher: subprocess.Popen, n: int) -> list[int]:
    deadline = time.time() + 60
    while time.time() < deadline:
        children = psutil.Process(launcher.pid).children()
        if len(children) >= n:
            ranks = {int(c.environ().get("RANK", -1)): c.pid for c in children}
            return [ranks[r] for r in range(n)]
        time.sleep(0.1)
    raise AssertionError("the ranks did not start")


@pytest.mark.slow  # three two-process runs: about 60 s here
def test_sigkill_of_one_rank_stops_the_job_and_the_same_command_resumes(
        make_doc: Callable[..., dict[str, Any]], write_recipe: Callable[..., Path], tmp_path: Path) -> None:
    straight = write_recipe(doc(make_doc, tmp_path / "straight", 2, 1, max_steps=8, save_every=1), "s.yaml")
    killed = write_recipe(doc(make_doc, tmp_path / "killed", 2, 1, max_steps=8, save_every=1), "k.yaml")
    finished(lite_ft(["run", str(straight)], tmp_path, nproc=2))
    proc = lite_ft(["run", str(killed)], tmp_path, nproc=2)
    rank1 = rank_pids(proc, 2)[1]
    deadline = time.time() + 300
    while logged_steps(tmp_path / "killed") < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(rank1, signal.SIGKILL)
    killed_at = time.monotonic()
    code = proc.wait(timeout=120)
    message = proc.stderr.read()
    assert time.monotonic() - killed_at < 60 and code == 128 + signal.SIGKILL
    assert "rank 1 was killed by signal 9" in message and "Traceback" not in message
    assert not (tmp_path / "killed" / "metrics.json").exists()
    finished(lite_ft(["run", str(killed)], tmp_path, nproc=2))
    metrics = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert metrics["run"]["resumed_from"] is not None
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # two processes started and stopped: about 25 s here
def test_a_failing_rank_stops_the_job_with_its_own_message(make_doc: Callable[..., dict[str, Any]],
                                                           write_recipe: Callable[..., Path], tmp_path: Path) -> None:
    path = write_recipe(doc(make_doc, tmp_path / "run", 2, 1, max_steps=50))
    proc = subprocess.Popen([sys.executable, "-m", "lite_ft", "run", str(path), "--nproc", "2"], cwd=tmp_path,
                            env=env(PYTHONPATH=f"{DDP}{os.pathsep}{REPO}", LITE_FT_FAIL_RANK="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    code = proc.wait(timeout=180)
    message = proc.stderr.read()
    assert code != 0 and "rank 1 exited with code 1" in message
    assert "injected: a broken example on this rank" in message
    assert "Traceback" not in message.split("rank 1 exited")[0], message  # rank 0 said no more than a line


@pytest.mark.slow  # two two-process runs: about 45 s here
def test_fsdp_on_two_processes_computes_what_one_does_and_resumes(
        one_process: Path, make_doc: Callable[..., dict[str, Any]], write_recipe: Callable[..., Path],
        tmp_path: Path) -> None:
    """FSDP2 over gloo (LoRA here; full fine-tuning was checked the same way by hand): parameters, gradients and
    optimizer state sharded, and its checkpoints hold full tensors."""
    sharded = write_recipe(doc(make_doc, tmp_path / "fsdp", 4, 1, save_every=2, fsdp=True), "fsdp.yaml")
    finished(lite_ft(["run", str(sharded)], tmp_path, nproc=2))
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(one_process), rel=RTOL)
    weights = "adapter/adapter_model.safetensors"
    a, b = (load_file(folder / weights) for folder in (one_process, tmp_path / "fsdp"))
    flat = [torch.cat([t[k].flatten() for k in sorted(a)]) for t in (b, a)]
    assert relative(*flat) < RTOL
    final = {k: v.clone() for k, v in b.items()}
    # As if it had died after step 2's checkpoint: the sharded run resumes from the full tensors it saved.
    (tmp_path / "fsdp" / "metrics.json").unlink()
    shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / "step-000004")
    finished(lite_ft(["run", str(sharded)], tmp_path, nproc=2))
    resumed = load_file(tmp_path / "fsdp" / weights)
    assert all(torch.equal(resumed[k], final[k]) for k in final)


@pytest.mark.slow  # one single-process and two two-process runs: about 60 s here
def test_eval_during_training_on_two_processes_is_what_one_gives(make_doc: Callable[..., dict[str, Any]],
                                                                  write_recipe: Callable[..., Path],
                                                                  tmp_path: Path) -> None:
    """The eval loss is summed per batch over the ranks (3 batches on 2 ranks: uneven), not averaged, so it is the
    one-process figure; keep_best picks the same step and restores its weights under DDP and FSDP alike."""
    tracked = {"save_every": 2, "keep_best": "eval_loss", "lr": 5e-2}
    runs = {}
    for name, nproc, extra in (("one", 1, {}), ("ddp", 2, {}), ("fsdp", 2, {"fsdp": True})):
        d = doc(make_doc, tmp_path / name, 8 // nproc, 1, **tracked, **extra)
        d["eval"] |= {"every": 1, "during_limit": 4}
        finished(lite_ft(["run", str(write_recipe(d, f"{name}.yaml"))], tmp_path, nproc=nproc))
        log = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        runs[name] = ([e for e in log if "eval_loss" in e], json.loads((tmp_path / name / "metrics.json").read_text()))
    reference, metrics = runs["one"]
    assert [e["step"] for e in reference] == [1, 2, 3, 4]
    for name in ("ddp", "fsdp"):
        found, other = runs[name]
        assert [e["eval_loss"] for e in found] == pytest.approx([e["eval_loss"] for e in reference], rel=RTOL)
        assert [e["eval_units"] for e in found] == [e["eval_units"] for e in reference]
        assert [e["f1"] for e in found] == [e["f1"] for e in reference]
        assert other["train"]["best"]["step"] == metrics["train"]["best"]["step"], name
        assert other["eval"]["f1"] == metrics["eval"]["f1"], name
