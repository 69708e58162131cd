"""lite-ft's causal-LM loss (output layer on labelled positions only) equals the model's own loss and gradients."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lite_ft.data.batching import IGNORE, collate
from lite_ft.recipe.load import load_recipe
from lite_ft.run import run
from lite_ft.training.loss import LossGuard, batch_loss, causal_lm_loss, target_units
from lite_ft.model import build
from lite_ft.data.tasks import get_task
from lite_ft.training.loop import set_seed


def padded_batch(tokenizer: Any, recipe: Any, qa_rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Three QA examples of different lengths: right padding, and -100 on prompt and padding positions."""
    task = get_task("qa")
    examples = task.prepare([qa_rows[0], qa_rows[5], qa_rows[40]], recipe.data, "train").examples
    batch = collate([task.encode(e, tokenizer, recipe) for e in examples], tokenizer.pad_token_id, causal=True)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1, "the examples should need padding"
    assert ((batch["labels"] == IGNORE) & (batch["attention_mask"] == 1)).any(), "prompt positions are ignored"
    return batch


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def check_against_hf(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()  # no dropout: both passes must see the same network
    model.zero_grad(set_to_none=True)
    ours, count = causal_lm_loss(model, batch)
    ours.backward()
    our_grads = grads(model)
    model.zero_grad(set_to_none=True)
    theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    theirs.backward()
    their_grads = grads(model)
    assert count == int((batch["labels"][:, 1:] != IGNORE).sum()) > 0
    assert abs(ours.item() - theirs.item()) < 1e-5
    assert our_grads.keys() == their_grads.keys() and our_grads
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    return ours.detach()


def test_loss_equals_hf_loss_plain_model(tiny_llama_dir: Path, make_doc: Callable[..., dict[str, Any]],
                                         qa_rows: list[dict[str, Any]]) -> None:
    recipe = load_recipe(document=make_doc("qa", "full"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    check_against_hf(model, padded_batch(tokenizer, recipe, qa_rows))


def test_loss_equals_hf_loss_peft_model(make_doc: Callable[..., dict[str, Any]],
                                        qa_rows: list[dict[str, Any]]) -> None:
    recipe = load_recipe(document=make_doc("qa", "lora"))
    set_seed(0)
    b = build(recipe)
    batch = padded_batch(b.tokenizer, recipe, qa_rows)
    with b.model.disable_adapter():
        b.model.eval()
        with torch.no_grad():
            base_loss, _ = causal_lm_loss(b.model, batch)
    # Non-zero B matrices, so the adapters change the output and the loss must run through them.
    with torch.no_grad():
        for name, p in b.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    loss = check_against_hf(b.model, batch)
    assert abs(loss.item() - base_loss.item()) > 1e-3


def test_batch_loss_matches_per_example_token_weighting(tiny_llama_dir: Path, make_doc: Callable[..., dict[str, Any]],
                                                       qa_rows: list[dict[str, Any]]) -> None:
    """The batch loss is the mean over all labelled tokens: per-example means weighted by their token counts."""
    recipe = load_recipe(document=make_doc("qa", "full"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    batch = padded_batch(tokenizer, recipe, qa_rows)
    with torch.no_grad():
        total, count = batch_loss(model, batch, causal=True)
        parts = []
        for row in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][row].sum())
            one = {k: v[row:row + 1, :n] for k, v in batch.items()}  # the same example without padding
            parts.append(causal_lm_loss(model, one))
    assert count == sum(c for _, c in parts)
    assert total.item() == pytest.approx(sum(l.item() * c for l, c in parts) / count, abs=1e-5)


def test_no_labelled_position_gives_zero_loss_that_backpropagates(tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "labels": torch.full((1, 4), IGNORE)}
    loss, count = causal_lm_loss(model, batch)
    assert count == 0 and loss.item() == 0.0
    loss.backward()  # a micro-batch without targets must not break accumulation


def test_classification_batch_loss_counts_examples(tiny_bert_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).eval()
    batch = collate([{"input_ids": [2, 10, 11, 3], "labels": 1}, {"input_ids": [2, 12, 3], "labels": 0}],
                    pad_id=0, causal=False)
    with torch.no_grad():
        loss, count = batch_loss(model, batch, causal=False)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert count == 2
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, batch["labels"]).item(), abs=1e-6)


@pytest.fixture(scope="module")
def tiny_granite_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Granite: its forward divides the logits by `logits_scaling`, which a loss computed from
    the output layer alone would miss."""
    from transformers import GraniteConfig, GraniteForCausalLM

    folder = tmp_path_factory.mktemp("tiny-granite")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    config = GraniteConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(1234)
    GraniteForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def guarded(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[LossGuard, float]:
    guard = LossGuard(causal=True)
    with torch.no_grad():
        mean = (guard(model, batch) / target_units(batch, True)).item()
    return guard, mean


def test_loss_guard_keeps_the_fast_loss_where_it_is_exact(tiny_llama_dir: Path, make_doc: Callable[..., dict[str, Any]],
                                                         qa_rows: list[dict[str, Any]]) -> None:
    recipe = load_recipe(document=make_doc("qa", "full"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).train()
    guard, _ = guarded(model, padded_batch(tokenizer, recipe, qa_rows))
    assert not guard.full_forward and guard.report["relative_difference"] < 1e-6
    assert model.training, "the check runs in eval mode and restores training mode"


def test_loss_guard_switches_to_the_full_forward_on_scaled_logits(tiny_granite_dir: Path,
                                                                  make_doc: Callable[..., dict[str, Any]],
                                                                  qa_rows: list[dict[str, Any]]) -> None:
    recipe = load_recipe(document=make_doc("qa", "full"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_granite_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_granite_dir, dtype=torch.float32).eval()
    batch = padded_batch(tokenizer, recipe, qa_rows)
    with torch.no_grad():
        fast, _ = causal_lm_loss(model, batch)
        own = model(**batch).loss
    assert abs(fast.item() - own.item()) > 1e-2  # the shortcut is wrong for this model
    guard, mean = guarded(model, batch)
    assert guard.full_forward and guard.report["path"] == "full forward"
    assert mean == pytest.approx(own.item(), rel=1e-5)


def test_the_loss_path_is_in_metrics_json(tiny_granite_dir: Path, make_doc: Callable[..., dict[str, Any]]) -> None:
    metrics = run(load_recipe(document=make_doc("qa", "lora", model={"source": str(tiny_granite_dir)},
                                                train={"max_steps": 2}, output={"save_model": False})))
    assert metrics["loss_path"]["path"] == "full forward"
    saved = json.loads((Path(make_doc()["output"]["dir"]) / "metrics.json").read_text())
    assert saved["loss_path"]["path"] == "full forward" and "logits" in saved["loss_path"]["reason"]
