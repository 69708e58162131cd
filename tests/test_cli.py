"""The command line, end to end on the tiny models: what a run writes, and how bad input is reported."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from safetensors.torch import load_file

from helpers import read_jsonl, recipe_doc
from lite_ft.cli import main
from lite_ft.recipe.load import load_recipe
from lite_ft.metrics import classification_scores, qa_scores


def invoke(*args: str) -> Result:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def ok(*args: str) -> Result:
    result = invoke(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def percent(value: Any) -> bool:
    return isinstance(value, (int, float)) and 0.0 <= value <= 100.0


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path,
           tiny_bert_dir: Path) -> tuple[Path, Result, Path]:
    """One qa lora run with a baseline evaluation, shared by the tests that inspect what it wrote."""
    folder = tmp_path_factory.mktemp("qa-run")
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_doc("qa", "lora", folder, tiny_llama_dir, tiny_bert_dir,
                                              eval={"baseline": True})))
    return path, ok("run", path), folder / "run"


def test_qa_lora_run_metrics(qa_run: tuple[Path, Result, Path]) -> None:
    path, result, out = qa_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["task"], metrics["method"], metrics["quantization"]) == ("qa", "lora", "none")
    assert metrics["model"] == load_recipe(path).model.source
    for key in ("eval", "baseline_eval"):
        assert percent(metrics[key]["exact_match"]) and percent(metrics[key]["f1"]), metrics[key]
        assert metrics[key]["exact_match"] <= metrics[key]["f1"] + 1e-9
        assert metrics[key]["n"] == 4
    train = metrics["train"]
    assert train["steps"] == 3
    assert math.isfinite(train["final_loss"]) and train["final_loss"] > 0
    assert train["tokens_per_second"] > 0 and train["wall_seconds"] > 0 and train["peak_memory_mib"] > 0
    assert 0 < train["trainable_params"] < train["total_params"]
    assert train["device"].startswith("cpu") and train["dtype"] == "float32"
    assert metrics["data"]["train"]["used"] == 8 and metrics["data"]["eval"]["used"] == 4
    assert "before training" in result.output and "after training" in result.output
    for key in ("exact_match", "f1"):  # every score with its n and 95% interval, in metrics.json and the table
        interval = metrics["eval"]["intervals"][key]
        assert interval["n"] == 4 and interval["low"] <= metrics["eval"][key] <= interval["high"]
        assert f"{metrics['eval'][key]:.2f} [{interval['low']:.2f}, {interval['high']:.2f}]" in result.output


def test_eval_compare_prints_the_paired_difference(qa_run: tuple[Path, Result, Path], tiny_llama_dir: Path) -> None:
    from lite_ft.evaluate import compare

    _, _, out = qa_run
    result = compare(out, tiny_llama_dir)  # the trained run against its untrained base, on the same 4 questions
    for key in ("exact_match", "f1"):
        d = result["differences"][key]
        assert d["difference"] == pytest.approx(result["a"]["eval"][key] - result["b"]["eval"][key])
        assert d["low"] <= d["difference"] <= d["high"] and d["n"] == 4
        assert d["within_noise"] == (d["low"] <= 0 <= d["high"])
    same = compare(out, out)["differences"]
    assert all(d["difference"] == 0 and d["within_noise"] for d in same.values())
    shown = ok("eval", out, "--compare", tiny_llama_dir).output
    assert "A - B, paired over the same examples" in shown and "f1: " in shown and "noise" in shown


def test_qa_lora_run_predictions_and_logs(qa_run: tuple[Path, Result, Path]) -> None:
    path, _, out = qa_run
    metrics = json.loads((out / "metrics.json").read_text())
    predictions = read_jsonl(out / "predictions.jsonl")
    assert len(predictions) == metrics["eval"]["n"]
    assert all(set(p) == {"id", "prediction", "references"} and isinstance(p["prediction"], str)
               and p["references"] and all(isinstance(r, str) for r in p["references"]) for p in predictions)
    assert len({p["id"] for p in predictions}) == len(predictions)
    rescored = qa_scores([p["prediction"] for p in predictions], [p["references"] for p in predictions])
    assert rescored["exact_match"] == pytest.approx(metrics["eval"]["exact_match"])
    assert rescored["f1"] == pytest.approx(metrics["eval"]["f1"])

    log = read_jsonl(out / "train_log.jsonl")
    assert [e["step"] for e in log] == [1, 2, 3]
    assert all(math.isfinite(e["loss"]) and e["lr"] >= 0 for e in log)
    assert log[-1]["loss"] == metrics["train"]["final_loss"]

    assert load_recipe(out / "recipe.yaml") == load_recipe(path)

    memory = json.loads((out / "memory.json").read_text())
    assert memory["peak_mib"] == metrics["train"]["peak_memory_mib"]
    assert memory["peak_phase"] == metrics["train"]["peak_memory_phase"] in memory["phases"]
    assert {"model_load", "first_forward", "first_backward", "optimizer_step", "steady_state", "evaluation",
            "save"} <= set(memory["phases"])
    assert all(p["peak_mib"] > 0 for p in memory["phases"].values())
    assert memory["peak_mib"] == max(p["peak_mib"] for p in memory["phases"].values())


def test_qa_lora_run_saves_a_trained_adapter_and_tokenizer(qa_run: tuple[Path, Result, Path]) -> None:
    _, _, out = qa_run
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert (out / "adapter" / "tokenizer.json").is_file() and (out / "adapter" / "tokenizer_config.json").is_file()
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    b_mats = [w for name, w in weights.items() if "lora_B" in name]
    assert b_mats and all(torch.count_nonzero(w) > 0 for w in b_mats)  # trained: B left zero
    assert not any("lora" not in name for name in weights)             # the adapter only, not the base
    assert not (out / "model").exists()


def test_classification_lora_run(make_doc: Callable[..., dict[str, Any]], write_recipe: Callable[..., Path],
                                 tmp_path: Path) -> None:
    ok("run", write_recipe(make_doc("classification", "lora", train={"max_steps": 4, "batch_size": 8})))
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "classification"
    assert percent(metrics["eval"]["accuracy"]) and percent(metrics["eval"]["macro_f1"])
    assert metrics["eval"]["n"] == 16 and metrics["eval"]["num_labels"] == 2
    predictions = read_jsonl(out / "predictions.jsonl")
    assert len(predictions) == 16
    assert all(type(p["label"]) is int and type(p["prediction"]) is int and p["prediction"] in (0, 1)
               for p in predictions)
    rescored = classification_scores([p["prediction"] for p in predictions], [p["label"] for p in predictions], 2)
    assert rescored["accuracy"] == pytest.approx(metrics["eval"]["accuracy"])
    assert rescored["macro_f1"] == pytest.approx(metrics["eval"]["macro_f1"])
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"


def test_instruction_run_reports_loss_and_perplexity(make_doc: Callable[..., dict[str, Any]],
                                                     write_recipe: Callable[..., Path], tmp_path: Path) -> None:
    doc = make_doc("instruction", "lora", output={"save_model": False}, eval={"baseline": True})
    result = ok("run", write_recipe(doc))
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("baseline_eval", "eval"):
        scores = metrics[key]
        assert math.isfinite(scores["loss"]) and scores["loss"] > 0
        assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"]), rel=1e-9)
        assert scores["n"] == 6 and scores["tokens"] > 0
    predictions = read_jsonl(out / "predictions.jsonl")
    assert len(predictions) == 6 and all(p["response_tokens"] > 0 for p in predictions)
    assert sum(p["response_tokens"] for p in predictions) == metrics["eval"]["tokens"]
    assert not (out / "adapter").exists()  # output.save_model false
    assert "perplexity" in result.output


def test_overrides_are_applied(make_doc: Callable[..., dict[str, Any]], write_recipe: Callable[..., Path],
                               tmp_path: Path) -> None:
    path = write_recipe(make_doc("qa", "lora", train={"max_steps": 5}, data={"eval": None}))
    other = tmp_path / "elsewhere"
    ok("run", path, "train.max_steps=2", "lora.r=2", f"output.dir={other}")
    metrics = json.loads((other / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 2
    assert [e["step"] for e in read_jsonl(other / "train_log.jsonl")] == [1, 2]
    saved = load_recipe(other / "recipe.yaml")
    assert (saved.train.max_steps, saved.lora.r, saved.output.dir) == (2, 2, str(other))
    assert json.loads((other / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert "eval" not in metrics and not (other / "predictions.jsonl").exists()  # no eval source: no eval
    assert not (tmp_path / "run").exists()


def test_full_run_saves_full_weights(make_doc: Callable[..., dict[str, Any]], write_recipe: Callable[..., Path],
                                     tmp_path: Path, tiny_llama_dir: Path) -> None:
    ok("run", write_recipe(make_doc("qa", "full", data={"eval": None})), "train.max_steps=1")
    folder = tmp_path / "run" / "model"
    trained = load_file(folder / "model.safetensors")
    base = load_file(tiny_llama_dir / "model.safetensors")
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train"]["trainable_params"] == metrics["train"]["total_params"]


def test_bad_recipe_exits_2_naming_every_key(write_recipe: Callable[..., Path], tmp_path: Path) -> None:
    path = write_recipe({"task": "qa", "method": "lora", "train": {"lrr": 1e-4, "batch_size": -1},
                         "lora": {"r": "sixteen"}, "data": {"train": str(tmp_path / "none.jsonl")}})
    result = invoke("run", path, "eval.max_new_tokens=0")
    assert result.exit_code == 2
    for key in ("train.lrr", "train.batch_size", "lora.r", "data.train", "eval.max_new_tokens"):
        assert f"  - {key}:" in result.output, key
    assert "did you mean train.lr?" in result.output
    assert "5 problems" in result.output
    assert not (tmp_path / "run").exists()


def test_bad_override_exits_2(make_doc: Callable[..., dict[str, Any]], write_recipe: Callable[..., Path]) -> None:
    result = invoke("run", write_recipe(make_doc()), "train.max_steps=lots")
    assert result.exit_code == 2 and "train.max_steps: 'lots' is not an integer" in result.output


def test_missing_recipe_file(tmp_path: Path) -> None:
    result = invoke("run", tmp_path / "no-such-recipe.yaml")
    assert result.exit_code != 0
    assert "file not found" in result.output and "no-such-recipe.yaml" in result.output


def test_data_error_is_a_clean_exit(make_doc: Callable[..., dict[str, Any]], write_recipe: Callable[..., Path],
                                    tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n")
    result = invoke("run", write_recipe(make_doc(data={"train": str(bad), "eval": None})))
    assert result.exit_code == 1 and "error: data.train: no usable example" in result.output


def test_validate_prints_the_resolved_recipe(write_recipe: Callable[..., Path]) -> None:
    path = write_recipe({"task": "qa", "method": "qlora", "train": {"lr": "1e-4"}})
    result = ok("validate", path, "train.max_steps=9")
    printed = yaml.safe_load(result.output)
    recipe = load_recipe(path, ["train.max_steps=9"])
    assert printed == recipe.to_dict()
    assert printed["model"]["quantization"] == "4bit" and printed["train"]["lr"] == 1e-4
    assert printed["train"]["max_steps"] == 9 and printed["lora"]["r"] == 16     # defaults are spelled out
    bad = invoke("validate", path, "train.lr=0")
    assert bad.exit_code == 2 and "train.lr" in bad.output


def test_models_lists_the_catalog() -> None:
    result = ok("models")
    names = [line.split()[0] for line in result.output.splitlines() if line and not line.startswith("(")]
    assert {"smollm2-135m-instruct", "minilm-l6"} <= set(names)
    assert "cached under" in result.output
