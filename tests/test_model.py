"""Model building on the tiny Llama: LoRA starts as the identity, training moves only the adapters (also on 4-bit
and 8-bit bases), full fine-tuning moves the base, and the reported figures are right."""
from __future__ import annotations

import gc
import shutil
from pathlib import Path
from typing import Any, Callable

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import changed, snapshot, train_steps
from lite_ft.recipe.load import load_recipe
from lite_ft.errors import LiteFTError
from lite_ft.model import build, count_params
from lite_ft.recipe.precision import pick_device, pick_dtype
from lite_ft.training.loop import set_seed

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
N_LAYERS = 2


def built(make_doc: Callable[..., dict[str, Any]], method: str, **sections: Any) -> Any:
    set_seed(0)
    return build(load_recipe(document=make_doc("qa", method, **sections)))


def sample_batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    enc = tokenizer(["Sunlight looks white, but it is a mixture of many colours.", "Dust and smoke."],
                    padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def modules_of_type(model: torch.nn.Module, cls: type) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, cls)]


def lora_weights(model: torch.nn.Module, which: str) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if f"lora_{which}." in n}


def test_lora_starts_as_the_identity(make_doc: Callable[..., dict[str, Any]], tiny_llama_dir: Path) -> None:
    b = built(make_doc, "lora")
    a_weights, b_weights = lora_weights(b.model, "A"), lora_weights(b.model, "B")
    assert len(b_weights) == len(LINEAR_NAMES) * N_LAYERS == len(a_weights)
    assert all(torch.count_nonzero(w) == 0 for w in b_weights.values())
    assert all(torch.count_nonzero(w) > 0 for w in a_weights.values())  # A is random, B zero: the product is 0
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    batch = sample_batch(b.tokenizer)
    torch.testing.assert_close(logits(b.model, batch), logits(base, batch), rtol=0, atol=1e-6)


def test_lora_targets_every_linear_layer_but_the_head(make_doc: Callable[..., dict[str, Any]]) -> None:
    b = built(make_doc, "lora")
    adapted = {n.rsplit(".", 1)[-1] for n, m in b.model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(LINEAR_NAMES)
    assert not hasattr(b.model.get_output_embeddings(), "lora_A")


def test_lora_training_moves_only_the_adapters(make_doc: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    b = built(make_doc, "lora", train={"lr": 1e-2})
    recipe = load_recipe(document=make_doc("qa", "lora", train={"lr": 1e-2}))
    before = snapshot(b.model)
    stats, losses = train_steps(b.model, b.tokenizer, recipe, log_path=tmp_path / "log.jsonl")
    moved = changed(before, snapshot(b.model))
    assert moved, "training changed nothing"
    assert all("lora_" in n for n in moved), [n for n in moved if "lora_" not in n]
    assert set(lora_weights(b.model, "B")) <= set(moved)   # every B left zero: every adapter learned
    assert stats["steps"] == 3 and len(losses) == 3


def test_qlora_builds_on_the_cpu_with_4bit_layers(make_doc: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    recipe = load_recipe(document=make_doc("qa", "qlora", train={"lr": 1e-2}))
    assert recipe.model.quantization == "4bit"
    set_seed(0)
    b = build(recipe)
    assert b.device.type == "cpu"
    four_bit = modules_of_type(b.model, bnb.nn.Linear4bit)
    assert len(four_bit) == len(LINEAR_NAMES) * N_LAYERS
    assert all(n.endswith(".base_layer") for n in four_bit)                      # each wrapped by LoRA
    assert all(getattr(b.model.get_submodule(n).weight, "quant_type", None) == "nf4" for n in four_bit)
    assert type(b.model.get_output_embeddings()).__name__ == "Linear"             # the head stays unquantized
    batch = sample_batch(b.tokenizer)
    with b.model.disable_adapter():
        base_logits = logits(b.model, batch)
    torch.testing.assert_close(logits(b.model, batch), base_logits, rtol=0, atol=1e-6)  # B = 0 at step 0
    before = snapshot(b.model)
    _, losses = train_steps(b.model, b.tokenizer, recipe, log_path=tmp_path / "log.jsonl")
    moved = changed(before, snapshot(b.model))
    assert moved and all("lora_" in n for n in moved), moved
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's mappings (Linux)")
@pytest.mark.parametrize("task, quantization", [("qa", "4bit"), ("qa", "8bit"), ("classification", "4bit")])
def test_a_quantized_base_leaves_its_weights_file(make_doc: Callable[..., dict[str, Any]], tiny_llama_dir: Path,
                                                  tmp_path: Path, task: str, quantization: str) -> None:
    """Once quantized, nothing maps the float weights file any more (its pages would stay in the resident set), the
    weights kept are the file's, tied ones stay tied, and peft's trained copy of a head is not a view of the block."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)  # a path no other test's model maps
    weights = str(folder / "model.safetensors")
    recipe = load_recipe(document=make_doc(task, "lora", model={"source": str(folder), "quantization": quantization}))
    b = build(recipe, num_labels=2 if task == "classification" else None)
    gc.collect()
    assert weights not in Path("/proc/self/maps").read_text(encoding="utf-8")
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert weights in Path("/proc/self/maps").read_text(encoding="utf-8")  # what the check would see without it
    kept = {n.removeprefix("base_model.model."): p for n, p in b.model.named_parameters()
            if "norm" in n or "embed" in n}
    expected = {n: p for n, p in reference.named_parameters() if n in kept}
    assert kept.keys() == expected.keys() and len(kept) == 2 * N_LAYERS + 2  # the embedding and every norm
    for name, param in kept.items():
        torch.testing.assert_close(param, expected[name], rtol=0, atol=0)
    if reference.config.tie_word_embeddings and task == "qa":
        assert b.model.get_input_embeddings().weight is b.model.get_output_embeddings().weight
    heads = [p for n, p in b.model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert len(heads) == (1 if task == "classification" else 0)  # peft's trained copy of the score head (no bias)
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in heads)


def test_lora_on_an_8bit_base(make_doc: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    recipe = load_recipe(document=make_doc("qa", "lora", model={"quantization": "8bit"}, train={"lr": 1e-2}))
    set_seed(0)
    b = build(recipe)
    assert len(modules_of_type(b.model, bnb.nn.Linear8bitLt)) == len(LINEAR_NAMES) * N_LAYERS
    before = snapshot(b.model)
    _, losses = train_steps(b.model, b.tokenizer, recipe, log_path=tmp_path / "log.jsonl")
    moved = changed(before, snapshot(b.model))
    assert moved and all("lora_" in n for n in moved), moved
    assert all(torch.isfinite(torch.tensor(losses)))


def test_full_fine_tuning_moves_every_weight(make_doc: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    recipe = load_recipe(document=make_doc("qa", "full"))
    set_seed(0)
    b = build(recipe)
    assert not lora_weights(b.model, "A")
    trainable, total = count_params(b.model)
    assert trainable == total == sum(p.numel() for p in b.model.parameters())
    before = snapshot(b.model)
    train_steps(b.model, b.tokenizer, recipe, log_path=tmp_path / "log.jsonl")
    moved = set(changed(before, snapshot(b.model)))
    params = {n for n, _ in b.model.named_parameters()}
    assert params <= moved, sorted(params - moved)


def test_count_params_for_lora(make_doc: Callable[..., dict[str, Any]]) -> None:
    b = built(make_doc, "lora")
    trainable, total = count_params(b.model)
    r = 4
    expected = sum(r * (m.in_features + m.out_features) for n, m in b.model.named_modules()
                   if type(m).__name__ == "Linear" and n.split(".")[-1] in LINEAR_NAMES)
    assert trainable == expected == sum(p.numel() for p in b.model.parameters() if p.requires_grad)
    assert trainable < total == sum(p.numel() for p in b.model.parameters())


def test_count_params_for_qlora_counts_every_4bit_value(make_doc: Callable[..., dict[str, Any]]) -> None:
    lora_trainable, lora_total = count_params(built(make_doc, "lora").model)
    qlora_trainable, qlora_total = count_params(built(make_doc, "qlora").model)
    assert qlora_trainable == lora_trainable
    assert qlora_total == lora_total  # a 4-bit weight still holds in_features * out_features values


def test_pick_dtype_and_device() -> None:
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == torch.float32
    assert pick_dtype("bfloat16", cpu) == torch.bfloat16
    assert pick_dtype("float16", cpu) == torch.float16
    assert pick_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert pick_device("auto") == cpu
        with pytest.raises(LiteFTError, match="train.device"):
            pick_device("cuda")


def test_unknown_lora_target_is_a_clear_error(make_doc: Callable[..., dict[str, Any]]) -> None:
    with pytest.raises(LiteFTError, match="lora.target_modules"):
        built(make_doc, "lora", lora={"target_modules": ["no_such_layer"]})


def test_folder_without_config_is_refused(make_doc: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(LiteFTError, match="config.json"):
        build(load_recipe(document=make_doc("qa", "lora", model={"source": str(tmp_path / "empty-model")})))


def test_pickle_only_weights_are_refused_unless_allowed(make_doc: Callable[..., dict[str, Any]],
                                                        tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    for item in tiny_llama_dir.iterdir():
        if item.suffix != ".safetensors":
            (folder / item.name).write_bytes(item.read_bytes())
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    torch.save(base.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(LiteFTError, match="pickle"):
        build(load_recipe(document=make_doc("qa", "lora", model={"source": str(folder)})))
    allowed = build(load_recipe(document=make_doc("qa", "lora", model={"source": str(folder), "allow_pickle": True})))
    batch = sample_batch(allowed.tokenizer)
    torch.testing.assert_close(logits(allowed.model, batch), logits(base, batch), rtol=0, atol=1e-6)


def test_classification_head_on_a_causal_lm_ignores_padding(make_doc: Callable[..., dict[str, Any]],
                                                            tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A causal LM classifies from its last real token, found through pad_token_id; lite-ft sets it when the
    model config has none, so a padded batch scores each sentence as it scores it alone."""
    import json

    from lite_ft.data.batching import collate

    folder = tmp_path / "no-pad-id"
    folder.mkdir()
    for item in tiny_llama_dir.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.pop("pad_token_id", None)
    (folder / "config.json").write_text(json.dumps(config))
    recipe = load_recipe(document=make_doc("classification", "lora", model={"source": str(folder)}))
    set_seed(0)
    b = build(recipe, num_labels=2)
    assert b.model.config.pad_token_id == b.tokenizer.pad_token_id is not None
    b.model.eval()
    texts = ["The smoothie was mostly ice and tasted of nothing.", "Great.", "It never felt like a slog at all."]
    encoded = [{"input_ids": b.tokenizer(t)["input_ids"], "labels": 0} for t in texts]
    with torch.no_grad():
        batch = collate(encoded, b.tokenizer.pad_token_id, causal=False)
        together = b.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = torch.cat([b.model(input_ids=torch.tensor([e["input_ids"]])).logits for e in encoded])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_batched_generation_equals_one_prompt_at_a_time(make_doc: Callable[..., dict[str, Any]]) -> None:
    """Left padding and the attention mask must not change greedy answers: batch of 8 == 8 batches of 1."""
    from lite_ft.data.load import load_splits
    from lite_ft.data.tasks import get_task
    from lite_ft.data.tasks.generation import generate

    recipe = load_recipe(document=make_doc("qa", "lora", data={"limit_eval": 8}))
    set_seed(0)
    b = build(recipe)
    with torch.no_grad():
        for name, p in b.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-trivial adapter takes part in generation too
    task = get_task("qa")
    prompts = [task.prompt(e, b.tokenizer, recipe) for e in load_splits(recipe, task)[1].examples]
    assert len({len(p) for p in prompts}) > 1, "prompts of different lengths are needed to exercise padding"
    batched = generate(b.model, b.tokenizer, prompts, max_new_tokens=6, batch_size=8, device=b.device)
    single = generate(b.model, b.tokenizer, prompts, max_new_tokens=6, batch_size=1, device=b.device)
    assert batched == single
    assert len(set(single)) > 1, "the answers should depend on the prompt"
