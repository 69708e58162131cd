"""`lite-ft bench` and the memory profile: methods run side by side in their own processes, their files carry the
documented columns, a failing method is reported without stopping the others, and the memory breakdown is sound."""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from helpers import train_steps, write_jsonl
from lite_ft.bench.runner import bench, differences, plan
from lite_ft.bench.report import COLUMNS, markdown, table_rows
from lite_ft.intervals import score_intervals
from lite_ft.metrics import qa_scores
from lite_ft.cli import main
from lite_ft.recipe.load import load_recipe
from lite_ft.errors import RecipeError
from lite_ft.training.memory import MemoryMonitor, tensor_bytes
from lite_ft.model import build
from lite_ft.recipe.precision import pick_device

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def one_thread_children(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bench children are separate processes: keep them to one thread like this one (2 shared cores)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _recipe(make_doc: Callable[..., dict[str, Any]], write_recipe: Callable[..., Path]) -> Path:
    doc = make_doc("qa", "lora", train={"batch_size": 4, "lr": 1e-3}, eval={"batch_size": 8, "max_new_tokens": 4})
    return write_recipe(doc)


@pytest.mark.slow  # over 20 s here: two `lite-ft run` processes
def test_bench_runs_two_methods_and_writes_the_documented_files(
        make_doc: Callable[..., dict[str, Any]], write_recipe: Callable[..., Path], tmp_path: Path,
        one_thread_children: None) -> None:
    out = tmp_path / "bench"
    record = bench(plan(_recipe(make_doc, write_recipe), ["lora", "qlora"], steps=3, eval_limit=6, out=out))
    assert [r["method"] for r in record["methods"]] == ["lora", "qlora"]
    assert all(r["status"] == "ok" for r in record["methods"]), record["methods"]
    with open(out / "bench.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    documented = [c for c in COLUMNS if " / " not in c]
    scores = ("exact_match", "exact_match_95ci", "f1", "f1_95ci", "eval_n")
    assert [c for c in rows[0] if c not in scores] == documented
    assert set(scores) <= rows[0].keys()
    for row in rows:
        assert float(row["tokens_per_second"]) > 0 and float(row["peak_memory_mib"]) > 0
        assert 0 <= float(row["f1"]) <= 100
        parts = [float(row[c]) for c in ("weights_mib", "trainable_mib", "gradients_mib", "optimizer_mib",
                                         "activations_mib", "runtime_mib")]
        assert sum(parts) == pytest.approx(float(row["training_peak_mib"]), rel=1e-6)
        assert float(row["training_peak_mib"]) <= float(row["peak_memory_mib"]) + 1e-6
    lora, qlora = record["methods"]
    assert qlora["breakdown_mib"].get("weights (4-bit nf4)", 0) > 0
    assert lora["trainable_params"] == qlora["trainable_params"]
    env = json.loads((out / "bench.json").read_text())["environment"]
    assert {"cpu", "ram_gib", "versions"} <= env.keys() and {"torch", "peft", "bitsandbytes"} <= env["versions"].keys()
    md = (out / "bench.md").read_text()
    assert md.count("\n| lora |") == 1 and md.count("\n| qlora |") == 1
    assert [(d["a"], d["b"], d["score"]) for d in record["differences"]] == [("lora", "qlora", "exact_match"),
                                                                            ("lora", "qlora", "f1")]
    assert md.count("\n| lora - qlora |") == 2 and all(d["n"] == 6 for d in record["differences"])
    for name in ("bench_memory.png", "bench_tradeoff.png"):
        assert (out / name).read_bytes().startswith(PNG)


@pytest.mark.slow  # over 20 s here: two `lite-ft run` processes
def test_a_failing_method_is_reported_and_the_others_still_run(
        make_doc: Callable[..., dict[str, Any]], write_recipe: Callable[..., Path], tmp_path: Path,
        one_thread_children: None) -> None:
    out = tmp_path / "bench"
    result = CliRunner().invoke(main, ["bench", str(_recipe(make_doc, write_recipe)), "--methods", "qlora,lora",
                                       "--steps", "2", "--eval-limit", "4", "--out", str(out),
                                       "--set", f"qlora:model.source={tmp_path / 'no-such-model'}"])
    assert result.exit_code == 1, result.output
    record = json.loads((out / "bench.json").read_text())
    failed, ok = record["methods"]
    assert failed["status"] == "failed" and "no-such-model" in failed["error"]
    assert ok["status"] == "ok" and ok["f1"] is not None
    assert "qlora failed" in (out / "bench.md").read_text()
    assert (out / "bench_memory.png").read_bytes().startswith(PNG)


def test_bench_tables_show_intervals_and_mark_within_noise_differences(tmp_path: Path) -> None:
    refs = [[f"answer {i}"] for i in range(60)]
    predictions = {"right": [r[0] for r in refs], "wrong": ["nothing"] * 60,
                   "nearly": [r[0] if i else "nothing" for i, r in enumerate(refs)]}  # one question apart
    rows = []
    for name, preds in predictions.items():
        records = [{"id": str(i), "prediction": p, "references": r} for i, (p, r) in enumerate(zip(preds, refs))]
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "predictions.jsonl", records)
        scores = qa_scores(preds, refs)
        rows.append({"method": name, "status": "ok", "task": "qa", "score_names": ["exact_match", "f1"],
                     "breakdown_mib": {}, "eval_n": 60, **{k: scores[k] for k in ("exact_match", "f1")},
                     "intervals": score_intervals("qa", records)})
    found = differences(rows, {name: tmp_path / name for name in predictions})
    verdict = {(d["a"], d["b"], d["score"]): d["within_noise"] for d in found}
    assert verdict[("right", "wrong", "f1")] is False and verdict[("right", "nearly", "f1")] is True
    assert verdict[("wrong", "nearly", "exact_match")] is False
    record = {"recipe": "r.yaml", "steps": 1, "methods": rows, "differences": found, "command": "lite-ft bench",
              "environment": {"cpu": "cpu", "logical_cores": 2, "ram_gib": 1, "versions": {}}}
    names, table = table_rows(record)
    assert names[names.index("f1") + 1] == "f1_95ci" and table[1]["exact_match_95ci"] == "[0.0, 6.0]"  # Wilson, 0 of 60
    md = markdown(record, names, table)
    assert "| right - nearly | f1 | +1.67 | [+0.00, +5.00] | 60 | within noise |" in md
    assert "| right - wrong | f1 | +100.00 | [+100.00, +100.00] | 60 | beyond noise |" in md


def test_bench_plan_reports_every_problem_before_running(
        make_doc: Callable[..., dict[str, Any]], write_recipe: Callable[..., Path], tmp_path: Path) -> None:
    recipe = _recipe(make_doc, write_recipe)
    with pytest.raises(RecipeError) as err:
        plan(recipe, ["lora", "dora"], steps=0, eval_limit=None, out=tmp_path, method_overrides=["qlora-r=4"])
    text = str(err.value)
    assert "dora" in text and "--steps" in text and "qlora-r=4" in text
    with pytest.raises(RecipeError, match="qlora: .*lora.r"):
        plan(recipe, ["lora", "qlora"], steps=2, eval_limit=None, out=tmp_path, method_overrides=["qlora:lora.r=0"])
    planned = plan(recipe, ["lora", "full"], steps=2, eval_limit=None, out=tmp_path)
    assert planned.methods[1].lr == pytest.approx(1e-4)  # full: a tenth of the LoRA recipe's rate


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_memory_breakdown_adds_up_to_no_more_than_the_peak(make_doc: Callable[..., dict[str, Any]],
                                                          method: str) -> None:
    """In this long-lived test process RSS is noisy (pages freed by earlier tests get reused), so a run may end with
    a note instead of a sum; the bench test above checks the sum in fresh processes."""
    recipe = load_recipe(document=make_doc("qa", method, train={"batch_size": 4, "max_steps": 3}))
    monitor = MemoryMonitor(pick_device("cpu"))
    with monitor:
        built = build(recipe)
        train_steps(built.model, built.tokenizer, recipe, monitor=monitor)
    breakdown = monitor.breakdown()
    assert breakdown is not None
    parts = breakdown["parts_mib"]
    assert all(v >= 0 for v in parts.values())
    if "note" not in breakdown:
        assert sum(parts.values()) == pytest.approx(breakdown["peak_mib"], rel=1e-9)
    assert parts["runtime"] == monitor.baseline_mib > 0
    assert parts["gradients"] == pytest.approx(parts["trainable parameters"], rel=1e-6)  # one grad per parameter
    assert parts["optimizer state"] >= 2 * parts["trainable parameters"]  # AdamW: two moments each


def test_qlora_weights_take_less_memory_than_lora_weights(make_doc: Callable[..., dict[str, Any]]) -> None:
    weights = {}
    for method in ("lora", "qlora"):
        built = build(load_recipe(document=make_doc("qa", method)))
        t = tensor_bytes(built.model)
        weights[method] = t["frozen_weights"]
        assert t["trainable"] > 0
    assert sum(weights["qlora"].values()) < sum(weights["lora"].values())
    # The linear layers that QLoRA quantizes: fp32 in LoRA, NF4 (4 bits + block scales) in QLoRA.
    quantized_fp32 = weights["lora"]["float32"] - weights["qlora"]["float32"]
    assert 0 < weights["qlora"]["4-bit nf4"] < 0.2 * quantized_fp32


def test_attention_kernel_is_passed_to_transformers(make_doc: Callable[..., dict[str, Any]]) -> None:
    built = build(load_recipe(document=make_doc("qa", "lora", model={"attention": "eager"})))
    assert built.model.get_base_model().config._attn_implementation == "eager"
    with pytest.raises(RecipeError, match="flash-attn"):
        load_recipe(document=make_doc("qa", "lora", model={"attention": "flash_attention_2"}))


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_classification_keeps_its_new_head_in_full_precision(
        make_doc: Callable[..., dict[str, Any]], quantization: str) -> None:
    method = "qlora" if quantization == "4bit" else "lora"
    recipe = load_recipe(document=make_doc("classification", method, model={"quantization": quantization}))
    built = build(recipe, num_labels=2)
    heads = [m for name, m in built.model.named_modules() if name.endswith("classifier.modules_to_save.default")]
    assert heads and all(type(h) is torch.nn.Linear and h.weight.dtype == torch.float32 for h in heads)
    before = [h.weight.detach().clone() for h in heads]
    stats, _ = train_steps(built.model, built.tokenizer, recipe)
    assert stats["steps"] == 3 and math.isfinite(stats["final_loss"])
    assert all(not torch.equal(b, h.weight) for b, h in zip(before, heads)), "the new head did not train"


def test_memory_chart_splits_live_tensors_from_allocator_overhead(tmp_path) -> None:
    from lite_ft.bench.report import LIVE, OVERHEAD, plot_memory, split_activations

    row = {"method": "lora", "status": "ok", "peak_memory_mib": 1000.0, "peak_phase": "steady_state",
           "memory_source": "process_rss", "live_transient_mib": 300.0,
           "breakdown_mib": {"runtime": 400.0, "weights (float32)": 100.0, "activations and workspace": 500.0}}
    assert split_activations(row) == (300.0, 200.0)
    assert split_activations({**row, "live_transient_mib": 900.0}) == (500.0, 0.0)  # never more than measured
    assert split_activations({**row, "live_transient_mib": None}) is None
    plot_memory({"methods": [row]}, tmp_path / "memory.png")
    assert row["chart_mib"][LIVE] + row["chart_mib"][OVERHEAD] == 500.0
    assert "activations and workspace" not in row["chart_mib"]
    assert (tmp_path / "memory.png").stat().st_size > 0
