"""lite-ft merge and lite-ft eval on tiny random models: merged logits equal the adapter model's, the export loads
with plain transformers, GGUF files round-trip, broken inputs fail cleanly with nothing left behind, and an
evaluation of the export reproduces the run's own scores."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import _asset_texts
from helpers import read_jsonl, recipe_doc, save_tiny_llama
from lite_ft.cli import main
from lite_ft.recipe.load import load_recipe
from lite_ft.errors import LiteFTError
from lite_ft.evaluate import evaluate
from lite_ft.util import sha256_file
from lite_ft.export.verify import TOLERANCE
from lite_ft.export.merge import merge
from lite_ft.run import run

# ChatML with a default system turn, like SmolLM2's template.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SAMPLE = "The river Thames flows through London; 42 bridges cross it. Don't you think?"


def _llama(folder: Path, tokenizer: Any, tied: bool, hidden: int = 64, layers: int = 2) -> Path:
    return save_tiny_llama(folder, tokenizer, hidden, layers, tied)


@pytest.fixture(scope="module")
def bytelevel_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """Tiny Llamas with a gpt2-style byte-level BPE and a ChatML template (what GGUF export writes), tied (like
    SmolLM2) and untied; keyed by tie_word_embeddings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_asset_texts(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>", chat_template=CHATML)
    return {tied: _llama(tmp_path_factory.mktemp(f"bytelevel-{tied}"), tokenizer, tied) for tied in (True, False)}


def train(folder: Path, model_dir: Path, bert_dir: Path, task: str = "qa", method: str = "lora",
          **sections: Any) -> Path:
    """A short run (lr 1e-2, so the adapter clearly changes the model); returns the run folder."""
    doc = recipe_doc(task, method, folder, model_dir, bert_dir, **{"train": {"lr": 1e-2}, **sections})
    run(load_recipe(document=doc))
    return folder / "run"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, tiny_bert_dir: Path,
         bytelevel_dirs: dict[bool, Path]) -> dict[str, Path]:
    """One run per kind, trained once for the module."""
    def make(name: str, model_dir: Path, **kw: Any) -> Path:
        return train(tmp_path_factory.mktemp(name), model_dir, tiny_bert_dir, **kw)

    return {"lora": make("lora", tiny_llama_dir), "qlora": make("qlora", tiny_llama_dir, method="qlora"),
            "lora8": make("lora8", tiny_llama_dir, model={"quantization": "8bit"}),
            "tied": make("tied", bytelevel_dirs[True]), "untied": make("untied", bytelevel_dirs[False]),
            "cls": make("cls", tiny_bert_dir, task="classification", train={"lr": 1e-2, "batch_size": 8}),
            "full": make("full", tiny_llama_dir, method="full", train={"lr": 1e-3, "max_steps": 1})}


def ids_of(tokenizer: Any) -> torch.Tensor:
    return torch.tensor([tokenizer(SAMPLE)["input_ids"]])


@torch.no_grad()
def adapter_logits(run_dir: Path, ids: torch.Tensor, quantization: str | None = None) -> torch.Tensor:
    """Logits of base + adapter computed here, independently of lite_ft.export.merge."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lite_ft.model import quantization_config

    recipe = load_recipe(run_dir / "recipe.yaml")
    kw: dict[str, Any] = {"dtype": torch.float32}
    if quantization:
        kw.update(quantization_config=quantization_config(quantization, torch.float32), device_map={"": "cpu"})
    base = AutoModelForCausalLM.from_pretrained(recipe.model.source, **kw)
    return PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()(input_ids=ids).logits[0]


@torch.no_grad()
def plain_logits(folder: Path, ids: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw).eval()
    return model(input_ids=ids).logits[0], model


def no_leftovers(out: Path) -> bool:
    """Nothing at `out` and no hidden staging sibling beside it (nor its parent, when that did not exist)."""
    siblings = out.parent.iterdir() if out.parent.is_dir() else []
    return not out.exists() and not any(p.name.startswith(f".{out.name}.") for p in siblings)


def test_lora_merge_equals_the_adapter_model_and_loads_without_peft(runs: dict[str, Path], tmp_path: Path,
                                                                    tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    b_mats = [w for k, w in load_file(runs["lora"] / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert b_mats and all(torch.count_nonzero(w) > 0 for w in b_mats)  # trained: the merge has something to add
    record = merge(runs["lora"], tmp_path / "out")
    out = tmp_path / "out"
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = ids_of(tokenizer)
    merged, model = plain_logits(out, ids)
    assert not [n for n, _ in model.named_modules() if "lora" in n] and not hasattr(model, "peft_config")
    reference = adapter_logits(runs["lora"], ids)
    base, _ = plain_logits(tiny_llama_dir, ids)
    assert (merged - reference).abs().max() < 1e-4
    assert (base - reference).abs().max() > 100 * (merged - reference).abs().max()  # the adapter mattered
    check = record["verification"]["against_unquantized_base"]
    assert record["verification"]["passed"] and check["max_abs_diff"] < 1e-4 and check["greedy_agreement"] == 1.0
    assert record["verification"]["prompts"] == 4 and "eval examples" in record["verification"]["prompt_source"]
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(record["files"])
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_export_json_and_model_card_state_the_provenance(runs: dict[str, Path], tmp_path: Path,
                                                         tiny_llama_dir: Path) -> None:
    merge(runs["lora"], tmp_path / "out")
    record = json.loads((tmp_path / "out" / "export.json").read_text())
    adapter_sha = sha256_file(runs["lora"] / "adapter" / "adapter_model.safetensors")
    assert record["adapter"]["sha256"] == adapter_sha
    assert record["base_model"]["files"] == {"model.safetensors": sha256_file(tiny_llama_dir / "model.safetensors")}
    assert (record["method"], record["dtype"], record["format"]) == ("lora", "float32", "safetensors")
    strategy = record["merge_strategy"]
    assert strategy.startswith("streaming LoRA merge") and "not streamed" not in strategy
    written = record["streaming_merge"]
    assert written["merged_weights"] == 14 and written["files"] == ["model.safetensors"]  # 7 linear x 2 layers
    assert 0 < record["merge_peak_rss_mib"] == record["memory_phases"]["merge"] <= record["peak_rss_mib"]
    assert record["run_metrics"] == json.loads((runs["lora"] / "metrics.json").read_text())
    card = (tmp_path / "out" / "README.md").read_text()
    assert adapter_sha in card and record["base_model"]["sha256"] in card and "passed" in card
    assert f"{record['verification']['against_unquantized_base']['max_abs_diff']:.3g}" in card


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_streaming_export_equals_the_in_memory_peft_merge(runs: dict[str, Path], tmp_path: Path, kind: str) -> None:
    streamed = merge(runs[kind], tmp_path / "streamed")
    in_memory = merge(runs[kind], tmp_path / "in-memory", strategy="in-memory")
    assert streamed["merge_strategy"].startswith("streaming LoRA merge")
    assert "merge_and_unload" in in_memory["merge_strategy"] and "in-memory merge was requested" in \
        in_memory["merge_strategy"]
    got, expected = (load_file(tmp_path / name / "model.safetensors") for name in ("streamed", "in-memory"))
    assert got.keys() == expected.keys()
    for key in got:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)
    base = load_file(Path(in_memory["base_model"]["resolved"]) / "model.safetensors")
    assert sum(not torch.equal(got[k], base[k]) for k in got) == streamed["streaming_merge"]["merged_weights"] == 14
    assert streamed["verification"]["passed"] and streamed["verification"]["against_unquantized_base"][
        "max_abs_diff"] < 1e-4
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["dtype"] == "float32"
    assert "quantization_config" not in json.loads((tmp_path / "streamed" / "config.json").read_text())


def test_tied_run_streams_one_embedding_matrix(runs: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    record = merge(runs["tied"], tmp_path / "out", dtype="bfloat16")
    assert record["merge_strategy"].startswith("streaming LoRA merge") and record["verification"]["passed"]
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    ids = ids_of(AutoTokenizer.from_pretrained(tmp_path / "out"))
    merged, model = plain_logits(tmp_path / "out", ids)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    reference = adapter_logits(runs["tied"], ids)
    assert (merged - reference).abs().max() <= TOLERANCE["bfloat16"] * reference.abs().max()


def test_a_fallback_to_the_in_memory_merge_is_recorded(runs: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    record = merge(runs["cls"], tmp_path / "out")  # peft saves the new classification head: modules_to_save
    assert "merge_and_unload" in record["merge_strategy"]
    assert "not streamed: adapter_config.json uses modules_to_save" in record["merge_strategy"]
    assert "merging in memory" in capsys.readouterr().err and "streaming_merge" not in record
    export = json.loads((tmp_path / "out" / "export.json").read_text())
    assert export["merge_strategy"] == record["merge_strategy"] and record["verification"]["passed"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_merge(runs: dict[str, Path], tmp_path: Path, dtype: str) -> None:
    record = merge(runs["lora"], tmp_path / "out", dtype=dtype)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {getattr(torch, dtype)}
    check = record["verification"]["against_unquantized_base"]
    assert 0 < check["max_abs_diff"] <= TOLERANCE[dtype] * check["logit_scale"]


@pytest.mark.parametrize("kind,quantization", [("qlora", "4bit"), ("lora8", "8bit")])
def test_quantized_runs_merge_into_an_unquantized_base(runs: dict[str, Path], tmp_path: Path, kind: str,
                                                       quantization: str) -> None:
    from transformers import AutoTokenizer

    record = merge(runs[kind], tmp_path / "out")
    v = record["verification"]
    assert record["training_quantization"] == quantization
    assert v["passed"] and v["against_unquantized_base"]["max_abs_diff"] < 1e-4
    # Against the quantized base it was trained with the difference is the quantization error: reported only.
    assert v["against_quantized_base"]["max_abs_diff"] > 10 * v["against_unquantized_base"]["max_abs_diff"]
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # no int8 / packed 4-bit weights
    ids = ids_of(AutoTokenizer.from_pretrained(tmp_path / "out"))
    merged, _ = plain_logits(tmp_path / "out", ids)
    assert (merged - adapter_logits(runs[kind], ids)).abs().max() < 1e-4
    quantized = adapter_logits(runs[kind], ids, quantization)
    assert (merged - quantized).abs().max() < 0.25 * quantized.abs().max()  # same model up to quantization error


def test_gguf_refuses_unsupported_models_before_writing(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(LiteFTError, match="Llama-architecture"):
        merge(runs["cls"], tmp_path / "a", fmt="gguf")
    with pytest.raises(LiteFTError, match="gpt2-style"):  # the Metaspace BPE of the conftest model
        merge(runs["lora"], tmp_path / "b", fmt="gguf")
    assert no_leftovers(tmp_path / "a") and no_leftovers(tmp_path / "b")


def _broken_copy(runs: dict[str, Path], tmp_path: Path, damage: str, tiny_bert_dir: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(runs["lora"], copy)
    adapter = copy / "adapter" / "adapter_model.safetensors"
    if damage == "truncated":
        adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    elif damage == "missing":
        (copy / "adapter" / "adapter_config.json").unlink()
    else:  # an adapter trained on a differently shaped model
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(copy / "adapter")
        shape = {"hidden": {"hidden": 32}, "layers": {"layers": 3}}[damage]
        other = _llama(tmp_path / "other-model", tokenizer, tied=False, **shape)
        trained = train(tmp_path / "other", other, tiny_bert_dir, train={"lr": 1e-2, "max_steps": 1},
                        data={"eval": None})
        shutil.rmtree(copy / "adapter")
        shutil.copytree(trained / "adapter", copy / "adapter")
    return copy


@pytest.mark.parametrize("damage,message", [("truncated", "is damaged"), ("missing", "lacks adapter_config.json"),
                                            ("hidden", "does not fit the base model"),
                                            ("layers", "does not fit the base model")])
def test_broken_adapters_fail_cleanly(runs: dict[str, Path], tmp_path: Path, tiny_bert_dir: Path, damage: str,
                                      message: str) -> None:
    broken = _broken_copy(runs, tmp_path, damage, tiny_bert_dir)
    out = tmp_path / "exports" / "merged"
    with pytest.raises(LiteFTError, match=message):
        merge(broken, out)
    assert no_leftovers(out)


def test_merging_twice_replaces_the_export_and_strangers_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = merge(runs["lora"], out)
    second = merge(runs["lora"], out, dtype="float16")
    assert not first["replaced_previous_export"] and second["replaced_previous_export"]
    assert json.loads((out / "export.json").read_text())["dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old copy left beside it
    stranger = tmp_path / "mine"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(LiteFTError, match="not a lite-ft export"):
        merge(runs["lora"], stranger)
    assert [p.name for p in stranger.iterdir()] == ["notes.txt"]
    with pytest.raises(LiteFTError, match="holds the run itself"):
        merge(runs["lora"], runs["lora"])


def test_full_run_is_converted_and_checked_tensor_by_tensor(runs: dict[str, Path], tmp_path: Path) -> None:
    same = merge(runs["full"], tmp_path / "fp32")
    assert same["adapter"] is None and same["verification"]["weights"]["bit_identical"]
    assert same["verification"]["against_unquantized_base"]["max_abs_diff"] == 0.0
    half = merge(runs["full"], tmp_path / "fp16", dtype="float16")
    weights = half["verification"]["weights"]
    assert not weights["bit_identical"] and 0 < weights["max_abs_diff"] < 1e-2 and weights["tensors"] > 10


def scores(evaluation: dict[str, Any]) -> dict[str, Any]:
    """An eval record without its timing, which differs run to run."""
    assert evaluation["seconds"] > 0 and evaluation["examples_per_second"] > 0
    return {k: v for k, v in evaluation.items() if k not in ("seconds", "examples_per_second")}


def test_eval_of_the_merged_folder_reproduces_the_run(runs: dict[str, Path], tmp_path: Path) -> None:
    merge(runs["lora"], tmp_path / "merged")
    recipe = runs["lora"] / "recipe.yaml"
    expected = scores(json.loads((runs["lora"] / "metrics.json").read_text())["eval"])
    metrics = evaluate(tmp_path / "merged", recipe=recipe, out=tmp_path / "eval")
    assert scores(metrics["eval"]) == expected and metrics["kind"] == "model folder"
    assert read_jsonl(tmp_path / "eval" / "predictions.jsonl") == read_jsonl(runs["lora"] / "predictions.jsonl")
    assert scores(json.loads((tmp_path / "eval" / "metrics.json").read_text())["eval"]) == expected
    assert scores(evaluate(runs["lora"])["eval"]) == expected  # the run folder itself: base + adapter


def test_eval_of_quantized_run_and_classification_merge(runs: dict[str, Path], tmp_path: Path) -> None:
    expected = scores(json.loads((runs["qlora"] / "metrics.json").read_text())["eval"])
    assert scores(evaluate(runs["qlora"])["eval"]) == expected  # loads the 4-bit base as trained
    merge(runs["cls"], tmp_path / "cls")
    cls_expected = json.loads((runs["cls"] / "metrics.json").read_text())["eval"]
    metrics = evaluate(tmp_path / "cls", recipe=runs["cls"] / "recipe.yaml")
    assert metrics["eval"]["accuracy"] == cls_expected["accuracy"] and metrics["eval"]["n"] == 16


def test_eval_of_an_exported_gguf(runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITE_FT_CACHE", str(tmp_path / "cache"))
    merge(runs["tied"], tmp_path / "gguf", fmt="gguf", gguf_type="f32")
    metrics = evaluate(tmp_path / "gguf" / "model.gguf", recipe=runs["tied"] / "recipe.yaml", out=tmp_path / "ev")
    assert metrics["kind"] == "gguf file"
    assert read_jsonl(tmp_path / "ev" / "predictions.jsonl") == read_jsonl(runs["tied"] / "predictions.jsonl")


def invoke(*args: Any) -> Result:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def test_cli_merge_and_eval_exit_codes(runs: dict[str, Path], tmp_path: Path) -> None:
    good = invoke("merge", runs["lora"], "--out", tmp_path / "m", "--dtype", "float16")
    assert good.exit_code == 0, good.output
    assert "max |logit diff|" in good.output and "peak memory" in good.output
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "float16"
    missing = invoke("merge", tmp_path / "nothing", "--out", tmp_path / "x")
    assert missing.exit_code == 1 and "error:" in missing.output and "not a run folder" in missing.output
    bad = invoke("merge", runs["cls"], "--out", tmp_path / "g", "--format", "gguf")
    assert bad.exit_code == 1 and "Llama" in bad.output and no_leftovers(tmp_path / "g")
    quantized = invoke("merge", runs["qlora"], "--out", tmp_path / "q")
    assert quantized.exit_code == 0 and "quantized base it was trained on" in quantized.output
    evaluated = invoke("eval", tmp_path / "m", "--recipe", runs["lora"] / "recipe.yaml", "--out", tmp_path / "ev",
                       "data.limit_eval=2")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["eval"]["n"] == 2
    no_recipe = invoke("eval", tmp_path / "m")
    assert no_recipe.exit_code == 1 and "--recipe" in no_recipe.output
