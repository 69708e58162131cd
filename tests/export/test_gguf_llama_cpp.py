"""GGUF exports checked in the real llama.cpp (the cyllama wheel of the gguf-check extra; skipped without it):
every split lite-ft may name is the one llama.cpp applies, every name it may carry loads, the old `gpt2` name and a
missing name are caught, tiny exports in every type pass with the figures the issue asks for, and a failed check
fails the export with nothing left behind."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from click.testing import CliRunner

from lite_ft import cli
from lite_ft.errors import LiteFTError
from lite_ft.export import gguf as gguf_writer
from lite_ft.export import gguf_vocab, llama_cpp
from lite_ft.export.gguf_check import PROBES, check_tokens
from lite_ft.export.merge import merge
from lite_ft.recipe.load import load_recipe
from test_gguf import bytelevel_tokenizer, no_leftovers, tiny_llama, tiny_run  # noqa: F401 (tiny_run: a fixture)

pytest.importorskip("cyllama", reason=f"llama.cpp is not installed: {llama_cpp.INSTALL}")


def write_gguf(folder: Path, tokenizer: Any, pre_name: str) -> Path:
    """A 1-layer random Llama on `tokenizer`, written as f32 GGUF with tokenizer.ggml.pre = pre_name."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = tiny_llama(folder / "hf", tokenizer, hidden=64)
    config = AutoConfig.from_pretrained(model_dir)
    state = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    tensors = gguf_writer.Tensors({k: tuple(v.shape) for k, v in state.items()}, state.__getitem__)
    pre = {"name": pre_name, "from": "test", "split_matches": None, "carried": None}
    gguf_writer.write(tensors, config, tokenizer, folder / "model.gguf", "f32", "test", pre)
    return folder / "model.gguf"


@pytest.mark.parametrize("name", list(gguf_vocab.LLAMA_CPP_SPLITS))
def test_each_split_lite_ft_names_is_the_one_llama_cpp_applies(name: str, tmp_path: Path) -> None:
    # Trained on whole lines, the vocabulary has merges across every boundary where two splits differ.
    tokenizer = bytelevel_tokenizer(gguf_vocab.LLAMA_CPP_SPLITS[name], vocab_size=3000, unsplit=True)
    assert gguf_vocab.split_name(tokenizer) == name
    path = write_gguf(tmp_path / "model", tokenizer, name)
    with llama_cpp.open_gguf(path) as engine:
        assert engine.load_warnings == []
        tokens = check_tokens(engine, tokenizer)
        assert tokens["identical"], tokens["differences"]
        assert engine.tokenize(gguf_vocab.PROBE, False) == tokenizer(gguf_vocab.PROBE,
                                                                      add_special_tokens=False)["input_ids"]
    for other in set(gguf_vocab.LLAMA_CPP_SPLITS) - {name}:  # and the probes tell every other name from it
        with llama_cpp.open_gguf(write_gguf(tmp_path / other, tokenizer, other)) as engine:
            assert not check_tokens(engine, tokenizer)["identical"], other


def test_llama_cpp_loads_every_name_lite_ft_may_carry_and_catches_the_rest(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = bytelevel_tokenizer(vocab_size=300)
    for name in sorted(gguf_vocab.LLAMA_CPP_NAMES):
        with llama_cpp.open_gguf(write_gguf(tmp_path / name, tokenizer, name)) as engine:  # no "unknown" error
            # (the jina names, for embedding models, also ask for a mask token this vocabulary does not have)
            assert not [w for w in engine.load_warnings if "Mask token" not in w], name
    with pytest.raises(LiteFTError, match="unknown pre-tokenizer type: 'gpt2'"):  # what lite-ft used to write
        llama_cpp.open_gguf(write_gguf(tmp_path / "gpt2", tokenizer, "gpt2")).__enter__()
    monkeypatch.setattr(gguf.GGUFWriter, "add_tokenizer_pre", lambda self, name: None)
    tokenizer = bytelevel_tokenizer(vocab_size=3000, unsplit=True)
    with llama_cpp.open_gguf(write_gguf(tmp_path / "none", tokenizer, "unused")) as engine:
        assert any("GENERATION QUALITY WILL BE DEGRADED" in w for w in engine.load_warnings)
        differences = check_tokens(engine, tokenizer)["differences"]  # its 'default' split cuts "don't" in three
        assert "contractions" in differences, differences


@torch.no_grad()
def merged_logits(run_dir: Path, ids: list[int]) -> torch.Tensor:
    """The run's adapter merged into its base here, with peft, independently of lite_ft.export."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(load_recipe(run_dir / "recipe.yaml").model.source, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).merge_and_unload().eval()
    return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"])
def test_tiny_exports_pass_in_llama_cpp(tiny_run: Path, tmp_path: Path, gguf_type: str) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    record = merge(tiny_run, out, fmt="gguf", gguf_type=gguf_type)
    c = record["gguf"]["llama_cpp"]
    assert c["passed"] and c["load_warnings"] == [] and c["tokens"]["identical"] and c["stop_tokens_end_generation"]
    assert c["tokens"]["probes"] == 10 and record["gguf"]["checked_in"].startswith("llama.cpp b")
    assert c["prompts"] == c["continued"] == 4  # the tiny recipe evaluates 4 examples
    if gguf_type in ("f32", "f16"):
        assert c["relative_max_diff"] <= 0.02 and c["same_next_token"] == 4 and c["same_continuation"] == 4
    assert c["top1_agreement"] >= 0.9 and c["positions"]["positions"] == 4 * 64
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    assert {"q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K", "q8_0": "Q8_0", "f16": "F16"}.get(gguf_type,
                                                                                                "F32") in kinds
    assert not (out / ".model-f16.gguf").exists() and sorted(p.name for p in out.iterdir()) == \
        ["Modelfile", "README.md", "export.json", "model.gguf"]
    # Independently of the record: llama.cpp's logits on a probe against a merge done here.
    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "adapter")
    ids = tokenizer(" ".join(list(PROBES.values())[:4]), add_special_tokens=False)["input_ids"][:200]
    reference = merged_logits(tiny_run, ids)
    with llama_cpp.open_gguf(out / "model.gguf") as engine:
        got = torch.from_numpy(engine.logits(ids, len(ids)))
    scale = float(reference.abs().max())
    agree = float((got.argmax(-1) == reference.argmax(-1)).float().mean())
    if gguf_type in ("f32", "f16"):
        assert float((got - reference).abs().max()) <= 0.02 * scale and agree == 1.0
    else:  # random weights have small top-1 margins; a broken file would agree on ~1/1000 of the positions
        assert agree >= 0.75
    saved = json.loads((out / "export.json").read_text())["gguf"]["llama_cpp"]
    card = (out / "README.md").read_text()
    assert saved["top1_agreement"] == c["top1_agreement"] and f"{100 * c['top1_agreement']:.1f}%" in card
    assert "loads without warnings" in card and "pre-tokenizer `gpt-2`" in card


def test_a_failed_llama_cpp_check_fails_the_export(tiny_run: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Name SmolLM's split (each digit alone) for a tokenizer that keeps numbers whole: llama.cpp loads the file
    # without complaint, but tokenizes numbers differently, and the export must not go through.
    monkeypatch.setattr(gguf_vocab, "split_name", lambda tokenizer: "smollm")
    out = tmp_path / "exports" / "bad"
    result = CliRunner().invoke(cli.main, ["merge", str(tiny_run), "--out", str(out), "--format", "gguf"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "failed its check in llama.cpp" in result.output and "token ids differ from transformers" in result.output
    assert "digits" in result.output and no_leftovers(out)
