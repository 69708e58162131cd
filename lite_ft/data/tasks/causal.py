"""Causal-LM pieces shared by the qa and instruction tasks: prompt encoding, stop tokens, eval loss (greedy
generation is in lite_ft.data.tasks.generation)."""
from __future__ import annotations

import math
from typing import Any

import torch

from lite_ft.data.batching import IGNORE
from lite_ft.errors import DataError
from lite_ft.training.loss import row_loss_sums


def chat_messages(user: str, system: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}]


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a prompt ending where the assistant's reply begins: the chat template when the tokenizer has
    one, else the plain text of the messages followed by "Answer:"."""
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
    text = "\n\n".join(m["content"] for m in messages) + "\nAnswer:"
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return list(ids)


def completion_ids(tokenizer: Any, text: str) -> list[int]:
    """Without a chat template: the reply's tokens after a space, then the end-of-sequence token, so the model
    learns to stop."""
    ids = tokenizer(" " + text, add_special_tokens=False)["input_ids"]
    return list(ids) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def conversation_ids(tokenizer: Any, messages: list[dict[str, str]], response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids) of a conversation whose last turn is the assistant's `response`.

    With a chat template the whole conversation is rendered by the template and tokenized once, so the targets
    end exactly as the template ends an assistant turn (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`: not
    necessarily eos), and the seam between prompt and reply tokenizes as it does in the full text. What the template
    writes after the end-of-turn marker (a newline before the next turn) is not a target.
    """
    if not getattr(tokenizer, "chat_template", None):
        return prompt_ids(tokenizer, messages), completion_ids(tokenizer, response)
    prompt_text = _render(tokenizer, messages, True)
    full_text = _render(tokenizer, [*messages, {"role": "assistant", "content": response}], False)
    if not full_text.startswith(prompt_text):
        raise DataError("the chat template renders the prompt differently with and without the reply, so the "
                        "reply's tokens cannot be located; set data.system_prompt or use a model whose template "
                        "renders a conversation as its prefix plus the new turn")
    text = full_text.rstrip()
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    prompt = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    if ids[:len(prompt)] == prompt:
        return prompt, ids[len(prompt):]
    # The prompt's last token merges with the reply's first in the full text: split where the reply's text begins.
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    cut = next(i for i, (start, _) in enumerate(offsets) if start >= len(prompt_text))
    return ids[:cut], ids[cut:]


def stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a reply: eos, and with a chat template the last token of its end-of-turn marker."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": "q"}]
        _, target = conversation_ids(tokenizer, messages, "a")
        reply = tokenizer("a", add_special_tokens=False)["input_ids"]
        if len(target) > len(reply):  # the template closes the turn with a marker of its own
            stops.append(target[-1])
    return sorted(set(stops))


def encode_pair(prompt: list[int], completion: list[int], max_length: int, truncate: bool = False
                ) -> dict[str, list[int]] | None:
    """input_ids and labels with the loss on the completion only. An example over max_length is None, or with
    `truncate` its completion is cut to fit (never the prompt: a cut prompt loses the question)."""
    if len(prompt) + len(completion) > max_length:
        if not truncate or len(prompt) >= max_length:
            return None
        completion = completion[: max_length - len(prompt)]
    return {"input_ids": prompt + completion, "labels": [IGNORE] * len(prompt) + completion}


@torch.no_grad()
def example_losses(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device
                   ) -> list[float]:
    """Summed completion-token loss of each example, batch after batch, in order."""
    model.eval()
    found: list[float] = []
    for batch in batches:
        found += row_loss_sums(model, {k: v.to(device) for k, v in batch.items()})
    return found


def loss_scores(loss_sums: list[float], tokens: list[int]) -> dict[str, float]:
    """Mean token loss over all completion tokens, and its perplexity, added up example by example."""
    total, count = math.fsum(loss_sums), sum(tokens)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": int(count)}
