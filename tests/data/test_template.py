"""Training targets are rendered by the chat template, so they end the way the template ends an assistant turn,
and generation stops there; tested with an end-of-turn token that is not eos (as Llama 3's <|eot_id|> and Gemma's
<end_of_turn> are not)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from lite_ft.data.batching import IGNORE
from lite_ft.data.tasks import get_task
from lite_ft.data.tasks.causal import conversation_ids, stop_ids
from lite_ft.data.tasks.generation import generate
from lite_ft.recipe.load import load_recipe

TURN_TEMPLATE = ("{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def turn_tokenizer(tiny_llama_dir: Path) -> Any:
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|start|>", "<|end|>"]})
    tok.chat_template = TURN_TEMPLATE
    assert tok.eos_token == "</s>"
    return tok


def test_targets_end_with_the_templates_end_of_turn(turn_tokenizer: Any) -> None:
    end = turn_tokenizer.convert_tokens_to_ids("<|end|>")
    recipe = load_recipe(document={"task": "instruction", "method": "lora"})
    example = {"id": "x", "messages": [{"role": "user", "content": "Capital of Peru?"}], "response": "Lima."}
    encoded = get_task("instruction").encode(example, turn_tokenizer, recipe)
    targets = [t for t in encoded["labels"] if t != IGNORE]
    assert targets[-1] == end and turn_tokenizer.eos_token_id not in targets
    assert turn_tokenizer.decode(targets, skip_special_tokens=True).strip() == "Lima."
    rendered = turn_tokenizer.apply_chat_template(example["messages"] + [{"role": "assistant", "content": "Lima."}],
                                                  tokenize=False)
    # Everything but the newline the template writes after the turn: the reply and its end-of-turn marker.
    assert turn_tokenizer.decode(encoded["input_ids"]) == turn_tokenizer.decode(
        turn_tokenizer(rendered.rstrip(), add_special_tokens=False)["input_ids"])


def test_qa_targets_end_with_the_end_of_turn_too(turn_tokenizer: Any) -> None:
    recipe = load_recipe(document={"task": "qa", "method": "lora"})
    example = {"id": "q", "context": "The shop opened in 1874 by the river.", "question": "When did it open?",
               "answers": ["in 1874"]}
    encoded = get_task("qa").encode(example, turn_tokenizer, recipe)
    targets = [t for t in encoded["labels"] if t != IGNORE]
    assert targets[-1] == turn_tokenizer.convert_tokens_to_ids("<|end|>")


def test_prompt_and_targets_split_the_rendered_conversation(turn_tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus two?"}]
    prompt, target = conversation_ids(turn_tokenizer, messages, "Four.")
    generation_prompt = turn_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert prompt == list(generation_prompt["input_ids"])  # what generation sees is what training conditioned on


def test_stop_ids_are_eos_and_the_end_of_turn(turn_tokenizer: Any) -> None:
    stops = stop_ids(turn_tokenizer)
    assert set(stops) == {turn_tokenizer.eos_token_id, turn_tokenizer.convert_tokens_to_ids("<|end|>")}
    plain = copy.deepcopy(turn_tokenizer)
    plain.chat_template = None
    assert stop_ids(plain) == [plain.eos_token_id]


class Scripted(LlamaForCausalLM):
    """A model whose next token follows a script, whatever the input: it shows where generation stops."""

    script: list[int] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = super().forward(*args, **kwargs)
        step = self.calls
        self.calls += 1
        out.logits[:, -1, :] = -1e4
        out.logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 1e4
        return out


def test_generation_stops_at_the_end_of_turn(turn_tokenizer: Any, tiny_llama_dir: Path) -> None:
    model = Scripted.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(turn_tokenizer))
    reply = turn_tokenizer("Lima", add_special_tokens=False)["input_ids"]
    after = turn_tokenizer(" and more words", add_special_tokens=False)["input_ids"]
    model.script = [*reply, turn_tokenizer.convert_tokens_to_ids("<|end|>"), *after]
    model.calls = 0
    prompt = turn_tokenizer.apply_chat_template([{"role": "user", "content": "Capital of Peru?"}],
                                                add_generation_prompt=True, tokenize=True)["input_ids"]
    replies = generate(model, turn_tokenizer, [list(prompt)], max_new_tokens=12, batch_size=1,
                       device=torch.device("cpu"))
    assert replies == ["Lima"]
    assert model.calls == len(reply) + 1  # no token generated past the end of turn
